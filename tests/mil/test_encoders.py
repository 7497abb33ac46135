"""Encoder registry: every architecture builds with the right dim and preprocessing; weights
load from files the tests write, and a wrong checkpoint is a clear error, never a random model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from oncotrace import mil
from oncotrace.mil import (
    FEATURE_NAMES,
    TimmEncoder,
    WeightsError,
    build_timm_model,
    pathomics_features,
)
from oncotrace.wsi.synthetic import BACKGROUND, he_texture

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
    with pytest.raises(WeightsError, match="weights=PATH") as err:
        mil.create_encoder("resnet50-trunc")
    assert err.value.param == "weights"


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


# -- Phikon-v2: a transformers Dinov2Model checkpoint loaded into timm ---------------------------
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_phikon_v2_recipe_is_the_published_vit_l16() -> None:
    cfg = mil.encoder_config("phikon-v2")
    assert (cfg.dim, cfg.input_px, cfg.output, cfg.reg_tokens) == (1024, 224, "cls", 0)
    assert (cfg.mean, cfg.std) == IMAGENET and cfg.hub_id == "owkin/phikon-v2"
    assert "non-commercial" in cfg.licence and "owkin/phikon-v2" in cfg.notes
    with torch.device("meta"):  # shapes only: no 300 M random numbers drawn
        model = build_timm_model(cfg)
    assert len(model.blocks) == 24 and model.embed_dim == 1024
    assert model.blocks[0].attn.num_heads == 16 and model.blocks[0].mlp.fc1.out_features == 4096
    assert tuple(model.patch_embed.proj.weight.shape) == (1024, 3, 16, 16)
    assert tuple(model.pos_embed.shape) == (1, 14 * 14 + 1, 1024)  # CLS + 14x14, no registers
    assert tuple(model.blocks[23].ls2.gamma.shape) == (1024,)  # layer scale present


def test_phikon_v2_preprocessing_is_imagenet() -> None:
    enc = TimmEncoder(mil.encoder_config("phikon-v2"), torch.nn.Identity(), "cpu", "fp32", "t")
    x = enc.preprocess(np.full((1, 224, 224, 3), (30, 140, 250), np.uint8)).numpy()
    expect = (np.array([30, 140, 250]) / 255.0 - np.array(IMAGENET[0])) / np.array(IMAGENET[1])
    np.testing.assert_allclose(x[0, :, 100, 5], expect, rtol=1e-5)


TINY = "phikon-v2-tiny-test"
TINY_DEPTH, TINY_DIM = 2, 64


@pytest.fixture
def tiny_phikon() -> Iterator[mil.EncoderConfig]:
    """Phikon-v2's recipe and loading path at 2 layers x 64 wide, registered for one test."""
    import dataclasses

    cfg = mil.encoder_config("phikon-v2")
    kw = {**cfg.timm_kwargs, "embed_dim": TINY_DIM, "depth": TINY_DEPTH, "num_heads": 4}
    tiny = dataclasses.replace(cfg, name=TINY, dim=TINY_DIM, timm_kwargs=kw)
    mil.register_encoder(tiny)(mil.ENCODERS.get("phikon-v2")[1])
    yield tiny
    mil.ENCODERS.remove(TINY)


def _random_reference(cfg: mil.EncoderConfig, seed: int = 5) -> torch.nn.Module:
    """A timm model whose every tensor matters (timm starts biases at 0 and layer scale at 1e-5)."""
    torch.manual_seed(seed)
    model = build_timm_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight"))
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_scale else 0.0))
    return model.eval()


def _as_transformers_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse mapping, written out by hand from transformers' Dinov2Model names."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    d = sd["cls_token"].shape[-1]
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, d),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(TINY_DEPTH):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        qw, kw, vw = (
            sd[b + "attn.qkv.weight"][:d],
            sd[b + "attn.qkv.weight"][d : 2 * d],
            sd[b + "attn.qkv.weight"][2 * d :],
        )
        qb, kb, vb = (
            sd[b + "attn.qkv.bias"][:d],
            sd[b + "attn.qkv.bias"][d : 2 * d],
            sd[b + "attn.qkv.bias"][2 * d :],
        )
        hf |= {
            L + "norm1.weight": sd[b + "norm1.weight"],
            L + "norm1.bias": sd[b + "norm1.bias"],
            L + "attention.attention.query.weight": qw.contiguous(),
            L + "attention.attention.query.bias": qb.contiguous(),
            L + "attention.attention.key.weight": kw.contiguous(),
            L + "attention.attention.key.bias": kb.contiguous(),
            L + "attention.attention.value.weight": vw.contiguous(),
            L + "attention.attention.value.bias": vb.contiguous(),
            L + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
            L + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
            L + "layer_scale1.lambda1": sd[b + "ls1.gamma"],
            L + "norm2.weight": sd[b + "norm2.weight"],
            L + "norm2.bias": sd[b + "norm2.bias"],
            L + "mlp.fc1.weight": sd[b + "mlp.fc1.weight"],
            L + "mlp.fc1.bias": sd[b + "mlp.fc1.bias"],
            L + "mlp.fc2.weight": sd[b + "mlp.fc2.weight"],
            L + "mlp.fc2.bias": sd[b + "mlp.fc2.bias"],
            L + "layer_scale2.lambda1": sd[b + "ls2.gamma"],
        }
    return hf


@pytest.mark.parametrize("prefix", ["", "dinov2."])
def test_a_transformers_dinov2_checkpoint_reproduces_the_timm_model(
    tiny_phikon: mil.EncoderConfig, tmp_path: Path, prefix: str
) -> None:
    from safetensors.torch import save_file

    ref = _random_reference(tiny_phikon)
    hf = _as_transformers_dinov2(ref)
    assert len(hf) == 7 + 18 * TINY_DEPTH
    save_file({prefix + k: v for k, v in hf.items()}, tmp_path / "model.safetensors")
    enc = mil.create_encoder(TINY, weights=tmp_path, precision="fp32")
    tiles = _tiles(2)
    expect = TimmEncoder(tiny_phikon, ref, "cpu", "fp32", "ref")(tiles)
    got = enc(tiles)
    assert got.shape == (2, TINY_DIM)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)

    # the comparison can fail: query and key swapped in one block changes the features
    swapped = dict(hf)
    q, k = (
        "encoder.layer.1.attention.attention.query.weight",
        "encoder.layer.1.attention.attention.key.weight",
    )
    swapped[q], swapped[k] = hf[k], hf[q]
    save_file(swapped, tmp_path / "swapped.safetensors")
    bad = mil.create_encoder(TINY, weights=tmp_path / "swapped.safetensors", precision="fp32")
    assert np.abs(bad(tiles) - expect).max() > 1e-3


def test_position_embeddings_of_another_grid_are_resampled_bicubically(
    tiny_phikon: mil.EncoderConfig, tmp_path: Path
) -> None:
    """A 518-px style 37x37 grid becomes 14x14 as transformers interpolates it for 224 px."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    hf = _as_transformers_dinov2(_random_reference(tiny_phikon))
    torch.manual_seed(9)
    big = torch.randn(1, 1 + 37 * 37, TINY_DIM)
    hf["embeddings.position_embeddings"] = big
    save_file(hf, tmp_path / "model.safetensors")
    enc = mil.create_encoder(TINY, weights=tmp_path, precision="fp32")
    pos = enc.model.pos_embed.detach()  # type: ignore[attr-defined]
    grid = big[0, 1:].T.reshape(1, TINY_DIM, 37, 37)
    want = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert tuple(pos.shape) == (1, 197, TINY_DIM)
    torch.testing.assert_close(pos[0, 0], big[0, 0])
    torch.testing.assert_close(pos[0, 1:], want[0].reshape(TINY_DIM, 196).T)


def test_a_wrong_transformers_checkpoint_lists_expected_and_found(
    tiny_phikon: mil.EncoderConfig, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    hf = _as_transformers_dinov2(_random_reference(tiny_phikon))
    hf.pop("encoder.layer.1.attention.attention.key.bias")
    hf["encoder.layer.0.mlp.fc1.weight"] = torch.zeros(100, TINY_DIM)
    save_file(hf, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        mil.create_encoder(TINY, weights=tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "Fix:" in msg
    assert "encoder.layer.1.attention.attention.key.bias" in msg
    assert (
        f"encoder.layer.0.mlp.fc1.weight: expected ({4 * TINY_DIM}, {TINY_DIM}), found (100, {TINY_DIM})"
        in msg
    )

    hf = _as_transformers_dinov2(_random_reference(tiny_phikon))
    hf["embeddings.position_embeddings"] = torch.zeros(1, 150, TINY_DIM)  # 149 is no square
    save_file(hf, tmp_path / "pos.safetensors")
    with pytest.raises(WeightsError, match=r"position_embeddings: expected .*found \(1, 150, 64\)"):
        mil.create_encoder(TINY, weights=tmp_path / "pos.safetensors")
