"""Immune-cell detection against planted cells, density maps by hand, and real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from oncotrace.spatial import (
    CellTable,
    ImmuneCluster,
    PlantedCells,
    create_cell_detector,
    density_map,
    detect_immune_cells,
    list_cell_detectors,
    load_til_grid,
    render_cells,
    stain_matrix,
    stain_od,
    summary_dict,
    write_immune_outputs,
    write_phantom_slide,
)

MPP = 0.5
MATCH_UM = 4.0


def match_count(
    tx: NDArray[np.float64],
    ty: NDArray[np.float64],
    dx: NDArray[np.float64],
    dy: NDArray[np.float64],
    radius: float,
) -> int:
    """One-to-one matches within ``radius`` (minimum total distance assignment)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if len(tx) == 0 or len(dx) == 0:
        return 0
    near = cKDTree(np.c_[tx, ty]).sparse_distance_matrix(
        cKDTree(np.c_[dx, dy]), radius, output_type="coo_matrix"
    )
    if near.nnz == 0:
        return 0
    rows, ri = np.unique(near.row, return_inverse=True)
    cols, ci = np.unique(near.col, return_inverse=True)
    cost = np.full((rows.size, cols.size), 1e9)
    cost[ri, ci] = near.data
    a, b = linear_sum_assignment(cost)
    return int((cost[a, b] < 1e9).sum())


def precision_recall(truth: PlantedCells, cells: CellTable) -> tuple[float, float]:
    tp, dp = truth.positive, cells.positive
    m = match_count(truth.x[tp], truth.y[tp], cells.x[dp], cells.y[dp], MATCH_UM / MPP)
    return m / max(int(dp.sum()), 1), m / max(int(tp.sum()), 1)


@pytest.fixture(scope="module")
def he_phantom() -> tuple[NDArray[np.uint8], PlantedCells]:
    return render_cells(
        2048,
        2048,
        mpp=MPP,
        stain="he",
        seed=11,
        clusters=[ImmuneCluster(x_um=700.0, y_um=300.0, sigma_um=40.0, n_cells=250)],
    )


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PlantedCells]:
    image, truth = render_cells(2048, 2048, mpp=MPP, stain="ihc-dab", seed=12, tissue="ellipse")
    path = write_phantom_slide(tmp_path_factory.mktemp("ihc") / "ihc.tif", image, mpp=MPP)
    return path, truth


# --------------------------------------------------------------------------------------------
# Colour deconvolution
# --------------------------------------------------------------------------------------------


def test_stain_od_equals_skimage_separate_stains_in_log10_units() -> None:
    from skimage.color import hed_from_rgb, separate_stains

    rng = np.random.default_rng(0)
    rgb = rng.integers(8, 256, (32, 32, 3), dtype=np.uint8)
    ours = stain_od(rgb, stain_matrix())
    # skimage divides ln(I) by ln(1e-6) and takes I = rgb / 255: log10 OD is 6x its value.
    theirs = separate_stains(rgb, hed_from_rgb) * 6.0
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_custom_stain_vectors_recover_planted_concentrations() -> None:
    vectors = np.array([[0.6, 0.75, 0.28], [0.3, 0.55, 0.78]])  # H and DAB; third = cross
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    conc = np.array([0.8, 0.3])
    od = conc @ unit
    rgb = np.clip(np.round(255 * 10 ** (-od)), 0, 255).astype(np.uint8)[None, None, :]
    got = stain_od(rgb, stain_matrix(vectors))[0, 0]
    np.testing.assert_allclose(got[:2], conc, atol=0.01)
    with pytest.raises(ValueError, match="linearly dependent"):
        stain_matrix([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# --------------------------------------------------------------------------------------------
# Planted cells
# --------------------------------------------------------------------------------------------


def test_he_lymphocytes_found_with_precision_and_recall_085(
    he_phantom: tuple[NDArray[np.uint8], PlantedCells],
) -> None:
    image, truth = he_phantom
    cells = detect_immune_cells(image, stain="he", mpp=MPP, tissue=False)
    precision, recall = precision_recall(truth, cells)
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)
    assert set(np.unique(cells.cls)) <= {"lymphocyte", "other"}
    # The planted cluster shows up as a density peak: the busiest 50 µm bin is inside it.
    maps = density_map(cells, bin_um=50.0)
    assert maps.density is not None
    row, col = np.unravel_index(np.nanargmax(maps.density.grid), maps.density.shape)
    cx, cy = maps.density.cell_centre_level0(row, col)
    assert np.hypot(cx * MPP - 700.0, cy * MPP - 300.0) < 100.0


def test_dab_positive_cells_found_through_a_tiff_slide(
    ihc_slide: tuple[Path, PlantedCells],
) -> None:
    path, truth = ihc_slide
    cells = detect_immune_cells(path, stain="ihc-dab", workers=2)
    precision, recall = precision_recall(truth, cells)
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)
    # Tissue only: every centroid lies in the planted tissue blob, and the analysed area is it.
    xi = np.clip(np.rint(cells.x).astype(int), 0, 2047)
    yi = np.clip(np.rint(cells.y).astype(int), 0, 2047)
    assert truth.tissue[yi, xi].mean() > 0.99
    truth_mm2 = truth.tissue.sum() * (MPP * 1e-3) ** 2
    assert cells.tissue_area_mm2 == pytest.approx(truth_mm2, rel=0.05)
    assert cells.mpp == (MPP, MPP) and cells.source == str(path)


def test_a_tile_store_stands_for_its_slide(
    tmp_path: Path, ihc_slide: tuple[Path, PlantedCells]
) -> None:
    from oncotrace import wsi

    path = ihc_slide[0]
    store = wsi.tile_slide(path, tmp_path, workers=1).store
    via_store = detect_immune_cells(store, stain="ihc-dab", region=(0, 0, 1024, 1024))
    via_slide = detect_immune_cells(path, stain="ihc-dab", region=(0, 0, 1024, 1024))
    assert len(via_store) == len(via_slide) > 50
    np.testing.assert_array_equal(via_store.x, via_slide.x)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="not a finished OncoTrace store"):
        detect_immune_cells(tmp_path / "empty.zarr", stain="he")


def test_tile_borders_neither_duplicate_nor_drop_cells(
    he_phantom: tuple[NDArray[np.uint8], PlantedCells],
) -> None:
    image = he_phantom[0][:1024, :1024]
    big = detect_immune_cells(image, stain="he", mpp=MPP, tissue=False, tile_um=512.0)
    small = detect_immune_cells(image, stain="he", mpp=MPP, tissue=False, tile_um=70.0)
    # 70 µm tiles put 7 x 7 borders through the image; 512 µm tiles none.
    m = match_count(big.x, big.y, small.x, small.y, 1.0)
    assert abs(len(big) - len(small)) <= 2
    assert m >= len(big) - 2
    assert abs(big.n_positive - small.n_positive) <= 2


def test_region_limits_cells_and_area(he_phantom: tuple[NDArray[np.uint8], PlantedCells]) -> None:
    image, _ = he_phantom
    region = (512, 256, 1024, 768)
    cells = detect_immune_cells(image, stain="he", mpp=MPP, tissue=False, region=region)
    assert len(cells) > 100
    assert cells.x.min() >= 511.5 and cells.x.max() < 1535.5
    assert cells.y.min() >= 255.5 and cells.y.max() < 1023.5
    assert cells.tissue_area_mm2 == pytest.approx(1024 * 768 * (MPP * 1e-3) ** 2, rel=0.02)
    with pytest.raises(ValueError, match="inside this 2048 x 2048 slide"):
        detect_immune_cells(image, stain="he", mpp=MPP, tissue=False, region=(0, 0, 4096, 10))
    with pytest.raises(ValueError, match="mpp is required"):
        detect_immune_cells(image, stain="he")


# --------------------------------------------------------------------------------------------
# Real image
# --------------------------------------------------------------------------------------------


def test_skimage_ihc_image_gives_plausible_dab_positive_cells() -> None:
    from skimage import data
    from skimage.color import rgb2hed

    image = data.immunohistochemistry()
    # A 512² crop of a 20x-like field (nuclei 10-20 px long), taken as 0.5 µm/px.
    cells = detect_immune_cells(image, stain="ihc-dab", mpp=0.5, tissue=False)
    assert cells.n_positive > 20
    assert len(cells) - cells.n_positive > 20
    # Independent of the detector's own measurement: skimage's DAB channel in a 5x5 window.
    dab = np.pad(rgb2hed(image)[..., 2], 2, mode="edge")
    xi, yi = np.rint(cells.x).astype(int) + 2, np.rint(cells.y).astype(int) + 2
    window = np.mean(
        [dab[yi + a, xi + b] for a in range(-2, 3) for b in range(-2, 3)],
        axis=0,
    )
    pos = cells.positive
    assert window[pos].mean() > 2 * window[~pos].mean()


# --------------------------------------------------------------------------------------------
# Density maps by hand
# --------------------------------------------------------------------------------------------


def _table(xy: list[tuple[float, float]], classes: list[str], **meta: object) -> CellTable:
    x = np.array([p[0] for p in xy], np.float64)
    y = np.array([p[1] for p in xy], np.float64)
    n = len(xy)
    kw: dict[str, object] = {
        "mpp": (0.5, 0.5),
        "level0_size": (400, 200),
        "stain": "he",
        "positive_class": "lymphocyte",
        "tissue_area_mm2": 0.02,
    }
    kw.update(meta)
    return CellTable(
        x=x,
        y=y,
        x_um=x * 0.5,
        y_um=y * 0.5,
        cls=np.array(classes),
        area_um2=np.full(n, 30.0),
        hematoxylin_od=np.linspace(0.1, 0.9, n),
        dab_od=np.zeros(n),
        eccentricity=np.full(n, 0.3),
        **kw,  # type: ignore[arg-type]
    )


def test_density_map_hand_computed() -> None:
    # 400 x 200 px at 0.5 µm/px with 50 µm bins -> 100-px bins, a 2 x 4 grid.
    lym, oth = "lymphocyte", "other"
    cells = _table(
        [(10, 10), (50, 60), (99, 99), (150, 20), (250, 150), (260, 160), (270, 170), (390, 10)],
        [lym, lym, oth, lym, lym, lym, oth, oth],
    )
    maps = density_map(cells, bin_um=50.0)
    assert maps.density is not None and maps.all_cells is not None
    assert maps.positive_fraction is not None
    assert maps.density.shape == (2, 4)
    assert maps.density.cell_size_um == (50.0, 50.0)
    # each map carries what its values are (written into every file made from it)
    assert maps.density.value_unit == maps.all_cells.value_unit == "cells/mm²"
    assert maps.positive_fraction.value_unit == "fraction of cells"
    assert maps.til_positive.value_unit == "1 = TIL-positive bin, 0 = not"
    bin_mm2 = 0.05 * 0.05
    expected_pos = np.array([[2, 1, 0, 0], [0, 0, 2, 0]]) / bin_mm2
    expected_all = np.array([[3, 1, 0, 1], [0, 0, 3, 0]]) / bin_mm2
    np.testing.assert_allclose(maps.density.grid, expected_pos, rtol=1e-6)
    np.testing.assert_allclose(maps.all_cells.grid, expected_all, rtol=1e-6)
    # Saltz: TIL-positive with >= 2 lymphocytes in the bin.
    np.testing.assert_array_equal(maps.til_positive.grid, [[1, 0, 0, 0], [0, 0, 1, 0]])
    frac = maps.positive_fraction.grid
    np.testing.assert_allclose(frac[0, :2], [2 / 3, 1.0])
    np.testing.assert_allclose(frac[1, 2], 2 / 3)
    assert np.isnan(frac[0, 2])  # no cells, no fraction
    assert maps.summary()["til_positive_bin_fraction"] == pytest.approx(2 / 8)
    # With min_positive=1 the lone lymphocyte's bin counts too.
    ones = density_map(cells, bin_um=50.0, min_positive=1).til_positive.grid
    np.testing.assert_array_equal(ones, [[1, 1, 0, 0], [0, 0, 1, 0]])


def test_density_map_masks_bins_outside_tissue() -> None:
    # Mask at 50 level-0 px per pixel (4 mask px per 100-px bin): bin (0, 0) full tissue,
    # bin (0, 1) half, bin (0, 2) a quarter, everything else glass.
    mask = np.zeros((4, 8), bool)
    mask[0:2, 0:2] = True
    mask[0:1, 2:4] = True
    mask[0:1, 4:5] = True
    cells = _table(
        [(10, 10), (20, 20), (110, 10), (120, 20), (210, 10)],
        ["lymphocyte"] * 5,
        tissue_mask=mask,
        tissue_downsample=50.0,
    )
    maps = density_map(cells, bin_um=50.0)
    assert maps.density is not None
    g = maps.density.grid
    bin_mm2 = 0.05 * 0.05
    assert g[0, 0] == pytest.approx(2 / bin_mm2)
    assert g[0, 1] == pytest.approx(2 / (0.5 * bin_mm2))  # per mm² of tissue, not of glass
    assert np.isnan(g[0, 2]) and np.isnan(g[1]).all() and np.isnan(g[0, 3])
    assert np.isnan(maps.til_positive.grid[0, 2])
    assert maps.til_positive.n_tiles == 2


def test_density_sums_back_to_the_cell_count(
    he_phantom: tuple[NDArray[np.uint8], PlantedCells],
) -> None:
    cells = detect_immune_cells(he_phantom[0], stain="he", mpp=MPP, tissue=False)
    maps = density_map(cells, bin_um=64.0)
    assert maps.density is not None
    counted = np.nansum(maps.density.grid) * (0.064**2)
    # Edge bins are only partly on the slide (and partly "tissue"): allow that much slack.
    assert counted == pytest.approx(cells.n_positive, rel=0.03)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((4, 8), bool)
    mask[1:3, 2:7] = True
    cells = _table(
        [(10.25, 10.5), (150.125, 20.0), (399.0, 199.0)],
        ["lymphocyte", "other", "lymphocyte"],
        tissue_mask=mask,
        tissue_downsample=50.0,
        source="slide.svs",
        parameters={"tile_um": 512.0},
    )
    back = CellTable.from_csv(cells.to_csv(tmp_path / "cells.csv"))
    for name, col in cells.columns().items():
        if name == "cls":
            np.testing.assert_array_equal(getattr(back, name), col)
        else:
            np.testing.assert_allclose(getattr(back, name), col, rtol=1e-5)
    assert back.tissue_mask is not None
    np.testing.assert_array_equal(back.tissue_mask, mask)
    assert (back.mpp, back.level0_size, back.stain, back.source) == (
        (0.5, 0.5),
        (400, 200),
        "he",
        "slide.svs",
    )
    assert back.parameters == {"tile_um": 512.0}
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not an OncoTrace cell table"):
        CellTable.from_csv(tmp_path / "bad.csv")


def test_geojson_is_qupath_detections(tmp_path: Path) -> None:
    cells = _table([(100.0, 50.0), (300.0, 150.0)], ["lymphocyte", "other"])
    path = cells.to_geojson(tmp_path / "cells.geojson")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for f, x, y, cls in zip(doc["features"], cells.x, cells.y, cells.cls, strict=True):
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == cls
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {
            "Nucleus: Area µm^2",
            "Nucleus: Hematoxylin OD mean",
            "DAB OD mean",
            "Nucleus: Eccentricity",
        }
        assert props["measurements"]["Nucleus: Area µm^2"] == pytest.approx(30.0)
        ring = np.array(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        np.testing.assert_allclose(ring[:-1].mean(axis=0), [x, y], atol=0.02)
        # Equivalent radius: 30 µm² -> r = 3.09 µm = 6.18 px at 0.5 µm/px.
        r = np.hypot(ring[:, 0] - x, ring[:, 1] - y)
        np.testing.assert_allclose(r, np.sqrt(30.0 / np.pi) / 0.5, atol=0.02)
    points = json.loads(cells.to_geojson(tmp_path / "p.geojson", geometry="point").read_text())
    assert points["features"][1]["geometry"] == {"type": "Point", "coordinates": [300, 150]}


def test_write_immune_outputs(tmp_path: Path, ihc_slide: tuple[Path, PlantedCells]) -> None:
    import zarr

    cells = detect_immune_cells(ihc_slide[0], stain="ihc-dab")
    maps = density_map(cells, bin_um=50.0)
    paths = write_immune_outputs(tmp_path / "out", cells, maps)
    assert sorted(paths) == sorted(
        ["cells.geojson", "cells.csv", "density.ome.zarr", "density.png", "summary.json"]
    )
    summary = json.loads(paths["summary.json"].read_text(encoding="utf-8"))
    assert summary["n_cells"] == len(cells) and summary["n_positive"] == cells.n_positive
    assert summary["positive_percent"] == pytest.approx(100 * cells.n_positive / len(cells))
    assert summary["cells_per_mm2"] == pytest.approx(cells.n_positive / cells.tissue_area_mm2)
    assert 0 < summary["til_positive_bin_fraction"] < 1
    assert summary == json.loads(json.dumps(summary_dict(cells, maps)))
    assert maps.density is not None
    s0: NDArray[np.float32] = np.asarray(
        zarr.open_array(paths["density.ome.zarr"] / "s0", mode="r")[...]
    )
    np.testing.assert_array_equal(np.isnan(s0), np.isnan(maps.density.grid))
    np.testing.assert_allclose(s0[np.isfinite(s0)], maps.density.grid[np.isfinite(s0)])
    assert len(CellTable.from_csv(paths["cells.csv"])) == len(cells)


#: Other spellings of a density unit seen in OncoTrace's pictures before it settled on one.
OTHER_SPELLINGS = ("mm2", "/ mm", "/mm^2", "mm^-2", "per mm")


def test_density_outputs_spell_the_unit_one_way(
    tmp_path: Path, ihc_slide: tuple[Path, PlantedCells], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's value_unit, its name and the PNG's colour-bar label and title all say
    cells/mm² (the 2048-px slide's PNG is 1024 px on its long side)."""
    import zarr
    from oncotrace.spatial import DENSITY_UNIT, _heatmap  # private: to see the PNG's texts
    from PIL import Image

    assert DENSITY_UNIT == "cells/mm²"
    texts: dict[str, str] = {}
    real = _heatmap.write_overlay_png

    def spy(*args: object, **kwargs: object) -> Path:
        texts.update({k: str(kwargs[k]) for k in ("label", "title")})
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_heatmap, "write_overlay_png", spy)
    cells = detect_immune_cells(ihc_slide[0], stain="ihc-dab")
    paths = write_immune_outputs(tmp_path, cells, density_map(cells, bin_um=50.0))
    attrs = zarr.open_group(paths["density.ome.zarr"], mode="r").attrs["oncotrace"]
    assert attrs["value_unit"] == "cells/mm²" and attrs["kind"] == "immune density"
    assert texts["label"] == f"{attrs['name']} (cells/mm²)"
    for text in (attrs["name"], texts["label"], texts["title"]):
        assert not any(other in text for other in OTHER_SPELLINGS), text
    assert max(Image.open(paths["density.png"]).size) >= 1024


# --------------------------------------------------------------------------------------------
# External TIL grid
# --------------------------------------------------------------------------------------------


def test_u24_til_grid_loads(shared_data: Path) -> None:
    path = shared_data / "immune" / "prediction-TCGA-MP-A4T9-01Z-00-DX1.low_res"
    rows = np.loadtxt(path)
    maps = load_til_grid(path, mpp=0.25)
    lym = maps.lymphocyte_probability
    assert lym is not None and maps.necrosis_probability is not None
    assert rows.shape == (9348, 4)
    assert lym.shape == (76, 123) and lym.cell_size_level0 == (792.0, 792.0)
    assert lym.n_tiles == 9348 and np.isfinite(lym.grid).sum() == 9348
    assert np.nanmin(lym.grid) >= 0 and np.nanmax(lym.grid) <= 1
    # A hand-picked row: centre (396 + 5 * 792, 396 + 7 * 792) = (4356, 5940) is cell (7, 5).
    hit = rows[(rows[:, 0] == 4356) & (rows[:, 1] == 5940)][0]
    assert lym.grid[7, 5] == pytest.approx(hit[2], abs=1e-6)
    assert maps.necrosis_probability.grid[7, 5] == pytest.approx(hit[3], abs=1e-6)
    assert float(lym.value_at(4356.0, 5940.0)) == pytest.approx(hit[2], abs=1e-6)
    assert maps.bin_um == pytest.approx(792 * 0.25)
    # The published per-slide infiltration rate of this slide is 0: no patch at >= 0.5.
    rate = dict(
        line.split(",")
        for line in (shared_data / "immune" / "infiltration_rate.csv").read_text().splitlines()
    )
    assert maps.summary()["til_positive_bin_fraction"] == float(rate["TCGA-MP-A4T9-01Z-00-DX1"])
    with pytest.raises(ValueError, match="no physical scale"):
        load_til_grid(path)


def test_til_grid_with_holes_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "grid.low_res"
    path.write_text("150 250 0.9 0.1\n350 250 0.2 0.0\n350 450 0.6 0.3\n")
    maps = load_til_grid(path, mpp=0.5)
    lym = maps.lymphocyte_probability
    assert lym is not None
    assert lym.origin_level0 == (50.0, 150.0) and lym.shape == (2, 2)
    np.testing.assert_allclose(lym.grid[0], [0.9, 0.2])
    assert np.isnan(lym.grid[1, 0]) and lym.grid[1, 1] == pytest.approx(0.6)
    np.testing.assert_array_equal(maps.til_positive.grid[0], [1.0, 0.0])


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("0 0 0.5 0.1\n792 0 0.2 0.1\nnan 0 0.3 0.1\n", "data row 3 holds a non-finite"),
        ("0 0 nan 0.1\n792 0 0.2 0.1\n", "data row 1 holds a non-finite"),  # was a silent hole
        ("0 0 7 0.1\n792 0 0.2 0.1\n", "data row 1 has a probability outside"),
        ("0 0 0.5 0.1\n792 0 0.2 0.1\n792 0 0.9 0.1\n", "data row 3 repeats the patch"),
        # a stray row far off on the same 792-px lattice: was a grid of 1.26e9 patches
        (f"0 0 0.5 0.1\n792 0 0.2 0.1\n{792 * 1_262_626_262} 0 0.3 0.1\n", "1,262,626,263 x 1"),
    ],
)
def test_a_corrupt_til_grid_is_refused_naming_the_row(
    tmp_path: Path, rows: str, message: str
) -> None:
    path = tmp_path / "prediction-x.low_res"
    path.write_text(rows)
    with pytest.raises(ValueError, match=message) as info:
        load_til_grid(path, mpp=0.25)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "1,2\n", "line 6 has 2 fields"),  # was IndexError
        (lambda t: t + "a,1,1,1,lymphocyte,1,1,1,1\n", "line 6: x 'a' is not a number"),
        (lambda t: t + "nan,1,1,1,lymphocyte,1,1,1,1\n", "line 6: x 'nan' is not a finite"),
        (lambda t: "# oncotrace-cells {bad\n" + t.split("\n", 1)[1], "line 1 .* not valid JSON"),
    ],
)
def test_a_corrupt_cells_csv_is_refused_naming_the_line(
    tmp_path: Path, edit: Any, message: str
) -> None:
    cells = _table([(10.0, 10.0), (50.0, 60.0), (99.0, 99.0)], ["lymphocyte", "other", "other"])
    path = cells.to_csv(tmp_path / "cells.csv")
    assert len(CellTable.from_csv(path)) == 3  # lines 1-2 metadata and header, 3-5 cells
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message) as info:
        CellTable.from_csv(path)
    assert "cells.csv" in str(info.value)


def test_detector_registry() -> None:
    assert "classical" in list_cell_detectors()
    with pytest.raises(ValueError, match=r"unknown cell detector 'hovernet-typo'.*classical"):
        create_cell_detector("hovernet-typo")
    with pytest.raises(ValueError, match="uses no weights"):
        create_cell_detector("classical", weights_path="model.pt")


def test_detector_needing_an_extra_is_listed_and_names_its_install() -> None:
    from oncotrace.spatial import CELL_DETECTORS, register_cell_detector

    built = []

    @register_cell_detector(
        "deep-demo", requires=("no_such_module_4711",), install="pip install no-such-module"
    )
    def _deep(weights_path: object = None) -> object:
        built.append(weights_path)
        return lambda *a: None

    try:
        assert "deep-demo" in list_cell_detectors()
        assert "deep-demo" not in CELL_DETECTORS.names(available_only=True)
        with pytest.raises(ImportError, match=r"no_such_module_4711.*Fix: pip install no-such"):
            create_cell_detector("deep-demo", weights_path="w")
        assert built == []  # the factory never ran
    finally:
        CELL_DETECTORS.remove("deep-demo")
    assert "deep-demo" not in list_cell_detectors()
