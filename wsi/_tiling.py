"""Tile geometry at an exact physical resolution, and reading tiles from a slide."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ._errors import ParameterError, ResolutionError
from ._slide import Slide, resize_rgb
from ._tissue import TissueMask

#: A level may be this much coarser than the target and still be resampled up to it;
#: beyond that the slide simply does not hold the requested detail.
UPSAMPLE_TOLERANCE = 1.10
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
    """

    tile_px: int
    stride_px: int
    target_mpp: float
    size_level0: tuple[float, float]
    stride_level0: tuple[float, float]
    read_level: int
    read_size: tuple[int, int]

    @property
    def size_level0_int(self) -> tuple[int, int]:
        return round(self.size_level0[0]), round(self.size_level0[1])


def tile_geometry(
    slide: Slide, *, target_mpp: float = 0.5, tile_px: int = 224, stride_px: int | None = None
) -> TileGeometry:
    """Work out level-0 tile extent and the pyramid level to read from.

    The read level is the coarsest one at or finer than ``target_mpp``, so a tile always
    covers ``tile_px × target_mpp`` µm whatever the scanner's native resolution.

    Raises
    ------
    ResolutionError
        When even level 0 is coarser than the target (beyond a 10 % tolerance).
    """
    if tile_px <= 0 or target_mpp <= 0:
        bad = "tile_px" if tile_px <= 0 else "target_mpp"
        raise ParameterError(
            f"tile_px= and target_mpp= must be positive, got {tile_px}, {target_mpp}", param=bad
        )
    stride = tile_px if stride_px is None else int(stride_px)
    if not stride > 0:
        raise ParameterError(f"stride_px= must be positive, got {stride_px}", param="stride_px")
    mx, my = slide.mpp_xy
    mpp0 = 0.5 * (mx + my)
    if mpp0 > target_mpp * UPSAMPLE_TOLERANCE:
        raise ResolutionError(
            slide.path,
            f"its finest level is {mpp0:.4g} µm/px, coarser than the requested {target_mpp:g} µm/px.",
            f"tile at a coarser target: target_mpp={math.ceil(mpp0 * 100) / 100:g} or more.",
            param="target_mpp",
        )
    size0 = (tile_px * target_mpp / mx, tile_px * target_mpp / my)
    stride0 = (stride * target_mpp / mx, stride * target_mpp / my)
    level = slide.best_level_for_downsample(target_mpp / mpp0)
    ds = slide.level_downsamples[level]
    read = (max(1, round(size0[0] / ds)), max(1, round(size0[1] / ds)))
    return TileGeometry(tile_px, stride, float(target_mpp), size0, stride0, level, read)


def tile_coords(
    slide: Slide,
    mask: TissueMask | None,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    stride_px: int | None = None,
    min_tissue: float | None = None,
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
        cluster lying across grid lines covers only ~15 % of each of four tiles.

    Returns
    -------
    coords : (N, 2) int64 ndarray
        Level-0 ``(x, y)`` of each tile's top-left corner, row-major order. Only tiles that
        lie entirely inside the slide are returned.
    """
    geom = tile_geometry(slide, target_mpp=target_mpp, tile_px=tile_px, stride_px=stride_px)
    grid = grid_coords(slide.dimensions, geom)
    if mask is None or grid.size == 0:
        return grid
    frac = tissue_fraction(mask, grid, geom.size_level0)
    return grid[frac >= (MIN_TISSUE[mask.mode] if min_tissue is None else min_tissue)]


def grid_coords(dimensions: tuple[int, int], geom: TileGeometry) -> np.ndarray:
    """All full tiles of the regular grid inside a slide of level-0 ``dimensions``."""
    w0, h0 = dimensions
    (tw, th), (sx, sy) = geom.size_level0, geom.stride_level0
    nx = math.floor((w0 - tw) / sx + 1e-9) + 1 if w0 >= tw - 1e-6 else 0
    ny = math.floor((h0 - th) / sy + 1e-9) + 1 if h0 >= th - 1e-6 else 0
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), np.int64)
    xs = np.round(np.arange(nx) * sx).astype(np.int64)
    ys = np.round(np.arange(ny) * sy).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fraction(
    mask: TissueMask, coords: np.ndarray, size_level0: tuple[float, float]
) -> np.ndarray:
    """Fraction of each tile covered by the mask, from a summed-area table. (N,) float32."""
    m = mask.mask
    if coords.size == 0:
        return np.zeros(0, np.float32)
    # int32 holds any overview (<= 40 M px) and halves the memory traffic of int64
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int32)
    np.cumsum(m, axis=0, dtype=np.int32, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    ds = mask.downsample
    x0 = np.clip(np.round(coords[:, 0] / ds).astype(np.int64), 0, m.shape[1])
    y0 = np.clip(np.round(coords[:, 1] / ds).astype(np.int64), 0, m.shape[0])
    x1 = np.clip(np.round((coords[:, 0] + size_level0[0]) / ds).astype(np.int64), 0, m.shape[1])
    y1 = np.clip(np.round((coords[:, 1] + size_level0[1]) / ds).astype(np.int64), 0, m.shape[0])
    x1 = np.maximum(x1, np.minimum(x0 + 1, m.shape[1]))
    y1 = np.maximum(y1, np.minimum(y0 + 1, m.shape[0]))
    total = sat[y1, x1].astype(np.int64) - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
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
