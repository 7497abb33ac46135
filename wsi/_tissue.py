"""Where to tile: tissue sheets (H&E, IHC) or cell-dense regions of cytology smears."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from ._errors import NoTissueError
from ._slide import Slide

Mode = Literal["tissue", "smear"]

#: Default overview resolutions (µm/px): a tissue sheet is found at 8 µm/px; single cells
#: (10–20 µm) need ~2 µm/px to be seen at all.
MASK_MPP: dict[str, float] = {"tissue": 8.0, "smear": 2.0}
#: Overviews larger than this many pixels are made coarser so memory stays bounded (smear
#: detection peaks at ~19 bytes per overview pixel: 40 M px is ~0.75 GB).
MAX_OVERVIEW_PX = 40_000_000


@dataclass(frozen=True)
class TissueMask:
    """A boolean map of where to tile, on an overview grid of the slide.

    Attributes
    ----------
    mask : (h, w) bool ndarray, True where tissue (or cells) is.
    downsample : level-0 pixels per mask pixel (same on both axes).
    mpp : micrometres per mask pixel.
    mode : ``"tissue"`` or ``"smear"``.
    thumbnail : (h, w, 3) uint8 ndarray, the RGB overview the mask was computed from.
    qc : QC numbers (tissue_fraction, ink_fraction, …).
    """

    mask: np.ndarray
    downsample: float
    mpp: float
    mode: Mode
    thumbnail: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)


def detect_tissue(
    slide: Slide,
    *,
    mode: Mode = "tissue",
    mask_mpp: float | None = None,
    allow_empty: bool = False,
) -> TissueMask:
    """Find tissue (``mode="tissue"``) or cell-dense smear regions (``mode="smear"``).

    Parameters
    ----------
    slide : an opened slide with a physical pixel size.
    mode : ``"tissue"`` for sections (saturation/Otsu, pen ink removed), ``"smear"`` for
        cytology (nuclear optical density and local cell density, clumps and debris rejected).
    mask_mpp : overview resolution in µm/px (default 8 for tissue, 2 for smear); never finer
        than the slide itself.
    allow_empty : return an empty mask instead of raising :class:`NoTissueError`.
    """
    if mode not in MASK_MPP:
        raise ValueError(f"mode must be 'tissue' or 'smear', got {mode!r}")
    mpp0 = float(np.mean(slide.mpp_xy))
    want = MASK_MPP[mode] if mask_mpp is None else float(mask_mpp)
    downsample = max(1.0, want / mpp0)
    w0, h0 = slide.dimensions
    while (w0 / downsample) * (h0 / downsample) > MAX_OVERVIEW_PX:
        downsample *= 1.5
    overview = slide.read_downsampled(downsample)
    # read_downsampled rounds the output size; use the exact ratio actually produced
    downsample = w0 / overview.shape[1]
    mpp = mpp0 * downsample
    if mode == "tissue":
        mask, qc = tissue_mask(overview, mpp)
    else:
        from ._smear import smear_mask

        mask, qc = smear_mask(overview, mpp)
    if not mask.any() and not allow_empty:
        hint = " For cytology smears use mode=smear." if mode == "tissue" else ""
        raise NoTissueError(
            slide.path,
            f"no {'tissue' if mode == 'tissue' else 'cell-dense region'} was found"
            f" (overview {overview.shape[1]}×{overview.shape[0]} px at {mpp:.3g} µm/px).",
            "check that the slide is not blank or out of focus." + hint,
            param="mode" if mode == "tissue" else None,
        )
    return TissueMask(
        mask=mask, downsample=downsample, mpp=mpp, mode=mode, thumbnail=overview, qc=qc
    )


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value in [0, 1]; (h, w) float32 each.

    Channel-wise maxima of separate planes: reducing over the trailing RGB axis is ~10x slower
    on a 3000² overview.
    """
    r = rgb[..., 0].astype(np.float32)
    g = rgb[..., 1].astype(np.float32)
    b = rgb[..., 2].astype(np.float32)
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    sat = delta / np.maximum(mx, 1.0)
    inv = 60.0 / np.maximum(delta, 1e-6)
    red_max = mx == r
    hue = (g - b) * inv
    hue = np.where((mx == g) & ~red_max, (b - r) * inv + 120.0, hue)
    hue = np.where((mx == b) & (mx != g) & ~red_max, (r - g) * inv + 240.0, hue)
    hue[hue < 0] += 360.0
    hue[delta == 0] = 0.0
    return hue, sat, mx / 255.0


def ink_classes(
    rgb: np.ndarray, hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Pen-marker candidates by colour: ``green``, ``blue``, ``red``, ``black``; (h, w) bool each.

    Stains rarely take these colours at overview resolution: eosin is pink (hue 300–360°,
    saturation < 0.6), hematoxylin purple-blue with red above green (hue 250–300°), DAB brown
    (hue 10–40°). Blue marker is deep blue (hue 180–245°, unlike pale IHC counterstain);
    green and teal marker 70–180°; red marker a deep, highly saturated red; black marker is
    darker than any stained tissue averaged over 8 µm pixels, or dark and colourless.
    Blue stains (Giemsa, toluidine blue) do look like blue marker: :func:`tissue_mask`
    tells them apart by extent.
    """
    hue, sat, val = _hsv(rgb) if hsv is None else hsv
    return {
        "green": (hue >= 70) & (hue <= 180) & (sat > 0.12) & (val < 0.95),
        # IHC hematoxylin counterstain is blue too, but pale (saturation < 0.45).
        "blue": (hue > 180) & (hue <= 245) & (sat > 0.5) & (val < 0.95),
        "red": ((hue >= 340) | (hue <= 10)) & (sat > 0.65) & (val > 0.3),
        # Dense hematoxylin (skin, lymphoid tissue) reaches value 0.25-0.35 but stays purple.
        "black": (val < 0.22) | ((val < 0.35) & (sat < 0.3)),
    }


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Union of all pen-marker colour classes (see :func:`ink_classes`). (h, w) bool."""
    classes = ink_classes(rgb)
    return classes["green"] | classes["blue"] | classes["red"] | classes["black"]


#: A marker colour covering more than this fraction of the stained area is the stain itself
#: (Giemsa and toluidine blue are blue everywhere; a pen circles or crosses a region).
STAIN_DOMINANCE = 0.3


def tissue_mask(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, dict[str, float]]:
    """Tissue mask of an RGB overview at ``mpp`` µm/px: saturation Otsu, ink removed, cleaned.

    Returns the (h, w) bool mask and QC numbers (``tissue_fraction``, ``ink_fraction``,
    ``saturation_threshold``).
    """
    hsv = _hsv(rgb)
    _, sat, val = hsv
    classes = ink_classes(rgb, hsv)
    stained = (sat > 0.07) & (val > 0.2)
    n_stained = max(1, int(stained.sum()))
    raw_ink = np.zeros(sat.shape, bool)
    stain_like: list[str] = []
    for name, cls in classes.items():
        if name != "black" and cls.sum() > STAIN_DOMINANCE * n_stained:
            stain_like.append(name)
            continue
        raw_ink |= cls
    # Ink strokes are several pixels wide and their anti-aliased edges are colourful too.
    ink = ndi.binary_dilation(raw_ink, iterations=max(1, round(16 / mpp)))
    candidates = sat[~ink & (val > 0.2)]
    # Floor on the threshold: on a blank slide Otsu splits noise, and glass is < 0.05.
    thr = 0.07
    if candidates.size > 16 and np.ptp(candidates) > 0:
        thr = max(thr, float(filters.threshold_otsu(candidates)))
        thr = min(thr, 0.25)  # faint IHC / pale eosin is still tissue
    tissue = (sat > thr) & ~ink & (val > 0.2)
    radius = max(1, round(16 / mpp))
    tissue = morphology.closing(tissue, morphology.disk(radius), mode="ignore")
    tissue &= ~ink
    area_px = (1.0 / mpp) ** 2  # mask pixels per µm²
    tissue = morphology.remove_small_objects(
        tissue, max_size=max(4, int(0.005e6 * area_px))
    )  # < 0.005 mm² (a 70 µm speck)
    tissue = morphology.remove_small_holes(
        tissue, max_size=max(4, int(0.05e6 * area_px))
    )  # < 0.05 mm²
    tissue &= ~ink
    n = tissue.size
    qc = {
        "tissue_fraction": float(tissue.sum() / n),
        "ink_fraction": float(raw_ink.sum() / n),
        "saturation_threshold": float(thr),
        # colours that looked like marker but cover most of the section: taken as stain
        **{f"{name}_taken_as_stain": 1.0 for name in stain_like},
    }
    return tissue, qc
