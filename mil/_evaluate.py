"""Study-level evaluation of class probabilities, and calibration fitted on validation data.

``fit_calibration`` fits, per task, what a deployed model needs besides its weights: a
temperature, the binary decision threshold and a split-conformal quantile, all on validation
(never test) predictions. ``evaluate_predictions`` applies such a record to test predictions
and returns every number a study reports, each with a 95 % interval, as :class:`TaskEvaluation`.
Both only combine the statistics in :mod:`mil._metrics`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._metrics import (
    MetricCI,
    apply_temperature,
    auc_ci,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    conformal_fit,
    conformal_sets,
    empirical_coverage,
    expected_calibration_error,
    fit_temperature,
    multiclass_metrics,
    reliability_curve,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
ThresholdRule = Literal["youden", "sensitivity", "specificity"]

#: Calibration record layout version written by :func:`fit_calibration`.
CALIBRATION_VERSION = 1
#: Below these counts a study's intervals are too wide to lean on; the report says so.
FEW_PATIENTS = 30
FEW_PATIENTS_PER_CLASS = 5
FEW_BOOTSTRAP = 1000
#: Temperature below/above which the search was stopped at a bound (see fit_temperature).
_T_BOUNDS = (1e-2, 1e2)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval and how the interval was obtained.

    Attributes
    ----------
    estimate, low, high : float (NaN when undefined).
    level : confidence level, e.g. 0.95.
    method : ``"DeLong"`` or ``"patient bootstrap"`` / ``"case bootstrap"``.
    n_used, n_boot : bootstrap resamples with a defined value / drawn (0 for DeLong).
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str
    n_used: int = 0
    n_boot: int = 0


@dataclass(frozen=True)
class ConformalResult:
    """Split-conformal prediction sets on the evaluated cases.

    Attributes
    ----------
    level : target coverage (1 - alpha).
    qhat : threshold on the LAC score ``1 - p_class`` (inf: every set holds all classes).
    sets : (N, C) bool ndarray, class ``c`` in the set of case ``i``.
    coverage : fraction of cases whose true class is in their set, with a bootstrap CI.
    mean_set_size : mean number of classes per set.
    n_calibration : validation cases the quantile was fitted on.
    """

    level: float
    qhat: float
    sets: NDArray[np.bool_]
    coverage: Estimate
    mean_set_size: float
    n_calibration: int


@dataclass(frozen=True)
class TaskEvaluation:
    """Everything reported for one task.

    Attributes
    ----------
    task, class_names : the task and its classes (column order of ``proba``).
    y : (N,) int64 true class index of each evaluated case (unlabelled cases dropped).
    case_index : (N,) int64 positions of the evaluated cases in the arrays passed in.
    proba : (N, C) probabilities the metrics were computed on (calibrated when a record was
        given).
    proba_uncalibrated : (N, C) the probabilities passed in.
    predicted : (N,) int64 class called for each case (threshold or argmax).
    metrics : name -> :class:`Estimate`. Binary: ``auc`` (DeLong), ``accuracy``,
        ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``f1``. Multi-class:
        ``auc_macro``, ``auc_micro``, ``accuracy``, ``balanced_accuracy``, ``f1_macro``,
        ``top1_accuracy``, ``top3_accuracy`` (C > 3), ``sensitivity[<class>]``,
        ``specificity[<class>]``. All but the DeLong AUC use the patient bootstrap.
    auc_bootstrap : patient-bootstrap interval of the (binary) AUC, beside the DeLong one.
    per_class_auc : multi-class one-vs-rest AUC of each class with a DeLong interval.
    confusion : (C, C) int64, rows true class, columns called class.
    threshold : binary decision threshold on ``proba[:, 1]`` (None: argmax).
    threshold_source : where the threshold came from, in words.
    temperature : applied temperature (1.0 without calibration).
    ece, ece_uncalibrated : expected calibration error after / before calibration.
    reliability : ``confidence``, ``frequency``, ``counts`` per bin (binary: probability of
        the positive class; multi-class: top-label confidence).
    conformal : prediction sets, or None without a calibration record.
    n_cases, n_patients : evaluated cases and distinct patients.
    patients_per_class : class name -> distinct patients.
    warnings : plain-language caveats (few patients, few resamples, ...).
    """

    task: str
    class_names: tuple[str, ...]
    y: IntArray
    case_index: IntArray
    proba: FloatArray
    proba_uncalibrated: FloatArray
    predicted: IntArray
    metrics: dict[str, Estimate]
    auc_bootstrap: Estimate | None
    per_class_auc: dict[str, Estimate]
    confusion: IntArray
    threshold: float | None
    threshold_source: str
    temperature: float
    ece: float
    ece_uncalibrated: float
    reliability: dict[str, FloatArray | IntArray]
    conformal: ConformalResult | None
    n_cases: int
    n_patients: int
    patients_per_class: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no per-case arrays; NaN/inf become None)."""
        out: dict[str, Any] = {
            "task": self.task,
            "class_names": list(self.class_names),
            "kind": "binary" if self.binary else "multiclass",
            "n_cases": self.n_cases,
            "n_patients": self.n_patients,
            "patients_per_class": dict(self.patients_per_class),
            "metrics": {k: _estimate_json(v) for k, v in self.metrics.items()},
            "auc_bootstrap": None
            if self.auc_bootstrap is None
            else _estimate_json(self.auc_bootstrap),
            "per_class_auc": {k: _estimate_json(v) for k, v in self.per_class_auc.items()},
            "confusion": self.confusion.tolist(),
            "threshold": _num(self.threshold),
            "threshold_source": self.threshold_source,
            "temperature": _num(self.temperature),
            "ece": _num(self.ece),
            "ece_uncalibrated": _num(self.ece_uncalibrated),
            "reliability": {k: [_num(x) for x in v] for k, v in self.reliability.items()},
            "conformal": None,
            "warnings": list(self.warnings),
        }
        if self.conformal is not None:
            c = self.conformal
            out["conformal"] = {
                "level": c.level,
                "qhat": _num(c.qhat),
                "coverage": _estimate_json(c.coverage),
                "mean_set_size": _num(c.mean_set_size),
                "n_calibration": c.n_calibration,
            }
        return out


def _num(x: float | int | None) -> float | int | None:
    if x is None:
        return None
    if isinstance(x, int | np.integer):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def _estimate_json(e: Estimate) -> dict[str, Any]:
    return {
        "estimate": _num(e.estimate),
        "low": _num(e.low),
        "high": _num(e.high),
        "level": e.level,
        "method": e.method,
        "n_used": e.n_used,
        "n_boot": e.n_boot,
    }


def _from_ci(ci: MetricCI, grouped: bool) -> Estimate:
    method = "patient bootstrap" if grouped else "case bootstrap"
    return Estimate(ci.estimate, ci.low, ci.high, ci.level, method, ci.n_used, ci.n_boot)


@contextmanager
def _collect(into: list[str]) -> Iterator[None]:
    """Turn the metric functions' RuntimeWarnings into report lines instead of stderr noise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        if text not in into:
            into.append(text)


def _logits(p: FloatArray) -> FloatArray:
    # log-probabilities are logits up to a per-row constant, which softmax ignores
    return np.log(np.clip(p, np.finfo(np.float64).tiny, None))


def _check_task_inputs(
    task: str, y: ArrayLike, proba: ArrayLike, names: Sequence[str]
) -> tuple[IntArray, FloatArray]:
    yy = np.asarray(y).reshape(-1)
    if not np.issubdtype(yy.dtype, np.integer):
        raise TypeError(
            f"labels[{task!r}] must be integer class indices (-1 = unknown), got {yy.dtype}."
        )
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (yy.size, len(names)):
        raise ValueError(
            f"proba[{task!r}] has shape {p.shape}; expected ({yy.size}, {len(names)}) — one row "
            f"per case and one column per class {list(names)}."
        )
    if yy.size and (yy.min() < -1 or yy.max() >= len(names)):
        raise ValueError(
            f"labels[{task!r}] must lie in -1..{len(names) - 1} (classes {list(names)})."
        )
    return yy.astype(np.int64), p


def _conformal_quantile(scores: Sequence[float], level: float) -> float:
    """:func:`conformal_fit` on stored LAC scores ``s``: a two-class row ``[1 - s, s]`` whose
    true class is 0 has LAC score exactly ``1 - (1 - s) = s``, so the quantile is the same."""
    s = np.asarray(scores, dtype=np.float64)
    proba = np.column_stack([1.0 - s, s])
    return conformal_fit(proba, np.zeros(s.size, np.int64), 1.0 - level, method="lac")


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def fit_calibration(
    labels: Mapping[str, ArrayLike],
    proba: Mapping[str, ArrayLike],
    class_names: Mapping[str, Sequence[str]],
    *,
    level: float = 0.9,
    threshold_rule: ThresholdRule = "youden",
    threshold_target: float | None = None,
    source: str = "validation",
) -> dict[str, Any]:
    """Fit temperature, binary threshold and conformal quantile per task on validation data.

    Parameters
    ----------
    labels : task -> (N,) int class indices (-1 = unknown, ignored).
    proba : task -> (N, C) predicted probabilities on the same validation cases. Their logs are
        the logits up to a per-case constant, which is all temperature scaling needs.
    class_names : task -> class names in column order.
    level : target coverage of the conformal prediction sets (e.g. 0.9 for 90 %).
    threshold_rule, threshold_target : see :func:`mil.choose_threshold`; the threshold is
        chosen on the temperature-scaled probability of the second class.
    source : a sentence saying which cases these are (written into the record).

    Returns
    -------
    dict
        JSON-able record ``{"version", "source", "level", "tasks": {task: {...}}}``. Each task
        holds ``class_names``, ``n_cases``, ``temperature`` (1.0 when it cannot be fitted,
        with the reason in ``notes``), ``threshold`` / ``threshold_rule`` /
        ``threshold_target`` (binary; None when the validation cases lack a class) and
        ``conformal`` (``method`` "lac", ``level``, ``qhat`` — None meaning every class — and
        the sorted validation ``scores`` so another level can be derived later).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.9 for 90 % sets; got {level!r}.")
    tasks: dict[str, Any] = {}
    for task, names in class_names.items():
        if task not in labels or task not in proba:
            raise ValueError(f"fit_calibration: no labels/probabilities for task {task!r}.")
        y_all, p_all = _check_task_inputs(task, labels[task], proba[task], names)
        keep = y_all >= 0
        y, p = y_all[keep], p_all[keep]
        notes: list[str] = []
        rec: dict[str, Any] = {
            "class_names": list(names),
            "n_cases": int(y.size),
            "temperature": 1.0,
            "temperature_fitted": False,
            "threshold": None,
            "threshold_rule": threshold_rule if len(names) == 2 else None,
            "threshold_target": threshold_target if len(names) == 2 else None,
            "threshold_on": (
                f"calibrated probability of {names[1]!r}" if len(names) == 2 else None
            ),
            "conformal": {"method": "lac", "level": level, "qhat": None, "scores": []},
            "notes": notes,
        }
        tasks[task] = rec
        if y.size == 0:
            notes.append("no labelled validation cases: nothing was fitted.")
            continue
        t, fitted = _fit_temperature_safely(_logits(p), y, notes)
        rec["temperature"], rec["temperature_fitted"] = t, fitted
        cal = apply_temperature(_logits(p), t)
        if y.size < 20:
            notes.append(f"fitted on only {y.size} validation cases; expect it to be rough.")
        if len(names) == 2:
            if len(np.unique(y)) == 2:
                rec["threshold"] = choose_threshold(
                    y, cal[:, 1], threshold_rule, target=threshold_target
                )
            else:
                notes.append("the validation cases hold one class: no threshold (0.5 is used).")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = conformal_fit(cal, y, 1.0 - level, method="lac")
        if not math.isfinite(q):
            notes.append(
                f"{y.size} validation cases are too few for {level:.0%} conformal sets "
                f"(need >= {math.ceil(1 / (1 - level)) - 1}): every set holds all classes."
            )
        notes.extend(str(w.message) for w in caught if "too few" not in str(w.message))
        rec["conformal"]["qhat"] = q if math.isfinite(q) else None
        rec["conformal"]["scores"] = np.sort(1.0 - cal[np.arange(y.size), y]).tolist()
    return {
        "version": CALIBRATION_VERSION,
        "source": source,
        "level": level,
        "tasks": tasks,
    }


def _fit_temperature_safely(
    logits: FloatArray, y: IntArray, notes: list[str]
) -> tuple[float, bool]:
    # With every validation case ranked correctly the likelihood keeps improving as T -> 0
    # (each term log(1 + sum exp((z_k - z_y) / T)) shrinks): there is no temperature to find.
    # fit_temperature's own bound warning misses this, because the likelihood underflows to a
    # flat 0 well before the bound, so check it here.
    if np.all(logits.argmax(axis=1) == y):
        notes.append(
            "every validation case was ranked correctly, so the likelihood has no optimum "
            "(it improves as T -> 0); temperature scaling is not applied (T = 1)."
        )
        return 1.0, False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit_temperature(logits, y, bounds=_T_BOUNDS)
    lo, hi = _T_BOUNDS
    if any("search bound" in str(w.message) for w in caught) or not 1.1 * lo < t < hi / 1.1:
        notes.append(
            f"the temperature ran to the search bound ({t:.3g}); the validation predictions "
            "are degenerate, so temperature scaling is not applied (T = 1)."
        )
        return 1.0, False
    return float(t), True


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_predictions(
    labels: Mapping[str, ArrayLike],
    proba: Mapping[str, ArrayLike],
    class_names: Mapping[str, Sequence[str]],
    groups: ArrayLike | None = None,
    calibration: Mapping[str, Any] | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
    conformal_level: float | None = None,
) -> dict[str, TaskEvaluation | None]:
    """Discrimination, calibration and conformal coverage of predicted probabilities, per task.

    Parameters
    ----------
    labels : task -> (N,) int class indices (-1 = unknown; those cases are skipped).
    proba : task -> (N, C) probabilities (uncalibrated model output), columns in class order.
    class_names : task -> class names.
    groups : (N,) patient ids; the bootstrap draws whole patients. None: cases are independent.
    calibration : a record from :func:`fit_calibration` (fitted on validation data). When given,
        its temperature is applied and every metric is computed on the calibrated
        probabilities, its binary threshold decides the calls and its conformal quantile gives
        prediction sets. Without it: threshold 0.5 (binary) or argmax, and no sets.
    n_boot, level, seed : bootstrap resamples, interval level and seed (all metrics of a task
        share the same resamples).
    n_bins : equal-width bins of the reliability curve and ECE.
    conformal_level : coverage of the sets; default the level stored in ``calibration``.
        Another level is derived from the validation scores stored in the record.

    Returns
    -------
    dict task -> :class:`TaskEvaluation`, or None when the labelled cases hold a single class.
    """
    if calibration is not None and "tasks" not in calibration:
        raise ValueError(
            "calibration must be the record returned by fit_calibration (with a 'tasks' "
            "section); model.json files written before calibration existed have none — pass "
            "calibration=None."
        )
    g_all = None if groups is None else np.asarray(groups).astype(str).reshape(-1)
    out: dict[str, TaskEvaluation | None] = {}
    for task, names_seq in class_names.items():
        names = tuple(str(n) for n in names_seq)
        if task not in labels or task not in proba:
            raise ValueError(f"evaluate_predictions: no labels/probabilities for task {task!r}.")
        y_all, p_all = _check_task_inputs(task, labels[task], proba[task], names)
        if g_all is not None and g_all.size != y_all.size:
            raise ValueError(f"groups has {g_all.size} entries for {y_all.size} cases.")
        idx = np.flatnonzero(y_all >= 0).astype(np.int64)
        if len(np.unique(y_all[idx])) < 2:
            out[task] = None
            continue
        rec = None if calibration is None else calibration["tasks"].get(task)
        _check_record(task, names, rec)
        out[task] = _evaluate_task(
            task,
            names,
            y_all[idx],
            p_all[idx],
            idx,
            None if g_all is None else g_all[idx],
            rec,
            n_boot=n_boot,
            level=level,
            seed=seed,
            n_bins=n_bins,
            conformal_level=conformal_level,
        )
    return out


def _evaluate_task(
    task: str,
    names: tuple[str, ...],
    y: IntArray,
    p_raw: FloatArray,
    idx: IntArray,
    groups: NDArray[Any] | None,
    rec: Mapping[str, Any] | None,
    *,
    n_boot: int,
    level: float,
    seed: int,
    n_bins: int,
    conformal_level: float | None,
) -> TaskEvaluation:
    notes: list[str] = []
    c = len(names)
    cp = _calibrate_task(names, p_raw, rec, conformal_level)
    p, temperature, threshold, source = cp.proba, cp.temperature, cp.threshold, cp.threshold_source
    predicted = cp.predicted
    grouped = groups is not None
    boot: dict[str, Any] = {"groups": groups, "n_boot": n_boot, "level": level, "seed": seed}
    metrics: dict[str, Estimate] = {}
    per_class: dict[str, Estimate] = {}
    auc_boot: Estimate | None = None

    with _collect(notes):
        if threshold is not None:
            bm = binary_metrics(y, p[:, 1], threshold=threshold, **boot)
            for name, ci in bm.metrics.items():
                metrics[name] = _from_ci(ci, grouped)
            auc_boot = metrics["auc"]
            lo, hi = bm.auc_delong
            metrics["auc"] = Estimate(auc_boot.estimate, lo, hi, level, "DeLong")
            confusion = bm.confusion
        else:
            ks = (1, 3) if c > 3 else (1,)
            mm = multiclass_metrics(y, p, class_names=names, k=ks, **boot)
            for name, ci in mm.metrics.items():
                metrics[name] = _from_ci(ci, grouped)
            confusion = mm.confusion
            for j, name in enumerate(names):
                metrics[f"sensitivity[{name}]"] = _from_ci(
                    bootstrap_ci(_recall_of(j, True), y, predicted, **boot), grouped
                )
                metrics[f"specificity[{name}]"] = _from_ci(
                    bootstrap_ci(_recall_of(j, False), y, predicted, **boot), grouped
                )
                hit = (y == j).astype(np.int64)
                if 0 < hit.sum() < hit.size:
                    a, lo, hi = auc_ci(hit, p[:, j], level)
                    per_class[name] = Estimate(a, lo, hi, level, "DeLong")
        ece_raw = expected_calibration_error(y, _cal_input(p_raw), n_bins)
        ece = expected_calibration_error(y, _cal_input(p), n_bins)
        conf, freq, counts = reliability_curve(y, _cal_input(p), n_bins)
        conformal = None
        if cp.sets is not None and cp.level is not None and cp.qhat is not None:
            sets = cp.sets
            cov = bootstrap_ci(lambda yy, ss: empirical_coverage(ss, yy), y, sets, **boot)
            conformal = ConformalResult(
                level=cp.level,
                qhat=cp.qhat,
                sets=sets,
                coverage=_from_ci(cov, grouped),
                mean_set_size=float(sets.sum(axis=1).mean()),
                n_calibration=cp.n_calibration,
            )

    patients = groups if groups is not None else np.arange(y.size).astype(str)
    per_class_patients = {n: len(set(patients[y == j].tolist())) for j, n in enumerate(names)}
    n_patients = len(set(patients.tolist()))
    caveats = _caveats(
        n_patients, per_class_patients, n_boot, y.size, auc_boot, metrics.get("auc"), grouped
    )
    return TaskEvaluation(
        task=task,
        class_names=names,
        y=y,
        case_index=idx,
        proba=p,
        proba_uncalibrated=p_raw,
        predicted=predicted,
        metrics=metrics,
        auc_bootstrap=auc_boot,
        per_class_auc=per_class,
        confusion=confusion,
        threshold=threshold,
        threshold_source=source,
        temperature=temperature,
        ece=ece,
        ece_uncalibrated=ece_raw,
        reliability={"confidence": conf, "frequency": freq, "counts": counts},
        conformal=conformal,
        n_cases=int(y.size),
        n_patients=n_patients,
        patients_per_class=per_class_patients,
        warnings=[*caveats, *notes],
    )


def _cal_input(p: FloatArray) -> FloatArray:
    # binary: reliability of the positive-class probability; multi-class: top-label
    return p[:, 1] if p.shape[1] == 2 else p


def _recall_of(j: int, positive: bool) -> Callable[[NDArray[Any], NDArray[Any]], float]:
    """Sensitivity (``positive``) or specificity of class ``j`` against the rest."""

    def fn(y: NDArray[Any], pred: NDArray[Any]) -> float:
        mask = (y == j) if positive else (y != j)
        if not mask.any():
            return math.nan
        return float(np.mean((pred[mask] == j) == positive))

    return fn


@dataclass(frozen=True)
class CalibratedPredictions:
    """A calibration record applied to one task's predicted probabilities.

    Attributes
    ----------
    proba : (N, C) temperature-scaled probabilities (the input when T = 1).
    predicted : (N,) int64 called class: binary ``proba[:, 1] >= threshold``, else argmax.
    threshold : binary threshold (0.5 without a stored one), None for multi-class tasks.
    threshold_source : where the decision rule came from, in words.
    temperature : the temperature applied.
    sets : (N, C) bool conformal prediction sets, or None without a conformal record.
    level, qhat : coverage level and LAC quantile of the sets (qhat inf: all classes).
    n_calibration : validation cases behind the conformal quantile.
    """

    proba: FloatArray
    predicted: IntArray
    threshold: float | None
    threshold_source: str
    temperature: float
    sets: NDArray[np.bool_] | None
    level: float | None
    qhat: float | None
    n_calibration: int


def apply_calibration(
    proba: Mapping[str, ArrayLike],
    class_names: Mapping[str, Sequence[str]],
    calibration: Mapping[str, Any] | None,
    *,
    conformal_level: float | None = None,
) -> dict[str, CalibratedPredictions]:
    """Temperature, decision rule and conformal sets of a :func:`fit_calibration` record.

    Parameters
    ----------
    proba : task -> (N, C) uncalibrated probabilities (e.g. from :func:`mil.predict`).
    class_names : task -> class names in column order.
    calibration : the record, or None (T = 1, threshold 0.5 / argmax, no sets).
    conformal_level : coverage of the sets; default the stored level (another level is derived
        from the validation scores stored in the record).

    Returns
    -------
    dict task -> :class:`CalibratedPredictions`
    """
    if calibration is not None and "tasks" not in calibration:
        raise ValueError(
            "calibration must be the record returned by fit_calibration (with a 'tasks' "
            "section); model.json files written before calibration existed have none — pass "
            "calibration=None."
        )
    out = {}
    for task, names_seq in class_names.items():
        names = tuple(str(n) for n in names_seq)
        p = np.asarray(proba[task], dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(names):
            raise ValueError(
                f"proba[{task!r}] has shape {p.shape}; expected (N, {len(names)}) for the "
                f"classes {list(names)}."
            )
        rec = None if calibration is None else calibration["tasks"].get(task)
        _check_record(task, names, rec)
        out[task] = _calibrate_task(names, p, rec, conformal_level)
    return out


def _check_record(task: str, names: tuple[str, ...], rec: Mapping[str, Any] | None) -> None:
    if rec is not None and tuple(rec.get("class_names", names)) != names:
        raise ValueError(
            f"calibration of task {task!r} was fitted for classes {rec.get('class_names')}, "
            f"not {list(names)}; refit the calibration."
        )


def _calibrate_task(
    names: tuple[str, ...],
    p_raw: FloatArray,
    rec: Mapping[str, Any] | None,
    conformal_level: float | None,
) -> CalibratedPredictions:
    temperature = float(rec.get("temperature", 1.0)) if rec else 1.0
    p = apply_temperature(_logits(p_raw), temperature) if temperature != 1.0 else p_raw
    threshold: float | None = None
    if len(names) == 2:
        stored = rec.get("threshold") if rec else None
        if stored is not None:
            threshold = float(stored)
            rule = rec.get("threshold_rule") if rec else None
            source = f"chosen on validation data ({rule} rule)"
        else:
            threshold = 0.5
            source = "0.5 (no threshold chosen on validation data)"
        predicted = (p[:, 1] >= threshold).astype(np.int64)
    else:
        source = "argmax (the most probable class)"
        predicted = p.argmax(axis=1).astype(np.int64)
    sets, lvl, qhat, n_cal = None, None, None, 0
    conf_rec = (rec or {}).get("conformal")
    scores = (conf_rec or {}).get("scores") or []
    if conf_rec and scores:  # no scores: nothing was fitted (no labelled validation cases)
        stored_level = float(conf_rec["level"])
        lvl = stored_level if conformal_level is None else float(conformal_level)
        if abs(lvl - stored_level) < 1e-12:
            q = conf_rec.get("qhat")
            qhat = math.inf if q is None else float(q)
        else:
            if not 0.0 < lvl < 1.0:
                raise ValueError(f"conformal_level must be in (0, 1), e.g. 0.9; got {lvl!r}.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # too few scores: inf, i.e. all classes
                qhat = _conformal_quantile(scores, lvl)
        sets = conformal_sets(p, qhat)
        n_cal = len(scores)
    return CalibratedPredictions(
        p, predicted, threshold, source, temperature, sets, lvl, qhat, n_cal
    )


def _caveats(
    n_patients: int,
    per_class: Mapping[str, int],
    n_boot: int,
    n_cases: int,
    auc_boot: Estimate | None,
    auc: Estimate | None,
    grouped: bool,
) -> list[str]:
    out = []
    if n_patients < FEW_PATIENTS:
        out.append(
            f"Only {n_patients} patients were evaluated: the intervals are wide and the "
            "estimates preliminary."
        )
    few = {k: v for k, v in per_class.items() if v < FEW_PATIENTS_PER_CLASS}
    for name, k in few.items():
        out.append(
            f"Class {name!r} has only {k} patient(s) (fewer than {FEW_PATIENTS_PER_CLASS}): "
            "its sensitivity and AUC rest on very few cases."
        )
    if n_boot < FEW_BOOTSTRAP:
        out.append(
            f"The bootstrap intervals come from only {n_boot} resamples; use at least "
            f"{FEW_BOOTSTRAP} for reportable intervals."
        )
    if grouped and n_patients < n_cases and auc is not None and auc_boot is not None:
        out.append(
            f"{n_cases} slides come from {n_patients} patients; the DeLong AUC interval treats "
            "slides as independent, so also read the patient-bootstrap interval "
            f"({auc_boot.low:.3f}–{auc_boot.high:.3f})."
        )
    return out
