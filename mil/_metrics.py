"""Statistics that clinical pathology-AI studies report: AUCs with DeLong, bootstrap CIs by
patient, binary and multi-class summaries, calibration, conformal sets and reader comparisons.

Conventions
-----------
* Binary labels are ``0`` (negative) / ``1`` (positive), booleans are accepted.
* A binary score is "higher means more likely positive"; a sample is called positive when
  ``score >= threshold`` (the same convention as :func:`sklearn.metrics.roc_curve`).
* Multi-class labels are integers ``0 .. C-1`` indexing the columns of an ``(N, C)``
  probability array whose rows sum to 1.
* Bootstrap resampling is by ``groups`` (patient ids) when given: whole patients are drawn
  with replacement, so all slides of a patient move together.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special, stats
from sklearn.metrics import roc_curve

__all__ = [
    "BinaryMetrics",
    "McNemarResult",
    "MetricCI",
    "MulticlassMetrics",
    "apply_temperature",
    "auc_ci",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "compare_readers",
    "conformal_fit",
    "conformal_sets",
    "delong_auc",
    "delong_test",
    "empirical_coverage",
    "expected_calibration_error",
    "fit_temperature",
    "mcnemar_test",
    "multiclass_metrics",
    "reliability_curve",
]

#: Row sums of a probability array may differ from 1 by this much (float32 softmax outputs).
PROBA_SUM_ATOL = 1e-3

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


# ----------------------------------------------------------------------------- validation


def _as_1d(x: ArrayLike, name: str) -> NDArray[Any]:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D with one value per sample, got shape {arr.shape}; "
            "flatten it or pass one column."
        )
    return arr


def _finite_scores(x: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad.ravel())[:5].tolist()
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s) (first flat indices {idx}); "
            "drop those samples or fix the model output before computing metrics."
        )
    return arr


def _check_same_length(**arrays: NDArray[Any]) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"inputs have different numbers of samples: {lengths}; pass one entry per sample "
            "in every argument (same order)."
        )
    return next(iter(lengths.values()))


def _binary_labels(y_true: ArrayLike, task: str, *, require_both: bool = True) -> IntArray:
    y = _as_1d(y_true, "y_true")
    if y.size == 0:
        raise ValueError(f"{task}: y_true is empty; pass at least one sample of each class.")
    values = np.unique(y)
    if not np.isin(values, [0, 1]).all():
        raise ValueError(
            f"{task}: y_true must hold binary labels 0/1 (or booleans), got values "
            f"{values[:10].tolist()}; map the positive class to 1 and the rest to 0."
        )
    out = y.astype(np.int64)
    if require_both and values.size < 2:
        raise ValueError(
            f"{task}: y_true contains only class {int(values[0])} ({y.size} samples); the "
            "metric needs both positives and negatives — evaluate on a set that contains both."
        )
    return out


def _proba_2d(proba: ArrayLike, name: str = "proba") -> FloatArray:
    p = _finite_scores(proba, name)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(
            f"{name} must be an (N, C) array of class probabilities with C >= 2, got shape "
            f"{p.shape}; for a binary model pass the positive-class column as a 1-D score."
        )
    if (p < 0).any() or (p > 1).any():
        raise ValueError(
            f"{name} has values outside [0, 1] (min {p.min():.4g}, max {p.max():.4g}); "
            "these look like logits — apply a softmax (or apply_temperature) first."
        )
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBA_SUM_ATOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name} rows must sum to 1 (±{PROBA_SUM_ATOL}); {int(off.sum())} row(s) do not, "
            f"e.g. row {i} sums to {sums[i]:.6g}. Normalise with a softmax over the class axis."
        )
    return p


def _class_labels(y: ArrayLike, n_classes: int, task: str) -> IntArray:
    arr = _as_1d(y, "y_true")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(
                f"{task}: y_true must hold integer class indices 0..{n_classes - 1}, got dtype "
                f"{arr.dtype}; encode class names as column indices of proba."
            )
    out = arr.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= n_classes):
        raise ValueError(
            f"{task}: y_true has class indices outside 0..{n_classes - 1} (min {out.min()}, "
            f"max {out.max()}); proba has {n_classes} columns — check the class order."
        )
    return out


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95 for a 95 % CI; got {level!r}.")
    return float(level)


# ----------------------------------------------------------------------------- DeLong


def _midrank_auc_components(
    y: IntArray, scores: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per-score AUCs and DeLong structural components, via midranks (Sun & Xu, 2014).

    ``scores`` is ``(K, N)``. Returns ``auc (K,)``, ``v10 (K, m)`` for the ``m`` positives and
    ``v01 (K, n)`` for the ``n`` negatives, so that ``mean(v10) == mean(v01) == auc``.
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    both = np.concatenate([pos, neg], axis=1)
    r_all = stats.rankdata(both, axis=1)
    r_pos = stats.rankdata(pos, axis=1)
    r_neg = stats.rankdata(neg, axis=1)
    # For positive i: #negatives below it (ties count 1/2) = rank among all - rank among pos.
    v10 = (r_all[:, :m] - r_pos) / n
    # For negative j: fraction of positives above it.
    v01 = 1.0 - (r_all[:, m:] - r_neg) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def _delong_cov(y: IntArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    auc, v10, v01 = _midrank_auc_components(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(auc), len(auc)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(auc), len(auc)))
    return auc, s10 / m + s01 / n


def delong_auc(y_true: ArrayLike, score: ArrayLike) -> tuple[float, float]:
    """ROC AUC and its DeLong (1988) variance, computed in O(N log N) via midranks.

    Parameters
    ----------
    y_true : (N,) array of 0/1
        Binary labels; both classes must be present.
    score : (N,) float array
        Higher means more likely positive. Ties count one half.

    Returns
    -------
    auc : float
        Mann-Whitney estimate of P(score_pos > score_neg), identical to
        :func:`sklearn.metrics.roc_auc_score`.
    variance : float
        DeLong variance estimate of ``auc`` (0 when the classes are perfectly separated).
    """
    y = _binary_labels(y_true, "delong_auc")
    s = _finite_scores(_as_1d(score, "score"), "score")
    _check_same_length(y_true=y, score=s)
    auc, cov = _delong_cov(y, s[None, :])
    return float(auc[0]), float(cov[0, 0])


def delong_test(
    y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike
) -> tuple[float, float, float, float]:
    """DeLong test for two correlated AUCs measured on the same samples.

    Parameters
    ----------
    y_true : (N,) array of 0/1
    score_a, score_b : (N,) float arrays
        Scores of the two models (or model and reader) on the same samples.

    Returns
    -------
    z : float
        ``(auc_a - auc_b) / se`` of the paired difference (0 when the difference and its
        standard error are both 0, e.g. identical rankings).
    p : float
        Two-sided p-value from the standard normal.
    auc_a, auc_b : float
    """
    y = _binary_labels(y_true, "delong_test")
    a = _finite_scores(_as_1d(score_a, "score_a"), "score_a")
    b = _finite_scores(_as_1d(score_b, "score_b"), "score_b")
    _check_same_length(y_true=y, score_a=a, score_b=b)
    auc, cov = _delong_cov(y, np.stack([a, b]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= 1e-15:
        if abs(diff) < 1e-12:
            return 0.0, 1.0, float(auc[0]), float(auc[1])
        z = math.copysign(math.inf, diff)
        return z, 0.0, float(auc[0]), float(auc[1])
    z = diff / math.sqrt(var)
    p = float(2.0 * stats.norm.sf(abs(z)))
    return z, p, float(auc[0]), float(auc[1])


def auc_ci(
    y_true: ArrayLike,
    score: ArrayLike,
    level: float = 0.95,
    *,
    method: Literal["logit", "normal"] = "logit",
) -> tuple[float, float, float]:
    """AUC with a DeLong confidence interval.

    Parameters
    ----------
    y_true : (N,) array of 0/1
    score : (N,) float array
    level : float
        Two-sided confidence level.
    method : {"logit", "normal"}
        ``"logit"`` (default) builds a Wald interval on ``logit(auc)`` with the delta-method
        standard error ``se / (auc (1 - auc))`` and maps it back, so it stays inside (0, 1) and
        is asymmetric near 1. ``"normal"`` is the plain ``auc ± z se`` interval, clipped to
        [0, 1]. With AUC exactly 0 or 1 the DeLong variance is 0 and both return ``(auc, auc)``.

    Returns
    -------
    auc, low, high : float
    """
    level = _check_level(level)
    auc, var = delong_auc(y_true, score)
    se = math.sqrt(max(var, 0.0))
    zq = float(stats.norm.ppf(0.5 + level / 2.0))
    if method == "normal":
        return auc, max(0.0, auc - zq * se), min(1.0, auc + zq * se)
    if method != "logit":
        raise ValueError(f"method must be 'logit' or 'normal', got {method!r}.")
    if auc <= 0.0 or auc >= 1.0 or se == 0.0:
        return auc, auc, auc
    centre = math.log(auc / (1.0 - auc))
    half = zq * se / (auc * (1.0 - auc))
    return auc, float(special.expit(centre - half)), float(special.expit(centre + half))


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class MetricCI:
    """A point estimate with a percentile bootstrap interval.

    Attributes
    ----------
    estimate : float
        The metric on the full data (NaN when undefined there).
    low, high : float
        Percentile interval bounds (NaN when no resample gave a defined value).
    n_used : int
        Resamples on which the metric was defined (e.g. both classes drawn).
    n_boot : int
        Resamples drawn.
    level : float
    """

    estimate: float
    low: float
    high: float
    n_used: int
    n_boot: int
    level: float


def _group_index(groups: ArrayLike | None, n: int) -> list[IntArray] | None:
    if groups is None:
        return None
    g = _as_1d(groups, "groups")
    if len(g) != n:
        raise ValueError(
            f"groups has {len(g)} entries but there are {n} samples; pass one group (patient) "
            "id per sample."
        )
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])


def _resample_indices(
    n: int, members: list[IntArray] | None, n_boot: int, seed: int
) -> list[IntArray]:
    rng = np.random.default_rng(seed)
    if members is None:
        return [rng.integers(0, n, size=n) for _ in range(n_boot)]
    k = len(members)
    return [np.concatenate([members[j] for j in rng.integers(0, k, size=k)]) for _ in range(n_boot)]


def _percentile(values: list[float], level: float) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    lo, hi = np.quantile(np.asarray(values), [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(lo), float(hi)


def _safe_call(fn: Callable[[], float]) -> float:
    try:
        with warnings.catch_warnings():
            # sklearn warns (not raises) for some ill-defined resamples; we skip those anyway.
            warnings.simplefilter("ignore")
            value = float(fn())
    except ValueError:
        return math.nan
    return value


def _bootstrap_dict(
    fn: Callable[[NDArray[Any]], dict[str, float]],
    n: int,
    *,
    groups: ArrayLike | None,
    n_boot: int,
    level: float,
    seed: int,
) -> dict[str, MetricCI]:
    """Run ``fn(indices) -> {name: value}`` on the full data and on ``n_boot`` resamples."""
    level = _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}; 1000-2000 is usual.")
    members = _group_index(groups, n)
    full = fn(np.arange(n))
    draws: dict[str, list[float]] = {k: [] for k in full}
    for idx in _resample_indices(n, members, n_boot, seed):
        for k, v in fn(idx).items():
            if math.isfinite(v):
                draws[k].append(v)
    out = {}
    for k, v in full.items():
        lo, hi = _percentile(draws[k], level)
        out[k] = MetricCI(float(v), lo, hi, len(draws[k]), n_boot, level)
    return out


def bootstrap_ci(
    metric_fn: Callable[[NDArray[Any], NDArray[Any]], float],
    y_true: ArrayLike,
    y_pred_or_score: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> MetricCI:
    """Percentile bootstrap interval of ``metric_fn(y_true, y_pred_or_score)``.

    Parameters
    ----------
    metric_fn : callable ``(y_true_sub, y_pred_sub) -> float``
        Receives the resampled rows (axis 0) of both arrays.
    y_true : (N,) array
    y_pred_or_score : (N,) or (N, C) array
    groups : (N,) array, optional
        Patient (cluster) id per sample. When given, whole groups are drawn with replacement
        (as many groups as there are distinct ids), so correlated slides stay together.
    n_boot : int
    level : float
    seed : int
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal resamples.

    Returns
    -------
    MetricCI
        Resamples on which the metric is undefined — ``metric_fn`` raises ``ValueError`` (as
        scikit-learn does for a one-class AUC) or returns NaN/inf — are skipped; ``n_used``
        says how many remained. A warning is issued when fewer than 90 % were usable.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred_or_score)
    if yt.ndim == 0 or yp.ndim == 0:
        raise ValueError("y_true and y_pred_or_score must be arrays with one row per sample.")
    n = _check_same_length(y_true=yt, y_pred_or_score=yp)
    res = _bootstrap_dict(
        lambda idx: {"m": _safe_call(lambda: metric_fn(yt[idx], yp[idx]))},
        n,
        groups=groups,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )["m"]
    _warn_if_few(res, "metric")
    return res


def _warn_if_few(ci: MetricCI, name: str) -> None:
    if ci.n_used < 0.9 * ci.n_boot:
        warnings.warn(
            f"{name}: only {ci.n_used}/{ci.n_boot} bootstrap resamples had a defined value "
            "(e.g. a single class drawn); the interval is conditional on those and may be too "
            "narrow — use more patients or report it as unreliable.",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- binary


def _auc_fast(y: IntArray, s: FloatArray) -> float:
    m = int(y.sum())
    n = y.size - m
    if m == 0 or n == 0:
        return math.nan
    r = stats.rankdata(s)
    return float((r[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _binary_point(y: IntArray, s: FloatArray, threshold: float) -> dict[str, float]:
    pred = s >= threshold
    pos = y == 1
    tp = float(np.sum(pred & pos))
    fn = float(np.sum(~pred & pos))
    fp = float(np.sum(pred & ~pos))
    tn = float(np.sum(~pred & ~pos))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    return {
        "auc": _auc_fast(y, s),
        "accuracy": (tp + tn) / y.size,
        # NaN (skipped in the bootstrap) when a resample lacks a class, as for the AUC.
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        # zero_division=0 like sklearn's f1_score: no positives and no positive calls -> 0.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0,
    }


@dataclass(frozen=True)
class BinaryMetrics:
    """Binary classification summary.

    Attributes
    ----------
    metrics : dict of str to MetricCI
        ``auc``, ``accuracy``, ``balanced_accuracy``, ``sensitivity`` (recall of class 1),
        ``specificity`` (recall of class 0), ``f1`` (of class 1), each with a bootstrap CI.
    auc_delong : (float, float)
        DeLong interval of the AUC (logit method, sample-level: ignores ``groups``).
    confusion : (2, 2) int64 ndarray
        Rows are true class 0/1, columns the predicted class 0/1 (``[[TN, FP], [FN, TP]]``).
    threshold : float
        Positive when ``score >= threshold``.
    n_samples, n_positive, n_groups : int
        ``n_groups`` equals ``n_samples`` when no ``groups`` were given.
    """

    metrics: dict[str, MetricCI]
    auc_delong: tuple[float, float]
    confusion: IntArray
    threshold: float
    n_samples: int
    n_positive: int
    n_groups: int


def binary_metrics(
    y_true: ArrayLike,
    score: ArrayLike,
    *,
    threshold: float | None = None,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BinaryMetrics:
    """AUC, accuracy, balanced accuracy, sensitivity, specificity and F1 with bootstrap CIs.

    Parameters
    ----------
    y_true : (N,) array of 0/1
    score : (N,) float array
        Higher means more likely positive.
    threshold : float, optional
        Positive when ``score >= threshold``. Pick it on validation data with
        :func:`choose_threshold`, never on the test set. Default 0.5, allowed only when the
        scores are probabilities in [0, 1].
    groups : (N,) array, optional
        Patient ids: the bootstrap resamples whole patients.
    n_boot, level, seed
        See :func:`bootstrap_ci`. All metrics share the same resamples.

    Returns
    -------
    BinaryMetrics
    """
    y = _binary_labels(y_true, "binary_metrics")
    s = _finite_scores(_as_1d(score, "score"), "score")
    n = _check_same_length(y_true=y, score=s)
    if threshold is None:
        if s.min() < 0.0 or s.max() > 1.0:
            raise ValueError(
                f"score ranges over [{s.min():.4g}, {s.max():.4g}], not probabilities, so the "
                "default threshold 0.5 is meaningless; pass threshold=choose_threshold("
                "y_val, score_val) computed on validation data."
            )
        threshold = 0.5
    thr = float(threshold)
    cis = _bootstrap_dict(
        lambda idx: _binary_point(y[idx], s[idx], thr),
        n,
        groups=groups,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
    for name, ci in cis.items():
        _warn_if_few(ci, f"binary_metrics[{name!r}]")
    _, lo, hi = auc_ci(y, s, level)
    pred = (s >= thr).astype(np.int64)
    confusion = np.bincount(2 * y + pred, minlength=4).reshape(2, 2).astype(np.int64)
    n_groups = n if groups is None else len(np.unique(np.asarray(groups)))
    return BinaryMetrics(cis, (lo, hi), confusion, thr, n, int(y.sum()), n_groups)


def choose_threshold(
    y_true: ArrayLike,
    score: ArrayLike,
    rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    *,
    target: float | None = None,
) -> float:
    """Pick a decision threshold on validation data.

    Parameters
    ----------
    y_true : (N,) array of 0/1
    score : (N,) float array
    rule : {"youden", "sensitivity", "specificity"}
        ``"youden"`` maximises sensitivity + specificity - 1 (the highest such threshold on
        ties), placed midway between the score it cuts at and the next lower score. ``"sensitivity"`` returns the highest threshold whose sensitivity is at least
        ``target``; ``"specificity"`` the lowest whose specificity is at least ``target``.
    target : float, optional
        Required for the ``"sensitivity"`` and ``"specificity"`` rules, e.g. 0.95.

    Returns
    -------
    float
        A score value; call positive when ``score >= threshold``.
    """
    y = _binary_labels(y_true, "choose_threshold")
    s = _finite_scores(_as_1d(score, "score"), "score")
    _check_same_length(y_true=y, score=s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thr)  # roc_curve prepends +inf (nothing called positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if rule == "youden":
        best = float(thr[int(np.argmax(tpr - fpr))])
        # Every threshold in (next lower score, best] gives the same validation J; the edge
        # itself (the lowest positive score on separated data, e.g. 0.999998) would call
        # new cases negative at p = 0.99. The midpoint of the gap generalises.
        below = s[s < best]
        return best if below.size == 0 else float((best + below.max()) / 2)
    if rule not in ("sensitivity", "specificity"):
        raise ValueError(f"rule must be 'youden', 'sensitivity' or 'specificity', got {rule!r}.")
    if target is None or not 0.0 <= target <= 1.0:
        raise ValueError(f"rule={rule!r} needs target in [0, 1] (e.g. 0.95), got {target!r}.")
    if rule == "sensitivity":
        ok = np.flatnonzero(tpr >= target)  # thresholds decrease, tpr increases
        return float(thr[ok[0]])
    ok = np.flatnonzero(1.0 - fpr >= target)
    if ok.size == 0:
        return float(np.nextafter(s.max(), np.inf))
    return float(thr[ok[-1]])


# ----------------------------------------------------------------------------- multi-class


def _multiclass_point(y: IntArray, p: FloatArray, ks: Sequence[int]) -> dict[str, float]:
    n, c = p.shape
    onehot = np.zeros((n, c), dtype=np.int64)
    onehot[np.arange(n), y] = 1
    present = onehot.sum(axis=0)
    per_class = [_auc_fast(onehot[:, j], p[:, j]) for j in range(c)]
    pred = p.argmax(axis=1)
    cm = np.bincount(c * y + pred, minlength=c * c).reshape(c, c)
    tp = np.diag(cm).astype(np.float64)
    true_n = cm.sum(axis=1)
    pred_n = cm.sum(axis=0)
    recall_present = tp[true_n > 0] / true_n[true_n > 0]
    # Like sklearn's f1_score(average="macro"): over labels seen in y_true or y_pred, 0/0 -> 0.
    seen = (true_n + pred_n) > 0
    f1 = np.where(seen, 2 * tp / np.maximum(true_n + pred_n, 1), 0.0)[seen]
    out = {
        # Undefined (NaN) when a class is absent: one-vs-rest needs every class present.
        "auc_macro": float(np.mean(per_class)) if (present > 0).all() else math.nan,
        "auc_micro": _auc_fast(onehot.ravel(), p.ravel()),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall_present.mean()),
        "f1_macro": float(f1.mean()),
    }
    if ks:
        # rank of the true class = number of classes with a strictly higher probability
        rank = (p > p[np.arange(n), y][:, None]).sum(axis=1)
        for k in ks:
            out[f"top{k}_accuracy"] = float(np.mean(rank < k))
    return out


@dataclass(frozen=True)
class MulticlassMetrics:
    """Multi-class classification summary.

    Attributes
    ----------
    metrics : dict of str to MetricCI
        ``auc_macro`` / ``auc_micro`` (one-vs-rest), ``accuracy``, ``balanced_accuracy``,
        ``f1_macro`` and ``top{k}_accuracy`` for each requested ``k``.
    per_class_auc : dict of str to float
        One-vs-rest AUC per class name (NaN for a class absent from ``y_true``).
    confusion : (C, C) int64 ndarray
        Rows are true classes, columns the argmax prediction, in ``class_names`` order.
    class_names : tuple of str
    n_samples, n_groups : int
    """

    metrics: dict[str, MetricCI]
    per_class_auc: dict[str, float]
    confusion: IntArray
    class_names: tuple[str, ...]
    n_samples: int
    n_groups: int


def multiclass_metrics(
    y_true: ArrayLike,
    proba: ArrayLike,
    *,
    class_names: Sequence[str],
    groups: ArrayLike | None = None,
    k: Sequence[int] = (1, 3),
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> MulticlassMetrics:
    """One-vs-rest AUCs, accuracy, balanced accuracy, macro F1 and top-k accuracy with CIs.

    Parameters
    ----------
    y_true : (N,) int array
        Class indices into the columns of ``proba``.
    proba : (N, C) float array
        Class probabilities, rows summing to 1.
    class_names : sequence of C str
    groups : (N,) array, optional
        Patient ids for grouped bootstrap resampling.
    k : sequence of int
        Top-k accuracies to report; values above C are dropped.
    n_boot, level, seed
        See :func:`bootstrap_ci`. Macro AUC is skipped in resamples missing a class.

    Returns
    -------
    MulticlassMetrics
    """
    p = _proba_2d(proba)
    c = p.shape[1]
    names = tuple(str(x) for x in class_names)
    if len(names) != c:
        raise ValueError(
            f"class_names has {len(names)} names but proba has {c} columns; pass one name per "
            "column, in column order."
        )
    y = _class_labels(y_true, c, "multiclass_metrics")
    n = _check_same_length(y_true=y, proba=p)
    missing = [names[j] for j in range(c) if not np.any(y == j)]
    if len(missing) == c - 1 or n == 0:
        raise ValueError(
            f"multiclass_metrics: y_true contains a single class ({n} samples); metrics need "
            "at least two classes — evaluate on a set covering the classes."
        )
    if missing:
        warnings.warn(
            f"classes {missing} are absent from y_true; the macro AUC is undefined (NaN).",
            RuntimeWarning,
            stacklevel=2,
        )
    ks = tuple(int(kk) for kk in k if 1 <= int(kk) <= c)
    cis = _bootstrap_dict(
        lambda idx: _multiclass_point(y[idx], p[idx], ks),
        n,
        groups=groups,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
    for name, ci in cis.items():
        _warn_if_few(ci, f"multiclass_metrics[{name!r}]")
    onehot = np.eye(c, dtype=np.int64)[y]
    per_class = {names[j]: _auc_fast(onehot[:, j], p[:, j]) for j in range(c)}
    cm = np.bincount(c * y + p.argmax(axis=1), minlength=c * c).reshape(c, c).astype(np.int64)
    n_groups = n if groups is None else len(np.unique(np.asarray(groups)))
    return MulticlassMetrics(cis, per_class, cm, names, n, n_groups)


# ----------------------------------------------------------------------------- calibration


def _confidence_and_hit(y_true: ArrayLike, proba: ArrayLike) -> tuple[FloatArray, FloatArray]:
    arr = np.asarray(proba)
    if arr.ndim == 1:
        p = _finite_scores(arr, "proba")
        if (p < 0).any() or (p > 1).any():
            raise ValueError(
                f"proba must be probabilities in [0, 1], got range [{p.min():.4g}, "
                f"{p.max():.4g}]; apply a sigmoid to logits first."
            )
        y = _binary_labels(y_true, "calibration", require_both=False)
        _check_same_length(y_true=y, proba=p)
        return p, y.astype(np.float64)
    p2 = _proba_2d(arr)
    y = _class_labels(y_true, p2.shape[1], "calibration")
    n = _check_same_length(y_true=y, proba=p2)
    pred = p2.argmax(axis=1)
    return p2[np.arange(n), pred], (pred == y).astype(np.float64)


def reliability_curve(
    y_true: ArrayLike, proba: ArrayLike, n_bins: int = 15
) -> tuple[FloatArray, FloatArray, IntArray]:
    """Binned confidence against observed frequency, ``n_bins`` equal-width bins on [0, 1].

    Parameters
    ----------
    y_true : (N,) array
        0/1 labels for a 1-D ``proba``; class indices for a 2-D one.
    proba : (N,) or (N, C) float array
        1-D: probability of class 1, compared with the fraction of positives in each bin.
        2-D: top-label calibration, the max probability compared with the argmax accuracy.
    n_bins : int
        Bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]`` (0 goes in the first bin).

    Returns
    -------
    confidence : (n_bins,) float ndarray
        Mean predicted probability per bin (NaN for empty bins).
    frequency : (n_bins,) float ndarray
        Observed frequency (fraction positive, or accuracy) per bin (NaN for empty bins).
    counts : (n_bins,) int64 ndarray
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}; 10-15 is usual.")
    conf, hit = _confidence_and_hit(y_true, proba)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / counts
        freq = np.bincount(b, weights=hit, minlength=n_bins) / counts
    return mean_conf, freq, counts


def expected_calibration_error(y_true: ArrayLike, proba: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: count-weighted mean of |frequency - confidence| over bins.

    Parameters
    ----------
    y_true : (N,) array
    proba : (N,) or (N, C) float array
        1-D for binary (probability of class 1), 2-D for top-label multi-class ECE.
    n_bins : int
        Equal-width bins, see :func:`reliability_curve`.

    Returns
    -------
    float
        In [0, 1]; 0 for a perfectly calibrated model (up to binning and sampling noise).
    """
    conf, freq, counts = reliability_curve(y_true, proba, n_bins)
    ok = counts > 0
    return float(np.sum(counts[ok] * np.abs(freq[ok] - conf[ok])) / counts.sum())


def _logits_2d(logits: ArrayLike) -> FloatArray:
    z = _finite_scores(logits, "logits")
    if z.ndim == 1:
        # binary logit of class 1: softmax([0, z]) == sigmoid(z)
        return np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(
            f"logits must be (N,) binary or (N, C) multi-class with C >= 2, got shape {z.shape}."
        )
    return z


def apply_temperature(logits: ArrayLike, temperature: float) -> FloatArray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Parameters
    ----------
    logits : (N,) or (N, C) float array
        1-D input is the binary logit of class 1 and gives ``sigmoid(logits / T)``, shape (N,).
    temperature : float
        ``T > 0``, e.g. from :func:`fit_temperature`.

    Returns
    -------
    (N,) or (N, C) float ndarray
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}.")
    one_d = np.asarray(logits).ndim == 1
    p = special.softmax(_logits_2d(logits) / temperature, axis=1)
    return p[:, 1] if one_d else p


def fit_temperature(
    logits: ArrayLike, y_true: ArrayLike, *, bounds: tuple[float, float] = (1e-2, 1e2)
) -> float:
    """Temperature ``T > 0`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Fit on a held-out calibration (validation) set; temperature scaling does not change the
    argmax, so accuracy and AUC are unaffected.

    Parameters
    ----------
    logits : (N,) or (N, C) float array
        Uncalibrated logits (1-D: binary logit of class 1).
    y_true : (N,) int array
        Class indices (0/1 for 1-D logits).
    bounds : (float, float)
        Search interval for ``T``; the search runs on ``log T``.

    Returns
    -------
    float
        ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one.
    """
    z = _logits_2d(logits)
    y = _class_labels(y_true, z.shape[1], "fit_temperature")
    n = _check_same_length(y_true=y, logits=z)
    if n == 0:
        raise ValueError("fit_temperature: no samples; pass a non-empty calibration set.")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds!r}.")
    rows = np.arange(n)
    if bool(np.all(z.argmax(axis=1) == y)):
        # Every case on the right side: the NLL falls towards 0 as T -> 0 and underflows to a
        # flat 0 before any bound, so the minimiser's answer is arbitrary. Say so; keep T = 1.
        warnings.warn(
            "fit_temperature: every calibration case is already classified correctly, so no"
            " temperature is identifiable; returning T = 1 (no scaling). Calibrate on more, or"
            " harder, validation cases.",
            RuntimeWarning,
            stacklevel=2,
        )
        return 1.0

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return float(np.mean(special.logsumexp(scaled, axis=1) - scaled[rows, y]))

    res = optimize.minimize_scalar(
        nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6}
    )
    t = float(math.exp(res.x))
    if min(abs(math.log(t / lo)), abs(math.log(t / hi))) < 1e-3:
        warnings.warn(
            f"fitted temperature {t:.4g} sits at the search bound {bounds}; the logits may be "
            "degenerate (e.g. all predictions correct) — widen bounds or check the inputs.",
            RuntimeWarning,
            stacklevel=2,
        )
    return t


# ----------------------------------------------------------------------------- conformal


def _conformal_scores(p: FloatArray, method: str) -> FloatArray:
    """Non-conformity score of every class, ``(N, C)``; a class is in the set iff score <= qhat."""
    if method == "lac":
        return 1.0 - p
    if method == "aps":
        order = np.argsort(-p, axis=1, kind="stable")
        cum_sorted = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        cum = np.empty_like(p)
        np.put_along_axis(cum, order, cum_sorted, axis=1)
        return cum
    raise ValueError(f"method must be 'lac' or 'aps', got {method!r}.")


def conformal_fit(
    proba_cal: ArrayLike,
    y_cal: ArrayLike,
    alpha: float,
    *,
    method: Literal["lac", "aps"] = "lac",
) -> float:
    """Split-conformal threshold ``qhat`` for prediction sets with coverage ``>= 1 - alpha``.

    Parameters
    ----------
    proba_cal : (n, C) float array
        Class probabilities on a calibration set disjoint from training and test data.
    y_cal : (n,) int array
    alpha : float
        Miscoverage rate in (0, 1), e.g. 0.1 for 90 % sets.
    method : {"lac", "aps"}
        ``"lac"`` (least ambiguous set-valued classifier, default): score ``1 - p_y``, giving
        the smallest sets on average. ``"aps"`` (adaptive prediction sets, non-randomised): score
        is the total probability of the classes ranked at or above ``y``; sets adapt to the
        difficulty of each sample and are a little conservative. Pass the same ``method`` to
        :func:`conformal_sets`.

    Returns
    -------
    float
        The ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the calibration scores (the
        finite-sample correction); ``inf`` (every set is all classes) when ``n`` is too small
        for ``alpha``, i.e. ``ceil((n + 1)(1 - alpha)) > n``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.1 for 90 % coverage; got {alpha!r}.")
    p = _proba_2d(proba_cal, "proba_cal")
    y = _class_labels(y_cal, p.shape[1], "conformal_fit")
    n = _check_same_length(y_cal=y, proba_cal=p)
    if n == 0:
        raise ValueError("conformal_fit: empty calibration set; pass labelled samples.")
    scores = _conformal_scores(p, method)[np.arange(n), y]
    rank = math.ceil((n + 1) * (1.0 - alpha))
    if rank > n:
        warnings.warn(
            f"{n} calibration samples are too few for alpha={alpha} (need >= "
            f"{math.ceil(1 / alpha) - 1}); every prediction set will contain all classes.",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.inf
    return float(np.sort(scores)[rank - 1])


def conformal_sets(
    proba: ArrayLike, qhat: float, *, method: Literal["lac", "aps"] = "lac"
) -> NDArray[np.bool_]:
    """Prediction sets: class ``c`` is in the set of sample ``i`` iff its score ``<= qhat``.

    Parameters
    ----------
    proba : (N, C) float array
    qhat : float
        From :func:`conformal_fit` with the same ``method``.
    method : {"lac", "aps"}

    Returns
    -------
    (N, C) bool ndarray
        Sets may be empty (LAC when no class is probable enough; APS when the top class alone
        exceeds ``qhat``).
    """
    p = _proba_2d(proba)
    if math.isnan(qhat):
        raise ValueError("qhat is NaN; pass the value returned by conformal_fit.")
    return _conformal_scores(p, method) <= qhat


def empirical_coverage(sets: ArrayLike, y: ArrayLike) -> float:
    """Fraction of samples whose true class is in its prediction set.

    Parameters
    ----------
    sets : (N, C) bool array
    y : (N,) int array

    Returns
    -------
    float
    """
    s = np.asarray(sets, dtype=bool)
    if s.ndim != 2:
        raise ValueError(f"sets must be an (N, C) boolean array, got shape {s.shape}.")
    labels = _class_labels(y, s.shape[1], "empirical_coverage")
    n = _check_same_length(sets=s, y=labels)
    if n == 0:
        raise ValueError("empirical_coverage: no samples.")
    return float(s[np.arange(n), labels].mean())


# ----------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of two classifiers' correctness on the same cases.

    Attributes
    ----------
    statistic : float
        ``min(b, c)`` for the exact test; the continuity-corrected chi-square otherwise.
    p_value : float
        Two-sided.
    n_a_only, n_b_only : int
        Discordant cases: only the first (model) right, only the second (reader) right.
    method : {"exact", "chi2"}
    """

    statistic: float
    p_value: float
    n_a_only: int
    n_b_only: int
    method: Literal["exact", "chi2"]


def mcnemar_test(
    correct_model: ArrayLike,
    correct_reader: ArrayLike,
    *,
    exact: bool | None = None,
    exact_below: int = 25,
) -> McNemarResult:
    """McNemar's test on paired correctness.

    Parameters
    ----------
    correct_model, correct_reader : (N,) bool arrays
        Whether each case was classified correctly.
    exact : bool, optional
        Force the exact (True) or chi-square (False) version. By default the exact binomial
        test (``b ~ Binomial(b + c, 1/2)``, two-sided) is used when there are fewer than
        ``exact_below`` discordant pairs, otherwise the chi-square test with continuity
        correction ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.
    exact_below : int

    Returns
    -------
    McNemarResult
    """
    a = _as_1d(correct_model, "correct_model")
    r = _as_1d(correct_reader, "correct_reader")
    _check_same_length(correct_model=a, correct_reader=r)
    for name, arr in (("correct_model", a), ("correct_reader", r)):
        if arr.dtype != bool and not np.isin(np.unique(arr), [0, 1]).all():
            raise ValueError(
                f"{name} must be booleans (case classified correctly or not), got values "
                f"{np.unique(arr)[:10].tolist()}; pass e.g. (pred == y_true)."
            )
    ab, rb = a.astype(bool), r.astype(bool)
    b = int(np.sum(ab & ~rb))
    c = int(np.sum(~ab & rb))
    use_exact = (b + c) < exact_below if exact is None else exact
    if b + c == 0:
        return McNemarResult(0.0, 1.0, b, c, "exact" if use_exact else "chi2")
    if use_exact:
        p = float(stats.binomtest(b, b + c, 0.5).pvalue)
        return McNemarResult(float(min(b, c)), min(p, 1.0), b, c, "exact")
    chi2 = (abs(b - c) - 1.0) ** 2 / (b + c)
    return McNemarResult(chi2, float(stats.chi2.sf(chi2, 1)), b, c, "chi2")


def compare_readers(
    y_true: ArrayLike,
    model_score: ArrayLike,
    readers: Mapping[str, ArrayLike],
    *,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Model against each reader (pathologist) on the same cases, one row per reader.

    Parameters
    ----------
    y_true : (N,) array of 0/1
    model_score : (N,) float array
    readers : mapping of str to (N,) array
        Reader name to calls. Calls holding only 0/1 are binary diagnoses: the row compares
        correctness with :func:`mcnemar_test` (model thresholded at ``threshold``). Any other
        values are scores (e.g. a 1-5 confidence scale): the row compares AUCs with
        :func:`delong_test`, and the McNemar fields are NaN.
    threshold : float, optional
        Model decision threshold (``score >= threshold`` is positive); default 0.5, allowed
        only for probability scores. Choose it on validation data.

    Returns
    -------
    list of dict
        Keys: ``reader``, ``kind`` ("calls" or "scores"), ``n``, ``model_sensitivity``,
        ``model_specificity``, ``reader_sensitivity``, ``reader_specificity`` (NaN for score
        readers), ``mcnemar_p``, ``mcnemar_method``, ``model_only_correct``,
        ``reader_only_correct``, ``model_auc``, ``reader_auc``, ``delong_z``, ``delong_p``
        (NaN for call readers).
    """
    y = _binary_labels(y_true, "compare_readers")
    s = _finite_scores(_as_1d(model_score, "model_score"), "model_score")
    _check_same_length(y_true=y, model_score=s)
    if threshold is None:
        if s.min() < 0.0 or s.max() > 1.0:
            raise ValueError(
                "model_score is not a probability, so the default threshold 0.5 is "
                "meaningless; pass threshold=choose_threshold(y_val, score_val)."
            )
        threshold = 0.5
    model_pred = (s >= threshold).astype(np.int64)
    model_point = _binary_point(y, s, float(threshold))
    rows: list[dict[str, Any]] = []
    for name, calls in readers.items():
        rc = _finite_scores(_as_1d(calls, f"readers[{name!r}]"), f"readers[{name!r}]")
        _check_same_length(y_true=y, **{f"readers[{name!r}]": rc})
        row: dict[str, Any] = {
            "reader": name,
            "n": int(y.size),
            "model_sensitivity": model_point["sensitivity"],
            "model_specificity": model_point["specificity"],
            "reader_sensitivity": math.nan,
            "reader_specificity": math.nan,
            "mcnemar_p": math.nan,
            "mcnemar_method": None,
            "model_only_correct": None,
            "reader_only_correct": None,
            "model_auc": model_point["auc"],
            "reader_auc": math.nan,
            "delong_z": math.nan,
            "delong_p": math.nan,
        }
        if np.isin(np.unique(rc), [0.0, 1.0]).all():
            rp = rc.astype(np.int64)
            pt = _binary_point(y, rp.astype(np.float64), 0.5)
            mc = mcnemar_test(model_pred == y, rp == y)
            row.update(
                kind="calls",
                reader_sensitivity=pt["sensitivity"],
                reader_specificity=pt["specificity"],
                mcnemar_p=mc.p_value,
                mcnemar_method=mc.method,
                model_only_correct=mc.n_a_only,
                reader_only_correct=mc.n_b_only,
            )
        else:
            z, p, _, auc_r = delong_test(y, s, rc)
            row.update(kind="scores", reader_auc=auc_r, delong_z=z, delong_p=p)
        rows.append(row)
    return rows
