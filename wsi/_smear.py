"""Cell-dense regions of a cytology smear, from a low-resolution RGB overview.

A smear has no tissue sheet: cells lie singly and in groups on a bright background, together
with debris, blood and thick clumps that cannot be read. :func:`smear_mask` finds nuclei by
optical density, measures how many there are per mm² around each point and keeps the regions
that are dense enough to be worth tiling but not so piled up that they are opaque.

Every size is in micrometres and converted with ``mpp``, so the mask of a smear does not depend
on the resolution of the overview it was computed from (within 0.25–4 µm/px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

#: Finest resolution the detector works at: finer overviews are area-averaged to about this
#: (nuclei are then 5–10 px, and a 6000×6000 field at 0.25 µm/px costs what 1500×1500 does).
WORK_MPP = 1.0
#: Nuclear OD is smoothed over about this (µm, Gaussian sigma) before thresholding.
SMOOTH_UM = 0.75
#: Coarsest overview accepted: at 4 µm/px an 8 µm nucleus is 2 px across.
MAX_MPP = 4.0
#: Below this mean brightness (0–255) of its brightest 1 % an image shows no lit glass.
MIN_GLASS = 100.0
#: Finest accepted: 100× oil camera fields are ~0.03–0.1 µm/px; below this mpp is surely wrong.
MIN_MPP = 0.01


def smear_mask(
    rgb: np.ndarray,
    mpp: float,
    *,
    min_cells_per_mm2: float = 150.0,
    density_cap: float = 15_000.0,
    window_um: float = 100.0,
    clump_um: float = 30.0,
    clump_od: float = 1.0,
    nucleus_um2: float = 40.0,
    min_nucleus_um2: float = 12.0,
    nuclear_od_floor: float = 0.15,
    dilate_um: float = 6.0,
    block_um: float = 6.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """Mask of the cell-dense, readable regions of a smear overview.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        Brightfield overview of the smear (Papanicolaou, Romanowsky/Diff-Quik/Giemsa or H&E).
    mpp : µm per pixel of ``rgb``, between 0.01 and 4. Overviews finer than 1 µm/px are
        area-averaged to about 1 µm/px first.
    min_cells_per_mm2 : lowest local density of nuclei kept, counted over a square of side
        ``window_um`` as nuclear area / ``nucleus_um2``. The default, 150/mm² (60 µm² of
        nucleus per 100 × 100 µm), keeps two small or one large nucleus and drops a lone
        lymphocyte or a few stray specks.
    density_cap : density (nuclei/mm², over a square of side ``clump_um``) above which a region
        that is also darker than ``clump_od`` is a thick clump and is left out. 15 000/mm² means
        that nuclei cover ~60 % of the area.
    window_um : side of the square over which the density is measured.
    clump_um : side of the square over which crowding and darkness are measured for clumps.
    clump_od : mean optical density (log10, averaged over R, G, B) above which a crowded
        region is opaque. Monolayers stay below ~0.5 and crowded, partly overlapping groups
        of readable nuclei below ~0.95 (CNSeg cervical clusters); piled-up clumps exceed 1.
    nucleus_um2 : area of one typical nucleus, to turn stained area into a count of nuclei.
    min_nucleus_um2 : nuclear-stained objects smaller than this are debris (or noise). The
        area is measured above half the object's peak OD, so that blur does not make a dark
        speck look bigger than it is.
    nuclear_od_floor : lowest nuclear optical density ever accepted as a nucleus, whatever the
        automatic threshold says; an empty field therefore gives an empty mask.
    dilate_um : margin added around nuclei so that tiles include the cell borders.
    block_um : resolution of the returned mask (it is constant over blocks of about this
        size); a tenth or less of a tile is plenty for tile selection.

    Returns
    -------
    mask : (H, W) bool ndarray
        True over cell-dense, readable regions.
    qc : dict of str to float
        ``cell_fraction`` (area fraction in the mask), ``n_cell_objects`` (connected
        nuclear-stained objects kept as cells; touching nuclei count once),
        ``n_cells_estimate`` (nuclear area / ``nucleus_um2``), ``clump_fraction`` (area
        fraction left out of the mask as thick clumps), ``debris_fraction`` (area fraction of
        nuclear-stained specks too small for a nucleus), ``nuclear_od_threshold``,
        ``background_r``/``_g``/``_b`` (estimated blank-glass intensity, 0–255) and
        ``work_mpp`` (the resolution the detector worked at).

    Notes
    -----
    Nuclear stain is measured as ``min(OD_red, OD_green)`` with OD = -log10(I / I0) and I0 the
    per-channel brightness of blank glass (99th percentile). Hematoxylin and azure/methylene
    blue absorb both red and green, while the cytoplasmic counterstains, eosin-stained red
    cells and light-green cytoplasm absorb mainly one of the two, so the measure picks nuclei
    in Papanicolaou, Romanowsky and H&E smears alike. The threshold on it is Otsu's on log OD
    of the stained pixels, raised to half the typical nuclear OD (see ``_nuclear_threshold``).

    The mask is the set of blocks that are dense enough and lie within ``dilate_um`` of a
    nucleus, with holes inside groups filled, minus thick clumps. A single call on a
    6000 × 6000 overview takes a few seconds and ~1 GB of memory.
    """
    rgb, mpp = _check_input(rgb, mpp)
    h, w = rgb.shape[:2]
    params = {
        "min_cells_per_mm2": min_cells_per_mm2,
        "density_cap": density_cap,
        "window_um": window_um,
        "clump_um": clump_um,
        "clump_od": clump_od,
        "nucleus_um2": nucleus_um2,
        "min_nucleus_um2": min_nucleus_um2,
        "nuclear_od_floor": nuclear_od_floor,
        "dilate_um": dilate_um,
        "block_um": block_um,
    }
    for name, value in params.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    for name in ("window_um", "clump_um", "nucleus_um2", "block_um"):
        if params[name] <= 0:
            raise ValueError(f"{name} must be positive, got {params[name]}")

    maps = _analyse(rgb, mpp, **params)
    mask = maps.mask
    step = maps.step
    full = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)[:h, :w]
    qc = {
        "cell_fraction": float(full.mean()),
        "n_cell_objects": float(maps.n_cell_objects),
        "n_cells_estimate": float(maps.nuclei.sum() * maps.work_mpp**2 / nucleus_um2),
        "clump_fraction": float(maps.clump_rejected.mean()),
        "debris_fraction": float(maps.debris_px / maps.nuclei.size),
        "nuclear_od_threshold": float(maps.threshold),
        "background_r": float(maps.background[0]),
        "background_g": float(maps.background[1]),
        "background_b": float(maps.background[2]),
        "work_mpp": float(maps.work_mpp),
    }
    return full, qc


@dataclass
class _Maps:
    """Intermediate results of :func:`_analyse` (work grid ≈ 1 µm/px, block grid ≈ block_um)."""

    work_mpp: float
    block_mpp: float
    step: int  # input pixels per block side
    background: np.ndarray  # (3,) blank-glass intensity
    threshold: float
    nuclei: np.ndarray  # work grid: kept nuclear pixels
    n_cell_objects: int
    debris_px: int
    density: np.ndarray  # block grid: nuclei / mm² over window_um
    crowd: np.ndarray  # block grid: nuclei / mm² over clump_um
    dark: np.ndarray  # block grid: mean OD over clump_um
    clump: np.ndarray  # block grid
    clump_rejected: np.ndarray  # block grid: would be in the mask but for the clump rule
    mask: np.ndarray  # block grid


def _analyse(
    rgb: np.ndarray,
    mpp: float,
    *,
    min_cells_per_mm2: float,
    density_cap: float,
    window_um: float,
    clump_um: float,
    clump_od: float,
    nucleus_um2: float,
    min_nucleus_um2: float,
    nuclear_od_floor: float,
    dilate_um: float,
    block_um: float,
) -> _Maps:
    h, w = rgb.shape[:2]
    # Work grid: area-average fine overviews to ~WORK_MPP, then blocks of ~block_um.
    f = max(1, int(WORK_MPP / mpp + 1e-6))
    wmpp = mpp * f
    b = max(1, round(block_um / wmpp))
    step = f * b
    hp, wp = -(-h // step) * step, -(-w // step) * step
    if (hp, wp) != (h, w):
        rgb = np.pad(rgb, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    work = _block_mean_u8(rgb, f) if f > 1 else rgb

    # Nuclear optical density through per-channel lookup tables.
    i0 = _background(work)
    luts = [_od_lut(v) for v in i0]
    if float(i0.mean()) < MIN_GLASS:  # no lit glass at all (black frame, lid closed): no cells
        luts = [np.zeros(256, np.float32)] * 3
    od_r, od_g = luts[0][work[..., 0]], luts[1][work[..., 1]]
    nod = np.minimum(od_r, od_g)
    tod = od_r  # total OD, summed in place over R, G, B
    tod += od_g
    tod += luts[2][work[..., 2]]
    tod /= 3.0
    del od_g
    sigma = SMOOTH_UM / wmpp
    if sigma >= 0.5:  # chromatin texture would break pale nuclei into specks
        nod = ndimage.gaussian_filter(nod, sigma, mode="nearest", truncate=3.0)
    # The threshold is chosen on a subsample of at most ~1 Mpx.
    sub = max(1, int(math.sqrt(nod.size / 1e6)))
    thr, typical = _nuclear_threshold(nod[::sub, ::sub], tod[::sub, ::sub], nuclear_od_floor)

    # Nuclei: nuclear-stained objects at least the size of a small nucleus. Blur (focus, the
    # overview's area averaging) spreads a dark speck over many pixels above a low threshold,
    # so size is measured above half the object's peak OD (or above the typical nuclear OD,
    # if lower, so that a nucleus touching a darker speck keeps its size).
    px_um2 = wmpp * wmpp
    stained = nod > thr
    labels, n_obj = ndimage.label(stained)
    lab = labels[stained]
    del labels
    values = nod[stained]
    peak = np.zeros(n_obj + 1, np.float32)
    np.maximum.at(peak, lab, values)
    in_core = values >= np.minimum(0.5 * peak, typical)[lab]
    core = np.bincount(lab[in_core], minlength=n_obj + 1) * px_um2
    keep = core >= min_nucleus_um2
    keep[0] = False
    kept = keep[lab]
    nuclei = np.zeros_like(stained)
    nuclei[stained] = kept
    debris_px = int(np.count_nonzero(~kept))
    # Density counts the cores, which blur does not inflate; crowding uses all stained pixels.
    cores = np.zeros_like(stained)
    cores[stained] = kept & in_core
    del lab, stained, values, in_core, kept

    # Region statistics on the block grid.
    nuc_frac = _block_mean(nuclei, b)
    core_frac = _block_mean(cores, b)
    del cores
    od_mean = _block_mean(tod, b)
    del tod
    bum = b * wmpp
    per_mm2 = 1e6 / nucleus_um2
    density = _box_mean(core_frac, window_um / bum) * per_mm2
    dense = density >= max(min_cells_per_mm2, 1e-9)
    crowd = _box_mean(nuc_frac, clump_um / bum) * per_mm2
    dark = _box_mean(od_mean, clump_um / bum)
    clump = (crowd >= density_cap) & (dark >= clump_od)
    if clump.any():  # the test above marks clump centres; grow to the whole clump
        clump = ndimage.binary_dilation(clump, disk(max(1, math.ceil(0.5 * clump_um / bum))))
    near = nuc_frac > 0
    r_blocks = round(dilate_um / bum)
    if r_blocks > 0:
        near = ndimage.binary_dilation(near, disk(r_blocks))
    mask = dense & near
    # Gaps between the cells of a group belong to it: fill holes up to a quarter window.
    mask = _fill_small_holes(mask, (0.25 * window_um / bum) ** 2)
    rejected = mask & clump
    mask &= ~clump
    return _Maps(
        work_mpp=wmpp,
        block_mpp=bum,
        step=step,
        background=i0,
        threshold=thr,
        nuclei=nuclei,
        n_cell_objects=int(keep.sum()),
        debris_px=debris_px,
        density=density,
        crowd=crowd,
        dark=dark,
        clump=clump,
        clump_rejected=rejected,
        mask=mask,
    )


# -- steps ----------------------------------------------------------------------------------


def _check_input(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(
            f"smear_mask needs an (H, W, 3) RGB overview, got shape {rgb.shape};"
            " convert greyscale or palette images to RGB first."
        )
    if rgb.dtype != np.uint8:
        raise TypeError(
            f"smear_mask needs uint8 RGB, got {rgb.dtype}; scale to 0–255 and cast to uint8."
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"the overview is empty (shape {rgb.shape}).")
    mpp = float(mpp)
    if not (math.isfinite(mpp) and MIN_MPP <= mpp <= MAX_MPP):
        raise ValueError(
            f"mpp={mpp} µm/px is outside {MIN_MPP}–{MAX_MPP}: nuclei (~8 µm) must be at least"
            " 2 px across. Pass the overview's real resolution, reading it from a finer level"
            " if it is coarser (e.g. 2 µm/px)."
        )
    return np.ascontiguousarray(rgb[..., :3]), mpp


def _block_mean_u8(img: np.ndarray, f: int) -> np.ndarray:
    """Area-average (H, W, 3) uint8 whose sides are multiples of ``f``."""
    h, w = img.shape[:2]
    s = img.reshape(h // f, f, w // f, f, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + (f * f) // 2) // (f * f)).astype(np.uint8)


def _block_mean(img: np.ndarray, b: int) -> np.ndarray:
    """Mean over b×b blocks of an (H, W) bool or float array whose sides are multiples of ``b``."""
    if b == 1:
        return img.astype(np.float32)
    h, w = img.shape
    acc = np.uint16 if img.dtype == bool and b * b < 2**16 else np.float32
    s = (
        img.reshape(h, w // b, b)
        .sum(axis=2, dtype=acc)
        .reshape(h // b, b, w // b)
        .sum(axis=1, dtype=acc)
    )
    return s.astype(np.float32) / np.float32(b * b)


def _box_mean(img: np.ndarray, side_blocks: float) -> np.ndarray:
    """Mean over a square of ``side_blocks`` blocks (at least 1), mirroring at the edges."""
    size = max(1, round(side_blocks))
    return ndimage.uniform_filter(img, size=size, mode="reflect")


def _background(img: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Per-channel intensity of blank glass: a high percentile, from a histogram."""
    flat = img.reshape(-1, 3)
    stride = max(1, flat.shape[0] // 4_000_000)
    out = np.empty(3)
    for c in range(3):
        hist = np.bincount(flat[::stride, c], minlength=256)
        cdf = np.cumsum(hist)
        out[c] = float(np.searchsorted(cdf, percentile / 100.0 * cdf[-1]))
    return out


def _od_lut(i0: float) -> np.ndarray:
    v = np.arange(256, dtype=np.float64)
    od = -np.log10(np.maximum(v, 0.5) / max(i0, 1.0))
    return np.maximum(od, 0.0).astype(np.float32)


def _nuclear_threshold(nod: np.ndarray, tod: np.ndarray, floor: float) -> tuple[float, float]:
    """Threshold on nuclear OD, and the typical OD of a nucleus, from the stained pixels.

    Otsu's threshold on log10 OD separates nuclei from cytoplasm and red cells: their optical
    densities differ by factors, so on a log scale the few very dark pixels of piled-up clumps
    cannot pull it above the nuclei (on a linear scale they do, and every nucleus is lost).
    The typical nuclear OD is the median above it. The threshold is raised to half the typical
    OD, a level that nuclei still cross when an overview blurs them but that overlapping pale
    cytoplasm does not, and is never below ``floor``.
    """
    stained = nod[tod > 0.5 * floor]
    if stained.size < 64 or float(stained.max()) <= floor:
        return float(floor), 2.0 * float(floor)
    lg = np.log10(np.maximum(stained, 0.01))
    if float(lg.max() - lg.min()) < 1e-3:  # one flat value: nothing stands out from it
        return max(float(stained.max()), floor), 2.0 * float(floor)
    hist, edges = np.histogram(lg, bins=256, range=(-2.0, float(lg.max())))
    centers = 0.5 * (edges[:-1] + edges[1:])
    otsu = float(10 ** threshold_otsu(hist=(hist, centers)))
    above = stained[stained > max(otsu, floor)]
    typical = float(np.median(above)) if above.size else 2.0 * floor
    return max(otsu, 0.5 * typical, floor), max(typical, floor)


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Set enclosed background components of at most ``max_area`` pixels (4-connected)."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes <= max_area
    fill[0] = False
    # Background touching the border is open glass, not a hole.
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        fill[edge] = False
    return mask | fill[labels]
