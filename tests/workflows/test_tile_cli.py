"""`oncotrace tile` on a folder mixing good slides and the bad-input corpus."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from oncotrace import wsi
from oncotrace.workflows.cli import app
from oncotrace.wsi.synthetic import BACKGROUND, make_tissue_squares, write_pyramid_tiff
from typer.testing import CliRunner

from tests.wsi import badinput

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _bad_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """Bad files written into ``folder``: name → (expected stage, expected error type)."""
    expect: dict[str, tuple[str, str]] = {}
    for maker in (
        badinput.make_empty_svs,
        badinput.make_text_svs,
        badinput.make_png_as_ndpi,
        badinput.make_huge_tiff_no_data,
        badinput.make_not_dicom_dcm,
    ):
        bad = maker(folder)
        stage = "open" if bad.error is wsi.UnsupportedSlideError else "read"
        expect[bad.path.name] = (stage, bad.error.__name__)
    svs = DATA / "slides" / "cmu-1-small-region.svs"
    if svs.exists():
        bad = badinput.make_truncated_svs(folder, svs)
        expect[bad.path.name] = ("read", "CorruptSlideError")
    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), BACKGROUND, np.uint8) + rng.integers(
        0, 3, (1024, 1024, 1), dtype=np.uint8
    )
    write_pyramid_tiff(folder / "blank.tiff", img, mpp=0.25, levels=1)
    expect["blank.tiff"] = ("detect", "NoTissueError")
    write_pyramid_tiff(folder / "no-mpp.tiff", img, mpp=None, levels=1)
    expect["no-mpp.tiff"] = ("open", "MppError")
    tifffile.imwrite(
        folder / "dpi72.tif",
        img,
        photometric="rgb",
        tile=(256, 256),
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    expect["dpi72.tif"] = ("open", "MppError")
    return expect


def test_folder_with_bad_inputs_finishes_good_slides_and_lists_each_failure(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    good = [
        make_tissue_squares(
            slides / "good-a.tiff",
            size=(2048, 2048),
            squares=[(0, 0, 1344, 1344)],
            compression="jpeg",
        ),
        make_tissue_squares(
            slides / "good-b.tiff", size=(2048, 1024), squares=[(448, 0, 896, 896)], seed=1
        ),
    ]
    expect = _bad_corpus(slides)
    out = tmp_path / "stores"
    runner = CliRunner()
    result = runner.invoke(app, ["tile", str(slides), "--out", str(out), "--threads", "2"])
    assert result.exit_code == 1, result.output  # some inputs failed; the others were finished
    # every good slide is tiled, with the expected planted tile count
    for planted, n in zip(good, [9, 4], strict=True):
        attrs = wsi.read_store_attrs(out / f"{planted.path.stem}.zarr")
        assert attrs is not None and attrs["n_tiles"] == n
    with open(out / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide", "stage", "error_type", "message"]
    by_name = {Path(r["slide"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(expect), "exactly one row per bad file"
    for name, (stage, error_type) in expect.items():
        row = by_name[name]
        assert (row["stage"], row["error_type"]) == (stage, error_type), name
        assert name in row["message"] and "Fix:" in row["message"]
    # ... and one stderr line per failure: file, stage, message
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == len(expect), result.stderr
    for line in failed:
        path, stage, message = line.removeprefix("failed: ").split(": ", 2)
        assert by_name[Path(path).name]["stage"] == stage and "Fix:" in message
    report = json.loads((out / "tiling.json").read_text())
    assert len(report["done"]) == 2 and len(report["errors"]) == len(expect)
    # no partial stores left behind by the failures
    assert sorted(p.name for p in out.glob("*.zarr")) == ["good-a.zarr", "good-b.zarr"]
    assert not list(out.glob(".*partial*"))

    # a rerun reuses the good stores (not redone) and still says the bad ones fail
    mtime = (out / "good-a.zarr" / "zarr.json").stat().st_mtime_ns
    again = runner.invoke(app, ["tile", str(slides), "--out", str(out)])
    assert again.exit_code == 1 and "2 slide(s) tiled" not in again.output
    assert (out / "good-a.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    assert len(json.loads((out / "tiling.json").read_text())["skipped"]) == 2


def test_mpp_override_lets_a_slide_without_mpp_through(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    img = np.full((1792, 1792, 3), BACKGROUND, np.uint8)
    img[448:1344, 448:1344] = wsi.synthetic.he_texture((896, 896), rng, mpp=0.25)
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", img, mpp=None, levels=1)
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["tile", str(path), "--out", str(out), "--mpp", "0.25"])
    assert result.exit_code == 0, result.output
    attrs = wsi.read_store_attrs(out / "nompp.zarr")
    assert attrs is not None
    assert (
        attrs["mpp_source"] == "override" and attrs["mpp"] == [0.25, 0.25] and attrs["n_tiles"] == 4
    )


def test_a_slightly_coarse_slide_is_upsampled_and_a_coarser_one_gets_a_fix_that_works(
    tmp_path: Path,
) -> None:
    """0.62 µm/px (GlaS-like) at --mpp-target 0.5 is ×1.24: within the default ×1.3, tiled and
    recorded. 0.8 µm/px is ×1.6: refused, and the --max-upsample the message names tiles it."""
    rng = np.random.default_rng(5)
    img = np.full((1200, 1200, 3), BACKGROUND, np.uint8)
    img[200:1000, 200:1000] = wsi.synthetic.he_texture((800, 800), rng, mpp=0.62)
    ok = write_pyramid_tiff(tmp_path / "s062.tiff", img, mpp=0.62, levels=1)
    coarse = write_pyramid_tiff(tmp_path / "s080.tiff", img, mpp=0.8, levels=1)
    runner = CliRunner()
    res = runner.invoke(app, ["tile", str(ok), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    store = wsi.Store.open(tmp_path / "a" / "s062.zarr").attrs
    assert store.upsample == pytest.approx(0.62 / 0.5, rel=1e-3)
    assert "warning:" in res.output and "×1.24" in res.output  # said as one line, not a traceback
    assert "UpsamplingWarning" not in res.output
    report = json.loads((tmp_path / "a" / "tiling.json").read_text())
    assert [Path(w["slide"]).name for w in report["warnings"]] == ["s062.tiff"]
    res = runner.invoke(app, ["tile", str(coarse), "--out", str(tmp_path / "b")])
    assert res.exit_code == 1
    with open(tmp_path / "b" / "errors.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["error_type"] == "ResolutionError" and "--max-upsample" in row["message"]
    factor = row["message"].rsplit("--max-upsample ", 1)[1].split()[0].rstrip(".;")
    res = runner.invoke(
        app, ["tile", str(coarse), "--out", str(tmp_path / "b"), "--max-upsample", factor]
    )
    assert res.exit_code == 0, res.output
    assert wsi.Store.open(tmp_path / "b" / "s080.zarr").attrs.upsample == pytest.approx(1.6)


def test_dicom_wsi_folder_and_smear_mode_from_the_cli(tmp_path: Path) -> None:
    folder = DATA / "dicom-wsi" / "bone-marrow"
    if not folder.exists():
        if os.environ.get("CI"):
            pytest.fail(f"test data missing in CI: {folder}")
        pytest.skip("shared data not present")
    local = tmp_path / "bone-marrow"
    shutil.copytree(folder, local)
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app,
        [
            "tile",
            str(local),
            "--out",
            str(out),
            "--mpp-target",
            "20",
            "--tile-px",
            "32",
            "--min-tissue",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    g = zarr.open_group(out / "bone-marrow.zarr", mode="r")
    attrs = g.attrs["oncotrace"]
    assert attrs["backend"] == "openslide" and attrs["slide_properties"]["vendor"] == "dicom"
    assert attrs["mpp"][0] == pytest.approx(16.783, abs=1e-3)
    assert g["patches"].shape[1:] == (32, 32, 3) and g["patches"].shape[0] > 10


def test_console_script_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("oncotrace")
    assert exe.exists(), "the oncotrace console script is not installed beside python"
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(1024, 1024), squares=[(0, 0, 896, 896)]
    )
    proc = subprocess.run(
        [str(exe), "info", str(planted.path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dimensions"] == [1024, 1024] and info["mpp_x"] == pytest.approx(0.25)
    assert set(info) == {*wsi.EXPORTED_PROPERTIES, "dimensions"}


def test_info_says_why_mpp_is_null_and_what_to_pass(tmp_path: Path) -> None:
    bad = badinput.make_missing_mpp_tiff(tmp_path)
    res = CliRunner().invoke(app, ["info", str(bad.path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    props = json.loads(res.stdout)
    assert props["mpp_x"] is None and props["dimensions"] == [384, 256]
    note = " ".join(res.stderr.split())
    assert "no physical pixel size" in note and "--mpp 0.25" in note and "mpp=" not in note
    # following the fix works: the same file with --mpp has a pixel size
    res = CliRunner().invoke(app, ["info", str(bad.path), "--mpp", "0.25"])
    assert json.loads(res.stdout)["mpp_x"] == 0.25 and "null" not in res.stderr


def test_embed_shows_totals_and_says_what_it_wrote_and_skipped(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(1536, 1024), mpp=0.5, squares=[(0, 0, 1536, 1024)]
    )
    store = wsi.tile_slide(planted.path, tmp_path / "stores").store
    n = wsi.Store.open(store).attrs.n_tiles
    runner = CliRunner()
    res = runner.invoke(app, ["embed", str(tmp_path / "stores")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"{n}/{n}" in text and "/?" not in text
    assert f"1 store(s) embedded ({n} tiles), 0 already embedded" in text
    res = runner.invoke(app, ["embed", str(store)], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "0 store(s) embedded (0 tiles), 1 already embedded" in text
    assert "features/pathomics" in text


def test_embed_never_suggests_a_tiling_the_slide_cannot_have(
    tmp_path: Path, shared_data: Path
) -> None:
    """The ~29 µm/px DICOM-WSI tiled at its own resolution: embed must not say "tile again with
    --mpp-target 0.5" (tile refuses that); a fine slide tiled coarse gets that fix, and it works."""
    runner = CliRunner()
    coarse = shared_data / "dicom-wsi" / "camelyon-lymph-node"
    res = runner.invoke(
        app, ["tile", str(coarse), "--out", str(tmp_path / "c"), "--mpp-target", "29"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(tmp_path / "c"), "--encoder", "pathomics"])
    assert res.exit_code == 1
    assert "too coarse" in res.stderr and "--mpp-target 0.5" not in res.stderr
    # a slide fine enough: tiled at 1 µm/px, told to tile at 0.5, which then embeds
    fine = shared_data / "slides" / "cmu-1-small-region.svs"
    res = runner.invoke(app, ["tile", str(fine), "--out", str(tmp_path / "f"), "--mpp-target", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(tmp_path / "f"), "--encoder", "pathomics"])
    assert res.exit_code == 1 and "tile again with --mpp-target 0.5" in " ".join(res.stderr.split())
    res = runner.invoke(
        app, ["tile", str(fine), "--out", str(tmp_path / "f"), "--mpp-target", "0.5"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(tmp_path / "f"), "--encoder", "pathomics"])
    assert res.exit_code == 0, res.output


def test_a_folder_of_two_dicom_series_is_one_error_row_not_one_silent_slide(
    tmp_path: Path, shared_data: Path
) -> None:
    """Before: the folder became one store of whichever series sorted first, exit 0."""
    slides = tmp_path / "slides"
    slides.mkdir()
    bad = badinput.make_two_series_dicom_folder(slides, shared_data)
    good = slides / "marrow"
    good.mkdir()
    shutil.copyfile(shared_data / badinput.DICOM_SERIES[0], good / "marrow.dcm")
    out = tmp_path / "o"
    args = ["tile", str(slides), "--out", str(out), "--mpp-target", "20", "--tile-px", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    with open(out / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["slide"], r["stage"], r["error_type"]) for r in rows] == [
        (str(bad.path), "open", "UnsupportedSlideError")
    ]
    assert "one folder per series" in rows[0]["message"]
    assert f"failed: {bad.path}: open:" in result.stderr
    assert not (out / f"{bad.path.name}.zarr").exists()
    assert wsi.Store.open(out / "marrow.zarr").attrs.n_tiles
