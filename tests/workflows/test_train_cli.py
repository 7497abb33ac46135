"""`oncotrace train` on a small phantom cohort: outputs, patient-grouped folds, bad labels."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from oncotrace import mil, wsi
from oncotrace.mil.phantom import make_cohort
from oncotrace.workflows.cli import app
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    c = make_cohort(root, n_cases=12, size_px=(1536, 1024), seed=3)
    for path in c.slide_paths:
        mil.embed(wsi.tile_slide(path, root / "stores").store, "pathomics")
    return root


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["train", *args])
    return res.exit_code, res.output + (repr(res.exception) if res.exception else "")


def test_kfold_writes_model_metrics_and_grouped_predictions(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    code, output = _run(
        "--stores",
        str(cohort / "stores"),
        "--labels",
        str(cohort / "labels.csv"),
        "--out",
        str(out),
        "--folds",
        "3",
        "--covariates",
        "age,sex",
        "--epochs",
        "5",
        "--n-boot",
        "50",
    )
    assert code == 0, output
    meta = json.loads((out / "model.json").read_text())
    assert meta["encoder"]["name"] == "pathomics" and meta["covariates"]["names"] == ["age", "sex"]
    # the stores' tiling is recorded so `oncotrace score` cuts new slides the same way
    store = next((cohort / "stores").glob("*.zarr"))
    assert meta["tiling"] == wsi.read_store_attrs(store)["tiling"]
    assert meta["tiling"]["target_mpp"] == 0.5 and meta["tiling"]["tile_px"] == 224
    assert (out / "model.safetensors").is_file() and "label" in json.loads(
        (out / "metrics.json").read_text()
    )
    with open(out / "predictions_heldout.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(cohort / "labels.csv", newline="") as fh:
        n_slides = sum(1 for _ in csv.DictReader(fh))
    assert len(rows) == n_slides  # every case predicted once, out of fold
    folds_of = defaultdict(set)
    for r in rows:
        folds_of[r["patient_id"]].add(r["fold"])
    assert all(len(f) == 1 for f in folds_of.values()), "a patient was split across folds"
    model, _ = mil.load_model(out)
    assert model is not None


def test_holdout_split_and_unknown_slides(cohort: Path, tmp_path: Path) -> None:
    code, output = _run(
        "--stores",
        str(cohort / "stores"),
        "--labels",
        str(cohort / "labels.csv"),
        "--out",
        str(tmp_path / "m"),
        "--split",
        "7:3",
        "--epochs",
        "3",
        "--n-boot",
        "20",
    )
    assert code == 0, output
    bad = tmp_path / "labels.csv"
    text = (cohort / "labels.csv").read_text().splitlines()
    bad.write_text(
        "\n".join([*text, text[1].replace(text[1].split(",")[0], "NOT_A_SLIDE", 1)]) + "\n"
    )
    code, output = _run(
        "--stores", str(cohort / "stores"), "--labels", str(bad), "--out", str(tmp_path / "x")
    )
    assert code != 0 and "NOT_A_SLIDE" in output


def test_bad_inputs_give_one_clear_error_each(cohort: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np
    import zarr

    labels = (cohort / "labels.csv").read_text().splitlines()
    header = labels[0].split(",")
    col = header.index("label")

    def run(stores: Path, csv_text: list[str], *extra: str) -> tuple[int, str]:
        path = tmp_path / f"labels{len(list(tmp_path.iterdir()))}.csv"
        path.write_text("\n".join(csv_text) + "\n")
        args = ["--stores", str(stores), "--labels", str(path), "--out", str(tmp_path / "m")]
        return _run(*args, "--epochs", "2", "--n-boot", "10", *extra)

    # A task with one class.
    one = [labels[0]] + [
        ",".join("benign" if i == col else v for i, v in enumerate(r.split(",")))
        for r in labels[1:]
    ]
    code, out = run(cohort / "stores", one)
    assert code == 2 and "has 1 class" in out and "Traceback" not in out

    # Features under a name nothing was embedded with.
    code, out = run(cohort / "stores", labels, "--encoder", "uni")
    assert code == 2 and "uni" in out and "oncotrace embed" in out

    # NaN features in one store.
    stores = tmp_path / "stores"
    shutil.copytree(cohort / "stores", stores)
    sid = labels[1].split(",")[header.index("slide_id")]
    arr = zarr.open_array(stores / f"{sid}.zarr" / "features" / "pathomics", mode="r+")
    arr[0, 0] = np.nan
    code, out = run(stores, labels)
    assert code == 2 and f"{sid}.zarr" in out and "NaN" in out


def test_library_call_reproduces_the_cli(cohort: Path, tmp_path: Path) -> None:
    """mil.train_model with the TrainConfig the flags describe writes the same model."""
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    stores, labels = cohort / "stores", cohort / "labels.csv"
    code, output = _run(
        "--stores", str(stores), "--labels", str(labels), "--out", str(cli_out),
        "--folds", "3", "--covariates", "age,sex", "--epochs", "4", "--n-boot", "30",
        "--seed", "2", "--conformal-level", "0.8",
    )  # fmt: skip
    assert code == 0, output
    config = mil.TrainConfig(
        covariates=("age", "sex"), folds=3, epochs=4, n_boot=30, seed=2, conformal_level=0.8
    )
    result = mil.train_model(stores, labels, config, lib_out)
    cli = json.loads((cli_out / "model.json").read_text())
    lib = json.loads((lib_out / "model.json").read_text())
    assert cli["train_config"] == lib["train_config"] == config.to_dict()
    for key in ("config", "tasks", "encoder", "covariates", "tiling", "metrics", "calibration"):
        assert cli[key] == lib[key], key
    assert {k: v for k, v in cli["training"].items() if k != "trained_at"} == {
        "split": "kfold", "folds": 3, "test_sites": None, "test_fraction": None, "seed": 2,
        "labels": str(labels), "head": "abmil-gated", "epochs": 4, "lr": 2e-4,
    }  # fmt: skip
    assert cli["calibration"]["level"] == 0.8
    assert (cli_out / "predictions_heldout.csv").read_text() == (
        lib_out / "predictions_heldout.csv"
    ).read_text()
    assert (cli_out / "model.safetensors").read_bytes() == (
        lib_out / "model.safetensors"
    ).read_bytes()
    # the result carries what the files hold
    with open(labels, newline="") as fh:
        n_slides = sum(1 for _ in csv.DictReader(fh))
    assert result.card == mil.ModelCard.read(lib_out) and result.n_cases == n_slides
    assert json.loads((lib_out / "metrics.json").read_text()) == result.metrics == lib["metrics"]


def test_out_of_range_option_names_the_flag(cohort: Path, tmp_path: Path) -> None:
    args = ["--stores", str(cohort / "stores"), "--labels", str(cohort / "labels.csv")]
    code, output = _run(*args, "--out", str(tmp_path / "m"), "--folds", "1")
    assert code == 2 and "--folds 1" in output and "folds=" not in output
    assert not (tmp_path / "m").exists()
