"""Embed the patches of a tile store with an encoder: ``features/<encoder>`` (N, D)."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from oncotrace.wsi import read_store_attrs
from oncotrace.wsi._store import fast_codecs

from ._encoders import Encoder, create_encoder

FEATURES_GROUP = "features"
#: rows per feature chunk; features are buffered and written a whole chunk at a time
FEATURE_CHUNK = 4096


def _prefetch(
    batches: Iterator[tuple[int, np.ndarray]], depth: int = 2
) -> Iterator[tuple[int, np.ndarray]]:
    """Read the next ``depth`` batches on a background thread while the model runs."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                q.put(item)
        except BaseException as exc:  # handed to the consumer, never swallowed
            q.put(exc)
        q.put(done)

    thread = threading.Thread(target=produce, name="embed-prefetch", daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def _on_gpu(enc: Encoder) -> bool:
    device = getattr(enc, "device", None)
    return getattr(device, "type", "cpu") != "cpu"


def read_features(
    store: str | Path, encoder_name: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features (N, D) float32, coords (N, 2) int64, attrs)`` of an embedded store."""
    g = zarr.open_group(Path(store), mode="r")
    try:
        arr = g[f"{FEATURES_GROUP}/{encoder_name}"]
    except KeyError:
        arr = None
    if not isinstance(arr, zarr.Array):
        raise KeyError(
            f"{store}: no features for encoder {encoder_name!r}. Fix: run"
            f" `oncotrace embed {store} --encoder {encoder_name}`."
        )
    coords = g["coords"]
    if not isinstance(coords, zarr.Array):
        raise ValueError(f"{store}: 'coords' is not an array. Fix: tile the slide again.")
    return np.asarray(arr[:], np.float32), np.asarray(coords[:]), dict(arr.attrs)


def embed(
    store: str | Path,
    encoder: Encoder | str,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Compute ``features/<encoder>`` (N, D) for a finished tile store, row-aligned with ``coords``.

    Resumable: a store already embedded with the same encoder and weights is left as it is.
    The features are written under a temporary name and renamed when complete.

    Parameters
    ----------
    store : a ``<slide_id>.zarr`` written by :func:`wsi.write_patches`.
    encoder : an encoder object or a registered name (weight-free encoders only by name).
    batch_size : tiles per forward pass; the next two batches are read while one is encoded.
    dtype : ``"float32"`` or ``"float16"`` on disk.
    """
    store = Path(store)
    attrs = read_store_attrs(store)
    if attrs is None:
        raise ValueError(
            f"{store}: not a finished OncoTrace tile store. Fix: run `oncotrace tile` first (an interrupted store has no completion mark)."
        )
    if attrs.get("has_patches") is False:
        raise ValueError(
            f"{store}: its features were imported (`oncotrace import-features`); it holds no"
            " patches to embed. Fix: train on the imported features by name, or tile the slide"
            " with `oncotrace tile` to embed it with another encoder."
        )
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    name = enc.config.name
    tile_mpp = float(attrs["target_mpp"])
    if abs(tile_mpp - enc.config.native_mpp) / enc.config.native_mpp > 0.25:
        raise ValueError(
            f"{store}: tiles are at {tile_mpp} µm/px but encoder {name!r} expects"
            f" {enc.config.native_mpp} µm/px. Fix: tile again with --mpp-target {enc.config.native_mpp}."
        )
    group = zarr.open_group(store, mode="r+")
    feats = group.require_group(FEATURES_GROUP)
    if name in feats and not overwrite:
        done = dict(feats[name].attrs)
        if done.get("complete") and done.get("weights_fingerprint") == enc.weights_fingerprint:
            return store / FEATURES_GROUP / name
    tmp_name = f".{name}.partial-{os.getpid()}"
    root = store / FEATURES_GROUP
    shutil.rmtree(root / tmp_name, ignore_errors=True)
    t0 = time.perf_counter()
    with fast_codecs():  # zarrs reads the patch shards ~4x cheaper than zarr-python
        patches = zarr.open_array(store / "patches", mode="r")
        n = patches.shape[0]
        chunk = max(1, min(n, FEATURE_CHUNK))
        out = feats.create_array(
            tmp_name,
            shape=(n, enc.config.dim),
            dtype=dtype,
            chunks=(chunk, enc.config.dim),
            # Uncompressed: zstd saves ~8 % on float32 features but its decode cost halved
            # training throughput from Zarr in bench/train.py (0.47 vs 0.93 of in-memory).
            compressors=None,
            dimension_names=("tile", "feature"),
        )

        def batches() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, n, batch_size):
                yield start, np.asarray(patches[start : start + batch_size])

        # On a GPU the next batches are read while the model runs; on the CPU the encoder
        # already keeps every core busy and a reader thread only competes with it (measured).
        source = _prefetch(batches()) if _on_gpu(enc) else batches()
        buffer = np.empty((chunk, enc.config.dim), dtype)
        flushed = 0
        for start, tiles in source:
            f = enc(tiles)
            if f.shape != (len(tiles), enc.config.dim):
                raise RuntimeError(
                    f"encoder {name!r} returned {f.shape}, expected ({len(tiles)}, {enc.config.dim})"
                )
            if not np.isfinite(f).all():
                raise ValueError(
                    f"{store}: encoder {name!r} produced NaN/inf features for tiles {start}..{start + len(tiles) - 1}. Fix: check the weights and the precision (try --precision fp32)."
                )
            stop = start + len(tiles)
            while start < stop:  # fill whole chunks before writing: no chunk rewritten
                take = min(stop - start, flushed + chunk - start)
                buffer[start - flushed : start - flushed + take] = f[:take].astype(dtype)
                f = f[take:]
                start += take
                if start - flushed == chunk or start == n:
                    out[flushed:start] = buffer[: start - flushed]
                    flushed = start
            if progress:
                progress(len(tiles))
    out.attrs.update(
        {
            "complete": True,
            "encoder": enc.config.to_dict(),
            "weights_fingerprint": enc.weights_fingerprint,
            "dim": enc.config.dim,
            "n_tiles": n,
            "dtype": dtype,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    if (root / name).exists():
        shutil.rmtree(root / name)
    os.replace(root / tmp_name, root / name)
    return root / name
