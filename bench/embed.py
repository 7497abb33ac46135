"""Embedding throughput: ``mil.embed`` end to end against the bare model forward, in one run.

    python bench/embed.py [--encoder resnet50-trunc] [--tiles 2048] [--batch-size 64]
                          [--precision auto|fp32|bf16] [--repeat 2] [--what-if] [--profile]

For the same tiles, batch size, precision and thread count, in one process:

(1) the bare forward: the store's patches preloaded in memory as uint8 batches, a timed loop of
    ``encoder(batch)`` (the encoder's own preprocess + forward, same precision);
(2) ``mil.embed(store, encoder, batch_size=…, overwrite=True)`` end to end: Zarr reads on the
    prefetch thread, forward, finiteness check, Zarr write, rename.

With ``--what-if``, (2') times the same embed() call run inside ``wsi.fast_codecs()``,
which simulates the proposed fix (patches read through zarrs, not zarr-python's pipeline).

Prints tiles/s for each and the ratio (2)/(1) (target ≥ 0.9), and for weight-free encoders
(``pathomics``) also checks (2) ≥ 200 tiles/s. ``--encoder`` takes a comma-separated list.
Both phases are warmed up first and alternated over ``--repeat`` rounds; the best round of each
counts. Each phase reports the CPU used by *other* processes (``/proc/stat``; shared machine).

Inside (2) the encoder is wrapped in a timing proxy, so the embed wall time is split into
"encoder calls" and "everything else on the main thread" (waiting for the prefetch thread,
``isfinite``, ``astype``, Zarr writes). If the ratio misses the target (or with ``--profile``)
one more embed run is profiled with cProfile on the main thread and the top entries printed.

The tile store (224-px tiles at 0.5 µm/px) is cut from the first ``--tiles`` tissue tiles of a
cached synthetic slide in ``bench/_data`` (the smallest one with enough tissue; a
``make_tissue_squares`` slide is generated when none is there) and cached as
``bench/_data/embed-store-<N>/``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._load import CpuMonitor  # noqa: E402

DATA = HERE / "_data"
TILE_PX = 224
TARGET_MPP = 0.5
TARGETS = {"ratio": 0.9, "pathomics_tiles_per_s": 200.0}


# --------------------------------------------------------------------------------------------
# tile store
# --------------------------------------------------------------------------------------------
def _candidate_slides() -> list[Path]:
    """Cached synthetic Aperio-like slides, smallest first."""
    found = [p for p in DATA.glob("synthetic-*.svs") if Path(str(p) + ".json").exists()]
    return sorted(found, key=lambda p: p.stat().st_size)


def _squares_slide(n_tiles: int) -> Path:
    """A jpeg ``make_tissue_squares`` slide at 0.5 µm/px with one square holding ≥ n tiles."""
    from oncotrace.wsi.synthetic import make_tissue_squares

    side = int(np.ceil(np.sqrt(n_tiles * 1.1))) * TILE_PX
    path = DATA / f"squares-{side}.tiff"
    if not path.exists():
        print(f"generating {path.name} ({side + 2 * TILE_PX} px square slide) …", flush=True)
        make_tissue_squares(
            path,
            size=(side + 2 * TILE_PX, side + 2 * TILE_PX),
            mpp=TARGET_MPP,
            squares=[(TILE_PX, TILE_PX, side, side)],
            compression="jpeg",
        )
    return path


def ensure_store(n_tiles: int, *, regenerate: bool = False) -> tuple[Path, dict[str, Any]]:
    """A finished tile store with exactly ``n_tiles`` 224-px tiles at 0.5 µm/px (cached)."""
    from oncotrace.wsi import (
        Store,
        TilingConfig,
        detect_tissue,
        open_slide,
        tile_coords,
        write_patches,
    )

    out_dir = DATA / f"embed-store-{n_tiles}"
    if out_dir.exists() and not regenerate:
        stores = sorted(out_dir.glob("*.zarr"))
        if len(stores) == 1:
            cached = Store.find(stores[0])
            if cached is not None and cached.attrs.n_tiles == n_tiles:
                return stores[0], {"slide": "cached store", "reused": True}
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = TilingConfig(target_mpp=TARGET_MPP, tile_px=TILE_PX, mode="tissue")
    for slide_path in [*_candidate_slides(), None]:
        if slide_path is None:
            slide_path = _squares_slide(n_tiles)
        t0 = time.perf_counter()
        with open_slide(slide_path) as slide:
            mask = detect_tissue(slide, mode=cfg.mode)
            coords = tile_coords(slide, mask, target_mpp=cfg.target_mpp, tile_px=cfg.tile_px)
            if len(coords) < n_tiles:
                continue
            print(
                f"tiling the first {n_tiles} of {len(coords)} tissue tiles of {slide_path.name} …",
                flush=True,
            )
            store = write_patches(
                slide, coords[:n_tiles], out_dir, config=cfg, mask=mask, workers=2
            )
        return store, {
            "slide": str(slide_path),
            "reused": False,
            "tiling_s": round(time.perf_counter() - t0, 2),
        }
    raise RuntimeError("no slide with enough tissue tiles")


def load_batches(store: Path, batch_size: int) -> list[np.ndarray]:
    """The store's patches in memory, as the same uint8 batches embed() will see."""
    import zarr
    from oncotrace.wsi import fast_codecs

    with fast_codecs():
        patches = zarr.open_group(store, mode="r")["patches"]
        allp = np.asarray(patches[:])
    return [np.ascontiguousarray(allp[i : i + batch_size]) for i in range(0, len(allp), batch_size)]


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
class TimedEncoder:
    """A transparent proxy that adds up the wall time spent inside the encoder's __call__."""

    def __init__(self, enc: Any) -> None:
        self._enc = enc
        self.config = enc.config
        self.weights_fingerprint = enc.weights_fingerprint
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self._enc(tiles)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _phase(name: str, n: int, fn: Any) -> dict[str, Any]:
    mon = CpuMonitor()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    extra = fn() or {}
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    foreign = mon.foreign_fraction()
    r = {
        "tiles": n,
        "seconds": dt,
        "tiles_per_s": n / dt,
        "cpu_ms_per_tile": cpu / n * 1e3,
        "foreign_cpu": foreign,
        **extra,
    }
    note = ""
    if "encoder_s" in extra:
        note = f"; encoder calls {extra['encoder_s']:.2f} s, rest {dt - extra['encoder_s']:.2f} s"
    print(
        f"  {name}: {n} tiles in {dt:.2f} s → {n / dt:.1f} tiles/s, {r['cpu_ms_per_tile']:.2f}"
        f" CPU-ms/tile{note}; other processes used {foreign or 0:.0%} of the CPUs",
        flush=True,
    )
    return r


def bare_forward(enc: Any, batches: list[np.ndarray]) -> dict[str, Any]:
    n = sum(len(b) for b in batches)

    def run() -> None:
        for b in batches:
            enc(b)

    return _phase("(1) bare forward", n, run)


def embed_e2e(enc: Any, store: Path, batch_size: int, n: int) -> dict[str, Any]:
    from oncotrace import mil

    proxy = TimedEncoder(enc)

    def run() -> dict[str, Any]:
        mil.embed(store, proxy, batch_size=batch_size, overwrite=True)
        return {"encoder_s": proxy.seconds}

    return _phase("(2) mil.embed", n, run)


def embed_zarrs_reads(enc: Any, store: Path, batch_size: int, n: int) -> dict[str, Any]:
    """(2') What-if for the proposed fix: the same embed() call inside ``fast_codecs()``, so the
    ``patches`` array embed() opens is read through the zarrs pipeline too (today it is opened
    before embed() enters ``fast_codecs()`` and is read by zarr-python's own pipeline)."""
    from oncotrace import mil
    from oncotrace.wsi import fast_codecs

    proxy = TimedEncoder(enc)

    def run() -> dict[str, Any]:
        with fast_codecs():
            mil.embed(store, proxy, batch_size=batch_size, overwrite=True)
        return {"encoder_s": proxy.seconds}

    return _phase("(2') mil.embed, patches read via zarrs", n, run)


def profile_embed(enc: Any, store: Path, batch_size: int, top: int = 18) -> str:
    """cProfile of one embed run (main thread only), top entries by own time and cumulative."""
    from oncotrace import mil

    prof = cProfile.Profile()
    prof.enable()
    mil.embed(store, enc, batch_size=batch_size, overwrite=True)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def prefetch_read_alone(store: Path, batch_size: int) -> dict[str, Any]:
    """What embed()'s producer does, alone: patches opened outside fast_codecs, sliced per batch."""
    import zarr

    g = zarr.open_group(store, mode="r")
    patches = g["patches"]
    n = patches.shape[0]

    def run() -> None:
        for s in range(0, n, batch_size):
            np.asarray(patches[s : s + batch_size])

    r = _phase("    reads as embed() does them (zarr-python pipeline)", n, run)

    from oncotrace.wsi import fast_codecs

    with fast_codecs():
        p2 = zarr.open_group(store, mode="r")["patches"]

        def run2() -> None:
            for s in range(0, n, batch_size):
                np.asarray(p2[s : s + batch_size])

        r2 = _phase("    the same reads under fast_codecs() (zarrs)", n, run2)
    return {"zarr_python": r, "zarrs": r2}


def bench_encoder(
    name: str, store: Path, batches: list[np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    import torch
    from oncotrace import mil

    n = sum(len(b) for b in batches)
    enc = mil.create_encoder(name, weights="random", precision=args.precision, threads=args.threads)
    prec = getattr(enc, "precision", "n/a")
    threads = getattr(enc, "threads", None) or torch.get_num_threads()
    print(
        f"\n== {name}: {n} tiles, batch {args.batch_size}, precision {prec},"
        f" {threads} threads (torch {torch.get_num_threads()}) ==",
        flush=True,
    )
    t0 = time.perf_counter()
    for b in batches[: args.warmup]:
        enc(b)
    if args.warmup_embed:
        mil.embed(store, enc, batch_size=args.batch_size, overwrite=True)
    print(f"  warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    bare, e2e, e2e_z = [], [], []
    for rnd in range(args.repeat):
        # alternate the order so slow drifts of the machine's load hit both phases alike
        if rnd % 2 == 0:
            bare.append(bare_forward(enc, batches))
            e2e.append(embed_e2e(enc, store, args.batch_size, n))
            if args.what_if:
                e2e_z.append(embed_zarrs_reads(enc, store, args.batch_size, n))
        else:
            if args.what_if:
                e2e_z.append(embed_zarrs_reads(enc, store, args.batch_size, n))
            e2e.append(embed_e2e(enc, store, args.batch_size, n))
            bare.append(bare_forward(enc, batches))
    b = max(bare, key=lambda r: r["tiles_per_s"])
    e = max(e2e, key=lambda r: r["tiles_per_s"])
    feats, _, attrs = mil.read_features(store, name)
    assert feats.shape == (n, enc.config.dim) and attrs.complete, "embed output is wrong"
    ratio = e["tiles_per_s"] / b["tiles_per_s"]
    res: dict[str, Any] = {
        "encoder": name,
        "precision": prec,
        "threads": threads,
        "tiles": n,
        "bare_tiles_per_s": round(b["tiles_per_s"], 2),
        "embed_tiles_per_s": round(e["tiles_per_s"], 2),
        "ratio": round(ratio, 3),
        # CPU-ms per tile is far less sensitive to other processes' load than wall time
        # each embed round over the bare round run right next to it (ABBA order): load-matched
        "paired_ratio_median": round(
            float(
                np.median(
                    [x["tiles_per_s"] / y["tiles_per_s"] for x, y in zip(e2e, bare, strict=True)]
                )
            ),
            3,
        ),
        "cpu_ratio": round(b["cpu_ms_per_tile"] / e["cpu_ms_per_tile"], 3),
        "bare_cpu_ms_per_tile": round(b["cpu_ms_per_tile"], 2),
        "embed_cpu_ms_per_tile": round(e["cpu_ms_per_tile"], 2),
        "embed_encoder_s": round(e["encoder_s"], 3),
        "embed_rest_s": round(e["seconds"] - e["encoder_s"], 3),
        "embed_encoder_tiles_per_s": round(n / e["encoder_s"], 2),
        "bare_foreign_cpu": _r(b["foreign_cpu"]),
        "embed_foreign_cpu": _r(e["foreign_cpu"]),
        "all_rounds_tiles_per_s": {
            "bare": [round(r["tiles_per_s"], 2) for r in bare],
            "embed": [round(r["tiles_per_s"], 2) for r in e2e],
        },
    }
    if e2e_z:
        z = max(e2e_z, key=lambda r: r["tiles_per_s"])
        res["what_if_zarrs_reads"] = {
            "embed_tiles_per_s": round(z["tiles_per_s"], 2),
            "ratio": round(z["tiles_per_s"] / b["tiles_per_s"], 3),
            "cpu_ratio": round(b["cpu_ms_per_tile"] / z["cpu_ms_per_tile"], 3),
            "cpu_ms_per_tile": round(z["cpu_ms_per_tile"], 2),
            "foreign_cpu": _r(z["foreign_cpu"]),
            "all_rounds_tiles_per_s": [round(r["tiles_per_s"], 2) for r in e2e_z],
        }
        w = res["what_if_zarrs_reads"]
        print(
            f"  (2') what-if, patches read via zarrs: {w['embed_tiles_per_s']:.1f} tiles/s →"
            f" ratio {w['ratio']:.3f}, CPU ratio {w['cpu_ratio']:.3f} (no target: proposed fix)"
        )
    ok = {"ratio": ratio >= TARGETS["ratio"]}
    if name == "pathomics":
        ok["pathomics_tiles_per_s"] = e["tiles_per_s"] >= TARGETS["pathomics_tiles_per_s"]
    res["targets_met"] = ok
    print(
        f"  best of {args.repeat}: bare {b['tiles_per_s']:.1f}, embed {e['tiles_per_s']:.1f} tiles/s"
        f" → ratio {ratio:.3f} (target ≥ {TARGETS['ratio']}) {'ok' if ok['ratio'] else 'MISSED'}"
    )
    print(
        f"  CPU-ms/tile: bare {b['cpu_ms_per_tile']:.2f}, embed {e['cpu_ms_per_tile']:.2f}"
        f" → CPU ratio {res['cpu_ratio']:.3f} (bare/embed; wall-clock ratio is load-sensitive);"
        f" median of adjacent-round ratios {res['paired_ratio_median']:.3f}"
    )
    print(
        f"  inside embed: encoder calls {e['encoder_s']:.2f} s ({n / e['encoder_s']:.1f} tiles/s"
        f" vs {b['tiles_per_s']:.1f} bare), everything else {e['seconds'] - e['encoder_s']:.2f} s"
    )
    if name == "pathomics":
        print(
            f"  pathomics embed {e['tiles_per_s']:.1f} tiles/s (target ≥"
            f" {TARGETS['pathomics_tiles_per_s']:.0f}) {'ok' if ok['pathomics_tiles_per_s'] else 'MISSED'}"
        )
    if not ok["ratio"] or args.profile:
        reads = prefetch_read_alone(store, args.batch_size)
        res["reads_alone_tiles_per_s"] = {k: round(v["tiles_per_s"], 1) for k, v in reads.items()}
        res["reads_alone_cpu_ms_per_tile"] = {
            k: round(v["cpu_ms_per_tile"], 3) for k, v in reads.items()
        }
        print("  cProfile of one embed run (main thread):", flush=True)
        text = profile_embed(enc, store, args.batch_size)
        print("\n".join("    " + ln for ln in text.splitlines() if ln.strip()), flush=True)
    return res


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--encoder", default="resnet50-trunc", help="comma-separated encoder names")
    ap.add_argument("--tiles", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of each phase; best counts")
    ap.add_argument("--warmup", type=int, default=2, help="batches run before timing")
    ap.add_argument(
        "--warmup-embed", action="store_true", help="also run one untimed embed before timing"
    )
    ap.add_argument(
        "--what-if",
        action="store_true",
        help="also time (2') embed with its patches read through zarrs (the proposed fix)",
    )
    ap.add_argument("--profile", action="store_true", help="profile embed even if on target")
    ap.add_argument("--regenerate", action="store_true", help="re-cut the cached tile store")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    DATA.mkdir(parents=True, exist_ok=True)
    store, info = ensure_store(args.tiles, regenerate=args.regenerate)
    print(f"store {store} ({'reused' if info['reused'] else 'new'}; from {info['slide']})")
    batches = load_batches(store, args.batch_size)
    result: dict[str, Any] = {
        "bench": "embed",
        "machine": f"{platform.machine()} {os.cpu_count()} CPU",
        "torch": torch.__version__,
        "tiles": args.tiles,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeat": args.repeat,
        "store": str(store),
        "encoders": {},
    }
    for name in [s.strip() for s in args.encoder.split(",") if s.strip()]:
        result["encoders"][name] = bench_encoder(name, store, batches, args)
    print()
    print(
        f"{'encoder':16}{'prec':>6}{'bare t/s':>10}{'embed t/s':>11}{'ratio':>7}{'others CPU':>12}"
    )
    for name, r in result["encoders"].items():
        print(
            f"{name:16}{r['precision']:>6}{r['bare_tiles_per_s']:>10.1f}{r['embed_tiles_per_s']:>11.1f}"
            f"{r['ratio']:>7.2f}{r['cpu_ratio']:>11.2f}{max(r['bare_foreign_cpu'] or 0, r['embed_foreign_cpu'] or 0):>12.0%}"
        )
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
