"""Write a large JPEG-tiled, Aperio-style pyramidal slide made of real tissue texture.

The slide is a BigTIFF that OpenSlide opens as vendor ``aperio`` and cuCIM opens natively:

* page 0: level 0, 256-px JPEG tiles, ImageDescription ``Aperio Image Library …|AppMag = 20|MPP = 0.5``;
* page 1: a stripped JPEG thumbnail (Aperio keeps it there; OpenSlide lists it as ``thumbnail``);
* pages 2…: the reduced levels (downsample 4, 16, 64, … like Aperio), tiled, NewSubfileType 0
  as Aperio writes them.

Tissue is a handful of large irregular blobs (≈ 40–60 % of the area) on a white (≈ 240) background
with slight noise. Inside the blobs the pixels come from dense tissue crops of the cmu-1 region,
mirror-tiled (seamless), with each patch of a Voronoi partition using its own crop, transpose,
colour gain and offset so the slide is not one periodic repeat.

Nothing of size ``width × height`` is ever held in memory: every pyramid level is produced tile by
tile straight from the blob field, the Voronoi partition and a pre-downsampled copy of each texture,
so the levels agree with each other (texture block means are exact because crops and offsets are
multiples of 64 px). JPEG encoding runs in a small thread pool; fully-background tiles reuse a few
pre-encoded variants.

JPEG colour space: ``jpeg_colorspace="rgb"`` (default) stores PhotometricInterpretation RGB with an
RGB-domain 4:4:4 JPEG stream — what Aperio scanners write — and OpenSlide, cuCIM and tifffile all
decode it identically. ``"ycbcr"`` stores PhotometricInterpretation YCbCr with 4:2:0 JPEG (smaller,
faster to decode); the readers also agree on it. Writing an RGB tag over a YCbCr stream is wrong in
every reader.

Usage::

    python -m bench.make_slide bench/_data/synthetic-50k.svs --size 50000 --verify
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

TILE = 256
#: Blob field grid spacing in level-0 pixels; also the alignment of texture crops and offsets,
#: so every pyramid level (downsample ≤ 64) is an exact block mean of the level below.
CELL = 64
#: Spacing of the Voronoi seeds whose cells each get their own texture variant, level-0 px.
PATCH = 4096
BACKGROUND = 240.0
DEFAULT_SOURCE = "/work/shared/data/slides/cmu-1-small-region.svs"


# --------------------------------------------------------------------------------------------
# texture
# --------------------------------------------------------------------------------------------
def _load_source(source: str | Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(source) as tf:
        img = tf.pages.first.asarray()
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"{source}: expected an RGB image, got shape {img.shape}")
    img = img[..., :3]
    h = img.shape[0] // CELL * CELL
    w = img.shape[1] // CELL * CELL
    if h < 8 * CELL or w < 8 * CELL:
        raise ValueError(
            f"{source}: {img.shape[1]}×{img.shape[0]} px is too small for a texture source"
        )
    return np.ascontiguousarray(img[:h, :w])


def _tissue_blocks(img: np.ndarray) -> np.ndarray:
    """Fraction of tissue pixels per CELL×CELL block (saturated or dark = tissue)."""
    mx = img.max(-1).astype(np.int16)
    mn = img.min(-1).astype(np.int16)
    sat = (mx - mn) / np.maximum(mx, 1)
    tissue = (sat > 0.08) | (img.mean(-1) < 200)
    bh, bw = img.shape[0] // CELL, img.shape[1] // CELL
    return tissue.reshape(bh, CELL, bw, CELL).mean(axis=(1, 3))


def _dense_crops(
    blocks: np.ndarray, rng: np.random.Generator, n: int
) -> list[tuple[int, int, int, int]]:
    """``n`` crops (y, x, h, w in blocks) of ≥ 10×10 blocks, aspect ≤ 1.6, densest first-ish."""
    ii = np.pad(blocks.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    bh, bw = blocks.shape
    cands: list[tuple[float, int, int, int, int]] = []
    for h in range(10, bh + 1):
        for w in range(10, bw + 1):
            if max(h, w) / min(h, w) > 1.6:
                continue
            s = ii[h:, w:] - ii[:-h, w:] - ii[h:, :-w] + ii[:-h, :-w]
            m = s[: bh - h + 1, : bw - w + 1] / (h * w)
            ys, xs = np.nonzero(m >= 0.8)
            cands.extend(
                (float(m[y, x]), int(y), int(x), h, w) for y, x in zip(ys, xs, strict=True)
            )
    if not cands:  # a sparse source: fall back to the whole image
        return [(0, 0, bh, bw)] * n
    # prefer large crops, then pick a varied set among the biggest quarter
    cands.sort(key=lambda c: c[3] * c[4], reverse=True)
    pool = cands[: max(n, len(cands) // 4)]
    picks = rng.choice(len(pool), size=n, replace=len(pool) < n)
    return [pool[i][1:] for i in picks]


def _pyramid(img: np.ndarray, downsamples: list[int]) -> dict[int, np.ndarray]:
    """Exact block means of ``img`` (sides multiples of every downsample), rounded to uint8."""
    out: dict[int, np.ndarray] = {}
    acc = img.astype(np.float32)
    d_acc = 1
    for d in sorted(downsamples):
        while d_acc < d:
            f = 2 if (d // d_acc) % 2 == 0 else d // d_acc
            h, w = acc.shape[0] // f, acc.shape[1] // f
            acc = acc.reshape(h, f, w, f, 3).sum(axis=3).sum(axis=1) / (f * f)
            d_acc *= f
        out[d] = img if d == 1 else np.rint(acc).astype(np.uint8)
    return out


@dataclass
class _Variant:
    """One texture: mirrored 2×2 period, block-averaged per pyramid level, wrap-padded by a tile."""

    levels: dict[int, np.ndarray]  # downsample -> (2h/d + TILE, 2w/d + TILE, 3) uint8
    period: dict[int, tuple[int, int]]  # downsample -> (2h/d, 2w/d)

    def window(self, d: int, y: int, x: int) -> np.ndarray:
        """TILE×TILE view at level-``d`` texture coordinates (y, x) (any integers)."""
        ph, pw = self.period[d]
        y %= ph
        x %= pw
        return self.levels[d][y : y + TILE, x : x + TILE]


def _make_variants(
    src: np.ndarray, rng: np.random.Generator, n: int, downsamples: list[int]
) -> list[_Variant]:
    crops = _dense_crops(_tissue_blocks(src), rng, n)
    out = []
    for y, x, h, w in crops:
        tex = src[y * CELL : (y + h) * CELL, x * CELL : (x + w) * CELL]
        if rng.random() < 0.5:
            tex = tex.transpose(1, 0, 2)
        if rng.random() < 0.5:
            tex = tex[::-1]
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
        # slight stain variation between patches (scanner/section differences)
        # (applied to 255 - value, a proxy for stain density, so glass inside the tissue stays white)
        gain = (1.0 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
        tex = (
            np.clip(255.0 - (255.0 - tex.astype(np.float32)) * gain, 0, 255)
            .round()
            .astype(np.uint8)
        )
        levels, period = {}, {}
        for d, small in _pyramid(tex, downsamples).items():
            # mirroring commutes with block means because the crop sides are multiples of 64
            m = np.concatenate([small, small[::-1]], axis=0)
            m = np.concatenate([m, m[:, ::-1]], axis=1)
            period[d] = (m.shape[0], m.shape[1])
            reps_y = math.ceil((m.shape[0] + TILE) / m.shape[0])
            reps_x = math.ceil((m.shape[1] + TILE) / m.shape[1])
            levels[d] = np.ascontiguousarray(
                np.tile(m, (reps_y, reps_x, 1))[: m.shape[0] + TILE, : m.shape[1] + TILE]
            )
        out.append(_Variant(levels, period))
    return out


# --------------------------------------------------------------------------------------------
# geometry: blob field and Voronoi partition, both defined in level-0 pixels
# --------------------------------------------------------------------------------------------
def _blob_field(
    width: int, height: int, rng: np.random.Generator, target: float
) -> tuple[np.ndarray, float]:
    """Field on a CELL grid (nodes at multiples of CELL) and the threshold giving ``target`` area.

    The field is roughly a signed distance in level-0 px: the max over a few star-shaped blobs
    (radius varying with angle by low harmonics), displaced by smooth noise at three scales
    (slide-relative lobes, ~0.3 mm bays, ~60 µm edge roughness).
    """
    from scipy.ndimage import gaussian_filter

    ny, nx = height // CELL + 2, width // CELL + 2
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32) * CELL
    side = float(min(width, height))
    # one blob per cell of a 2×2 or 2×3 layout (a cell may stay empty), centres jittered
    rows, cols = (2, 3) if rng.random() < 0.5 else (2, 2)
    if width > height:
        rows, cols = min(rows, cols), max(rows, cols)
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    drop = int(rng.integers(0, 2)) if len(cells) > 3 else 0
    keep = rng.permutation(len(cells))[: len(cells) - drop]
    field = np.full((ny, nx), -np.inf, np.float32)
    for i in keep:
        r, c = cells[i]
        cy = (r + 0.5 + rng.uniform(-0.15, 0.15)) / rows * height
        cx = (c + 0.5 + rng.uniform(-0.15, 0.15)) / cols * width
        r0 = rng.uniform(0.8, 1.2) * 0.5 * min(width / cols, height / rows)
        ang = np.arctan2(yy - cy, xx - cx)
        rad = np.ones_like(ang)
        for harm in range(2, 7):
            rad += (
                rng.uniform(0.04, 0.18) / harm**0.5 * np.cos(harm * ang + rng.uniform(0, 2 * np.pi))
            )
        field = np.maximum(field, r0 * rad - np.hypot(yy - cy, xx - cx))
    for sigma_px, amp_px in ((0.05 * side, 0.02 * side), (600.0, 250.0), (128.0, 48.0)):
        noise = gaussian_filter(
            rng.standard_normal((ny, nx)).astype(np.float32), sigma_px / CELL, mode="wrap"
        )
        field += amp_px * noise / (noise.std() + 1e-6)
    # keep a margin of glass around the tissue
    edge = np.minimum.reduce([yy, xx, height - yy, width - xx]) / (0.04 * side)
    field -= np.clip(1.0 - edge, 0, 1) * 0.2 * side
    inside = field[: height // CELL, : width // CELL]
    thr = float(np.quantile(inside, 1.0 - target))
    return field, thr


def _bilinear_matrix(coords: np.ndarray, j_lo: int, n_nodes: int) -> np.ndarray:
    """(len(coords), n_nodes) weights interpolating grid nodes j_lo… at level-0 ``coords``."""
    g = coords / CELL
    j0 = np.floor(g).astype(np.int64)
    f = (g - j0).astype(np.float32)
    m = np.zeros((len(coords), n_nodes), np.float32)
    rows = np.arange(len(coords))
    m[rows, j0 - j_lo] = 1.0 - f
    m[rows, j0 + 1 - j_lo] += f
    return m


@dataclass
class _Geometry:
    width: int
    height: int
    field: np.ndarray
    thr: float
    edge_per_px: float  # field change per level-0 px near the threshold
    seeds: np.ndarray  # (gy, gx, 2) level-0 (x, y)
    seed_variant: np.ndarray  # (gy, gx) int
    seed_offset: np.ndarray  # (gy, gx, 2) level-0 (ox, oy), multiples of CELL
    bg_noise: np.ndarray  # (k, TILE, TILE, 3) uint8


def _make_geometry(width: int, height: int, rng: np.random.Generator, n_variants: int) -> _Geometry:
    target = float(rng.uniform(0.45, 0.55))
    field, thr = _blob_field(width, height, rng, target)
    gy, gx = np.gradient(field)
    near = np.abs(field - thr) < 0.05
    grad = float(np.median(np.hypot(gy, gx)[near])) if near.any() else 0.01
    ny, nx = math.ceil(height / PATCH), math.ceil(width / PATCH)
    base_y = (np.arange(ny)[:, None] + 0.5) * PATCH
    base_x = (np.arange(nx)[None, :] + 0.5) * PATCH
    jit = rng.uniform(-0.35, 0.35, (ny, nx, 2)) * PATCH
    seeds = (
        np.stack([np.broadcast_to(base_x, (ny, nx)), np.broadcast_to(base_y, (ny, nx))], -1) + jit
    )
    bg = np.clip(rng.normal(BACKGROUND, 1.5, (8, TILE, TILE, 3)), 0, 255).round().astype(np.uint8)
    return _Geometry(
        width=width,
        height=height,
        field=field,
        thr=thr,
        edge_per_px=max(grad / CELL, 1e-7),
        seeds=seeds.astype(np.float64),
        seed_variant=rng.integers(0, n_variants, (ny, nx)),
        seed_offset=rng.integers(0, 1 << 14, (ny, nx, 2)) * CELL,
        bg_noise=bg,
    )


def _seed_ids(geo: _Geometry, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Flat index of the nearest Voronoi seed for every level-0 point of the grid ``cy × cx``.

    Returns a (len(cy), len(cx)) int64 array. Candidates are the seeds within two PATCH cells of
    the grid's bounding box (exact for seed jitter ≤ 0.35 PATCH), pruned by distance bounds.
    """
    ny, nx = geo.seed_variant.shape
    gy0, gy1 = max(int(cy[0] // PATCH) - 2, 0), min(int(cy[-1] // PATCH) + 2, ny - 1)
    gx0, gx1 = max(int(cx[0] // PATCH) - 2, 0), min(int(cx[-1] // PATCH) + 2, nx - 1)
    ys, xs = np.mgrid[gy0 : gy1 + 1, gx0 : gx1 + 1]
    ids = (ys * nx + xs).ravel()
    pts = geo.seeds.reshape(-1, 2)[ids]
    sx, sy = pts[:, 0], pts[:, 1]
    dx_min = np.maximum.reduce([cx[0] - sx, sx - cx[-1], np.zeros_like(sx)])
    dy_min = np.maximum.reduce([cy[0] - sy, sy - cy[-1], np.zeros_like(sy)])
    dx_max = np.maximum(np.abs(sx - cx[0]), np.abs(sx - cx[-1]))
    dy_max = np.maximum(np.abs(sy - cy[0]), np.abs(sy - cy[-1]))
    keep = dx_min**2 + dy_min**2 <= (dx_max**2 + dy_max**2).min()
    ids, sx, sy = ids[keep], sx[keep], sy[keep]
    best = np.full((len(cy), len(cx)), np.inf)
    out = np.full((len(cy), len(cx)), ids[0], np.int64)
    if len(ids) == 1:
        return out
    for sid, px, py in zip(ids, sx, sy, strict=True):
        d2 = (cy[:, None] - py) ** 2 + (cx[None, :] - px) ** 2
        better = d2 < best
        best[better] = d2[better]
        out[better] = sid
    return out


# --------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------
@dataclass
class _Level:
    d: int  # downsample
    width: int
    height: int

    @property
    def tiles_x(self) -> int:
        return math.ceil(self.width / TILE)

    @property
    def tiles_y(self) -> int:
        return math.ceil(self.height / TILE)


def _render_tile(
    geo: _Geometry, variants: list[_Variant], lv: _Level, tx: int, ty: int
) -> tuple[np.ndarray | None, float]:
    """One tile of level ``lv``: (RGB uint8 tile or None for pure background, tissue px in-bounds)."""
    d = lv.d
    x0, y0 = tx * TILE, ty * TILE
    w_in = min(TILE, lv.width - x0)
    h_in = min(TILE, lv.height - y0)
    # level-0 centres of the tile's pixels
    cx = (np.arange(x0, x0 + TILE) + 0.5) * d
    cy = (np.arange(y0, y0 + TILE) + 0.5) * d
    jx0, jx1 = int(cx[0] // CELL), int(cx[-1] // CELL) + 1
    jy0, jy1 = int(cy[0] // CELL), int(cy[-1] // CELL) + 1
    fh, fw = geo.field.shape
    jx1c, jy1c = min(jx1, fw - 1), min(jy1, fh - 1)
    patch = geo.field[min(jy0, fh - 1) : jy1c + 1, min(jx0, fw - 1) : jx1c + 1]
    # soft edge about one output pixel wide, so reduced levels look like block means
    eps = geo.edge_per_px * d * 1.5
    lo_edge, hi_edge = geo.thr - eps / 2, geo.thr + eps / 2
    if patch.size == 0 or patch.max() <= lo_edge:
        return None, 0.0
    full_tissue = patch.min() >= hi_edge
    if full_tissue:
        alpha = None
    else:
        cxf = np.minimum(cx, (fw - 1) * CELL - 1e-3)
        cyf = np.minimum(cy, (fh - 1) * CELL - 1e-3)
        ax = _bilinear_matrix(cxf, jx0, jx1c - jx0 + 1)
        ay = _bilinear_matrix(cyf, jy0, jy1c - jy0 + 1)
        f = ay @ patch @ ax.T
        alpha = np.clip((f - lo_edge) / eps, 0.0, 1.0)
        if not alpha.any():
            return None, 0.0
    # Voronoi patch ids: cells are convex, so equal corners mean one id for the whole tile
    corners = _seed_ids(geo, cx[[0, -1]], cy[[0, -1]])
    if (corners == corners[0, 0]).all():
        tex = _texture(geo, variants, d, int(corners[0, 0]), x0, y0)
    else:
        ids = _seed_ids(geo, cx, cy)
        tex = np.empty((TILE, TILE, 3), np.uint8)
        for sid in np.unique(ids):
            sel = ids == sid
            tex[sel] = _texture(geo, variants, d, int(sid), x0, y0)[sel]
    if alpha is None:
        return np.ascontiguousarray(tex), float(w_in * h_in)
    bg = geo.bg_noise[(tx * 7 + ty * 13 + d) % len(geo.bg_noise)]
    a = alpha[..., None]
    out = bg + a * (tex.astype(np.float32) - bg)
    return np.rint(out).astype(np.uint8), float(alpha[:h_in, :w_in].sum())


def _texture(
    geo: _Geometry, variants: list[_Variant], d: int, sid: int, x0: int, y0: int
) -> np.ndarray:
    v = variants[int(geo.seed_variant.flat[sid])]
    ox, oy = geo.seed_offset.reshape(-1, 2)[sid]
    return v.window(d, y0 + int(oy) // d, x0 + int(ox) // d)


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Any, items: Iterator[Any], window: int
) -> Iterator[Any]:
    """Like ``pool.map`` but never more than ``window`` results in flight (memory stays flat)."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Encoder:
    def __init__(self, quality: int, colorspace: str) -> None:
        import imagecodecs

        self._enc = imagecodecs.jpeg8_encode
        self.quality = quality
        self.out = "RGB" if colorspace == "rgb" else "YCBCR"
        self.subsampling = (1, 1) if colorspace == "rgb" else (2, 2)

    def __call__(self, tile: np.ndarray) -> bytes:
        return bytes(
            self._enc(
                tile,
                level=self.quality,
                colorspace="RGB",
                outcolorspace=self.out,
                subsampling=self.subsampling,
            )
        )


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------
def _aperio_description(
    width: int,
    height: int,
    level: _Level | None,
    mpp: float,
    quality: int,
    seed: int,
    thumb: tuple[int, int] | None = None,
) -> str:
    head = "Aperio Image Library v12.0.15 \r\n"
    if thumb is not None:
        body = f"{width}x{height} -> {thumb[0]}x{thumb[1]} - "
    elif level is None or level.d == 1:
        body = f"{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    else:
        body = f"{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) -> {level.width}x{level.height} JPEG/RGB Q={quality}"
    app_mag = 10.0 / mpp
    mag = f"{app_mag:.0f}" if abs(app_mag - round(app_mag)) < 1e-6 else f"{app_mag:g}"
    fields = [
        f"AppMag = {mag}",
        f"MPP = {mpp:g}",
        "ScanScope ID = ONCOTRACE-SYNTHETIC",
        f"Filename = synthetic-seed{seed}",
        "Title = OncoTrace benchmark slide (cmu-1 texture)",
    ]
    return head + body + "|" + "|".join(fields)


def make_svs_like(
    path: str | Path,
    *,
    width: int = 50_000,
    height: int = 50_000,
    mpp: float = 0.5,
    tile: int = 256,
    quality: int = 80,
    seed: int = 0,
    source: str | Path = DEFAULT_SOURCE,
    jpeg_colorspace: Literal["rgb", "ycbcr"] = "rgb",
    workers: int | None = None,
    n_variants: int = 8,
) -> dict[str, Any]:
    """Write an Aperio-like JPEG-tiled pyramidal BigTIFF of synthetic tissue.

    Parameters
    ----------
    path : output file (``.svs``); its parent is created.
    width, height : level-0 size in pixels.
    mpp : level-0 µm/px written into the Aperio description (``AppMag = 10 / mpp``).
    tile : tile side; only 256 (the Aperio value) is supported.
    quality : JPEG quality.
    seed : everything random (blob shapes, crops, offsets, noise) derives from it.
    source : RGB slide whose first page supplies the tissue texture.
    jpeg_colorspace : ``"rgb"`` (Aperio: RGB tag, RGB-domain 4:4:4 JPEG) or ``"ycbcr"``.
    workers : JPEG-encoding threads (default: CPU count).

    Returns
    -------
    dict
        ``path``, ``size`` (w, h), ``mpp``, ``tissue_fraction`` (level-0 blob area over slide
        area), ``levels`` ((w, h) per level), ``downsamples``, ``file_bytes``, ``seconds``, ``seed``.
    """
    import tifffile

    if tile != TILE:
        raise ValueError(f"only {TILE}-px tiles are supported (Aperio's size), got {tile}")
    if jpeg_colorspace not in ("rgb", "ycbcr"):
        raise ValueError(f"jpeg_colorspace must be 'rgb' or 'ycbcr', got {jpeg_colorspace!r}")
    if width < 2 * TILE or height < 2 * TILE:
        raise ValueError(f"slide must be at least {2 * TILE} px per side, got {width}×{height}")
    t_start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    levels = [_Level(1, width, height)]
    while max(levels[-1].width, levels[-1].height) > 2 * TILE and levels[-1].d < 64:
        d = levels[-1].d * 4
        levels.append(_Level(d, max(1, width // d), max(1, height // d)))

    src = _load_source(source)
    variants = _make_variants(src, rng, n_variants, [lv.d for lv in levels])
    geo = _make_geometry(width, height, rng, n_variants)
    encoder = _Encoder(quality, jpeg_colorspace)
    bg_jpeg = [encoder(np.ascontiguousarray(b)) for b in geo.bg_noise]
    tissue_px = [0.0]

    def render_row(args: tuple[_Level, int]) -> tuple[list[bytes], float]:
        lv, ty = args
        row, tissue = [], 0.0
        for tx in range(lv.tiles_x):
            img, t = _render_tile(geo, variants, lv, tx, ty)
            tissue += t
            row.append(
                bg_jpeg[(tx * 7 + ty * 13 + lv.d) % len(bg_jpeg)] if img is None else encoder(img)
            )
        return row, tissue

    def render_array(lv: _Level) -> np.ndarray:
        out = np.empty((lv.tiles_y * TILE, lv.tiles_x * TILE, 3), np.uint8)
        for ty in range(lv.tiles_y):
            for tx in range(lv.tiles_x):
                img, _ = _render_tile(geo, variants, lv, tx, ty)
                bg = geo.bg_noise[(tx * 7 + ty * 13 + lv.d) % len(geo.bg_noise)]
                out[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE] = (
                    bg if img is None else img
                )
        return out[: lv.height, : lv.width]

    n_workers = workers or os.cpu_count() or 2
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "metadata": None,  # no tifffile JSON description: the Aperio one must be the only one
        "resolution": (1e4 / mpp, 1e4 / mpp),
        "resolutionunit": "CENTIMETER",
    }
    if jpeg_colorspace == "rgb":
        common.update(
            subsampling=(1, 1), compressionargs={"level": quality, "outcolorspace": "RGB"}
        )
    else:
        common.update(
            subsampling=(2, 2), compressionargs={"level": quality, "outcolorspace": "YCBCR"}
        )

    # the smallest level is tiny: render it up front for the thumbnail (Aperio's page 1)
    smallest = render_array(levels[-1])
    tscale = 768 / max(width, height)
    thumb_size = (max(1, round(width * tscale)), max(1, round(height * tscale)))
    from PIL import Image

    thumb = np.asarray(Image.fromarray(smallest).resize(thumb_size, Image.Resampling.BOX))

    with tifffile.TiffWriter(path, bigtiff=True) as tw, ThreadPoolExecutor(n_workers) as pool:
        for i, lv in enumerate(levels):
            rows = _bounded_map(
                pool, render_row, ((lv, ty) for ty in range(lv.tiles_y)), window=2 * n_workers + 2
            )

            def tiles(
                rows: Iterator[tuple[list[bytes], float]] = rows, level0: bool = i == 0
            ) -> Iterator[bytes]:
                for row, tissue in rows:
                    if level0:
                        tissue_px[0] += tissue
                    yield from row

            tw.write(
                tiles(),
                shape=(lv.height, lv.width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                description=_aperio_description(width, height, lv, mpp, quality, seed),
                subfiletype=0,
                **{**common, "resolution": (1e4 / (mpp * lv.d), 1e4 / (mpp * lv.d))},
            )
            if i == 0:
                tw.write(
                    thumb,
                    description=_aperio_description(
                        width, height, None, mpp, quality, seed, thumb=thumb_size
                    ),
                    subfiletype=0,
                    rowsperstrip=16,
                    **{**common, "resolution": (1e4 / (mpp / tscale), 1e4 / (mpp / tscale))},
                )
    seconds = time.perf_counter() - t_start
    return {
        "path": str(path),
        "size": (width, height),
        "mpp": mpp,
        "tissue_fraction": tissue_px[0] / (width * height),
        "levels": [(lv.width, lv.height) for lv in levels],
        "downsamples": [lv.d for lv in levels],
        "file_bytes": path.stat().st_size,
        "seconds": seconds,
        "seed": seed,
        "quality": quality,
        "jpeg_colorspace": jpeg_colorspace,
    }


def verify_slide(
    path: str | Path, *, n_regions: int = 6, region_px: int = 512, seed: int = 0
) -> dict[str, Any]:
    """Open ``path`` with OpenSlide and cuCIM and compare pixels in a few regions per level.

    Returns the OpenSlide vendor, mpp, level geometry of both readers and the max / mean absolute
    RGB difference between the two decoders. Raises ``AssertionError`` never: the caller decides.
    """
    import cucim
    import openslide

    path = str(path)
    osr = openslide.OpenSlide(path)
    cu = cucim.CuImage(path)
    props = osr.properties
    import tifffile
    import zarr

    rng = np.random.default_rng(seed)
    diffs = []
    tf = tifffile.TiffFile(path)
    for level, (lw, lh) in enumerate(osr.level_dimensions):
        ds = float(osr.level_downsamples[level])
        tf_level = zarr.open_array(tf.aszarr(series=0, level=level), mode="r")
        for k in range(n_regions if level == 0 else 2):
            rw, rh = min(region_px, lw), min(region_px, lh)
            if abs(ds - round(ds)) < 1e-9:
                lx, ly = int(rng.integers(0, lw - rw + 1)), int(rng.integers(0, lh - rh + 1))
            elif k == 0:
                # a non-integer downsample (50000 / 781): the readers map level-0 locations to
                # level pixels differently (floor vs round), so only the origin is comparable
                lx = ly = 0
            else:
                continue
            x, y = round(lx * ds), round(ly * ds)
            a = np.asarray(osr.read_region((x, y), level, (rw, rh)))[..., :3].astype(np.int16)
            b = np.asarray(cu.read_region(location=(x, y), size=(rw, rh), level=level))[
                ..., :3
            ].astype(np.int16)
            c = np.asarray(tf_level[ly : ly + rh, lx : lx + rw])[..., :3].astype(np.int16)
            diff = np.abs(a - b)
            diffs.append(
                {
                    "level": level,
                    "x": x,
                    "y": y,
                    "max_abs": int(diff.max()),
                    "mean_abs": float(diff.mean()),
                    "max_abs_vs_tifffile": int(max(np.abs(a - c).max(), np.abs(b - c).max())),
                }
            )
    tf.close()
    res = cu.resolutions
    out = {
        "vendor": props.get("openslide.vendor"),
        "mpp": (
            float(props.get("openslide.mpp-x", "nan")),
            float(props.get("openslide.mpp-y", "nan")),
        ),
        "objective_power": props.get("openslide.objective-power"),
        "openslide_levels": [tuple(d) for d in osr.level_dimensions],
        "openslide_downsamples": [round(float(d), 4) for d in osr.level_downsamples],
        "associated_images": sorted(osr.associated_images.keys()),
        "cucim_levels": [tuple(int(v) for v in d) for d in res["level_dimensions"]],
        "cucim_downsamples": [round(float(d), 4) for d in res["level_downsamples"]],
        "cucim_spacing": [float(s) for s in cu.spacing()[:2]] if hasattr(cu, "spacing") else None,
        "max_abs_diff": max(d["max_abs"] for d in diffs),
        "max_abs_diff_vs_tifffile": max(d["max_abs_vs_tifffile"] for d in diffs),
        "mean_abs_diff": float(np.mean([d["mean_abs"] for d in diffs])),
        "regions": diffs,
    }
    osr.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.make_slide", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "path",
        nargs="?",
        default=None,
        help="output .svs (default bench/_data/synthetic-<size>.svs)",
    )
    p.add_argument("--size", type=int, default=50_000, help="level-0 width and height in px")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--jpeg-colorspace", choices=("rgb", "ycbcr"), default="rgb")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--verify", action="store_true", help="compare OpenSlide and cuCIM after writing"
    )
    args = p.parse_args(argv)
    width = args.width or args.size
    height = args.height or args.size
    out = args.path or str(
        Path(__file__).resolve().parent / "_data" / f"synthetic-{width}x{height}-s{args.seed}.svs"
    )
    info = make_svs_like(
        out,
        width=width,
        height=height,
        mpp=args.mpp,
        quality=args.quality,
        seed=args.seed,
        source=args.source,
        jpeg_colorspace=args.jpeg_colorspace,
        workers=args.workers,
    )
    print(
        f"wrote {info['path']}: {width}×{height} px, {len(info['levels'])} levels, "
        f"tissue {info['tissue_fraction']:.1%}, {info['file_bytes'] / 2**20:.0f} MiB in {info['seconds']:.1f} s"
    )
    Path(out + ".json").write_text(json.dumps(info, default=str, indent=1))
    if args.verify:
        v = verify_slide(out)
        info["verify"] = {k: val for k, val in v.items() if k != "regions"}
        print(
            f"OpenSlide vendor={v['vendor']} mpp={v['mpp']} levels={v['openslide_levels']} "
            f"associated={v['associated_images']}"
        )
        print(
            f"cuCIM levels={v['cucim_levels']}; OpenSlide vs cuCIM max |Δ|={v['max_abs_diff']} "
            f"mean |Δ|={v['mean_abs_diff']:.3f} over {len(v['regions'])} regions; "
            f"max |Δ| vs tifffile={v['max_abs_diff_vs_tifffile']}"
        )
    print(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
