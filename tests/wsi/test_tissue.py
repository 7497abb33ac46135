"""Tissue mode: planted tissue and pen ink, blank slides, a real inked thumbnail."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from oncotrace import wsi
from oncotrace.wsi.synthetic import BACKGROUND, he_texture, write_pyramid_tiff
from PIL import Image
from scipy import ndimage as ndi

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

INKS = {"green": (40, 140, 90), "blue": (40, 70, 180), "black": (30, 30, 35)}


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"test data missing in CI: {path}")
        pytest.skip(f"test data not present: {path}")
    return path


def _inked_slide(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    h, w = 4096, 6144
    img = np.empty((h, w, 3), np.uint8)
    img[...] = BACKGROUND
    tissue = np.zeros((h, w), bool)
    tissue[512:3584, 512:4096] = True
    img[tissue] = he_texture((3072, 3584), rng, mpp=0.25).reshape(-1, 3)
    ink = np.zeros((h, w), bool)
    # three marker strokes, 0.5 mm wide: on tissue, on the tissue edge, on glass
    for (name, colour), (y0, x0) in zip(
        INKS.items(), [(1200, 800), (3400, 300), (1800, 4600)], strict=True
    ):
        ink[y0 : y0 + 200, x0 : x0 + 1200] = True
        img[y0 : y0 + 200, x0 : x0 + 1200] = colour
        assert name
    path = write_pyramid_tiff(tmp_path / "inked.tiff", img, mpp=0.25, levels=3, compression="jpeg")
    return path, tissue, ink


def test_pen_ink_is_excluded_and_measured(tmp_path: Path) -> None:
    path, tissue, ink = _inked_slide(tmp_path)
    with wsi.open_slide(path) as slide:
        tm = wsi.detect_tissue(slide)
    ds = tm.downsample
    assert tm.mpp == pytest.approx(8.0, rel=0.05)
    # truth on the mask grid: sample the planted maps at mask-pixel centres
    ys = ((np.arange(tm.mask.shape[0]) + 0.5) * ds).astype(int)
    xs = ((np.arange(tm.mask.shape[1]) + 0.5) * ds).astype(int)
    t = tissue[np.ix_(ys, xs)]
    k = ink[np.ix_(ys, xs)]
    assert not (tm.mask & k).any(), "ink pixels must never be called tissue"
    clean_tissue = t & ~k
    recall = (tm.mask & clean_tissue).sum() / clean_tissue.sum()
    false_pos = (tm.mask & ~t).sum() / (~t).sum()
    assert recall > 0.9
    assert false_pos < 0.02
    assert tm.qc["ink_fraction"] == pytest.approx(k.mean(), rel=0.6)
    assert tm.qc["tissue_fraction"] == pytest.approx(tm.mask.mean())


def test_ink_mask_separates_marker_from_stains() -> None:
    px = np.array(
        [
            [INKS["green"], INKS["blue"], INKS["black"], (200, 40, 70), (170, 205, 200)],  # markers
            [(232, 160, 200), (110, 60, 150), (150, 100, 60), (73, 35, 75), (130, 150, 200)],
        ],
        np.uint8,
    )
    got = wsi.ink_mask(px)
    # stains: eosin, hematoxylin, DAB, dense hematoxylin, IHC hematoxylin counterstain (blue)
    np.testing.assert_array_equal(got, [[True] * 5, [False] * 5])


def test_blank_slide_is_a_no_tissue_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = np.full((2048, 2048, 3), BACKGROUND, np.uint8) + rng.integers(
        0, 4, (2048, 2048, 1), dtype=np.uint8
    )
    path = write_pyramid_tiff(tmp_path / "blank.tiff", img, mpp=0.25, compression="jpeg")
    with wsi.open_slide(path) as slide:
        with pytest.raises(wsi.NoTissueError) as err:
            wsi.detect_tissue(slide)
        assert (
            str(path) in str(err.value)
            and "mode=smear" in str(err.value)
            and err.value.param == "mode"
        )
        empty = wsi.detect_tissue(slide, allow_empty=True)
    assert not empty.mask.any() and empty.qc["tissue_fraction"] == 0.0


def test_real_inked_thumbnail_keeps_tissue_and_drops_marker() -> None:
    rgb = np.asarray(
        Image.open(_need(DATA / "patches/histolab/diagnostic-slide-thumb-rgb.png")).convert("RGB")
    )
    mask, qc = wsi.tissue_mask(rgb, 40.0)
    ink = wsi.ink_mask(rgb)
    assert qc["ink_fraction"] > 0.1  # green, red and black marker all around this section
    assert not (mask & ink).any()
    # hand-picked: the inside of the section (away from the marker rings) is tissue, the
    # glass in the top-left corner is not
    inside = (slice(150, 400), slice(100, 400))
    near_ink = ndi.binary_dilation(ink, iterations=3)[inside]
    assert mask[inside][~near_ink].mean() > 0.95
    assert not mask[0:40, 0:40].any()
    green = (rgb[..., 1].astype(int) - rgb[..., 0] > 30) & (rgb[..., 1] > rgb[..., 2])
    assert green.sum() > 1000 and not (mask & green).any()


def test_real_svs_without_marker_has_little_ink() -> None:
    with wsi.open_slide(_need(DATA / "slides/cmu-1-small-region.svs")) as slide:
        tm = wsi.detect_tissue(slide)
    assert 0.2 < tm.qc["tissue_fraction"] < 0.6
    assert tm.qc["ink_fraction"] < 0.05


def test_blue_stain_is_not_mistaken_for_blue_marker(tmp_path: Path) -> None:
    """Giemsa / toluidine-blue sections are blue all over; a pen only circles a region."""
    rng = np.random.default_rng(5)
    img = np.full((3072, 3072, 3), BACKGROUND, np.uint8)
    giemsa = he_texture((2048, 2048), rng, mpp=0.25)[..., ::-1]  # swap R/B: blue-violet stain
    giemsa = (giemsa.astype(np.float32) * (0.5, 0.7, 1.0)).astype(np.uint8)
    img[512:2560, 512:2560] = giemsa
    path = write_pyramid_tiff(tmp_path / "giemsa.tiff", img, mpp=0.25, levels=3, compression="jpeg")
    with wsi.open_slide(path) as slide:
        tm = wsi.detect_tissue(slide)
    assert tm.qc.get("blue_taken_as_stain") == 1.0
    planted = tm.mask.size * (2048 / 3072) ** 2
    assert tm.mask.sum() == pytest.approx(planted, rel=0.05)


def test_real_giemsa_bone_marrow_keeps_its_blue_cells() -> None:
    with wsi.open_slide(_need(DATA / "dicom-wsi/bone-marrow")) as slide:
        tm = wsi.detect_tissue(slide)
    assert tm.qc.get("blue_taken_as_stain") == 1.0
    assert tm.qc["tissue_fraction"] > 0.5  # densely cellular marrow between fat vacuoles
