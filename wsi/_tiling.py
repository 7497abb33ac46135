"""Tile geometry at an exact physical resolution, and reading tiles from a slide."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ._errors import ParameterError, ResolutionError, UpsamplingWarning
from ._slide import Slide, resize_rgb
from ._tissue import TissueMask

#: Default bound on ``finest_mpp / target_mpp``: a slide up to this much coarser than the target
#: (a 0.62 µm/px field for a 0.5 µm/px model) is resampled up to it; beyond that the tiles would
#: be blurred stand-ins for detail the slide does not hold.
MAX_UPSAMPLE = 1.3
#: Upsampling up to this factor is not warned about: scanners' nominal 20× / 40× resolutions
#: scatter by ~1 % (0.504 µm/px for "0.5"), and every slide of such a cohort would warn.
UPSAMPLE_QUIET = 1.02
#: The fix suggests raising ``max_upsample`` only up to this factor; more is not a tile of
#: the target's detail by any measure.
SUGGEST_UPSAMPLE_UP_TO = 2.0
#: Relative slack when comparing a factor with its bound: 0.8 / 0.5 is 1.6000000000000003.
_SLACK = 1e-9
#: Default minimum mask coverage of a tile, by detection mode.
MIN_TISSUE: dict[str, float] = {"tissue": 0.25, "smear": 0.05}


@dataclass(frozen=True)
class TileGeometry:
    """How tiles of ``tile_px`` at ``target_mpp`` map onto a slide.

    Attributes
    ----------
    tile_px, stride_px : output tile size and grid step in target pixels.
    target_mpp : output resolution, µm/px.
    size_level0 : (w, h) float, one tile's extent in level-0 pixels.
    stride_level0 : (x, y) float, grid step in level-0 pixels.
    read_level : pyramid level tiles are read from.
    read_size : (w, h) int, pixels read at ``read_level`` and resized to ``tile_px``.
    upsample : ``read-level µm/px / target_mpp`` when that exceeds 1 (the tiles are resampled
        up from a coarser slide), else 1.0.
    """

    tile_px: int
    stride_px: int
    target_mpp: float
    size_level0: tuple[float, float]
    stride_level0: tuple[float, float]
    read_level: int
    read_size: tuple[int, int]
    upsample: float = 1.0

    @property
    def size_level0_int(self) -> tuple[int, int]:
        return round(self.size_level0[0]), round(self.size_level0[1])


def tile_geometry(
    slide: Slide,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    stride_px: int | None = None,
    max_upsample: float = MAX_UPSAMPLE,
) -> TileGeometry:
    """Work out level-0 tile extent and the pyramid level to read from.

    The read level is the coarsest one at or finer than ``target_mpp``, so a tile always
    covers ``tile_px × target_mpp`` µm whatever the scanner's native resolution.

    Parameters
    ----------
    max_upsample : bound on ``finest_mpp / target_mpp``, ≥ 1. A slide coarser than the target
        within it is read at level 0 and resampled up, with an :class:`UpsamplingWarning`
        (from ×:data:`UPSAMPLE_QUIET` on); 1 refuses any coarser slide.

    Raises
    ------
    ResolutionError
        When level 0 is coarser than the target by more than ``max_upsample``; it carries
        ``finest_mpp``, ``target_mpp`` and ``max_upsample``.
    """
    geom = _geometry(
        slide,
        target_mpp=target_mpp,
        tile_px=tile_px,
        stride_px=stride_px,
        max_upsample=max_upsample,
    )
    if geom.upsample > UPSAMPLE_QUIET:
        warnings.warn(
            UpsamplingWarning(
                slide.path, geom.upsample * target_mpp, float(target_mpp), float(max_upsample)
            ),
            stacklevel=2,
        )
    return geom


def _geometry(
    slide: Slide,
    *,
    target_mpp: float,
    tile_px: int,
    stride_px: int | None,
    max_upsample: float,
) -> TileGeometry:
    """:func:`tile_geometry` without the warning (for writers handed already-checked coords)."""
    if tile_px <= 0 or target_mpp <= 0:
        bad = "tile_px" if tile_px <= 0 else "target_mpp"
        raise ParameterError(
            f"tile_px= and target_mpp= must be positive, got {tile_px}, {target_mpp}", param=bad
        )
    stride = tile_px if stride_px is None else int(stride_px)
    if not stride > 0:
        raise ParameterError(f"stride_px= must be positive, got {stride_px}", param="stride_px")
    check_max_upsample(max_upsample)
    mx, my = slide.mpp_xy
    mpp0 = 0.5 * (mx + my)
    if not _within(mpp0 / target_mpp, max_upsample):
        raise _resolution_error(slide, mpp0, float(target_mpp), float(max_upsample))
    size0 = (tile_px * target_mpp / mx, tile_px * target_mpp / my)
    stride0 = (stride * target_mpp / mx, stride * target_mpp / my)
    level = slide.best_level_for_downsample(target_mpp / mpp0)
    ds = slide.level_downsamples[level]
    read = (max(1, round(size0[0] / ds)), max(1, round(size0[1] / ds)))
    upsample = max(1.0, mpp0 * ds / target_mpp)
    return TileGeometry(tile_px, stride, float(target_mpp), size0, stride0, level, read, upsample)


def check_max_upsample(value: object) -> float:
    """``value`` as a float if it is a valid ``max_upsample`` (a finite number ≥ 1)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 1.0)
    ):
        raise ParameterError(
            f"max_upsample= must be a number ≥ 1 (1 allows no upsampling), got {value!r}",
            param="max_upsample",
        )
    return float(value)


def _within(factor: float, bound: float) -> bool:
    return factor <= bound * (1 + _SLACK)


def _ceil2(value: float) -> float:
    """``value`` rounded up to two decimals (0.6154 -> 0.62), ignoring float dust (0.62 -> 0.62)."""
    return math.ceil(round(value * 100, 6)) / 100


def _resolution_error(slide: Slide, mpp0: float, target: float, limit: float) -> ResolutionError:
    """The refusal, with fixes that each pass the same check when followed."""
    native = _ceil2(mpp0)  # the slide's own resolution: no upsampling at all
    lowest = _ceil2(mpp0 / limit)
    while not _within(mpp0 / lowest, limit):
        lowest += 0.01
    lowest = round(lowest, 2)
    needed = _ceil2(mpp0 / target)
    while not _within(mpp0 / target, needed):
        needed += 0.01
    needed = round(needed, 2)
    targets = f"target_mpp={native:g} or more (the slide's own resolution)"
    if lowest < native:
        targets = (
            f"target_mpp={lowest:g} or more (×{mpp0 / lowest:.3g} upsampling;"
            f" target_mpp={native:g} is the slide's own resolution)"
        )
    fix = f"tile at a coarser target: {targets}"
    if needed <= SUGGEST_UPSAMPLE_UP_TO:
        fix += f"; or allow the upsampling: max_upsample={needed:g}"
    return ResolutionError(
        slide.path,
        f"its finest level is {mpp0:.4g} µm/px: tiles at the requested {target:g} µm/px would be"
        f" upsampled ×{mpp0 / target:.3g}, beyond max_upsample={limit:g}.",
        fix + ".",
        param="target_mpp",
        finest_mpp=mpp0,
        target_mpp=target,
        max_upsample=limit,
    )


def tile_coords(
    slide: Slide,
    mask: TissueMask | None,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    stride_px: int | None = None,
    min_tissue: float | None = None,
    max_upsample: float = MAX_UPSAMPLE,
) -> np.ndarray:
    """Top-left level-0 corners of the tiles to cut.

    Parameters
    ----------
    slide : the slide (for its size and mpp).
    mask : tissue/cell mask; ``None`` keeps every tile of the grid.
    target_mpp : output resolution in µm/px.
    tile_px : output tile side in pixels.
    stride_px : grid step in output pixels (``< tile_px`` overlaps); default ``tile_px``.
    min_tissue : minimum fraction of a tile the mask must cover; default by mask mode
        (:data:`MIN_TISSUE`): 0.25 for tissue sheets, 0.05 for smears, where a 100 µm cell
        cluster lying across grid lines covers only ~15 % of each of four tiles. The part of an
        edge tile beyond the slide counts as glass.
    max_upsample : see :func:`tile_geometry` (which warns and raises for this call).

    Returns
    -------
    coords : (N, 2) int64 ndarray
        Level-0 ``(x, y)`` of each tile's top-left corner, row-major order, on the regular grid
        ``round(i × stride)``. The grid reaches the right and bottom edges: the last column and
        row of tiles may overhang them, and their pixels beyond the slide read as white
        (:meth:`Slide.read_region`), so tissue at the edges is tiled too.
    """
    geom = tile_geometry(
        slide,
        target_mpp=target_mpp,
        tile_px=tile_px,
        stride_px=stride_px,
        max_upsample=max_upsample,
    )
    grid = grid_coords(slide.dimensions, geom)
    if mask is None or grid.size == 0:
        return grid
    frac = tissue_fraction(mask, grid, geom.size_level0)
    return grid[frac >= (MIN_TISSUE[mask.mode] if min_tissue is None else min_tissue)]


#: How edge tiles are cut, as stores record it (``StoreAttrs.edges``): the last tile of a row or
#: column overhangs the slide and is padded with white. Stores without the record were cut by
#: versions that left the partial strip at the right and bottom edges untiled.
EDGES = "padded"


def grid_count(extent: float, tile: float, stride: float) -> int:
    """Grid positions ``i × stride`` along one axis of ``extent`` level-0 px.

    Every position that starts inside the slide (by at least half a pixel, so it still does
    after rounding) and is not wholly past the end of the tile before it: with ``stride ≤
    tile`` the tiles cover ``[0, extent)`` and only the last may overhang; with gaps
    (``stride > tile``) every start inside counts.
    """
    starts = math.ceil((extent - 0.5) / stride - 1e-9)
    reach = math.ceil((extent - tile) / stride - 1e-9) + 1 if extent > tile + 1e-6 else 1
    return max(0, min(starts, reach))


def grid_coords(dimensions: tuple[int, int], geom: TileGeometry) -> np.ndarray:
    """Every tile of the regular grid needed to cover a slide of level-0 ``dimensions``.

    ``round(i × stride)`` on each axis, as :func:`grid_count` counts them; the last row and
    column overhang the right and bottom edges unless the slide ends exactly on a tile.
    """
    w0, h0 = dimensions
    (tw, th), (sx, sy) = geom.size_level0, geom.stride_level0
    nx, ny = grid_count(w0, tw, sx), grid_count(h0, th, sy)
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), np.int64)
    xs = np.round(np.arange(nx) * sx).astype(np.int64)
    ys = np.round(np.arange(ny) * sy).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fraction(
    mask: TissueMask, coords: np.ndarray, size_level0: tuple[float, float]
) -> np.ndarray:
    """Fraction of each tile covered by the mask, from a summed-area table. (N,) float32.

    The fraction is of the whole tile: the part of an edge tile beyond the slide (and so
    beyond the mask) counts as uncovered, as glass would.
    """
    m = mask.mask
    if coords.size == 0:
        return np.zeros(0, np.float32)
    # int32 holds any overview (<= 40 M px) and halves the memory traffic of int64
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int32)
    np.cumsum(m, axis=0, dtype=np.int32, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    ds = mask.downsample
    x0 = np.round(coords[:, 0] / ds).astype(np.int64)
    y0 = np.round(coords[:, 1] / ds).astype(np.int64)
    x1 = np.round((coords[:, 0] + size_level0[0]) / ds).astype(np.int64)
    y1 = np.round((coords[:, 1] + size_level0[1]) / ds).astype(np.int64)
    x1, y1 = np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)
    area = (x1 - x0) * (y1 - y0)  # the whole tile, also where it overhangs the mask
    cx0, cx1 = np.clip(x0, 0, m.shape[1]), np.clip(x1, 0, m.shape[1])
    cy0, cy1 = np.clip(y0, 0, m.shape[0]), np.clip(y1, 0, m.shape[0])
    total = sat[cy1, cx1].astype(np.int64) - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
    return (total / area).astype(np.float32)


def read_tile(slide: Slide, xy: tuple[int, int], geom: TileGeometry, *, z: int = 0) -> np.ndarray:
    """One tile at the target resolution: (tile_px, tile_px, 3) uint8."""
    region = slide.read_region(xy, geom.read_level, geom.read_size, z=z)
    return resize_rgb(region, (geom.tile_px, geom.tile_px))


def focus_score(tile: np.ndarray) -> float:
    """Sharpness: variance of the Laplacian of the grey image (higher is sharper)."""
    grey = tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndi.laplace(grey).var())


def read_sharpest(
    slide: Slide, xy: tuple[int, int], geom: TileGeometry
) -> tuple[np.ndarray, float, int]:
    """Read a tile from every focal plane and keep the sharpest: (tile, focus, plane)."""
    best: tuple[np.ndarray, float, int] | None = None
    for z in range(slide.n_focal_planes):
        tile = read_tile(slide, xy, geom, z=z)
        score = focus_score(tile)
        if best is None or score > best[1]:
            best = (tile, score, z)
    assert best is not None  # n_focal_planes >= 1 by construction
    return best
