"""Figures (ROC, reliability, confusion) and a self-contained HTML report of an evaluation.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so no pyplot
state or display is touched. The HTML page embeds the figures as base64 PNGs and escapes every
piece of text it inserts.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._card import ModelCard
    from ._evaluate import Estimate, TaskEvaluation


def _figure(size: tuple[float, float] = (4.6, 4.2)) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_roc(ev: TaskEvaluation, path: str | Path) -> Path:
    """ROC curve(s) of one task (binary: the positive class; multi-class: one-vs-rest)."""
    from sklearn.metrics import roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    columns = [1] if ev.binary else range(len(ev.class_names))
    for j in columns:
        hit = (ev.y == j).astype(int)
        if 0 < hit.sum() < hit.size:
            fpr, tpr, _ = roc_curve(hit, ev.proba[:, j])
            if ev.binary:
                a = ev.metrics["auc"]
                label = f"AUC {a.estimate:.2f} ({a.low:.2f}–{a.high:.2f})"
            else:
                pc = ev.per_class_auc.get(ev.class_names[j])
                auc = f" AUC {pc.estimate:.2f}" if pc is not None else ""
                label = f"{ev.class_names[j]}{auc}"
            ax.plot(fpr, tpr, drawstyle="steps-post", label=label)
    if ev.binary and ev.threshold is not None:
        sens, spec = ev.metrics["sensitivity"].estimate, ev.metrics["specificity"].estimate
        ax.plot([1 - spec], [sens], "o", color="black", label=f"threshold {ev.threshold:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(
        xlabel="1 − specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC — {ev.task}",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def calibration_sentence(ev: TaskEvaluation) -> str:
    """The report's plain-language calibration line: the ECE as reported, and before
    temperature scaling when one was fitted."""
    lead = (
        "When the model says 'x %', that should come true about x % of the time. The expected"
        " calibration error (ECE; 0 means the stated probabilities match the observed"
        f" frequencies) is {ev.ece:.3f}"
    )
    if ev.temperature != 1.0:
        return (
            f"{lead} after temperature scaling (T = {ev.temperature:.2f}, fitted on validation"
            f" data), and {ev.ece_uncalibrated:.3f} without it."
        )
    return f"{lead}; no temperature scaling was applied."


def _reliability_figure(ev: TaskEvaluation) -> Figure:
    """The reliability diagram of :func:`plot_reliability`, as a Figure (Agg canvas)."""
    fig = _figure()
    ax = fig.add_subplot()
    rel = ev.reliability
    conf, freq, counts = (np.asarray(rel[k]) for k in ("confidence", "frequency", "counts"))
    ok = counts > 0
    sizes = 20 + 180 * counts[ok] / max(int(counts.max()), 1)
    ax.plot(conf[ok], freq[ok], "-", color="C0", lw=1, zorder=2)
    ax.scatter(conf[ok], freq[ok], s=sizes, color="C0", zorder=3, label="bins (area ∝ cases)")
    # Dashed black above the (blue) data: a well-calibrated curve runs along the diagonal and
    # would hide it, and where the two part the gap between them is what the reader looks at.
    ax.plot([0, 1], [0, 1], "--", color="black", lw=1.2, zorder=4, label="perfect calibration")
    what = f"P({ev.class_names[1]})" if ev.binary else "confidence of the top class"
    ax.set(
        xlabel=f"predicted {what}",
        ylabel="observed frequency" if ev.binary else "observed accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Reliability — {ev.task} (ECE {ev.ece:.3f})",
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_reliability(ev: TaskEvaluation, path: str | Path) -> Path:
    """Reliability diagram: mean predicted probability against the observed frequency, with the
    perfect-calibration diagonal (dashed, above the data)."""
    return _save(_reliability_figure(ev), path)


def plot_confusion(ev: TaskEvaluation, path: str | Path) -> Path:
    """Confusion matrix with counts, rows the true class and columns the call."""
    cm = np.asarray(ev.confusion)
    c = len(ev.class_names)
    fig = _figure((max(3.6, 1.1 * c + 2.0), max(3.2, 1.0 * c + 1.8)))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    top = max(int(cm.max()), 1)
    for i in range(c):
        for j in range(c):
            colour = "white" if cm[i, j] > top / 2 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour)
    ax.set_xticks(range(c), ev.class_names, rotation=30, ha="right")
    ax.set_yticks(range(c), ev.class_names)
    ax.set(xlabel="model call", ylabel="true class", title=f"Confusion — {ev.task}")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;
padding:.25rem .6rem;text-align:left;vertical-align:top}th{background:#f3f3f3}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5rem 1rem}
figure{display:inline-block;margin:.5rem}img{max-width:26rem}
.small{color:#555;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.{digits}f} %"


def _meaning(name: str, ev: TaskEvaluation) -> str:
    names = ev.class_names
    pos = names[-1]
    neg = names[0]
    if name.startswith("sensitivity["):
        c = name[len("sensitivity[") : -1]
        return f"share of '{c}' cases the model called '{c}'"
    if name.startswith("specificity["):
        c = name[len("specificity[") : -1]
        return f"share of cases that are not '{c}' which the model did not call '{c}'"
    plain = {
        "auc": (
            f"chance that a random '{pos}' case gets a higher score than a random '{neg}' case "
            "(0.5 = coin toss, 1 = perfect)"
        ),
        "auc_macro": "one-vs-rest AUC averaged over the classes (each class counts equally)",
        "auc_micro": "one-vs-rest AUC pooling every case-class pair (frequent classes weigh more)",
        "accuracy": "share of cases called correctly",
        "balanced_accuracy": "mean of the per-class hit rates (not inflated by a common class)",
        "sensitivity": f"share of '{pos}' cases the model called '{pos}'",
        "specificity": f"share of '{neg}' cases the model called '{neg}'",
        "f1": f"balance of precision and sensitivity for '{pos}'",
        "f1_macro": "precision/sensitivity balance averaged over the classes",
        "top1_accuracy": "share of cases whose true class is the model's first choice",
        "top3_accuracy": "share of cases whose true class is among the model's three first choices",
    }
    return plain.get(name, name)


def _fmt_est(e: Estimate) -> tuple[str, str]:
    if not math.isfinite(e.estimate):
        return "n/a", ""
    ci = f"{e.low:.3f} to {e.high:.3f}" if math.isfinite(e.low) else "n/a"
    return f"{e.estimate:.3f}", f"{ci} ({e.method})"


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'


def _task_section(ev: TaskEvaluation, figures: Mapping[str, Path]) -> list[str]:
    out = [f"<h2>Task: {_e(ev.task)}</h2>"]
    counts = ", ".join(f"{_e(k)}: {v}" for k, v in ev.patients_per_class.items())
    out.append(
        f"<p>{ev.n_cases} labelled cases from {ev.n_patients} patients ({counts} patients). "
        f"Decision rule: {_e(ev.threshold_source)}"
        + (
            f", a case is called '{_e(ev.class_names[1])}' when its probability is at least "
            f"{ev.threshold:.3f}."
            if ev.binary and ev.threshold is not None
            else "."
        )
        + "</p>"
    )
    out.append("<table><tr><th>measure</th><th>value</th><th>95 % interval</th><th>meaning</th>")
    for name, est in ev.metrics.items():
        value, ci = _fmt_est(est)
        out.append(
            f"<tr><td>{_e(name)}</td><td>{_e(value)}</td><td>{_e(ci)}</td>"
            f"<td>{_e(_meaning(name, ev))}</td></tr>"
        )
    for name, est in ev.per_class_auc.items():
        value, ci = _fmt_est(est)
        out.append(
            f"<tr><td>AUC {_e(name)} vs rest</td><td>{_e(value)}</td><td>{_e(ci)}</td>"
            f"<td>{_e(f'how well the score separates {name!r} from the other classes')}</td></tr>"
        )
    out.append("</table>")
    out.append("<p><b>Calibration.</b> " + _e(calibration_sentence(ev)) + "</p>")
    if ev.conformal is not None:
        c = ev.conformal
        cov = c.coverage
        out.append(
            "<p><b>Prediction sets.</b> "
            + _e(
                f"Each case gets the set of classes that should contain its true class "
                f"{100 * c.level:.0f} % of the time; here the true class was in the set for "
                f"{_pct(cov.estimate)} of cases (95 % interval {_pct(cov.low)} to "
                f"{_pct(cov.high)}), with {c.mean_set_size:.2f} classes per set on average "
                f"(quantile fitted on {c.n_calibration} validation cases)."
            )
            + "</p>"
        )
    else:
        out.append(
            "<p><b>Prediction sets.</b> Not available: the model carries no conformal "
            "calibration.</p>"
        )
    out.append("<div>")
    for kind, path in figures.items():
        out.append(f"<figure>{_img(path)}<figcaption>{_e(kind)}</figcaption></figure>")
    out.append("</div>")
    return out


def _readers_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Comparison with readers</h2>"]
    if not rows:
        return [*out, "<p>No reader calls were given.</p>"]
    out.append(
        "<p>Model and each reader on the same cases. McNemar's test asks whether their "
        "accuracies differ (it only counts cases where exactly one of them was right); "
        "DeLong's test compares AUCs when the reader gave scores.</p>"
    )
    cols = [
        ("reader", "reader"),
        ("task", "task"),
        ("n", "cases"),
        ("model_accuracy", "model accuracy"),
        ("reader_accuracy", "reader accuracy"),
        ("model_only_correct", "only model right"),
        ("reader_only_correct", "only reader right"),
        ("mcnemar_p", "McNemar p"),
        ("model_auc", "model AUC"),
        ("reader_auc", "reader AUC"),
        ("delong_p", "DeLong p"),
    ]
    out.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for _, h in cols) + "</tr>")
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if isinstance(v, float):
                v = f"{v:.3f}" if math.isfinite(v) else "n/a"
            cells.append(f"<td>{_e('' if v is None else v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def render_html(
    evaluations: Mapping[str, TaskEvaluation | None],
    figures: Mapping[str, Mapping[str, Path]],
    *,
    cohort: Mapping[str, Any],
    model: ModelCard,
    readers: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
    title: str = "OncoTrace evaluation report",
) -> str:
    """One self-contained HTML page: cohort, model provenance, metrics, figures, caveats.

    Parameters
    ----------
    evaluations : task -> :class:`mil.TaskEvaluation` (None: not evaluable).
    figures : task -> caption -> PNG path (embedded as base64).
    cohort : plain facts, e.g. ``{"slides": 40, "patients": 30, "sites": ["A", "B"]}``.
    model : the model's card (:func:`mil.load_model`).
    readers : rows of the reader comparison.
    warnings : caveats shown at the top besides those of each task.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    caveats = list(warnings)
    for task, ev in evaluations.items():
        if ev is None:
            caveats.append(f"Task {task!r}: the labelled cases hold one class; nothing to score.")
        else:
            caveats.extend(f"{task}: {w}" for w in ev.warnings)
    if caveats:
        parts.append('<div class="warn"><b>Read with care</b><ul>')
        parts += [f"<li>{_e(w)}</li>" for w in caveats]
        parts.append("</ul></div>")

    parts.append("<h2>Cohort</h2><table>")
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in cohort.items()]
    parts.append("</table>")

    enc = model.encoder
    train = model.training
    prov = {
        "head": model.head.name,
        "encoder": "not recorded" if enc is None else f"{enc.name} (dimension {enc.dim})",
        "tasks": "; ".join(f"{t}: {', '.join(c)}" for t, c in model.tasks.items()),
        "covariates": ", ".join(model.covariates.names) or "none",
        "trained": train.get("trained_at", "not recorded"),
        "training evaluation": train.get("split", "not recorded"),
        "calibration fitted on": (model.calibration or {}).get("source") or "none",
        "OncoTrace version": model.oncotrace_version or "?",
    }
    parts.append("<h2>Model</h2><table>")
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in prov.items()]
    for task, m in model.metrics.items():
        for name in ("auc", "auc_macro", "accuracy"):
            v = ((m or {}).get("metrics") or {}).get(name)
            if isinstance(v, Mapping) and v.get("estimate") is not None:
                lo, hi = v.get("low"), v.get("high")
                ci = f" (95 % interval {lo:.3f} to {hi:.3f})" if lo is not None else ""
                text = f"{v['estimate']:.3f}{ci}"
                parts.append(
                    f"<tr><th>{_e(f'training {name}, {task}')}</th><td>{_e(text)}</td></tr>"
                )
    parts.append("</table>")

    for task, ev in evaluations.items():
        if ev is not None:
            parts += _task_section(ev, figures.get(task, {}))
    parts += _readers_section(readers)
    parts.append(
        '<p class="small">Intervals are 95 % confidence intervals: DeLong for a single AUC, '
        "otherwise a percentile bootstrap that resamples whole patients. Written by OncoTrace."
        "</p></body></html>"
    )
    return "\n".join(parts)
