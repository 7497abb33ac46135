"""Attention heatmaps for a 100k-tile slide: time and peak RSS against reading the scores.

    python bench/heatmap.py [--tiles 100000] [--repeat 3]

A generated slide at 0.25 µm/px tiled at 224 px / 0.5 µm (448 level-0 px per tile) on a square
grid with tissue holes (discs punched out) keeps ``--tiles`` tiles; attention is a smooth blob
plus noise. The thumbnail is the store's overview at 8 µm/px (downsample 32).

All work runs in a child process (so its peak RSS is its own, read with ``wait4``):

(baseline) read the (N,) float32 attention back from a Zarr v3 array in the same run — what a
    worker does before drawing anything.
(heatmap) ``normalise_attention`` (rank) → ``attention_heatmap`` → ``write_ome_zarr`` →
    ``write_geojson`` → ``write_overlay_png``, timed per stage, best of ``--repeat`` rounds.

Reported: seconds per stage and in total, the total as a multiple of the baseline read, the
child's RSS after imports and inputs and its peak (so the heatmap's own share is the
difference), and the targets (heatmap ≤ 1 s, peak RSS ≤ 300 MB). Cold import of ome-zarr-py,
matplotlib and scipy is timed separately: a scoring worker pays it once, not per slide.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGETS = {"heatmap_s": 1.0, "peak_rss_mb": 300.0}
MPP = 0.25
TILE_L0 = 448
THUMB_DS = 32.0


def make_inputs(n_tiles: int, seed: int = 0) -> dict[str, Any]:
    """Coords on a square grid with disc-shaped holes, scores, and an 8 µm/px thumbnail."""
    import numpy as np

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles / 0.8)))  # ~20 % of the grid ends up in holes
    rows, cols = np.mgrid[0:side, 0:side]
    keep = np.ones((side, side), bool)
    while keep.sum() > 1.02 * n_tiles:
        cy, cx = rng.integers(0, side, 2)
        r = rng.integers(3, max(4, side // 12))
        punched = keep & ((rows - cy) ** 2 + (cols - cx) ** 2 > r * r)
        if punched.sum() >= n_tiles:
            keep = punched
    rr, cc = rows[keep][:n_tiles], cols[keep][:n_tiles]
    coords = np.stack([cc * TILE_L0, rr * TILE_L0], axis=1).astype(np.int64)
    blob = np.exp(-((rr - side * 0.4) ** 2 + (cc - side * 0.6) ** 2) / (2 * (side / 8) ** 2))
    attention = (blob + 0.05 * rng.random(len(rr))).astype(np.float32)
    attention /= attention.sum()  # softmax-like: sums to 1
    size = (side * TILE_L0 + 100, side * TILE_L0 + 100)
    th, tw = int(np.ceil(size[1] / THUMB_DS)), int(np.ceil(size[0] / THUMB_DS))
    thumb = np.full((th, tw, 3), 235, np.uint8)
    return {"coords": coords, "attention": attention, "level0_size": size, "thumbnail": thumb}


def child(n_tiles: int, repeat: int, result: Path) -> None:
    import resource

    t0 = time.perf_counter()
    import numpy as np
    import psutil
    import zarr
    from oncotrace import spatial

    t_base_imports = time.perf_counter() - t0
    rss_base = psutil.Process().memory_info().rss / 1e6
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import matplotlib.figure  # noqa: F401
        import ome_zarr.writer  # noqa: F401
        import scipy.stats  # noqa: F401
    t_cold_imports = time.perf_counter() - t0
    rss_imports = psutil.Process().memory_info().rss / 1e6

    inputs = make_inputs(n_tiles)
    coords, attention = inputs["coords"], inputs["attention"]
    work = Path(tempfile.mkdtemp(prefix="heatmap-bench-"))
    try:
        store = zarr.open_group(work / "store.zarr", mode="w", zarr_format=3)
        store.create_array("attention", data=attention, chunks=(len(attention),))
        rss_ready = psutil.Process().memory_info().rss / 1e6

        baseline = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            g = zarr.open_group(work / "store.zarr", mode="r")
            array = g["attention"]
            assert isinstance(array, zarr.Array)
            read = np.asarray(array[:])
            baseline = min(baseline, time.perf_counter() - t)
        assert np.array_equal(read, attention)

        best: dict[str, float] | None = None
        sizes: dict[str, float] = {}
        for i in range(repeat):
            out = work / f"round-{i}"
            stages: dict[str, float] = {}
            t = time.perf_counter()
            scores = spatial.normalise_attention(attention, method="rank")
            stages["normalise"] = time.perf_counter() - t
            t = time.perf_counter()
            heat = spatial.attention_heatmap(
                coords,
                scores,
                tile_size_level0=TILE_L0,
                level0_size=inputs["level0_size"],
                mpp=MPP,
            )
            stages["rasterise"] = time.perf_counter() - t
            t = time.perf_counter()
            spatial.write_ome_zarr(heat, out / "attention.ome.zarr", name="attention (label)")
            stages["ome_zarr"] = time.perf_counter() - t
            t = time.perf_counter()
            spatial.write_geojson(
                out / "attention.geojson",
                coords,
                {"attention_label": scores, "attention_raw": attention},
                tile_size_level0=TILE_L0,
            )
            stages["geojson"] = time.perf_counter() - t
            t = time.perf_counter()
            spatial.write_overlay_png(
                heat, inputs["thumbnail"], THUMB_DS, out / "attention.png", title="bench"
            )
            stages["png"] = time.perf_counter() - t
            stages["total"] = sum(stages.values())
            if best is None or stages["total"] < best["total"]:
                best = stages
            sizes = {
                "geojson_mb": (out / "attention.geojson").stat().st_size / 1e6,
                "png_kb": (out / "attention.png").stat().st_size / 1e3,
                "ome_zarr_kb": sum(
                    p.stat().st_size for p in (out / "attention.ome.zarr").rglob("*") if p.is_file()
                )
                / 1e3,
            }
            shutil.rmtree(out)
        assert best is not None
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB -> ~MB
        result.write_text(
            json.dumps(
                {
                    "tiles": len(coords),
                    "grid": list(heat.shape),
                    "thumbnail": list(inputs["thumbnail"].shape[:2]),
                    "baseline_read_s": baseline,
                    "stages_s": best,
                    "ratio_total_over_read": best["total"] / baseline,
                    "rss_ready_mb": rss_ready,
                    "rss_base_imports_mb": rss_base,
                    "rss_all_imports_mb": rss_imports,
                    "peak_rss_self_mb": peak_self,
                    "imports_base_s": t_base_imports,
                    "imports_cold_s": t_cold_imports,
                    "sizes": sizes,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.tiles, args.repeat, args.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--tiles", str(args.tiles), "--repeat", str(args.repeat)]
        proc = subprocess.Popen([*cmd, "--child", str(result)])
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child failed with status {status}")
        r = json.loads(result.read_text())
    peak = usage.ru_maxrss / 1e3  # Linux reports KiB
    s = r["stages_s"]
    print(
        f"{r['tiles']} tiles, grid {r['grid'][0]} x {r['grid'][1]} cells, "
        f"thumbnail {r['thumbnail'][0]} x {r['thumbnail'][1]} px (PNG capped at 2048 px)"
    )
    print(f"baseline: read {r['tiles']} scores from Zarr  {r['baseline_read_s'] * 1e3:8.1f} ms")
    for k in ("normalise", "rasterise", "ome_zarr", "geojson", "png"):
        print(f"  {k:<10} {s[k] * 1e3:8.1f} ms")
    print(
        f"heatmap total {s['total'] * 1e3:.0f} ms = {r['ratio_total_over_read']:.0f}x the baseline"
        f" read (target <= {TARGETS['heatmap_s']:.1f} s: "
        f"{'OK' if s['total'] <= TARGETS['heatmap_s'] else 'MISSED'})"
    )
    print(
        f"child RSS after imports + inputs {r['rss_ready_mb']:.0f} MB, peak {peak:.0f} MB "
        f"(heatmap's share {peak - r['rss_ready_mb']:.0f} MB; target peak <= "
        f"{TARGETS['peak_rss_mb']:.0f} MB: {'OK' if peak <= TARGETS['peak_rss_mb'] else 'MISSED'})"
    )
    print(
        f"child RSS: {r['rss_base_imports_mb']:.0f} MB after numpy+zarr+spatial, "
        f"{r['rss_all_imports_mb']:.0f} MB after ome-zarr-py (dask) + matplotlib + scipy, "
        f"{r['rss_ready_mb']:.0f} MB with the inputs (thumbnail "
        f"{r['thumbnail'][0] * r['thumbnail'][1] * 3 / 1e6:.0f} MB)"
    )
    print(
        f"imports: numpy+zarr+spatial {r['imports_base_s']:.2f} s, then ome-zarr-py + matplotlib "
        f"+ scipy {r['imports_cold_s']:.2f} s (once per worker process)"
    )
    z = r["sizes"]
    print(
        f"outputs: GeoJSON {z['geojson_mb']:.1f} MB, OME-Zarr {z['ome_zarr_kb']:.0f} kB, "
        f"PNG {z['png_kb']:.0f} kB"
    )


if __name__ == "__main__":
    main()
