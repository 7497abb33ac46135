"""embed and immune over a folder: every entry that cannot be an input is one failure saying
what it is (a link that cannot be followed, a sub-folder not searched), never dropped."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from oncotrace import wsi
from oncotrace.workflows.cli import app
from oncotrace.wsi.synthetic import make_tissue_squares
from typer.testing import CliRunner


def _failures(stderr: str) -> dict[str, str]:
    """``failed: FILE: STAGE: MESSAGE`` lines as file name → message."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("failed: "):
            path, _stage, message = line.removeprefix("failed: ").split(": ", 2)
            out[Path(path).name] = message
    return out


def _store(tmp_path: Path) -> Path:
    slide = tmp_path / "good.tiff"
    make_tissue_squares(slide, size=(1024, 1024), mpp=0.5, levels=1, squares=[(0, 0, 768, 768)])
    return wsi.tile_slide(slide, tmp_path / "tiled", wsi.TilingConfig(tile_px=64)).store


def test_embed_reports_links_and_a_sub_folder_of_stores_and_embeds_the_rest(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    (stores / "batch2").mkdir(parents=True)
    good = shutil.copytree(_store(tmp_path), stores / "good.zarr")
    shutil.copytree(good, stores / "batch2" / "deeper.zarr")
    os.symlink("/mnt/share/gone.zarr", stores / "gone.zarr")
    os.symlink("loop.zarr", stores / "loop.zarr")
    res = CliRunner().invoke(app, ["embed", str(stores), "--encoder", "pathomics"])
    assert res.exit_code == 1, res.output
    failed = _failures(res.stderr)
    assert set(failed) == {"batch2", "gone.zarr", "loop.zarr"}  # batch2 was passed over
    assert "not searched" in failed["batch2"] and "name this folder" in failed["batch2"]
    assert "'/mnt/share/gone.zarr', which does not exist" in failed["gone.zarr"]
    assert "loop of links" in failed["loop.zarr"]  # was: "run `oncotrace tile` first"
    assert wsi.Store.open(good).feature_names() == ["pathomics"]
    assert wsi.Store.open(stores / "batch2" / "deeper.zarr").feature_names() == []
    # and the same rows in a table beside the stores (embed had none)
    with open(stores / "embed-errors.csv", newline="") as fh:
        rows = {Path(r["slide"]).name: r["error_type"] for r in csv.DictReader(fh)}
    assert rows == {"batch2": "NotSearched", "gone.zarr": "BrokenLink", "loop.zarr": "BrokenLink"}
    assert "embed-errors.csv" in res.stderr
    # fixed inputs: a rerun rewrites the table empty and exits 0
    for name in ("gone.zarr", "loop.zarr"):
        (stores / name).unlink()
    shutil.rmtree(stores / "batch2")
    res = CliRunner().invoke(app, ["embed", str(stores), "--encoder", "pathomics"])
    assert res.exit_code == 0, res.output
    with open(stores / "embed-errors.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == []


def test_immune_rows_say_what_each_unreadable_entry_is(tmp_path: Path) -> None:
    src = tmp_path / "slides"
    (src / "batch2").mkdir(parents=True)
    (src / "batch2" / "deeper.svs").write_bytes(b"\0" * 16)
    os.symlink("/mnt/share/gone.svs", src / "gone.svs")
    os.symlink("loop.svs", src / "loop.svs")
    (src / "unpacked.svs").mkdir()
    (src / "unpacked.svs" / "Data0001.dat").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["immune", str(src), "--out", str(out)])
    assert res.exit_code == 1, res.output
    with open(out / "errors.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    rows = {Path(r["slide"]).name: r["message"] for r in table}
    assert {Path(r["slide"]).name: r["error_type"] for r in table} == {
        "batch2": "NotSearched",
        "gone.svs": "BrokenLink",
        "loop.svs": "BrokenLink",
        "unpacked.svs": "NotAFile",
    }  # typed as tile types them (were UnsupportedSlideError)
    assert "'/mnt/share/gone.svs', which does not exist" in rows["gone.svs"]
    assert "loop of links" in rows["loop.svs"]  # was: "the file does not exist"
    assert "folder named like a .svs file" in rows["unpacked.svs"]  # was: "no .dcm files"
    assert "name this folder" in rows["batch2"]
