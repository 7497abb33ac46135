"""`oncotrace score` on Dask: LocalCluster and a real scheduler give the same predictions, which
equal an in-process computation; bad slides are rows of errors.csv; reruns skip finished slides;
killed workers and a killed client do not lose or redo work."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from oncotrace import mil, wsi
from oncotrace.mil.phantom import make_cohort
from oncotrace.workflows.cli import app
from typer.testing import CliRunner

from tests.wsi import badinput

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom cohort: half trains a model (via the library), the other half gets scored."""
    root = tmp_path_factory.mktemp("score")
    c = make_cohort(root / "cohort", n_cases=10, size_px=(1536, 1024), seed=5)
    stores = root / "stores"
    for path in c.slide_paths:
        mil.embed(wsi.tile_slide(path, stores).store, "pathomics")
    data = mil.load_cohort(stores, c.labels_csv, "pathomics", ["label"])
    model, _ = mil.fit(
        data.bags, data.labels, tasks=data.class_names, in_dim=data.in_dim, epochs=3, lr=1e-3
    )
    model_dir = mil.save_model(root / "model", model, data=data)
    slides = root / "to_score"
    slides.mkdir()
    for path in c.slide_paths[:6]:
        shutil.copy2(path, slides / path.name)
    return {"root": root, "model": model_dir, "slides": slides, "stores": stores}


#: predictions.csv's first columns, as README documents them.
LEAD = ["slide_id", "patient_id", "site", "task", "true_class", "predicted_class"]


def _score(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["score", *args])
    return res.exit_code, res.output + (repr(res.exception) if res.exception else "")


def _predictions(out: Path) -> dict[str, list[float]]:
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == LEAD  # the layout `evaluate` writes too
    return {
        r["slide_id"]: [float(r[f"uncalibrated_p_{c}"]) for c in ("benign", "malignant")]
        for r in rows
    }


def _expected(trained: dict[str, Path]) -> dict[str, list[float]]:
    """The same slides predicted in-process from the training stores (identical tiles)."""
    model, _ = mil.load_model(trained["model"])
    out = {}
    for p in sorted(trained["slides"].iterdir()):
        feats, _, _ = mil.read_features(trained["stores"] / f"{p.stem}.zarr", "pathomics")
        proba, _ = mil.predict(model, [feats])
        out[p.stem] = proba["label"][0].tolist()
    return out


def test_local_cluster_scores_every_slide_then_skips_them(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "res"
    args = [str(trained["slides"]), "--model", str(trained["model"]), "--out", str(out)]
    code, output = _score(*args, "--workers", "2", "--threads", "1")
    assert code == 0, output
    got, want = _predictions(out), _expected(trained)
    assert got.keys() == want.keys()
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=2e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["n_scored"] == 6 and run["n_failed"] == 0
    assert len({s["worker"] for s in run["slides"].values()}) == 2  # both workers took slides
    for sid in want:
        here = out / "slides" / sid
        assert {"result.json", "attention.geojson", "attention.png"} <= {
            p.name for p in here.iterdir()
        }
        assert (here / "attention.ome.zarr").is_dir()
    with open(out / "errors.csv") as f:
        assert len(f.read().splitlines()) == 1  # header only
    _check_heatmaps(trained, out, sorted(want)[0])

    # Rerun: nothing is recomputed (identical per-slide timestamps), predictions identical.
    code, output = _score(*args, "--workers", "1")
    assert code == 0, output
    again = json.loads((out / "run.json").read_text())
    assert again["n_scored_this_run"] == 0 and again["n_skipped_finished"] == 6
    assert again["slides"] == run["slides"]
    assert _predictions(out) == got
    _check_late_comm_closed_is_dropped()


def _check_late_comm_closed_is_dropped() -> None:
    """After an own cluster has run, the scheduler's late INFO record about a worker's closed
    stream (which came after a clean run's summary now and then, with a traceback) is dropped
    in this process; distributed's other records still reach their handlers."""
    import logging

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("distributed.batched")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        try:
            raise OSError("stream closed")
        except OSError:
            logger.info("Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
        logger.info("another record")
        logger.warning("Error in batched write")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in seen] == ["another record", "Error in batched write"]


def _check_heatmaps(trained: dict[str, Path], out: Path, sid: str) -> None:
    """The GeoJSON holds the store's tiles with the model's rank-normalised attention; the
    OME-Zarr's scale is the tile size in µm."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from oncotrace import spatial

    store = out / "stores" / f"{sid}.zarr"
    feats, coords, _ = mil.read_features(store, "pathomics")
    model, _ = mil.load_model(trained["model"])
    _, att = mil.predict(model, [feats])
    want = spatial.normalise_attention(att[0]["label"], method="rank")
    geo = json.loads((out / "slides" / sid / "attention.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    attrs = wsi.read_store_attrs(store) or {}
    ts = attrs["tile_size_level0"][0]
    for f, xy, a in zip(geo["features"], coords, want, strict=True):
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == [int(xy[0]), int(xy[1])] and ring[2] == [xy[0] + ts, xy[1] + ts]
        assert f["properties"]["measurements"]["attention_label"] == pytest.approx(a, abs=1e-5)
    node = next(iter(Reader(parse_url(str(out / "slides" / sid / "attention.ome.zarr")))()))
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([ts * attrs["mpp"][1], ts * attrs["mpp"][0]])
    # the unit travels with the map (map-us states it on the ultrasound overlay)
    heat = spatial.read_heatmap(out / "slides" / sid / "attention.ome.zarr")
    assert heat.value_unit == spatial.ATTENTION_RANK_UNIT


def test_a_clean_run_prints_only_oncotraces_lines_and_writes_only_under_out(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """Workers slow to shut down (tests/workflows/slow_exit.py) are killed by the nanny, which
    warns; cuCIM probes cuFile in every worker. Neither reaches the output or the cwd."""
    import os
    import subprocess

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "res"
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__WORKER__PRELOAD": repr([str(Path(__file__).with_name("slow_exit.py"))]),
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [str(BIN / "oncotrace"), "score", str(trained["slides"]), "--model",
         str(trained["model"]), "--out", str(out), "--workers", "2", "--no-heatmaps"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for noise in ("still alive", "distributed.", "cuFile", "libcuda"):
        assert noise not in text, text
    assert "6 scored, 0 up to date, 0 failed" in text
    assert "(live while this run lasts)" in text  # an own cluster's dashboard dies with it
    assert json.loads((out / "run.json").read_text())["dashboard"] is None
    assert list(cwd.iterdir()) == []


def test_a_real_he_slide_is_flagged_out_of_domain_for_a_phantom_trained_model(
    trained: dict[str, Path], tmp_path: Path, shared_data: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    phantoms = sorted(trained["slides"].iterdir())[:2]
    for p in phantoms:
        shutil.copy2(p, folder / p.name)
    real = shared_data / "slides" / "cmu-1-small-region.svs"
    (folder / real.name).symlink_to(real)
    out = tmp_path / "res"
    args = ["score", str(folder), "--model", str(trained["model"]), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--workers", "1", "--no-heatmaps"])
    assert res.exit_code == 0, res.output
    with open(out / "predictions.csv", newline="") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    _, card = mil.load_model(trained["model"])
    assert card.ood is not None
    for sid, r in rows.items():  # the column is the distance recomputed from the stored features
        feats, _, _ = mil.read_features(out / "stores" / f"{sid}.zarr", "pathomics")
        assert float(r["ood_distance"]) == pytest.approx(card.ood.distance([feats])[0], rel=1e-3)
    assert rows[real.stem]["ood"] == "True"
    assert {rows[p.stem]["ood"] for p in phantoms} == {"False"}
    assert "1 slide(s) lie outside the data the model was trained on" in res.output
    assert real.stem in res.output


def test_bad_slides_are_rows_of_errors_csv(trained: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(trained["slides"].iterdir())[:2]
    for p in good:
        shutil.copy2(p, folder / p.name)
    bad = [
        make(folder)
        for make in (
            badinput.make_empty_svs,
            badinput.make_text_svs,
            badinput.make_truncated_tiff,
            badinput.make_missing_mpp_tiff,
        )
    ]
    out = tmp_path / "res"
    args = [str(folder), "--model", str(trained["model"]), "--out", str(out), "--workers", "1"]
    res = CliRunner().invoke(app, ["score", *args, "--no-heatmaps"])
    assert res.exit_code == 1, res.output  # some slides failed; the good ones were scored
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("failed: ")]
    assert sorted(Path(ln.split(": ")[1]).name for ln in failed) == sorted(b.filename for b in bad)
    assert set(_predictions(out)) == {p.stem for p in good}
    with open(out / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["slide"]).name for r in rows) == sorted(b.filename for b in bad)
    for r, b in zip(
        sorted(rows, key=lambda r: Path(r["slide"]).name),
        sorted(bad, key=lambda b: b.filename),
        strict=True,
    ):
        assert r["error_type"] == b.error.__name__ and r["stage"] in ("open", "read", "tile")
        assert b.match.lower() in r["message"].lower() and "Fix:" in r["message"]
    code, output = _score(*args, "--no-heatmaps")  # a rerun retries only the failed ones
    assert code == 1, output


def test_every_slide_failing_exits_1_and_no_slides_exits_2(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    bad = badinput.make_text_svs(folder)
    base = ["--model", str(trained["model"]), "--out", str(tmp_path / "res"), "--workers", "1"]
    res = CliRunner().invoke(app, ["score", str(folder), *base, "--no-heatmaps"])
    assert res.exit_code == 1, res.output
    assert f"failed: {(folder / bad.filename).absolute()}: open: " in res.stderr
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["score", str(tmp_path / "empty"), *base])
    assert res.exit_code == 2 and "error:" in res.stderr


# --------------------------------------------------------------------------- real scheduler


#: Dask's own config loads tests/workflows/slow_slides.py into every worker: each slide waits
#: 1.5 s before predicting, so the fault tests catch a run half-done.
SLOW = {
    "DASK_DISTRIBUTED__WORKER__PRELOAD": repr([str(Path(__file__).with_name("slow_slides.py"))])
}


def _start_cluster(tmp_path: Path, extra_env: dict[str, str]) -> Iterator[dict[str, object]]:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, the workers started in a
    folder of their own (as on a cluster node: nothing may depend on the client's cwd)."""
    sched_file = tmp_path / "scheduler.json"
    worker_cwd = tmp_path / "worker-cwd"
    worker_cwd.mkdir()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", **extra_env}
    procs = [
        subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(sched_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    deadline = time.time() + 60
    while not sched_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    workers = [
        subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
             "--no-nanny", "--host", "127.0.0.1", "--dashboard-address", ":0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=worker_cwd,
        )
        for _ in range(2)
    ]  # fmt: skip
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    yield {"address": address, "workers": workers}
    for p in [*workers, *procs]:
        p.kill()
        p.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    yield from _start_cluster(tmp_path, {})


@pytest.fixture
def slow_cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A cluster whose workers take 1.5 s more per slide (see :data:`SLOW`)."""
    yield from _start_cluster(tmp_path, SLOW)


def test_scheduler_run_matches_local_cluster(
    trained: dict[str, Path],
    cluster: dict[str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # relative inputs from the client's folder; the workers run elsewhere
    monkeypatch.chdir(trained["slides"].parent)
    base = [trained["slides"].name, "--model", str(trained["model"]), "--no-heatmaps"]
    code, output = _score(*base, "--out", str(tmp_path / "local"), "--workers", "1")
    assert code == 0, output
    code, output = _score(
        *base, "--out", str(tmp_path / "remote"), "--scheduler", str(cluster["address"])
    )
    assert code == 0, output
    assert _predictions(tmp_path / "remote") == _predictions(tmp_path / "local")


def test_a_killed_worker_does_not_lose_slides(
    trained: dict[str, Path], slow_cluster: dict[str, object], tmp_path: Path
) -> None:
    cluster = slow_cluster
    out = tmp_path / "res"
    cmd = [
        str(BIN / "oncotrace"),
        "score",
        str(trained["slides"]),
        "--model",
        str(trained["model"]),
    ]
    cmd += ["--out", str(out), "--scheduler", str(cluster["address"]), "--no-heatmaps"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = cluster["workers"][0]  # type: ignore[index]
    deadline = time.time() + 120
    while not list(out.glob("slides/*/result.json")) and time.time() < deadline:
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)  # mid-run: it holds (or is about to take) a slide
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()
    assert set(_predictions(out)) == {p.stem for p in trained["slides"].iterdir()}


def test_a_killed_client_resumes_without_redoing_finished_slides(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    base = [str(trained["slides"]), "--model", str(trained["model"]), "--no-heatmaps"]
    code, output = _score(*base, "--out", str(reference), "--workers", "1")
    assert code == 0, output

    out = tmp_path / "res"
    cmd = [str(BIN / "oncotrace"), "score", *base, "--out", str(out), "--workers", "1"]
    env = {**os.environ, **SLOW}  # the LocalCluster's workers read Dask's config from it
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while len(list(out.glob("slides/*/result.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)
    with contextlib.suppress(ProcessLookupError):  # its LocalCluster's workers outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    before = {
        p.parent.name: json.loads(p.read_text())["finished_at"]
        for p in out.glob("slides/*/result.json")
    }
    assert 2 <= len(before) < 6, "the client was not killed mid-run"
    assert not (out / "run.json").exists()

    code, output = _score(*base, "--out", str(out), "--workers", "1")
    assert code == 0, output
    run = json.loads((out / "run.json").read_text())
    assert run["n_skipped_finished"] == len(before)
    for sid, finished_at in before.items():
        assert run["slides"][sid]["finished_at"] == finished_at  # not recomputed
    assert _predictions(out) == _predictions(reference)


def test_every_task_gets_its_own_attention_heatmap(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    from oncotrace import spatial
    from oncotrace.workflows._score import _heatmaps  # private: score's per-task heatmap step

    store = sorted(trained["stores"].glob("*.zarr"))[0]
    coords = np.asarray(zarr_open(store)["coords"][...], np.int64)
    up = np.arange(len(coords), dtype=np.float32)  # task "origin": rank rises with the tile index
    _heatmaps(store, tmp_path, {"origin": up, "response/nac": up[::-1].copy()}, coords)
    first = spatial.read_heatmap(tmp_path / "attention.ome.zarr")
    second = spatial.read_heatmap(tmp_path / "attention-response_nac.ome.zarr")
    x, y = coords[-1] + 1  # the last tile: hottest for "origin", coldest for "response/nac"
    assert first.value_at([x], [y])[0] == pytest.approx(1.0)
    assert second.value_at([x], [y])[0] == np.nanmin(second.grid) < 0.5
    props = json.loads((tmp_path / "attention.geojson").read_text())["features"][0]["properties"]
    assert {"attention_origin", "attention_response/nac"} <= set(props["measurements"])


def zarr_open(path: Path) -> Any:
    import zarr

    return zarr.open_group(path, mode="r")


def test_scoring_tiles_as_the_model_was_trained_unless_told_otherwise() -> None:
    from oncotrace.workflows import resolve_tiling

    trained = wsi.TilingConfig(target_mpp=1.0, tile_px=256, stride_px=128, mode="smear")
    none = {"target_mpp": None, "tile_px": None, "mode": None}
    tiling, differs = resolve_tiling(trained, none)
    assert tiling == trained and not differs
    tiling, differs = resolve_tiling(trained, {**none, "tile_px": 224})
    assert tiling == wsi.TilingConfig(target_mpp=1.0, tile_px=224, stride_px=128, mode="smear")
    assert differs == {"tile_px": (224, 256)}
    # a model from before the record: wsi's defaults, and nothing to warn about
    tiling, differs = resolve_tiling(None, {**none, "mode": "smear"})
    assert tiling == wsi.TilingConfig(target_mpp=0.5, tile_px=224, mode="smear") and not differs


def test_a_model_without_encoder_is_refused_not_scored_with_a_default(tmp_path: Path) -> None:
    """No silent fallback to the pathomics encoder: the card must say what the features are."""
    head = mil.create_head("abmil", mil.encoder_config("pathomics").dim, {"label": ("a", "b")})
    mil.save_head(head, tmp_path / "bare")  # a card without an encoder section
    code, output = _score(
        str(tmp_path), "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "no 'encoder' section" in output and "model.json" in output
    assert not (tmp_path / "o").exists()


def test_jobs_name_slides_by_absolute_path_whatever_the_working_directory(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """result.json and the Dask tasks carry these paths: a worker or `oncotrace view` started
    in another folder must still find the slides."""
    from oncotrace.workflows import collect_jobs

    slides = trained["slides"]
    manifest = slides.parent / "manifest.csv"
    first = sorted(slides.iterdir())[0]
    manifest.write_text(f"path,slide_id,patient_id,site\nto_score/{first.name},m1,P7, B \n")
    monkeypatch.chdir(slides.parent)
    jobs = collect_jobs([Path("to_score"), Path("manifest.csv")])
    monkeypatch.chdir(tmp_path)  # elsewhere: every path still names the same file
    assert all(Path(j.path).is_absolute() and Path(j.path).is_file() for j in jobs)
    assert {Path(j.path).name for j in jobs} == {p.name for p in slides.iterdir()}
    m1 = next(j for j in jobs if j.slide_id == "m1")
    assert m1.path == str(first) and (m1.patient_id, m1.site) == ("P7", "B")


def test_tile_stores_are_inputs_and_reused_when_cut_with_the_models_tiling(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """`oncotrace tile` output given to score: scored from the stores as they are (no new tiles,
    same predictions as from the slides), and a store cut otherwise is tiled again."""
    stores = tmp_path / "stores"
    res = CliRunner().invoke(app, ["tile", str(trained["slides"]), "--out", str(stores)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "res"
    args = ["--model", str(trained["model"]), "--out", str(out), "--workers", "1"]
    code, output = _score(str(stores), *args, "--no-heatmaps")
    assert code == 0, output
    got, want = _predictions(out), _expected(trained)
    assert got.keys() == want.keys()
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=2e-6)
        doc = json.loads((out / "slides" / sid / "result.json").read_text())
        assert doc["store_reused"] is True
    assert not (out / "stores").exists()  # nothing was tiled again
    # a store cut at another resolution: the slide it names is tiled again, as the model needs
    other = tmp_path / "coarse"
    first = sorted(trained["slides"].iterdir())[0]
    res = CliRunner().invoke(app, ["tile", str(first), "--out", str(other), "--mpp-target", "1"])
    assert res.exit_code == 0, res.output
    out2 = tmp_path / "res2"
    code, output = _score(
        str(other / f"{first.stem}.zarr"), "--model", str(trained["model"]), "--out", str(out2),
        "--workers", "1", "--no-heatmaps",
    )  # fmt: skip
    assert code == 0, output
    assert (out2 / "stores" / f"{first.stem}.zarr").is_dir()
    np.testing.assert_allclose(_predictions(out2)[first.stem], want[first.stem], atol=2e-6)


def test_a_coarse_dicom_wsi_gets_a_fix_that_fits_scoring_not_the_tilers(
    trained: dict[str, Path], tmp_path: Path, shared_data: Path
) -> None:
    """The camelyon DICOM-WSI's finest level is ~29 µm/px. Scoring cannot change the model's
    tiling, so the message must not send the user to --mpp-target 29 (which a later step would
    refuse as unlike the training tiles): it names what does work."""
    slide = shared_data / "dicom-wsi" / "camelyon-lymph-node"
    out = tmp_path / "res"
    args = [str(slide), "--model", str(trained["model"]), "--out", str(out), "--workers", "1"]
    res = CliRunner().invoke(app, ["score", *args, "--no-heatmaps"])
    assert res.exit_code == 1, res.output
    with open(out / "errors.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["error_type"] == "ResolutionError" and row["stage"] == "tile"
    msg = row["message"]
    assert "the model takes tiles at 0.5 µm/px" in msg and "Fix: score it with a model" in msg
    assert "--max-upsample" not in msg and "tile at a coarser target" not in msg
    # the suggested coarser training tiling does tile this slide
    coarse = float(msg.split("tiles of ")[1].split(" µm/px")[0])
    tiled = CliRunner().invoke(
        app, ["tile", str(slide), "--out", str(tmp_path / "st"), "--mpp-target", str(coarse)]
    )
    assert tiled.exit_code == 0, tiled.output
