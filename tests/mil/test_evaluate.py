"""evaluate_predictions / fit_calibration against hand counts, scikit-learn and simulations."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from oncotrace import mil
from oncotrace.mil import evaluate_predictions, fit_calibration
from scipy import special
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)
from sklearn.preprocessing import label_binarize

BIN = {"label": ("benign", "malignant")}


def _categorical(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    u = rng.random(len(p))[:, None]
    return (u > np.cumsum(p, axis=1)).sum(axis=1).astype(np.int64)


def _two_col(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p1, p1])


def test_binary_hand_counted_at_default_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, -1])  # the last case is unlabelled and must be skipped
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.99])
    ev = evaluate_predictions({"label": y}, {"label": _two_col(p1)}, BIN, n_boot=200)["label"]
    assert ev is not None and ev.n_cases == 6 and ev.case_index.tolist() == [0, 1, 2, 3, 4, 5]
    # Calls at 0.5: [0, 1, 0, 1, 0, 1] -> TN 2, FP 1, FN 1, TP 2.
    assert ev.threshold == 0.5 and "0.5" in ev.threshold_source
    np.testing.assert_array_equal(ev.confusion, [[2, 1], [1, 2]])
    m = ev.metrics
    assert m["sensitivity"].estimate == pytest.approx(2 / 3)
    assert m["specificity"].estimate == pytest.approx(2 / 3)
    assert m["accuracy"].estimate == pytest.approx(4 / 6)
    assert m["f1"].estimate == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # 9 positive-negative pairs; 0.4 < 0.6 is the one misordered pair -> 8/9
    assert m["auc"].estimate == pytest.approx(8 / 9)
    assert m["auc"].method == "DeLong" and ev.auc_bootstrap is not None
    assert ev.auc_bootstrap.method == "case bootstrap"
    for e in m.values():
        assert e.low <= e.estimate <= e.high
    assert ev.conformal is None and ev.temperature == 1.0
    summary = ev.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["metrics"]["auc"]["estimate"] == pytest.approx(8 / 9)


def test_binary_uses_the_stored_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9])
    record = {"tasks": {"label": {"class_names": list(BIN["label"]), "threshold": 0.35}}}
    ev = evaluate_predictions({"label": y}, {"label": _two_col(p1)}, BIN, None, record, n_boot=50)
    assert ev["label"] is not None
    # Calls at 0.35: [0, 1, 0, 1, 1, 1] -> sensitivity 3/3, specificity 2/3.
    assert ev["label"].metrics["sensitivity"].estimate == 1.0
    assert ev["label"].metrics["specificity"].estimate == pytest.approx(2 / 3)
    assert "validation" in ev["label"].threshold_source


def test_binary_matches_sklearn_and_bootstraps_patients() -> None:
    rng = np.random.default_rng(1)
    n_pat = 80
    patient_y = rng.integers(0, 2, n_pat)
    slides = rng.integers(1, 4, n_pat)
    groups = np.repeat([f"P{i}" for i in range(n_pat)], slides)
    y = np.repeat(patient_y, slides)
    p1 = special.expit(1.5 * (y - 0.5) * 2 + rng.normal(size=y.size))
    ev = evaluate_predictions({"label": y}, {"label": _two_col(p1)}, BIN, groups, n_boot=300)
    e = ev["label"]
    assert e is not None
    pred = (p1 >= 0.5).astype(int)
    assert e.metrics["auc"].estimate == pytest.approx(roc_auc_score(y, p1))
    assert e.metrics["accuracy"].estimate == pytest.approx(accuracy_score(y, pred))
    assert e.metrics["balanced_accuracy"].estimate == pytest.approx(
        balanced_accuracy_score(y, pred)
    )
    assert e.metrics["f1"].estimate == pytest.approx(f1_score(y, pred))
    np.testing.assert_array_equal(e.confusion, confusion_matrix(y, pred))
    assert e.n_patients == n_pat and e.metrics["accuracy"].method == "patient bootstrap"
    assert e.patients_per_class == {
        "benign": int((patient_y == 0).sum()),
        "malignant": int((patient_y == 1).sum()),
    }
    # several slides per patient: the report points at the patient-bootstrap AUC interval
    assert any("DeLong AUC interval treats slides as independent" in w for w in e.warnings)


def test_multiclass_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    n, c = 300, 5
    names = tuple("abcde")
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += 1.2
    p = special.softmax(z, axis=1)
    ev = evaluate_predictions({"t": y}, {"t": p}, {"t": names}, n_boot=100)["t"]
    assert ev is not None
    m = ev.metrics
    pred = p.argmax(1)
    assert m["auc_macro"].estimate == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["auc_micro"].estimate == pytest.approx(
        roc_auc_score(label_binarize(y, classes=range(c)), p, average="micro")
    )
    assert m["accuracy"].estimate == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"].estimate == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"].estimate == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["top3_accuracy"].estimate == pytest.approx(top_k_accuracy_score(y, p, k=3))
    np.testing.assert_array_equal(ev.confusion, confusion_matrix(y, pred))
    recalls = recall_score(y, pred, average=None)
    for j, name in enumerate(names):
        assert m[f"sensitivity[{name}]"].estimate == pytest.approx(recalls[j])
        spec = np.mean(pred[y != j] != j)
        assert m[f"specificity[{name}]"].estimate == pytest.approx(spec)
        assert ev.per_class_auc[name].estimate == pytest.approx(roc_auc_score(y == j, p[:, j]))
    # Top-3 is trivially 1 with three classes and is then left out.
    ev3 = evaluate_predictions(
        {"t": y % 3}, {"t": special.softmax(z[:, :3], 1)}, {"t": ("a", "b", "c")}, n_boot=20
    )["t"]
    assert ev3 is not None and "top3_accuracy" not in ev3.metrics


def test_single_class_is_not_evaluable_and_shapes_are_checked() -> None:
    p = _two_col(np.array([0.2, 0.7, 0.4]))
    assert evaluate_predictions({"label": np.array([1, 1, -1])}, {"label": p}, BIN)["label"] is None
    with pytest.raises(ValueError, match=r"shape \(3, 2\); expected \(3, 3\)"):
        evaluate_predictions({"t": np.array([0, 1, 2])}, {"t": p}, {"t": ("a", "b", "c")})
    record = {"tasks": {"label": {"class_names": ["no", "yes"], "temperature": 1.0}}}
    with pytest.raises(ValueError, match="refit the calibration"):
        evaluate_predictions({"label": np.array([0, 1, 0])}, {"label": p}, BIN, None, record)


def test_caveats_for_small_studies() -> None:
    y = np.array([0] * 10 + [1] * 3)
    p1 = np.linspace(0.05, 0.95, 13)
    ev = evaluate_predictions({"label": y}, {"label": _two_col(p1)}, BIN, n_boot=100)["label"]
    assert ev is not None
    text = " ".join(ev.warnings)
    assert "Only 13 patients" in text
    assert "'malignant' has only 3 patient(s)" in text
    assert "only 100 resamples" in text


def test_calibration_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(3)
    n, c, t0 = 6000, 4, 2.5
    true_logits = rng.normal(scale=1.5, size=(n, c))
    y = _categorical(rng, special.softmax(true_logits, axis=1))
    overconfident = special.softmax(t0 * true_logits, axis=1)  # softmax(z / T0) is calibrated
    names = {"t": ("a", "b", "c", "d")}
    rec = fit_calibration({"t": y[:3000]}, {"t": overconfident[:3000]}, names)
    json.dumps(rec, allow_nan=False)
    t = rec["tasks"]["t"]
    assert t["temperature"] == pytest.approx(t0, rel=0.05) and t["temperature_fitted"]
    assert t["threshold"] is None and t["conformal"]["level"] == 0.9
    ev = evaluate_predictions(
        {"t": y[3000:]}, {"t": overconfident[3000:]}, names, None, rec, n_boot=20
    )["t"]
    assert ev is not None
    np.testing.assert_allclose(ev.proba, special.softmax(true_logits[3000:], 1), atol=0.02)
    assert ev.ece < 0.03 < ev.ece_uncalibrated
    card = mil.ModelCard(head=mil.HeadConfig("abmil", 4, {"t": names["t"]}))
    page = " ".join(mil.render_html({"t": ev}, {}, cohort={}, model=card).split())
    assert (
        f"is {ev.ece:.3f} after temperature scaling (T = {ev.temperature:.2f}, fitted on"
        f" validation data), and {ev.ece_uncalibrated:.3f} without it." in page
    )


def test_conformal_coverage_through_the_record() -> None:
    # The stored quantile (after temperature scaling) and one re-derived for another level
    # from the stored validation scores both cover at their level on fresh cases.
    rng = np.random.default_rng(4)
    n_cal, n_test, c = 2000, 6000, 6
    logits = rng.normal(scale=1.5, size=(n_cal + n_test, c))
    y = _categorical(rng, special.softmax(logits, axis=1))
    p = special.softmax(1.7 * logits, axis=1)
    names = {"t": tuple("abcdef")}
    rec = fit_calibration({"t": y[:n_cal]}, {"t": p[:n_cal]}, names, level=0.9)
    for level in (None, 0.8):
        ev = evaluate_predictions(
            {"t": y[n_cal:]}, {"t": p[n_cal:]}, names, None, rec, n_boot=50, conformal_level=level
        )["t"]
        assert ev is not None and ev.conformal is not None
        target = 0.9 if level is None else level
        cov = np.mean(ev.conformal.sets[np.arange(n_test), y[n_cal:]])  # independent count
        assert cov == pytest.approx(ev.conformal.coverage.estimate)
        assert abs(cov - target) <= 0.03
        assert ev.conformal.mean_set_size == pytest.approx(ev.conformal.sets.sum(1).mean())
    assert rec["tasks"]["t"]["conformal"]["qhat"] == pytest.approx(
        np.sort(rec["tasks"]["t"]["conformal"]["scores"])[int(np.ceil(0.9 * (n_cal + 1))) - 1]
    )


def test_calibration_of_separated_binary_validation_by_hand() -> None:
    # Perfectly separated validation cases: the likelihood keeps falling as T -> 0, so no
    # temperature is applied; Youden's J = 1 anywhere in (0.4, 0.6]: the gap's midpoint, 0.5.
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    rec = fit_calibration({"label": y}, {"label": _two_col(p1)}, BIN)["tasks"]["label"]
    assert rec["temperature"] == 1.0 and not rec["temperature_fitted"]
    assert any("ranked correctly" in n for n in rec["notes"])
    assert rec["threshold"] == pytest.approx(0.5) and rec["threshold_rule"] == "youden"
    # 6 cases are too few for 90 % sets: ceil(7 * 0.9) = 7 > 6
    assert rec["conformal"]["qhat"] is None and any("too few" in n for n in rec["notes"])
    one_class = fit_calibration({"label": y * 0}, {"label": _two_col(p1)}, BIN)
    assert one_class["tasks"]["label"]["threshold"] is None


def test_reliability_diagonal_shows_over_a_calibrated_curve(tmp_path: Path) -> None:
    """A perfectly calibrated model's bins lie on the diagonal; the diagonal must still show:
    its own colour along it in the rendered picture, dashed, above the data, in the legend."""
    import dataclasses

    from matplotlib.colors import to_rgb
    from oncotrace.mil._report import _reliability_figure  # private: the Figure behind the PNG

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    proba = {"t": _two_col(rng.uniform(size=200))}
    ev = evaluate_predictions({"t": y}, proba, {"t": ("neg", "pos")}, n_boot=10)["t"]
    assert ev is not None
    centres = (np.arange(10) + 0.5) / 10
    ev = dataclasses.replace(
        ev, reliability={"confidence": centres, "frequency": centres, "counts": np.full(10, 20)}
    )
    fig = _reliability_figure(ev)
    ax = fig.axes[0]
    (diagonal,) = [ln for ln in ax.get_lines() if ln.get_label() == "perfect calibration"]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    assert diagonal.get_linestyle() == "--"
    data = [a for a in (*ax.get_lines(), *ax.collections) if a is not diagonal]
    assert data and diagonal.get_zorder() > max(a.get_zorder() for a in data)
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    assert "perfect calibration" in [t.get_text() for t in ax.get_legend().get_texts()]
    # In pixels: sample the diagonal between the first and last bin centre (where the data
    # covers it) and count samples showing the diagonal's own colour.
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    want = np.array(to_rgb(diagonal.get_color())) * 255
    t = np.linspace(0.1, 0.9, 400)
    xy = ax.transData.transform(np.column_stack([t, t]))
    cols = np.rint(xy[:, 0]).astype(int)
    rows = np.rint(rgb.shape[0] - xy[:, 1]).astype(int)
    near = [
        np.abs(rgb[rows + dr, cols + dc] - want).max(axis=1)
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
    ]
    hits = np.min(near, axis=0) < 40  # a pixel of that colour at or next to the sample
    assert hits.mean() > 0.3, f"the diagonal shows at {hits.mean():.0%} of its length"
    assert mil.plot_reliability(ev, tmp_path / "rel.png").read_bytes()[:4] == b"\x89PNG"


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images = 0

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img" and (dict(attrs).get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1


def test_figures_and_escaped_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    p1 = special.expit(2 * (y - 0.5) + rng.normal(size=60))
    names = {"<b>x</b>": ("neg", "pos & <i>more</i>")}
    ev = evaluate_predictions({"<b>x</b>": y}, {"<b>x</b>": _two_col(p1)}, names, n_boot=50)
    e = ev["<b>x</b>"]
    assert e is not None
    figs = {
        "ROC": mil.plot_roc(e, tmp_path / "roc.png"),
        "reliability": mil.plot_reliability(e, tmp_path / "rel.png"),
        "confusion": mil.plot_confusion(e, tmp_path / "cm.png"),
    }
    for path in figs.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = mil.ModelCard(head=mil.HeadConfig("<script>", 4, {"t": ("a", "b")}))
    page = mil.render_html(ev, {"<b>x</b>": figs}, cohort={"slides": 60}, model=card)
    assert "<script>" not in page and "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    parser = _Text()
    parser.feed(page)
    assert parser.images == 3
    assert f"{e.metrics['auc'].estimate:.3f}" in "".join(parser.text)
    # no temperature was fitted: one ECE, said once, not "x without … and x before"
    text = " ".join("".join(parser.text).split())
    assert "error (ECE; 0 means" in text and f"is {e.ece:.3f}; no temperature scaling" in text
    assert "before" not in text.split("Calibration.")[1].split("Prediction sets")[0]
