"""`oncotrace import-features` end to end: good files become stores, bad ones rows of errors.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import zarr
from oncotrace.workflows.cli import app
from typer.testing import CliRunner

from tests.mil.test_import import clam_file, trident_file


def _errors(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {Path(r["slide"]).name: r for r in rows}


def test_folder_with_good_and_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "h5"
    src.mkdir()
    _, fa, ca = trident_file(src / "a.h5", n=6)
    _, fb, _ = clam_file(src / "b.h5", n=4)
    nan = np.ones((3, 8), np.float32)
    nan[0, 0] = np.nan
    import h5py

    with h5py.File(src / "bad-nan.h5", "w") as f:
        f["features"] = nan
        f["coords"] = np.zeros((3, 2), np.int64)
    (src / "junk.h5").write_text("not hdf5")
    (src / "notes.txt").write_text("ignored: not an .h5 file")
    out = tmp_path / "stores"
    runner = CliRunner()

    args = ["import-features", str(src), "--out", str(out), "--name", "uni", "--mpp", "0.25"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # two files failed; the others were imported
    failed = sorted(ln for ln in res.stderr.splitlines() if ln.startswith("failed: "))
    assert [Path(ln.split(": ")[1]).name for ln in failed] == ["bad-nan.h5", "junk.h5"]
    g = zarr.open_group(out / "a.zarr", mode="r")
    np.testing.assert_array_equal(np.asarray(g["features/uni"][...]), fa)  # type: ignore[index]
    np.testing.assert_array_equal(np.asarray(g["coords"][...]), ca)  # type: ignore[index]
    gb = zarr.open_group(out / "b.zarr", mode="r")
    np.testing.assert_array_equal(np.asarray(gb["features/uni"][...]), fb)  # type: ignore[index]
    errors = _errors(out)
    assert sorted(errors) == ["bad-nan.h5", "junk.h5"]
    assert errors["bad-nan.h5"]["error_type"] == "FeatureImportError"
    assert errors["bad-nan.h5"]["stage"] == "import"
    assert "NaN/inf" in errors["bad-nan.h5"]["message"]
    assert "not a readable HDF5 file" in errors["junk.h5"]["message"]
    assert not (out / "bad-nan.zarr").exists() and not (out / "junk.zarr").exists()
    summary = json.loads((out / "import-features.json").read_text())
    assert sorted(r["slide_id"] for r in summary["done"]) == ["a", "b"]

    res = runner.invoke(app, [*args])
    assert res.exit_code == 1
    summary = json.loads((out / "import-features.json").read_text())
    assert sorted(r["slide_id"] for r in summary["skipped"]) == ["a", "b"]  # rerun skips
    assert summary["done"] == []

    (src / "bad-nan.h5").unlink()
    (src / "junk.h5").unlink()
    res = runner.invoke(app, [*args])
    assert res.exit_code == 0, res.output
    assert _errors(out) == {}  # errors.csv describes this run only


def test_missing_geometry_is_an_error_row_naming_the_flags(tmp_path: Path) -> None:
    src, _, _ = clam_file(tmp_path / "plain.h5", with_attrs=False)
    out = tmp_path / "stores"
    res = CliRunner().invoke(app, ["import-features", str(src), "--out", str(out), "--name", "uni"])
    assert res.exit_code == 1
    msg = _errors(out)["plain.h5"]["message"]
    assert "--tile-px" in msg and "--mpp" in msg
    geometry = ["--tile-px", "512", "--mpp", "0.5"]
    res = CliRunner().invoke(
        app, ["import-features", str(src), "-o", str(out), "--name", "uni", *geometry]
    )
    assert res.exit_code == 0, res.output
    assert (out / "plain.zarr").is_dir()


def test_other_source_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "stores"
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    _, _, coords = trident_file(tmp_path / "v1" / "s.h5", n=5, seed=0)
    new = np.random.default_rng(7).normal(size=(5, 1024)).astype(np.float32)
    import h5py

    with h5py.File(tmp_path / "v2" / "s.h5", "w") as f:
        f["features"] = new
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size_level0": 512, "level0_magnification": 40})
    runner = CliRunner()
    base = ["--out", str(out), "--name", "uni"]
    v1, v2 = str(tmp_path / "v1" / "s.h5"), str(tmp_path / "v2" / "s.h5")
    assert runner.invoke(app, ["import-features", v1, *base]).exit_code == 0
    res = runner.invoke(app, ["import-features", v2, *base])
    assert res.exit_code == 1
    assert "--overwrite" in _errors(out)["s.h5"]["message"]
    res = runner.invoke(app, ["import-features", v2, *base, "--overwrite"])
    assert res.exit_code == 0, res.output
    g = zarr.open_group(out / "s.zarr", mode="r")
    np.testing.assert_array_equal(np.asarray(g["features/uni"][...]), new)  # type: ignore[index]


def test_no_files_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    empty, out = str(tmp_path / "empty"), str(tmp_path / "o")
    res = CliRunner().invoke(app, ["import-features", empty, "--out", out, "--name", "uni"])
    assert res.exit_code == 2
