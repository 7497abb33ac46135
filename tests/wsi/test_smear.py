"""Smear mode: cell-dense regions of cytology smears, checked against planted and annotated truth.

Synthetic smears (``wsi.synthetic_smear``) know where every cluster, single cell, thick clump,
debris speck and red cell is; the real camera fields in ``../shared/data/cytology`` carry
nucleus / cell masks or boxes drawn by people. Neither truth is derived from ``smear_mask``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from oncotrace import wsi
from oncotrace.wsi import smear_mask
from oncotrace.wsi.synthetic_smear import SmearTruth, make_smear, render_smear
from PIL import Image
from scipy import ndimage

# -- synthetic smears ---------------------------------------------------------------------------

#: name -> make_smear arguments. "giemsa-bloody" adds 3 000 red cells (~1 000/mm²): stained,
#: but without a nucleus, so they must not count as cells.
SMEARS: dict[str, dict[str, object]] = {
    "pap": {"stain": "pap", "seed": 0},
    "giemsa-bloody": {"stain": "giemsa", "seed": 1, "n_rbc": 3000},
}
OVERVIEW_MPP = (1.0, 2.0)


@dataclasses.dataclass
class Smear:
    path: Path
    truth: SmearTruth
    level0: np.ndarray
    masks: dict[float, tuple[np.ndarray, dict[str, float]]] = dataclasses.field(
        default_factory=dict
    )

    def overview(self, mpp: float) -> np.ndarray:
        """Area-average (PIL BOX) the level-0 image down to ``mpp`` µm/px."""
        ds = mpp / self.truth.mpp
        size = (round(self.truth.width_px / ds), round(self.truth.height_px / ds))
        return np.asarray(Image.fromarray(self.level0).resize(size, Image.Resampling.BOX))

    def mask(self, mpp: float) -> tuple[np.ndarray, dict[str, float]]:
        if mpp not in self.masks:
            self.masks[mpp] = smear_mask(self.overview(mpp), mpp)
        return self.masks[mpp]


@pytest.fixture(scope="session")
def smears(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Smear]:
    """Generated smears, written once per session and read back through ``wsi.open_slide``."""
    made: dict[str, Smear] = {}

    def get(name: str) -> Smear:
        if name not in made:
            path = tmp_path_factory.mktemp("smear") / f"{name}.tif"
            truth = make_smear(path, **SMEARS[name])  # type: ignore[arg-type]
            with wsi.open_slide(path) as slide:
                level0 = slide.read_region((0, 0), 0, slide.dimensions)
            made[name] = Smear(path, truth, level0)
        return made[name]

    return get


def _grid(shape: tuple[int, int], ds: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 coordinates of the pixel centres of a grid ``ds`` × coarser than level 0."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx + 0.5) * ds, (yy + 0.5) * ds


def _in_discs(
    shape: tuple[int, int], ds: float, centers: np.ndarray, radii: np.ndarray, scale: float = 1.0
) -> list[np.ndarray]:
    x, y = _grid(shape, ds)
    return [
        (x - cx) ** 2 + (y - cy) ** 2 <= (scale * r) ** 2
        for (cx, cy), r in zip(centers, radii, strict=True)
    ]


def test_make_smear_writes_a_pyramid_that_reads_back_at_its_mpp(
    smears: Callable[[str], Smear],
) -> None:
    sm = smears("pap")
    for backend in ("auto", "tifffile", "openslide"):
        with wsi.open_slide(sm.path, backend=backend) as slide:
            assert slide.mpp is not None and slide.mpp.source == "file"
            assert slide.mpp_xy == pytest.approx((0.25, 0.25), rel=1e-6)
            assert slide.dimensions == (8000, 6000)
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    truth = sm.truth
    assert len(truth.cluster_center_px) == 12 and len(truth.clump_center_px) == 3
    assert ((truth.cluster_n_cells >= 10) & (truth.cluster_n_cells <= 60)).all()
    radius_um = truth.um("cluster_radius")
    assert (radius_um <= 120 + 1e-6).all() and (radius_um > 15).all()
    assert truth.cluster_center_px.dtype == np.int64 and truth.cluster_center_px.shape == (12, 2)
    # What was planted is where the pixels are: cells are darker than the glass around them.
    grey = sm.level0[::4, ::4].mean(axis=2)
    cells = truth.cell_mask(4.0)[: grey.shape[0], : grey.shape[1]]
    far = truth.object_distance_px(4.0)[: grey.shape[0], : grey.shape[1]] * 4 * truth.mpp > 20
    assert grey[cells].mean() < grey[far].mean() - 30
    assert 225 <= np.median(grey[far]) <= 250


def test_render_smear_is_reproducible() -> None:
    kw = {
        "width_px": 1200,
        "height_px": 900,
        "mpp": 0.5,
        "n_clusters": 1,
        "n_single_cells": 5,
        "n_clumps": 1,
        "n_debris": 30,
    }
    a, ta = render_smear(seed=7, **kw)  # type: ignore[arg-type]
    b, tb = render_smear(seed=7, **kw)  # type: ignore[arg-type]
    c, _ = render_smear(seed=8, **kw)  # type: ignore[arg-type]
    assert np.array_equal(a, b) and np.array_equal(ta.cell_ellipse_px, tb.cell_ellipse_px)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("mpp", OVERVIEW_MPP)
@pytest.mark.parametrize("name", list(SMEARS))
def test_planted_clusters_are_in_the_mask(
    smears: Callable[[str], Smear], name: str, mpp: float
) -> None:
    sm = smears(name)
    mask, qc = sm.mask(mpp)
    ds = mpp / sm.truth.mpp
    ij = np.minimum(
        (sm.truth.cluster_center_px / ds).astype(int), [mask.shape[1] - 1, mask.shape[0] - 1]
    )
    recall = mask[ij[:, 1], ij[:, 0]].mean()
    assert recall >= 0.9, f"{name} @ {mpp} µm/px: {recall:.0%} of cluster centres in the mask"
    # Singles lie apart, so each is an object of its own; touching nuclei in a group merge.
    n_apart = len(sm.truth.single_center_px) + len(sm.truth.cluster_center_px)
    assert qc["n_cell_objects"] >= 0.5 * n_apart


@pytest.mark.parametrize("mpp", OVERVIEW_MPP)
@pytest.mark.parametrize("name", list(SMEARS))
def test_background_far_from_cells_is_left_out(
    smears: Callable[[str], Smear], name: str, mpp: float
) -> None:
    sm = smears(name)
    mask, _ = sm.mask(mpp)
    ds = mpp / sm.truth.mpp
    dist_um = sm.truth.object_distance_px(ds)[: mask.shape[0], : mask.shape[1]] * mpp
    background = dist_um > 50  # red cells are background too: object_distance ignores them
    assert background.mean() > 0.3
    frac = mask[background].mean()
    assert frac < 0.05, f"{name} @ {mpp} µm/px: mask covers {frac:.1%} of empty glass"


@pytest.mark.parametrize("mpp", OVERVIEW_MPP)
@pytest.mark.parametrize("name", list(SMEARS))
def test_thick_clumps_and_debris_are_left_out(
    smears: Callable[[str], Smear],
    name: str,
    mpp: float,
    record_property: Callable[[str, object], None],
) -> None:
    sm = smears(name)
    mask, qc = sm.mask(mpp)
    ds = mpp / sm.truth.mpp
    t = sm.truth
    clumps = _in_discs(mask.shape, ds, t.clump_center_px, t.clump_radius_px)
    cores = _in_discs(mask.shape, ds, t.clump_center_px, t.clump_radius_px, scale=0.5)
    in_clump = [float(mask[d].mean()) for d in clumps]
    in_core = [float(mask[d].mean()) for d in cores]
    record_property("clump_area_in_mask", in_clump)
    # The piled-up centre is never tiled; the single-layer fringe of a clump may be.
    assert max(in_core) <= 0.1, f"clump cores in mask: {in_core}"
    assert np.mean(in_clump) <= 0.3, f"clump discs in mask: {in_clump}"
    assert qc["clump_fraction"] > 0
    patches = _in_discs(mask.shape, ds, t.debris_patch_center_px, t.debris_patch_radius_px)
    in_patch = [float(mask[d].mean()) for d in patches]
    record_property("debris_patch_area_in_mask", in_patch)
    # Two touching 3-µm specks on a red cell can pass for a small nucleus, hence the max.
    assert np.mean(in_patch) < 0.05 and max(in_patch) < 0.2, f"debris patches in mask: {in_patch}"
    assert qc["debris_fraction"] > 0


def test_mask_does_not_depend_on_overview_mpp(smears: Callable[[str], Smear]) -> None:
    sm = smears("pap")
    coarse, qc2 = sm.mask(2.0)
    h, w = coarse.shape
    for finer in (0.5, 1.0):
        fine, qc = sm.mask(finer)
        k = round(2.0 / finer)
        # Compare on the 2 µm/px grid: a coarse pixel is "in" when most of its fine pixels are.
        fine_on_coarse = fine[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3)) >= 0.5
        iou = (fine_on_coarse & coarse).sum() / (fine_on_coarse | coarse).sum()
        assert iou >= 0.8, f"IoU of the {finer} and 2.0 µm/px masks is {iou:.2f}"
        assert qc["cell_fraction"] == pytest.approx(qc2["cell_fraction"], rel=0.2)
        assert qc["n_cell_objects"] == pytest.approx(qc2["n_cell_objects"], rel=0.2)


@pytest.mark.parametrize("stain", ["pap", "giemsa"])
@pytest.mark.parametrize("mpp", [0.25, 2.0])
def test_empty_and_debris_only_fields(stain: str, mpp: float) -> None:
    base = {
        "width_px": round(1000 / mpp),
        "height_px": round(800 / mpp),
        "mpp": mpp,
        "stain": stain,
    }
    base.update(n_clusters=0, n_single_cells=0, n_clumps=0)
    empty, _ = render_smear(n_debris=0, seed=3, **base)  # type: ignore[arg-type]
    mask, qc = smear_mask(empty, mpp)
    assert not mask.any() and qc["cell_fraction"] == 0 and qc["n_cell_objects"] == 0
    # 400 specks of 1–3 µm (most in patches, ~1 per 110 µm²) and 300 red cells, no nucleus.
    debris, truth = render_smear(n_debris=400, n_rbc=300, seed=4, **base)  # type: ignore[arg-type]
    mask, qc = smear_mask(debris, mpp)
    assert qc["debris_fraction"] > 0
    patches = _in_discs(
        mask.shape, mpp / truth.mpp, truth.debris_patch_center_px, truth.debris_patch_radius_px
    )
    assert np.mean([mask[p].mean() for p in patches]) < 0.05
    if mpp <= 1.0:
        assert not mask.any()
    else:  # at 2 µm/px three touching 3-µm specks look like a small nucleus
        assert mask.mean() < 0.005


def test_blank_glass_with_uneven_light_and_noise_gives_an_empty_mask() -> None:
    # Not from the generator: vignetting (corners 20 % darker), sensor noise, a tint.
    rng = np.random.default_rng(12345)
    h, w = 1500, 2000
    yy, xx = np.mgrid[:h, :w]
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    light = 1.0 - 0.1 * r2
    img = np.array([228.0, 236.0, 246.0]) * light[..., None] + rng.normal(0, 4, (h, w, 3))
    mask, _ = smear_mask(np.clip(img, 0, 255).astype(np.uint8), 1.0)
    assert not mask.any()
    assert not smear_mask(np.zeros((300, 300, 3), np.uint8), 2.0)[0].any()
    assert not smear_mask(np.full((300, 300, 3), 255, np.uint8), 2.0)[0].any()


def test_bad_input_is_refused_with_a_fix() -> None:
    rgb = np.full((64, 64, 3), 240, np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        smear_mask(rgb.astype(np.float32), 2.0)
    with pytest.raises(ValueError, match="RGB"):
        smear_mask(rgb[..., 0], 2.0)
    with pytest.raises(ValueError, match="finer level"):
        smear_mask(rgb, 8.0)
    with pytest.raises(ValueError, match="window_um"):
        smear_mask(rgb, 2.0, window_um=0)
    mask, qc = smear_mask(np.dstack([rgb, np.full((64, 64), 255, np.uint8)]), 2.0)  # RGBA
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert {"cell_fraction", "n_cell_objects", "clump_fraction", "debris_fraction"} <= set(qc)


@pytest.mark.parametrize("name", list(SMEARS))
def test_smear_tiles_find_clusters_and_few_empty_tiles(
    smears: Callable[[str], Smear], name: str
) -> None:
    """Acceptance: ≥ 90 % of clusters tiled, < 5 % of tiles without a planted cell."""
    sm = smears(name)
    with wsi.open_slide(sm.path) as slide:
        tm = wsi.detect_tissue(slide, mode="smear")
        # default coverage for smear masks (5 %): a ~100 µm cluster lying across grid lines
        # covers ~15 % of each of four tiles, and the tissue default (25 %) drops whole ones
        coords = wsi.tile_coords(slide, tm, target_mpp=0.5, tile_px=224)
        side = wsi.tile_geometry(slide, target_mpp=0.5, tile_px=224).size_level0[0]
    assert len(coords) > 0
    x0, y0 = coords[:, 0], coords[:, 1]
    cx, cy = sm.truth.cluster_center_px[:, 0], sm.truth.cluster_center_px[:, 1]
    inside = (
        (cx[:, None] >= x0)
        & (cx[:, None] < x0 + side)
        & (cy[:, None] >= y0)
        & (cy[:, None] < y0 + side)
    )
    recall = inside.any(axis=1).mean()
    # A tile is empty if no planted cell (cluster, single or clump; red cells do not count)
    # has a pixel in it: summed-area table of the truth at 1 µm.
    ds = 4
    cells = sm.truth.cell_mask(ds).astype(np.int64)
    sat = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), np.int64)
    sat[1:, 1:] = cells.cumsum(0).cumsum(1)
    a, b = x0 // ds, y0 // ds
    # edge tiles overhang the slide; beyond it there are no cells
    c = np.minimum((x0 + int(side)) // ds, cells.shape[1])
    d = np.minimum((y0 + int(side)) // ds, cells.shape[0])
    n_cell_px = sat[d, c] - sat[b, c] - sat[d, a] + sat[b, a]
    empty = (n_cell_px == 0).mean()
    assert recall >= 0.9, f"{name}: {recall:.0%} of clusters have their centre in a kept tile"
    assert empty < 0.05, f"{name}: {empty:.1%} of {len(coords)} kept tiles hold no planted cell"


# -- real cytology fields -----------------------------------------------------------------------

#: Physical pixel sizes assumed for the camera fields (they record none), from objects of known
#: size: urine — the nuclei of the inflammatory cells (5–7 µm) are 2.5–3 px, so ~2 µm/px (these
#: fields are low-power photographs; at 0.5 µm/px those nuclei would be 1.5 µm specks, i.e.
#: debris); BCCD — red cells (7.5 µm) fill ~100-px boxes, so ~0.075 µm/px (100× oil);
#: SegPC — plasma cells (12–15 µm) are 220–300 px across, so ~0.05 µm/px; CNSeg — nuclei
#: 34–83 px across at 0.2 µm/px are 7–17 µm, plausible for crowded cervical groups; CRIC —
#: 0.5 µm/px as suggested (neutrophils then measure ~15 µm, squamous cells ~100 µm).
FIELD_MPP = {
    "urine_cytology_pap/fields": 2.0,
    "cric_pap_examples": 0.5,
    "bccd_blood_smear/JPEGImages": 0.075,
    "segpc2021_bone_marrow/images": 0.05,
    "cnseg_cervical_clusters/images": 0.2,
}


@pytest.fixture(scope="module")
def cytology(shared_data: Path) -> Path:
    root = shared_data / "cytology"
    if not all((root / sub).is_dir() for sub in FIELD_MPP):
        message = f"cytology fields not found under {root} (see ../shared/data/MANIFEST.md)."
        if os.environ.get("CI"):
            pytest.fail(message + " CI is set, so this is an error, not a skip.")
        pytest.skip(message)
    return root


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _annotation(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


@pytest.mark.parametrize(
    ("images", "masks", "min_cover"),
    [
        # union masks of whole plasma cells (nucleus + cytoplasm); other cells unannotated
        ("segpc2021_bone_marrow/images", "segpc2021_bone_marrow/masks", 0.85),
        # every nucleus of very crowded clusters: the clump rule must not eat them (with the
        # mpp 1.5× too coarse it takes the darkest overlap of 10007, 12 % of its nuclei)
        ("cnseg_cervical_clusters/images", "cnseg_cervical_clusters/nuclei_masks", 0.85),
    ],
)
@pytest.mark.parametrize("mpp_error", [1.0, 0.67, 1.5])
def test_real_fields_annotated_cells_are_in_the_mask(
    cytology: Path, images: str, masks: str, min_cover: float, mpp_error: float
) -> None:
    """The assumed mpp is a guess, so the result must also hold when it is off by 1.5×."""
    mpp = FIELD_MPP[images] * mpp_error
    covers = {}
    for path in _images(cytology / images):
        truth = _annotation(cytology / masks / path.name)
        mask, _ = smear_mask(_rgb(path), mpp)
        covers[path.name] = float(mask[truth].mean())
    assert min(covers.values()) >= min_cover, covers


@pytest.mark.parametrize(
    "images",
    ["urine_cytology_pap/fields", "cric_pap_examples", "cnseg_cervical_clusters/images"],
)
def test_real_fields_blank_glass_is_left_out(cytology: Path, images: str) -> None:
    """Glass ≥ 15 µm from anything stained (all channels within 10 % of the brightest) stays out."""
    mpp = FIELD_MPP[images]
    checked = 0
    for path in _images(cytology / images):
        rgb = _rgb(path)
        bright = np.percentile(rgb.reshape(-1, 3), 99, axis=0)
        glass = (rgb >= 0.9 * bright).all(axis=2)
        far_glass = ndimage.distance_transform_edt(glass) * mpp > 15
        if far_glass.mean() < 0.005:
            continue  # a field filled with cells has no such glass
        mask, _ = smear_mask(rgb, mpp)
        assert mask[far_glass].mean() < 0.05, (
            f"{path.name}: {mask[far_glass].mean():.1%} of blank glass in the mask"
        )
        assert mask.any(), f"{path.name}: no cells found"
        checked += 1
    assert checked >= 2


def test_real_blood_smear_white_cells_in_red_cells_out(cytology: Path) -> None:
    """Wright/Giemsa blood: each annotated white cell is in the mask, red cells away from one are not."""
    mpp = FIELD_MPP["bccd_blood_smear/JPEGImages"]
    rbc_far_in = rbc_far = 0
    for path in _images(cytology / "bccd_blood_smear/JPEGImages"):
        xml = (cytology / "bccd_blood_smear/Annotations" / f"{path.stem}.xml").read_text()
        boxes: list[tuple[str, list[int]]] = []
        for obj in re.findall(r"<object>(.*?)</object>", xml, re.S):
            name = re.search(r"<name>\s*(.*?)\s*</name>", obj)
            coords = [
                re.search(rf"<{k}>\s*([-\d.]+)\s*</{k}>", obj)
                for k in ("xmin", "ymin", "xmax", "ymax")
            ]
            if name and all(coords):
                boxes.append((name.group(1), [int(float(m.group(1))) for m in coords if m]))
        mask, _ = smear_mask(_rgb(path), mpp)
        wbc = np.zeros(mask.shape, bool)
        for kind, (x0, y0, x1, y1) in boxes:
            if kind == "WBC":
                wbc[y0:y1, x0:x1] = True
                assert mask[(y0 + y1) // 2, (x0 + x1) // 2], (
                    f"{path.name}: white cell at {x0, y0} missed"
                )
        away = ndimage.distance_transform_edt(~wbc) * mpp > 10
        rbc = np.zeros(mask.shape, bool)
        for kind, (x0, y0, x1, y1) in boxes:
            if kind == "RBC":
                rbc[y0:y1, x0:x1] = True
        rbc_far += int((rbc & away).sum())
        rbc_far_in += int((rbc & away & mask).sum())
    assert rbc_far > 0
    assert rbc_far_in / rbc_far < 0.05, f"{rbc_far_in / rbc_far:.1%} of red-cell area in the mask"
