"""Out-of-domain checks: how far a new case lies from the cases a model was trained on.

A case is summarised by the mean of its tile embeddings (the encoder's space, so the check does
not depend on the head). The training summaries are standardised per dimension and reduced to
their leading principal components (scikit-learn PCA; one component per five training cases,
at most :data:`MAX_COMPONENTS`), because a full covariance cannot be estimated from a few dozen
cases in hundreds of dimensions. A new case's ``ood_distance`` is ``sqrt(T² + Q / Q̄)``: its
Mahalanobis distance to the training mean within those components (Hotelling's T²) plus what
they cannot represent (the squared reconstruction error Q, over its training mean Q̄), the
pair multivariate process monitoring uses. A slide of another stain, scanner or organ moves
along the training variation (T²), away from it (Q), or both.

The threshold is calibrated on the training cases themselves without reusing a case to judge
itself: the estimate is refitted ``folds`` times, each time leaving a fold out, and every case
gets the distance of the fit that did not see it. Folds follow patients when ``groups`` are
given, so a slide is never judged by statistics that saw its sibling slides. The threshold is the ``quantile`` of those
held-out distances with the finite-sample (conformal) correction — the ``ceil((n + 1) q)``-th
smallest — capped at the largest when ``n`` is too small for that rank. So about ``1 - q`` of
new cases like the training ones (and no more) are flagged.

The statistics live in ``ood.safetensors`` beside ``model.json``; the card's ``ood`` section
records the file, its sha256, the threshold and how it was fitted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["OOD_FILE", "OODResult", "OODStats", "case_summary"]

#: The statistics' file beside ``model.json``.
OOD_FILE = "ood.safetensors"
#: Fewest training cases a threshold is calibrated from.
MIN_CASES = 5
_METHOD = "pca-t2-q"
_SUMMARY = "mean tile embedding"

FloatArray = NDArray[np.float64]


def case_summary(bag: ArrayLike) -> FloatArray:
    """The case's point in the check's space: the mean of its (N, D) tile embeddings."""
    a = np.asarray(bag, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"a bag of (N, D) tile embeddings with N > 0 is needed, got {a.shape}.")
    return np.asarray(a.mean(axis=0), dtype=np.float64)


@dataclass(frozen=True)
class OODResult:
    """One case's check: its distance, the model's threshold and whether it lies beyond."""

    distance: float
    threshold: float

    @property
    def flagged(self) -> bool:
        return bool(self.distance > self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"distance": self.distance, "threshold": self.threshold, "flagged": self.flagged}


#: Most principal components the check keeps.
MAX_COMPONENTS = 20


def n_components(n_cases: int, dim: int) -> int:
    """Components kept for ``n_cases`` training cases: one per five cases, at most
    :data:`MAX_COMPONENTS` and below both ``n_cases`` and ``dim``."""
    return max(1, min(MAX_COMPONENTS, n_cases // 5, n_cases - 1, dim))


def _fit_arrays(x: FloatArray, k: int) -> dict[str, FloatArray]:
    from sklearn.decomposition import PCA

    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12 * max(float(scale.max(initial=0.0)), 1.0), scale, 1.0)
    z = (x - center) / scale
    pca = PCA(n_components=min(k, len(z) - 1, z.shape[1])).fit(z)
    variances = np.maximum(np.asarray(pca.explained_variance_, np.float64), 1e-12)
    resid = z - pca.inverse_transform(pca.transform(z))
    resid_ms = float(np.mean(np.sum(resid**2, axis=1)))
    return {
        "center": center,
        "scale": scale,
        "components": np.asarray(pca.components_, np.float64),
        "variances": variances,
        "residual": np.asarray([max(resid_ms, 1e-12)], np.float64),
    }


def _distances(arrays: Mapping[str, FloatArray], x: FloatArray) -> FloatArray:
    """sqrt(T² + Q / Q̄): Mahalanobis in the principal subspace plus normalised residual."""
    z = (x - arrays["center"]) / arrays["scale"]
    w = z @ arrays["components"].T  # z is centred: PCA's mean of standardised data is 0
    t2 = np.sum(w**2 / arrays["variances"], axis=1)
    resid = z - w @ arrays["components"]
    q = np.sum(resid**2, axis=1) / float(arrays["residual"][0])
    return np.sqrt(t2 + q)


@dataclass(frozen=True, eq=False)
class OODStats:
    """Training statistics of the out-of-domain check (see the module notes).

    Attributes
    ----------
    center, scale : (D,) per-dimension mean and standard deviation of the training summaries.
    components : (K, D) principal axes of the standardised summaries; variances : (K,) theirs.
    residual : (1,) mean squared reconstruction error of the training summaries (Q̄).
    threshold : distances above it are flagged.
    quantile : the held-out quantile the threshold was set at.
    heldout : (n,) held-out distances of the training cases (what the threshold came from).
    folds : refits used for the held-out distances.
    """

    center: FloatArray
    scale: FloatArray
    components: FloatArray
    variances: FloatArray
    residual: FloatArray
    threshold: float
    quantile: float
    heldout: FloatArray
    folds: int

    @property
    def dim(self) -> int:
        return int(self.center.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.heldout.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OODStats):
            return NotImplemented
        return (
            self.threshold == other.threshold
            and self.quantile == other.quantile
            and self.folds == other.folds
            and all(
                np.array_equal(getattr(self, k), getattr(other, k))
                for k in ("center", "scale", "components", "variances", "residual", "heldout")
            )
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def fit(
        cls,
        bags: Sequence[ArrayLike],
        *,
        quantile: float = 0.99,
        folds: int = 5,
        seed: int = 0,
        groups: Sequence[Any] | None = None,
    ) -> OODStats:
        """Fit on the training ``bags`` (each (N_i, D)) and calibrate the threshold.

        ``groups`` (one patient id per bag) keeps a patient's slides in one fold.

        Raises
        ------
        ValueError
            With fewer than :data:`MIN_CASES` bags, bags of different dims, non-finite values
            or ``quantile`` outside (0, 1).
        """
        from sklearn.model_selection import GroupKFold, KFold

        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}.")
        if len(bags) < MIN_CASES:
            raise ValueError(
                f"{len(bags)} training case(s): an out-of-domain threshold needs at least"
                f" {MIN_CASES}."
            )
        dims = {np.shape(b)[-1] for b in bags}
        if len(dims) != 1:
            raise ValueError(f"the bags have different embedding dims {sorted(dims)}.")
        x = np.stack([case_summary(b) for b in bags])
        if not np.isfinite(x).all():
            raise ValueError("NaN/inf in the training embeddings.")
        n = len(x)
        if groups is not None and len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} bags.")
        n_groups = n if groups is None else len(set(groups))
        k = max(2, min(int(folds), n_groups))
        if groups is None:
            splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(x)
        else:
            gkf = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
            splits = gkf.split(x, groups=np.asarray(groups))
        n_comp = n_components(n, x.shape[1])
        heldout = np.empty(n, np.float64)
        for train, test in splits:
            # the refits keep the final fit's K: T² grows with K, so all must share it
            heldout[test] = _distances(_fit_arrays(x[train], n_comp), x[test])
        rank = math.ceil((n + 1) * quantile)  # 1-based rank of the conformal quantile
        threshold = float(np.sort(heldout)[min(rank, n) - 1])
        return cls(
            **_fit_arrays(x, n_comp),
            threshold=threshold,
            quantile=float(quantile),
            heldout=heldout,
            folds=k,
        )

    def distance(self, bags: Sequence[ArrayLike]) -> FloatArray:
        """(len(bags),) Mahalanobis distances of the bags' summaries to the training mean."""
        x = np.stack([case_summary(b) for b in bags])
        if x.shape[1] != self.dim:
            raise ValueError(
                f"the bags have {x.shape[1]}-dim embeddings; the statistics are {self.dim}-dim"
                " (another encoder's features?)."
            )
        return _distances(self._arrays(), x)

    def check(self, bag: ArrayLike) -> OODResult:
        """One case's :class:`OODResult`."""
        return OODResult(float(self.distance([bag])[0]), self.threshold)

    def _arrays(self) -> dict[str, FloatArray]:
        return {
            "center": self.center,
            "scale": self.scale,
            "components": self.components,
            "variances": self.variances,
            "residual": self.residual,
            "heldout": self.heldout,
        }

    # ------------------------------------------------------------------------------ files

    def to_bytes(self) -> bytes:
        """The arrays as safetensors bytes (what :meth:`write` writes; deterministic)."""
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in self._arrays().items()})

    def write(self, directory: str | Path) -> Path:
        """Write :data:`OOD_FILE` into ``directory`` atomically; returns its path."""
        path = Path(directory) / OOD_FILE
        tmp = path.with_name(f".{OOD_FILE}.tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    def record(self) -> dict[str, Any]:
        """The card's ``ood`` section: the file, its sha256, the threshold and its fit."""
        return {
            "file": OOD_FILE,
            "sha256": hashlib.sha256(self.to_bytes()).hexdigest(),
            "method": _METHOD,
            "summary": _SUMMARY,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "folds": self.folds,
            "n_train": self.n_train,
            "dim": self.dim,
        }

    @classmethod
    def read(cls, directory: str | Path, record: Mapping[str, Any]) -> OODStats:
        """Read the statistics a card's ``ood`` ``record`` names from ``directory``.

        Raises
        ------
        ModelFileError
            If the file is missing, is not the one the record names (sha256), or is malformed
            (not safetensors, missing arrays, inconsistent shapes, NaN/inf, a record field of
            the wrong type); the message says how to restore or drop it.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from ._state import ModelFileError

        path = Path(directory) / str(record.get("file", OOD_FILE))
        fix = (
            "restore it from the `oncotrace train` run that wrote model.json (copy the model"
            " folder again), or delete the 'ood' section of model.json to use the model"
            " without out-of-domain checks."
        )
        if not path.is_file():
            raise ModelFileError(path, "missing; model.json names it for the ood check", fix)
        if record.get("sha256") and _sha256(path) != record["sha256"]:
            raise ModelFileError(path, "not the file model.json names (sha256 differs)", fix)
        try:
            a = load_file(str(path))
            numbers = {k: record[k] for k in ("threshold", "quantile", "folds")}
            if not all(_is_number(v) for v in numbers.values()):
                raise TypeError(f"model.json's ood record has non-numbers {numbers}")
            stats = cls(
                center=a["center"],
                scale=a["scale"],
                components=a["components"],
                variances=a["variances"],
                residual=a["residual"],
                threshold=float(numbers["threshold"]),
                quantile=float(numbers["quantile"]),
                heldout=a["heldout"],
                folds=int(numbers["folds"]),
            )
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as exc:
            raise ModelFileError(path, f"malformed ({exc})", fix) from exc
        d = stats.dim
        k = stats.variances.shape[0]
        if stats.components.shape != (k, d) or stats.scale.shape != (d,):
            raise ModelFileError(path, "arrays of inconsistent shapes", fix)
        arrays = stats._arrays().values()
        if not (math.isfinite(stats.threshold) and all(np.isfinite(v).all() for v in arrays)):
            raise ModelFileError(path, "NaN/inf in the statistics or threshold", fix)
        return stats


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_ood_safely(
    bags: Sequence[Any], groups: Sequence[Any] | None = None, notes: list[str] | None = None
) -> OODStats | None:
    """:meth:`OODStats.fit` for a training cohort, or None (with a note) when it cannot be fitted:
    multi-modal cases, or too few cases."""
    if any(not isinstance(b, np.ndarray) for b in bags):
        if notes is not None:
            notes.append("no out-of-domain statistics: the cases are multi-modal.")
        return None
    try:
        return OODStats.fit(bags, groups=groups)
    except ValueError as exc:
        if notes is not None:
            notes.append(f"no out-of-domain statistics: {exc}")
        return None
