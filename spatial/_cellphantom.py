"""Planted-cell images: H&E lymphocytes or IHC DAB+ cells at known positions.

The image is rendered in optical density (Beer–Lambert) with scikit-image's standard
hematoxylin / eosin / DAB vectors (``skimage.color.rgb_from_hed``), then blurred and given
shot-like noise, so a detector has to deconvolve colour and separate touching nuclei like on a
real slide. Three kinds of nuclei are drawn:

* immune cells: small (6–7 µm), round, dark hematoxylin; for IHC also a brown DAB ring
  (membrane / cytoplasm, as CD3 or CD8 stain) around the nucleus;
* other nuclei: larger (9–14 µm), elongated, paler, no DAB.

Positions come from a rejection step so nuclei touch at most a little. Optional clusters add
Gaussian blobs of immune-cell density at given micrometre positions (planted infiltrates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

Stain = Literal["he", "ihc-dab"]

#: Cells per mm² of tissue outside clusters (typical of a carcinoma section: 2,000–5,000).
DEFAULT_CELLS_PER_MM2 = 3000.0
#: Class names per stain: (immune / positive class, other / negative class).
CLASS_NAMES: dict[str, tuple[str, str]] = {
    "he": ("lymphocyte", "other"),
    "ihc-dab": ("dab-positive", "dab-negative"),
}


@dataclass(frozen=True)
class ImmuneCluster:
    """A Gaussian blob of extra immune cells.

    Attributes
    ----------
    x_um, y_um : centre in micrometres from the image's top-left corner.
    sigma_um : standard deviation of the blob in micrometres.
    n_cells : immune cells drawn for the blob (before overlap rejection).
    """

    x_um: float
    y_um: float
    sigma_um: float
    n_cells: int


@dataclass(frozen=True, eq=False)
class PlantedCells:
    """Ground truth of a rendered phantom.

    Attributes
    ----------
    x, y : (N,) float64 nucleus centres in image (level-0) pixels, pixel-centre convention
        (pixel ``i`` spans ``[i - 0.5, i + 0.5)``).
    cls : (N,) str ndarray of class names (see :data:`CLASS_NAMES`).
    diameter_um : (N,) float64 nucleus equivalent diameter in micrometres.
    in_cluster : (N,) bool, True for cells drawn by a cluster.
    mpp : micrometres per pixel.
    stain : ``"he"`` or ``"ihc-dab"``.
    positive_class : the immune class name.
    tissue : (H, W) bool ndarray, where tissue was drawn.
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    cls: NDArray[np.str_]
    diameter_um: NDArray[np.float64]
    in_cluster: NDArray[np.bool_]
    mpp: float
    stain: Stain
    positive_class: str
    tissue: NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def positive(self) -> NDArray[np.bool_]:
        """(N,) bool, True for the immune (positive) class."""
        return np.asarray(self.cls == self.positive_class)


def _tissue_region(
    width: int, height: int, shape: Literal["full", "ellipse"], rng: np.random.Generator
) -> NDArray[np.bool_]:
    if shape == "full":
        return np.ones((height, width), bool)
    if shape != "ellipse":
        raise ValueError(f"tissue must be 'full' or 'ellipse', got {shape!r}.")
    yy, xx = np.ogrid[:height, :width]
    # An ellipse covering ~60 % of the image, its border wobbling so it is not a pure conic.
    angle = np.arctan2(yy - height / 2, xx - width / 2)
    wobble = 1.0 + 0.06 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
    rho = ((xx - width / 2) / (0.44 * width)) ** 2 + ((yy - height / 2) / (0.44 * height)) ** 2
    return np.asarray(rho < wobble**2)


def _place(
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    r: NDArray[np.float64],
    min_gap: float,
) -> NDArray[np.bool_]:
    """Greedy rejection: keep cells in order unless they overlap an earlier kept one.

    Two nuclei may overlap by up to ``1 - min_gap`` of the sum of their radii.
    """
    from scipy.spatial import cKDTree

    keep = np.ones(x.shape[0], bool)
    if x.size < 2:
        return keep
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(
        2 * float(r.max()) * min_gap, output_type="ndarray"
    )
    if pairs.size == 0:
        return keep
    i, j = pairs.min(axis=1), pairs.max(axis=1)
    d = np.hypot(x[i] - x[j], y[i] - y[j])
    clash = d < (r[i] + r[j]) * min_gap
    i, j = i[clash], j[clash]
    order = np.lexsort((i, j))
    for a, b in zip(i[order].tolist(), j[order].tolist(), strict=True):
        if keep[a] and keep[b]:
            keep[b] = False
    return keep


def _stamp(
    target: NDArray[np.float32],
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    value: float,
    rng: np.random.Generator,
    *,
    ring: tuple[NDArray[np.float32], float, float] | None = None,
) -> None:
    """Draw a soft-edged ellipse of OD ``value`` (chromatin-textured) into ``target`` by max.

    ``ring = (dab_target, ring_width_px, ring_od)`` also draws a DAB annulus around it.
    """
    h, w = target.shape
    extra = ring[1] if ring is not None else 0.0
    half = int(np.ceil(max(a, b) + extra + 2))
    x0, x1 = max(0, int(cx) - half), min(w, int(cx) + half + 1)
    y0, y1 = max(0, int(cy) - half), min(h, int(cy) + half + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u, v = xx - cx, yy - cy
    c, s = np.cos(theta), np.sin(theta)
    ru = (u * c + v * s) / a
    rv = (-u * s + v * c) / b
    rho = np.sqrt(ru * ru + rv * rv)
    # ~0.7 px soft edge, like a focused nucleus boundary after the optics.
    edge = 1.0 / (1.0 + np.exp((rho - 1.0) * min(a, b) / 0.7))
    texture = 1.0 + 0.15 * rng.standard_normal(edge.shape).astype(np.float32)
    patch = target[y0:y1, x0:x1]
    np.maximum(patch, value * edge * texture, out=patch)
    if ring is not None:
        dab, width_px, od = ring
        dist = (rho - 1.0) * min(a, b)  # roughly the distance outside the nucleus, in px
        annulus = np.exp(-0.5 * ((dist - 0.5 * width_px) / (0.5 * width_px)) ** 2).astype(
            np.float32
        )
        dpatch = dab[y0:y1, x0:x1]
        np.maximum(dpatch, od * annulus * texture, out=dpatch)


def render_cells(
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    stain: Stain = "he",
    cells_per_mm2: float = DEFAULT_CELLS_PER_MM2,
    immune_fraction: float = 0.35,
    seed: int = 0,
    clusters: Sequence[ImmuneCluster] | None = None,
    tissue: Literal["full", "ellipse"] = "full",
    noise: float = 4.0,
) -> tuple[NDArray[np.uint8], PlantedCells]:
    """Render a phantom of nuclei with known stains at known positions.

    Parameters
    ----------
    width, height : image size in pixels.
    mpp : micrometres per pixel (sizes below are in µm and scale with it).
    stain : ``"he"`` (eosin stroma, lymphocytes vs other nuclei) or ``"ihc-dab"`` (pale
        counterstain, DAB-ringed immune cells vs hematoxylin-only nuclei).
    cells_per_mm2 : nuclei per mm² of tissue outside clusters.
    immune_fraction : share of those that are immune cells.
    seed : RNG seed; the same seed gives the same image and truth.
    clusters : Gaussian blobs of extra immune cells.
    tissue : ``"full"`` (tissue everywhere) or ``"ellipse"`` (a tissue blob on white glass,
        so tissue detection has something to find).
    noise : standard deviation of the per-pixel RGB noise.

    Returns
    -------
    image : (height, width, 3) uint8 RGB.
    truth : :class:`PlantedCells`.
    """
    from skimage.color import rgb_from_hed

    if stain not in CLASS_NAMES:
        raise ValueError(f"stain must be 'he' or 'ihc-dab', got {stain!r}.")
    if width <= 0 or height <= 0 or mpp <= 0:
        raise ValueError(f"width, height and mpp must be positive, got {width}, {height}, {mpp}.")
    rng = np.random.default_rng(seed)
    region = _tissue_region(width, height, tissue, rng)
    area_mm2 = float(region.sum()) * (mpp * 1e-3) ** 2
    n = rng.poisson(cells_per_mm2 * area_mm2)
    xs = rng.uniform(0, width, n)
    ys = rng.uniform(0, height, n)
    immune = rng.random(n) < immune_fraction
    cl = np.zeros(n, bool)
    for c in clusters or ():
        k = int(c.n_cells)
        xs = np.concatenate([rng.normal(c.x_um / mpp, c.sigma_um / mpp, k), xs])
        ys = np.concatenate([rng.normal(c.y_um / mpp, c.sigma_um / mpp, k), ys])
        immune = np.concatenate([np.ones(k, bool), immune])
        cl = np.concatenate([np.ones(k, bool), cl])
    m = xs.size
    # Immune nuclei 6–7 µm, round; other nuclei 9–14 µm (equivalent diameter), elongated.
    d_um = np.where(immune, rng.uniform(6.0, 7.0, m), rng.uniform(9.0, 14.0, m))
    aspect = np.where(immune, rng.uniform(1.0, 1.12, m), rng.uniform(1.4, 2.0, m))
    r_px = d_um / 2 / mpp
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    xi = np.clip(xs.astype(np.int64), 0, width - 1)
    yi = np.clip(ys.astype(np.int64), 0, height - 1)
    inside &= region[yi, xi]
    # Clusters come first, so a dense infiltrate is kept and the background cells give way.
    keep = np.zeros(m, bool)
    keep[inside] = _place(xs[inside], ys[inside], r_px[inside], min_gap=0.9)
    xs, ys, d_um, aspect, r_px = (v[keep] for v in (xs, ys, d_um, aspect, r_px))
    immune, cl = immune[keep], cl[keep]

    h_od = np.zeros((height, width), np.float32)
    e_od = np.zeros((height, width), np.float32)
    d_od = np.zeros((height, width), np.float32)
    # Stroma: smooth random field (fibres and thickness changes at ~10 µm).
    field = ndi.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 10 / mpp)
    field /= max(float(field.std()), 1e-6)
    if stain == "he":
        e_od[...] = np.where(region, 0.28 + 0.08 * field, 0.0)
        h_od[...] = np.where(region, 0.06 + 0.02 * field, 0.0)
    else:
        h_od[...] = np.where(region, 0.12 + 0.03 * field, 0.0)
    ring_px = 1.5 / mpp
    for k in range(xs.size):
        d = d_um[k] / 2 / mpp
        a, b = d * np.sqrt(aspect[k]), d / np.sqrt(aspect[k])
        theta = rng.uniform(0, np.pi)
        if immune[k]:
            od = rng.uniform(0.75, 1.0) if stain == "he" else rng.uniform(0.45, 0.7)
            ring = (d_od, ring_px, float(rng.uniform(0.4, 0.6))) if stain == "ihc-dab" else None
        else:
            od = rng.uniform(0.3, 0.45) if stain == "he" else rng.uniform(0.35, 0.55)
            ring = None
        _stamp(h_od, xs[k], ys[k], a, b, theta, od, rng, ring=ring)
    od_rgb = (
        h_od[..., None] * rgb_from_hed[0].astype(np.float32)
        + e_od[..., None] * rgb_from_hed[1].astype(np.float32)
        + d_od[..., None] * rgb_from_hed[2].astype(np.float32)
    )
    del h_od, e_od, d_od
    # Optics: half a micrometre of blur, then sensor noise.
    od_rgb = ndi.gaussian_filter(od_rgb, (0.25 / mpp, 0.25 / mpp, 0))
    rgb = 250.0 * np.power(10.0, -od_rgb, dtype=np.float32)
    rgb += rng.normal(0.0, noise, rgb.shape).astype(np.float32)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    pos, neg = CLASS_NAMES[stain]
    truth = PlantedCells(
        x=xs.astype(np.float64),
        y=ys.astype(np.float64),
        cls=np.where(immune, pos, neg),
        diameter_um=d_um.astype(np.float64),
        in_cluster=cl,
        mpp=float(mpp),
        stain=stain,
        positive_class=pos,
        tissue=region,
    )
    return image, truth


def write_phantom_slide(
    path: str | Path,
    image: NDArray[np.uint8],
    *,
    mpp: float,
    levels: int = 3,
    compression: Literal["jpeg", "zlib", "none"] = "zlib",
) -> Path:
    """Write a rendered phantom as a tiled pyramidal TIFF with its mpp.

    Uses :func:`wsi.synthetic.write_pyramid_tiff` (what the wsi tests use), so
    :func:`wsi.open_slide` reads it through the ordinary slide path.
    """
    from oncotrace.wsi.synthetic import write_pyramid_tiff

    return write_pyramid_tiff(path, image, mpp=mpp, levels=levels, compression=compression)
