"""Transforms between named 2-D coordinate systems.

Coordinate systems (names used in ``source`` / ``target``):

* ``"slide_px"`` — level-0 slide pixels ``(x, y)``;
* ``"slide_um"`` — micrometres on the slide, ``µm = px * mpp``;
* ``"us_px"`` — ultrasound image pixels ``(x, y)``;
* ``"us_mm"`` — millimetres in the ultrasound image plane, ``mm = px * spacing_mm``.

Pixel convention: a pixel coordinate is continuous; the integer value ``i`` is the *centre* of
pixel ``i``. Conversions to physical units are a pure scale with no half-pixel offset, so the
same number means the same physical place in both systems.

Every transform maps an ``(N, 2)`` array of ``(x, y)`` points (or a single ``(2,)`` point) to
float64 points of the same shape, knows its :meth:`Transform.jacobian`, its
:meth:`Transform.inverse`, and serialises to a JSON-safe dict (:func:`transform_from_dict`
reads it back).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import scipy
from numpy.typing import ArrayLike, NDArray
from scipy.interpolate import RBFInterpolator

SLIDE_PX = "slide_px"
SLIDE_UM = "slide_um"
US_PX = "us_px"
US_MM = "us_mm"
COORDINATE_SYSTEMS = (SLIDE_PX, SLIDE_UM, US_PX, US_MM)

# Rows of the (M, N) kernel block evaluated at once: small enough to stay in cache, large
# enough that the Python loop is negligible (measured fastest around 8k on 2 cores).
_CHUNK = 8192
_TINY = 1e-300
_NEWTON_MAX_STEPS = 30


def _as_points(points: ArrayLike, name: str = "points") -> tuple[NDArray[np.float64], bool]:
    """``(N, 2)`` float64 view of ``points`` and whether a single ``(2,)`` point was given."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.shape == (2,):
        return arr.reshape(1, 2), True
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"{name} must be an (N, 2) array of (x, y) points or one (2,) point, got shape {arr.shape}."
        )
    return arr, False


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{what} must be a non-empty coordinate-system name such as {COORDINATE_SYSTEMS}, got {value!r}."
        )
    return value


def _positive_pair(
    value: float | tuple[float, float] | ArrayLike, name: str
) -> NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be one positive number or an (x, y) pair, got {value!r}.")
    return arr


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Transform(ABC):
    """A map from coordinate system ``source`` to ``target`` (abstract).

    Subclasses implement ``_apply`` and ``_jacobian`` on ``(N, 2)`` float64 arrays.
    """

    source: str
    target: str

    def __call__(self, points: ArrayLike) -> NDArray[np.float64]:
        """Map points.

        Parameters
        ----------
        points : (N, 2) or (2,) array_like of ``(x, y)`` in ``source``.

        Returns
        -------
        (N, 2) or (2,) float64 ndarray of ``(x, y)`` in ``target``.
        """
        pts, single = _as_points(points)
        out = self._apply(pts)
        return out[0] if single else out

    def jacobian(self, points: ArrayLike) -> NDArray[np.float64]:
        """Derivative at points: ``J[n, i, j] = d out_i / d in_j``.

        Returns
        -------
        (N, 2, 2) float64 ndarray, or (2, 2) for a single (2,) point.
        """
        pts, single = _as_points(points)
        jac = self._jacobian(pts)
        return jac[0] if single else jac

    def then(self, other: Transform) -> Sequence:
        """``self`` followed by ``other`` as a :class:`Sequence`."""
        return Sequence([self, other])

    @abstractmethod
    def _apply(self, pts: NDArray[np.float64]) -> NDArray[np.float64]: ...

    @abstractmethod
    def _jacobian(self, pts: NDArray[np.float64]) -> NDArray[np.float64]: ...

    @abstractmethod
    def inverse(self) -> Transform:
        """The transform from ``target`` back to ``source``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description with ``type``, ``source`` and ``target``."""


# --------------------------------------------------------------------------------------------
# Affine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Affine(Transform):
    """``out = A @ (x, y, 1)`` with a (3, 3) homogeneous matrix whose last row is (0, 0, 1).

    Attributes
    ----------
    matrix : (3, 3) float64 ndarray (read-only copy).
    source, target : coordinate-system names.
    """

    matrix: NDArray[np.float64]
    source: str
    target: str

    def __post_init__(self) -> None:
        m = np.array(self.matrix, dtype=np.float64)
        if m.shape == (2, 3):
            m = np.vstack([m, [0.0, 0.0, 1.0]])
        if m.shape != (3, 3) or not np.all(np.isfinite(m)):
            raise ValueError(
                f"Affine matrix must be a finite (3, 3) (or (2, 3)) array, got shape {m.shape}."
            )
        if not np.array_equal(m[2], [0.0, 0.0, 1.0]):
            raise ValueError(
                f"Affine matrix last row must be (0, 0, 1), got {m[2].tolist()}; "
                "projective transforms are not supported."
            )
        m.flags.writeable = False
        object.__setattr__(self, "matrix", m)
        _check_name(self.source, "source")
        _check_name(self.target, "target")

    @property
    def linear(self) -> NDArray[np.float64]:
        """(2, 2) linear part."""
        return self.matrix[:2, :2]

    @property
    def translation(self) -> NDArray[np.float64]:
        """(2,) translation."""
        return self.matrix[:2, 2]

    @classmethod
    def identity(cls, name: str) -> Affine:
        """The identity on coordinate system ``name``."""
        return cls(np.eye(3), name, name)

    @classmethod
    def scale(cls, sx: float, sy: float, source: str, target: str) -> Affine:
        """``(x, y) -> (sx * x, sy * y)``."""
        if not (math.isfinite(sx) and math.isfinite(sy)) or sx == 0 or sy == 0:
            raise ValueError(f"Affine.scale needs finite non-zero factors, got ({sx}, {sy}).")
        return cls(np.diag([sx, sy, 1.0]), source, target)

    @classmethod
    def fit(cls, src: ArrayLike, dst: ArrayLike, *, source: str, target: str) -> Affine:
        """Least-squares affine with ``dst ≈ A(src)``.

        Parameters
        ----------
        src, dst : (N, 2) array_like, N >= 3, ``src`` not collinear.
        """
        s, _ = _as_points(src, "src")
        d, _ = _as_points(dst, "dst")
        if len(s) != len(d):
            raise ValueError(f"src and dst differ in length: {len(s)} vs {len(d)} points.")
        design = np.hstack([s, np.ones((len(s), 1))])
        coef, _, rank, _ = np.linalg.lstsq(design, d, rcond=None)
        if rank < 3:
            raise ValueError(
                f"an affine fit needs at least 3 non-collinear points, got {len(s)} of rank {rank}."
            )
        m = np.eye(3)
        m[:2, :] = coef.T
        return cls(m, source, target)

    def _apply(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        return pts @ self.linear.T + self.translation

    def _jacobian(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.broadcast_to(self.linear, (len(pts), 2, 2)).copy()

    def inverse(self) -> Affine:
        det = float(np.linalg.det(self.linear))
        norm = float(np.linalg.norm(self.linear, 2))
        if norm == 0 or abs(det) <= 1e-12 * norm * norm:
            raise ValueError(
                f"affine {self.source} -> {self.target} is singular (det {det:.3g}); it has no inverse."
            )
        return Affine(
            np.asarray(np.linalg.inv(self.matrix), dtype=np.float64), self.target, self.source
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "affine",
            "source": self.source,
            "target": self.target,
            "matrix": self.matrix.tolist(),
        }


def slide_px_to_um_transform(mpp: float | tuple[float, float]) -> Affine:
    """``"slide_px"`` -> ``"slide_um"`` for ``mpp`` µm per level-0 pixel (one value or (x, y))."""
    m = _positive_pair(mpp, "mpp")
    return Affine.scale(float(m[0]), float(m[1]), SLIDE_PX, SLIDE_UM)


def us_px_to_mm_transform(spacing_mm: float | tuple[float, float]) -> Affine:
    """``"us_px"`` -> ``"us_mm"`` for ``spacing_mm`` mm per ultrasound pixel (one value or (x, y))."""
    s = _positive_pair(spacing_mm, "spacing_mm")
    return Affine.scale(float(s[0]), float(s[1]), US_PX, US_MM)


def slide_px_to_um(points: ArrayLike, mpp: float | tuple[float, float]) -> NDArray[np.float64]:
    """(N, 2) level-0 pixel points -> micrometres (``µm = px * mpp``)."""
    return slide_px_to_um_transform(mpp)(points)


def us_px_to_mm(points: ArrayLike, spacing_mm: float | tuple[float, float]) -> NDArray[np.float64]:
    """(N, 2) ultrasound pixel points -> millimetres (``mm = px * spacing_mm``)."""
    return us_px_to_mm_transform(spacing_mm)(points)


# --------------------------------------------------------------------------------------------
# Thin-plate spline
# --------------------------------------------------------------------------------------------


def _tps_coefficients(
    interp: RBFInterpolator, n: int, centre: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Kernel weights (N, 2), linear part (2, 2) and offset (2,) of a fitted RBFInterpolator.

    scipy evaluates the degree-1 polynomial on ``(x - shift) / scale``; rewritten here for
    coordinates ``x - centre`` so that :func:`_tps_eval` can evaluate values and analytic
    Jacobians in one vectorised pass (scipy's ``__call__`` is ~5x slower and has no derivative).
    The caller checks the result against ``interp`` itself.
    """
    try:
        coeffs = np.asarray(interp._coeffs, dtype=np.float64)
        shift = np.asarray(interp._shift, dtype=np.float64)
        scale = np.asarray(interp._scale, dtype=np.float64)
        powers = np.asarray(interp.powers)
    except AttributeError as exc:  # pragma: no cover - depends on the scipy release
        raise RuntimeError(
            f"scipy {scipy.__version__} changed RBFInterpolator's fitted attributes; "
            "ThinPlateSpline needs updating for it (tested with scipy 1.17)."
        ) from exc
    weights = coeffs[:n]
    linear_t = np.zeros((2, 2))  # out_k += x_j * linear_t[j, k]
    offset = np.zeros(2)
    for row, power in zip(coeffs[n:], powers, strict=True):
        if power.sum() == 0:
            offset += row
        elif power.sum() == 1:
            j = int(np.argmax(power))
            linear_t[j] += row / scale[j]
            offset -= row * shift[j] / scale[j]
        else:  # pragma: no cover - degree is fixed at 1
            raise RuntimeError(f"unexpected polynomial power {power.tolist()} in the spline.")
    offset = offset + centre @ linear_t
    return weights, linear_t, offset


def _tps_eval(
    x: NDArray[np.float64],
    centres: NDArray[np.float64],
    weights: NDArray[np.float64],
    linear_t: NDArray[np.float64],
    offset: NDArray[np.float64],
    *,
    with_jacobian: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
    """Values (M, 2) and optionally Jacobians (M, 2, 2) of ``sum_i w_i r_i^2 log r_i + affine``.

    ``x`` and ``centres`` are in the same centred coordinates. With ``L = log r^2``,
    ``r^2 log r = r^2 L / 2`` and its gradient is ``(x - c) (L + 1)``; the Jacobian is assembled
    from matrix products so no (M, N, 2) array is formed.
    """
    m = len(x)
    out = np.empty((m, 2))
    jac = np.empty((m, 2, 2)) if with_jacobian else None
    c_sq = np.einsum("ij,ij->i", centres, centres)
    minus_2c = -2.0 * centres.T
    half_w = 0.5 * weights
    cw = [centres[:, j : j + 1] * weights for j in range(2)]  # (N, 2) each
    for start in range(0, m, _CHUNK):
        stop = start + _CHUNK
        xs = x[start:stop]
        r2 = xs @ minus_2c
        r2 += np.einsum("ij,ij->i", xs, xs)[:, None]
        r2 += c_sq
        # Flooring r^2 at a tiny positive number keeps log finite at a centre, where both the
        # kernel (r^2 L) and its gradient ((x - c)(L + 1)) still come out as 0.
        np.maximum(r2, _TINY, out=r2)
        log_r2 = np.log(r2)
        if jac is not None:
            log_r2 += 1.0
            gw = log_r2 @ weights  # (M, 2) over outputs k
            for j in range(2):
                # d out_k / d x_j = x_j * sum_i g_i w_ik - sum_i g_i c_ij w_ik + linear_t[j, k]
                jac[start:stop, :, j] = xs[:, j : j + 1] * gw - log_r2 @ cw[j] + linear_t[j]
            log_r2 -= 1.0
        log_r2 *= r2
        out[start:stop] = log_r2 @ half_w + xs @ linear_t + offset
    return out, jac


@dataclass(frozen=True, eq=False)
class ThinPlateSpline(Transform):
    """Regularised thin-plate spline ``src -> dst`` (scipy ``RBFInterpolator``).

    Fitted with ``RBFInterpolator(src, dst, kernel="thin_plate_spline", degree=1,
    smoothing=smoothing)``: ``smoothing=0`` interpolates the landmarks exactly, large values
    approach the least-squares affine. Evaluation and the analytic Jacobian use the fitted
    coefficients in a vectorised form (500k points in ~0.15 s for 30 landmarks).

    Attributes
    ----------
    src, dst : (N, 2) float64 ndarrays, N >= 3 not collinear; landmarks in ``source`` / ``target``.
    smoothing : float >= 0, in scipy's units (added to the kernel matrix diagonal; kernel values
        scale with the square of the landmark spread).
    source, target : coordinate-system names.
    """

    src: NDArray[np.float64]
    dst: NDArray[np.float64]
    smoothing: float
    source: str
    target: str
    _centre: NDArray[np.float64] = field(init=False, repr=False)
    _centres: NDArray[np.float64] = field(init=False, repr=False)
    _weights: NDArray[np.float64] = field(init=False, repr=False)
    _linear_t: NDArray[np.float64] = field(init=False, repr=False)
    _offset: NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.source, "source")
        _check_name(self.target, "target")
        src, _ = _as_points(self.src, "src")
        dst, _ = _as_points(self.dst, "dst")
        if len(src) != len(dst):
            raise ValueError(f"src and dst differ in length: {len(src)} vs {len(dst)} landmarks.")
        if len(src) < 3:
            raise ValueError(f"a thin-plate spline needs at least 3 landmarks, got {len(src)}.")
        if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
            raise ValueError("thin-plate spline landmarks contain NaN or inf.")
        smoothing = float(self.smoothing)
        if not math.isfinite(smoothing) or smoothing < 0:
            raise ValueError(f"smoothing must be a finite number >= 0, got {self.smoothing!r}.")
        src = src.copy()
        dst = dst.copy()
        src.flags.writeable = False
        dst.flags.writeable = False
        try:
            interp = RBFInterpolator(
                src, dst, kernel="thin_plate_spline", degree=1, smoothing=smoothing
            )
        except (ValueError, np.linalg.LinAlgError) as exc:
            raise ValueError(
                f"cannot fit a thin-plate spline to {len(src)} landmarks (smoothing {smoothing}): "
                f"{exc}. Landmarks must not be collinear or repeated."
            ) from exc
        centre = src.mean(axis=0)
        weights, linear_t, offset = _tps_coefficients(interp, len(src), centre)
        centres = src - centre
        mine, _ = _tps_eval(centres, centres, weights, linear_t, offset, with_jacobian=False)
        spread = float(np.ptp(dst, axis=0).max()) + float(np.abs(dst).max())
        if not np.allclose(mine, interp(src), rtol=0.0, atol=1e-8 * max(spread, 1e-300)):
            raise RuntimeError(  # pragma: no cover - guards against scipy internals changing
                f"ThinPlateSpline's evaluation disagrees with scipy {scipy.__version__}'s "
                "RBFInterpolator; the coefficient layout changed (tested with scipy 1.17)."
            )
        for name, value in (
            ("src", src),
            ("dst", dst),
            ("smoothing", smoothing),
            ("_centre", centre),
            ("_centres", centres),
            ("_weights", weights),
            ("_linear_t", linear_t),
            ("_offset", offset),
        ):
            object.__setattr__(self, name, value)

    def _eval(
        self, pts: NDArray[np.float64], *, with_jacobian: bool
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        return _tps_eval(
            pts - self._centre,
            self._centres,
            self._weights,
            self._linear_t,
            self._offset,
            with_jacobian=with_jacobian,
        )

    def _apply(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._eval(pts, with_jacobian=False)[0]

    def _jacobian(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        jac = self._eval(pts, with_jacobian=True)[1]
        assert jac is not None  # internal: requested above
        return jac

    def inverse(self) -> InverseThinPlateSpline:
        return InverseThinPlateSpline(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "thin_plate_spline",
            "source": self.source,
            "target": self.target,
            "smoothing": self.smoothing,
            "src": self.src.tolist(),
            "dst": self.dst.tolist(),
        }


def _solve_2x2(jac: NDArray[np.float64], rhs: NDArray[np.float64]) -> NDArray[np.float64]:
    """Solve ``jac[n] @ x[n] = rhs[n]`` for (M, 2, 2) and (M, 2); NaN where singular."""
    a, b = jac[:, 0, 0], jac[:, 0, 1]
    c, d = jac[:, 1, 0], jac[:, 1, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        det = a * d - b * c
        x0 = (d * rhs[:, 0] - b * rhs[:, 1]) / det
        x1 = (a * rhs[:, 1] - c * rhs[:, 0]) / det
    return np.stack([x0, x1], axis=1)


@dataclass(frozen=True, eq=False)
class InverseThinPlateSpline(Transform):
    """Numerical inverse of a :class:`ThinPlateSpline`.

    A spline fitted the other way (``forward(src) -> src``, no smoothing) gives the starting
    point; Newton steps with the forward spline's analytic Jacobian then solve
    ``forward(x) = y`` to ~1e-9 of the landmark spread. Points where Newton does not converge
    (far outside the landmarks, where a spline may fold or have no preimage) are NaN.

    Attributes
    ----------
    forward : the spline being inverted; ``source``/``target`` are its target/source.
    """

    forward: ThinPlateSpline
    source: str = field(init=False)
    target: str = field(init=False)
    _guess: ThinPlateSpline = field(init=False, repr=False)
    _tol: float = field(init=False, repr=False)
    _accept: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = self.forward
        object.__setattr__(self, "source", f.target)
        object.__setattr__(self, "target", f.source)
        mapped = f(f.src)
        try:
            guess = ThinPlateSpline(mapped, f.src, 0.0, f.target, f.source)
        except ValueError:
            # A strong smoothing can squeeze the mapped landmarks onto a line; the affine part
            # of the forward spline is then the better start.
            guess = ThinPlateSpline(mapped, f.src, 1e12 * _spread(mapped) ** 2, f.target, f.source)
        object.__setattr__(self, "_guess", guess)
        spread = max(_spread(mapped), 1e-300)
        object.__setattr__(self, "_tol", 1e-12 * spread)
        object.__setattr__(self, "_accept", 1e-5 * spread)

    def _apply(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        x = self._guess(pts)
        converged = np.zeros(len(pts), dtype=bool)
        active = np.all(np.isfinite(pts), axis=1)
        for _ in range(_NEWTON_MAX_STEPS):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            everything = idx.size == len(pts)  # skip the gathers on the first, full pass
            xa = x if everything else x[idx]
            value, jac = self.forward._eval(xa, with_jacobian=True)
            assert jac is not None  # internal: requested above
            residual = value - (pts if everything else pts[idx])
            size = np.sqrt(np.einsum("ij,ij->i", residual, residual))
            done = size <= self._tol
            step = _solve_2x2(jac, residual)
            step[done] = 0.0
            xa = xa - step
            x[idx] = xa
            # Newton converges quadratically (measured: next residual <~ residual**2 / spread):
            # below 1e-5 of the spread, the step just taken leaves <~1e-10, so those points
            # need no further (costly) evaluation.
            done |= size <= self._accept
            finite = np.all(np.isfinite(xa), axis=1)  # singular Jacobian: give up there
            converged[idx[done & finite]] = True
            active[idx[done | ~finite]] = False
        x[~converged] = np.nan
        return x

    def _jacobian(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        jac = self.forward.jacobian(self._apply(pts))
        return np.asarray(np.linalg.inv(jac), dtype=np.float64)

    def inverse(self) -> ThinPlateSpline:
        return self.forward

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "inverse_thin_plate_spline",
            "source": self.source,
            "target": self.target,
            "forward": self.forward.to_dict(),
        }


def _spread(points: NDArray[np.float64]) -> float:
    return float(np.ptp(points, axis=0).max())


# --------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, init=False)
class Sequence(Transform):
    """Transforms applied left to right; each one's ``target`` must be the next one's ``source``.

    Attributes
    ----------
    transforms : tuple of Transform (nested sequences are flattened).
    source, target : first ``source`` and last ``target``.
    """

    transforms: tuple[Transform, ...]
    source: str
    target: str

    def __init__(self, transforms: list[Transform] | tuple[Transform, ...]) -> None:
        flat: list[Transform] = []
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Sequence takes Transform objects, got {type(t).__name__}.")
            flat.extend(t.transforms if isinstance(t, Sequence) else [t])
        if not flat:
            raise ValueError("Sequence needs at least one transform.")
        for a, b in pairwise(flat):
            if a.target != b.source:
                raise ValueError(
                    f"cannot chain {a.source} -> {a.target} with {b.source} -> {b.target}: "
                    f"{a.target!r} != {b.source!r}; insert the missing conversion between them."
                )
        object.__setattr__(self, "transforms", tuple(flat))
        object.__setattr__(self, "source", flat[0].source)
        object.__setattr__(self, "target", flat[-1].target)

    def _apply(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        for t in self.transforms:
            pts = t._apply(pts)
        return pts

    def _jacobian(self, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        jac = np.broadcast_to(np.eye(2), (len(pts), 2, 2)).copy()
        for t in self.transforms:
            jac = t._jacobian(pts) @ jac
            pts = t._apply(pts)
        return jac

    def inverse(self) -> Sequence:
        return Sequence([t.inverse() for t in reversed(self.transforms)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "sequence",
            "source": self.source,
            "target": self.target,
            "transforms": [t.to_dict() for t in self.transforms],
        }


def transform_from_dict(d: dict[str, Any]) -> Transform:
    """Rebuild a transform written by :meth:`Transform.to_dict`."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a transform description must be a dict with a 'type', got {d!r:.200}.")
    kind = d["type"]
    try:
        if kind == "affine":
            t: Transform = Affine(
                np.asarray(d["matrix"], dtype=np.float64), d["source"], d["target"]
            )
        elif kind == "thin_plate_spline":
            t = ThinPlateSpline(
                np.asarray(d["src"], dtype=np.float64),
                np.asarray(d["dst"], dtype=np.float64),
                float(d["smoothing"]),
                d["source"],
                d["target"],
            )
        elif kind == "inverse_thin_plate_spline":
            forward = transform_from_dict(d["forward"])
            if not isinstance(forward, ThinPlateSpline):
                raise ValueError("'forward' of an inverse_thin_plate_spline must be a spline.")
            t = forward.inverse()
        elif kind == "sequence":
            t = Sequence([transform_from_dict(x) for x in d["transforms"]])
        else:
            raise ValueError(
                f"unknown transform type {kind!r}; expected affine, thin_plate_spline, "
                "inverse_thin_plate_spline or sequence."
            )
    except KeyError as exc:
        raise ValueError(f"transform of type {kind!r} is missing the field {exc}.") from exc
    if (d.get("source", t.source), d.get("target", t.target)) != (t.source, t.target):
        raise ValueError(
            f"transform description says {d.get('source')} -> {d.get('target')} but its parts "
            f"give {t.source} -> {t.target}."
        )
    return t
