"""Patient-grouped data splits: k-fold, site hold-out, a single train/test split, inner validation.

Every split keeps all cases of a patient on one side, so a model is never tested on a patient it
saw in training. Indices are positions into the arrays passed in, as sorted ``int64`` arrays.

A label of ``-1`` (or ``""``) is unknown, as in :func:`mil.load_cohort`: such a case follows its
patient's known label, and patients without one are spread over the sides as a stratum of their
own, never counted as a class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

IntArray = NDArray[np.int64]

#: Stratum of the patients none of whose cases has a known label.
_UNLABELLED = "\x00unlabelled"
_UNKNOWN = frozenset({"-1", ""})


def _as_1d(x: ArrayLike, name: str) -> NDArray[np.object_]:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one value per case), got shape {arr.shape}.")
    return arr.astype(str).astype(object)


def _patient_labels(labels: NDArray[np.object_], groups: NDArray[np.object_]) -> dict[str, str]:
    """patient -> label (:data:`_UNLABELLED` when none of its cases has one); raises if one
    patient carries two known labels (stratification is per patient)."""
    out: dict[str, str] = {}
    for g, y in zip(groups, labels, strict=True):
        if y in _UNKNOWN:
            out.setdefault(g, _UNLABELLED)
            continue
        prev = out.setdefault(g, y)
        if prev == _UNLABELLED:
            out[g] = y
        elif prev != y:
            raise ValueError(
                f"patient {g!r} has cases with different labels ({prev!r} and {y!r}); "
                "grouped stratification needs one label per patient. Fix the labels or split "
                "on a patient-level label."
            )
    return out


def _check_inputs(labels: ArrayLike, groups: ArrayLike) -> tuple[NDArray[np.object_], ...]:
    y, g = _as_1d(labels, "labels"), _as_1d(groups, "groups")
    if y.shape != g.shape:
        raise ValueError(
            f"labels ({y.size}) and groups ({g.size}) must have one entry per case each."
        )
    if y.size == 0:
        raise ValueError("no cases to split.")
    return y, g


def _check_enough_patients(per_patient: dict[str, str], k: int, what: str) -> None:
    known = [y for y in per_patient.values() if y != _UNLABELLED]
    classes, counts = np.unique(known, return_counts=True)
    if len(classes) < 2:
        have = f"label {str(classes[0])!r}" if len(classes) else "no known label"
        raise ValueError(
            f"{what}: all labelled patients have {have}; a stratified split needs at least "
            "two classes."
        )
    few = {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n < k}
    if few:
        raise ValueError(
            f"{what}: class(es) {few} have fewer patients than the {k} folds/sides needed, so "
            "some test fold would lack the class. Use fewer folds, a single split, or collect "
            "more patients of that class."
        )


def _assert_disjoint(train: IntArray, test: IntArray, g: NDArray[np.object_]) -> None:
    shared = set(g[train]) & set(g[test])
    if shared:  # an internal guarantee; a failure here is a bug, not bad input
        raise RuntimeError(f"patients {sorted(shared)[:5]} ended up on both sides of a split.")


def grouped_kfold(
    labels: ArrayLike, groups: ArrayLike, k: int = 5, seed: int = 0
) -> list[tuple[IntArray, IntArray]]:
    """Stratified, patient-grouped k-fold cross-validation.

    Parameters
    ----------
    labels : (N,) array of class labels per case (-1 or ``""``: unknown, see the module notes).
    groups : (N,) array of patient ids per case.
    k : number of folds (>= 2).
    seed : shuffling seed.

    Returns
    -------
    list of k ``(train_idx, test_idx)`` pairs of sorted int64 arrays; every case is in exactly
    one test fold and no patient is in both halves of a pair.

    Raises
    ------
    ValueError
        If a class has fewer patients than ``k``, or a patient has cases with different labels.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if int(k) < 2:
        raise ValueError(f"k must be >= 2, got {k}.")
    y, g = _check_inputs(labels, groups)
    per_patient = _patient_labels(y, g)
    _check_enough_patients(per_patient, int(k), "grouped_kfold")
    strata = np.array([per_patient[p] for p in g], dtype=object)
    cv = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=seed)
    out = []
    with warnings.catch_warnings():
        # the classes were checked above; only the unlabelled stratum may be smaller than k
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splits = list(cv.split(np.zeros(y.size), strata, g))
    for tr, te in splits:
        tr, te = np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)
        _assert_disjoint(tr, te, g)
        out.append((tr, te))
    return out


def site_holdout(
    sites: ArrayLike,
    test_sites: str | Sequence[str],
    *,
    groups: ArrayLike | None = None,
) -> tuple[IntArray, IntArray]:
    """Train on every site but ``test_sites``; test on those.

    Parameters
    ----------
    sites : (N,) array of site names per case.
    test_sites : site name or names held out.
    groups : (N,) array of patient ids, optional
        Checked so that no patient has cases at both a training and a held-out site.

    Returns
    -------
    (train_idx, test_idx) : sorted int64 arrays.
    """
    s = _as_1d(sites, "sites")
    held = {test_sites} if isinstance(test_sites, str) else {str(t) for t in test_sites}
    known = set(s)
    unknown = sorted(held - known)
    if unknown:
        raise ValueError(f"test site(s) {unknown} not among the sites {sorted(known)}.")
    if held >= known:
        raise ValueError(f"holding out {sorted(held)} leaves no training site; keep one site out.")
    is_test = np.isin(s, list(held))
    tr, te = np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)
    if groups is not None:
        g = _as_1d(groups, "groups")
        if g.shape != s.shape:
            raise ValueError(f"sites ({s.size}) and groups ({g.size}) must have equal length.")
        shared = sorted(set(g[tr]) & set(g[te]))
        if shared:
            raise ValueError(
                f"patients {shared[:5]} have cases at both training and held-out sites; a site "
                "hold-out would test on seen patients. Drop their cases at one of the sites."
            )
    return tr, te


def _grouped_two_way(
    y: NDArray[np.object_], g: NDArray[np.object_], fraction: float, seed: int, what: str
) -> tuple[IntArray, IntArray]:
    """Split patients per class so ``fraction`` of each class's patients go to the second side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{what}: fraction must be in (0, 1), got {fraction}.")
    per_patient = _patient_labels(y, g)
    _check_enough_patients(per_patient, 2, what)
    rng = np.random.default_rng(seed)
    second: set[str] = set()
    by_class: dict[str, list[str]] = {}
    for p, c in per_patient.items():
        by_class.setdefault(c, []).append(p)
    for c in sorted(by_class):
        patients = sorted(by_class[c])
        rng.shuffle(patients)
        if c == _UNLABELLED:
            n = round(fraction * len(patients))
        else:  # at least one patient per side for every class
            n = int(np.clip(round(fraction * len(patients)), 1, len(patients) - 1))
        second.update(patients[:n])
    is_second = np.array([p in second for p in g], dtype=bool)
    first, other = np.flatnonzero(~is_second), np.flatnonzero(is_second)
    _assert_disjoint(first, other, g)
    return first.astype(np.int64), other.astype(np.int64)


def grouped_split(
    labels: ArrayLike, groups: ArrayLike, test_fraction: float = 0.3, seed: int = 0
) -> tuple[IntArray, IntArray]:
    """One stratified, patient-grouped train/test split (the "7:3" split by default).

    ``test_fraction`` of each class's patients (rounded, at least one) go to the test set.

    Returns
    -------
    (train_idx, test_idx) : sorted int64 arrays with no shared patient.
    """
    y, g = _check_inputs(labels, groups)
    return _grouped_two_way(y, g, float(test_fraction), seed, "grouped_split")


def inner_validation(
    train_idx: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    fraction: float = 0.2,
    seed: int = 0,
) -> tuple[IntArray, IntArray]:
    """Carve a patient-grouped, stratified validation set out of ``train_idx`` (early stopping).

    Parameters
    ----------
    train_idx : indices into ``labels``/``groups`` of the training cases.
    labels, groups : (N,) arrays for the whole cohort.
    fraction : share of each class's training patients moved to validation.

    Returns
    -------
    (fit_idx, val_idx) : sorted int64 subsets of ``train_idx`` with no shared patient.
    """
    y, g = _check_inputs(labels, groups)
    idx = np.asarray(train_idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise IndexError(f"train_idx has indices outside 0..{y.size - 1}.")
    a, b = _grouped_two_way(y[idx], g[idx], float(fraction), seed, "inner_validation")
    return np.sort(idx[a]), np.sort(idx[b])
