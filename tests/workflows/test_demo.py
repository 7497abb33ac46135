"""`oncotrace demo`: the newcomer's first command runs end to end on generated data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from oncotrace import wsi


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_demo_trains_scores_on_dask_and_reports(demo_run: tuple[Path, str]) -> None:
    out, output = demo_run
    train = {r["patient_id"] for r in _rows(out / "train_labels.csv")}
    test_rows = _rows(out / "test_labels.csv")
    assert train and test_rows and not train & {r["patient_id"] for r in test_rows}

    stores = sorted((out / "train" / "stores").glob("*.zarr"))
    assert stores and all(wsi.read_store_attrs(s) is not None for s in stores)
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["encoder"]["name"] == "pathomics" and "calibration" in meta

    # Every held-out slide was scored by the Dask run, with its heatmaps.
    with open(out / "scores" / "predictions.csv", newline="") as f:
        pred_rows = list(csv.DictReader(f))
    scored = {r["slide_id"] for r in pred_rows}
    for r in pred_rows:  # a confident probability is never overruled by the decision threshold
        for c in ("benign", "malignant"):
            if float(r[f"p_{c}"]) > 0.99:
                assert r["predicted_class"] == c, r
    assert scored == {r["slide_id"] for r in test_rows}
    for sid in scored:
        here = out / "scores" / "slides" / sid
        assert (here / "attention.png").is_file() and (here / "attention.geojson").is_file()
        assert (here / "attention.ome.zarr").is_dir()
    run = json.loads((out / "scores" / "run.json").read_text())
    assert run["n_failed"] == 0 and run["n_scored"] == len(scored)

    _check_planted_region_is_hot(out, test_rows)
    _check_spatial_step(out / "scores", scored)

    report = (out / "report" / "report.html").read_text()
    assert "AUC" in report
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["cohort"]["slides"] == len(test_rows)
    assert "held-out AUC" in output and "report.html" in output
    # the figures teach something: label noise keeps the AUC below 1, with a visible interval,
    # and the held-out phantom slides are in the model's domain
    auc = metrics["tasks"]["label"]["metrics"]["auc"]
    assert auc["estimate"] < 0.99 and auc["high"] - auc["low"] > 0.1, auc
    assert all(r["ood"] == "False" for r in pred_rows)


def _check_spatial_step(results: Path, scored: set[str]) -> None:
    """Every scored slide got its immune maps and both heatmaps on its ultrasound frame; the
    fitted registration puts the hottest attention cell where the phantom's true pose does."""
    import numpy as np
    import zarr
    from PIL import Image

    summary = json.loads((results / "spatial_demo.json").read_text())
    assert set(summary) == scored
    for sid in scored:
        here = results / "slides" / sid
        immune = json.loads((here / "immune" / "summary.json").read_text())
        assert immune["n_cells"] > 0 and immune["tissue_area_mm2"] > 0
        reg = json.loads((here / "ultrasound" / "registration.json").read_text())
        assert set(reg["heatmaps"]) == {"attention", "immune-density"}
        frame = Image.open(here / "ultrasound" / "frame.png")
        grid = zarr.open_group(here / "ultrasound" / "attention.ome.zarr", mode="r")["s0"]
        assert isinstance(grid, zarr.Array) and grid.shape == (frame.height, frame.width)
        assert 0 < np.isfinite(grid[...]).mean() < 1  # the specimen, inside a margin
        # 10 µm landmark noise: the fit misplaces the hottest cell by far less than a tile
        assert summary[sid]["hot_cell_error_mm"] < 0.05, sid
        assert summary[sid]["holdout_tre_mm"] < 0.05, sid


def _check_planted_region_is_hot(out: Path, rows: list[dict[str, str]]) -> None:
    """On held-out malignant slides the planted sheets are where the heatmaps are hot: in the
    GeoJSON (top-10 % attention tiles) and in the OME-Zarr (hottest cell, mapped through its
    micrometre transform back to level-0 pixels and looked up in the planted-region mask)."""
    import numpy as np
    import zarr
    from oncotrace.mil.phantom import Cohort
    from sklearn.metrics import roc_auc_score

    cohort = Cohort.load(out / "cohort")
    # the slides the malignant morphology was planted in (a few patients' recorded labels
    # disagree with their slides, on purpose)
    malignant = [
        sid
        for sid, k in zip(cohort.slide_ids, cohort.planted_labels, strict=True)
        if cohort.class_names[int(k)] == "malignant" and sid in {r["slide_id"] for r in rows}
    ]
    assert malignant
    for sid in malignant:
        here = out / "scores" / "slides" / sid
        feats = json.loads((here / "attention.geojson").read_text())["features"]
        xy = np.array([f["geometry"]["coordinates"][0][0] for f in feats], np.int64)
        ts = int(feats[0]["geometry"]["coordinates"][0][2][0] - xy[0, 0])
        att = np.array([f["properties"]["measurements"]["attention_label"] for f in feats])
        # the planted region holds a few tiles (8-20 % of the tissue): the tiles touching it
        # rank above the others, and the hottest tile is one of them
        touching = cohort.region_fraction_of_tiles(sid, xy, ts) > 0
        assert roc_auc_score(touching, att) >= 0.8, sid
        assert touching[int(np.argmax(att))], sid

        group = zarr.open_group(here / "attention.ome.zarr", mode="r")
        ms = dict(group.attrs)["ome"]["multiscales"][0]
        level0 = ms["datasets"][0]
        scale, shift = (t for t in level0["coordinateTransformations"])
        grid = np.asarray(group[level0["path"]][:])
        r, c = np.unravel_index(np.nanargmax(grid), grid.shape)
        x_px = (shift["translation"][1] + c * scale["scale"][1]) / cohort.mpp
        y_px = (shift["translation"][0] + r * scale["scale"][0]) / cohort.mpp
        corner = np.array([[x_px - ts / 2, y_px - ts / 2]], np.int64)  # the cell's tile
        hot = cohort.region_fraction_of_tiles(sid, corner, ts)[0]
        assert hot > 0, f"{sid}: hottest cell outside the region"
