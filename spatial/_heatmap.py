"""Attention heatmaps on the tile grid, and the three files viewers read.

``attention_heatmap`` rasterises per-tile scores onto the grid the tiles were cut on (one cell
per stride step, never at level 0). The writers turn a :class:`Heatmap` into

* an NGFF 0.5 multiscale OME-Zarr (Zarr v3) in micrometres, for napari / vizarr;
* a QuPath GeoJSON FeatureCollection, one tile object per tile with its scores as measurements;
* a PNG overlay on the slide thumbnail, with a colour bar.

Every file is written under a hidden temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Normalisation = Literal["rank", "minmax", "raw"]
#: matplotlib's perceptually uniform sequential maps: equal steps in value look like equal steps
#: in colour and lightness rises monotonically, so a map reads the same in greyscale and to the
#: common colour-vision deficiencies (a rainbow such as jet invents edges where none are).
Colormap = Literal["viridis", "cividis", "magma", "inferno"]
#: The map of every overlay, colour bar and viewer layer unless one is chosen. Viridis rather than
#: magma / inferno: their near-black low end would darken the tissue under an overlay and their
#: near-white high end would vanish against glass and the white page.
DEFAULT_COLORMAP: Colormap = "viridis"

#: The unit of per-slide rank-normalised attention (``normalise_attention(method="rank")``).
ATTENTION_RANK_UNIT = "rank within the slide, (0, 1]"

#: Halve the grid for the OME-Zarr pyramid until its longer side is at most this many cells.
PYRAMID_MIN_SIDE = 64
PYRAMID_MAX_LEVELS = 6
#: Overlay PNGs are at least this many pixels on their long side (unless the image is smaller at
#: full resolution).
OVERLAY_MIN_SIDE = 1024
_DPI = 100
_PAD = 8  # px of white around the title and the colour bar
_TITLE_PT, _MIN_PT = 12.0, 5.0
_BAR_PX, _BAR_MAX_PX = 16, 480  # colour-bar thickness and longest length
_GEOJSON_BATCH = 20_000


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Heatmap:
    """Per-tile scores rasterised on the tile grid.

    Cell ``(row, col)`` covers level-0 pixels
    ``[origin_x + col * cell_x, origin_x + (col + 1) * cell_x)`` by the same in ``y``.

    Attributes
    ----------
    grid : (H, W) float32 ndarray; NaN where no tile covers the cell.
    origin_level0 : (x, y) level-0 pixel position of the top-left corner of cell (0, 0).
    cell_size_level0 : (x, y) cell size in level-0 pixels (the tiling stride).
    mpp : (x, y) micrometres per level-0 pixel.
    level0_size : (width, height) of the slide at level 0.
    tile_size_level0 : (x, y) size of one tile in level-0 pixels.
    n_tiles : number of tiles rasterised.
    value_unit : what the values are measured in (:data:`DENSITY_UNIT`,
        :data:`ATTENTION_RANK_UNIT`, ``"probability"``…), or None when not known; carried into
        every file written from the heatmap (and from its mapping onto an ultrasound frame).
    """

    grid: NDArray[np.float32]
    origin_level0: tuple[float, float]
    cell_size_level0: tuple[float, float]
    mpp: tuple[float, float]
    level0_size: tuple[int, int]
    tile_size_level0: tuple[float, float]
    n_tiles: int
    value_unit: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the grid."""
        h, w = self.grid.shape
        return int(h), int(w)

    @property
    def cell_size_um(self) -> tuple[float, float]:
        """(x, y) cell size in micrometres."""
        return (
            self.cell_size_level0[0] * self.mpp[0],
            self.cell_size_level0[1] * self.mpp[1],
        )

    @property
    def origin_um(self) -> tuple[float, float]:
        """(x, y) top-left corner of cell (0, 0) in micrometres from the slide's top-left corner."""
        return self.origin_level0[0] * self.mpp[0], self.origin_level0[1] * self.mpp[1]

    def cell_of(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Grid ``(row, col)`` holding level-0 point(s) ``(x, y)``.

        Points off the grid give indices outside ``[0, H) x [0, W)``; see :meth:`value_at`.
        """
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        col = np.floor((xa - self.origin_level0[0]) / self.cell_size_level0[0]).astype(np.int64)
        row = np.floor((ya - self.origin_level0[1]) / self.cell_size_level0[1]).astype(np.int64)
        return row, col

    def cell_origin_level0(
        self, row: ArrayLike, col: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Level-0 ``(x, y)`` of the top-left corner of cell(s) ``(row, col)``."""
        c = np.asarray(col, dtype=np.float64)
        r = np.asarray(row, dtype=np.float64)
        return (
            self.origin_level0[0] + c * self.cell_size_level0[0],
            self.origin_level0[1] + r * self.cell_size_level0[1],
        )

    def cell_centre_level0(
        self, row: ArrayLike, col: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Level-0 ``(x, y)`` of the centre of cell(s) ``(row, col)``."""
        x, y = self.cell_origin_level0(row, col)
        return x + 0.5 * self.cell_size_level0[0], y + 0.5 * self.cell_size_level0[1]

    def value_at(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float32]:
        """Heatmap value at level-0 point(s) ``(x, y)``; NaN off the grid or in empty cells."""
        row, col = self.cell_of(x, y)
        h, w = self.shape
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        out = np.full(np.shape(row), np.nan, dtype=np.float32)
        out[inside] = self.grid[row[inside], col[inside]]
        return out


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2:
        raise ValueError(f"{name} must be one number or an (x, y) pair, got {value!r}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(
            f"{name} must be positive, got {value!r}; pass the value from the store attrs."
        )
    return float(arr[0]), float(arr[1])


def _as_coords(coords: ArrayLike) -> NDArray[np.int64]:
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"coords must be an (N, 2) array of level-0 (x, y) tile corners, got shape {arr.shape}."
        )
    if arr.dtype.kind not in "iu" and (
        arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))
    ):
        raise ValueError(
            "coords must be whole level-0 pixels (int64, as in the store's `coords` array)."
        )
    return arr.astype(np.int64, copy=False)


def _as_scores(scores: ArrayLike | Mapping[str, Any], n: int, name: str = "scores") -> NDArray[Any]:
    if isinstance(scores, Mapping):
        raise TypeError(
            f"{name} is a mapping ({', '.join(map(str, scores))}): a multi-modal head returns one "
            "attention array per modality; pass the slide modality's array."
        )
    arr = np.asarray(scores)
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.size == n else arr
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"coords has {n} rows but {name} has shape {np.shape(scores)}: pass one score per "
            "tile, aligned row-for-row with coords."
        )
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    bad = ~np.isfinite(arr.astype(np.float64, copy=False))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf values (first at tile {first}); drop those "
            "tiles from coords and scores, or fix the model output."
        )
    return arr


def _grid_phase(values: NDArray[np.int64], step: float) -> float:
    """Offset of the tile grid from 0 along one axis (0 for grids cut by ``wsi.tile_coords``)."""
    phase = float(values.min()) % step
    # Grid positions are round(i * step): within half a pixel of the ideal lattice.
    return 0.0 if phase < 1.0 or phase > step - 1.0 else phase


def attention_heatmap(
    coords: ArrayLike,
    scores: ArrayLike,
    *,
    tile_size_level0: float | Sequence[float],
    level0_size: Sequence[int],
    mpp: float | Sequence[float],
    stride_level0: float | Sequence[float] | None = None,
    value_unit: str | None = None,
) -> Heatmap:
    """Rasterise per-tile scores on the tile grid.

    One cell per stride step. A tile covers the cells whose centres lie inside it, so with
    ``stride == tile size`` each tile fills one cell, and with half-overlapping tiles
    (``stride == tile / 2``) each tile fills 2 x 2 cells; a cell covered by several tiles holds
    their mean. Cells no tile covers are NaN.

    Parameters
    ----------
    coords : (N, 2) int64 ndarray, level-0 ``(x, y)`` of each tile's top-left corner; any
        subset of a regular grid (holes, single tiles).
    scores : (N,) float ndarray aligned with ``coords`` (e.g. :func:`normalise_attention`).
    tile_size_level0 : tile side in level-0 pixels (or ``(x, y)``), store attr of that name.
    level0_size : ``(width, height)`` of the slide at level 0.
    mpp : micrometres per level-0 pixel (or ``(x, y)``).
    stride_level0 : grid step in level-0 pixels (or ``(x, y)``); default the tile size.
    value_unit : the scores' unit, e.g. :data:`ATTENTION_RANK_UNIT` for rank-normalised
        attention; written into every file made from the heatmap.

    Returns
    -------
    Heatmap
        Grid of ``ceil((size - origin) / stride)`` cells per axis. The grid origin is 0 for
        grids cut by ``wsi.tile_coords``; otherwise it is the grid's offset found from coords.

    Raises
    ------
    ValueError
        Mismatched lengths, non-finite scores, non-positive sizes, tiles whose corner lies
        outside the slide, or coords that are not on the grid of ``stride_level0``.
    """
    xy = _as_coords(coords)
    n = xy.shape[0]
    values = _as_scores(scores, n).astype(np.float64, copy=False)
    if n == 0:
        raise ValueError("coords is empty: there are no tiles to draw a heatmap from.")
    tw, th = _pair(tile_size_level0, "tile_size_level0")
    sx, sy = (tw, th) if stride_level0 is None else _pair(stride_level0, "stride_level0")
    mx, my = _pair(mpp, "mpp")
    size = np.asarray(level0_size).ravel()
    if size.size != 2 or np.any(size <= 0):
        raise ValueError(f"level0_size must be a positive (width, height), got {level0_size!r}.")
    w0, h0 = int(size[0]), int(size[1])

    x, y = xy[:, 0], xy[:, 1]
    outside = (x < 0) | (y < 0) | (x >= w0) | (y >= h0)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{int(outside.sum())} of {n} tiles start outside the {w0} x {h0} slide (first: tile "
            f"{i} at x={int(x[i])}, y={int(y[i])}); coords must be level-0 pixels of this slide "
            "(check level0_size and that coords were not scaled to a lower level)."
        )

    ox, oy = _grid_phase(x, sx), _grid_phase(y, sy)
    fx, fy = (x - ox) / sx, (y - oy) / sy
    col, row = np.rint(fx).astype(np.int64), np.rint(fy).astype(np.int64)
    # round(i * stride) and the origin estimate are each within half a pixel of the lattice.
    tol_x, tol_y = min(2.0, sx / 4) / sx, min(2.0, sy / 4) / sy
    off = (np.abs(fx - col) > tol_x) | (np.abs(fy - row) > tol_y)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{int(off.sum())} of {n} tiles are not on a grid of stride ({sx:g}, {sy:g}) level-0 px "
            f"(first: x={int(x[i])}, y={int(y[i])}); pass stride_level0 from the store attrs "
            "(overlapping tiles are cut at a stride smaller than the tile size)."
        )

    width = math.ceil((w0 - ox) / sx)
    height = math.ceil((h0 - oy) / sy)
    # Cells whose centre lies inside the tile: k with (k + 0.5) * stride < tile size.
    kx = max(1, math.ceil(tw / sx - 0.5 - 1e-9))
    ky = max(1, math.ceil(th / sy - 0.5 - 1e-9))
    total = np.zeros(width * height, np.float64)
    count = np.zeros(width * height, np.float64)
    for dy in range(ky):
        r = row + dy
        for dx in range(kx):
            c = col + dx
            keep = (r < height) & (c < width)  # tiles overhanging the slide edge are clipped
            flat = r[keep] * width + c[keep]
            total += np.bincount(flat, weights=values[keep], minlength=width * height)
            count += np.bincount(flat, minlength=width * height)
    grid = np.full(width * height, np.nan, np.float32)
    hit = count > 0
    grid[hit] = total[hit] / count[hit]
    return Heatmap(
        grid=grid.reshape(height, width),
        origin_level0=(ox, oy),
        cell_size_level0=(sx, sy),
        mpp=(mx, my),
        level0_size=(w0, h0),
        tile_size_level0=(tw, th),
        n_tiles=n,
        value_unit=value_unit,
    )


def normalise_attention(scores: ArrayLike, method: Normalisation = "rank") -> NDArray[np.float32]:
    """Per-slide normalisation of attention scores for display.

    Parameters
    ----------
    scores : (N,) attention of one slide (one task, one modality).
    method :
        ``"rank"`` — percentile rank within the slide, ``rank / N`` with tied scores sharing
        their average rank, in ``(0, 1]``. This is what CLAM's heatmap code shows
        (``rankdata(scores, "average") / len(scores)``, there times 100): attention from a
        softmax over N tiles is ~1/N and heavy-tailed, so raw values make slides of different
        sizes incomparable and paint all but a handful of tiles the same colour. Ranks give an
        even colour spread and a meaning that carries across slides (top 10 % of this slide).
        ``"minmax"`` — ``(s - min) / (max - min)`` in ``[0, 1]``; 0.5 everywhere if all equal.
        ``"raw"`` — unchanged (as float32).

    Returns
    -------
    (N,) float32 ndarray.
    """
    arr = _as_scores(scores, int(np.size(scores))).astype(np.float64, copy=False).ravel()
    if method == "raw":
        return arr.astype(np.float32)
    if arr.size == 0:
        return np.zeros(0, np.float32)
    if method == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        if hi == lo:
            return np.full(arr.size, 0.5, np.float32)
        return ((arr - lo) / (hi - lo)).astype(np.float32)
    if method == "rank":
        from scipy.stats import rankdata

        return (rankdata(arr, method="average") / arr.size).astype(np.float32)
    raise ValueError(f"method must be 'rank', 'minmax' or 'raw', got {method!r}.")


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _temporary_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing a previous file or folder of that name."""
    if final.is_dir() and not final.is_symlink():
        old = _temporary_sibling(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``final``; rename it onto ``final`` when the block
    completes, delete it when the block raises (so no half-written file ever has the name)."""
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        _commit(tmp, final)
    except BaseException:
        _discard(tmp)
        raise


# --------------------------------------------------------------------------------------------
# OME-Zarr (NGFF 0.5)
# --------------------------------------------------------------------------------------------


def _halve_nanmean(a: NDArray[np.float32]) -> NDArray[np.float32]:
    """2 x 2 block mean ignoring NaN (odd edges padded with NaN); NaN where a block is empty."""
    h, w = a.shape
    padded = np.full((h + h % 2, w + w % 2), np.nan, np.float32)
    padded[:h, :w] = a
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    valid = ~np.isnan(blocks)
    n = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    out = np.full(n.shape, np.nan, np.float32)
    out[n > 0] = total[n > 0] / n[n > 0]
    return out


def _pyramid(grid: NDArray[np.float32]) -> list[NDArray[np.float32]]:
    levels = [grid]
    while max(levels[-1].shape) > PYRAMID_MIN_SIDE and len(levels) < PYRAMID_MAX_LEVELS:
        levels.append(_halve_nanmean(levels[-1]))
    return levels


def ngff_transforms(heatmap: Heatmap, level: int = 0) -> list[dict[str, Any]]:
    """NGFF ``coordinateTransformations`` (scale, translation; y then x) of a pyramid level.

    NGFF 0.5 does not say whether a pixel's coordinate is its centre or its corner; napari and
    ome-zarr-py's own pyramids (translation ``(factor - 1) / 2`` at each downsampled level) use
    the centre. So the translation is the micrometre position of the centre of cell (0, 0) in the
    frame where level-0 pixel (0, 0)'s centre is at 0 — a slide image written with scale = mpp
    and no translation lines up with the heatmap. ``origin_um`` of the grid's corner, in the
    corner frame, is ``translation - scale / 2 + mpp / 2``.
    """
    f = 2**level
    (sx, sy), (ox, oy), (mx, my) = heatmap.cell_size_level0, heatmap.origin_level0, heatmap.mpp
    return [
        {"type": "scale", "scale": [sy * f * my, sx * f * mx]},
        {
            "type": "translation",
            "translation": [(oy + sy * f / 2 - 0.5) * my, (ox + sx * f / 2 - 0.5) * mx],
        },
    ]


def write_ome_zarr(
    heatmap: Heatmap,
    path: str | Path,
    *,
    name: str,
    kind: str = "tile-grid heatmap",
    unit: str | None = None,
) -> Path:
    """Write the heatmap as an NGFF 0.5 multiscale OME-Zarr (Zarr v3), atomically.

    Layout: ``s0`` is the grid, ``s1``… halve it (NaN-aware 2 x 2 mean) until the longer side is
    at most ``PYRAMID_MIN_SIDE`` cells. float32, NaN (also the fill value) where no tile is.
    Axes ``y, x`` in micrometres; per level a ``scale`` (cell size in µm) and a ``translation``
    (see :func:`ngff_transforms`). The group's ``oncotrace`` attrs describe the grid in level-0
    pixels (origin, cell and tile size, mpp, slide size) so no reader needs the command line.

    Parameters
    ----------
    heatmap : from :func:`attention_heatmap`.
    path : destination folder, conventionally ``*.ome.zarr``; replaced if it exists.
    name : the multiscale's name (shown by viewers as the layer name).
    kind : what the values are, recorded in the attrs (e.g. ``"immune density"``).
    unit : the values' unit, recorded in the attrs (e.g. :data:`DENSITY_UNIT`, ``"cells/mm²"``);
        default ``heatmap.value_unit``.

    Returns
    -------
    Path of the finished store; :func:`read_heatmap` reads it back.
    """
    return _write_ngff_grid(
        path,
        heatmap.grid,
        lambda k: ngff_transforms(heatmap, k),
        unit="micrometer",
        name=name,
        attrs={
            "kind": kind,
            "name": name,
            "value_unit": unit if unit is not None else heatmap.value_unit,
            "empty_cells": "NaN",
            "origin_level0_xy": list(heatmap.origin_level0),
            "cell_size_level0_xy": list(heatmap.cell_size_level0),
            "tile_size_level0_xy": list(heatmap.tile_size_level0),
            "mpp_xy": list(heatmap.mpp),
            "level0_size": list(heatmap.level0_size),
            "n_tiles": heatmap.n_tiles,
            "pixel_convention": "translation = centre of cell (0, 0), level-0 pixel centres at "
            "integer multiples of mpp",
        },
    )


def _write_ngff_grid(
    path: str | Path,
    grid: NDArray[np.float32],
    transforms: Callable[[int], list[dict[str, Any]]],
    *,
    unit: str,
    name: str,
    attrs: Mapping[str, Any],
) -> Path:
    """Write ``grid`` and its NaN-aware pyramid as an NGFF 0.5 multiscale (Zarr v3), atomically.

    ``transforms(k)`` gives level ``k``'s coordinateTransformations; both axes are in ``unit``;
    ``attrs`` become the group's ``oncotrace`` attrs.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():
        # ome-zarr builds a deprecated Scaler as a default argument when the module is imported.
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_multiscales_metadata

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(final) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        datasets = []
        for k, level in enumerate(_pyramid(grid)):
            group.create_array(
                f"s{k}",
                data=np.ascontiguousarray(level, dtype=np.float32),
                chunks=(min(level.shape[0], 512), min(level.shape[1], 512)),
                fill_value=np.float32(np.nan),
                dimension_names=("y", "x"),
            )
            datasets.append({"path": f"s{k}", "coordinateTransformations": transforms(k)})
        write_multiscales_metadata(
            group,
            datasets=datasets,
            fmt=FormatV05(),
            axes=[
                {"name": "y", "type": "space", "unit": unit},
                {"name": "x", "type": "space", "unit": unit},
            ],
            name=name,
        )
        group.attrs["oncotrace"] = dict(attrs)
    return final


def read_heatmap(path: str | Path) -> Heatmap:
    """Read a heatmap written by :func:`write_ome_zarr` (full-resolution level ``s0``).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is a Zarr group without OncoTrace's grid attrs (e.g. an OME-Zarr written by
        another tool): its level-0 pixel frame cannot be recovered from scale/translation alone.
    """
    import zarr

    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such heatmap (expected an .ome.zarr folder)")
    try:
        group = zarr.open_group(src, mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a group
        raise ValueError(f"{src}: not a Zarr group ({exc}); pass an .ome.zarr heatmap") from exc
    meta = group.attrs.get("oncotrace")
    if not isinstance(meta, dict) or "origin_level0_xy" not in meta:
        raise ValueError(
            f"{src}: no OncoTrace grid attrs; pass a heatmap written by `oncotrace score` or "
            "`oncotrace immune` (attention.ome.zarr, density.ome.zarr)"
        )
    level0 = group.get("s0")
    if not isinstance(level0, zarr.Array):
        raise ValueError(f"{src}: no level s0; the heatmap store is incomplete, write it again")
    grid = np.asarray(level0[...], dtype=np.float32)
    return Heatmap(
        grid=grid,
        origin_level0=(float(meta["origin_level0_xy"][0]), float(meta["origin_level0_xy"][1])),
        cell_size_level0=(
            float(meta["cell_size_level0_xy"][0]),
            float(meta["cell_size_level0_xy"][1]),
        ),
        mpp=(float(meta["mpp_xy"][0]), float(meta["mpp_xy"][1])),
        level0_size=(int(meta["level0_size"][0]), int(meta["level0_size"][1])),
        tile_size_level0=(
            float(meta["tile_size_level0_xy"][0]),
            float(meta["tile_size_level0_xy"][1]),
        ),
        n_tiles=int(meta["n_tiles"]),
        value_unit=None if meta.get("value_unit") is None else str(meta["value_unit"]),
    )


# --------------------------------------------------------------------------------------------
# QuPath GeoJSON
# --------------------------------------------------------------------------------------------


def _number_strings(values: NDArray[Any]) -> list[str]:
    """Shortest exact text for each value (integers without a decimal point)."""
    if values.dtype.kind in "iu" or np.all(values == np.round(values)):
        return [str(v) for v in values.astype(np.int64).tolist()]
    if values.dtype == np.float32:
        return [format(v, ".9g") for v in values.tolist()]  # round-trips float32
    return [repr(v) for v in values.astype(np.float64).tolist()]


def write_geojson(
    path: str | Path,
    coords: ArrayLike,
    scores_by_name: Mapping[str, ArrayLike],
    *,
    tile_size_level0: float | Sequence[float],
    classification: str | Sequence[str] | None = None,
) -> Path:
    """Write tiles with their scores as a QuPath GeoJSON FeatureCollection, atomically.

    One ``Feature`` per tile: a closed ``Polygon`` ring ``(x, y), (x + w, y), (x + w, y + h),
    (x, y + h), (x, y)`` in level-0 pixels (QuPath's origin: top-left corner of the full-resolution
    image), and properties ``objectType: "tile"`` (QuPath builds a ``PathTileObject``, a detection,
    so measurement maps colour it), ``measurements: {name: value}`` (the dict form QuPath reads
    and writes since 0.4; older versions wrote a list of ``{name, value}``), and optionally
    ``classification: {"name": ...}``. Compact (no indentation), written in batches.

    Parameters
    ----------
    path : destination file (``*.geojson``); replaced if it exists.
    coords : (N, 2) int64 level-0 ``(x, y)`` top-left corners.
    scores_by_name : measurement name -> (N,) values aligned with ``coords`` (finite).
    tile_size_level0 : tile side in level-0 pixels (or ``(x, y)``).
    classification : one class name for every tile, or (N,) names, or None.

    Returns
    -------
    Path of the finished file.
    """
    xy = _as_coords(coords)
    n = xy.shape[0]
    tw, th = _pair(tile_size_level0, "tile_size_level0")
    if not scores_by_name:
        raise ValueError("scores_by_name is empty: pass at least one name -> (N,) scores.")
    columns = {
        str(k): _as_scores(v, n, f"scores_by_name[{k!r}]") for k, v in scores_by_name.items()
    }
    classes: list[str] | None = None
    if classification is not None:
        if isinstance(classification, str):
            classes = [classification] * n
        else:
            classes = [str(c) for c in classification]
            if len(classes) != n:
                raise ValueError(
                    f"classification has {len(classes)} names for {n} tiles: pass one name, or "
                    "one per tile aligned with coords."
                )

    def esc(text: str) -> str:  # JSON string, safe inside a %-template
        return json.dumps(text).replace("%", "%%")

    measurements = ",".join(f"{esc(k)}:%s" for k in columns)
    template = (
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":'
        "[[[%s,%s],[%s,%s],[%s,%s],[%s,%s],[%s,%s]]]},"
        '"properties":{"objectType":"tile",%s"measurements":{' + measurements + "}}}"
    )
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(final) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[')
        for start in range(0, n, _GEOJSON_BATCH):
            stop = min(n, start + _GEOJSON_BATCH)
            x0 = _number_strings(xy[start:stop, 0])
            y0 = _number_strings(xy[start:stop, 1])
            x1 = _number_strings(xy[start:stop, 0] + tw)
            y1 = _number_strings(xy[start:stop, 1] + th)
            if classes is None:
                cls = [""] * (stop - start)
            else:
                cls = [
                    '"classification":{"name":' + json.dumps(c) + "}," for c in classes[start:stop]
                ]
            vals = [_number_strings(col[start:stop]) for col in columns.values()]
            rows = zip(x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, cls, *vals, strict=True)
            if start:
                f.write(",")
            f.write(",".join(template % r for r in rows))
        f.write("]}")
    return final


# --------------------------------------------------------------------------------------------
# PNG overlay
# --------------------------------------------------------------------------------------------


def value_range(heatmap: Heatmap, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = heatmap.grid[np.isfinite(heatmap.grid)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:  # a constant map: any colour will do, but the colour bar needs a range
        hi = lo + 1.0
    return float(lo), float(hi)


def render_overlay(
    heatmap: Heatmap,
    thumbnail_rgb: ArrayLike,
    thumbnail_downsample: float | Sequence[float],
    *,
    alpha: float = 0.5,
    cmap: Colormap = DEFAULT_COLORMAP,
    vmin: float | None = None,
    vmax: float | None = None,
) -> NDArray[np.uint8]:
    """The thumbnail with the heatmap blended over it (nearest cell; NaN cells left as they are).

    Parameters
    ----------
    heatmap : from :func:`attention_heatmap`.
    thumbnail_rgb : (h, w, 3) uint8 overview of the slide.
    thumbnail_downsample : level-0 pixels per thumbnail pixel (the store's ``thumbnail``
        ``downsample`` attr), or ``(x, y)``.
    alpha : heatmap opacity in [0, 1].
    cmap : colour map (one of :data:`Colormap`).
    vmin, vmax : colour range; default the heatmap's finite min and max.

    Returns
    -------
    (h, w, 3) uint8 ndarray.
    """
    from matplotlib import colormaps

    thumb = _check_thumbnail(thumbnail_rgb)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    dx, dy = _pair(thumbnail_downsample, "thumbnail_downsample")
    h, w = thumb.shape[:2]
    gh, gw = heatmap.shape
    # Centre of each thumbnail pixel in level-0 pixels -> the cell holding it.
    row, _ = heatmap.cell_of(0.0, (np.arange(h) + 0.5) * dy)
    _, col = heatmap.cell_of((np.arange(w) + 0.5) * dx, 0.0)
    row_ok, col_ok = (row >= 0) & (row < gh), (col >= 0) & (col < gw)
    lo, hi = value_range(heatmap, vmin, vmax)
    # Colour the small grid once through a 256-entry table, then index it per thumbnail pixel.
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    finite = np.isfinite(heatmap.grid)
    level = np.clip((np.nan_to_num(heatmap.grid, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    index = np.rint(level * 255).astype(np.uint8)
    ri, ci = np.clip(row, 0, gh - 1), np.clip(col, 0, gw - 1)
    a = round(alpha * 256)
    out = thumb.copy()
    for top in range(0, h, 256):  # row blocks keep the uint16 temporaries to a few MB
        rows = slice(top, min(h, top + 256))
        cells = np.ix_(ri[rows], ci)
        show = finite[cells] & row_ok[rows, None] & col_ok[None, :]
        colour = lut[index[cells]].astype(np.uint16)
        mixed = (thumb[rows].astype(np.uint16) * (256 - a) + colour * a) >> 8
        out[rows][show] = mixed[show].astype(np.uint8)
    return out


def _check_thumbnail(thumbnail_rgb: ArrayLike) -> NDArray[np.uint8]:
    thumb = np.asarray(thumbnail_rgb)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4) or thumb.dtype != np.uint8:
        raise ValueError(
            f"thumbnail_rgb must be an (h, w, 3) uint8 image, got {thumb.shape} {thumb.dtype}."
        )
    return thumb[..., :3]


def _enlarge(
    thumb: NDArray[np.uint8], downsample: tuple[float, float], min_side: int
) -> tuple[NDArray[np.uint8], tuple[float, float]]:
    """``thumb`` resampled (Lanczos) so its long side is ``min_side`` px, or the level-0 pixels
    it spans if fewer; never shrunk. Returns the image and its level-0 px per pixel."""
    from PIL import Image

    h, w = thumb.shape[:2]
    dx, dy = downsample
    target = min(min_side, math.floor(max(w * dx, h * dy)))
    if target <= max(h, w):
        return thumb, downsample
    f = target / max(h, w)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    big = np.asarray(
        Image.fromarray(np.ascontiguousarray(thumb)).resize((nw, nh), Image.Resampling.LANCZOS)
    )
    return big, (dx * w / nw, dy * h / nh)


def _agg_figure(width: int, height: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig: Any, rows: slice, cols: slice) -> NDArray[np.uint8]:
    """Draw ``fig`` (Agg) and return that part of it as RGB."""
    fig.canvas.draw()
    return np.array(np.asarray(fig.canvas.buffer_rgba())[rows, cols, :3])


def _wrap_to(text: Any, content: str, max_px: float, along: Callable[[Any], float]) -> bool:
    """Set ``text`` to ``content`` broken at spaces into lines no longer than ``max_px`` (measured
    with ``along(extent)``); False if a single word is longer still."""
    renderer = text.figure.canvas.get_renderer()
    lines: list[str] = []
    for word in content.split():
        if lines:
            text.set_text(f"{lines[-1]} {word}")
            if along(text.get_window_extent(renderer)) <= max_px:
                lines[-1] = f"{lines[-1]} {word}"
                continue
        lines.append(word)
    text.set_text("\n".join(lines))
    return along(text.get_window_extent(renderer)) <= max_px


def _fit(text: Any, content: str, max_px: float, along: Callable[[Any], float]) -> None:
    """Wrap ``text``, and shrink it if one word is too long, so it fits in ``max_px``."""
    size = float(text.get_fontsize())
    while not _wrap_to(text, content, max_px, along) and size > _MIN_PT:
        size = max(_MIN_PT, size * 0.85)
        text.set_fontsize(size)


def _title_band(title: str, width: int) -> NDArray[np.uint8]:
    """``title`` centred in a band ``width`` px wide and as tall as its (wrapped) lines."""
    fig = _agg_figure(width, 100)
    text = fig.text(0.5, 0.5, "", ha="center", va="center", fontsize=_TITLE_PT)
    _fit(text, title, width - 2 * _PAD, lambda box: box.width)
    height = math.ceil(text.get_window_extent(fig.canvas.get_renderer()).height) + 2 * _PAD
    fig.set_size_inches(width / _DPI, height / _DPI)
    return _pixels(fig, slice(0, height), slice(0, width))


def _colour_bar(
    length: int,
    horizontal: bool,
    lo: float,
    hi: float,
    cmap: Colormap,
    label: str,
) -> NDArray[np.uint8]:
    """A colour-bar strip ``length`` px long (the overlay side it sits along) and as deep as its
    ticks and label need. The bar itself is at most 80 % of ``length`` and ``_BAR_MAX_PX``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = min(_BAR_MAX_PX, 0.8 * length)
    depth = 256
    while True:
        w, h = (length, depth) if horizontal else (depth, length)
        fig = _agg_figure(w, h)
        if horizontal:  # along the top edge, ticks and label below it
            rect = ((length - bar) / 2 / w, 1 - (_PAD + _BAR_PX) / h, bar / w, _BAR_PX / h)
        else:  # along the left edge, ticks and label to its right
            rect = (_PAD / w, (length - bar) / 2 / h, _BAR_PX / w, bar / h)
        cax = fig.add_axes(rect)
        cb = fig.colorbar(
            ScalarMappable(norm=Normalize(lo, hi), cmap=cmap),
            cax=cax,
            orientation="horizontal" if horizontal else "vertical",
        )
        cb.set_label(label)
        axis_label = (cax.xaxis if horizontal else cax.yaxis).label
        _fit(
            axis_label,
            label,
            length - 2 * _PAD,
            (lambda box: box.width) if horizontal else (lambda box: box.height),
        )
        fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        used = math.ceil((h / _DPI - box.y0) * _DPI if horizontal else box.x1 * _DPI) + _PAD
        if used <= depth:
            break
        depth *= 2  # long tick labels: draw again with room for them
    if horizontal:
        return _pixels(fig, slice(0, used), slice(0, length))
    return _pixels(fig, slice(0, length), slice(0, used))


def write_overlay_png(
    heatmap: Heatmap,
    thumbnail_rgb: ArrayLike,
    thumbnail_downsample: float | Sequence[float],
    path: str | Path,
    *,
    alpha: float = 0.5,
    cmap: Colormap = DEFAULT_COLORMAP,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "attention",
    max_side: int | None = 2048,
    min_side: int | None = OVERLAY_MIN_SIDE,
) -> Path:
    """Write :func:`render_overlay` as a PNG with a colour bar (and a title), atomically.

    The overlay sits at the left edge below the title, one overlay pixel per PNG pixel; the
    colour bar runs along its longer side (below a wide overlay, right of a tall one). The title
    is wrapped (and if need be shrunk) to the PNG's width, never cut off.

    A thumbnail longer than ``max_side`` pixels is first subsampled by the smallest whole factor
    that fits (``None``: never), which bounds time and memory on very large slides. One shorter
    than ``min_side`` is resampled up to it (Lanczos; the heatmap is then drawn on the finer
    grid), but never past the level-0 pixels it spans: an image smaller than ``min_side`` at
    full resolution (an ultrasound frame, downsample 1) stays 1:1. ``None``: never.

    Returns
    -------
    Path of the finished file.
    """
    from PIL import Image

    thumb = _check_thumbnail(thumbnail_rgb)
    dx, dy = _pair(thumbnail_downsample, "thumbnail_downsample")
    step = 1 if max_side is None else math.ceil(max(thumb.shape[:2]) / max_side)
    if step > 1:  # keep the middle pixel of each step x step block
        thumb = thumb[step // 2 :: step, step // 2 :: step]
        dx, dy = dx * step, dy * step
    if min_side is not None:
        thumb, (dx, dy) = _enlarge(thumb, (dx, dy), min_side)
    image = render_overlay(heatmap, thumb, (dx, dy), alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax)
    lo, hi = value_range(heatmap, vmin, vmax)
    h, w = image.shape[:2]
    # The overlay goes into the canvas as pixels; matplotlib draws only the colour bar and the
    # title (drawing a multi-megapixel image through Agg costs ~10x the rest together).
    horizontal = w >= h
    bar = _colour_bar(w if horizontal else h, horizontal, lo, hi, cmap, label)
    body = np.concatenate([image, bar], axis=0 if horizontal else 1)
    if title:
        body = np.concatenate([_title_band(title, body.shape[1]), body], axis=0)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(final) as tmp:
        Image.fromarray(body).save(tmp, format="PNG", compress_level=1)
    return final
