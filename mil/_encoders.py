"""Patch encoders: a registry of named, self-describing feature extractors.

Every entry carries its own frozen :class:`EncoderConfig` (architecture, output, input size,
normalisation, native resolution, weights source, licence). Encoders with published weights
load them from a local file/directory or, when online, from the hub; they are never silently
random — random weights must be asked for with ``weights="random"`` (tests do).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from ._pathomics import FEATURE_NAMES, pathomics_features
from ._state import state_dict_mismatch

Output = Literal["features", "pool", "cls", "cls+mean"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not match the architecture."""


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to build an encoder and to interpret its features."""

    name: str
    dim: int
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float = 0.5
    arch: str | None = None  # timm architecture; None for weight-free encoders
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    output: Output = "pool"
    reg_tokens: int = 0
    hub_id: str | None = None
    licence: str = ""
    giant: bool = False  # >= ~1 B parameters: tests build it only on request

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timm_kwargs"] = {k: _describe(v) for k, v in self.timm_kwargs.items()}
        return d


def _describe(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return f"{getattr(v, '__module__', '')}.{getattr(v, '__name__', repr(v))}"


class Encoder(Protocol):
    config: EncoderConfig
    weights_fingerprint: str

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 tiles → (B, dim) float32 features."""
        ...


_REGISTRY: dict[str, tuple[EncoderConfig, Callable[..., Encoder]]] = {}


def register_encoder(
    config: EncoderConfig,
) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator registering a factory ``f(config, **kw) -> Encoder`` under ``config.name``."""

    def deco(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if config.name in _REGISTRY:
            raise ValueError(f"encoder {config.name!r} is registered twice")
        _REGISTRY[config.name] = (config, factory)
        return factory

    return deco


def list_encoders(*, include_giant: bool = True) -> list[str]:
    return sorted(n for n, (c, _) in _REGISTRY.items() if include_giant or not c.giant)


def encoder_config(name: str) -> EncoderConfig:
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; choose one of {list_encoders()}")
    return _REGISTRY[name][0]


def create_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
) -> Encoder:
    """Build a registered encoder.

    Parameters
    ----------
    name : a name from :func:`list_encoders`.
    weights : a local ``.safetensors`` / torch checkpoint file or a directory holding one;
        ``None`` loads the published weights from the hub (needs network); ``"random"`` builds
        random weights on purpose (tests, smoke runs) and says so in the fingerprint.
    device : ``"auto"`` picks CUDA when present.
    precision : ``"auto"`` is bf16 (CUDA if supported, else fp16) on GPU and bf16 autocast on
        CPU; features are always returned as float32.
    """
    cfg = encoder_config(name)
    factory = _REGISTRY[name][1]
    return factory(cfg, weights=weights, device=device, precision=precision, threads=threads)


# -- pathomics ------------------------------------------------------------------------------
PATHOMICS = EncoderConfig(
    name="pathomics",
    dim=len(FEATURE_NAMES),
    input_px=224,
    native_mpp=0.5,
    output="features",
    licence="Apache-2.0 (part of OncoTrace; no weights)",
)


class PathomicsEncoder:
    """Hand-crafted features (:mod:`mil._pathomics`), batch split over ``threads`` threads."""

    def __init__(self, config: EncoderConfig, threads: int | None = None) -> None:
        self.config = config
        self.weights_fingerprint = "none"
        self.threads = max(1, threads or min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        mpp = self.config.native_mpp
        if self._pool is None or len(tiles) < 2 * self.threads:
            return pathomics_features(tiles, mpp)
        parts = np.array_split(tiles, self.threads)
        return np.concatenate(list(self._pool.map(lambda t: pathomics_features(t, mpp), parts)))


@register_encoder(PATHOMICS)
def _make_pathomics(
    cfg: EncoderConfig, *, weights: Any = None, threads: int | None = None, **_: Any
) -> Encoder:
    if weights not in (None, "random"):
        raise WeightsError("the pathomics encoder has no weights; drop --weights")
    return PathomicsEncoder(cfg, threads)


# -- timm models ------------------------------------------------------------------------------
def _swiglu() -> dict[str, Any]:
    import timm.layers
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


TIMM_ENCODERS: tuple[EncoderConfig, ...] = (
    EncoderConfig(
        name="resnet50-trunc",
        dim=1024,
        arch="resnet50",
        output="pool",
        hub_id="timm/resnet50.tv_in1k",
        licence="BSD-3 (torchvision ImageNet weights)",
        native_mpp=0.5,
    ),
    EncoderConfig(
        name="uni",
        dim=1024,
        arch="vit_large_patch16_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        output="cls",
        hub_id="MahmoodLab/UNI",
        licence="CC-BY-NC-ND-4.0 (gated; academic research only)",
    ),
    EncoderConfig(
        name="uni2-h",
        dim=1536,
        arch="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            "swiglu": True,
        },
        output="cls",
        reg_tokens=8,
        hub_id="MahmoodLab/UNI2-h",
        licence="CC-BY-NC-ND-4.0 (gated; academic research only)",
    ),
    EncoderConfig(
        name="virchow2",
        dim=2560,
        arch="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "reg_tokens": 4,
            "swiglu": True,
        },
        output="cls+mean",
        reg_tokens=4,
        hub_id="paige-ai/Virchow2",
        licence="CC-BY-NC-ND-4.0 (gated; non-commercial)",
    ),
    EncoderConfig(
        name="prov-gigapath",
        dim=1536,
        arch="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        output="cls",
        hub_id="prov-gigapath/prov-gigapath",
        licence="Apache-2.0 (gated)",
        giant=True,
    ),
    EncoderConfig(
        name="h-optimus-0",
        dim=1536,
        arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "dynamic_img_size": False,
            "num_classes": 0,
        },
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        output="cls",
        reg_tokens=4,
        hub_id="bioptimus/H-optimus-0",
        licence="Apache-2.0",
        giant=True,
    ),
)


class TimmEncoder:
    """A timm backbone with the preprocessing and output of its published recipe."""

    def __init__(
        self, cfg: EncoderConfig, model: Any, device: str, precision: str, fingerprint: str
    ) -> None:
        import torch

        self.config = cfg
        self.weights_fingerprint = fingerprint
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.eval().to(self.device)
        if self.device.type == "cpu" or (cfg.arch and cfg.arch.startswith("resnet")):
            self.model = self.model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def preprocess(self, tiles: np.ndarray) -> Any:
        """(B, H, W, 3) uint8 → normalised (B, 3, S, S) float32 tensor at ``input_px``."""
        import torch
        import torch.nn.functional as F

        x = (
            torch.from_numpy(np.ascontiguousarray(tiles))
            .to(self.device)
            .permute(0, 3, 1, 2)
            .float()
        )
        s = self.config.input_px
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: Any) -> Any:
        import torch

        cfg = self.config
        if cfg.output == "pool":  # resnet50 truncated after layer 3, average pooled
            feats = self.model(x)[-1]
            return feats.mean(dim=(2, 3))
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if cfg.output == "cls":
            return cls
        patch = tokens[:, 1 + cfg.reg_tokens :]
        return torch.cat([cls, patch.mean(1)], dim=-1)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        x = self.preprocess(tiles)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode():
            if dtype is None:
                out = self.forward_features(x)
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    out = self.forward_features(x)
        return out.float().cpu().numpy()


def _resolve_device(device: Device, precision: Precision) -> tuple[str, str]:
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if precision != "auto":
        return dev, precision
    if dev == "cuda":
        return dev, "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return dev, "bf16"  # CPU autocast: ~2.5x for ResNet50 here, features within cosine 0.9999


def build_timm_model(cfg: EncoderConfig) -> Any:
    """The architecture of ``cfg`` with random weights."""
    import timm

    if cfg.arch is None:
        raise ValueError(f"encoder {cfg.name!r} has no timm architecture")
    kwargs = dict(cfg.timm_kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(_swiglu())
    if cfg.output == "pool":
        return timm.create_model(
            cfg.arch, pretrained=False, features_only=True, out_indices=(3,), **kwargs
        )
    return timm.create_model(cfg.arch, pretrained=False, **kwargs)


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from a .safetensors file, a torch checkpoint (weights_only), or a folder."""
    import torch

    if path.is_dir():
        for candidate in (
            "model.safetensors",
            "pytorch_model.bin",
            "pytorch_model.pth",
            "checkpoint.pth",
        ):
            if (path / candidate).is_file():
                return read_state_dict(path / candidate)
        found = sorted(p.name for p in path.iterdir())[:10]
        raise WeightsError(
            f"{path}: no weights file found (looked for model.safetensors, pytorch_model.bin, …; found {found}). Fix: point --weights at the checkpoint file."
        )
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist. Fix: check the --weights path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). Fix: use a .safetensors file or a plain state-dict checkpoint."
        ) from exc
    for key in ("state_dict", "model", "teacher"):
        inner = sd.get(key) if isinstance(sd, dict) else None
        if isinstance(inner, dict):
            sd = inner
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: the checkpoint holds {type(sd).__name__}, not a state dict.")
    for prefix in ("module.", "model.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_weights_strict(model: Any, sd: Mapping[str, Any], source: str) -> None:
    """Load ``sd`` into ``model``; any missing/unexpected key or shape mismatch is an error."""
    problem = state_dict_mismatch(model.state_dict(), sd)
    if problem:
        raise WeightsError(
            f"{source}: the checkpoint does not match the architecture: {problem}."
            " Fix: use the checkpoint published for this encoder, or pick the encoder it belongs to."
        )
    model.load_state_dict(dict(sd), strict=True)


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    target = path
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pth")
        )
        target = files[0] if files else path
    if target.is_file():
        with open(target, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return f"sha256:{h.hexdigest()[:16]}"
    return "unknown"


def _make_timm(
    cfg: EncoderConfig, *, weights: Any, device: Device, precision: Precision, threads: int | None
) -> Encoder:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build_timm_model(cfg)
    if weights == "random":
        fingerprint = "random-init"
    elif weights is None:
        fingerprint = _load_from_hub(cfg, model)
    else:
        path = Path(weights)
        target = model
        load_weights_strict(target, _adapt_keys(cfg, read_state_dict(path), target), str(path))
        fingerprint = _fingerprint(path)
    dev, prec = _resolve_device(device, precision)
    return TimmEncoder(cfg, model, dev, prec, fingerprint)


def _adapt_keys(cfg: EncoderConfig, sd: dict[str, Any], model: Any) -> dict[str, Any]:
    """Map a full timm ResNet50 checkpoint onto the layer-3 truncated feature extractor."""
    if cfg.output != "pool":
        return sd
    own = model.state_dict()
    # features_only wraps modules 1:1 by name; drop what the truncation removed (layer4, fc)
    return {
        k: v
        for k, v in sd.items()
        if k in own or not (k.startswith("layer4.") or k.startswith("fc."))
    }


def _load_from_hub(cfg: EncoderConfig, model: Any) -> str:
    if not cfg.hub_id:
        raise WeightsError(
            f"encoder {cfg.name!r} has no published weights. Fix: pass --weights PATH."
        )
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(cfg.hub_id, "model.safetensors"))
    except Exception as exc:
        raise WeightsError(
            f"encoder {cfg.name!r}: weights were not given and the hub ({cfg.hub_id}) could not be"
            f" reached ({type(exc).__name__}). Fix: download the checkpoint where you have access"
            f" and pass --weights PATH (licence: {cfg.licence})."
        ) from exc
    load_weights_strict(
        model, _adapt_keys(cfg, read_state_dict(path), model), f"{cfg.hub_id}/model.safetensors"
    )
    return _fingerprint(path)


for _cfg in TIMM_ENCODERS:
    register_encoder(_cfg)(_make_timm)
