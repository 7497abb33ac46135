"""``oncotrace evaluate``: score a trained model on a labelled cohort and write a study report.

Outputs in ``--out``: ``metrics.json``, ``predictions.csv``, ``roc_<task>.png``,
``reliability_<task>.png``, ``confusion_<task>.png`` and ``report.html`` (self-contained).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from oncotrace.wsi import read_csv_rows
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._batch import check_out_dir
from ._failures import usage_error
from ._predictions import PredictionRow, write_predictions

if TYPE_CHECKING:
    from oncotrace.mil import ModelCard


class EvaluationInputError(ValueError):
    """Bad model, stores, labels or readers file; the message names the file and the fix."""


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command()
    def evaluate(
        model: Annotated[
            Path, typer.Option("--model", help="Model folder from `oncotrace train`.")
        ],
        stores: Annotated[
            Path, typer.Option("--stores", help="Tile stores embedded with the model's encoder.")
        ],
        labels: Annotated[
            Path,
            typer.Option("--labels", help="labels.csv: slide_id, patient_id, site, task columns."),
        ],
        out: Annotated[Path, typer.Option("--out", help="Report folder.")],
        readers: Annotated[
            Path | None,
            typer.Option(
                "--readers",
                help="readers.csv: slide_id or patient_id, reader, [task], call, [score].",
            ),
        ] = None,
        n_boot: Annotated[
            int, typer.Option("--n-boot", help="Bootstrap resamples for the CIs.")
        ] = 1000,
        conformal_level: Annotated[
            float | None,
            typer.Option(
                "--conformal-level", help="Coverage of the prediction sets [default: stored]."
            ),
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    ) -> None:
        """Evaluate a trained model on a labelled cohort: metrics with 95 % CIs, calibration,
        prediction sets, reader comparison, figures and an HTML report."""
        try:
            check_out_dir(out)
            result = evaluate_command(
                model,
                stores,
                labels,
                out,
                readers=readers,
                n_boot=n_boot,
                conformal_level=conformal_level,
                seed=seed,
            )
        except KeyError as exc:
            # plain echo: rich would fold long paths at the console width
            raise usage_error(ValueError(exc.args[0] if exc.args else str(exc))) from exc
        except (ValueError, FileNotFoundError) as exc:  # mil.ModelFileError included
            raise usage_error(exc) from exc
        table = Table(title=f"{result['n_cases']} cases → {out}")
        for col in ("task", "measure", "estimate", "95 % CI"):
            table.add_column(col)
        for task, summary in result["metrics"]["tasks"].items():
            if summary is None:
                table.add_row(task, "(one class among the labelled cases)", "", "")
                continue
            for name, v in summary["metrics"].items():
                est = "" if v["estimate"] is None else f"{v['estimate']:.3f}"
                ci = f"{v['low']:.3f}–{v['high']:.3f}" if v["low"] is not None else ""
                table.add_row(task, name, est, ci)
        console.print(table)
        for w in result["metrics"]["warnings"]:
            console.print(f"[yellow]•[/yellow] {escape(w)}")


def evaluate_command(
    model_dir: Path,
    stores: Path,
    labels: Path,
    out: Path,
    *,
    readers: Path | None = None,
    n_boot: int = 1000,
    conformal_level: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Load, check, predict, calibrate, evaluate and write the report files into ``out``."""
    from oncotrace import mil

    t0 = time.perf_counter()
    # first: a model folder that cannot load (mil.ModelFileError) is refused before any work
    model, card = mil.load_model(model_dir)
    encoder = _model_encoder(model_dir, card)
    tasks = card.tasks
    cov = card.covariates
    _check_encoder(stores, labels, encoder, model_dir)
    data = mil.load_cohort(
        stores,
        labels,
        encoder,
        list(tasks),
        list(cov.names),
        covariate_stats={"mean": cov.mean, "std": cov.std} if cov.names else None,
    )
    if isinstance(model.config.in_dims, int) and data.in_dim != model.config.in_dims:
        raise EvaluationInputError(
            f"{stores}: the {encoder!r} features have {data.in_dim} columns but the model"
            f" {model_dir} takes {model.config.in_dims}. Fix: evaluate on features from the"
            " same encoder (or import) the model was trained on."
        )
    y = _model_labels(data, tasks, labels)
    proba, _ = mil.predict(model, data.bags, data.covariates)
    calibration = card.calibration
    general: list[str] = []
    if not calibration:
        general.append(
            "The model carries no calibration record (trained before calibration existed): "
            "probabilities are uncalibrated, binary calls use 0.5 and there are no prediction "
            "sets. Retrain with `oncotrace train` to add one."
        )
        calibration = None
    else:
        general += [str(n) for n in calibration.get("notes", [])]
        for task, rec in (calibration.get("tasks") or {}).items():
            general += [f"Calibration of {task!r}: {n}" for n in rec.get("notes", [])]
    evaluations = mil.evaluate_predictions(
        y,
        proba,
        tasks,
        data.patient_ids,
        calibration,
        n_boot=n_boot,
        seed=seed,
        conformal_level=conformal_level,
    )
    calibrated = mil.apply_calibration(proba, tasks, calibration, conformal_level=conformal_level)
    reader_rows = (
        _compare_readers(readers, data, tasks, y, calibrated) if readers is not None else []
    )

    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, Path]] = {}
    for task, ev in evaluations.items():
        if ev is None:
            continue
        stem = _safe(task)
        figures[task] = {
            "ROC curve": mil.plot_roc(ev, out / f"roc_{stem}.png"),
            "reliability diagram": mil.plot_reliability(ev, out / f"reliability_{stem}.png"),
            "confusion matrix": mil.plot_confusion(ev, out / f"confusion_{stem}.png"),
        }
    ood, cohort_ood = None, "not checked (the model records no training statistics)"
    if card.ood is not None:
        distance = card.ood.distance(data.bags)
        ood = (distance, distance > card.ood.threshold)
        flagged = [str(data.slide_ids[i]) for i in np.flatnonzero(ood[1])]
        cohort_ood = (
            f"{len(flagged)} of {len(data)} slides lie outside the data the model was trained on"
            f" (ood_distance above {card.ood.threshold:.1f})"
        )
        if flagged:
            general.append(
                f"{cohort_ood}: {', '.join(flagged[:10])}{' …' if len(flagged) > 10 else ''}."
                " Their predictions are not reliable; the metrics include them."
            )
    _write_predictions(out / "predictions.csv", data, tasks, y, proba, calibrated, ood)
    cohort = {
        "slides": len(data),
        "patients": len(set(data.patient_ids.tolist())),
        "sites": ", ".join(sorted(set(data.sites.tolist()))),
        "labels file": str(labels),
        "tile stores": str(stores),
        "out of domain": cohort_ood,
    }
    for task, names in tasks.items():
        counts = np.bincount(y[task][y[task] >= 0], minlength=len(names))
        cohort[f"slides per class ({task})"] = ", ".join(
            f"{n}: {int(k)}" for n, k in zip(names, counts, strict=True)
        )
    metrics = {
        "model": str(model_dir),
        "cohort": cohort,
        "calibration_source": (calibration or {}).get("source"),
        "tasks": {t: None if ev is None else ev.summary() for t, ev in evaluations.items()},
        "readers": [_jsonable_row(r) for r in reader_rows],
        "warnings": general,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    page = mil.render_html(
        evaluations,
        figures,
        cohort=cohort,
        model=card,
        readers=reader_rows,
        warnings=general,
        title=f"OncoTrace evaluation — {model_dir.name}",
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    return {
        "metrics": metrics,
        "n_cases": len(data),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _model_encoder(model_dir: Path, card: ModelCard) -> str:
    """The features the model takes: a registered encoder's or any imported name."""
    from oncotrace.mil import encoder_config, list_encoders

    path = model_dir / "model.json"
    if card.encoder is None:
        raise EvaluationInputError(
            f"{path}: no 'encoder' section, so the features to evaluate on are unknown. Fix: "
            "save the model with `oncotrace train` (mil.save_model(..., data=cohort))."
        )
    name, in_dim = card.encoder.name, card.head.in_dims
    # a registered name must give its encoder's width; imported features carry their own
    if name in list_encoders() and isinstance(in_dim, int):
        registry_dim = encoder_config(name).dim
        if registry_dim != in_dim:
            raise EvaluationInputError(
                f"{path}: the model takes {in_dim}-dim features but encoder {name!r} gives "
                f"{registry_dim}-dim ones. Fix: evaluate with the model trained on these features."
            )
    return name


def _check_encoder(stores: Path, labels: Path, encoder: str, model_dir: Path) -> None:
    """Refuse stores embedded only with another encoder than the model's, naming both."""
    if not labels.is_file():
        raise EvaluationInputError(f"{labels}: labels file not found.")
    ids = [r.get("slide_id", "") for r in read_csv_rows(labels)[1]]
    for sid in ids:
        features = stores / f"{sid}.zarr" / "features"
        if not features.is_dir():
            continue  # missing stores / features: load_cohort says what to do
        found = sorted(p.name for p in features.iterdir() if (p / "zarr.json").is_file())
        if found and encoder not in found:
            raise EvaluationInputError(
                f"{features.parent}: features were embedded with {found}, but the model "
                f"{model_dir} was trained on {encoder!r} features. Fix: `oncotrace embed "
                f"{stores} --encoder {encoder}`, or evaluate a model trained on {found[0]!r}."
            )


def _model_labels(
    data: Any, tasks: dict[str, tuple[str, ...]], labels: Path
) -> dict[str, np.ndarray]:
    """Re-index the cohort's labels (sorted names found in the file) to the model's classes."""
    out = {}
    for task, model_names in tasks.items():
        names = data.class_names[task]
        unknown = sorted(set(names) - set(model_names))
        if unknown:
            raise EvaluationInputError(
                f"{labels}: task {task!r} has class(es) {unknown} that the model does not know "
                f"(it predicts {list(model_names)}). Fix the labels or evaluate another model."
            )
        lut = np.array([model_names.index(n) for n in names], dtype=np.int64)
        y = data.labels[task]
        out[task] = np.where(y >= 0, lut[np.maximum(y, 0)], -1).astype(np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _compare_readers(
    path: Path,
    data: Any,
    tasks: dict[str, tuple[str, ...]],
    y: dict[str, np.ndarray],
    calibrated: dict[str, Any],
) -> list[dict[str, Any]]:
    """McNemar (accuracy) and, for binary tasks with reader scores, DeLong (AUC) per reader."""
    from oncotrace import mil

    calls = _read_readers(path, data, tasks)
    rows = []
    for (reader, task, unit), entries in sorted(calls.items()):
        names = tasks[task]
        cp = calibrated[task]
        keys = list(entries)
        if unit == "patient":
            # patient-level model: mean calibrated probability over the patient's slides
            members = [np.flatnonzero(data.patient_ids == k) for k in keys]
            p = np.stack([cp.proba[m].mean(axis=0) for m in members])
            truth = np.array([_patient_truth(y[task][m]) for m in members])
            if cp.threshold is not None:
                model_call = (p[:, 1] >= cp.threshold).astype(np.int64)
            else:
                model_call = p.argmax(axis=1)
        else:
            pos = {s: i for i, s in enumerate(data.slide_ids.tolist())}
            rows_i = np.array([pos[k] for k in keys])
            p, truth, model_call = cp.proba[rows_i], y[task][rows_i], cp.predicted[rows_i]
        known = truth >= 0
        reader_call = np.array([names.index(entries[k][0]) for k in keys])
        scores = [entries[k][1] for k in keys]
        row: dict[str, Any] = {
            "reader": reader,
            "task": task,
            "unit": f"{unit}s",
            "n": int(known.sum()),
            "model_accuracy": math.nan,
            "reader_accuracy": math.nan,
            "model_only_correct": None,
            "reader_only_correct": None,
            "mcnemar_p": math.nan,
            "mcnemar_method": None,
            "model_auc": math.nan,
            "reader_auc": math.nan,
            "delong_z": math.nan,
            "delong_p": math.nan,
        }
        rows.append(row)
        if not known.any():
            continue
        t = truth[known]
        m_ok, r_ok = model_call[known] == t, reader_call[known] == t
        mc = mil.mcnemar_test(m_ok, r_ok)
        row.update(
            model_accuracy=float(m_ok.mean()),
            reader_accuracy=float(r_ok.mean()),
            model_only_correct=mc.n_a_only,
            reader_only_correct=mc.n_b_only,
            mcnemar_p=mc.p_value,
            mcnemar_method=mc.method,
        )
        s = np.array([np.nan if v is None else v for v in scores], dtype=np.float64)[known]
        if len(names) == 2 and np.isfinite(s).all() and len(np.unique(t)) == 2:
            z, pval, auc_m, auc_r = mil.delong_test(t, p[known, 1], s)
            row.update(model_auc=auc_m, reader_auc=auc_r, delong_z=z, delong_p=pval)
    return rows


def _patient_truth(labels: np.ndarray) -> int:
    known = labels[labels >= 0]
    return int(known[0]) if known.size else -1


def _read_readers(
    path: Path, data: Any, tasks: dict[str, tuple[str, ...]]
) -> dict[tuple[str, str, str], dict[str, tuple[str, float | None]]]:
    """``(reader, task, unit) -> {case id: (call, score)}``, every value checked."""
    if not path.is_file():
        raise EvaluationInputError(f"{path}: readers file not found.")
    columns, records = read_csv_rows(path)
    id_col = next((c for c in ("slide_id", "patient_id") if c in columns), None)
    missing = [c for c in ("reader", "call") if c not in columns]
    if id_col is None or missing:
        need = ["slide_id or patient_id"] if id_col is None else []
        raise EvaluationInputError(
            f"{path}: missing column(s) {need + missing}; the file has {columns}. Expected "
            "slide_id (or patient_id), reader, task (optional with one task), call, score "
            "(optional)."
        )
    if "task" not in columns and len(tasks) > 1:
        raise EvaluationInputError(
            f"{path}: the model has tasks {list(tasks)}, so a 'task' column is needed."
        )
    if not records:
        raise EvaluationInputError(f"{path}: no data rows.")
    unit = "slide" if id_col == "slide_id" else "patient"
    known_ids = set((data.slide_ids if unit == "slide" else data.patient_ids).tolist())
    unknown = sorted({r[id_col] for r in records} - known_ids)
    if unknown:
        raise EvaluationInputError(
            f"{path}: {len(unknown)} {id_col}(s) are not in the evaluated cohort: "
            f"{unknown[:10]}. Fix the ids or add those slides to the labels file."
        )
    out: dict[tuple[str, str, str], dict[str, tuple[str, float | None]]] = defaultdict(dict)
    single = next(iter(tasks))
    for line, r in enumerate(records, start=2):
        task = (r.get("task") or "").strip() or single
        if task not in tasks:
            raise EvaluationInputError(
                f"{path}, line {line}: unknown task {task!r}; the model has {list(tasks)}."
            )
        call = (r.get("call") or "").strip()
        if call not in tasks[task]:
            raise EvaluationInputError(
                f"{path}, line {line}: call {call!r} is not a class of task {task!r} "
                f"({list(tasks[task])}). Use the class names exactly as in the labels."
            )
        raw = (r.get("score") or "").strip()
        score: float | None = None
        if raw:
            try:
                score = float(raw)
            except ValueError:
                score = math.nan
            if not 0.0 <= score <= 1.0:
                raise EvaluationInputError(
                    f"{path}, line {line}: score {raw!r} is not a probability in [0, 1] "
                    "(the reader's probability of the positive class / the called class)."
                )
        reader = r["reader"].strip()
        key = (reader, task, unit)
        if r[id_col] in out[key]:
            raise EvaluationInputError(
                f"{path}, line {line}: reader {reader!r} calls {r[id_col]!r} twice for task "
                f"{task!r}; keep one row per reader, case and task."
            )
        out[key][r[id_col]] = (call, score)
    return dict(out)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def _jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def _write_predictions(
    path: Path,
    data: Any,
    tasks: dict[str, tuple[str, ...]],
    y: dict[str, np.ndarray],
    proba: dict[str, np.ndarray],
    calibrated: dict[str, Any],
    ood: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """One row per slide and task, in the layout ``oncotrace score`` writes too."""
    rows = []
    for i in range(len(data)):
        for task, names in tasks.items():
            cp = calibrated[task]
            yi = int(y[task][i])
            rows.append(
                PredictionRow(
                    slide_id=str(data.slide_ids[i]),
                    task=task,
                    classes=tuple(names),
                    proba=[float(v) for v in cp.proba[i]],
                    predicted_class=names[int(cp.predicted[i])],
                    uncalibrated=[float(v) for v in proba[task][i]],
                    true_class=names[yi] if yi >= 0 else "",
                    patient_id=str(data.patient_ids[i]),
                    site=str(data.sites[i]),
                    conformal_set=None
                    if cp.sets is None
                    else [n for n, s in zip(names, cp.sets[i], strict=True) if s],
                    n_tiles=len(data.bags[i]),
                    ood_distance=None if ood is None else float(ood[0][i]),
                    ood=None if ood is None else bool(ood[1][i]),
                )
            )
    write_predictions(path, rows)
