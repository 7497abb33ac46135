"""Tiling throughput on a large synthetic Aperio slide, measured in one run.

    python bench/tiling.py [--size 50000] [--workers 2]

For one list of tile coordinates (224-px tiles at 0.5 µm/px on the tiler's tissue grid):

(c) ``oncotrace tile`` end to end as a subprocess (start-up, open, tissue detection, read, resize,
    focus score, Zarr write, atomic commit) — run first; its store's ``coords`` define the tiles;
(a) an OpenSlide ``read_region`` loop into numpy, single thread, RGBA → RGB;
(b) a bare cuCIM ``read_region`` loop, no writes, with as many threads as (c) (a
    ThreadPoolExecutor over batches of 64 tiles, the tiler's shard size), cuCIM as installed;
(b') only with ``--cucim-cache N``: the same loop given cuCIM's own per-process tile cache.
    The tiler keeps that cache off (it can return another file's or level's tile: see
    ``wsi._tilecache``) and caches decoded tiles itself, so (b') is for comparison only.

Prints tiles/s for each, the ratios c/a and c/b, the peak RSS of (c) (kernel high-water mark of the
child, from ``os.wait4``), and one JSON line with every figure. If a baseline would
take longer than ``--max-baseline-s`` it runs on a fixed subset of contiguous runs of the same
coordinates (so reader caches see the same access pattern) and says so.

Without a tiler (``oncotrace`` not importable) or with ``--coords grid``, (c) is skipped and the
coordinates are a regular grid restricted by a saturation threshold on a thumbnail.

The slide is cached in ``bench/_data`` (git-ignored) with a ``.json`` sidecar; the store written
by (c) is deleted afterwards unless ``--keep-store``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._load import CpuMonitor  # noqa: E402
from bench.make_slide import make_svs_like, verify_slide  # noqa: E402

BATCH = 64  # tiles per task in (b); the tiler's shard size
TARGETS = {"c_over_a": 2.5, "c_over_b": 0.7, "c_peak_rss_gib": 1.5}


# --------------------------------------------------------------------------------------------
# slide
# --------------------------------------------------------------------------------------------
def ensure_slide(
    size: int, seed: int, quality: int, data_dir: Path, *, regenerate: bool = False
) -> tuple[Path, dict[str, Any]]:
    """The cached synthetic slide for these parameters, generated (and verified) if missing."""
    path = data_dir / f"synthetic-{size}x{size}-s{seed}.svs"
    sidecar = Path(str(path) + ".json")
    if path.exists() and sidecar.exists() and not regenerate:
        info = json.loads(sidecar.read_text())
        if info.get("quality") == quality and info.get("file_bytes") == path.stat().st_size:
            info["reused"] = True
            return path, info
    print(f"generating {path.name} ({size}×{size} px) …", flush=True)
    info = make_svs_like(path, width=size, height=size, seed=seed, quality=quality)
    v = verify_slide(path)
    info["verify"] = {k: val for k, val in v.items() if k != "regions"}
    sidecar.write_text(json.dumps(info, default=str, indent=1))
    info["reused"] = False
    return path, info


def warm_page_cache(path: Path) -> float:
    """Read the file once so every run below starts with it in the page cache."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# (c) the project's tiler
# --------------------------------------------------------------------------------------------
def oncotrace_cli() -> list[str] | None:
    exe = Path(sys.executable).with_name("oncotrace")
    if exe.exists():
        return [str(exe)]
    try:
        import oncotrace.workflows.cli  # noqa: F401
    except ImportError:
        return None
    return [
        sys.executable,
        "-c",
        "import sys; from oncotrace.workflows.cli import main; sys.argv[0] = 'oncotrace'; main()",
    ]


def run_tiler(
    slide: Path, out_dir: Path, workers: int, tile_px: int, mpp_target: float
) -> dict[str, Any]:
    """Run ``oncotrace tile`` as a child process; wall time, peak RSS and the store it wrote."""
    cli = oncotrace_cli()
    if cli is None:
        raise RuntimeError("oncotrace CLI not found")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a finished store would be skipped, not re-tiled
    cmd = [
        *cli,
        "tile",
        str(slide),
        "--out",
        str(out_dir),
        "--mpp-target",
        f"{mpp_target:g}",
        "--tile-px",
        str(tile_px),
        "--mode",
        "tissue",
        "--threads",
        str(workers),
    ]  # exit status 1 when the slide failed (issue 11 replaced --strict)
    log = out_dir.with_name(out_dir.name + ".log")
    mon = CpuMonitor()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"}
        )
        # wait4: this child's own resource usage (peak RSS in KiB on Linux, CPU seconds)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    foreign = mon.foreign_fraction()
    output = log.read_text(errors="replace")
    log.unlink()
    if proc.returncode != 0:
        sys.stderr.write(output[-6000:])
        raise RuntimeError(f"oncotrace tile failed with exit code {proc.returncode}")
    stores = sorted(out_dir.glob("*.zarr"))
    if len(stores) != 1:
        raise RuntimeError(f"expected one store in {out_dir}, found {stores}")
    summary = (
        json.loads((out_dir / "tiling.json").read_text())
        if (out_dir / "tiling.json").exists()
        else {}
    )
    done = summary.get("done") or [{}]
    return {
        "cmd": cmd,
        "wall_s": wall,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "store": stores[0],
        "tiler_seconds": done[0].get("seconds"),
        "foreign_cpu": foreign,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def read_store(store: Path) -> dict[str, Any]:
    from oncotrace.wsi import Store

    st = Store.open(store)
    attrs = st.attrs
    coords = st.coords()
    sample = np.asarray(st.patches()[: min(4, len(coords))])
    assert attrs.read_level is not None and attrs.read_size is not None and attrs.tile_px
    return {
        "coords": coords,
        "read_level": int(attrs.read_level),
        "read_size": tuple(int(v) for v in attrs.read_size),
        "tile_px": int(attrs.tile_px),
        "backend": attrs.backend,
        "sample": sample,
        "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
    }


# --------------------------------------------------------------------------------------------
# coordinates without the tiler
# --------------------------------------------------------------------------------------------
def grid_coords_simple(slide: Path, tile_level0: int, min_tissue: float = 0.25) -> np.ndarray:
    """Regular grid over the slide, kept where a saturation threshold on a thumbnail says tissue."""
    import openslide

    osr = openslide.OpenSlide(str(slide))
    w0, h0 = osr.dimensions
    thumb = np.asarray(osr.get_thumbnail((2048, 2048)).convert("RGB")).astype(np.float32)
    osr.close()
    mx, mn = thumb.max(-1), thumb.min(-1)
    tissue = (mx - mn) / np.maximum(mx, 1) > 0.08
    sx, sy = thumb.shape[1] / w0, thumb.shape[0] / h0
    xs = np.arange(0, w0 - tile_level0 + 1, tile_level0)
    ys = np.arange(0, h0 - tile_level0 + 1, tile_level0)
    keep = []
    for y in ys:
        for x in xs:
            cell = tissue[
                int(y * sy) : max(int((y + tile_level0) * sy), int(y * sy) + 1),
                int(x * sx) : max(int((x + tile_level0) * sx), int(x * sx) + 1),
            ]
            if cell.mean() >= min_tissue:
                keep.append((x, y))
    return np.asarray(keep, np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
def subset_runs(n: int, n_keep: int, seed: int = 0, runs: int = 8) -> np.ndarray:
    """Indices of ``runs`` contiguous runs (one per equal segment) totalling ~``n_keep``."""
    if n_keep >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    seg = n // runs
    run = max(1, n_keep // runs)
    idx = [
        s * seg + int(rng.integers(0, max(1, seg - run + 1))) + np.arange(run) for s in range(runs)
    ]
    return np.concatenate(idx)


def choose_subset(
    fn: Callable[[np.ndarray], int], coords: np.ndarray, max_s: float, probe: int = 512
) -> np.ndarray:
    """Indices to time: all of them, or contiguous runs if the probe says it would exceed ``max_s``."""
    n = len(coords)
    k = min(probe, n)
    t0 = time.perf_counter()
    fn(coords[:k])
    per_tile = (time.perf_counter() - t0) / max(k, 1)
    return np.arange(n) if per_tile * n <= max_s else subset_runs(n, int(max_s / per_tile))


def timed_loop(
    name: str, fn: Callable[[np.ndarray], int], coords: np.ndarray, idx: np.ndarray
) -> dict[str, Any]:
    """Time ``fn`` over ``coords[idx]``: wall, this process's CPU time, and other processes' load."""
    sel = coords[idx]
    n = len(coords)
    mon = CpuMonitor()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    done = fn(sel)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    foreign = mon.foreign_fraction()
    subset = len(sel) < n
    note = f" (subset: {len(sel)} of {n} tiles in 8 contiguous runs)" if subset else ""
    print(
        f"  {name}: {done} tiles in {dt:.1f} s → {done / dt:.1f} tiles/s, {cpu / done * 1e3:.2f} CPU-ms/tile{note}; "
        f"other processes used {foreign or 0:.0%} of the CPUs",
        flush=True,
    )
    return {
        "tiles": done,
        "seconds": dt,
        "tiles_per_s": done / dt,
        "cpu_ms_per_tile": cpu / done * 1e3,
        "subset": subset,
        "foreign_cpu": foreign,
    }


def openslide_loop(slide: Path, level: int, size: tuple[int, int]) -> Callable[[np.ndarray], int]:
    import openslide

    osr = openslide.OpenSlide(str(slide))

    def run(coords: np.ndarray) -> int:
        for x, y in coords:
            rgba = np.asarray(osr.read_region((int(x), int(y)), level, size))
            rgb = np.ascontiguousarray(rgba[..., :3])
        return len(coords) if len(coords) and rgb.size else 0

    return run


def cucim_loop(
    slide: Path, level: int, size: tuple[int, int], workers: int
) -> Callable[[np.ndarray], int]:
    from cucim import CuImage

    img = CuImage(str(slide))

    def batch(coords: np.ndarray) -> int:
        for x, y in coords:
            arr = np.asarray(img.read_region(location=(int(x), int(y)), size=size, level=level))
        return len(coords) if len(coords) and arr.size else 0

    def run(coords: np.ndarray) -> int:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return sum(
                pool.map(batch, [coords[i : i + BATCH] for i in range(0, len(coords), BATCH)])
            )

    return run


def check_same_pixels(slide: Path, store_info: dict[str, Any]) -> int | None:
    """Max |Δ| between the tiler's first patches and cuCIM reads at the same coords (no resize)."""
    if store_info["read_size"] != (store_info["tile_px"],) * 2:
        return None
    from cucim import CuImage

    img = CuImage(str(slide))
    worst = 0
    for i, (x, y) in enumerate(store_info["coords"][: len(store_info["sample"])]):
        ref = np.asarray(
            img.read_region(
                location=(int(x), int(y)),
                size=store_info["read_size"],
                level=store_info["read_level"],
            )
        )[..., :3]
        worst = max(worst, int(np.abs(ref.astype(np.int16) - store_info["sample"][i]).max()))
    return worst


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one baseline in a fresh interpreter (``--child``); its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"baseline {spec['kind']} failed with exit code {proc.returncode}")
    lines = proc.stdout.rstrip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    return json.loads(lines[-1])


def child_main(spec: dict[str, Any]) -> int:
    coords = np.load(spec["coords"])
    size = tuple(spec["size"])
    if spec["kind"] == "a":
        fn, name = openslide_loop(Path(spec["slide"]), spec["level"], size), "openslide"
    else:
        fn, name = cucim_loop(Path(spec["slide"]), spec["level"], size, spec["workers"]), "cucim"
    if spec.get("probe"):
        idx = choose_subset(fn, coords, spec["max_s"])
        np.save(spec["idx"], idx)
        out: dict[str, Any] = {"n": len(idx)}
    else:
        out = timed_loop(name, fn, coords, np.load(spec["idx"]))
    print(json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------------
# where (c) spends its time
# --------------------------------------------------------------------------------------------
def breakdown(
    slide: Path,
    coords: np.ndarray,
    workers: int,
    tile_px: int,
    mpp_target: float,
    out_dir: Path,
    max_n: int = 4096,
) -> dict[str, float]:
    """Per-stage cost of the tiler on the same coords, each stage alone, in this process."""
    from oncotrace import wsi

    sel = coords[subset_runs(len(coords), max_n)]
    res: dict[str, float] = {}
    with wsi.open_slide(slide) as s:
        t0 = time.perf_counter()
        mask = wsi.detect_tissue(s, mode="tissue")
        res["detect_tissue_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wsi.tile_coords(s, mask, target_mpp=mpp_target, tile_px=tile_px)
        res["tile_coords_s"] = time.perf_counter() - t0
        geom = wsi.tile_geometry(s, target_mpp=mpp_target, tile_px=tile_px)
        tiles = []
        t0 = time.perf_counter()
        for x, y in sel[:1024]:
            tiles.append(wsi.read_tile(s, (int(x), int(y)), geom))
        res["read_tile_ms_1thread"] = (time.perf_counter() - t0) / len(tiles) * 1e3
        t0 = time.perf_counter()
        for t in tiles:
            wsi.focus_score(t)
        res["focus_score_ms"] = (time.perf_counter() - t0) / len(tiles) * 1e3
        t0 = time.perf_counter()
        wsi.write_patches(s, sel, out_dir / "breakdown", mask=mask, workers=workers)
        res["write_patches_tiles_per_s"] = len(sel) / (time.perf_counter() - t0)
    # zarr alone: write the same number of (random-content) tiles shard by shard
    import zarr
    from zarr.codecs import BloscCodec

    arr = zarr.open_group(out_dir / "zarr-only.zarr", mode="w", zarr_format=3).create_array(
        "patches",
        shape=(len(sel), tile_px, tile_px, 3),
        dtype="uint8",
        chunks=(1, tile_px, tile_px, 3),
        shards=(64, tile_px, tile_px, 3),
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),
    )
    batch = (
        np.stack(tiles[:64]) if len(tiles) >= 64 else np.zeros((64, tile_px, tile_px, 3), np.uint8)
    )
    t0 = time.perf_counter()
    n_written = 0
    for start in range(0, len(sel) - 63, 64):
        arr[start : start + 64] = batch
        n_written += 64
    res["zarr_write_ms_per_tile_1thread"] = (time.perf_counter() - t0) / max(n_written, 1) * 1e3
    shutil.rmtree(out_dir / "zarr-only.zarr", ignore_errors=True)
    shutil.rmtree(out_dir / "breakdown", ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
def cucim_cache_env(data_dir: Path, mib: int) -> dict[str, str]:
    """Environment enabling cuCIM's per-process tile cache via its config file.

    ``CuImage.cache("per_process", …)`` from Python has no effect on the reader plugin of the
    CPU wheel (measured: same CPU per tile as no cache); the ``.cucim.json`` file read at start-up
    does take effect, for this process (if set before cuCIM is imported) and for children.
    """
    cfg = data_dir / f"cucim-cache-{mib}" / ".cucim.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cache = {"type": "per_process", "memory_capacity": mib} if mib > 0 else {"type": "nocache"}
    cfg.write_text(json.dumps({"cache": cache}))
    return {"CUCIM_CONFIG_PATH": str(cfg)}


def tiler_fingerprint() -> dict[str, str]:
    """Short hashes and mtimes of the tiler's source files: the tiler is under active development."""
    import hashlib

    out = {}
    for rel in (
        "wsi/_store.py",
        "wsi/_tiling.py",
        "wsi/_backends.py",
        "wsi/_slide.py",
        "wsi/_tissue.py",
        "workflows/cli.py",
        "workflows/_batch.py",
    ):
        f = REPO / rel
        if f.exists():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:10]
            out[rel] = f"{digest}@{time.strftime('%H:%M:%S', time.localtime(f.stat().st_mtime))}"
    return out


def tiler_cucim_cache_mib() -> int:
    """The cuCIM cache size the tiler sets up for itself (0: it keeps cuCIM's own cache off since
    the cache moved into ``wsi._tilecache``). Imports no cuCIM."""
    try:
        from oncotrace.wsi import _backends  # private: the tiler's own cache setting
    except ImportError:
        return 0
    return int(getattr(_backends, "CUCIM_CACHE_MIB", 0) or 0)


def _median_run(runs: list[dict[str, Any]], key: str = "tiles_per_s") -> dict[str, Any]:
    """The round with the median ``key`` (the lower middle one of an even count)."""
    ranked = sorted(runs, key=lambda r: r[key])
    return ranked[(len(ranked) - 1) // 2]


def _median_ratio(num: list[dict[str, Any]], den: list[dict[str, Any]]) -> float:
    """Median over rounds of num/den tiles/s, each ratio within one round (same machine load)."""
    import statistics

    return statistics.median(
        n["tiles_per_s"] / d["tiles_per_s"] for n, d in zip(num, den, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--size", type=int, default=50_000, help="slide side in level-0 px (develop with 10000)"
    )
    p.add_argument("--workers", type=int, default=2, help="threads for (b) and (c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--mpp-target", type=float, default=0.5)
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    p.add_argument("--max-baseline-s", type=float, default=120.0, help="longest a baseline may run")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (c), (a), (b); medians are reported, ratios taken within each round",
    )
    p.add_argument(
        "--cucim-cache",
        type=int,
        default=None,
        metavar="MIB",
        help="cuCIM per-process tile cache (MiB) for (b) and (c) via CUCIM_CONFIG_PATH; "
        "default: whatever the tiler configures (wsi._backends.CUCIM_CACHE_MIB), 0 = none",
    )
    p.add_argument(
        "--coords",
        choices=("tiler", "grid"),
        default="tiler",
        help="tiler: run (c) and use its coords; grid: skip (c), simple saturation grid",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="also time the tiler's stages one by one"
    )
    p.add_argument("--keep-store", action="store_true")
    p.add_argument("--regenerate", action="store_true")
    args = p.parse_args(argv)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    cache_source = "option"
    if args.cucim_cache is None:
        # (b) must read with the same cuCIM configuration as the tiler, or c/b compares caches
        args.cucim_cache, cache_source = tiler_cucim_cache_mib(), "matched to the tiler"
    if "cucim" in sys.modules:
        raise RuntimeError("the cuCIM cache must be configured before cuCIM is imported")
    # always explicit, so the tiler (which keeps an existing CUCIM_CONFIG_PATH) and (b) agree
    os.environ.update(cucim_cache_env(args.data_dir, args.cucim_cache))
    slide, gen = ensure_slide(
        args.size, args.seed, args.quality, args.data_dir, regenerate=args.regenerate
    )
    print(
        f"slide {slide} ({gen['file_bytes'] / 2**20:.0f} MiB, tissue {gen['tissue_fraction']:.1%}, "
        f"{'reused; ' if gen['reused'] else ''}generated in {gen['seconds']:.1f} s)"
    )
    warm = warm_page_cache(slide)
    print(
        f"page cache warmed in {warm:.1f} s; {os.cpu_count()} CPUs, workers={args.workers}, "
        f"cuCIM cache: {f'per_process {args.cucim_cache} MiB' if args.cucim_cache else 'none'} ({cache_source})"
    )

    out_dir = args.data_dir / f"tiles-{slide.stem}"
    result: dict[str, Any] = {
        "slide": str(slide),
        "size": args.size,
        "workers": args.workers,
        "tile_px": args.tile_px,
        "mpp_target": args.mpp_target,
        "generation_s": round(gen["seconds"], 1),
        "slide_reused": gen["reused"],
        "slide_mib": round(gen["file_bytes"] / 2**20),
        "tissue_fraction": round(gen["tissue_fraction"], 3),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cucim_cache_mib": args.cucim_cache,
        "cucim_cache_source": cache_source,
        "repeat": args.repeat,
        "tiler_sources_before": tiler_fingerprint(),
    }
    use_tiler = args.coords == "tiler" and oncotrace_cli() is not None
    if args.coords == "tiler" and not use_tiler:
        print("(c) skipped: oncotrace CLI not importable; using a saturation grid")
    c_runs: list[dict[str, Any]] = []
    a_runs: list[dict[str, Any]] = []
    b_runs: list[dict[str, Any]] = []
    b0_runs: list[dict[str, Any]] = []
    # (b0): cuCIM exactly as installed (no tile cache), the "bare" reader a user starts from
    b0_env = cucim_cache_env(args.data_dir, 0) if args.cucim_cache else None
    coords = np.zeros((0, 2), np.int64)
    level, size = 0, (args.tile_px, args.tile_px)
    spec: dict[str, Any] = {}
    for rnd in range(args.repeat):
        if args.repeat > 1:
            print(f"— round {rnd + 1}/{args.repeat}")
        if use_tiler:
            print("(c) oncotrace tile …", flush=True)
            c = run_tiler(slide, out_dir, args.workers, args.tile_px, args.mpp_target)
            info = read_store(c["store"])
            if rnd == 0:
                coords, level, size = info["coords"], info["read_level"], info["read_size"]
                result.update(
                    {
                        "c_cmd": " ".join(c["cmd"]),
                        "c_backend": info["backend"],
                        "c_store_mib": round(info["store_bytes"] / 2**20),
                        "c_vs_cucim_max_abs_diff": check_same_pixels(slide, info),
                        "read_level": level,
                        "read_size": list(size),
                    }
                )
            elif not np.array_equal(coords, info["coords"]):
                raise RuntimeError("the tiler returned different coordinates in a later round")
            n = len(coords)
            c.update(tiles=n, tiles_per_s=n / c["wall_s"], cpu_ms_per_tile=c["cpu_s"] / n * 1e3)
            c_runs.append(c)
            print(
                f"  oncotrace tile: {n} tiles in {c['wall_s']:.1f} s wall → {c['tiles_per_s']:.1f} tiles/s, "
                f"{c['cpu_ms_per_tile']:.2f} CPU-ms/tile (tiler's own timer {c['tiler_seconds']} s → "
                f"{n / c['tiler_seconds']:.1f} tiles/s); peak RSS {c['peak_rss_gib']:.2f} GiB; "
                f"store {info['store_bytes'] / 2**20:.0f} MiB; other processes used {c['foreign_cpu'] or 0:.0%} of the CPUs",
                flush=True,
            )
            if not (args.keep_store and rnd == args.repeat - 1):
                shutil.rmtree(c["store"])  # several GB at 50k; the coords are already in memory
        elif rnd == 0:
            tile0 = round(args.tile_px * args.mpp_target / 0.5)
            coords, level, size = grid_coords_simple(slide, tile0), 0, (tile0, tile0)
            result.update({"read_level": 0, "read_size": [tile0, tile0]})
        if rnd == 0:
            print(f"{len(coords)} tiles of {size[0]}×{size[1]} px at level {level}")
            coords_file = args.data_dir / f"coords-{slide.stem}.npy"
            np.save(coords_file, coords)
            spec = {
                "slide": str(slide),
                "coords": str(coords_file),
                "level": level,
                "size": list(size),
                "workers": args.workers,
                "max_s": args.max_baseline_s,
            }
            # each baseline runs in a fresh process, like (c): no reader cache carried over
            for kind in ("a", "b"):
                run_child(
                    {
                        **spec,
                        "kind": kind,
                        "probe": True,
                        "idx": str(coords_file) + f".{kind}-idx.npy",
                    }
                )
        print("(a) OpenSlide read_region loop, 1 thread …", flush=True)
        a_runs.append(run_child({**spec, "kind": "a", "idx": str(coords_file) + ".a-idx.npy"}))
        print(
            f"({'b' if b0_env is None else chr(98) + chr(39)}) cuCIM read_region loop,"
            f" {args.workers} threads, no writes, cache {args.cucim_cache} MiB …",
            flush=True,
        )
        b_runs.append(run_child({**spec, "kind": "b", "idx": str(coords_file) + ".b-idx.npy"}))
        if b0_env is not None:
            print(
                f"(b) cuCIM as installed (bare: no tile cache), {args.workers} threads …",
                flush=True,
            )
            b0_runs.append(
                run_child({**spec, "kind": "b", "idx": str(coords_file) + ".b-idx.npy"}, b0_env)
            )

    a, b = _median_run(a_runs), _median_run(b_runs)
    result.update(
        {
            "n_tiles": len(coords),
            "a_tiles_per_s": round(a["tiles_per_s"], 1),
            "a_cpu_ms_per_tile": round(a["cpu_ms_per_tile"], 3),
            "a_subset": a["subset"],
            "a_tiles_timed": a["tiles"],
            "b_tiles_per_s": round(b["tiles_per_s"], 1),
            "b_cpu_ms_per_tile": round(b["cpu_ms_per_tile"], 3),
            "b_subset": b["subset"],
            "b_tiles_timed": b["tiles"],
            "b_over_a": round(b["tiles_per_s"] / a["tiles_per_s"], 2),
            "a_foreign_cpu": _r(a["foreign_cpu"]),
            "b_foreign_cpu": _r(b["foreign_cpu"]),
            "all_rounds_tiles_per_s": {
                "a": [round(r["tiles_per_s"], 1) for r in a_runs],
                "b": [round(r["tiles_per_s"], 1) for r in b_runs],
                "c": [round(r["tiles_per_s"], 1) for r in c_runs],
            },
        }
    )
    if c_runs:
        c = _median_run(c_runs)
        c_tps = c["tiles_per_s"]
        result.update(
            {
                "c_tiles_per_s": round(c_tps, 1),
                "c_wall_s": round(c["wall_s"], 2),
                "c_cpu_ms_per_tile": round(c["cpu_ms_per_tile"], 3),
                "c_tiler_seconds": c["tiler_seconds"],
                "c_tiles_per_s_tiler_timer": round(len(coords) / c["tiler_seconds"], 1)
                if c["tiler_seconds"]
                else None,
                "c_peak_rss_gib": round(max(r["peak_rss_gib"] for r in c_runs), 3),
                "c_foreign_cpu": _r(c["foreign_cpu"]),
                "c_over_a": round(_median_ratio(c_runs, a_runs), 2),
                # the (b) is a *bare* cuCIM loop: cuCIM as installed. When the tiler
                # turns cuCIM's tile cache on, the same loop with that cache is reported too.
                "c_over_b": round(_median_ratio(c_runs, b0_runs or b_runs), 2),
                "c_over_b_cached": round(_median_ratio(c_runs, b_runs), 2) if b0_runs else None,
                "c_over_a_per_round": [
                    round(c["tiles_per_s"] / a["tiles_per_s"], 2)
                    for c, a in zip(c_runs, a_runs, strict=True)
                ],
            }
        )
        checks = {
            "c_over_a": result["c_over_a"] >= TARGETS["c_over_a"],
            "c_over_b": result["c_over_b"] >= TARGETS["c_over_b"],
            "c_peak_rss_gib": result["c_peak_rss_gib"] < TARGETS["c_peak_rss_gib"],
        }
        result["targets_met"] = checks
        print()
        print(f"{'':26}{'tiles/s':>9}{'CPU-ms/tile':>13}{'others CPU':>12}")
        rows = [("(a) OpenSlide, 1 thread", a)]
        if b0_runs:
            rows.append((f"(b) cuCIM bare, {args.workers} thr", _median_run(b0_runs)))
            rows.append((f"(b') cuCIM + cache, {args.workers} thr", b))
        else:
            rows.append((f"(b) cuCIM, {args.workers} threads", b))
        for label, r in (*rows, ("(c) oncotrace tile", c)):
            print(
                f"{label:26}{r['tiles_per_s']:>9.1f}{r['cpu_ms_per_tile']:>13.2f}{(r['foreign_cpu'] or 0):>12.0%}"
            )
        print(
            f"c/a = {result['c_over_a']:.2f} (target ≥ {TARGETS['c_over_a']}) {'ok' if checks['c_over_a'] else 'MISSED'}"
        )
        print(
            f"c/b = {result['c_over_b']:.2f} (target ≥ {TARGETS['c_over_b']}) {'ok' if checks['c_over_b'] else 'MISSED'}"
        )
        print(
            f"peak RSS (c) = {result['c_peak_rss_gib']:.2f} GiB (target < {TARGETS['c_peak_rss_gib']}) "
            f"{'ok' if checks['c_peak_rss_gib'] else 'MISSED'}"
        )
        if b0_runs:
            result["b_bare_tiles_per_s"] = round(_median_run(b0_runs)["tiles_per_s"], 1)
            print(
                f"c/b' = {result['c_over_b_cached']:.2f} (no target: b' is the bare loop given the"
                f" {args.cucim_cache} MiB tile cache the tiler turns on for itself)"
            )
        if args.repeat > 1:
            print(
                f"medians of {args.repeat} rounds: tiles/s of each, and ratios taken within a"
                f" round (c/a per round: {result['c_over_a_per_round']})"
            )
    if a["subset"] or b["subset"]:
        print(
            "note: a baseline ran on a subset of the same coordinates (contiguous runs); figures are tiles/s."
        )
    if args.breakdown:
        bd = breakdown(slide, coords, args.workers, args.tile_px, args.mpp_target, out_dir)
        result["breakdown"] = {k: round(v, 3) for k, v in bd.items()}
        print("breakdown:", ", ".join(f"{k}={v:.3g}" for k, v in bd.items()))
    if not args.keep_store and out_dir.exists():
        shutil.rmtree(out_dir)
    result["tiler_sources_after"] = tiler_fingerprint()
    if result["tiler_sources_after"] != result["tiler_sources_before"]:
        print("WARNING: the tiler's sources changed during the run; (c) rounds may differ in code.")
    if spec:
        for f in (spec["coords"], spec["coords"] + ".a-idx.npy", spec["coords"] + ".b-idx.npy"):
            Path(f).unlink(missing_ok=True)
    print(json.dumps(result, default=str))
    return 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


if __name__ == "__main__":
    sys.exit(main())
