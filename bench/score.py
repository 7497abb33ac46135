"""End-to-end scoring throughput on Dask: slides/hour with 1 and 2 workers, per-worker peak RSS.

    python bench/score.py [--slides 8] [--size 8192] [--rss-size 4096] [--threads-total 2]

In one run:

(1) ``workflows._score.run_score`` on ``--slides`` generated phantom slides of ``--size`` px
    (tile → embed with pathomics → predict → heatmaps) on a LocalCluster of 1 worker, then of 2
    workers (each with ``threads-total / workers`` threads), each from an empty results folder:
    slides/hour end to end (cluster start-up included) and in steady state (first slide start
    to last slide finish, from result.json), and the ratio 2 workers / 1 worker. On this 2-core
    machine the ratio measures how much two processes beat one process with two threads.
(2) Peak RSS of the worker process (``ru_maxrss``, recorded in each result.json) for a slide of
    ``--rss-size`` and one of twice the side (4× the tiles), each in a fresh 1-worker cluster:
    memory must not grow with the slide (streamed tiling, chunked embedding, tile-grid heatmaps).

The heatmap timing for 100k tiles is ``bench/heatmap.py``. Slides and the model are cached in
``bench/_data/score`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = HERE / "_data" / "score"


def _cohort(n: int, size: int, name: str) -> list[Path]:
    from oncotrace.mil.phantom import make_cohort

    root = DATA / f"{name}-{n}x{size}"
    if not (root / "cohort.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_cohort(
            root, n_cases=max(n, 2), size_px=(size, size), slides_per_patient=(1, 1), seed=11
        )
    return sorted((root / "slides").glob("*.tif"))[:n]


def _model() -> Path:
    """An untrained gated-ABMIL head on pathomics features (throughput does not need a fit)."""
    from oncotrace import mil

    out = DATA / "model"
    if not (out / "model.json").is_file():
        head = mil.create_head("abmil-gated", mil.encoder_config("pathomics").dim,
                               {"label": ("benign", "malignant")})  # fmt: skip
        mil.save_model(out, head, encoder=mil.ModelEncoder("pathomics", 89))
    return out


def _run(slides: list[Path], workers: int, threads: int, tag: str) -> dict[str, float]:
    from oncotrace.workflows import (
        ScoreConfig,
        SlideJob,
        model_hash,
        run_score,
        write_outputs,
    )
    from oncotrace.wsi import TilingConfig

    model = _model()
    out = DATA / f"results-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ScoreConfig(
        model_dir=str(model),
        model_hash=model_hash(model),
        out_dir=str(out),
        tiling=TilingConfig(),
        threads=threads,
    )
    jobs = [SlideJob(p.stem, str(p)) for p in slides]
    t0 = time.perf_counter()
    report = run_score(jobs, cfg, workers=workers)
    wall = time.perf_counter() - t0
    write_outputs(jobs, cfg, report, {"bench": tag})
    if report.errors:
        raise SystemExit(f"{tag}: {len(report.errors)} slide(s) failed: {report.errors[:1]}")
    results = [json.loads((out / "slides" / j.slide_id / "result.json").read_text()) for j in jobs]
    tiles = sum(r["n_tiles"] for r in results)
    steady = max(r["finished_at"] for r in results) - min(r["started_at"] for r in results)
    stages: dict[str, float] = {}
    for r in results:
        for k, v in r["seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    return {
        "wall_s": wall,
        "slides_per_hour": 3600 * len(jobs) / wall,
        "steady_slides_per_hour": 3600 * len(jobs) / steady,
        "tiles": tiles,
        "tiles_per_s": tiles / wall,
        "peak_rss_mib": max(r["worker_peak_rss_mib"] for r in results),
        **{f"sum_{k}": round(v, 2) for k, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--rss-size", type=int, default=4096)
    ap.add_argument("--threads-total", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    slides = _cohort(args.slides, args.size, "small")
    total = args.threads_total
    print(f"{len(slides)} slides of {args.size}² px; {total} threads in total")
    # Warm-up (imports, page cache of the slides), not timed.
    _run(slides[:1], 1, total, "warmup")
    one = _run(slides, 1, total, "1worker")
    two = _run(slides, 2, max(1, total // 2), "2workers")
    for tag, r in (("1 worker ", one), ("2 workers", two)):
        print(
            f"{tag}: {r['slides_per_hour']:.0f} slides/h end to end "
            f"({r['steady_slides_per_hour']:.0f} steady), {r['tiles_per_s']:.0f} tiles/s, "
            f"{r['wall_s']:.1f} s, worker peak RSS {r['peak_rss_mib']:.0f} MiB; stage sums "
            + ", ".join(f"{k[4:]} {v}" for k, v in r.items() if k.startswith("sum_"))
        )
    print(
        f"ratio 2 workers / 1 worker: {two['slides_per_hour'] / one['slides_per_hour']:.2f} end"
        f" to end, {two['steady_slides_per_hour'] / one['steady_slides_per_hour']:.2f} steady"
    )

    small = _run(_cohort(1, args.rss_size, "rss"), 1, total, "rss-1x")
    big = _run(_cohort(1, 2 * args.rss_size, "rss"), 1, total, "rss-4x")
    print(
        f"worker peak RSS: {small['peak_rss_mib']:.0f} MiB for {small['tiles']} tiles, "
        f"{big['peak_rss_mib']:.0f} MiB for {big['tiles']} tiles "
        f"({big['tiles'] / max(small['tiles'], 1):.1f}× the tiles, "
        f"{big['peak_rss_mib'] / small['peak_rss_mib']:.2f}× the memory)"
    )


if __name__ == "__main__":  # Dask worker processes re-import __main__: keep the run guarded
    main()
