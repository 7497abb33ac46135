"""Encoder registry: every architecture builds with the right dim and preprocessing; weights
load from files the tests write, and a wrong checkpoint is a clear error, never a random model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mil
from mil._encoders import TimmEncoder, WeightsError, build_timm_model
from mil._pathomics import FEATURE_NAMES, pathomics_features
from wsi.synthetic import BACKGROUND, he_texture

GIANT = os.environ.get("ONCOTRACE_TEST_GIANT") == "1"
TIMM_NAMES = [n for n in mil.list_encoders() if n != "pathomics"]


def _tiles(n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([he_texture((224, 224), rng, mpp=0.5) for _ in range(n)])


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_every_registered_architecture_builds_with_its_dim(name: str) -> None:
    cfg = mil.encoder_config(name)
    if cfg.giant and not GIANT:
        pytest.skip(f"{name} has ~1 B parameters; set ONCOTRACE_TEST_GIANT=1 to build it")
    torch.manual_seed(0)
    enc = mil.create_encoder(name, weights="random", precision="fp32")
    assert enc.weights_fingerprint == "random-init"
    feats = enc(_tiles(2))
    assert feats.shape == (2, cfg.dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_preprocessing_applies_the_configured_mean_and_std() -> None:
    cfg = mil.encoder_config("h-optimus-0")
    model = torch.nn.Identity()
    enc = TimmEncoder(cfg, model, "cpu", "fp32", "test")
    tile = np.full((1, 224, 224, 3), (200, 100, 50), np.uint8)
    x = enc.preprocess(tile).numpy()
    expect = (np.array([200, 100, 50]) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(x[0, :, 10, 10], expect, rtol=1e-5)
    # a different input size is resampled to the encoder's
    assert enc.preprocess(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, 3, 224, 224)


def test_weights_from_a_safetensors_file_reproduce_the_source_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    cfg = mil.encoder_config("resnet50-trunc")
    source = build_timm_model(cfg)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors"
    )
    enc = mil.create_encoder("resnet50-trunc", weights=tmp_path, precision="fp32")
    ref = TimmEncoder(cfg, source, "cpu", "fp32", "ref")
    tiles = _tiles(2)
    np.testing.assert_allclose(enc(tiles), ref(tiles), rtol=1e-4, atol=1e-5)
    assert enc.weights_fingerprint.startswith("sha256:")


def test_a_full_resnet_checkpoint_loads_into_the_truncated_trunk(tmp_path: Path) -> None:
    import timm

    full = timm.create_model("resnet50", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")
    enc = mil.create_encoder("resnet50-trunc", weights=tmp_path / "resnet50.pth", precision="fp32")
    assert enc(_tiles(1)).shape == (1, 1024)


def test_a_mismatched_checkpoint_names_missing_keys_and_shapes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = build_timm_model(mil.encoder_config("resnet50-trunc")).state_dict()
    sd = {k: v.contiguous() for k, v in sd.items()}
    sd.pop("conv1.weight")
    sd["bn1.weight"] = torch.zeros(7)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        mil.create_encoder("resnet50-trunc", weights=tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert (
        "conv1.weight" in msg and "bn1.weight: expected (64,), found (7,)" in msg and "Fix:" in msg
    )


def test_no_weights_and_no_hub_is_an_error_not_a_random_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--weights"):
        mil.create_encoder("resnet50-trunc")


def test_bf16_autocast_features_match_fp32() -> None:
    torch.manual_seed(2)
    cfg = mil.encoder_config("resnet50-trunc")
    model = build_timm_model(cfg)
    tiles = _tiles(2)
    a = TimmEncoder(cfg, model, "cpu", "fp32", "x")(tiles)
    b = TimmEncoder(cfg, model, "cpu", "bf16", "x")(tiles)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (cos > 0.99).all()


def test_pathomics_features_follow_planted_nuclei() -> None:
    """More, larger and darker nuclei must move the nucleus features the right way."""
    rng = np.random.default_rng(3)
    glass = np.full((1, 224, 224, 3), BACKGROUND, np.uint8)
    sparse = he_texture((224, 224), rng, mpp=0.5)[None]
    dense = sparse.copy()
    yy, xx = np.mgrid[:224, :224]
    for cy, cx in rng.integers(10, 214, (40, 2)):
        dense[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = (70, 30, 110)  # 12 µm dark nuclei
    f = pathomics_features(np.concatenate([glass, sparse, dense]), 0.5)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    assert f[0, col["nuc_count_per_mm2"]] == 0 and f[0, col["bright_fraction"]] > 0.9
    assert f[2, col["nuc_area_fraction"]] > f[1, col["nuc_area_fraction"]]
    assert f[2, col["nuc_area_mean_um2"]] > f[1, col["nuc_area_mean_um2"]]
    assert f[2, col["h_mean"]] > f[1, col["h_mean"]]
    # batching does not change a tile's features
    np.testing.assert_allclose(pathomics_features(dense, 0.5)[0], f[2], rtol=1e-5, atol=1e-6)
    enc = mil.create_encoder("pathomics", threads=2)
    np.testing.assert_allclose(
        enc(np.concatenate([glass, sparse, dense] * 3)), np.tile(f, (3, 1)), rtol=1e-5, atol=1e-6
    )
