"""Few-shot heads on frozen case embeddings, for cohorts of a few dozen patients.

A case (slide) becomes one vector by pooling its tile features (:func:`case_embeddings`). Two
heads fit on such vectors with almost no data: a cosine :class:`PrototypeHead` (nothing to tune
but a temperature) and a class-balanced logistic :class:`LinearProbeHead` on standardised
embeddings. :func:`fewshot_evaluate` answers "how well would k labelled patients per class do?"
by drawing k training patients per class many times and testing on every other patient.

Heads are saved as ``model.json`` + ``model.safetensors`` (never pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from oncotrace import __version__
from oncotrace.wsi import atomic_write_json

from . import _metrics
from ._splits import _check_inputs, _patient_labels

Pool = Literal["mean", "mean+max"]
Method = Literal["prototype", "linear"]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_FORMAT = "oncotrace-fewshot-head"
_FORMAT_VERSION = 1
_CONFIG_FILE, _WEIGHTS_FILE = "model.json", "model.safetensors"


# ----------------------------------------------------------------------------- embeddings


def case_embeddings(bags: Sequence[ArrayLike], pool: Pool = "mean") -> FloatArray:
    """Pool each case's tile features into one vector.

    Parameters
    ----------
    bags : sequence of N (N_i, D) float arrays
        Tile features of each case, all with the same D and at least one tile.
    pool : ``"mean"`` (D values) or ``"mean+max"`` (2D: the mean, then the per-feature max,
        which keeps a signal carried by a few tiles that the mean dilutes).

    Returns
    -------
    (N, D) or (N, 2D) float64 ndarray
    """
    _check_pool(pool)
    if isinstance(bags, np.ndarray) and bags.dtype != object:
        raise TypeError(
            f"case_embeddings expects a list of (N_i, D) bags, got one {bags.ndim}-D array; "
            "pass [bag_1, bag_2, ...] (or give embeddings directly to the heads)."
        )
    if len(bags) == 0:
        raise ValueError("no bags given; pass one (N_i, D) array of tile features per case.")
    out = []
    dim: int | None = None
    for i, bag in enumerate(bags):
        b = np.asarray(bag, dtype=np.float64)
        if b.ndim != 2 or b.shape[0] == 0:
            raise ValueError(
                f"bag {i} has shape {b.shape}; each bag must be (N_i, D) with at least one tile."
            )
        if dim is None:
            dim = b.shape[1]
        elif b.shape[1] != dim:
            raise ValueError(
                f"bag {i} has {b.shape[1]} features but bag 0 has {dim}; all bags must come "
                "from the same encoder."
            )
        if not np.isfinite(b).all():
            raise ValueError(f"bag {i} contains NaN or inf features; re-embed that case.")
        parts = [b.mean(axis=0)] + ([b.max(axis=0)] if pool == "mean+max" else [])
        out.append(np.concatenate(parts))
    return np.stack(out)


def _check_pool(pool: str) -> None:
    if pool not in ("mean", "mean+max"):
        raise ValueError(f"pool must be 'mean' or 'mean+max', got {pool!r}.")


def _as_matrix(x: ArrayLike, name: str = "embeddings") -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or inf values.")
    return a


def _softmax(z: FloatArray) -> FloatArray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


# ----------------------------------------------------------------------------- heads


class _FewShotHead:
    """Shared fitting checks, prediction helpers and (de)serialisation."""

    kind: str
    classes_: NDArray[Any] | None
    pool: Pool

    def _check_fit(self, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, NDArray[Any], IntArray]:
        xm = _as_matrix(x)
        ya = np.asarray(y)
        if ya.ndim != 1 or ya.shape[0] != xm.shape[0]:
            raise ValueError(
                f"labels must be 1-D with one entry per row of the embeddings "
                f"({xm.shape[0]}), got shape {ya.shape}."
            )
        classes, yi = np.unique(ya, return_inverse=True)
        if classes.size < 2:
            raise ValueError(f"all training cases have label {classes[0]!r}; need two classes.")
        return xm, classes, yi.astype(np.int64)

    def _not_fitted(self) -> RuntimeError:
        return RuntimeError(f"this {type(self).__name__} is not fitted; call fit(X, y) first.")

    def _check_predict(self, x: ArrayLike, dim: int) -> FloatArray:
        xm = _as_matrix(x)
        if xm.shape[1] != dim:
            raise ValueError(
                f"embeddings have {xm.shape[1]} features but the head was fitted on {dim} "
                f"(pool={self.pool!r}); embed with the same encoder and pooling."
            )
        return xm

    def predict_proba(self, x: ArrayLike) -> FloatArray:
        raise NotImplementedError

    def predict(self, x: ArrayLike) -> NDArray[Any]:
        """Most probable class label per row of ``x``."""
        p = self.predict_proba(x)
        if self.classes_ is None:
            raise self._not_fitted()
        return self.classes_[p.argmax(axis=1)]

    def predict_proba_bags(self, bags: Sequence[ArrayLike]) -> FloatArray:
        """Pool ``bags`` with the head's ``pool`` and predict: (N, C) probabilities."""
        return self.predict_proba(case_embeddings(bags, self.pool))

    # -- persistence
    def _arrays(self) -> dict[str, FloatArray]:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, directory: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``model.json`` (kind, classes, settings, ``metadata``) and ``model.safetensors``.

        ``metadata`` (JSON-serialisable) records what a reader needs, e.g. the encoder name.
        """
        from safetensors.numpy import save_file

        if self.classes_ is None:
            raise self._not_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self._arrays().items()}
        save_file(arrays, str(directory / _WEIGHTS_FILE))
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "oncotrace_version": __version__,
            "kind": self.kind,
            "classes": self.classes_.tolist(),
            "pool": self.pool,
            "params": self._params(),
            "metadata": dict(metadata or {}),
        }
        atomic_write_json(directory / _CONFIG_FILE, meta, indent=2)
        return directory


@dataclass(eq=False)
class PrototypeHead(_FewShotHead):
    """Nearest class prototype by cosine similarity.

    A prototype is the mean of the L2-normalised embeddings of a class's training cases.
    ``predict_proba`` is the softmax over classes of ``cos(x, prototype_c) / temperature``.

    Parameters
    ----------
    temperature : > 0; smaller is more confident (cosines lie in [-1, 1]).
    pool : how the embeddings were pooled (recorded; used by :meth:`predict_proba_bags`).
    """

    temperature: float = 0.1
    pool: Pool = "mean"
    classes_: NDArray[Any] | None = field(default=None, init=False)
    prototypes_: FloatArray | None = field(default=None, init=False)
    kind = "prototype"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}.")
        _check_pool(self.pool)

    def fit(self, x: ArrayLike, y: ArrayLike) -> PrototypeHead:
        """Fit on (N, D) embeddings ``x`` and N labels ``y``; returns ``self``."""
        xm, classes, yi = self._check_fit(x, y)
        unit = _unit_rows(xm)
        self.prototypes_ = np.stack([unit[yi == c].mean(axis=0) for c in range(classes.size)])
        self.classes_ = classes
        return self

    def predict_proba(self, x: ArrayLike) -> FloatArray:
        """(N, C) class probabilities, columns in ``classes_`` order."""
        protos = self.prototypes_
        if protos is None:
            raise self._not_fitted()
        xm = self._check_predict(x, protos.shape[1])
        cos = _unit_rows(xm) @ _unit_rows(protos).T
        return _softmax(cos / self.temperature)

    def _arrays(self) -> dict[str, FloatArray]:
        if self.prototypes_ is None:
            raise self._not_fitted()
        return {"prototypes": self.prototypes_}

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


def _unit_rows(a: FloatArray) -> FloatArray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    # an all-zero embedding has no direction: it stays zero (cosine 0 with every prototype)
    return np.asarray(a / np.where(norm > 0, norm, 1.0), dtype=np.float64)


@dataclass(eq=False)
class LinearProbeHead(_FewShotHead):
    """Class-balanced logistic regression on standardised embeddings (a linear probe).

    Fits :class:`sklearn.preprocessing.StandardScaler` then
    :class:`sklearn.linear_model.LogisticRegression` (``class_weight="balanced"``, L2 penalty
    ``C``, lbfgs; multinomial for more than two classes). The fitted numbers are kept as plain
    arrays, so predictions need no scikit-learn object and survive save/load exactly.
    """

    C: float = 1.0
    max_iter: int = 1000
    pool: Pool = "mean"
    classes_: NDArray[Any] | None = field(default=None, init=False)
    mean_: FloatArray | None = field(default=None, init=False)
    scale_: FloatArray | None = field(default=None, init=False)
    coef_: FloatArray | None = field(default=None, init=False)
    intercept_: FloatArray | None = field(default=None, init=False)
    kind = "linear"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be a positive number, got {self.C}.")
        _check_pool(self.pool)

    def fit(self, x: ArrayLike, y: ArrayLike) -> LinearProbeHead:
        """Fit on (N, D) embeddings ``x`` and N labels ``y``; returns ``self``."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        xm, classes, yi = self._check_fit(x, y)
        scaler = StandardScaler().fit(xm)
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter)
        lr.fit(scaler.transform(xm), yi)
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        self.coef_ = np.asarray(lr.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64)
        self.classes_ = classes
        return self

    def decision_function(self, x: ArrayLike) -> FloatArray:
        """(N, 1) logit of the second class when binary, else (N, C) class scores."""
        mean, scale, coef, icpt = self.mean_, self.scale_, self.coef_, self.intercept_
        if mean is None or scale is None or coef is None or icpt is None:
            raise self._not_fitted()
        z = (self._check_predict(x, mean.size) - mean) / scale
        return np.asarray(z @ coef.T + icpt, dtype=np.float64)

    def predict_proba(self, x: ArrayLike) -> FloatArray:
        """(N, C) class probabilities, columns in ``classes_`` order."""
        s = self.decision_function(x)
        if s.shape[1] == 1:
            from scipy.special import expit

            p1 = expit(s[:, 0])
            return np.column_stack([1.0 - p1, p1])
        return _softmax(s)

    def _arrays(self) -> dict[str, FloatArray]:
        arrays = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_}
        arrays["intercept"] = self.intercept_
        if any(v is None for v in arrays.values()):
            raise self._not_fitted()
        return {k: v for k, v in arrays.items() if v is not None}

    def _params(self) -> dict[str, Any]:
        return {"C": self.C, "max_iter": self.max_iter}


FewShotHead = PrototypeHead | LinearProbeHead


def load_fewshot_head(directory: str | Path) -> FewShotHead:
    """Rebuild a head written by ``head.save(directory)``.

    Raises
    ------
    FileNotFoundError
        If ``model.json`` or ``model.safetensors`` is missing.
    ValueError
        If the files are not a few-shot head, or arrays are missing or mis-shaped.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config_path, weights_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; save the head with head.save(dir).")
    meta = json.loads(config_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(
            f"{config_path}: not an OncoTrace few-shot head (format {_FORMAT!r} expected)."
        )
    if meta.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {meta['format_version']} is newer than this "
            f"OncoTrace reads ({_FORMAT_VERSION}); upgrade OncoTrace."
        )
    arrays = load_file(str(weights_path))
    classes = np.asarray(meta["classes"])
    c = classes.size
    head: FewShotHead
    if meta["kind"] == "prototype":
        head = PrototypeHead(temperature=float(meta["params"]["temperature"]), pool=meta["pool"])
        need = {"prototypes": 2}
    elif meta["kind"] == "linear":
        head = LinearProbeHead(
            C=float(meta["params"]["C"]),
            max_iter=int(meta["params"]["max_iter"]),
            pool=meta["pool"],
        )
        need = {"mean": 1, "scale": 1, "coef": 2, "intercept": 1}
    else:
        raise ValueError(f"{config_path}: unknown head kind {meta['kind']!r}.")
    bad = [k for k, nd in need.items() if k not in arrays or arrays[k].ndim != nd]
    rows = {"prototypes": c, "coef": 1 if c == 2 else c, "intercept": 1 if c == 2 else c}
    bad += [k for k, n in rows.items() if k in need and k not in bad and arrays[k].shape[0] != n]
    if bad:
        raise ValueError(
            f"{weights_path}: arrays {sorted(bad)} are missing or do not fit {c} classes; "
            "were the two files written by different save calls?"
        )
    for k in need:
        setattr(head, f"{k}_", arrays[k].astype(np.float64))
    head.classes_ = classes
    return head


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RepeatSpread:
    """A metric over the repeats of one k.

    Attributes
    ----------
    mean : float
        Mean over repeats.
    low, high : float
        Percentile interval over repeats (2.5 % and 97.5 % for ``level=0.95``): the range in
        which one draw of k labelled patients per class lands, not a CI of the mean (the
        repeats share patients, so they are not independent samples).
    n_repeats : int
    level : float
    """

    mean: float
    low: float
    high: float
    n_repeats: int
    level: float


@dataclass(frozen=True)
class FewShotRepeat:
    """One draw: training and test case indices and the test metrics."""

    k: int
    repeat: int
    train_idx: IntArray
    test_idx: IntArray
    balanced_accuracy: float
    auc: float


@dataclass(frozen=True)
class FewShotReport:
    """Result of :func:`fewshot_evaluate`.

    Attributes
    ----------
    balanced_accuracy, auc : dict k -> RepeatSpread
        AUC is the binary AUC of the second class, or the macro one-vs-rest AUC.
    repeats : list of FewShotRepeat, every draw in (k, repeat) order.
    classes : tuple of str, sorted; ``patients_per_class`` in the same order.
    method, pool : str
    """

    balanced_accuracy: dict[int, RepeatSpread]
    auc: dict[int, RepeatSpread]
    repeats: list[FewShotRepeat]
    classes: tuple[str, ...]
    patients_per_class: tuple[int, ...]
    method: str
    pool: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-k spreads, settings; the draws' indices left out)."""

        def spread(d: dict[int, RepeatSpread]) -> dict[str, Any]:
            return {str(k): vars(v) for k, v in d.items()}

        return {
            "method": self.method,
            "pool": self.pool,
            "classes": list(self.classes),
            "patients_per_class": list(self.patients_per_class),
            "balanced_accuracy": spread(self.balanced_accuracy),
            "auc": spread(self.auc),
        }


def _make_head(method: str, pool: Pool, head_kwargs: Mapping[str, Any]) -> FewShotHead:
    if method == "prototype":
        return PrototypeHead(pool=pool, **head_kwargs)
    if method == "linear":
        return LinearProbeHead(pool=pool, **head_kwargs)
    raise ValueError(f"method must be 'prototype' or 'linear', got {method!r}.")


def _embeddings_of(data: Any, pool: Pool) -> FloatArray:
    if isinstance(data, np.ndarray) and data.dtype != object and data.ndim == 2:
        return _as_matrix(data)
    return case_embeddings(data, pool)


def fewshot_evaluate(
    bags_or_embeddings: Sequence[ArrayLike] | ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    *,
    k_shots: Sequence[int] = (1, 2, 4, 8),
    method: Method = "prototype",
    repeats: int = 20,
    seed: int = 0,
    pool: Pool = "mean",
    head_kwargs: Mapping[str, Any] | None = None,
    level: float = 0.95,
) -> FewShotReport:
    """Few-shot learning curve with patient-level sampling.

    For each k and repeat, k patients per class are drawn without replacement; every case
    (slide) of those patients trains the head, and every case of all other patients tests it.
    No patient is ever on both sides.

    Parameters
    ----------
    bags_or_embeddings : list of N (N_i, D) tile-feature bags, or an (N, D) array of case
        embeddings (then ``pool`` only labels the report).
    labels : (N,) class label per case; one label per patient.
    groups : (N,) patient id per case.
    k_shots : training patients per class to try; every class needs more than max(k_shots)
        patients so that each draw leaves it in the test set.
    method : ``"prototype"`` (:class:`PrototypeHead`) or ``"linear"`` (:class:`LinearProbeHead`).
    repeats : draws per k.
    seed : the draws of (k, repeat) depend only on ``seed``, k and repeat, so adding a k to
        ``k_shots`` does not change the others.
    pool : see :func:`case_embeddings`.
    head_kwargs : passed to the head (``temperature`` or ``C`` / ``max_iter``).
    level : width of the percentile interval over repeats.

    Returns
    -------
    FewShotReport

    Raises
    ------
    ValueError
        On inconsistent inputs, or if a class has k or fewer patients (names the largest
        feasible k).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    ks = [int(k) for k in k_shots]
    if not ks or min(ks) < 1:
        raise ValueError(f"k_shots must be a non-empty list of integers >= 1, got {list(k_shots)}.")
    kwargs = dict(head_kwargs or {})
    _make_head(method, pool, kwargs)  # bad method / settings fail before any work
    y, g = _check_inputs(labels, groups)
    x = _embeddings_of(bags_or_embeddings, pool)
    if x.shape[0] != y.size:
        raise ValueError(
            f"{x.shape[0]} cases of embeddings/bags but {y.size} labels; pass one per case."
        )
    per_patient = _patient_labels(y, g)
    classes = tuple(sorted(set(per_patient.values())))
    if len(classes) < 2:
        raise ValueError(f"all patients have label {classes[0]!r}; few-shot needs two classes.")
    by_class = {c: sorted(p for p, lab in per_patient.items() if lab == c) for c in classes}
    counts = tuple(len(by_class[c]) for c in classes)
    feasible = min(counts) - 1
    too_big = [k for k in ks if k > feasible]
    if too_big:
        smallest = classes[int(np.argmin(counts))]
        fix = (
            f"use k_shots up to {feasible}"
            if feasible >= 1
            else "collect at least two patients of every class"
        )
        raise ValueError(
            f"k={max(too_big)} needs more than k patients in every class (k to train, at least "
            f"one to test), but class {smallest!r} has {min(counts)} "
            f"(patients per class: {dict(zip(classes, counts, strict=True))}); the largest "
            f"feasible k is {feasible}. Fix: {fix}."
        )
    y_index = np.searchsorted(np.asarray(classes, dtype=object), y).astype(np.int64)
    draws: list[FewShotRepeat] = []
    for k in ks:
        for r in range(int(repeats)):
            rng = np.random.default_rng([int(seed), k, r])
            chosen: set[str] = set()
            for c in classes:
                chosen.update(rng.choice(by_class[c], size=k, replace=False).tolist())
            in_train = np.fromiter((p in chosen for p in g), dtype=bool, count=g.size)
            tr, te = np.flatnonzero(in_train), np.flatnonzero(~in_train)
            head = _make_head(method, pool, kwargs).fit(x[tr], y_index[tr])
            p = head.predict_proba(x[te])
            point = _metrics._multiclass_point(y_index[te], p, ())
            auc = (
                _metrics._auc_fast(y_index[te], p[:, 1])
                if len(classes) == 2
                else point["auc_macro"]
            )
            draws.append(
                FewShotRepeat(
                    k, r, tr.astype(np.int64), te.astype(np.int64), point["balanced_accuracy"], auc
                )
            )

    def spread(values: list[float]) -> RepeatSpread:
        lo, hi = np.quantile(values, [0.5 - level / 2.0, 0.5 + level / 2.0])
        return RepeatSpread(float(np.mean(values)), float(lo), float(hi), len(values), level)

    return FewShotReport(
        balanced_accuracy={k: spread([d.balanced_accuracy for d in draws if d.k == k]) for k in ks},
        auc={k: spread([d.auc for d in draws if d.k == k]) for k in ks},
        repeats=draws,
        classes=classes,
        patients_per_class=counts,
        method=method,
        pool=pool,
    )
