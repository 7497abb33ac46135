"""`oncotrace demo`: the newcomer's first command runs end to end on generated data."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import wsi
from workflows.cli import app


def test_demo_tiles_embeds_and_trains(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--cases", "10", "--workers", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    stores = sorted((out / "stores").glob("*.zarr"))
    assert stores and all(wsi.read_store_attrs(s) is not None for s in stores)
    assert all((s / "features" / "pathomics").is_dir() for s in stores)
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["encoder"]["name"] == "pathomics"
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    auc = metrics["label"]["metrics"]["auc"]["estimate"]
    assert auc > 0.8  # planted morphology is learnable even from 10 patients
    assert "held-out AUC" in res.output
