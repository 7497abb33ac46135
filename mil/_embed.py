"""Embed the patches of a tile store with an encoder: ``features/<encoder>`` (N, D)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path

import numpy as np
from oncotrace.wsi import (
    FEATURE_CHUNK_ROWS,
    FeatureAttrs,
    ParameterError,
    ReadAhead,
    Store,
    StoreError,
    read_ahead,
)

from ._encoders import Encoder, create_encoder

#: rows per feature chunk; features are buffered and written a whole chunk at a time
FEATURE_CHUNK = FEATURE_CHUNK_ROWS


def _on_gpu(enc: Encoder) -> bool:
    device = getattr(enc, "device", None)
    return getattr(device, "type", "cpu") != "cpu"


def read_features(
    store: str | Path, encoder_name: str
) -> tuple[np.ndarray, np.ndarray, FeatureAttrs]:
    """``(features (N, D) float32, coords (N, 2) int64, attrs)`` of an embedded store.

    ``attrs`` is the typed ``wsi.FeatureAttrs`` of ``features/<encoder_name>``.

    Raises
    ------
    KeyError
        The store has no ``features/<encoder_name>``; the message names the command to run.
    """
    st = Store.open(store, require_complete=False)
    attrs = st.feature_attrs(encoder_name)
    if attrs is None:
        raise KeyError(
            f"{store}: no features for encoder {encoder_name!r}. Fix: run"
            f" `oncotrace embed {store} --encoder {encoder_name}`."
        )
    return st.read_features(encoder_name), st.coords(), attrs


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
    st = Store.find(store, mode="r+")
    if st is None:
        raise ValueError(
            f"{store}: not a finished OncoTrace tile store. Fix: run `oncotrace tile` first (an interrupted store has no completion mark)."
        )
    patches = st.patches()  # refuses an imported store (no patches) with the fix
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    name = enc.config.name
    if st.attrs.target_mpp is None:
        raise StoreError(f"{store}: its attrs give no target_mpp. Fix: tile the slide again.")
    tile_mpp = float(st.attrs.target_mpp)
    if abs(tile_mpp - enc.config.native_mpp) / enc.config.native_mpp > 0.25:
        native = enc.config.native_mpp
        limit = st.attrs.tiling.max_upsample if st.attrs.tiling is not None else 1.3
        finest = None if st.attrs.mpp is None else min(st.attrs.mpp)
        if finest is not None and finest / native > limit * 1.001:
            # tiling again at the encoder's resolution would be refused: say what works
            raise ParameterError(
                f"{store}: tiles are at {tile_mpp} µm/px but encoder {name!r} expects"
                f" {native} µm/px, and the slide's finest level ({finest:.4g} µm/px) is too"
                f" coarse to tile at {native} µm/px. Fix: use a scan of this slide at"
                f" {native * limit:.3g} µm/px or finer.",
                param="target_mpp",
            )
        raise ParameterError(
            f"{store}: tiles are at {tile_mpp} µm/px but encoder {name!r} expects"
            f" {native} µm/px. Fix: tile again with target_mpp={native}.",
            param="target_mpp",
        )
    done = st.feature_attrs(name)
    if (
        done is not None
        and not overwrite
        and done.complete
        and done.weights_fingerprint == enc.weights_fingerprint
    ):
        return store / "features" / name
    n = patches.shape[0]

    def batches() -> Generator[tuple[int, np.ndarray]]:
        for start in range(0, n, batch_size):
            yield start, np.asarray(patches[start : start + batch_size])

    # On a GPU the next batches are read while the model runs; on the CPU the encoder
    # already keeps every core busy and a reader thread only competes with it (measured).
    source: ReadAhead[tuple[int, np.ndarray]] | Generator[tuple[int, np.ndarray]] = (
        read_ahead(batches(), depth=2, name="embed-prefetch") if _on_gpu(enc) else batches()
    )
    meta = FeatureAttrs(encoder=enc.config.to_dict(), weights_fingerprint=enc.weights_fingerprint)
    with (
        st.write_features(
            name, n, enc.config.dim, attrs=meta, dtype=dtype, chunk_rows=FEATURE_CHUNK
        ) as out,
        closing(source),
    ):
        for start, tiles in source:
            f = enc(tiles)
            if f.shape != (len(tiles), enc.config.dim):
                raise RuntimeError(
                    f"encoder {name!r} returned {f.shape}, expected ({len(tiles)}, {enc.config.dim})"
                )
            if not np.isfinite(f).all():
                raise ParameterError(
                    f"{store}: encoder {name!r} produced NaN/inf features for tiles"
                    f" {start}..{start + len(tiles) - 1}. Fix: check the weights and the"
                    " precision (try precision=fp32).",
                    param="precision",
                )
            out.append(f)
            if progress:
                progress(len(tiles))
    return store / "features" / name
