"""Training throughput: ``mil.fit`` on bags read from Zarr stores against in-memory arrays.

    python bench/train.py [--bags 200] [--instances 10000] [--dim 1024] [--epochs 1]
                          [--threads 2] [--depth 2] [--codec none|zstd] [--serial] [--regenerate]

Same process, same run, same head (``abmil-gated``, default options), seed, epochs and threads:

(1) **Zarr**: ``mil.fit(mil.ZarrBags(stores, "bench"), …)``: each case is read from its store when
    the training loop reaches it, the next ``--depth`` on ``prefetch_bags``' reader thread;
(2) **memory**: the same features loaded first into a list of float32 arrays (~8.2 GB at full
    size; loaded only for this phase and freed after it), then ``mil.fit(list, …)``.

With ``--serial``, (1') also times ZarrBags behind a wrapper without the ``prefetchable`` marker
(every read on the training thread), to show what the read-ahead buys.

Reported per phase: bags/s (cases × epochs / wall time of ``fit``), CPU cores this process used,
the CPU other processes used meanwhile (``bench._load.CpuMonitor``; the machine is shared), and
peak RSS (``VmHWM``, reset with ``/proc/self/clear_refs`` before each phase). The ratio
(1)/(2) has a target of ≥ 0.8. Both phases must give the same training loss (same data, same
seed): the bench checks it and prints the largest difference.

Data: ``--bags`` synthetic stores of ``--instances`` × ``--dim`` float32 features (what
``mil.embed`` writes: float32, 4096-row chunks, uncompressed; ``--codec zstd`` writes them with
zarr's default zstd, what embed wrote before this bench showed its decode cost), standard normal noise with a planted signal: in half of the cases
(label 1) 2 % of the instances are shifted by +1 along the first 32 features. Generated once
into ``bench/_data/train-<bags>x<instances>x<dim>-<codec>-s<seed>/`` and reused (8.2 GB at
full size; ``--regenerate`` rewrites it). The stores are in the page cache when the bench runs
(just written or just read), so this measures decode + copy, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._load import CpuMonitor  # noqa: E402

DATA = HERE / "_data"
FEATURE_NAME = "bench"
TASKS = {"label": ("neg", "pos")}
TARGET_RATIO = 0.8
SIGNAL_DIMS = 32
SIGNAL_FRACTION = 0.02


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def data_dir(bags: int, instances: int, dim: int, codec: str, seed: int) -> Path:
    return DATA / f"train-{bags}x{instances}x{dim}-{codec}-s{seed}"


def make_bag(i: int, instances: int, dim: int, label: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, i])
    x = rng.standard_normal((instances, dim), dtype=np.float32)
    if label:
        k = max(1, round(SIGNAL_FRACTION * instances))
        x[rng.choice(instances, k, replace=False), :SIGNAL_DIMS] += 1.0
    return x


def ensure_data(
    bags: int, instances: int, dim: int, codec: str, seed: int, *, regenerate: bool = False
) -> tuple[Path, list[Path], np.ndarray, dict[str, Any]]:
    """The cohort's stores and labels, generated once (``done.json`` marks a finished set)."""
    import zarr
    from oncotrace.wsi import FEATURE_CHUNK_ROWS, Store, StoreAttrs, fast_codecs

    root = data_dir(bags, instances, dim, codec, seed)
    marker = root / "done.json"
    if regenerate and root.exists():
        shutil.rmtree(root)
    if marker.is_file():
        meta = json.loads(marker.read_text())
        paths = [root / f"case-{i:04d}.zarr" for i in range(bags)]
        return root, paths, np.array(meta["labels"], np.int64), {**meta, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    labels = np.arange(bags) % 2
    np.random.default_rng(seed).shuffle(labels)
    t0 = time.perf_counter()
    paths = []
    compressors: Any = None if codec == "none" else "auto"
    with fast_codecs():
        for i in range(bags):
            p = root / f"case-{i:04d}.zarr"
            g = zarr.open_group(p, mode="w", zarr_format=3)
            side = int(np.ceil(np.sqrt(instances)))
            xy = np.stack([np.arange(instances) % side, np.arange(instances) // side], 1) * 224
            g.create_array("coords", data=xy.astype(np.int64), chunks=(instances, 2))
            a = g.require_group("features").create_array(
                FEATURE_NAME,
                shape=(instances, dim),
                dtype="float32",
                chunks=(min(instances, FEATURE_CHUNK_ROWS), dim),
                compressors=compressors,
                dimension_names=("tile", "feature"),
            )
            a[...] = make_bag(i, instances, dim, int(labels[i]), seed)
            a.attrs.update({"complete": True, "encoder": {"name": FEATURE_NAME, "dim": dim}})
            Store.open(p, mode="r+", require_complete=False).write_attrs(
                StoreAttrs(complete=True, slide_id=p.stem, tile_size_level0=(224, 224))
            )
            paths.append(p)
            if (i + 1) % 20 == 0 or i + 1 == bags:
                print(f"  generated {i + 1}/{bags} stores", flush=True)
    nbytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    meta = {
        "labels": labels.tolist(),
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes_on_disk": nbytes,
        "codec": codec,
    }
    marker.write_text(json.dumps(meta))
    return root, paths, labels.astype(np.int64), {**meta, "reused": False}


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _gib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 2**20, 2)


class SerialBags(Sequence[np.ndarray]):
    """ZarrBags without the ``prefetchable`` marker: every read happens on the training thread."""

    def __init__(self, bags: Any) -> None:
        self._bags = bags
        self.shapes = bags.shapes

    def __len__(self) -> int:
        return len(self._bags)

    def __getitem__(self, i: Any) -> Any:
        return self._bags[i]


def run_fit(bags: Any, labels: np.ndarray, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    from oncotrace import mil

    _, hist = mil.fit(
        bags,
        {"label": labels},
        tasks=TASKS,
        in_dim=dim,
        head="abmil-gated",
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
    )
    return hist


def phase(name: str, bags: Any, labels: np.ndarray, dim: int, args: argparse.Namespace) -> dict:
    reset_peak_rss()
    mon = CpuMonitor()
    cpu0 = os.times()
    t0 = time.perf_counter()
    hist = run_fit(bags, labels, dim, args)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    own_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    n = len(labels) * args.epochs
    r = {
        "seconds": round(wall, 2),
        "bags_per_s": round(n / wall, 3),
        "cpu_cores_used": round(own_cpu / wall, 2),
        "cpu_s_per_bag": round(own_cpu / n, 4),
        "others_cpu_fraction": _round(mon.foreign_fraction()),
        "peak_rss_gib": _gib(_status_kb("VmHWM")),
        "train_loss": [float(x) for x in hist["train_loss"]],
    }
    print(
        f"  {name}: {n} bag-steps in {wall:.1f} s → {r['bags_per_s']:.2f} bags/s;"
        f" {r['cpu_cores_used']:.2f} cores, {r['cpu_s_per_bag']:.3f} CPU-s/bag; others used"
        f" {(r['others_cpu_fraction'] or 0):.0%}; peak RSS {r['peak_rss_gib']} GiB;"
        f" loss {r['train_loss']}",
        flush=True,
    )
    return r


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def load_in_memory(paths: Sequence[Path]) -> tuple[list[np.ndarray], float]:
    import zarr
    from oncotrace.wsi import fast_codecs

    t0 = time.perf_counter()
    out = []
    with fast_codecs():
        for p in paths:
            a = zarr.open_array(p / "features" / FEATURE_NAME, mode="r")
            out.append(np.ascontiguousarray(a[...], dtype=np.float32))
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bags", type=int, default=200)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--depth", type=int, default=2, help="bags read ahead (prefetch_bags)")
    ap.add_argument("--codec", choices=("none", "zstd"), default="none")
    ap.add_argument("--serial", action="store_true", help="also time Zarr reads without prefetch")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (ABBA after the first)")
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from oncotrace.mil import ZarrBags, prefetch_bags

    torch.set_num_threads(args.threads)
    print(
        f"train bench: {args.bags} bags × {args.instances} × {args.dim} float32, abmil-gated,"
        f" {args.epochs} epoch(s), seed {args.seed}, torch {torch.__version__} with"
        f" {torch.get_num_threads()} threads, prefetch depth {args.depth}",
        flush=True,
    )
    root, paths, labels, meta = ensure_data(
        args.bags, args.instances, args.dim, args.codec, args.seed, regenerate=args.regenerate
    )
    how = "reused" if meta["reused"] else f"generated in {meta['seconds']} s"
    gib = meta["bytes_on_disk"] / 2**30
    print(f"data {root} ({how}; {gib:.2f} GiB on disk, codec {args.codec})", flush=True)
    if args.depth != 2:  # prefetch_bags' default depth is what fit() uses
        default = prefetch_bags.__defaults__
        prefetch_bags.__defaults__ = (args.depth,)
        print(f"  prefetch depth set to {args.depth} (default {default})")

    # Warm-up (untimed): torch kernels, allocator, zarr/zarrs pipelines.
    warm = min(4, args.bags)
    run_fit(ZarrBags(paths[:warm], FEATURE_NAME), labels[:warm], args.dim, args)

    result: dict[str, Any] = {
        "bench": "train",
        "machine": f"{platform.machine()} {os.cpu_count()} CPU",
        "torch": torch.__version__,
        "bags": args.bags,
        "instances": args.instances,
        "dim": args.dim,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "depth": args.depth,
        "codec": args.codec,
        "data_bytes_on_disk": meta["bytes_on_disk"],
        "repeat": args.repeat,
        "peak_rss_resettable": reset_peak_rss(),
    }
    bags = ZarrBags(paths, FEATURE_NAME)
    # Round 1 runs Zarr before the arrays are loaded, so its peak RSS is its own; later rounds
    # alternate the order (ABBA) with the arrays held, so load drifts hit both phases alike.
    zarr_runs = [phase("(1) Zarr (ZarrBags + prefetch)", bags, labels, args.dim, args)]
    serial_runs = []
    if args.serial:
        serial_runs.append(
            phase(
                "(1') Zarr, reads on the training thread", SerialBags(bags), labels, args.dim, args
            )
        )
    reset_peak_rss()
    arrays, load_s = load_in_memory(paths)
    result["memory_load_seconds"] = round(load_s, 1)
    result["memory_load_peak_rss_gib"] = _gib(_status_kb("VmHWM"))
    print(
        f"  loaded {len(arrays)} bags into memory in {load_s:.1f} s"
        f" (RSS {_gib(_status_kb('VmRSS'))} GiB)",
        flush=True,
    )
    memory_runs = [phase("(2) in-memory float32 arrays", arrays, labels, args.dim, args)]
    for rnd in range(1, args.repeat):
        order = ("m", "z") if rnd % 2 else ("z", "m")
        for what in order:
            if what == "m":
                memory_runs.append(phase("(2) in-memory", arrays, labels, args.dim, args))
            else:
                zarr_runs.append(phase("(1) Zarr", bags, labels, args.dim, args))
    del arrays, bags
    best = lambda runs: max(runs, key=lambda r: r["bags_per_s"])  # noqa: E731
    result["zarr"] = {**best(zarr_runs), "peak_rss_gib": zarr_runs[0]["peak_rss_gib"]}
    result["memory"] = best(memory_runs)
    if serial_runs:
        result["zarr_serial"] = serial_runs[0]
    result["rounds"] = {
        "zarr_bags_per_s": [r["bags_per_s"] for r in zarr_runs],
        "memory_bags_per_s": [r["bags_per_s"] for r in memory_runs],
        "zarr_others_cpu": [r["others_cpu_fraction"] for r in zarr_runs],
        "memory_others_cpu": [r["others_cpu_fraction"] for r in memory_runs],
    }
    paired = [
        z["bags_per_s"] / m["bags_per_s"] for z, m in zip(zarr_runs, memory_runs, strict=False)
    ]
    result["paired_ratio_median"] = round(float(np.median(paired)), 3)

    z, m = result["zarr"], result["memory"]
    ratio = z["bags_per_s"] / m["bags_per_s"]
    diff = max(abs(a - b) for a, b in zip(z["train_loss"], m["train_loss"], strict=True))
    result["ratio"] = round(ratio, 3)
    result["cpu_ratio"] = round(m["cpu_s_per_bag"] / z["cpu_s_per_bag"], 3)
    result["loss_max_abs_diff"] = diff
    result["target_met"] = ratio >= TARGET_RATIO
    print(
        f"\nZarr {z['bags_per_s']:.2f} bags/s vs memory {m['bags_per_s']:.2f} bags/s → ratio"
        f" {ratio:.3f} (target ≥ {TARGET_RATIO}) {'ok' if ratio >= TARGET_RATIO else 'MISSED'};"
        f" CPU-s/bag ratio {result['cpu_ratio']:.3f}; peak RSS Zarr {z['peak_rss_gib']} GiB,"
        f" memory {m['peak_rss_gib']} GiB; same training loss: max |Δ| = {diff:.2e};"
        f" median of paired-round ratios {result['paired_ratio_median']:.3f}"
    )
    if "zarr_serial" in result:
        s = result["zarr_serial"]
        print(
            f"without read-ahead: {s['bags_per_s']:.2f} bags/s ({s['bags_per_s'] / m['bags_per_s']:.3f} of memory)"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
