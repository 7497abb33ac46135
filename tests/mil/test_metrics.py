"""Tests of mil._metrics against hand counts, scikit-learn and textbook definitions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from oncotrace.mil import (
    apply_temperature,
    auc_ci,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    compare_readers,
    conformal_fit,
    conformal_sets,
    delong_auc,
    delong_test,
    empirical_coverage,
    expected_calibration_error,
    fit_temperature,
    mcnemar_test,
    multiclass_metrics,
    reliability_curve,
)
from scipy import special, stats
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

# ------------------------------------------------------------------ independent references


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _slow_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson (1988), written out pair by pair: O(m n) per score."""
    k = len(scores)
    pos_idx = [i for i in range(len(y)) if y[i] == 1]
    neg_idx = [i for i in range(len(y)) if y[i] == 0]
    m, n = len(pos_idx), len(neg_idx)
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r, s in enumerate(scores):
        for a, i in enumerate(pos_idx):
            v10[r, a] = sum(_psi(s[i], s[j]) for j in neg_idx) / n
        for b, j in enumerate(neg_idx):
            v01[r, b] = sum(_psi(s[i], s[j]) for i in pos_idx) / m
    theta = v10.mean(axis=1)
    s10 = np.zeros((k, k))
    s01 = np.zeros((k, k))
    for r in range(k):
        for t in range(k):
            s10[r, t] = np.sum((v10[r] - theta[r]) * (v10[t] - theta[t])) / (m - 1)
            s01[r, t] = np.sum((v01[r] - theta[r]) * (v01[t] - theta[t])) / (n - 1)
    return theta, s10 / m + s01 / n


def _sample_categorical(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    u = rng.random(len(p))[:, None]
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


# ------------------------------------------------------------------ AUC and DeLong


def test_auc_hand_counted_six_samples() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    # positives 0.8 > 3 negatives; 0.4 > 0.1, 0.35 and ties 0.4 (1/2); 0.9 > 3 -> 8.5 / 9
    auc, var = delong_auc(y, s)
    assert auc == pytest.approx(8.5 / 9)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert var > 0


def test_delong_matches_slow_placement_values() -> None:
    rng = np.random.default_rng(3)
    n = 70
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    a = np.round(y * 0.8 + rng.normal(size=n), 1)  # rounding creates ties
    b = np.round(0.6 * a + y * 0.5 + rng.normal(size=n), 1)
    theta, cov = _slow_delong(y, [a, b])
    auc_a, var_a = delong_auc(y, a)
    assert auc_a == pytest.approx(theta[0], abs=1e-12)
    assert var_a == pytest.approx(cov[0, 0], rel=1e-10)
    z, p, auc_a2, auc_b = delong_test(y, a, b)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (auc_a2, auc_b) == pytest.approx((theta[0], theta[1]), abs=1e-12)
    assert z == pytest.approx((theta[0] - theta[1]) / se, rel=1e-10)
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-10)


def test_delong_identical_scores_give_no_difference() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.2, 0.7, 0.4, 0.3, 0.9, 0.1])
    z, p, a, b = delong_test(y, s, s)
    assert (z, p) == (0.0, 1.0)
    assert a == b


def test_auc_ci_normal_is_wald_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    s = y + rng.normal(size=100)
    auc, var = delong_auc(y, s)
    _, lo, hi = auc_ci(y, s, 0.95, method="normal")
    assert (lo, hi) == pytest.approx((auc - 1.959964 * var**0.5, auc + 1.959964 * var**0.5))
    _, llo, lhi = auc_ci(y, s, 0.95)
    assert llo < auc < lhi
    assert llo > 0.0 and lhi < 1.0


@pytest.mark.parametrize("method", ["logit", "normal"])
def test_auc_ci_coverage_by_simulation(method: str) -> None:
    rng = np.random.default_rng(11)
    d = 1.2
    true_auc = stats.norm.cdf(d / math.sqrt(2))  # binormal, unit variances
    y = np.repeat([0, 1], 60)
    reps = 800
    hits = 0
    for _ in range(reps):
        s = rng.normal(size=y.size) + d * y
        _, lo, hi = auc_ci(y, s, 0.95, method=method)  # type: ignore[arg-type]
        hits += lo <= true_auc <= hi
    assert 0.93 <= hits / reps <= 0.97


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_resamples_whole_patients() -> None:
    # patient k owns k + 1 slides; y_true carries the patient id so the metric can see them
    sizes = [1, 2, 3, 4, 5, 6]
    patient = np.repeat(np.arange(len(sizes)), sizes)
    seen: list[Counter[int]] = []

    def record(y_sub: np.ndarray, _p: np.ndarray) -> float:
        seen.append(Counter(y_sub.tolist()))
        return float(len(y_sub))

    res = bootstrap_ci(record, patient, np.zeros(len(patient)), groups=patient, n_boot=200)
    draws = seen[1:]  # first call is the full-data estimate
    assert len(draws) == 200 and res.n_used == 200
    for counts in draws:
        # every patient appears a whole number of times with all its slides ...
        assert all(c % sizes[g] == 0 for g, c in counts.items())
        # ... and exactly len(sizes) patients are drawn per resample
        assert sum(c // sizes[g] for g, c in counts.items()) == len(sizes)
    # not degenerate: patients are sometimes drawn twice and sometimes missing
    assert any(len(c) < len(sizes) for c in draws)
    assert res.estimate == len(patient)


def test_bootstrap_without_groups_is_per_sample() -> None:
    sizes = [5, 5]
    patient = np.repeat([0, 1], sizes)
    seen: list[Counter[int]] = []

    def record(y_sub: np.ndarray, _p: np.ndarray) -> float:
        seen.append(Counter(y_sub.tolist()))
        return 0.0

    bootstrap_ci(record, patient, np.zeros(10), n_boot=100)
    assert any(c[0] % 5 for c in seen[1:])


def test_bootstrap_skips_undefined_and_reports_count() -> None:
    y = np.array([0, 0, 0, 0, 1, 0, 0, 0])
    s = np.linspace(0, 1, 8)
    with pytest.warns(RuntimeWarning, match="bootstrap resamples had a defined value"):
        res = bootstrap_ci(roc_auc_score, y, s, n_boot=300, seed=1)
    # P(the single positive is missing) = (7/8)^8 ~ 0.34
    assert 150 < res.n_used < 260
    assert res.n_boot == 300


def test_bootstrap_width_matches_binomial_se() -> None:
    rng = np.random.default_rng(5)
    correct = (rng.random(400) < 0.7).astype(float)
    res = bootstrap_ci(lambda yt, _p: float(yt.mean()), correct, correct, n_boot=2000)
    p = correct.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / 400)
    assert (res.high - res.low) / 2 == pytest.approx(half, rel=0.12)
    assert res.low < p < res.high


# ------------------------------------------------------------------ binary metrics


def test_binary_metrics_hand_2x2() -> None:
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    out = binary_metrics(y, s, threshold=0.5, n_boot=50)
    # TP = 2 (0.9, 0.6), FN = 1 (0.2), FP = 1 (0.7), TN = 1 (0.1)
    np.testing.assert_array_equal(out.confusion, [[1, 1], [1, 2]])
    m = {k: v.estimate for k, v in out.metrics.items()}
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUC: 0.9 beats both, 0.6 beats 0.1 only, 0.2 beats 0.1 only -> 4 / 6
    assert m["auc"] == pytest.approx(4 / 6)
    assert out.n_positive == 3 and out.threshold == 0.5


def test_binary_metrics_match_sklearn_and_cis_bracket() -> None:
    rng = np.random.default_rng(2)
    n = 300
    y = (rng.random(n) < 0.35).astype(int)
    s = special.expit(1.5 * y - 0.7 + rng.normal(size=n))
    groups = rng.integers(0, 100, size=n)
    out = binary_metrics(y, s, threshold=0.4, groups=groups, n_boot=300)
    pred = (s >= 0.4).astype(int)
    m = out.metrics
    assert m["auc"].estimate == pytest.approx(roc_auc_score(y, s))
    assert m["accuracy"].estimate == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"].estimate == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["sensitivity"].estimate == pytest.approx(recall_score(y, pred))
    assert m["specificity"].estimate == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"].estimate == pytest.approx(f1_score(y, pred))
    np.testing.assert_array_equal(out.confusion, confusion_matrix(y, pred))
    for ci in m.values():
        assert ci.low <= ci.estimate <= ci.high
        assert ci.n_used == 300
    lo, hi = out.auc_delong
    assert lo < m["auc"].estimate < hi
    assert out.n_groups == len(np.unique(groups))


def test_choose_threshold_rules() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8])
    # Youden by hand: cutting at 0.6 -> sens 3/4, spec 4/4 -> J = 0.75 (best); any threshold
    # in (0.4, 0.6] does the same, and the midpoint of that gap is returned
    assert choose_threshold(y, s) == pytest.approx(0.5)
    # separated scores: midway between the highest negative and the lowest positive
    y2, s2 = np.array([0, 0, 1, 1]), np.array([0.0001, 0.0003, 0.999998, 0.999999])
    assert choose_threshold(y2, s2) == pytest.approx((0.0003 + 0.999998) / 2)
    # highest threshold with sensitivity 1 is 0.35
    assert choose_threshold(y, s, "sensitivity", target=1.0) == pytest.approx(0.35)
    # lowest threshold with specificity >= 0.75 (3 of 4 negatives below) is 0.35
    assert choose_threshold(y, s, "specificity", target=0.75) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="target"):
        choose_threshold(y, s, "sensitivity")


# ------------------------------------------------------------------ multi-class


def test_multiclass_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(4)
    n, c = 400, 4
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    p = special.softmax(logits, axis=1)
    out = multiclass_metrics(y, p, class_names=list("abcd"), n_boot=200, k=(1, 2, 3))
    pred = p.argmax(axis=1)
    m = out.metrics
    assert m["auc_macro"].estimate == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro")
    )
    onehot = np.eye(c)[y]
    assert m["auc_micro"].estimate == pytest.approx(roc_auc_score(onehot.ravel(), p.ravel()))
    assert m["accuracy"].estimate == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"].estimate == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"].estimate == pytest.approx(f1_score(y, pred, average="macro"))
    for k in (1, 2, 3):
        assert m[f"top{k}_accuracy"].estimate == pytest.approx(top_k_accuracy_score(y, p, k=k))
    np.testing.assert_array_equal(out.confusion, confusion_matrix(y, pred))
    assert out.per_class_auc["b"] == pytest.approx(roc_auc_score(y == 1, p[:, 1]))
    for ci in m.values():
        assert ci.low <= ci.estimate <= ci.high


def test_multiclass_errors() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    with pytest.raises(ValueError, match="class_names has 2 names"):
        multiclass_metrics([0, 1], p, class_names=["a", "b"])
    with pytest.raises(ValueError, match="sum to 1"):
        multiclass_metrics([0, 1], p * 1.1, class_names="abc")
    with pytest.raises(ValueError, match="single class"):
        multiclass_metrics([1, 1], p, class_names="abc")


# ------------------------------------------------------------------ calibration


def test_ece_perfectly_calibrated_is_near_zero() -> None:
    rng = np.random.default_rng(6)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01


def test_ece_known_overconfidence() -> None:
    rng = np.random.default_rng(7)
    n = 100_000
    # binary: says 0.9 but only 70 % are positive -> ECE = 0.2
    y = (rng.random(n) < 0.7).astype(int)
    assert expected_calibration_error(y, np.full(n, 0.9)) == pytest.approx(0.2, abs=0.01)
    # multi-class top label: confidence 0.9, right 60 % of the time -> ECE = 0.3
    proba = np.tile([0.9, 0.05, 0.05], (n, 1))
    y3 = np.where(rng.random(n) < 0.6, 0, rng.integers(1, 3, size=n))
    assert expected_calibration_error(y3, proba) == pytest.approx(0.3, abs=0.01)


def test_ece_and_reliability_hand_case() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([0.2, 0.2, 0.8, 0.8])
    conf, freq, counts = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(conf, [0.2, 0.8])
    np.testing.assert_allclose(freq, [0.5, 1.0])
    np.testing.assert_array_equal(counts, [2, 2])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)


@pytest.mark.parametrize("t0", [2.5, 0.5])
def test_fit_temperature_recovers_known_temperature(t0: float) -> None:
    rng = np.random.default_rng(8)
    n, c = 20_000, 5
    true_logits = rng.normal(scale=2.0, size=(n, c))
    y = _sample_categorical(rng, special.softmax(true_logits, axis=1))  # calibrated labels
    observed = true_logits * t0  # softmax(observed / t0) is calibrated again
    t = fit_temperature(observed, y)
    assert t == pytest.approx(t0, rel=0.05)
    np.testing.assert_allclose(
        apply_temperature(observed, t0), special.softmax(true_logits, axis=1), atol=1e-12
    )


def test_temperature_binary_logits_are_sigmoid() -> None:
    z = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(apply_temperature(z, 2.0), special.expit(z / 2.0))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)


# ------------------------------------------------------------------ conformal


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_conformal_coverage_simulation(method: str, alpha: float) -> None:
    rng = np.random.default_rng(9)
    c = 6
    covs = []
    for _ in range(20):
        p = rng.dirichlet(np.full(c, 0.7), size=4000)
        y = _sample_categorical(rng, p)
        qhat = conformal_fit(p[:2000], y[:2000], alpha, method=method)  # type: ignore[arg-type]
        sets = conformal_sets(p[2000:], qhat, method=method)  # type: ignore[arg-type]
        assert sets.shape == (2000, c) and sets.dtype == bool
        covs.append(empirical_coverage(sets, y[2000:]))
    assert all(abs(cv - (1 - alpha)) <= 0.03 for cv in covs)
    assert np.mean(covs) == pytest.approx(1 - alpha, abs=0.01)


def test_conformal_finite_sample_quantile_by_hand() -> None:
    # LAC scores 1 - p_y = 0.1, 0.2, ..., 0.9 (n = 9); alpha = 0.25 -> ceil(10 * 0.75) = 8th
    # smallest -> 0.8 (without the (n + 1) correction it would be the 7th, 0.7)
    py = np.arange(9, 0, -1) / 10
    p = np.stack([py, 1 - py], axis=1)
    y = np.zeros(9, dtype=int)
    assert conformal_fit(p, y, 0.25) == pytest.approx(0.8)
    # APS with the true class ranked first: score = p_y, so the same order statistic of p_y
    assert conformal_fit(p[:5], y[:5], 0.5, method="aps") == pytest.approx(0.7)
    with pytest.warns(RuntimeWarning, match="too few"):
        assert conformal_fit(p, y, 0.05) == math.inf
    sets = conformal_sets(np.array([[0.25, 0.75]]), 0.8)
    np.testing.assert_array_equal(sets, [[True, True]])  # 1 - 0.25 = 0.75 <= 0.8


# ------------------------------------------------------------------ readers


def test_mcnemar_exact_matches_binomial() -> None:
    # 8 cases only the model got right, 2 only the reader; 20 both right, 5 both wrong
    model = np.array([1] * 8 + [0] * 2 + [1] * 20 + [0] * 5, dtype=bool)
    reader = np.array([0] * 8 + [1] * 2 + [1] * 20 + [0] * 5, dtype=bool)
    res = mcnemar_test(model, reader)
    assert res.method == "exact" and (res.n_a_only, res.n_b_only) == (8, 2)
    # two-sided: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert res.p_value == pytest.approx(112 / 1024)
    assert res.p_value == pytest.approx(stats.binomtest(8, 10, 0.5).pvalue)


def test_mcnemar_chi2_with_continuity() -> None:
    model = np.array([1] * 30 + [0] * 15 + [1] * 50, dtype=bool)
    reader = np.array([0] * 30 + [1] * 15 + [1] * 50, dtype=bool)
    res = mcnemar_test(model, reader)
    stat = (abs(30 - 15) - 1) ** 2 / 45
    assert res.method == "chi2"
    assert res.statistic == pytest.approx(stat)
    # chi-square with 1 df: P(Z^2 > x) = erfc(sqrt(x / 2))
    assert res.p_value == pytest.approx(math.erfc(math.sqrt(stat / 2)))


def test_compare_readers_rows() -> None:
    rng = np.random.default_rng(10)
    n = 120
    y = np.repeat([0, 1], n // 2)
    model = special.expit(2 * y - 1 + rng.normal(size=n))
    calls = np.where(rng.random(n) < 0.8, y, 1 - y)
    rating = np.clip(np.round(2 + 2 * y + rng.normal(size=n)), 1, 5)
    rows = compare_readers(y, model, {"path_a": calls, "path_b": rating})
    a, b = rows
    assert a["reader"] == "path_a" and a["kind"] == "calls"
    mc = mcnemar_test((model >= 0.5) == y, calls == y)
    assert a["mcnemar_p"] == pytest.approx(mc.p_value)
    assert a["reader_sensitivity"] == pytest.approx(np.mean(calls[y == 1] == 1))
    assert math.isnan(a["delong_p"])
    assert b["kind"] == "scores" and math.isnan(b["mcnemar_p"])
    assert b["reader_auc"] == pytest.approx(roc_auc_score(y, rating))
    assert b["delong_p"] == pytest.approx(delong_test(y, model, rating)[1])


# ------------------------------------------------------------------ input errors


def test_clear_errors() -> None:
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="different numbers of samples"):
        delong_auc(y, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN/inf"):
        delong_auc(y, [0.1, np.nan, 0.3, 0.4])
    with pytest.raises(ValueError, match="only class 1"):
        binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="binary labels"):
        delong_auc([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="choose_threshold"):
        binary_metrics(y, [-1.0, 2.0, 0.3, 4.0])
    with pytest.raises(ValueError, match="sum to 1"):
        conformal_fit(np.array([[0.5, 0.6], [0.5, 0.5]]), [0, 1], 0.1)
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error([0, 1], np.array([[2.0, -1.0], [0.3, 0.7]]))
    with pytest.raises(ValueError, match="groups has 3"):
        bootstrap_ci(lambda a, b: 0.0, y, y, groups=[1, 2, 3])


def test_fit_temperature_on_separated_data_warns_and_keeps_t1() -> None:
    # All argmax correct: NLL -> 0 as T -> 0, no optimum (a minimiser would return ~0.01).
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [-0.5, 0.5]])
    with pytest.warns(RuntimeWarning, match="no temperature is identifiable"):
        assert fit_temperature(logits, np.array([0, 1, 0, 1])) == 1.0
