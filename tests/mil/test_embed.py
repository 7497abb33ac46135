"""Embedding a tile store: aligned with coords, self-describing, resumable, refuses bad input."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from oncotrace import mil, wsi
from oncotrace.mil import pathomics_features
from oncotrace.wsi.synthetic import make_tissue_squares


@pytest.fixture
def store(tmp_path: Path) -> Path:
    planted = make_tissue_squares(
        tmp_path / "s.tiff",
        size=(2048, 1536),
        mpp=0.25,
        squares=[(0, 0, 1792, 1344)],
        compression="jpeg",
    )
    return wsi.tile_slide(planted.path, tmp_path / "stores").store


def test_features_are_row_aligned_with_coords_and_describe_themselves(store: Path) -> None:
    path = mil.embed(store, "pathomics", batch_size=5)
    feats, coords, attrs = mil.read_features(store, "pathomics")
    g = zarr.open_group(store, mode="r")
    assert feats.shape == (g["patches"].shape[0], mil.encoder_config("pathomics").dim)
    np.testing.assert_array_equal(coords, g["coords"][:])
    for i in (0, 7, len(feats) - 1):  # each row is the features of that tile, computed alone
        np.testing.assert_allclose(
            feats[i], pathomics_features(g["patches"][i : i + 1], 0.5)[0], rtol=1e-5, atol=1e-6
        )
    assert attrs.complete and attrs.encoder["name"] == "pathomics"
    assert attrs.dim == feats.shape[1] and attrs.n_tiles == len(feats)
    assert path.name == "pathomics" and not list(path.parent.glob(".*partial*"))


def test_a_second_run_with_the_same_weights_is_skipped(store: Path) -> None:
    calls = []
    mil.embed(store, "pathomics")
    mil.embed(store, "pathomics", progress=calls.append)
    assert calls == []  # nothing recomputed
    mil.embed(store, "pathomics", progress=calls.append, overwrite=True)
    assert sum(calls) == zarr.open_group(store, mode="r")["coords"].shape[0]


def test_tiles_at_the_wrong_resolution_are_refused(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(2048, 1536), mpp=0.25, squares=[(0, 0, 1792, 1344)]
    )
    store = wsi.tile_slide(planted.path, tmp_path / "o", wsi.TilingConfig(target_mpp=1.0)).store
    with pytest.raises(wsi.ParameterError, match=r"target_mpp=0\.5") as err:
        mil.embed(store, "pathomics")
    assert err.value.param == "target_mpp"


def test_an_unfinished_store_is_refused(store: Path) -> None:
    g = zarr.open_group(store, mode="r+")
    attrs = dict(g.attrs["oncotrace"])
    attrs["complete"] = False
    g.attrs["oncotrace"] = attrs
    with pytest.raises(ValueError, match="oncotrace tile"):
        mil.embed(store, "pathomics")


def test_missing_features_name_the_command_to_run(store: Path) -> None:
    with pytest.raises(KeyError, match="oncotrace embed"):
        mil.read_features(store, "uni")


def test_features_written_in_whole_chunks_match_tile_by_tile(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oncotrace.mil._embed as embed_mod  # private: patches embed's FEATURE_CHUNK

    monkeypatch.setattr(embed_mod, "FEATURE_CHUNK", 7)  # batches of 5 straddle chunks of 7
    mil.embed(store, "pathomics", batch_size=5)
    feats, _, _ = mil.read_features(store, "pathomics")
    g = zarr.open_group(store, mode="r")
    assert g["features/pathomics"].chunks == (7, feats.shape[1])
    want = pathomics_features(np.asarray(g["patches"][:]), 0.5)
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


class _GpuEncoderThatFails:
    """The pathomics encoder posing as a GPU one (so embed reads ahead), failing on batch 2."""

    def __init__(self) -> None:
        self.inner = mil.create_encoder("pathomics")
        self.config = self.inner.config
        self.weights_fingerprint = self.inner.weights_fingerprint
        self.device = SimpleNamespace(type="cuda")
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA out of memory")
        return self.inner(tiles)


def test_a_failing_encoder_leaves_no_reader_thread_and_no_features(store: Path) -> None:
    enc = _GpuEncoderThatFails()
    assert zarr.open_group(store, mode="r")["patches"].shape[0] > 6  # more batches than buffered
    with pytest.raises(RuntimeError, match="out of memory"):
        mil.embed(store, enc, batch_size=1)  # type: ignore[arg-type]
    alive = [t for t in threading.enumerate() if t.name == "embed-prefetch" and t.is_alive()]
    assert alive == []  # the read-ahead thread was stopped and joined, not left blocked
    assert wsi.Store.open(store).feature_names() == []
    assert not list((store / "features").glob(".*"))  # no partial array either
