"""Issue 12's hostile inputs at the command line: each is one clear error, nothing outside --out
is touched, and the rest of a batch goes on. Every bad input is generated here."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from oncotrace import wsi
from oncotrace.workflows.cli import app
from oncotrace.wsi.synthetic import make_tissue_squares
from typer.testing import CliRunner

from tests.workflows.test_score import (
    _predictions,  # private: the predictions reader
    trained,  # noqa: F401  (the module fixture)
)

#: manifest slide ids that are paths, not names
BAD_IDS = ["../../../victim", "/tmp/abs-victim", ".", "..", "a/b", ".hidden", "x\\y", "tab\tid"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_manifest_slide_id_is_a_name_never_a_path(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    bad: str,
) -> None:
    slide = sorted(trained["slides"].iterdir())[0]
    # a store that a path-like id would reach (and once removed) outside --out
    victim = tmp_path / "victim.zarr"
    victim.mkdir()
    (victim / "keep.txt").write_text("not yours")
    out = tmp_path / "a" / "b" / "c" / "res"
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "slide_id"])
        w.writerow([str(slide), bad])
    res = CliRunner().invoke(
        app, ["score", str(manifest), "--model", str(trained["model"]), "--out", str(out)]
    )
    assert res.exit_code == 2, res.output
    assert f"{manifest} line 2" in res.stderr and "slide id" in res.stderr
    assert "Fix:" in res.stderr
    assert (victim / "keep.txt").read_text() == "not yours"
    assert not out.exists()  # refused before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "victim.zarr"]


def test_a_slide_file_whose_stem_is_not_a_name_is_one_row_and_the_batch_goes_on(
    tmp_path: Path,
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    good = make_tissue_squares(slides / "good.tiff", size=(1024, 1024), squares=[(0, 0, 896, 896)])
    shutil.copy2(good.path, slides / "tab\tname.tiff")  # a control character in the stem
    out = tmp_path / "stores"
    res = CliRunner().invoke(app, ["tile", str(slides), "--out", str(out)])
    assert res.exit_code == 1, res.output
    with open(out / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["slide"]).name for r in rows] == ["tab\tname.tiff"]
    assert "slide id" in rows[0]["message"] and "Fix:" in rows[0]["message"]
    assert (out / "good.zarr").is_dir() and not (tmp_path / ".zarr").exists()
    with pytest.raises(ValueError, match="path separator"):
        wsi.store_path(out, "../x")


def test_an_own_clusters_dashboard_listens_on_loopback_only_and_its_link_works(
    trained: dict[str, Path],  # noqa: F811
) -> None:
    import httpx
    from oncotrace.workflows import ScoreConfig
    from oncotrace.workflows._score import (  # private: the cluster
        DASHBOARD,
        _client,
        dashboard_link,
    )

    cfg = ScoreConfig(str(trained["model"]), "x", "out", wsi.TilingConfig())
    with _client(1, None, cfg, DASHBOARD) as client:
        server = client.cluster.scheduler.http_server
        hosts = {sock.getsockname()[0] for sock in server._sockets.values()}
        assert hosts == {"127.0.0.1"}  # was 0.0.0.0: every interface
        link = dashboard_link(client, DASHBOARD)
        assert link is not None and link.startswith("http://127.0.0.1:")
        assert httpx.get(link, timeout=10, follow_redirects=True).status_code == 200
    with _client(1, None, cfg, None) as client:  # --dashboard none: the scheduler's HTTP
        server = client.cluster.scheduler.http_server  # routes (health, metrics) stay local
        assert {sock.getsockname()[0] for sock in server._sockets.values()} == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--mpp-target", "inf"], "--mpp-target"),  # was OverflowError
        (["--mpp-target", "nan"], "--mpp-target"),  # was one row per slide
        (["--mpp-target", "0"], "--mpp-target"),
        (["--min-focus", "nan"], "--min-focus"),  # was a "complete" store of 0 tiles
        (["--tile-px", "0"], "--tile-px"),
        (["--min-tissue", "1.5"], "--min-tissue"),
        (["--stride-px", "0"], "--stride-px"),
        (["--threads", "0"], "--threads"),  # was accepted
        (["--threads", "-2"], "--threads"),  # was accepted
        (["--mpp", "nan"], "--mpp"),  # was one row per slide, not naming the flag
        (["--mpp", "inf"], "--mpp"),
        (["--mpp", "-1"], "--mpp"),
    ],
)
def test_numbers_are_checked_once_before_any_slide(
    tmp_path: Path, args: list[str], flag: str
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    make_tissue_squares(slides / "a.tiff", size=(1024, 1024), squares=[(0, 0, 896, 896)])
    out = tmp_path / "stores"
    res = CliRunner().invoke(app, ["tile", str(slides), "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and flag in res.stderr and "Fix:" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_score_workers_below_one_is_a_usage_error(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    workers: str,
) -> None:
    res = CliRunner().invoke(
        app,
        ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
         str(tmp_path / "o"), "--workers", workers],
    )  # fmt: skip
    assert res.exit_code == 2, res.output  # was ZeroDivisionError
    assert "--workers" in res.stderr and "Fix:" in res.stderr


@pytest.mark.parametrize("address", ["not-an-address", "no-such-host.invalid:8787", ":99999"])
def test_a_dashboard_address_that_cannot_work_is_a_usage_error(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    address: str,
) -> None:
    res = CliRunner().invoke(
        app,
        ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
         str(tmp_path / "o"), "--workers", "1", "--dashboard", address],
    )  # fmt: skip
    assert res.exit_code == 2, res.output  # was "Cluster failed to start" with a traceback
    assert res.stderr.strip().startswith("error: ") and f"--dashboard {address!r}" in res.stderr
    assert "Fix:" in res.stderr and "Traceback" not in res.output


def test_score_refuses_an_implausible_mpp_once_up_front(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    res = CliRunner().invoke(
        app,
        ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
         str(tmp_path / "o"), "--mpp", "nan"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output  # was one failed row per slide
    assert res.stderr.count("error:") == 1 and "--mpp" in res.stderr and "Fix:" in res.stderr
    assert not (tmp_path / "o" / "errors.csv").exists()


def test_a_manifest_with_excels_byte_order_mark_is_read_and_utf16_is_named(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from oncotrace.workflows import collect_jobs

    slide = sorted(trained["slides"].iterdir())[0]
    text = f"path,slide_id\n{slide},s1\n"
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # "CSV UTF-8" from Excel
    (job,) = collect_jobs([bom])
    assert (job.slide_id, job.path) == ("s1", str(slide))  # was: "missing column 'path'"
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(text.encode("utf-16"))
    res = CliRunner().invoke(
        app, ["score", str(utf16), "--model", str(trained["model"]), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2, res.output
    assert str(utf16) in res.stderr and "UTF-8" in res.stderr and "Fix:" in res.stderr


def test_a_fifo_named_result_json_blocks_neither_the_viewer_nor_a_rerun(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    import os
    import threading

    from oncotrace.workflows import ScoreConfig, SlideJob, create_app
    from oncotrace.workflows._score import finished  # private: the rerun check itself

    root = tmp_path / "res"
    fifo_dir = root / "slides" / "s1"
    fifo_dir.mkdir(parents=True)
    os.mkfifo(fifo_dir / "result.json")  # reading it would wait for a writer, for ever
    os.mkfifo(fifo_dir / "error.json")
    slide = sorted(trained["slides"].iterdir())[0]
    cfg = ScoreConfig(str(trained["model"]), "x", str(root), wsi.TilingConfig())
    outcome: dict[str, object] = {}

    def probe() -> None:
        outcome["finished"] = finished(SlideJob("s1", str(slide)), cfg)
        from starlette.testclient import TestClient

        with TestClient(create_app(root, cache_mib=8)) as c:
            outcome["cases"] = c.get("/api/cases").json()["cases"]

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "blocked on a FIFO"
    assert outcome["finished"] is None and outcome["cases"] == []


def test_an_unreachable_scheduler_is_one_usage_error(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from oncotrace.workflows import _score  # private: a shorter wait than a real cluster's

    monkeypatch.setattr(_score, "SCHEDULER_TIMEOUT", "3s")
    res = CliRunner().invoke(
        app,
        ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
         str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:1"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output  # was an OSError traceback
    assert "tcp://127.0.0.1:1" in res.stderr and "--scheduler" in res.stderr
    assert "Fix:" in res.stderr and "Traceback" not in res.output


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name or ".partial" in p.name]


@pytest.mark.parametrize(
    ("size", "what"),
    [("600k", "the slide's tile output"), ("8k", "predictions.csv and errors.csv")],
)
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_files(
    trained: dict[str, Path],  # noqa: F811
    small_disk: Callable[[str], Path],
    size: str,
    what: str,
) -> None:
    """600 kB: the first slide's store does not fit, the others are not started; 8 kB: not even
    the tables fit. Either way one error line, exit 1, no traceback, nothing half-written."""
    out = small_disk(size) / "res"
    res = CliRunner().invoke(
        app, ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
              str(out), "--workers", "1", "--no-heatmaps"],
    )  # fmt: skip
    text = res.output
    assert res.exit_code == 1, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert f"no space left on the disk holding {out}" in errors[0]
    assert f"while writing {what}" in errors[0]
    assert "Fix: free space there, or pass --out on a disk with room" in errors[0]
    assert "Traceback" not in text and "failed:" not in text
    assert _temporaries(out) == []
    if (out / "errors.csv").is_file():  # what fitted is whole: a header and one row per slide
        with open(out / "errors.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 6 and {r["error_type"] for r in rows} == {"DiskFull"}


@pytest.mark.parametrize("size", ["600k", "8k"])
def test_tile_on_a_full_disk_is_one_clear_error_and_leaves_no_temporary_files(
    trained: dict[str, Path],  # noqa: F811
    small_disk: Callable[[str], Path],
    size: str,
) -> None:
    """tile said "No space left on device (os error 28). Fix: see the message" once per slide;
    now one line naming the disk and the fix, the slides after it not started."""
    out = small_disk(size) / "stores"
    res = CliRunner().invoke(app, ["tile", str(trained["slides"]), "--out", str(out)])
    text = res.output
    assert res.exit_code == 1, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert f"no space left on the disk holding {out}" in errors[0]
    assert "Fix: free space there, or pass --out on a disk with room" in errors[0]
    assert "Traceback" not in text and "failed:" not in text and "os error" not in text
    assert _temporaries(out) == []
    if (out / "errors.csv").is_file():
        with open(out / "errors.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 6 and {r["error_type"] for r in rows} == {"DiskFull"}


def test_a_rerun_removes_what_a_killed_run_left_half_written(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Temporary siblings of a dead writer go; one of a live process (this one) stays."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out = tmp_path / "res"
    first = sorted(trained["slides"].iterdir())[0].stem
    (out / "slides" / first).mkdir(parents=True)
    stale = [
        out / f".errors.csv.tmp-{dead.stdout.strip()}-0a1b2c3d",
        out / ".predictions.csv.tmp",  # the fixed name older versions used
        out / "slides" / first / f".result.json.tmp-{dead.stdout.strip()}-deadbeef",
    ]
    live = out / f".run.json.tmp-{os.getpid()}-12345678"
    for p in [*stale, live]:
        p.write_text("{half")
    res = CliRunner().invoke(
        app, ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
              str(out), "--workers", "1", "--no-heatmaps"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [p for p in stale if p.exists()] == []
    assert live.exists()


def test_upsampling_said_in_a_dask_worker_reaches_the_console(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The tiler warns in the worker process, whose stderr nobody reads; the client says it."""
    from oncotrace.mil import ModelCard

    tiling = ModelCard.read(trained["model"]).tiling or wsi.TilingConfig()  # as score resolves it
    target = tiling.target_mpp
    mpp = round(target * 1.1, 4)  # every slide ×1.1 coarser than the model's tiles
    res = CliRunner().invoke(
        app, ["score", str(trained["slides"]), "--model", str(trained["model"]), "--out",
              str(tmp_path / "res"), "--workers", "1", "--no-heatmaps", "--mpp", str(mpp)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the console wraps long lines
    said = [w for w in text.split("warning: ")[1:] if ": upsampled ×1.1:" in w]
    assert len(said) == 6, res.output
    assert {p.name for p in trained["slides"].iterdir()} == {
        Path(w.split(": upsampled", 1)[0]).name for w in said
    }


def _spoil(model: Path, how: str) -> None:
    import pickle

    weights = model / "model.safetensors"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "pickle as weights":
        weights.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    elif how == "json list card":
        (model / "model.json").write_text("[1, 2, 3]")
    elif how == "invalid json card":
        (model / "model.json").write_text('{"format": 3,')


@pytest.mark.parametrize(
    "how", ["truncated weights", "pickle as weights", "json list card", "invalid json card"]
)
def test_a_model_that_cannot_load_fails_the_run_once_up_front(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    how: str,
) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    _spoil(model, how)
    out = tmp_path / "res"
    res = CliRunner().invoke(
        app, ["score", str(trained["slides"]), "--model", str(model), "--out", str(out)]
    )
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = " ".join(res.output.split())
    assert text.startswith("error: ") and text.count("error:") == 1, res.output
    assert str(model) in text and "Fix:" in text
    assert "Traceback" not in text
    assert not (out / "slides").exists()  # no slide was sent anywhere


def test_a_folder_of_stores_reports_what_it_cannot_score_and_scores_the_rest(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A broken link named like a store, a folder named like one that is not, and a sub-folder
    of stores were passed over without a word; each is now one row, the good stores scored."""
    stores = tmp_path / "stores"
    res = CliRunner().invoke(app, ["tile", str(trained["slides"]), "--out", str(stores)])
    assert res.exit_code == 0, res.output
    good = sorted(p.name.removesuffix(".zarr") for p in stores.glob("*.zarr"))
    (stores / "gone.zarr").symlink_to(tmp_path / "nowhere.zarr")
    (stores / "half.zarr").mkdir()  # an interrupted copy: no zarr.json
    (stores / "more" / "deeper.zarr").mkdir(parents=True)
    out = tmp_path / "res"
    res = CliRunner().invoke(
        app,
        ["score", str(stores), "--model", str(trained["model"]), "--out", str(out),
         "--workers", "1", "--no-heatmaps"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    with open(out / "errors.csv", newline="") as fh:
        rows = {Path(r["slide"]).name: r for r in csv.DictReader(fh)}
    assert {k: r["error_type"] for k, r in rows.items()} == {
        "gone.zarr": "BrokenLink",
        "half.zarr": "StoreError",
        "more": "NotSearched",
    }
    assert all("Fix:" in r["message"] for r in rows.values())
    with open(out / "predictions.csv", newline="") as fh:
        assert sorted({r["slide_id"] for r in csv.DictReader(fh)}) == good
    assert sum(line.startswith("failed:") for line in res.stderr.splitlines()) == 3


@pytest.mark.parametrize(
    "command",
    [
        ["tile", "{slide}"],
        ["immune", "{slide}", "--mpp", "0.5"],
        ["train", "--stores", "{slide}", "--labels", "{slide}"],
        ["evaluate", "--stores", "{slide}", "--model", "{slide}", "--labels", "{slide}"],
        ["map-us", "--heatmap", "{slide}", "--ultrasound", "{slide}", "--landmarks", "{slide}"],
    ],
)
@pytest.mark.parametrize("inside", [False, True])
def test_an_out_folder_that_is_a_file_is_one_usage_error(
    tmp_path: Path, command: list[str], inside: bool
) -> None:
    """`--out` naming a file (or a folder inside one) was a FileExistsError/NotADirectoryError
    traceback from mkdir; the file is left as it was."""
    slide = make_tissue_squares(
        tmp_path / "a.tiff", size=(1024, 1024), squares=[(0, 0, 896, 896)]
    ).path
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    out = blocker / "sub" if inside else blocker
    args = [a.format(slide=slide) for a in command]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and "--out" in res.stderr and "Fix:" in res.stderr
    assert str(blocker) in res.stderr
    assert blocker.read_text() == "keep me"


def test_a_damaged_store_given_to_score_is_said_and_scored_from_its_slide(
    trained: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A store that lost a shard was silently tiled again; now a warning names it and what was
    done, and the prediction equals the one from the intact store."""
    stores = tmp_path / "stores"
    res = CliRunner().invoke(app, ["tile", str(trained["slides"]), "--out", str(stores)])
    assert res.exit_code == 0, res.output
    args = ["--model", str(trained["model"]), "--workers", "1", "--no-heatmaps"]
    intact = CliRunner().invoke(app, ["score", str(stores), "--out", str(tmp_path / "a"), *args])
    assert intact.exit_code == 0, intact.output
    one = sorted(stores.glob("*.zarr"))[0]
    next(p for p in sorted((one / "patches" / "c").rglob("*")) if p.is_file()).unlink()
    hurt = CliRunner().invoke(app, ["score", str(stores), "--out", str(tmp_path / "b"), *args])
    assert hurt.exit_code == 0, hurt.output
    said = "".join(hurt.output.split())  # rich folds long paths anywhere
    assert f"warning:{one}isdamaged" in said and "scoredfromtheslide" in said
    want, got = _predictions(tmp_path / "a"), _predictions(tmp_path / "b")
    assert got.keys() == want.keys()
    for sid in want:  # the slide tiled again gives the tiles the store held
        np.testing.assert_allclose(got[sid], want[sid], atol=2e-6)
    assert (tmp_path / "b" / "stores" / one.name).is_dir()
