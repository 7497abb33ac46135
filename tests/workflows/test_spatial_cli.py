"""``oncotrace immune``, ``map-us`` and ``st-validate`` end to end: planted truths and real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from oncotrace import spatial
from oncotrace.workflows.cli import app
from PIL import Image
from typer.testing import CliRunner

MPP = 0.5
SIDE = 1536  # px: 768 µm
CLUSTER_UM = (220.0, 540.0)
ANGLE = np.deg2rad(20.0)
US_SPACING = 0.02  # mm/px
US_SIZE = (110, 90)  # (width, height) px


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


def _slide_um_to_us_mm(p_um: np.ndarray) -> np.ndarray:
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    mm = np.asarray(p_um, float) / 1000.0
    return mm @ np.array([[c, -s], [s, c]]).T + np.array([0.55, 0.25])


@pytest.fixture(scope="module")
def immune_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("immune")
    image, truth = spatial.render_cells(
        SIDE,
        SIDE,
        mpp=MPP,
        stain="he",
        immune_fraction=0.1,
        seed=3,
        clusters=[spatial.ImmuneCluster(*CLUSTER_UM, sigma_um=40.0, n_cells=160)],
    )
    slide = spatial.write_phantom_slide(root / "phantom.tiff", image, mpp=MPP)
    out = root / "immune"
    code, text = _run("immune", str(slide), "--stain", "he", "--out", str(out))
    assert code == 0, text
    (root / "output.txt").write_text(text)
    np.save(root / "truth_positive_xy.npy", np.column_stack([truth.x, truth.y])[truth.positive])
    return {"root": root, "slide": slide, "out": out}


def test_immune_region_outside_the_slide_names_the_flag_the_slide_and_a_box_that_fits(
    immune_run: dict[str, Path], tmp_path: Path
) -> None:
    slide = immune_run["slide"]
    args = ["immune", str(slide), "--out", str(tmp_path / "o"), "--region", "99999,99999,10,10"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and "--region 99999,99999,10,10" in res.stderr
    assert slide.name in res.stderr
    fix = res.stderr.split("within ")[1].split(",")  # the box it offers does work
    x, y, w, h = (int(v.strip(" ,.").split()[0]) for v in fix[:4])
    ok = CliRunner().invoke(
        app, ["immune", str(slide), "--out", str(tmp_path / "p"), "--region", f"{x},{y},{w},{h}"]
    )
    assert ok.exit_code == 0, ok.output


def test_immune_on_a_folder_writes_one_folder_per_slide_and_exits_1_for_a_bad_one(
    immune_run: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from tests.wsi import badinput

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy2(immune_run["slide"], folder / "good.tiff")
    bad = badinput.make_text_svs(folder)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["immune", str(folder), "--stain", "he", "--out", str(out)])
    assert res.exit_code == 1, res.output
    # the good slide gave the same counts as the single-slide run
    single = json.loads((immune_run["out"] / "summary.json").read_text())
    batch = json.loads((out / "good" / "summary.json").read_text())
    assert batch["n_positive"] == single["n_positive"] and batch["n_cells"] == single["n_cells"]
    with open(out / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["slide"]).name for r in rows] == [bad.filename]
    assert "Fix:" in rows[0]["message"]
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and bad.filename in failed[0] and ": immune: " in failed[0]
    # nothing found is a usage error, before any work
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["immune", str(tmp_path / "empty"), "--out", str(out)])
    assert res.exit_code == 2 and "no slides found" in res.stderr


def test_immune_writes_every_output_with_counts_near_the_planted_truth(
    immune_run: dict[str, Path],
) -> None:
    out = immune_run["out"]
    for name in ("cells.geojson", "cells.csv", "density.ome.zarr", "density.png", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    truth = np.load(immune_run["root"] / "truth_positive_xy.npy")
    assert abs(summary["n_positive"] - len(truth)) <= 0.15 * len(truth)
    area_mm2 = (SIDE * MPP / 1000) ** 2
    assert summary["tissue_area_mm2"] == pytest.approx(area_mm2, rel=0.1)
    assert summary["cells_per_mm2"] == pytest.approx(summary["n_positive"] / area_mm2, rel=0.12)
    said = (immune_run["root"] / "output.txt").read_text()  # the density in the one spelling
    assert f"{summary['cells_per_mm2']:.0f} {spatial.DENSITY_UNIT} over" in said
    assert spatial.DENSITY_UNIT == "cells/mm²"
    with (out / "cells.csv").open() as fh:
        rows = [r for r in csv.reader(line for line in fh if not line.startswith("#"))]
    assert len(rows) - 1 == summary["n_cells"]
    features = json.loads((out / "cells.geojson").read_text())["features"]
    assert len(features) == summary["n_cells"]
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    # the densest bin is the planted cluster
    heat = spatial.read_heatmap(out / "density.ome.zarr")
    r, c = np.unravel_index(np.nanargmax(heat.grid), heat.grid.shape)
    centre_um = (
        (heat.origin_level0[0] + (c + 0.5) * heat.cell_size_level0[0]) * MPP,
        (heat.origin_level0[1] + (r + 0.5) * heat.cell_size_level0[1]) * MPP,
    )
    assert np.hypot(centre_um[0] - CLUSTER_UM[0], centre_um[1] - CLUSTER_UM[1]) < 80


def test_map_us_puts_the_planted_cluster_where_the_landmarks_say(
    immune_run: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    side_um = SIDE * MPP
    p_um = np.array(
        [[40, 40], [700, 60], [380, 380], [60, 720], [720, 700], [200, 560], [560, 220]], float
    )
    assert p_um.max() < side_um
    us_mm = _slide_um_to_us_mm(p_um) + rng.normal(0, 0.005, p_um.shape)
    points = [
        {
            "id": f"p{i}",
            "pathology_um": p_um[i].tolist(),
            "ultrasound_mm": us_mm[i].tolist(),
            "role": "holdout" if i >= 5 else "fit",
        }
        for i in range(len(p_um))
    ]
    landmarks = tmp_path / "landmarks.json"
    landmarks.write_text(json.dumps({"points": points}))
    frame = tmp_path / "us.png"
    Image.fromarray(np.full((US_SIZE[1], US_SIZE[0]), 60, np.uint8)).save(frame)
    out = tmp_path / "mapped"
    args = [
        "map-us",
        "--heatmap",
        str(immune_run["out"] / "density.ome.zarr"),
        "--ultrasound",
        str(frame),
        "--landmarks",
        str(landmarks),
        "--out",
        str(out),
    ]
    code, text = _run(*args)
    assert code == 2 and "--spacing-mm" in text  # a PNG has no physical spacing
    code, text = _run(*args, "--spacing-mm", str(US_SPACING))
    assert code == 0, text
    reg = json.loads((out / "registration.json").read_text())
    # the mapped values are immune-cell densities, and every output says so (was: no unit)
    assert reg["heatmaps"]["density"]["value_unit"] == "cells/mm²"
    attrs = zarr.open_group(out / "density.ome.zarr", mode="r").attrs["oncotrace"]
    assert attrs["value_unit"] == "cells/mm²"
    assert "values in cells/mm²" in " ".join(text.split())
    tre = reg["report"]["holdout_tre_mm"]["mean"]
    assert tre < 0.03
    grid = np.asarray(zarr.open_group(out / "density.ome.zarr", mode="r")["s0"][...])
    assert grid.shape == (US_SIZE[1], US_SIZE[0])
    r, c = np.unravel_index(np.nanargmax(grid), grid.shape)
    peak_mm = np.array([c, r]) * US_SPACING  # pixel centres at index * spacing
    truth_mm = _slide_um_to_us_mm(np.array([CLUSTER_UM]))[0]
    assert np.hypot(*(peak_mm - truth_mm)) <= max(0.05 + 0.04, 2 * tre)  # bin + peak search
    # the frame 1:1 (full resolution: not enlarged) with the colour bar below its long side
    png_w, png_h = Image.open(out / "density_us.png").size
    assert png_w == US_SIZE[0] and png_h > US_SIZE[1]


def test_map_us_real_til_grid_onto_the_calibrated_cine(tmp_path: Path, shared_data: Path) -> None:
    til = shared_data / "immune" / "prediction-TCGA-MP-A4T9-01Z-00-DX1.low_res"
    cine = shared_data / "ultrasound" / "cardiac-cine-calibrated.dcm"
    spacing = 0.510497  # the DICOM's region calibration
    mpp = 0.25
    slide_px = np.array(
        [[10000, 8000], [90000, 9000], [50000, 30000], [12000, 52000], [88000, 55000]], float
    )
    c, s = np.cos(0.2), np.sin(0.2)
    us_mm = (slide_px * mpp / 1000) @ np.array([[c, -s], [s, c]]).T + [60.0, 40.0]
    points = [
        {
            "id": f"p{i}",
            "pathology_px": slide_px[i].tolist(),
            "ultrasound_px": (us_mm[i] / spacing).tolist(),
        }
        for i in range(len(slide_px))
    ]
    landmarks = tmp_path / "l.json"
    landmarks.write_text(json.dumps({"points": points}))
    base = [
        "map-us",
        "--heatmap",
        str(til),
        "--ultrasound",
        str(cine),
        "--landmarks",
        str(landmarks),
    ]
    code, text = _run(*base, "--heatmap-mpp", "0.25", "--out", str(tmp_path / "o"))
    assert code == 2 and "--frame" in text  # a cine loop needs a frame
    code, text = _run(*base, "--frame", "3", "--out", str(tmp_path / "o"))
    assert code == 2 and "--heatmap-mpp" in text  # the TIL grid has no scale
    code, text = _run(*base, "--frame", "3", "--heatmap-mpp", "0.25", "--out", str(tmp_path / "o"))
    assert code == 0, text
    store = zarr.open_group(tmp_path / "o" / "lymphocyte_probability.ome.zarr", mode="r")
    assert store.attrs["oncotrace"]["value_unit"] == "probability"  # u24 lym_prob
    grid = np.asarray(store["s0"][...])
    assert grid.shape == (240, 320)
    # the grid's 97 x 60 mm slide frame lands where the landmarks put it: corners of the TIL
    # extent map inside the frame and the values are lym_prob in [0, 1]
    finite = np.isfinite(grid)
    assert 0 < finite.mean() < 1 and np.nanmax(grid) <= 1.0
    ys, xs = np.nonzero(finite)
    centre_mm = np.array([xs.mean(), ys.mean()]) * spacing
    til_rows = np.loadtxt(til)
    mid_px = (til_rows[:, :2].min(0) + til_rows[:, :2].max(0)) / 2
    expect_mm = (mid_px * mpp / 1000) @ np.array([[c, -s], [s, c]]).T + [60.0, 40.0]
    assert np.hypot(*(centre_mm - expect_mm)) < 3.0  # mm; the mapped extent's centre
    reg = json.loads((tmp_path / "o" / "registration.json").read_text())
    assert reg["report"]["rmse_fit_mm"] < 1e-6  # exact landmarks


def test_map_us_uncalibrated_lymph_node_needs_spacing(tmp_path: Path, shared_data: Path) -> None:
    lymph = shared_data / "ultrasound" / "lymph-node-power-doppler.dcm"
    heat = spatial.attention_heatmap(
        np.array([[0, 0], [224, 0]]),
        np.array([0.2, 0.8]),
        tile_size_level0=224,
        level0_size=(448, 224),
        mpp=0.5,
    )
    spatial.write_ome_zarr(heat, tmp_path / "a.ome.zarr", name="attention")
    landmarks = tmp_path / "l.csv"
    landmarks.write_text(
        "id,pathology_px_x,pathology_px_y,ultrasound_px_x,ultrasound_px_y\n"
        "a,10,10,100,100\nb,400,20,130,101\nc,200,200,115,115\n"
    )
    code, text = _run(
        "map-us", "--heatmap", str(tmp_path / "a.ome.zarr"), "--ultrasound", str(lymph),
        "--landmarks", str(landmarks), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2 and "--spacing-mm" in text and "lymph-node-power-doppler.dcm" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_st_validate_runs_end_to_end_on_the_real_visium_sample(
    tmp_path: Path, shared_data: Path
) -> None:
    visium = shared_data / "spatial" / "visium-human-1.0.0"
    lowres = visium / "spatial" / "tissue_lowres_image.png"
    args = ["st-validate", "--slide", str(lowres), "--visium", str(visium), "--image", "lowres"]
    code, text = _run(*args, "--out", str(tmp_path / "a"))
    assert code == 2 and "--fallback" in text  # the subset matrix holds no immune gene
    code, text = _run(
        *args, "--fallback", "total-counts", "--n-null", "99", "--out", str(tmp_path / "st")
    )
    assert code == 0, text
    report = json.loads((tmp_path / "st" / "st_validation.json").read_text())
    assert report["n_spots"] == 100  # the spots with counts
    assert report["genes"]["fallback"] is True
    assert any("not resolved" in w for w in report["warnings"])  # 13.7 µm/px lowres image
    with (tmp_path / "st" / "spots.csv").open() as fh:
        assert sum(1 for _ in fh) - 1 == 4992


_NO_SLIDE = "/nonexistent/h4-slide.tiff"  # never read: the numbers are checked first
_MAP_US = ["map-us", "--heatmap", "/nonexistent/a.ome.zarr", "--ultrasound", "/nonexistent/u.dcm"]
_MAP_US += ["--landmarks", "/nonexistent/l.json"]
_ST = ["st-validate", "--slide", _NO_SLIDE, "--visium", "/nonexistent/outs"]


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["immune", _NO_SLIDE, "--bin-um", "nan"], "--bin-um nan"),
        (["immune", _NO_SLIDE, "--bin-um", "inf"], "--bin-um inf"),
        (["immune", _NO_SLIDE, "--bin-um", "0"], "--bin-um 0.0"),
        (["immune", _NO_SLIDE, "--bin-um", "-50"], "--bin-um -50.0"),
        (["immune", _NO_SLIDE, "--bin-um", "1e308"], "--bin-um 1e+308"),  # was OverflowError
        (["immune", _NO_SLIDE, "--min-positive", "0"], "--min-positive 0"),
        (["immune", _NO_SLIDE, "--min-positive", "1000000000"], "--min-positive 1000000000"),
        (["immune", _NO_SLIDE, "--mpp", "nan"], "--mpp nan"),
        (["immune", _NO_SLIDE, "--threads", "0"], "--threads 0"),  # was accepted
        (["immune", _NO_SLIDE, "--threads", "1000000"], "--threads 1000000"),
        ([*_MAP_US, "--alpha", "nan"], "--alpha nan"),
        ([*_MAP_US, "--spacing-mm", "0"], "--spacing-mm 0.0"),
        ([*_MAP_US, "--spacing-mm", "0.1", "--spacing-mm", "inf"], "--spacing-mm (0.1, inf)"),
        ([*_MAP_US, "--frame", "-1"], "--frame -1"),
        ([*_MAP_US, "--region", "-1"], "--region -1"),
        ([*_MAP_US, "--heatmap-mpp", "nan"], "--heatmap-mpp nan"),  # was ignored for a store
        ([*_ST, "--n-null", "0"], "--n-null 0"),  # was refused after detection
        ([*_ST, "--n-null", "1000000000"], "--n-null 1000000000"),  # was MemoryError
        ([*_ST, "--seed", "-1"], "--seed -1"),  # was numpy's message after detection
        ([*_ST, "--mpp", "0"], "--mpp 0.0"),
    ],
)
def test_bad_numbers_are_one_usage_error_before_any_input_is_read(
    tmp_path: Path, args: list[str], shown: str
) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {shown}"), res.stderr
    assert "Fix: pass" in lines[0] and "_" not in lines[0].split("Fix")[1].split()[1]
    assert "nonexistent" not in res.stderr and not out.exists()


def test_a_bin_too_fine_for_any_slide_names_its_grid_and_a_bin_that_works(tmp_path: Path) -> None:
    # was: MemoryError allocating a 1.17 PiB grid, after the cells had been detected
    res = CliRunner().invoke(app, ["immune", _NO_SLIDE, "--bin-um", "1e-4", "--out", str(tmp_path)])
    assert res.exit_code == 2
    text = res.stderr
    # a 75 x 50 mm slide in 0.1 nm bins, by hand
    assert "--bin-um 0.0001" in text and "750,000,000 x 500,000,000 grid" in text, text
    works = text.split("Fix: pass --bin-um ")[1].split()[0]
    res = CliRunner().invoke(app, ["immune", _NO_SLIDE, "--bin-um", works, "--out", str(tmp_path)])
    assert res.exit_code == 2 and "the file does not exist" in res.stderr  # past the numbers
