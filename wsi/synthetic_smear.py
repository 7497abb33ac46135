"""Synthetic cytology smears with planted truth, for testing smear-mode cell-region finding.

A smear is rendered in optical-density space (Beer–Lambert: overlapping cells add their
absorbance, so thick clumps come out dark the way they do under a microscope) and written as a
tiled pyramidal TIFF whose resolution tags give the requested µm/px. The returned
:class:`SmearTruth` holds every planted object in level-0 pixels, so tests can compare a
detector's mask with where cells really are.

Nothing here is imported by the pipeline; it exists for tests and benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from scipy import ndimage

Stain = Literal["pap", "giemsa"]

#: ``SmearTruth.cell_kind`` codes.
KIND_CLUSTER, KIND_SINGLE, KIND_CLUMP = 0, 1, 2

# Optical density per unit thickness in (R, G, B). Hematoxylin (Pap) and azure/methylene blue
# (Romanowsky) both absorb red and green, the cytoplasmic counterstains mostly one of the two.
_PALETTES: dict[str, dict[str, np.ndarray]] = {
    "pap": {
        "background": np.array([236.0, 240.0, 243.0]),
        "nucleus": np.array([0.72, 0.78, 0.36]),
        "cytoplasm": np.array([0.26, 0.09, 0.12]),  # cyanophilic (light green SF): blue-green
        "cytoplasm_alt": np.array([0.04, 0.20, 0.17]),  # eosinophilic / orange G: pink
        "debris": np.array([0.55, 0.60, 0.66]),
        "rbc": np.array([0.04, 0.24, 0.22]),  # eosinophilic / orange-red, no nucleus
        "haze": np.array([0.020, 0.016, 0.012]),
    },
    "giemsa": {
        "background": np.array([240.0, 236.0, 240.0]),
        "nucleus": np.array([0.52, 0.82, 0.24]),
        "cytoplasm": np.array([0.20, 0.13, 0.05]),  # pale basophilic blue
        "cytoplasm_alt": np.array([0.08, 0.18, 0.06]),  # lilac / pink
        "debris": np.array([0.50, 0.58, 0.45]),
        "rbc": np.array([0.06, 0.26, 0.16]),  # pink-red
        "haze": np.array([0.014, 0.020, 0.010]),
    },
}


@dataclass(frozen=True)
class SmearTruth:
    """Everything planted in a synthetic smear. Positions are level-0 pixels ``(x, y)``.

    Attributes
    ----------
    path : the TIFF written, or ``None`` for :func:`render_smear`.
    mpp : level-0 µm/px.
    width_px, height_px : level-0 size.
    stain : ``"pap"`` or ``"giemsa"``.
    cluster_center_px : (N, 2) int64 ndarray
    cluster_radius_px : (N,) float64 ndarray
        Radius of the smallest disc about the centre holding all the cluster's cells.
    cluster_n_cells : (N,) int64 ndarray
    single_center_px : (M, 2) int64 ndarray
        Isolated cells, at least 20 µm from any cluster, clump or debris patch.
    single_radius_px : (M,) float64 ndarray
    clump_center_px : (K, 2) int64 ndarray
        Thick clumps: 40–120 cells piled 3–4.5 layers deep; unreadable, should not be tiled.
    clump_radius_px : (K,) float64 ndarray
    debris_center_px : (D, 2) int64 ndarray
        Specks smaller than a nucleus (< 8 µm²).
    debris_radius_px : (D,) float64 ndarray
    rbc_center_px : (R, 2) int64 ndarray
        Red blood cells, anywhere (also over cells): stained, but without a nucleus.
    rbc_radius_px : (R,) float64 ndarray
    debris_patch_center_px : (P, 2) int64 ndarray
        Areas holding only debris (no cells): most of the specks lie in these.
    debris_patch_radius_px : (P,) float64 ndarray
    cell_ellipse_px : (C, 5) float64 ndarray
        Cytoplasm of every cell: ``x, y, semi-axis a, semi-axis b, angle (rad)``.
    cell_kind : (C,) int8 ndarray
        :data:`KIND_CLUSTER`, :data:`KIND_SINGLE` or :data:`KIND_CLUMP`.
    cell_group : (C,) int64 ndarray
        Index into the cluster or clump arrays for clustered/clumped cells, else -1.
    """

    path: Path | None
    mpp: float
    width_px: int
    height_px: int
    stain: Stain
    cluster_center_px: np.ndarray
    cluster_radius_px: np.ndarray
    cluster_n_cells: np.ndarray
    single_center_px: np.ndarray
    single_radius_px: np.ndarray
    clump_center_px: np.ndarray
    clump_radius_px: np.ndarray
    debris_center_px: np.ndarray
    debris_radius_px: np.ndarray
    rbc_center_px: np.ndarray
    rbc_radius_px: np.ndarray
    debris_patch_center_px: np.ndarray
    debris_patch_radius_px: np.ndarray
    cell_ellipse_px: np.ndarray
    cell_kind: np.ndarray
    cell_group: np.ndarray

    # -- the same in micrometres ------------------------------------------------------------
    def um(self, field: str) -> np.ndarray:
        """Any ``*_px`` field in µm from the slide's top-left corner, e.g. ``um("cluster_center")``."""
        return np.asarray(getattr(self, f"{field}_px")) * self.mpp

    # -- rasterised truth -------------------------------------------------------------------
    def cell_mask(
        self,
        downsample: float = 1.0,
        *,
        kinds: tuple[int, ...] = (KIND_CLUSTER, KIND_SINGLE, KIND_CLUMP),
    ) -> np.ndarray:
        """Pixels covered by planted cells (cytoplasm included) on a grid ``downsample`` × coarser.

        Returns
        -------
        (ceil(height_px / downsample), ceil(width_px / downsample)) bool ndarray
            A pixel is set when its centre lies inside a cell of one of ``kinds``.
        """
        if not downsample > 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        h = math.ceil(self.height_px / downsample)
        w = math.ceil(self.width_px / downsample)
        out = np.zeros((h, w), bool)
        keep = np.isin(self.cell_kind, kinds)
        scale = np.array([downsample, downsample, downsample, downsample, 1.0])
        for x, y, a, b, th in self.cell_ellipse_px[keep] / scale:
            prof, (y0, y1, x0, x1) = _ellipse_profile(x - 0.5, y - 0.5, a, b, th, 0.0, (h, w))
            if prof is not None:
                out[y0:y1, x0:x1] |= prof > 0
        return out

    def object_distance_px(self, downsample: float = 1.0) -> np.ndarray:
        """Distance (in grid pixels) to the nearest cell, clump, debris speck or debris patch.

        Red blood cells do not count: they are background that a detector must ignore.

        Returns
        -------
        (ceil(height_px / downsample), ceil(width_px / downsample)) float64 ndarray
        """
        occupied = self.cell_mask(downsample)
        h, w = occupied.shape
        yy, xx = np.ogrid[:h, :w]
        for centers, radii in (
            (self.debris_center_px, self.debris_radius_px),
            (self.debris_patch_center_px, self.debris_patch_radius_px),
        ):
            for (cx, cy), r in zip(centers / downsample, radii / downsample, strict=True):
                y0, y1 = max(0, int(cy - r - 1)), min(h, int(cy + r + 2))
                x0, x1 = max(0, int(cx - r - 1)), min(w, int(cx + r + 2))
                d2 = (xx[:, x0:x1] + 0.5 - cx) ** 2 + (yy[y0:y1] + 0.5 - cy) ** 2
                occupied[y0:y1, x0:x1] |= d2 <= max(r, 0.5) ** 2
        return np.asarray(ndimage.distance_transform_edt(~occupied), np.float64)


def make_smear(
    path: str | Path,
    *,
    width_px: int = 8000,
    height_px: int = 6000,
    mpp: float = 0.25,
    n_clusters: int = 12,
    n_single_cells: int = 150,
    n_clumps: int = 3,
    n_debris: int = 400,
    n_rbc: int = 0,
    seed: int = 0,
    stain: Stain = "pap",
    compression: Literal["jpeg", "zlib"] = "jpeg",
) -> SmearTruth:
    """Write a synthetic smear as a tiled pyramidal TIFF and return what was planted.

    The TIFF holds levels ×1, ×4 and ×16 (256-px tiles, RGB) as successive directories, with
    resolution tags in pixels per centimetre so readers report ``mpp`` µm/px at level 0.

    Parameters
    ----------
    path : output ``.tif``.
    width_px, height_px : level-0 size. The default (2 × 1.5 mm at 0.25 µm/px) renders and
        writes in a few seconds.
    mpp : level-0 µm/px; all planted sizes are in µm, so the smear looks the same at any mpp.
    n_clusters : cohesive clusters of 10–60 cells within a radius of 40–120 µm.
    n_single_cells : isolated cells (half lymphocyte-like, half larger) away from the groups.
    n_clumps : thick clumps, 3–4.5 layers of overlapping cells (radius 25–45 µm).
    n_debris : specks of 1–3 µm; about 70 % lie in cell-free debris patches.
    n_rbc : red blood cells (7–8 µm discs with central pallor, no nucleus) strewn over the
        whole smear, as in a bloody aspirate. They are not cells worth tiling.
    seed : the RNG seed; the same arguments give the same file.
    stain : ``"pap"`` (blue-green/pink cytoplasm, dark blue nuclei) or ``"giemsa"`` (pale blue
        cytoplasm, purple nuclei).
    compression : ``"jpeg"`` (quality 90, like scanners) or lossless ``"zlib"``.

    Returns
    -------
    SmearTruth
        What was planted. Groups that do not fit apart from each other on a small slide are
        left out, so the truth may hold fewer than asked for.
    """
    rgb, truth = render_smear(
        width_px=width_px,
        height_px=height_px,
        mpp=mpp,
        n_clusters=n_clusters,
        n_single_cells=n_single_cells,
        n_clumps=n_clumps,
        n_debris=n_debris,
        n_rbc=n_rbc,
        seed=seed,
        stain=stain,
    )
    path = Path(path)
    levels = [rgb]
    while len(levels) < 3 and min(levels[-1].shape[:2]) >= 4 * 16:
        levels.append(_block_mean(levels[-1], 4))
    px_per_cm = 1e4 / mpp
    codec: dict[str, object] = (
        {"compression": "jpeg", "compressionargs": {"level": 90}}
        if compression == "jpeg"
        else {"compression": "zlib", "compressionargs": {"level": 6}}
    )
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tw:
        for i, level in enumerate(levels):
            ds = 4**i
            tw.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                resolution=(px_per_cm / ds, px_per_cm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                metadata=None,
                software="oncotrace.synthetic_smear",
                **codec,  # type: ignore[arg-type]
            )
    return replace(truth, path=path)


def render_smear(
    *,
    width_px: int = 8000,
    height_px: int = 6000,
    mpp: float = 0.25,
    n_clusters: int = 12,
    n_single_cells: int = 150,
    n_clumps: int = 3,
    n_debris: int = 400,
    n_rbc: int = 0,
    seed: int = 0,
    stain: Stain = "pap",
) -> tuple[np.ndarray, SmearTruth]:
    """Render a synthetic smear in memory (see :func:`make_smear` for the parameters).

    Returns
    -------
    rgb : (height_px, width_px, 3) uint8 ndarray
    truth : SmearTruth with ``path=None``
    """
    if stain not in _PALETTES:
        raise ValueError(f"stain must be one of {sorted(_PALETTES)}, got {stain!r}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    if width_px < 16 or height_px < 16:
        raise ValueError(f"the smear must be at least 16×16 px, got {width_px}×{height_px}")
    for name, n in (
        ("n_clusters", n_clusters),
        ("n_single_cells", n_single_cells),
        ("n_clumps", n_clumps),
        ("n_debris", n_debris),
        ("n_rbc", n_rbc),
    ):
        if n < 0:
            raise ValueError(f"{name} must be ≥ 0, got {n}")

    rng = np.random.default_rng(seed)
    pal = _PALETTES[stain]
    w_um, h_um = width_px * mpp, height_px * mpp
    placer = _DiscPlacer(w_um, h_um, rng)

    cells: list[_Cell] = []
    cluster_c: list[tuple[float, float]] = []
    cluster_r: list[float] = []
    cluster_n: list[int] = []
    for _ in range(n_clusters):
        r = float(rng.uniform(40.0, 120.0))
        c = placer.place(r, gap_um=40.0)
        if c is None:
            break
        members = _cluster_cells(rng, c, r, pal, group=len(cluster_c))
        cells += members
        cluster_c.append(c)
        cluster_r.append(_extent(members, c))
        cluster_n.append(len(members))
    clump_c: list[tuple[float, float]] = []
    clump_r: list[float] = []
    for _ in range(n_clumps):
        r = float(rng.uniform(25.0, 45.0))
        c = placer.place(r, gap_um=40.0)
        if c is None:
            break
        members = _clump_cells(rng, c, r, pal, group=len(clump_c))
        cells += members
        clump_c.append(c)
        clump_r.append(_extent(members, c))

    # Debris: most specks in a few cell-free patches, the rest strewn over the smear.
    n_patched = round(0.7 * n_debris)
    n_patches = math.ceil(n_patched / 60) if n_patched else 0
    patch_c: list[tuple[float, float]] = []
    patch_r: list[float] = []
    for _ in range(n_patches):
        r = float(rng.uniform(30.0, 60.0))
        c = placer.place(r, gap_um=30.0)
        if c is None:
            break
        patch_c.append(c)
        patch_r.append(r)
    debris_xy: list[np.ndarray] = []
    if patch_c:
        area = np.asarray(patch_r) ** 2  # same density of specks in every patch
        which = rng.choice(len(patch_c), n_patched, p=area / area.sum())
        ang = rng.uniform(0, 2 * np.pi, n_patched)
        rad = np.sqrt(rng.uniform(0, 1, n_patched)) * np.asarray(patch_r)[which]
        debris_xy.append(np.asarray(patch_c)[which] + np.c_[rad * np.cos(ang), rad * np.sin(ang)])
    n_strewn = n_debris - (n_patched if patch_c else 0)
    debris_xy.append(np.c_[rng.uniform(0, w_um, n_strewn), rng.uniform(0, h_um, n_strewn)])
    debris_um = np.concatenate(debris_xy) if debris_xy else np.zeros((0, 2))
    debris_r_um = rng.uniform(0.5, 1.5, len(debris_um))

    # Isolated cells: anywhere at least 20 µm clear of the groups and patches.
    lymph = rng.random(n_single_cells) < 0.5
    a_single = np.where(
        lymph, rng.uniform(3.5, 5.0, n_single_cells), rng.uniform(6.0, 11.0, n_single_cells)
    )
    centres = placer.scatter(a_single, gap_um=20.0)
    placed = ~np.isnan(centres[:, 0])
    single_c = [(float(x), float(y)) for x, y in centres[placed]]
    single_r = [float(a) for a in a_single[placed]]
    for c, a, ly in zip(single_c, single_r, lymph[placed], strict=True):
        cells.append(_one_cell(rng, c, a, pal, kind=KIND_SINGLE, group=-1, lymph=bool(ly)))

    rbc_um = np.c_[rng.uniform(0, w_um, n_rbc), rng.uniform(0, h_um, n_rbc)]
    rbc_r_um = rng.uniform(3.4, 4.1, n_rbc)

    rgb = _paint(
        rng, cells, debris_um, debris_r_um, rbc_um, rbc_r_um, pal, width_px, height_px, mpp
    )

    def px(xy: list[tuple[float, float]] | np.ndarray) -> np.ndarray:
        arr = np.asarray(xy, np.float64).reshape(-1, 2)
        return np.rint(arr / mpp).astype(np.int64)

    ell = np.array([[c.x, c.y, c.a, c.b, c.theta] for c in cells], np.float64).reshape(-1, 5)
    ell[:, :4] /= mpp
    truth = SmearTruth(
        path=None,
        mpp=float(mpp),
        width_px=int(width_px),
        height_px=int(height_px),
        stain=stain,
        cluster_center_px=px(cluster_c),
        cluster_radius_px=np.asarray(cluster_r, np.float64) / mpp,
        cluster_n_cells=np.asarray(cluster_n, np.int64),
        single_center_px=px(single_c),
        single_radius_px=np.asarray(single_r, np.float64) / mpp,
        clump_center_px=px(clump_c),
        clump_radius_px=np.asarray(clump_r, np.float64) / mpp,
        debris_center_px=px(debris_um),
        debris_radius_px=debris_r_um / mpp,
        rbc_center_px=px(rbc_um),
        rbc_radius_px=rbc_r_um / mpp,
        debris_patch_center_px=px(patch_c),
        debris_patch_radius_px=np.asarray(patch_r, np.float64) / mpp,
        cell_ellipse_px=ell,
        cell_kind=np.array([c.kind for c in cells], np.int8),
        cell_group=np.array([c.group for c in cells], np.int64),
    )
    return rgb, truth


# -- planting -------------------------------------------------------------------------------


@dataclass
class _Cell:
    """One cell in µm: cytoplasm ellipse, nucleus ellipse and their optical densities."""

    x: float
    y: float
    a: float
    b: float
    theta: float
    cyto_od: np.ndarray
    nx: float
    ny: float
    na: float
    nb: float
    ntheta: float
    nuc_od: np.ndarray
    kind: int
    group: int


class _DiscPlacer:
    """Rejection sampling of non-overlapping discs (µm) inside the slide, away from its edges."""

    def __init__(self, w_um: float, h_um: float, rng: np.random.Generator) -> None:
        self.w, self.h, self.rng = w_um, h_um, rng
        self.discs: list[tuple[float, float, float]] = []

    def place(
        self, r: float, *, gap_um: float, remember: bool = True, tries: int = 400
    ) -> tuple[float, float] | None:
        margin = r + 10.0
        if 2 * margin >= min(self.w, self.h):
            return None
        cand = np.c_[
            self.rng.uniform(margin, self.w - margin, tries),
            self.rng.uniform(margin, self.h - margin, tries),
        ]
        ok = np.ones(tries, bool)
        if self.discs:
            d = np.asarray(self.discs)
            dist = np.hypot(cand[:, None, 0] - d[None, :, 0], cand[:, None, 1] - d[None, :, 1])
            ok = (dist >= d[None, :, 2] + r + gap_um).all(axis=1)
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            return None
        x, y = (float(v) for v in cand[hits[0]])
        if remember:
            self.discs.append((x, y, r))
        return x, y

    def scatter(self, radii: np.ndarray, *, gap_um: float, rounds: int = 50) -> np.ndarray:
        """Centres (µm) for discs of ``radii`` clear of the placed discs; they may overlap each
        other and are not remembered. (n, 2) float64, NaN where no place was found."""
        n = len(radii)
        out = np.full((n, 2), np.nan)
        todo = np.flatnonzero(2 * (radii + 10.0) < min(self.w, self.h))
        placed = np.asarray(self.discs, np.float64).reshape(-1, 3)
        for _ in range(rounds):
            if todo.size == 0:
                break
            margin = radii[todo] + 10.0
            cand = np.c_[
                self.rng.uniform(margin, self.w - margin), self.rng.uniform(margin, self.h - margin)
            ]
            dist = np.hypot(
                cand[:, None, 0] - placed[None, :, 0], cand[:, None, 1] - placed[None, :, 1]
            )
            clear = (dist >= placed[None, :, 2] + radii[todo, None] + gap_um).all(axis=1)
            out[todo[clear]] = cand[clear]
            todo = todo[~clear]
        return out


def _extent(cells: list[_Cell], c: tuple[float, float]) -> float:
    """Radius (µm) of the smallest disc about ``c`` holding every cell of a group."""
    return max(math.hypot(m.x - c[0], m.y - c[1]) + max(m.a, m.b) for m in cells)


def _one_cell(
    rng: np.random.Generator,
    c: tuple[float, float],
    a: float,
    pal: dict[str, np.ndarray],
    *,
    kind: int,
    group: int,
    lymph: bool = False,
    od_gain: float = 1.0,
) -> _Cell:
    b = a * float(rng.uniform(0.75, 1.0))
    theta = float(rng.uniform(0, np.pi))
    if lymph:  # scant cytoplasm: the nucleus nearly fills the cell
        na = a * float(rng.uniform(0.75, 0.85))
        off = 0.05 * a
    else:
        na = a * float(rng.uniform(0.35, 0.5))
        off = 0.2 * a
    nb = na * float(rng.uniform(0.8, 1.0))
    ang = rng.uniform(0, 2 * np.pi)
    r_off = off * float(rng.uniform(0, 1))
    cyto = pal["cytoplasm"] if rng.random() < 0.7 else pal["cytoplasm_alt"]
    return _Cell(
        x=c[0],
        y=c[1],
        a=a,
        b=b,
        theta=theta,
        cyto_od=cyto * float(rng.uniform(0.6, 1.1)) * od_gain,
        nx=c[0] + r_off * math.cos(ang),
        ny=c[1] + r_off * math.sin(ang),
        na=na,
        nb=nb,
        ntheta=float(rng.uniform(0, np.pi)),
        nuc_od=pal["nucleus"] * float(rng.uniform(0.8, 1.15)) * od_gain,
        kind=kind,
        group=group,
    )


def _cluster_cells(
    rng: np.random.Generator,
    c: tuple[float, float],
    r: float,
    pal: dict[str, np.ndarray],
    group: int,
) -> list[_Cell]:
    """A cohesive monolayer: cells touch, nuclei rarely overlap."""
    a_mean = 8.0
    n_target = int(np.clip(round(0.55 * r * r / (a_mean * a_mean)), 10, 60))
    min_sep = 1.45 * a_mean
    reach = max(r - a_mean, a_mean)
    pts: list[tuple[float, float]] = []
    # Grow from the centre so the group is cohesive and its centre is occupied.
    cand_r = np.sqrt(rng.uniform(0, 1, 40 * n_target)) * reach
    cand_t = rng.uniform(0, 2 * np.pi, 40 * n_target)
    order = np.argsort(cand_r, kind="stable")
    cand = np.c_[c[0] + cand_r * np.cos(cand_t), c[1] + cand_r * np.sin(cand_t)][order]
    cand[0] = c
    for p in cand:
        if len(pts) == n_target:
            break
        if pts:
            q = np.asarray(pts)
            if np.min(np.hypot(q[:, 0] - p[0], q[:, 1] - p[1])) < min_sep:
                continue
        pts.append((float(p[0]), float(p[1])))
    return [
        _one_cell(rng, p, float(rng.uniform(6.5, 9.5)), pal, kind=KIND_CLUSTER, group=group)
        for p in pts
    ]


def _clump_cells(
    rng: np.random.Generator,
    c: tuple[float, float],
    r: float,
    pal: dict[str, np.ndarray],
    group: int,
) -> list[_Cell]:
    """A thick, three-dimensional clump: cells piled three to four and a half layers deep."""
    n = int(np.clip(round(rng.uniform(3.0, 4.5) * r * r / 8.0**2), 40, 120))
    a = rng.uniform(6.5, 9.5, n)
    rad = np.sqrt(rng.uniform(0, 1, n)) * np.maximum(r - a, 1.0)
    t = rng.uniform(0, 2 * np.pi, n)
    return [
        _one_cell(
            rng,
            (c[0] + float(rad[i] * math.cos(t[i])), c[1] + float(rad[i] * math.sin(t[i]))),
            float(a[i]),
            pal,
            kind=KIND_CLUMP,
            group=group,
            od_gain=1.3,
        )
        for i in range(n)
    ]


# -- painting -------------------------------------------------------------------------------


def _ellipse_profile(
    x: float, y: float, a: float, b: float, theta: float, edge: float, shape: tuple[int, int]
) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """Coverage (0..1) of an ellipse on pixel centres within its bounding box.

    Pixel ``(i, j)`` has its centre at ``(j, i)``; ``edge`` is the soft-edge width in pixels
    (0 gives a hard edge).
    """
    h, w = shape
    reach = max(a, b) + edge + 1.0
    y0, y1 = max(0, math.floor(y - reach)), min(h, math.ceil(y + reach) + 1)
    x0, x1 = max(0, math.floor(x - reach)), min(w, math.ceil(x + reach) + 1)
    if y1 <= y0 or x1 <= x0:
        return None, (0, 0, 0, 0)
    dy = (np.arange(y0, y1, dtype=np.float32) - y)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - x)[None, :]
    ct, st = math.cos(theta), math.sin(theta)
    u = (dx * ct + dy * st) / max(a, 1e-3)
    v = (-dx * st + dy * ct) / max(b, 1e-3)
    rho = np.sqrt(u * u + v * v)
    if edge <= 0:
        prof = (rho <= 1.0).astype(np.float32)
    else:
        prof = np.clip((1.0 - rho) * (min(a, b) / edge) + 0.5, 0.0, 1.0)
    return prof, (y0, y1, x0, x1)


def _paint(
    rng: np.random.Generator,
    cells: list[_Cell],
    debris_um: np.ndarray,
    debris_r_um: np.ndarray,
    rbc_um: np.ndarray,
    rbc_r_um: np.ndarray,
    pal: dict[str, np.ndarray],
    width_px: int,
    height_px: int,
    mpp: float,
) -> np.ndarray:
    """Accumulate optical density tile by tile and turn it into 8-bit RGB.

    Tiles that no object touches skip the density step: they are background, haze and noise.
    """
    h, w = height_px, width_px
    edge = max(0.6 / mpp, 0.75)  # ~0.6 µm of soft edge: the focus blur of a 20×/40× scan
    tile = 512

    # Out-of-focus haze: a smooth, faint absorbance varying over ~200 µm. Its transmission is
    # interpolated bilinearly from a coarse grid: rows first (once), then columns per tile.
    grid_um = 200.0
    gh, gw = math.ceil(h * mpp / grid_um) + 2, math.ceil(w * mpp / grid_um) + 2
    haze_grid = ndimage.gaussian_filter(rng.random((gh, gw)), 0.8)
    span = float(haze_grid.max() - haze_grid.min())
    haze_grid = (haze_grid - haze_grid.min()) / (span if span > 0 else 1.0)
    gx = (np.arange(w) + 0.5) * mpp / grid_um
    haze_x = np.stack([np.interp(gx, np.arange(gw), row) for row in haze_grid])
    base_x = (pal["background"] * 10.0 ** (-haze_x[..., None] * pal["haze"])).astype(np.float32)
    noise = rng.normal(0.0, 1.8, (2 * tile, 2 * tile, 3)).astype(np.float32)
    chromatin = rng.random((64, 64)).astype(np.float32)

    # Level-0 pixel boxes of everything painted: cytoplasm, nucleus, speck.
    shapes: list[tuple[float, float, float, float, float, np.ndarray, bool]] = []
    for c in cells:
        shapes.append((c.x / mpp, c.y / mpp, c.a / mpp, c.b / mpp, c.theta, c.cyto_od, False))
        shapes.append((c.nx / mpp, c.ny / mpp, c.na / mpp, c.nb / mpp, c.ntheta, c.nuc_od, True))
    debris_od = pal["debris"] * rng.uniform(0.7, 1.3, (len(debris_um), 1))
    for (x, y), r, col in zip(debris_um / mpp, debris_r_um / mpp, debris_od, strict=True):
        shapes.append((float(x), float(y), float(r), float(r), 0.0, col, False))
    rbc_od = pal["rbc"] * rng.uniform(0.8, 1.2, (len(rbc_um), 1))
    for (x, y), r, col in zip(rbc_um / mpp, rbc_r_um / mpp, rbc_od, strict=True):
        shapes.append((float(x), float(y), float(r), float(r), 0.0, col, False))
        shapes.append(
            (float(x), float(y), 0.45 * float(r), 0.45 * float(r), 0.0, -0.5 * col, False)
        )
    if shapes:
        geo = np.array([s[:4] for s in shapes])
        reach = np.maximum(geo[:, 2], geo[:, 3]) + edge + 2
        lo_x, hi_x = geo[:, 0] - reach, geo[:, 0] + reach
        lo_y, hi_y = geo[:, 1] - reach, geo[:, 1] + reach
    out = np.empty((h, w, 3), np.uint8)
    for ty in range(0, h, tile):
        th = min(tile, h - ty)
        gy = np.clip((np.arange(ty, ty + th) + 0.5) * mpp / grid_um, 0, gh - 1)
        g0 = np.minimum(gy.astype(np.int64), gh - 2)
        f = (gy - g0).astype(np.float32)[:, None, None]
        rows_here = np.flatnonzero((hi_y >= ty) & (lo_y < ty + th)) if shapes else np.zeros(0, int)
        for tx in range(0, w, tile):
            tw = min(tile, w - tx)
            img = base_x[g0, tx : tx + tw] * (1 - f) + base_x[g0 + 1, tx : tx + tw] * f
            here = (
                rows_here[(hi_x[rows_here] >= tx) & (lo_x[rows_here] < tx + tw)]
                if shapes
                else rows_here
            )
            if here.size:
                od = np.zeros((th, tw, 3), np.float32)
                for i in here:
                    x, y, a, b, theta, col, is_nucleus = shapes[i]
                    _add(
                        od, tx, ty, x, y, a, b, theta, edge, col, chromatin if is_nucleus else None
                    )
                img *= np.exp(od * np.float32(-math.log(10.0)))
            oy, ox = (int(v) for v in rng.integers(0, tile, 2))
            img += noise[oy : oy + th, ox : ox + tw]
            img += 0.5
            np.clip(img, 0, 255, out=img)
            out[ty : ty + th, tx : tx + tw] = img
    return out


def _add(
    od: np.ndarray,
    tx: int,
    ty: int,
    x: float,
    y: float,
    a: float,
    b: float,
    theta: float,
    edge: float,
    colour: np.ndarray,
    chromatin: np.ndarray | None,
) -> None:
    """Add one ellipse's optical density to the tile whose top-left is level-0 ``(tx, ty)``."""
    prof, (y0, y1, x0, x1) = _ellipse_profile(
        x - 0.5 - tx, y - 0.5 - ty, a, b, theta, edge, od.shape[:2]
    )
    if prof is None:
        return
    if chromatin is not None:  # coarse chromatin: ±20 % granularity
        cy = np.arange(y0 + ty, y1 + ty) % chromatin.shape[0]
        cx = np.arange(x0 + tx, x1 + tx) % chromatin.shape[1]
        prof = prof * (0.8 + 0.4 * chromatin[np.ix_(cy, cx)])
    od[y0:y1, x0:x1] += prof[..., None] * colour.astype(np.float32)


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Area-average (H, W, 3) uint8 by an integer factor; a partial last block is averaged too."""
    h, w = img.shape[:2]
    hp, wp = math.ceil(h / f) * f, math.ceil(w / f) * f
    if (hp, wp) != (h, w):
        img = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    s = img.reshape(hp // f, f, wp // f, f, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + (f * f) // 2) // (f * f)).astype(np.uint8)
