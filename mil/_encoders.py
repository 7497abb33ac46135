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
from oncotrace.wsi import Registry

from ._pathomics import FEATURE_NAMES, pathomics_features
from ._state import state_dict_mismatch

Output = Literal["features", "pool", "cls", "cls+mean"]
#: How a published checkpoint names its tensors: timm's own names, or transformers' Dinov2Model.
CheckpointFormat = Literal["timm", "dinov2-hf"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not match the architecture.

    ``param`` is ``"weights"``: the parameter (CLI ``--weights``) to change.
    """

    param = "weights"


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
    checkpoint_format: CheckpointFormat = "timm"
    notes: str = ""  # where the recipe's facts come from

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


ENCODERS: Registry[tuple[EncoderConfig, Callable[..., Encoder]]] = Registry("encoder")
"""Every encoder by name: ``(config, factory)``; :func:`register_encoder` adds to it."""


def register_encoder(
    config: EncoderConfig,
) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator registering a factory ``f(config, **kw) -> Encoder`` under ``config.name``."""

    def deco(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if config.name in ENCODERS:
            raise ValueError(f"encoder {config.name!r} is registered twice")
        ENCODERS.add(config.name, (config, factory))
        return factory

    return deco


def list_encoders(*, include_giant: bool = True) -> list[str]:
    return [n for n in ENCODERS.names() if include_giant or not ENCODERS.get(n)[0].giant]


def encoder_config(name: str) -> EncoderConfig:
    """The configuration of a registered encoder; an unknown name lists the choices."""
    return ENCODERS.get(name)[0]


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
    factory = ENCODERS.get(name)[1]
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
        raise WeightsError("the pathomics encoder has no weights; drop weights=")
    return PathomicsEncoder(cfg, threads)


# -- timm models ------------------------------------------------------------------------------
def _swiglu() -> dict[str, Any]:
    import timm.layers
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


#: ViT-L/16 at 224 px with layer scale (UNI, Phikon-v2); any init value creates the layer-scale
#: parameters, which the checkpoint replaces
_VIT_L16_LAYERSCALE: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
}

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
        timm_kwargs={**_VIT_L16_LAYERSCALE, "dynamic_img_size": True},
        output="cls",
        hub_id="MahmoodLab/UNI",
        licence="CC-BY-NC-ND-4.0 (gated; academic research only)",
    ),
    EncoderConfig(
        name="phikon-v2",
        dim=1024,
        arch="vit_large_patch16_224",
        timm_kwargs={**_VIT_L16_LAYERSCALE, "dynamic_img_size": False},
        output="cls",
        hub_id="owkin/phikon-v2",
        licence="Owkin non-commercial licence (LICENSE.pdf on the hub page; not gated)",
        checkpoint_format="dinov2-hf",
        notes=(
            "ViT-L/16 trained with DINOv2 on PANCAN-XL at 20x (0.5 um/px); CLS token of the"
            " final layernorm, 1024-d; 224 px; ImageNet mean/std; no register tokens."
            " Sources: huggingface.co/owkin/phikon-v2 model card ('ViT-L/16 via DINOv2', CLS"
            " token, licence link to LICENSE.pdf, files config.json + model.safetensors,"
            " Transformers/dinov2 tags); arXiv:2409.09173 (ViT-L, DINOv2); TRIDENT"
            " Phikonv2InferenceEncoder (1024-d CLS, Resize/CenterCrop 224, ImageNet mean/std)."
            " Weights are the transformers Dinov2Model checkpoint, remapped to timm names at"
            " load (see _dinov2_hf_to_timm)."
        ),
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
            f"{path}: no weights file found (looked for model.safetensors, pytorch_model.bin, …; found {found}). Fix: point weights= at the checkpoint file."
        )
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist. Fix: check the weights= path.")
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
        sd = _adapt_keys(cfg, read_state_dict(path), model, str(path))
        load_weights_strict(model, sd, str(path))
        fingerprint = _fingerprint(path)
    dev, prec = _resolve_device(device, precision)
    return TimmEncoder(cfg, model, dev, prec, fingerprint)


def _adapt_keys(
    cfg: EncoderConfig, sd: dict[str, Any], model: Any, source: str = "checkpoint"
) -> dict[str, Any]:
    """Bring a published checkpoint's names onto ``model``: transformers DINOv2 → timm ViT, or a
    full timm ResNet50 → the layer-3 truncated feature extractor."""
    if cfg.checkpoint_format == "dinov2-hf":
        return _dinov2_hf_to_timm(cfg, sd, model, source)
    if cfg.output != "pool":
        return sd
    own = model.state_dict()
    # features_only wraps modules 1:1 by name; drop what the truncation removed (layer4, fc)
    return {
        k: v
        for k, v in sd.items()
        if k in own or not (k.startswith("layer4.") or k.startswith("fc."))
    }


# -- transformers Dinov2Model checkpoints (Phikon-v2) -----------------------------------------
# Per-block tensors that only change their name; q/k/v are fused separately.
_DINOV2_BLOCK_RENAMES = (
    ("norm1.weight", "norm1.weight"),
    ("norm1.bias", "norm1.bias"),
    ("attention.output.dense.weight", "attn.proj.weight"),
    ("attention.output.dense.bias", "attn.proj.bias"),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("norm2.weight", "norm2.weight"),
    ("norm2.bias", "norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
    ("layer_scale2.lambda1", "ls2.gamma"),
)
_DINOV2_TOP_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
)
_DINOV2_POS = "embeddings.position_embeddings"


def _dinov2_hf_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a transformers Dinov2Model checkpoint for ``model`` holds
    (without the position embeddings, whose grid may differ, and the unused mask token)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d = own["cls_token"][-1]
    shapes = {hf: own[timm_name] for hf, timm_name in _DINOV2_TOP_RENAMES}
    for i in range(len(model.blocks)):
        pre = f"encoder.layer.{i}."
        for hf, timm_name in _DINOV2_BLOCK_RENAMES:
            shapes[pre + hf] = own[f"blocks.{i}.{timm_name}"]
        for part in ("query", "key", "value"):
            shapes[f"{pre}attention.attention.{part}.weight"] = (d, d)
            shapes[f"{pre}attention.attention.{part}.bias"] = (d,)
    return shapes


class _Shape:
    """Stands in for a tensor where only its shape is compared."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _resample_pos_embed(pos: Any, grid: int) -> Any:
    """(1, 1 + g*g, D) position embeddings → (1, 1 + grid*grid, D), CLS entry kept.

    Bicubic, ``align_corners=False``, no antialiasing, in float32: what transformers'
    ``Dinov2Embeddings.interpolate_pos_encoding`` computes at every forward pass for an input
    of ``grid`` patches a side, so doing it once at load gives the same features at 224 px.
    """
    import torch
    import torch.nn.functional as F

    d = pos.shape[-1]
    g = round((pos.shape[1] - 1) ** 0.5)
    patch = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)
    return torch.cat([pos[:, :1], patch], dim=1)


def _dinov2_hf_to_timm(
    cfg: EncoderConfig, sd: dict[str, Any], model: Any, source: str
) -> dict[str, Any]:
    """Rename a transformers ``Dinov2Model`` state dict to timm ``VisionTransformer`` names.

    q/k/v projections are stacked into timm's fused ``qkv`` (rows q, k, v), ``layer_scaleN.lambda1``
    becomes ``lsN.gamma``, the final ``layernorm`` becomes ``norm``, and the ``mask_token`` (used
    only in masked-image pretraining) is dropped. Position embeddings for another square grid
    than the model's (e.g. 37x37 from a 518 px config) are resampled once to the model's grid,
    as transformers itself does on the fly (:func:`_resample_pos_embed`). A checkpoint already in
    timm names is passed through for the strict load to judge.
    """
    import torch

    if sd and all(k.startswith("dinov2.") for k in sd):  # a *ForImageClassification checkpoint
        sd = {k[len("dinov2.") :]: v for k, v in sd.items()}
    if not any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        return sd
    expected = _dinov2_hf_shapes(model)
    found = {k: v for k, v in sd.items() if k not in (_DINOV2_POS, "embeddings.mask_token")}
    problem = state_dict_mismatch({k: _Shape(v) for k, v in expected.items()}, found)
    own_pos = tuple(model.pos_embed.shape)
    pos = sd.get(_DINOV2_POS)
    side = round(((pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else 0) ** 0.5)
    pos_ok = (
        pos is not None
        and pos.ndim == 3
        and pos.shape[0] == 1
        and pos.shape[2] == own_pos[2]
        and side * side + 1 == pos.shape[1]
    )
    if not pos_ok:
        what = "missing" if pos is None else f"found {tuple(pos.shape)}"
        pos_problem = (
            f"{_DINOV2_POS}: expected (1, 1 + n*n, {own_pos[2]}) (n*n patches on a square grid"
            f" plus CLS; {own_pos} at {cfg.input_px} px), {what}"
        )
        problem = f"{problem}; {pos_problem}" if problem else pos_problem
    if problem:
        raise WeightsError(
            f"{source}: the transformers DINOv2 checkpoint does not match encoder {cfg.name!r}"
            f" ({len(model.blocks)} layers, width {own_pos[2]}): {problem}."
            f" Fix: use the checkpoint published as {cfg.hub_id} (model.safetensors), or pick the"
            " encoder it belongs to."
        )
    out = {timm_name: sd[hf] for hf, timm_name in _DINOV2_TOP_RENAMES}
    pos = sd[_DINOV2_POS]
    grid = round((own_pos[1] - 1) ** 0.5)
    out["pos_embed"] = pos if pos.shape[1] == own_pos[1] else _resample_pos_embed(pos, grid)
    for i in range(len(model.blocks)):
        pre = f"encoder.layer.{i}."
        for hf, timm_name in _DINOV2_BLOCK_RENAMES:
            out[f"blocks.{i}.{timm_name}"] = sd[pre + hf]
        for kind in ("weight", "bias"):
            qkv = [sd[f"{pre}attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
    return out


def _load_from_hub(cfg: EncoderConfig, model: Any) -> str:
    if not cfg.hub_id:
        raise WeightsError(
            f"encoder {cfg.name!r} has no published weights. Fix: pass weights=PATH."
        )
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(cfg.hub_id, "model.safetensors"))
    except Exception as exc:
        raise WeightsError(
            f"encoder {cfg.name!r}: weights were not given and the hub ({cfg.hub_id}) could not be"
            f" reached ({type(exc).__name__}). Fix: download the checkpoint where you have access"
            f" and pass weights=PATH (licence: {cfg.licence})."
        ) from exc
    source = f"{cfg.hub_id}/model.safetensors"
    load_weights_strict(model, _adapt_keys(cfg, read_state_dict(path), model, source), source)
    return _fingerprint(path)


for _cfg in TIMM_ENCODERS:
    register_encoder(_cfg)(_make_timm)
