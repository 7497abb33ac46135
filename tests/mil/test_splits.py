"""Patient-grouped splits: no patient on both sides, stratified, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from oncotrace.mil import grouped_kfold, grouped_split, inner_validation, site_holdout


def _cohort(seed: int, n_patients: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random cohort: 2 or 3 classes, 1-3 cases per patient, one label and site per patient."""
    rng = np.random.default_rng(seed)
    n_classes = 2 + seed % 2
    labels, groups, sites = [], [], []
    for p in rng.permutation(n_patients):
        y = int(p % n_classes)
        site = str(rng.choice(["A", "B", "C"]))
        for _ in range(int(rng.integers(1, 4))):
            labels.append(y)
            groups.append(f"P{p:03d}")
            sites.append(site)
    return np.array(labels), np.array(groups), np.array(sites)


@pytest.mark.parametrize("seed", range(15))
def test_kfold_partitions_cases_without_shared_patients(seed: int) -> None:
    y, g, _ = _cohort(seed, n_patients=40)
    k = 3 + seed % 3
    folds = grouped_kfold(y, g, k, seed)
    assert len(folds) == k
    seen = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(seen), np.arange(y.size))  # each case tested exactly once
    for tr, te in folds:
        assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == y.size
        assert not set(g[tr]) & set(g[te])


def test_kfold_is_stratified() -> None:
    g = np.array([f"P{i}" for i in range(60)])
    y = np.array([0] * 40 + [1] * 20)
    for _, te in grouped_kfold(y, g, 5, seed=1):
        assert te.size == 12 and y[te].sum() == 4  # 1:2 in every fold, like the cohort


def test_kfold_too_few_patients_in_a_class() -> None:
    y = np.array([0] * 10 + [1, 1, 1])
    g = np.array([f"P{i}" for i in range(10)] + ["Q1", "Q1", "Q2"])  # 2 patients of class 1
    with pytest.raises(ValueError, match="fewer patients than the 3 folds"):
        grouped_kfold(y, g, 3)
    with pytest.raises(ValueError, match="different labels"):
        grouped_kfold([0, 1, 0, 1], ["a", "a", "b", "c"], 2)


@pytest.mark.parametrize("seed", range(10))
def test_grouped_split_and_inner_validation(seed: int) -> None:
    y, g, _ = _cohort(seed)
    tr, te = grouped_split(y, g, 0.3, seed)
    assert np.array_equal(np.sort(np.r_[tr, te]), np.arange(y.size))
    assert not set(g[tr]) & set(g[te])
    for c in np.unique(y):  # each class present on both sides, ~30 % of its patients in test
        n_pat = len(set(g[y == c]))
        n_test = len(set(g[te][y[te] == c]))
        if n_pat >= 2:
            assert 1 <= n_test <= n_pat - 1
            assert abs(n_test - 0.3 * n_pat) <= 1
    fit_idx, val_idx = inner_validation(tr, y, g, 0.2, seed)
    assert np.array_equal(np.sort(np.r_[fit_idx, val_idx]), np.sort(tr))
    assert not set(g[fit_idx]) & set(g[val_idx])
    assert not set(g[val_idx]) & set(g[te])


def test_grouped_split_needs_two_patients_per_class() -> None:
    with pytest.raises(ValueError, match="fewer patients"):
        grouped_split([0, 0, 1, 0], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="two classes"):
        grouped_split([0, 0, 0], ["a", "b", "c"])


def test_site_holdout() -> None:
    sites = np.array(["A", "B", "A", "C", "B"])
    tr, te = site_holdout(sites, "B")
    assert tr.tolist() == [0, 2, 3] and te.tolist() == [1, 4]
    tr, te = site_holdout(sites, ["A", "C"])
    assert te.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="not among the sites"):
        site_holdout(sites, "Z")
    with pytest.raises(ValueError, match="no training site"):
        site_holdout(sites, ["A", "B", "C"])
    with pytest.raises(ValueError, match="both training and held-out"):
        site_holdout(sites, "B", groups=["p", "q", "r", "s", "p"][::-1])


def test_unknown_labels_follow_their_patient_and_are_no_class() -> None:
    # 12 patients of each class; P00 has a labelled and an unlabelled slide, P99 and P98 have
    # only unlabelled slides (-1, as load_cohort writes a missing label).
    g = [f"P{i:02d}" for i in range(24)] + ["P00", "P99", "P98", "P98"]
    y = [i % 2 for i in range(24)] + [-1, -1, -1, -1]
    g, y = np.array(g), np.array(y)
    folds = grouped_kfold(y, g, 4, seed=0)
    seen = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(seen), np.arange(y.size))  # unlabelled cases are tested too
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
        assert set(y[te][y[te] >= 0]) == {0, 1}  # both real classes in every test fold
    tr, te = grouped_split(y, g, 0.25, seed=1)
    assert not set(g[tr]) & set(g[te]) and tr.size + te.size == y.size
    assert {0, 1} <= set(y[te]) and {0, 1} <= set(y[tr])
    # still refused: one patient with two known labels, and a single known class
    with pytest.raises(ValueError, match="different labels"):
        grouped_kfold(np.array([0, 1, 0, 1]), np.array(["A", "A", "B", "C"]), 2)
    with pytest.raises(ValueError, match="all labelled patients have label '0'"):
        grouped_kfold(np.array([0, 0, -1, -1]), np.array(["A", "B", "C", "D"]), 2)
