"""Input discovery: nothing a folder holds that looks meant as an input is passed over silently.

Broken and looping symbolic links, folders named like slide files and sub-folders holding
slides each become one errors.csv row, the other inputs are done, and the exit status is 1.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from oncotrace.workflows.cli import app
from oncotrace.wsi.synthetic import make_tissue_squares
from typer.testing import CliRunner

from tests.mil.test_import import trident_file


def make_unfollowable_entries(folder: Path, suffix: str) -> dict[str, str]:
    """Entries of ``folder`` named ``*<suffix>`` that cannot be read as one input, plus a
    sub-folder holding one; name → the error type each must be reported with."""
    os.symlink("gone" + suffix, folder / f"dangling{suffix}")
    os.symlink(f"loop{suffix}", folder / f"loop{suffix}")  # a link to itself
    (folder / f"unpacked{suffix}").mkdir()
    (folder / f"unpacked{suffix}" / "Data0001.dat").write_bytes(b"\0" * 16)
    (folder / "batch2").mkdir()
    (folder / "batch2" / f"deeper{suffix}").write_bytes(b"\0" * 16)
    return {
        f"dangling{suffix}": "BrokenLink",
        f"loop{suffix}": "BrokenLink",
        f"unpacked{suffix}": "NotAFile",
        "batch2": "NotSearched",
    }


def _errors(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "errors.csv", newline="") as fh:
        return {Path(r["slide"]).name: r for r in csv.DictReader(fh)}


def _good_slide(path: Path) -> Path:
    make_tissue_squares(path, size=(1024, 1024), mpp=0.5, levels=1, squares=[(128, 128, 640, 640)])
    return path


def test_tile_reports_every_unreadable_entry_of_a_folder_and_tiles_the_rest(
    tmp_path: Path,
) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    _good_slide(src / "good.tiff")
    expected = make_unfollowable_entries(src, ".svs")
    (src / "notes").mkdir()  # holds no slides: not an input, not reported
    (src / "notes" / "readme.txt").write_text("scanner log")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["tile", str(src), "--out", str(out)])
    assert res.exit_code == 1, res.output
    errors = _errors(out)
    assert {k: v["error_type"] for k, v in errors.items()} == expected
    assert "'gone.svs', which does not exist" in errors["dangling.svs"]["message"]
    assert "loop of links" in errors["loop.svs"]["message"]
    assert "name this folder" in errors["batch2"]["message"]
    assert all("Fix:" in e["message"] for e in errors.values())
    failed = {ln.split(": ")[1] for ln in res.stderr.splitlines() if ln.startswith("failed: ")}
    assert {Path(f).name for f in failed} == set(expected)
    assert (out / "good.zarr" / "zarr.json").is_file()


def test_a_symlink_loop_named_on_the_command_line_is_one_row_and_the_batch_goes_on(
    tmp_path: Path,
) -> None:
    good = _good_slide(tmp_path / "good.tiff")
    loop = tmp_path / "loop.svs"
    os.symlink(loop.name, loop)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["tile", str(loop), str(good), "--out", str(out)])
    assert res.exit_code == 1, res.output  # was: RuntimeError: Symlink loop, nothing tiled
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert {k: v["error_type"] for k, v in _errors(out).items()} == {"loop.svs": "BrokenLink"}
    assert (out / "good.zarr" / "zarr.json").is_file()


def test_a_slide_that_lost_its_suffix_is_tiled_and_other_files_are_not_inputs(
    tmp_path: Path,
) -> None:
    """A TIFF slide named without a suffix (a scanner export, a PACS copy) was passed over;
    it is taken by its bytes. A suffix-less text file is not a slide and stays out."""
    src = tmp_path / "slides"
    src.mkdir()
    _good_slide(src / "good.tiff")
    (src / "S-1234").write_bytes((src / "good.tiff").read_bytes())
    (src / "README").write_text("scanned 2026-11-02")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["tile", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.zarr")) == ["S-1234.zarr", "good.zarr"]


def test_import_features_takes_an_hdf5_file_without_a_suffix(tmp_path: Path) -> None:
    src = tmp_path / "h5"
    src.mkdir()
    trident_file(src / "a.h5", n=6)
    (src / "a.h5").rename(src / "b")
    (src / "notes").write_text("not features")
    out = tmp_path / "stores"
    args = ["import-features", str(src), "--out", str(out), "--name", "uni", "--mpp", "0.25"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.zarr")) == ["b.zarr"]


def test_import_features_reports_every_unreadable_entry_of_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "h5"
    src.mkdir()
    trident_file(src / "a.h5", n=6)
    expected = make_unfollowable_entries(src, ".h5")
    loop = tmp_path / "named.h5"
    os.symlink(loop.name, loop)
    expected[loop.name] = "BrokenLink"
    out = tmp_path / "stores"
    args = ["import-features", str(src), str(loop), "--out", str(out), "--name", "uni"]
    res = CliRunner().invoke(app, [*args, "--mpp", "0.25"])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert {k: v["error_type"] for k, v in _errors(out).items()} == expected
    assert (out / "a.zarr" / "zarr.json").is_file()


@pytest.fixture
def full_disk(small_disk: Callable[[str], Path]) -> Callable[[], Path]:
    """A folder on a 64 kB tmpfs (filled to the last byte by the test, ENOSPC from the kernel)."""
    return lambda: small_disk("64k")


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC: the disk is full


def test_errors_csv_on_a_full_disk_is_one_clear_error_and_the_old_table_is_kept(
    tmp_path: Path, full_disk: Callable[[], Path]
) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    make_unfollowable_entries(src, ".svs")  # failures only: nothing but the tables to write
    out = full_disk() / "out"
    out.mkdir()
    old = "slide,stage,error_type,message\nx.svs,open,MppError,an earlier run\n"
    (out / "errors.csv").write_text(old)
    _fill(out.parent)
    res = CliRunner().invoke(app, ["tile", str(src), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert f"no space left on the disk holding {out}" in lines[0]
    assert "while writing errors.csv" in lines[0]
    assert (out / "errors.csv").read_text() == old  # was: a 0-byte errors.csv
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
