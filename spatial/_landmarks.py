"""Landmark pairs between a slide and an ultrasound image, and the registration fitted to them.

Files
-----
``landmarks.json``::

    {"points": [
        {"id": "p1", "pathology_px": [x, y], "ultrasound_px": [x, y], "role": "fit"},
        {"id": "p2", "pathology_um": [x, y], "ultrasound_mm": [x, y], "role": "holdout"}
    ]}

Each point gives its slide position as ``pathology_px`` (level-0 pixels, needs the slide mpp)
or ``pathology_um``, its ultrasound position as ``ultrasound_px`` (needs the ultrasound
spacing) or ``ultrasound_mm``, and an optional ``role``: ``"fit"`` (default) or ``"holdout"``
(kept out of the fit; measures an independent target registration error). If a point gives
both px and µm (or mm) they must agree to within one pixel.

``landmarks.csv`` — the same fields, one point per row, this header (columns may be left out
or left empty per row; unknown columns are an error)::

    id,pathology_px_x,pathology_px_y,pathology_um_x,pathology_um_y,ultrasound_px_x,ultrasound_px_y,ultrasound_mm_x,ultrasound_mm_y,role

Pixel convention: pixel coordinates are continuous, integer values at pixel centres, and
``µm = px * mpp`` / ``mm = px * spacing_mm`` (no offset). A point is inside an image of
``(width, height)`` pixels when ``-0.5 <= x <= width`` (and the same in y): the half-pixel
margins accept both centre- and corner-based clicks. A position farther than
:data:`MAX_COORDINATE_MM` (1 m) from its image's origin is refused as a typo or a unit mix-up.

Registration
------------
:func:`fit_landmarks` fits ``"slide_um" -> "us_mm"`` on the ``fit`` points: a least-squares
affine or a regularised thin-plate spline, chosen (with its smoothing) by leave-one-out target
registration error (TRE), and checked for reflections, unit mix-ups and folds.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from oncotrace import __version__
from scipy.interpolate import RBFInterpolator
from scipy.linalg import null_space
from scipy.spatial import Delaunay

from ._heatmap import _atomic
from ._transforms import (
    SLIDE_UM,
    US_MM,
    Affine,
    Sequence,
    ThinPlateSpline,
    Transform,
    slide_px_to_um_transform,
    transform_from_dict,
    us_px_to_mm_transform,
)

Role = Literal["fit", "holdout"]
Model = Literal["auto", "affine", "tps"]
ROLES = ("fit", "holdout")
REGISTRATION_FORMAT = 1

MIN_AFFINE_POINTS = 3
MIN_TPS_POINTS = 6
#: Smallest / largest singular value of the centred landmarks below this = (nearly) collinear.
DEGENERACY_RATIO = 1e-3
#: A spline must beat the affine's leave-one-out TRE by this fraction to be chosen, and the
#: smoothest spline within this fraction of the best spline's TRE is preferred.
PREFER_AFFINE_MARGIN = 0.05
#: Smoothing grid, in units of the largest eigenvalue of the landmarks' spline kernel.
SMOOTHING_GRID = (0.0, *(10.0 ** np.arange(-4.0, 3.01, 0.5)))
_FOLD_GRID = 48
_UM_PER_MM = 1000.0
#: No landmark lies farther than this from its image's origin: a glass slide is 75 mm long and an
#: ultrasound field of view well under 1 m, so a larger coordinate is a typo or a unit mix-up
#: (and squaring one near 1e154 overflows every distance the fit and its checks compute).
MAX_COORDINATE_MM = 1000.0
_MAX_ABS = {"um": MAX_COORDINATE_MM * _UM_PER_MM, "mm": MAX_COORDINATE_MM}

_POINT_FIELDS = ("id", "pathology_px", "pathology_um", "ultrasound_px", "ultrasound_mm", "role")
_UNIT_HINTS = {
    "pathology_mm": "slide positions are in `pathology_um` (micrometres) or `pathology_px`",
    "ultrasound_um": "ultrasound positions are in `ultrasound_mm` (millimetres) or `ultrasound_px`",
    "ultrasound_cm": "ultrasound positions are in `ultrasound_mm` (millimetres) or `ultrasound_px`",
}
_CSV_COLUMNS = (
    "id",
    "pathology_px_x",
    "pathology_px_y",
    "pathology_um_x",
    "pathology_um_y",
    "ultrasound_px_x",
    "ultrasound_px_y",
    "ultrasound_mm_x",
    "ultrasound_mm_y",
    "role",
)


class LandmarkError(ValueError):
    """Landmarks that cannot be used, with the file, the point and the fix in the message."""


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Landmarks:
    """Validated landmark pairs in physical units.

    Attributes
    ----------
    ids : tuple of N unique non-empty str.
    pathology_um : (N, 2) float64 ndarray, slide positions in µm (``"slide_um"``).
    ultrasound_mm : (N, 2) float64 ndarray, ultrasound positions in mm (``"us_mm"``).
    roles : tuple of N ``"fit"`` | ``"holdout"``.
    source : file the points came from, or ``"<memory>"``.
    """

    ids: tuple[str, ...]
    pathology_um: NDArray[np.float64]
    ultrasound_mm: NDArray[np.float64]
    roles: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        ids = tuple(self.ids)
        roles = tuple(self.roles)
        src = self.source
        path_um = np.array(self.pathology_um, dtype=np.float64)
        us_mm = np.array(self.ultrasound_mm, dtype=np.float64)
        n = len(ids)
        for name, arr in (("pathology_um", path_um), ("ultrasound_mm", us_mm)):
            if arr.shape != (n, 2):
                raise LandmarkError(
                    f"{src}: {name} must be ({n}, 2) for {n} ids, got shape {arr.shape}."
                )
        if len(roles) != n:
            raise LandmarkError(f"{src}: {len(roles)} roles for {n} points; give one per point.")
        seen: set[str] = set()
        for i, pid in enumerate(ids):
            if not isinstance(pid, str) or not pid.strip():
                raise LandmarkError(
                    f"{src}: point #{i + 1} has an empty id; give every point an id."
                )
            if pid in seen:
                raise LandmarkError(f"{src}: point id {pid!r} appears twice; ids must be unique.")
            seen.add(pid)
            if roles[i] not in ROLES:
                raise LandmarkError(
                    f"{src}: point {pid!r} has role {roles[i]!r}; use 'fit' or 'holdout'."
                )
            for name, arr in (("pathology_um", path_um), ("ultrasound_mm", us_mm)):
                if not np.all(np.isfinite(arr[i])):
                    raise LandmarkError(
                        f"{src}: point {pid!r} has a non-finite {name} {arr[i].tolist()}; "
                        "fix or remove the point."
                    )
                _check_extent(arr[i], src, f"point {pid!r} (#{i + 1})", name)
        for name, arr in (("pathology", path_um), ("ultrasound", us_mm)):
            _reject_duplicates(arr, ids, name, src)
        path_um.flags.writeable = False
        us_mm.flags.writeable = False
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "pathology_um", path_um)
        object.__setattr__(self, "ultrasound_mm", us_mm)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fit_mask(self) -> NDArray[np.bool_]:
        """(N,) bool, True for ``role == "fit"``."""
        return np.array([r == "fit" for r in self.roles], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; :meth:`from_dict` reads it back."""
        return {
            "source": self.source,
            "points": [
                {
                    "id": pid,
                    "pathology_um": self.pathology_um[i].tolist(),
                    "ultrasound_mm": self.ultrasound_mm[i].tolist(),
                    "role": self.roles[i],
                }
                for i, pid in enumerate(self.ids)
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Landmarks:
        """Inverse of :meth:`to_dict`."""
        points = d["points"]
        return cls(
            ids=tuple(str(p["id"]) for p in points),
            pathology_um=np.array([p["pathology_um"] for p in points], dtype=np.float64).reshape(
                -1, 2
            ),
            ultrasound_mm=np.array([p["ultrasound_mm"] for p in points], dtype=np.float64).reshape(
                -1, 2
            ),
            roles=tuple(p.get("role", "fit") for p in points),
            source=str(d.get("source", "<memory>")),
        )


def _check_extent(
    value: NDArray[np.float64],
    src: str,
    where: str,
    name: str,
    *,
    scale: NDArray[np.float64] | None = None,
    flag: str = "",
) -> None:
    """Refuse a coordinate beyond :data:`MAX_COORDINATE_MM` from the origin.

    ``name`` ends in the unit (``pathology_um``, ``ultrasound_mm``); with ``scale`` (unit per
    pixel), ``value`` is in pixels and is compared before it is multiplied (``px * scale``
    overflows to inf for px near 1e308).
    """
    unit = name.rsplit("_", 1)[-1]
    limit = _MAX_ABS[unit]
    bound = limit if scale is None else limit / scale
    if np.all(np.abs(value) <= bound):
        return
    shown = "µm" if unit == "um" else unit
    numbers = [float(f"{v:.6g}") for v in value.tolist()]
    if scale is None:
        what, check = f"{name} {numbers}", f"its unit ({name} is in {shown}) and decimal point"
    else:
        px_name = name.rsplit("_", 1)[0] + "_px"
        what = f"{px_name} {numbers} at {flag} {scale.tolist()}"
        check = f"its decimal point and {flag}"
    image = "slide" if name.startswith("pathology") else "ultrasound image"
    raise LandmarkError(
        f"{src}: {where}: {what} lies more than {limit:,.0f} {shown} from the image origin, "
        f"beyond any {image} ({MAX_COORDINATE_MM / 1000:g} m). Fix the point (check {check}) "
        "or remove it."
    )


def _reject_duplicates(arr: NDArray[np.float64], ids: tuple[str, ...], name: str, src: str) -> None:
    from scipy.spatial import KDTree

    if len(arr) < 2:
        return
    # relative to the spread, which _check_extent bounds (an unbounded spread made every pair
    # of points "the same" within its tolerance)
    tol = 1e-9 * max(float(np.ptp(arr, axis=0).max()), 1.0)
    pairs = sorted(KDTree(arr).query_pairs(tol))
    if pairs:
        i, j = pairs[0]
        raise LandmarkError(
            f"{src}: points {ids[i]!r} and {ids[j]!r} have the same {name} position "
            f"{arr[i].tolist()}; remove the duplicate or correct one of them."
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """One point as read, before unit conversion; ``where`` names it in messages."""

    where: str
    pid: str
    pathology_px: NDArray[np.float64] | None
    pathology_um: NDArray[np.float64] | None
    ultrasound_px: NDArray[np.float64] | None
    ultrasound_mm: NDArray[np.float64] | None
    role: str


def _pair_or_none(value: Any, src: str, where: str, name: str) -> NDArray[np.float64] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, list | tuple | np.ndarray)
        and len(value) == 2
        and all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise LandmarkError(f"{src}: {where}: {name} must be two numbers [x, y], got {value!r}.")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise LandmarkError(
            f"{src}: {where}: {name} {arr.tolist()} is not finite (NaN/inf); fix or remove the point."
        )
    return arr


def _positive_pair_or_none(
    value: float | tuple[float, float] | None, name: str
) -> NDArray[np.float64] | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise LandmarkError(f"{name} must be one positive number or an (x, y) pair, got {value!r}.")
    return arr


def _read_json(path: Path) -> list[_Raw]:
    src = str(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LandmarkError(
            f"{src}: not valid JSON ({exc}); see the landmarks.json schema."
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise LandmarkError(
            f'{src}: expected an object {{"points": [...]}}, got {type(doc).__name__} '
            f"without a 'points' list."
        )
    raws = []
    for k, point in enumerate(doc["points"]):
        where = f"point #{k + 1}"
        if not isinstance(point, dict):
            raise LandmarkError(f"{src}: {where} must be an object, got {point!r}.")
        pid = point.get("id")
        if isinstance(pid, int) and not isinstance(pid, bool):
            pid = str(pid)
        if not isinstance(pid, str) or not pid.strip():
            raise LandmarkError(
                f"{src}: {where} has no 'id' (or an empty one); give each point an id."
            )
        where = f"point {pid!r}"
        for key in point:
            if key not in _POINT_FIELDS:
                hint = _UNIT_HINTS.get(key, f"allowed fields: {', '.join(_POINT_FIELDS)}")
                raise LandmarkError(f"{src}: {where}: unknown field {key!r}; {hint}.")
        raws.append(
            _Raw(
                where=where,
                pid=pid,
                pathology_px=_pair_or_none(point.get("pathology_px"), src, where, "pathology_px"),
                pathology_um=_pair_or_none(point.get("pathology_um"), src, where, "pathology_um"),
                ultrasound_px=_pair_or_none(
                    point.get("ultrasound_px"), src, where, "ultrasound_px"
                ),
                ultrasound_mm=_pair_or_none(
                    point.get("ultrasound_mm"), src, where, "ultrasound_mm"
                ),
                role=point.get("role", "fit"),
            )
        )
    return raws


def _read_csv(path: Path) -> list[_Raw]:
    src = str(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        unknown = [h for h in header if h not in _CSV_COLUMNS]
        if unknown or "id" not in header:
            raise LandmarkError(
                f"{src}: CSV header must use the columns {', '.join(_CSV_COLUMNS)} "
                f"(with 'id'); got unknown {unknown or 'no id column'}."
            )
        raws = []
        for row in reader:
            cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(cells.values()):
                continue
            line = reader.line_num
            pid = cells.get("id", "")
            if not pid:
                raise LandmarkError(f"{src}: line {line} has an empty id; give each point an id.")
            where = f"point {pid!r} (line {line})"

            def pair(prefix: str, cells: dict[str, str] = cells, where: str = where) -> Any:
                x, y = cells.get(f"{prefix}_x", ""), cells.get(f"{prefix}_y", "")
                if not x and not y:
                    return None
                try:
                    return [float(x), float(y)]
                except ValueError:
                    raise LandmarkError(
                        f"{src}: {where}: {prefix}_x/_y must both be numbers, got {x!r}, {y!r}."
                    ) from None

            raws.append(
                _Raw(
                    where=where,
                    pid=pid,
                    pathology_px=_pair_or_none(pair("pathology_px"), src, where, "pathology_px"),
                    pathology_um=_pair_or_none(pair("pathology_um"), src, where, "pathology_um"),
                    ultrasound_px=_pair_or_none(pair("ultrasound_px"), src, where, "ultrasound_px"),
                    ultrasound_mm=_pair_or_none(pair("ultrasound_mm"), src, where, "ultrasound_mm"),
                    role=cells.get("role") or "fit",
                )
            )
    return raws


def _physical(
    px: NDArray[np.float64] | None,
    phys: NDArray[np.float64] | None,
    scale: NDArray[np.float64] | None,
    *,
    src: str,
    where: str,
    side: str,
    unit: str,
    flag: str,
) -> NDArray[np.float64]:
    """Position in physical units from px and/or physical values, checking they agree."""
    if px is None and phys is None:
        raise LandmarkError(
            f"{src}: {where} has no {side} position; give {side}_px or {side}_{unit}."
        )
    if px is not None and scale is None and phys is None:
        raise LandmarkError(
            f"{src}: {where} gives {side}_px but the pixel size is unknown; pass {flag} "
            f"or give {side}_{unit}."
        )
    if phys is not None:
        _check_extent(phys, src, where, f"{side}_{unit}")
    if px is not None and scale is not None:
        # compared before multiplying: px * scale overflows to inf for px near 1e308
        _check_extent(px, src, where, f"{side}_{unit}", scale=scale, flag=flag)
        from_px = px * scale
        if phys is not None and np.any(np.abs(from_px - phys) > scale):
            raise LandmarkError(
                f"{src}: {where}: {side}_px {px.tolist()} x {flag} {scale.tolist()} = "
                f"{from_px.tolist()} {unit}, but {side}_{unit} says {phys.tolist()}; the two "
                f"disagree by more than a pixel. Check {flag} or drop one of the two."
            )
        return phys if phys is not None else from_px
    assert phys is not None  # internal: the px-only case without a scale raised above
    return phys


def _check_inside(
    points: NDArray[np.float64],
    size_px: tuple[int, int] | None,
    scale: NDArray[np.float64] | None,
    ids: tuple[str, ...],
    *,
    src: str,
    side: str,
    flag: str,
) -> None:
    if size_px is None:
        return
    if scale is None:
        raise LandmarkError(
            f"{src}: the {side} image size is given but not its pixel size; pass {flag} so "
            "the points can be checked against the image."
        )
    width, height = size_px
    px = points / scale
    outside = (px[:, 0] < -0.5) | (px[:, 0] > width) | (px[:, 1] < -0.5) | (px[:, 1] > height)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise LandmarkError(
            f"{src}: point {ids[k]!r} lies at {side} pixel {np.round(px[k], 2).tolist()}, outside "
            f"the {width} x {height} image; check the point, {flag}, or whether x and y are swapped."
        )


def _resolve(
    raws: Iterable[_Raw],
    src: str,
    slide_mpp: float | tuple[float, float] | None,
    us_spacing_mm: float | tuple[float, float] | None,
    slide_size_px: tuple[int, int] | None,
    us_size_px: tuple[int, int] | None,
) -> Landmarks:
    mpp = _positive_pair_or_none(slide_mpp, "slide_mpp=")
    spacing = _positive_pair_or_none(us_spacing_mm, "us_spacing_mm=")
    ids: list[str] = []
    path_um: list[NDArray[np.float64]] = []
    us_mm: list[NDArray[np.float64]] = []
    roles: list[str] = []
    for raw in raws:
        if raw.role not in ROLES:
            raise LandmarkError(
                f"{src}: {raw.where} has role {raw.role!r}; use 'fit' or 'holdout'."
            )
        ids.append(raw.pid)
        roles.append(raw.role)
        path_um.append(
            _physical(
                raw.pathology_px,
                raw.pathology_um,
                mpp,
                src=src,
                where=raw.where,
                side="pathology",
                unit="um",
                flag="slide_mpp=",
            )
        )
        us_mm.append(
            _physical(
                raw.ultrasound_px,
                raw.ultrasound_mm,
                spacing,
                src=src,
                where=raw.where,
                side="ultrasound",
                unit="mm",
                flag="us_spacing_mm=",
            )
        )
    if not ids:
        raise LandmarkError(f"{src}: no points; add at least {MIN_AFFINE_POINTS} landmark pairs.")
    landmarks = Landmarks(
        ids=tuple(ids),
        pathology_um=np.array(path_um).reshape(-1, 2),
        ultrasound_mm=np.array(us_mm).reshape(-1, 2),
        roles=tuple(roles),
        source=src,
    )
    _check_inside(
        landmarks.pathology_um,
        slide_size_px,
        mpp,
        landmarks.ids,
        src=src,
        side="slide",
        flag="slide_mpp=",
    )
    _check_inside(
        landmarks.ultrasound_mm,
        us_size_px,
        spacing,
        landmarks.ids,
        src=src,
        side="ultrasound",
        flag="us_spacing_mm=",
    )
    return landmarks


def load_landmarks(
    path: str | Path,
    *,
    slide_mpp: float | tuple[float, float] | None = None,
    us_spacing_mm: float | tuple[float, float] | None = None,
    slide_size_px: tuple[int, int] | None = None,
    us_size_px: tuple[int, int] | None = None,
) -> Landmarks:
    """Read and validate ``landmarks.json`` or ``landmarks.csv`` (schema in the module docstring).

    Parameters
    ----------
    path : ``.json`` or ``.csv`` file.
    slide_mpp : (x, y) µm per level-0 pixel (or one value); needed for ``pathology_px``.
    us_spacing_mm : (x, y) mm per ultrasound pixel (or one value); needed for ``ultrasound_px``.
    slide_size_px, us_size_px : (width, height) in pixels; when given, every point must lie
        inside the image.

    Returns
    -------
    Landmarks in µm / mm, ``source`` = the path.

    Raises
    ------
    LandmarkError (a ValueError) naming the file, the point and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"landmark file {p} not found.")
    suffix = p.suffix.lower()
    if suffix == ".json":
        raws = _read_json(p)
    elif suffix == ".csv":
        raws = _read_csv(p)
    else:
        raise LandmarkError(
            f"{p}: landmark files must be .json or .csv, got {suffix or 'no suffix'!r}."
        )
    return _resolve(raws, str(p), slide_mpp, us_spacing_mm, slide_size_px, us_size_px)


def landmarks_from_arrays(
    *,
    pathology_um: ArrayLike | None = None,
    pathology_px: ArrayLike | None = None,
    ultrasound_mm: ArrayLike | None = None,
    ultrasound_px: ArrayLike | None = None,
    ids: Iterable[str] | None = None,
    roles: Iterable[str] | None = None,
    slide_mpp: float | tuple[float, float] | None = None,
    us_spacing_mm: float | tuple[float, float] | None = None,
    slide_size_px: tuple[int, int] | None = None,
    us_size_px: tuple[int, int] | None = None,
    source: str = "<memory>",
) -> Landmarks:
    """Landmarks from (N, 2) arrays, validated exactly like :func:`load_landmarks`.

    Give each side in pixels (with ``slide_mpp`` / ``us_spacing_mm``) or in physical units (or
    both, which must agree). ``ids`` default to ``"p1"…"pN"``, ``roles`` to all ``"fit"``.
    """
    sides = {
        "pathology_um": pathology_um,
        "pathology_px": pathology_px,
        "ultrasound_mm": ultrasound_mm,
        "ultrasound_px": ultrasound_px,
    }
    arrays: dict[str, NDArray[np.float64] | None] = {}
    n = None
    for name, value in sides.items():
        if value is None:
            arrays[name] = None
            continue
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or (n is not None and len(arr) != n):
            raise LandmarkError(
                f"{source}: {name} must be an (N, 2) array like the other sides, got {arr.shape}."
            )
        n = len(arr)
        arrays[name] = arr
    if n is None:
        raise LandmarkError(f"{source}: give pathology_um/_px and ultrasound_mm/_px arrays.")
    id_list = [str(i) for i in ids] if ids is not None else [f"p{k + 1}" for k in range(n)]
    role_list = list(roles) if roles is not None else ["fit"] * n
    if len(id_list) != n or len(role_list) != n:
        raise LandmarkError(
            f"{source}: {len(id_list)} ids and {len(role_list)} roles for {n} points; give one each."
        )
    raws = []
    for k in range(n):
        where = f"point {id_list[k]!r}"
        values = {
            name: _pair_or_none(None if a is None else a[k].tolist(), source, where, name)
            for name, a in arrays.items()
        }
        raws.append(
            _Raw(
                where=where,
                pid=id_list[k],
                pathology_px=values["pathology_px"],
                pathology_um=values["pathology_um"],
                ultrasound_px=values["ultrasound_px"],
                ultrasound_mm=values["ultrasound_mm"],
                role=role_list[k],
            )
        )
    return _resolve(raws, source, slide_mpp, us_spacing_mm, slide_size_px, us_size_px)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _check_geometry(points: NDArray[np.float64], side: str, unit: str, src: str) -> None:
    centred = points - points.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[0] == 0 or sv[-1] / sv[0] < DEGENERACY_RATIO:
        ratio = 0.0 if sv[0] == 0 else sv[-1] / sv[0]
        raise LandmarkError(
            f"{src}: the {len(points)} fit landmarks are (nearly) collinear on the {side} side "
            f"(spread {sv[0]:.3g} {unit} along the line, ratio {ratio:.2g} < {DEGENERACY_RATIO}); "
            "add landmarks off that line, spread over the specimen."
        )


def _affine_geometry(affine: Affine) -> dict[str, Any]:
    """Scale (mm per mm), rotation and reflection of the affine's linear part."""
    lin = affine.linear * _UM_PER_MM  # slide µm -> ultrasound mm, as mm per mm
    u, s, vt = np.linalg.svd(lin)
    rot = u @ vt  # polar decomposition: lin = rot @ (symmetric positive)
    det = float(np.linalg.det(lin))
    reflection = det < 0
    if reflection:
        rot = rot @ np.diag([1.0, -1.0])  # rotation after a flip of the slide's y axis
    return {
        "scale_mm_per_mm": float(math.sqrt(abs(det))),
        "scale_axes_mm_per_mm": [float(s[0]), float(s[1])],
        "rotation_deg": float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0]))),
        "reflection": bool(reflection),
        "det": det,
    }


def _loo_errors(
    src: NDArray[np.float64], dst: NDArray[np.float64], smoothing: float | None
) -> NDArray[np.float64]:
    """(N,) leave-one-out errors (Euclidean, dst units); inf where a left-out fit is degenerate."""
    n = len(src)
    errors = np.full(n, np.inf)
    for i in range(n):
        keep = np.arange(n) != i
        try:
            if smoothing is None:
                pred = Affine.fit(src[keep], dst[keep], source=SLIDE_UM, target=US_MM)(src[i])
            else:
                interp = RBFInterpolator(
                    src[keep], dst[keep], kernel="thin_plate_spline", degree=1, smoothing=smoothing
                )
                pred = interp(src[i : i + 1])[0]
        except (ValueError, np.linalg.LinAlgError):
            continue
        errors[i] = float(np.linalg.norm(pred - dst[i]))
    return errors


def _kernel_scale(points: NDArray[np.float64]) -> float:
    """Largest eigenvalue of the spline kernel on the non-affine subspace of the landmarks.

    Smoothing far below it interpolates, far above it gives the least-squares affine, so the
    smoothing grid is laid out in its units (kernel values grow with the landmark spread²).
    """
    centred = points - points.mean(axis=0)
    r = np.linalg.norm(centred[:, None, :] - centred[None, :, :], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.where(r > 0, r**2 * np.log(r), 0.0)
    poly = np.hstack([np.ones((len(points), 1)), centred])
    basis = null_space(poly.T)
    return float(np.abs(np.linalg.eigvalsh(basis.T @ kernel @ basis)).max())


def _fold_grid(points: NDArray[np.float64]) -> NDArray[np.float64]:
    """(M, 2) grid points inside the landmarks' convex hull grown by 10% about its centroid."""
    centre = points.mean(axis=0)
    grown = centre + 1.1 * (points - centre)
    lo, hi = grown.min(axis=0), grown.max(axis=0)
    xs, ys = np.meshgrid(
        np.linspace(lo[0], hi[0], _FOLD_GRID), np.linspace(lo[1], hi[1], _FOLD_GRID)
    )
    grid = np.c_[xs.ravel(), ys.ravel()]
    inside = Delaunay(grown).find_simplex(grid) >= 0
    return np.vstack([grid[inside], points])


def _min_det(transform: Transform, grid: NDArray[np.float64], orientation: float) -> float:
    """Smallest Jacobian determinant on ``grid`` as an area ratio (mm² per mm²), sign-corrected
    so that a value <= 0 means the map folds (changes orientation)."""
    jac = transform.jacobian(grid)
    det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
    return float((det * orientation).min() * _UM_PER_MM**2)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _tre_summary(errors: NDArray[np.float64], ids: Iterable[str]) -> dict[str, Any]:
    return {
        "mean": _finite(float(errors.mean())),
        "max": _finite(float(errors.max())),
        "per_point": {pid: _finite(float(e)) for pid, e in zip(ids, errors, strict=True)},
    }


def _scale_error(geom: dict[str, Any], expected: tuple[float, float], src: str) -> str:
    lo_s, hi_s = min(geom["scale_axes_mm_per_mm"]), max(geom["scale_axes_mm_per_mm"])
    if hi_s > expected[1] and lo_s < expected[0]:
        hint = (
            "the axes disagree: check that the slide and ultrasound x/y are not swapped and that "
            "slide_mpp= / us_spacing_mm= are given per axis correctly"
        )
    elif hi_s > expected[1]:
        hint = (
            f"ultrasound distances come out {geom['scale_mm_per_mm']:.3g}x the slide's: check "
            "us_spacing_mm= (mm per ultrasound pixel), that ultrasound_mm is not in µm or pixels, "
            "and that pathology_um is not in pixels (slide_mpp= too small)"
        )
    else:
        hint = (
            f"ultrasound distances come out {geom['scale_mm_per_mm']:.3g}x the slide's: check "
            "slide_mpp= (µm per level-0 pixel), that pathology_um is not in nm or pixels of a "
            "downsampled level, and that ultrasound_mm is not in cm or metres"
        )
    return (
        f"{src}: the fitted scale is {lo_s:.3g}-{hi_s:.3g} mm per mm, outside the expected "
        f"{expected[0]}-{expected[1]} for the same specimen; {hint}. If the scale is real, "
        "widen expected_scale."
    )


@dataclass(frozen=True)
class _FitOptions:
    """:func:`fit_landmarks`' options, checked by :func:`_fit_options`."""

    model: Model
    smoothing: float | Literal["auto"]  # as given (the report echoes it)
    fixed_smoothing: float | None  # None for "auto"
    allow_reflection: bool
    bin_um: float | None
    expected_scale: tuple[float, float]


def _fit_options(
    model: Model,
    smoothing: float | Literal["auto"],
    allow_reflection: bool,
    bin_um: float | None,
    expected_scale: tuple[float, float],
) -> _FitOptions:
    """Check :func:`fit_landmarks`' options; ValueError names the bad one."""
    if model not in ("auto", "affine", "tps"):
        raise ValueError(f"model must be 'auto', 'affine' or 'tps', got {model!r}.")
    fixed_smoothing: float | None = None
    if smoothing != "auto":
        fixed_smoothing = float(smoothing)
        if not math.isfinite(fixed_smoothing) or fixed_smoothing < 0:
            raise ValueError(f"smoothing must be 'auto' or a number >= 0, got {smoothing!r}.")
        if model == "affine":
            raise ValueError(
                "smoothing applies to the thin-plate spline; drop it for model='affine'."
            )
    lo, hi = (float(v) for v in expected_scale)
    if not (0 < lo <= hi):
        raise ValueError(
            f"expected_scale must be (low, high) with 0 < low <= high, got {expected_scale}."
        )
    if bin_um is not None and not (math.isfinite(bin_um) and bin_um > 0):
        raise ValueError(f"bin_um must be a positive number of micrometres, got {bin_um!r}.")
    return _FitOptions(model, smoothing, fixed_smoothing, allow_reflection, bin_um, (lo, hi))


def _fit_points(
    landmarks: Landmarks, model: Model
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Slide (µm) and ultrasound (mm) positions of the ``fit`` landmarks, checked: enough of
    them for ``model`` and not collinear on either side."""
    src = landmarks.source
    fit = landmarks.fit_mask
    n_fit = int(fit.sum())
    p_fit, q_fit = landmarks.pathology_um[fit], landmarks.ultrasound_mm[fit]
    need = MIN_TPS_POINTS if model == "tps" else MIN_AFFINE_POINTS
    if n_fit < need:
        kind = "a thin-plate spline" if model == "tps" else "an affine registration"
        raise LandmarkError(
            f"{src}: {n_fit} landmark pairs with role 'fit'; {kind} needs at least {need}. "
            "Add landmarks (or turn holdout points into fit points)."
        )
    _check_geometry(p_fit, "slide", "µm", src)
    _check_geometry(q_fit, "ultrasound", "mm", src)
    return p_fit, q_fit


def _fit_affine(
    p_fit: NDArray[np.float64], q_fit: NDArray[np.float64], opts: _FitOptions, src: str
) -> tuple[Affine, dict[str, Any]]:
    """The least-squares affine and its :func:`_affine_geometry`; refuses a mirror image (unless
    ``allow_reflection``) and a scale outside ``expected_scale``."""
    affine = Affine.fit(p_fit, q_fit, source=SLIDE_UM, target=US_MM)
    geom = _affine_geometry(affine)
    if geom["reflection"] and not opts.allow_reflection:
        raise LandmarkError(
            f"{src}: the landmarks fit only as a mirror image (determinant {geom['det']:.3g}): "
            "the slide or the ultrasound image is flipped, or x and y are swapped on one side. "
            "Check the points, or pass allow_reflection=True if the "
            "section was mounted face down."
        )
    lo, hi = opts.expected_scale
    if not all(lo <= s <= hi for s in geom["scale_axes_mm_per_mm"]):
        raise LandmarkError(_scale_error(geom, opts.expected_scale, src))
    return affine, geom


def _candidate(
    model: str,
    smoothing: float | None,
    errors: NDArray[np.float64] | None,
    min_det: float,
    folds: bool,
) -> dict[str, Any]:
    """One entry of the report's ``candidates``; ``errors`` None when LOO TRE is not defined."""
    return {
        "model": model,
        "smoothing": smoothing,
        "loo_tre_mm": None if errors is None else _finite(float(errors.mean())),
        "loo_tre_max_mm": None if errors is None else _finite(float(errors.max())),
        "min_jacobian_det": min_det,
        "folds": folds,
    }


def _fit_candidates(
    p_fit: NDArray[np.float64],
    q_fit: NDArray[np.float64],
    hull_um: NDArray[np.float64],
    affine: Affine,
    reflection: bool,
    opts: _FitOptions,
) -> tuple[list[dict[str, Any]], list[Transform], list[NDArray[np.float64]]]:
    """The models ``opts.model`` allows: the affine first (if allowed), then a spline per
    smoothing (``opts.fixed_smoothing`` or the grid scaled by :func:`_kernel_scale`).

    Returns
    -------
    Parallel lists: report entries (:func:`_candidate`, folds checked on the grid of
    :func:`_fold_grid` over ``hull_um``), transforms, and (N_fit,) leave-one-out errors (NaN
    for an affine on only :data:`MIN_AFFINE_POINTS` points).
    """
    n_fit = len(p_fit)
    orientation = -1.0 if reflection else 1.0
    fold_grid = _fold_grid(hull_um)
    candidates: list[dict[str, Any]] = []
    transforms: list[Transform] = []
    loo_errors: list[NDArray[np.float64]] = []
    if opts.model in ("auto", "affine"):
        errors = _loo_errors(p_fit, q_fit, None) if n_fit > MIN_AFFINE_POINTS else None
        loo_errors.append(errors if errors is not None else np.full(n_fit, np.nan))
        transforms.append(affine)
        min_det = _min_det(affine, fold_grid[:1], orientation)
        candidates.append(_candidate("affine", None, errors, min_det, folds=False))
    if opts.model == "tps" or (opts.model == "auto" and n_fit >= MIN_TPS_POINTS):
        if opts.fixed_smoothing is not None:
            grid = [opts.fixed_smoothing]
        else:
            scale = _kernel_scale(p_fit)
            grid = [float(g) * scale for g in SMOOTHING_GRID]
        for s in grid:
            errors = _loo_errors(p_fit, q_fit, s)
            tps = ThinPlateSpline(p_fit, q_fit, s, SLIDE_UM, US_MM)
            min_det = _min_det(tps, fold_grid, orientation)
            loo_errors.append(errors)
            transforms.append(tps)
            candidates.append(_candidate("tps", s, errors, min_det, folds=bool(min_det <= 0)))
    return candidates, transforms, loo_errors


def _loo_tre(candidate: Mapping[str, Any]) -> float:
    """A candidate's mean leave-one-out TRE (mm), inf where it has none."""
    value = candidate["loo_tre_mm"]
    return math.inf if value is None else float(value)


def _best_spline(candidates: list[dict[str, Any]]) -> int | None:
    """Index of the spline to prefer among those that do not fold, None if there is none."""
    splines = [k for k, c in enumerate(candidates) if c["model"] == "tps" and not c["folds"]]
    if not splines:
        return None
    # Like the affine-versus-spline choice: the smoothest spline within the margin of the
    # best leave-one-out TRE, because LOO TRE is noisy and smoothing guards against noise.
    floor = min(_loo_tre(candidates[k]) for k in splines) * (1 + PREFER_AFFINE_MARGIN)
    return max(
        (k for k in splines if _loo_tre(candidates[k]) <= floor),
        key=lambda k: candidates[k]["smoothing"],
    )


def _choose_model(
    candidates: list[dict[str, Any]],
    best_spline: int | None,
    model: Model,
    q_fit: NDArray[np.float64],
    src: str,
) -> int:
    """Index of the candidate to use: the best spline for ``model="tps"`` (refused if every
    spline folds); for ``"auto"`` the affine unless the best spline beats its leave-one-out
    TRE by more than :data:`PREFER_AFFINE_MARGIN` (and more than rounding)."""
    if model == "tps":
        if best_spline is None:
            worst = min(c["min_jacobian_det"] for c in candidates)
            raise LandmarkError(
                f"{src}: the thin-plate spline folds over itself (smallest Jacobian determinant "
                f"{worst:.3g} <= 0 inside the landmark hull): some landmarks are out of order or "
                "mismatched. Check them, raise the smoothing, or use model='affine'."
            )
        return best_spline
    if model == "auto" and best_spline is not None:
        a, t = _loo_tre(candidates[0]), _loo_tre(candidates[best_spline])
        spread_mm = float(np.ptp(q_fit, axis=0).max())
        if t < a * (1 - PREFER_AFFINE_MARGIN) and a - t > 1e-9 * spread_mm:
            return best_spline
    return 0


def _fold_warnings(candidates: list[dict[str, Any]], chosen: int) -> list[str]:
    """The report's warning (none or one) that a folding spline had a clearly lower
    leave-one-out TRE than the chosen candidate."""
    limit = _loo_tre(candidates[chosen]) * (1 - PREFER_AFFINE_MARGIN)
    folded = [c for c in candidates if c["folds"] and _loo_tre(c) < limit]
    if not folded:
        return []
    c = folded[0]
    used = candidates[chosen]["model"]
    if used == "tps":
        used = f"spline with smoothing {candidates[chosen]['smoothing']:.3g}"
    return [
        f"a thin-plate spline (smoothing {c['smoothing']:.3g}) had a lower "
        f"leave-one-out TRE ({_loo_tre(c):.3g} mm) but folds (min Jacobian determinant "
        f"{c['min_jacobian_det']:.3g}); used the {used} "
        "instead. Check the landmarks for swapped or misplaced points."
    ]


def _point_errors(
    transform: Transform, landmarks: Landmarks, mask: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """(M,) distances (mm) from the mapped slide positions of the ``mask`` landmarks to their
    ultrasound positions."""
    mapped = transform(landmarks.pathology_um[mask])
    return np.linalg.norm(mapped - landmarks.ultrasound_mm[mask], axis=1)


def _tre_over_bin(
    bin_um: float | None,
    scale_mm_per_mm: float,
    loo_tre_mm: float | None,
    holdout: Mapping[str, Any] | None,
) -> tuple[float | None, dict[str, float | None] | None]:
    """The heatmap cell in ultrasound mm and the TREs in cells; (None, None) without ``bin_um``."""
    if bin_um is None:
        return None, None
    bin_mm = bin_um / _UM_PER_MM * scale_mm_per_mm
    return bin_mm, {
        "loo": _ratio(loo_tre_mm, bin_mm),
        "holdout_mean": None if holdout is None else _ratio(holdout["mean"], bin_mm),
        "holdout_max": None if holdout is None else _ratio(holdout["max"], bin_mm),
    }


def _report(
    landmarks: Landmarks,
    transform: Transform,
    chosen_loo_errors: NDArray[np.float64],
    candidates: list[dict[str, Any]],
    chosen: int,
    best_spline: int | None,
    geom: dict[str, Any],
    warn: list[str],
    opts: _FitOptions,
) -> dict[str, Any]:
    """The :class:`Registration` report of :func:`fit_landmarks` for the chosen candidate."""
    fit = landmarks.fit_mask
    fit_ids = tuple(i for i, f in zip(landmarks.ids, fit, strict=True) if f)
    hold_ids = tuple(i for i, f in zip(landmarks.ids, fit, strict=True) if not f)
    residual = _point_errors(transform, landmarks, fit)
    holdout = (
        _tre_summary(_point_errors(transform, landmarks, ~fit), hold_ids) if hold_ids else None
    )
    chosen_loo = candidates[chosen]["loo_tre_mm"]
    bin_mm, tre_over_bin = _tre_over_bin(opts.bin_um, geom["scale_mm_per_mm"], chosen_loo, holdout)
    loo_by_model: dict[str, float | None] = {"affine": None, "tps": None}
    for k, c in enumerate(candidates):
        if c["model"] == "affine" or k == best_spline:
            loo_by_model[c["model"]] = c["loo_tre_mm"]
    return {
        "n_fit": int(fit.sum()),
        "n_holdout": len(hold_ids),
        "model_requested": opts.model,
        "smoothing_requested": opts.smoothing,
        "chosen": {
            "model": str(candidates[chosen]["model"]),
            "smoothing": candidates[chosen]["smoothing"],
            "loo_tre_mm": chosen_loo,
        },
        "candidates": candidates,
        "loo_tre_mm": loo_by_model,
        "loo_tre_per_point_mm": {
            pid: _finite(float(e)) for pid, e in zip(fit_ids, chosen_loo_errors, strict=True)
        },
        "rmse_fit_mm": float(np.sqrt(np.mean(residual**2))),
        "fit_residual_mm": {pid: float(e) for pid, e in zip(fit_ids, residual, strict=True)},
        "holdout_tre_mm": holdout,
        "bin_um": opts.bin_um,
        "bin_in_ultrasound_mm": bin_mm,
        "tre_over_bin": tre_over_bin,
        "scale_mm_per_mm": geom["scale_mm_per_mm"],
        "scale_axes_mm_per_mm": geom["scale_axes_mm_per_mm"],
        "rotation_deg": geom["rotation_deg"],
        "reflection": geom["reflection"],
        "allow_reflection": opts.allow_reflection,
        "expected_scale": list(opts.expected_scale),
        "min_jacobian_det": candidates[chosen]["min_jacobian_det"],
        "warnings": warn,
    }


def fit_landmarks(
    landmarks: Landmarks,
    *,
    model: Model = "auto",
    smoothing: float | Literal["auto"] = "auto",
    allow_reflection: bool = False,
    bin_um: float | None = None,
    expected_scale: tuple[float, float] = (0.5, 2.0),
) -> Registration:
    """Fit ``"slide_um" -> "us_mm"`` to the ``fit`` landmarks and report its accuracy.

    Parameters
    ----------
    landmarks : from :func:`load_landmarks` / :func:`landmarks_from_arrays`.
    model : ``"affine"`` (least squares, >= 3 fit points), ``"tps"`` (regularised thin-plate
        spline, >= 6) or ``"auto"``: the lowest leave-one-out TRE, the affine unless a spline
        beats it by more than 5 %.
    smoothing : spline smoothing in scipy ``RBFInterpolator`` units, or ``"auto"``: chosen by
        leave-one-out TRE from 0 and a log grid scaled to the landmarks' kernel (the largest
        smoothing within 5 % of the best TRE; splines that fold inside the landmark hull are
        never chosen).
    allow_reflection : accept a mirror-image fit (a flipped section or image).
    bin_um : heatmap cell size on the slide in µm; adds ``tre_over_bin`` to the report.
    expected_scale : accepted range of mm (ultrasound) per mm (slide) on each axis; shrinkage
        and deformation stay within 0.5-2x, a unit mix-up lands far outside.

    Returns
    -------
    Registration whose ``report`` holds the leave-one-out and held-out TRE (mm), fit residuals,
    scale, rotation, reflection, the smallest Jacobian determinant and any warnings.

    Raises
    ------
    LandmarkError (a ValueError): too few points, collinear points, a reflection, a scale outside
        ``expected_scale``, or a forced spline that folds.
    """
    src = landmarks.source
    opts = _fit_options(model, smoothing, allow_reflection, bin_um, expected_scale)
    p_fit, q_fit = _fit_points(landmarks, model)
    affine, geom = _fit_affine(p_fit, q_fit, opts, src)
    candidates, transforms, loo_errors = _fit_candidates(
        p_fit, q_fit, landmarks.pathology_um, affine, geom["reflection"], opts
    )
    best_spline = _best_spline(candidates)
    chosen = _choose_model(candidates, best_spline, model, q_fit, src)
    warn = _fold_warnings(candidates, chosen)
    for message in warn:
        warnings.warn(f"{src}: {message}", UserWarning, stacklevel=2)
    transform = transforms[chosen]
    report = _report(
        landmarks, transform, loo_errors[chosen], candidates, chosen, best_spline, geom, warn, opts
    )
    return Registration(
        transform=transform,
        model=str(candidates[chosen]["model"]),
        smoothing=candidates[chosen]["smoothing"],
        report=report,
        landmarks=landmarks,
    )


def _ratio(value: float | None, denominator: float) -> float | None:
    return None if value is None else value / denominator


# --------------------------------------------------------------------------------------------
# The registration file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Registration:
    """A fitted ``"slide_um" -> "us_mm"`` transform with its accuracy report.

    Attributes
    ----------
    transform : Transform from ``"slide_um"`` to ``"us_mm"``.
    model : ``"affine"`` or ``"tps"``.
    smoothing : spline smoothing, None for the affine.
    report : JSON-safe dict (see :func:`fit_landmarks`).
    landmarks : the landmarks it was fitted to.
    """

    transform: Transform
    model: str
    smoothing: float | None
    report: dict[str, Any]
    landmarks: Landmarks

    def pixel_transform(
        self, slide_mpp: float | tuple[float, float], us_spacing_mm: float | tuple[float, float]
    ) -> Sequence:
        """``"slide_px"`` -> ``"us_px"``: mpp scale, this transform, inverse ultrasound spacing."""
        return Sequence(
            [
                slide_px_to_um_transform(slide_mpp),
                self.transform,
                us_px_to_mm_transform(us_spacing_mm).inverse(),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (what ``registration.json`` holds)."""
        return {
            "format": "oncotrace.registration",
            "format_version": REGISTRATION_FORMAT,
            "oncotrace_version": __version__,
            "source": self.transform.source,
            "target": self.transform.target,
            "model": self.model,
            "smoothing": self.smoothing,
            "transform": self.transform.to_dict(),
            "report": self.report,
            "landmarks": self.landmarks.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Registration:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != "oncotrace.registration":
            raise ValueError(
                f"not an OncoTrace registration (format {d.get('format')!r}); "
                "write one with `fit_landmarks(...).write_json(path)`."
            )
        if d.get("format_version") != REGISTRATION_FORMAT:
            raise ValueError(
                f"registration format_version {d.get('format_version')!r} is not "
                f"{REGISTRATION_FORMAT}; refit the landmarks with this version."
            )
        transform = transform_from_dict(d["transform"])
        if (transform.source, transform.target) != (SLIDE_UM, US_MM):
            raise ValueError(
                f"a registration maps {SLIDE_UM} -> {US_MM}, this one {transform.source} -> "
                f"{transform.target}."
            )
        smoothing = d.get("smoothing")
        return cls(
            transform=transform,
            model=str(d["model"]),
            smoothing=None if smoothing is None else float(smoothing),
            report=dict(d["report"]),
            landmarks=Landmarks.from_dict(d["landmarks"]),
        )

    def write_json(self, path: str | Path) -> Path:
        """Write ``registration.json`` atomically (temporary sibling, then rename)."""
        final = Path(path)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        with _atomic(final) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        return final

    @classmethod
    def read_json(cls, path: str | Path) -> Registration:
        """Read a file written by :meth:`write_json`."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc}).") from exc
        try:
            return cls.from_dict(d)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{p}: {exc}") from exc
