"""Attention-MIL heads: pool a bag of instance features into per-task slide/case predictions.

A *head* turns one case — a bag of ``N`` instance feature vectors, or several bags of different
modalities — into logits for one or more classification tasks. Heads are picked by name from a
registry (:func:`list_heads`, :func:`create_head`) and carry their own :class:`HeadConfig`, so a
trained head is saved as ``model.safetensors`` + ``model.json`` and rebuilt by :func:`load_head`.

Architecture (every registered head shares it; only the pooling differs)::

    per modality m:   x_m (N_m, D_m) --Linear-ReLU-Dropout--> h_m (N_m, hidden)   # shared by tasks
    per task t, m:    pool_{t,m}(h_m) --> z_{t,m} (P, hidden), attention (P, N_m)
    per task t:       fuse_m z_{t,m} (concat or attention) ++ covariates --> classifier_t --> (C_t,)

``P`` is the number of attention branches: 1, or ``C_t`` for multi-branch heads (``clam-mb``),
whose class ``c`` logit is read from the ``c``-th branch only. Every task has its own attention
branch and classifier on top of one shared instance encoder, as in TOAD (Lu et al., 2021).

Registered heads
----------------
``abmil``        attention pooling, ``a_i ∝ exp(wᵀ tanh(V h_i))`` (Ilse et al., 2018).
``abmil-gated``  gated attention, ``a_i ∝ exp(wᵀ (tanh(V h_i) ⊙ σ(U h_i)))`` (Ilse et al., 2018).
``clam-sb``      gated attention + an instance-level clustering loss on the ``k`` most and least
                 attended instances (idea of Lu et al., 2021, CLAM), one attention branch per task.
``clam-mb``      as ``clam-sb`` with one attention branch per class.
``transmil``     a small pre-norm Transformer over the instances with a class token (idea of
                 Shao et al., 2021, TransMIL), plain softmax attention: O(N²) time and memory per
                 layer and head. Fine up to a few thousand instances on CPU; subsample larger bags.
                 There is no positional encoding (TransMIL's PPEG), so it stays permutation
                 invariant.
``mean``, ``max`` pooling baselines without learned attention.

New pooling methods register a :class:`MILPool` subclass with :func:`register_head` and get
multi-task, multi-modal, covariate fusion and save/load for free.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from oncotrace.wsi import Registry
from torch import Tensor, nn

from ._state import read_weights, state_dict_mismatch

__all__ = [
    "HeadConfig",
    "MILHead",
    "MILOutput",
    "MILPool",
    "create_head",
    "list_heads",
    "load_head",
    "register_head",
    "save_head",
]

#: Modality key used internally when ``in_dims`` is a single int (one bag type).
_SINGLE = "bag"
_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "model.json"

Fusion = Literal["concat", "attention"]
LabelValue = int | str | Sequence[int] | Tensor


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to rebuild a head; written to ``model.json`` beside its weights.

    Parameters
    ----------
    name : registered head name, see :func:`list_heads`.
    in_dims : int, or mapping modality -> int
        Instance feature dimension. An int means one bag per case, passed as a ``(N, D)``
        tensor; a mapping (even with one entry) means a dict of bags keyed by modality,
        e.g. ``{"pathology": 1024, "ultrasound": 512}``.
    tasks : mapping task -> sequence of class names
        e.g. ``{"origin": ["lung", "breast", "colon"], "stage": ["NMIBC", "MIBC"]}``.
    covariates : number of clinical covariates (float vector per case) fused after pooling.
    hidden : width of the shared instance encoder and of pooled embeddings.
    dropout : dropout after the instance encoder (and inside ``transmil`` blocks).
    attn_dim : width of the attention networks.
    fusion : ``"concat"`` or ``"attention"``
        How pooled modality embeddings are fused (multi-modal only). ``concat`` zero-fills a
        missing modality and appends one presence flag per modality; ``attention`` takes a
        gated-attention average over the modalities present.
    k_sample : CLAM: instances taken from each end of the attention ranking.
    instance_loss_weight : CLAM: factor applied to the instance loss returned as ``aux_loss``.
    n_layers, n_heads : ``transmil``: Transformer blocks and attention heads.
    """

    name: str
    in_dims: int | Mapping[str, int]
    tasks: Mapping[str, Sequence[str]]
    covariates: int = 0
    hidden: int = 256
    dropout: float = 0.25
    attn_dim: int = 128
    fusion: Fusion = "concat"
    k_sample: int = 8
    instance_loss_weight: float = 0.3
    n_layers: int = 2
    n_heads: int = 4

    def __post_init__(self) -> None:
        # Freeze the mappings so a config cannot change under a built model.
        if isinstance(self.in_dims, Mapping):
            if not self.in_dims:
                raise ValueError("in_dims is an empty mapping; give at least one modality: dim.")
            dims = {str(k): _positive_int(v, f"in_dims[{k!r}]") for k, v in self.in_dims.items()}
            for modality in dims:
                _check_key(modality, "modality")
            object.__setattr__(self, "in_dims", MappingProxyType(dims))
        else:
            object.__setattr__(self, "in_dims", _positive_int(self.in_dims, "in_dims"))
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError(
                "tasks must be a non-empty mapping task -> class names, "
                f"e.g. {{'stage': ['NMIBC', 'MIBC']}}; got {self.tasks!r}."
            )
        tasks: dict[str, tuple[str, ...]] = {}
        for task, classes in self.tasks.items():
            _check_key(str(task), "task")
            if isinstance(classes, str) or not isinstance(classes, Sequence):
                raise ValueError(f"tasks[{task!r}] must be a list of class names, got {classes!r}.")
            names = tuple(str(c) for c in classes)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError(
                    f"tasks[{task!r}] needs at least two distinct class names, got {list(names)}."
                )
            tasks[str(task)] = names
        object.__setattr__(self, "tasks", MappingProxyType(tasks))
        if not isinstance(self.covariates, int) or self.covariates < 0:
            raise ValueError(f"covariates must be an int >= 0, got {self.covariates!r}.")
        for name in ("hidden", "attn_dim", "k_sample", "n_layers", "n_heads"):
            _positive_int(getattr(self, name), name)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.fusion not in ("concat", "attention"):
            raise ValueError(f"fusion must be 'concat' or 'attention', got {self.fusion!r}.")
        if self.instance_loss_weight < 0:
            raise ValueError(
                f"instance_loss_weight must be >= 0, got {self.instance_loss_weight!r}."
            )

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def multimodal(self) -> bool:
        """True when bags are passed as a dict keyed by modality."""
        return isinstance(self.in_dims, Mapping)

    @property
    def modality_dims(self) -> dict[str, int]:
        """Feature dimension per modality (key ``"bag"`` for a single-bag head)."""
        if isinstance(self.in_dims, Mapping):
            return dict(self.in_dims)
        return {_SINGLE: self.in_dims}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "in_dims" and isinstance(value, Mapping):
                value = dict(value)
            elif f.name == "tasks":
                value = {t: list(c) for t, c in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        """Build a config from :meth:`to_dict` output, rejecting unknown or missing keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HeadConfig keys {unknown}; known keys are {sorted(known)}. "
                "Was the file written by a newer OncoTrace?"
            )
        missing = [k for k in ("name", "in_dims", "tasks") if k not in data]
        if missing:
            raise ValueError(f"HeadConfig dict lacks required keys {missing}.")
        return cls(**data)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return value


def _check_key(name: str, what: str) -> None:
    # Names become nn.ModuleDict keys (and state-dict key parts).
    if not name or "." in name:
        raise ValueError(f"{what} name {name!r} must be non-empty and contain no '.'.")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"{what} name {name!r} clashes with a torch.nn.Module attribute; rename it "
            f"(e.g. {name + '_'!r})."
        )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


@dataclass
class MILOutput:
    """What a head returns for one case (or a padded batch: add a leading ``B`` to every shape).

    Attributes
    ----------
    logits : dict task -> (C,) tensor
        Unnormalised class scores, in the order of ``config.tasks[task]``.
    attention : dict task -> (N,) tensor, or dict task -> dict modality -> (N_m,) tensor
        Non-negative weights summing to 1 over the instances of the bag (multi-modal: of each
        modality's bag; a modality absent from the input is absent here). Multi-branch heads
        report the branch of the predicted class. Padded positions are 0.
    aux_loss : () tensor
        Auxiliary loss to add to the task losses (CLAM instance loss, already multiplied by
        ``instance_loss_weight``); 0 for heads without one or when no labels were passed.
    modality_attention : dict task -> (M,) tensor
        Weights over modalities (``fusion="attention"`` only, else empty), in the order of
        ``config.in_dims``; 0 for missing modalities.
    """

    logits: dict[str, Tensor]
    attention: dict[str, Any]
    aux_loss: Tensor
    modality_attention: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Pooling modules and registry
# --------------------------------------------------------------------------------------------


class MILPool(nn.Module):
    """Pooling of one task over one modality's encoded bag. Subclass and :func:`register_head`.

    Parameters
    ----------
    config : the head's configuration.
    n_classes : number of classes of the task this pool serves.

    Subclasses set ``n_branches`` (1, or ``n_classes`` for one branch per class), implement
    :meth:`forward`, and may override :meth:`instance_loss`.
    """

    n_branches: int = 1

    def __init__(self, config: HeadConfig, n_classes: int) -> None:
        super().__init__()
        self.config = config
        self.n_classes = n_classes

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool encoded instances.

        Parameters
        ----------
        h : (B, N, H) float tensor of encoded instances.
        mask : (B, N) bool tensor, True for real (non-padding) instances.

        Returns
        -------
        pooled : (B, P, H) tensor, ``P = n_branches``.
        attention : (B, P, N) tensor, non-negative, summing to 1 over the valid instances.
        """
        raise NotImplementedError

    def instance_loss(
        self, h: Tensor, attention: Tensor, mask: Tensor, labels: Tensor
    ) -> Tensor | None:
        """Auxiliary instance-level loss; ``labels`` is (B,) int64 with -1 for unknown.

        Returns None when the head has no such loss or nothing could be computed.
        """
        return None


HEADS: Registry[type[MILPool]] = Registry("MIL head")
"""Every MIL pooling by name; :func:`register_head` adds to it."""


def register_head(name: str) -> Callable[[type[MILPool]], type[MILPool]]:
    """Class decorator registering a :class:`MILPool` subclass under ``name``.

    Examples
    --------
    >>> @register_head("my-pool")  # doctest: +SKIP
    ... class MyPool(MILPool): ...
    """

    def decorator(cls: type[MILPool]) -> type[MILPool]:
        if not (isinstance(cls, type) and issubclass(cls, MILPool)):
            raise TypeError(f"register_head({name!r}) decorates MILPool subclasses, got {cls!r}.")
        return HEADS.add(name, cls)

    return decorator


def list_heads() -> list[str]:
    """Names accepted by :func:`create_head`, sorted."""
    return HEADS.names()


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis of (B, P, N) ``scores`` restricted to ``mask`` (B, N).

    A row with no valid entry gets all zeros instead of NaN (a missing modality).
    """
    m = mask.unsqueeze(1)
    scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * m


def present_modalities(case: object, modalities: Iterable[str], what: str) -> dict[str, Any]:
    """The modalities a multi-modal case holds (``None`` entries dropped), after checking it.

    ``case`` must be a mapping modality -> (N, D) array or tensor, name only ``modalities`` and
    hold at least one of them; ``what`` names it in the error (``"case 3"``).
    """
    names = sorted(modalities)
    if not isinstance(case, Mapping):
        raise TypeError(
            f"{what} is a {type(case).__name__}; this head is multi-modal ({names}): pass a "
            "dict modality -> (N, D) array per case."
        )
    unknown = sorted(set(case) - set(names))
    if unknown:
        raise ValueError(f"{what}: unknown modalities {unknown}; the head was built for {names}.")
    given = {m: x for m, x in case.items() if x is not None}
    if not given:
        raise ValueError(
            f"{what}: no modality given; pass at least one of {names} (omit or set None only"
            " the missing ones)."
        )
    return given


class _AttentionScores(nn.Module):
    """(B, N, H) -> (B, P, N) attention scores, plain or gated."""

    def __init__(self, hidden: int, attn_dim: int, branches: int, *, gated: bool) -> None:
        super().__init__()
        self.v = nn.Linear(hidden, attn_dim)
        self.u = nn.Linear(hidden, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, branches)

    def forward(self, h: Tensor) -> Tensor:
        a = torch.tanh(self.v(h))
        if self.u is not None:
            a = a * torch.sigmoid(self.u(h))
        return self.w(a).transpose(1, 2)


@register_head("abmil")
class ABMILPool(MILPool):
    """Attention pooling (Ilse et al., 2018): ``z = Σ_i a_i h_i``."""

    gated = False
    multi_branch = False

    def __init__(self, config: HeadConfig, n_classes: int) -> None:
        super().__init__(config, n_classes)
        self.n_branches = n_classes if self.multi_branch else 1
        self.score = _AttentionScores(
            config.hidden, config.attn_dim, self.n_branches, gated=self.gated
        )

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        attention = _masked_softmax(self.score(h), mask)
        return attention @ h, attention


@register_head("abmil-gated")
class GatedABMILPool(ABMILPool):
    """Gated attention pooling (Ilse et al., 2018)."""

    gated = True


class _CLAMPool(ABMILPool):
    """Gated attention + instance clustering loss (idea of CLAM, Lu et al., 2021).

    For a case of class ``y``, the ``k`` instances with the highest attention (in branch ``y``
    for multi-branch) are taught to be "in class y" and the ``k`` lowest "not in class y" by a
    per-class binary instance classifier; the top ``k`` are also taught to be "not in class c"
    for every other class ``c``. The loss trains the shared instance encoder.
    """

    gated = True

    def __init__(self, config: HeadConfig, n_classes: int) -> None:
        super().__init__(config, n_classes)
        # n_classes binary classifiers, computed as one Linear.
        self.instance_classifiers = nn.Linear(config.hidden, 2 * n_classes)

    def instance_loss(
        self, h: Tensor, attention: Tensor, mask: Tensor, labels: Tensor
    ) -> Tensor | None:
        n_valid = mask.sum(dim=1)
        keep = (labels >= 0) & (n_valid >= 2)
        if not bool(keep.any()):
            return None
        h, attention, mask, labels = h[keep], attention[keep], mask[keep], labels[keep]
        b = h.shape[0]
        if self.n_branches > 1:
            a = attention[torch.arange(b, device=h.device), labels]
        else:
            a = attention[:, 0]
        k = min(self.config.k_sample, int(n_valid[keep].min()) // 2)
        top = a.masked_fill(~mask, -math.inf).topk(k, dim=1).indices
        bottom = a.masked_fill(~mask, math.inf).topk(k, dim=1, largest=False).indices
        picked = torch.cat([top, bottom], dim=1)  # (b, 2k)
        h_picked = torch.gather(h, 1, picked.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = self.instance_classifiers(h_picked).view(b, 2 * k, self.n_classes, 2)
        in_class = F.one_hot(labels, self.n_classes).bool()  # (b, C)
        # target 1 only for (top-k, true class); weight 0 for (bottom-k, other class).
        target = torch.zeros(b, 2 * k, self.n_classes, dtype=torch.long, device=h.device)
        target[:, :k] = in_class.unsqueeze(1).long()
        weight = torch.ones(b, 2 * k, self.n_classes, device=h.device)
        weight[:, k:] = in_class.unsqueeze(1).float()
        ce = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), reduction="none")
        return (ce * weight.reshape(-1)).sum() / weight.sum()


@register_head("clam-sb")
class CLAMSinglePool(_CLAMPool):
    """CLAM-style head, one attention branch per task."""


@register_head("clam-mb")
class CLAMMultiPool(_CLAMPool):
    """CLAM-style head, one attention branch (and pooled embedding) per class."""

    multi_branch = True


class _Block(nn.Module):
    """Pre-norm Transformer block that also returns head-averaged attention weights."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        y = self.norm1(x)
        y, weights = self.attn(y, y, y, key_padding_mask=padding, need_weights=True)
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


@register_head("transmil")
class TransMILPool(MILPool):
    """Transformer MIL with a class token (idea of TransMIL, Shao et al., 2021).

    Plain multi-head softmax attention: O(N²·hidden) time and O(N²·n_heads) memory per layer,
    no Nyström approximation and no positional encoding. ``attention`` is the class token's
    attention rollout over all layers (heads averaged), renormalised over the instances
    without the class token itself.
    """

    def __init__(self, config: HeadConfig, n_classes: int) -> None:
        super().__init__(config, n_classes)
        if config.hidden % config.n_heads:
            raise ValueError(
                f"transmil needs hidden ({config.hidden}) divisible by n_heads ({config.n_heads})."
            )
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(config.hidden, config.n_heads, config.dropout) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.hidden)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b = h.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        valid = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        # Attention rollout (Abnar & Zuidema, 2020): the last layer's weights alone ignore what
        # earlier layers mixed into each token; half identity stands for the residual path.
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        rollout = eye.expand(b, -1, -1)
        for block in self.blocks:
            x, weights = block(x, ~valid)
            rollout = (0.5 * weights + 0.5 * eye) @ rollout
        attention = rollout[:, 0, 1:] * mask
        attention = attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return self.norm(x[:, 0]).unsqueeze(1), attention.unsqueeze(1)


@register_head("mean")
class MeanPool(MILPool):
    """Mean of encoded instances; ``attention`` is uniform, ``1/N``."""

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        m = mask.to(h.dtype)
        attention = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        return (attention.unsqueeze(1) @ h), attention.unsqueeze(1)


@register_head("max")
class MaxPool(MILPool):
    """Feature-wise max of encoded instances.

    ``attention[i]`` is the fraction of the ``hidden`` features whose max instance ``i`` is.
    """

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        filled = h.masked_fill(~mask.unsqueeze(-1), -math.inf)
        pooled, argmax = filled.max(dim=1)  # (B, H)
        pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        counts = torch.zeros_like(h[..., 0]).scatter_add_(
            1, argmax, torch.ones_like(argmax, dtype=h.dtype)
        )
        attention = counts / h.shape[-1] * mask
        return pooled.unsqueeze(1), attention.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------


class _ModalityAttention(nn.Module):
    """Gated attention over modality embeddings: (B, P, M, H) -> (B, P, H), (B, P, M)."""

    def __init__(self, hidden: int, attn_dim: int) -> None:
        super().__init__()
        self.score = _AttentionScores(hidden, attn_dim, 1, gated=True)

    def forward(self, z: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        b, p, m, hdim = z.shape
        scores = self.score(z.reshape(b * p, m, hdim)).reshape(b, p, m)
        scores = scores.masked_fill(~present.unsqueeze(1), torch.finfo(z.dtype).min)
        weights = torch.softmax(scores, dim=-1) * present.unsqueeze(1)
        return (weights.unsqueeze(-1) * z).sum(dim=2), weights


class _Standardise(nn.Module):
    """``(x - mean) * scale`` per feature; identity until :meth:`MILHead.set_input_stats`."""

    mean: Tensor
    scale: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.scale


class _TaskClassifier(nn.Module):
    """(B, P, F) -> (B, C). With P == C, class c reads only branch c."""

    def __init__(self, in_features: int, n_classes: int, branches: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)
        self.branches = branches

    def forward(self, x: Tensor) -> Tensor:
        if self.branches == 1:
            return self.linear(x[:, 0])
        return (x * self.linear.weight).sum(dim=-1) + self.linear.bias


class MILHead(nn.Module):
    """Multi-task, optionally multi-modal MIL head; build it with :func:`create_head`.

    Parameters
    ----------
    config : HeadConfig

    Notes
    -----
    Training loss: ``sum(cross_entropy(out.logits[t], y[t]) for t) + out.aux_loss``, with
    ``labels=`` passed to :meth:`forward` so CLAM heads can compute their instance loss.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        pool_cls = HEADS.get(config.name)
        self.config = config
        dims = config.modality_dims
        hidden = config.hidden
        # Instance features are standardised first (hand-crafted features span 1e-3..1e3);
        # the statistics come from the training bags and travel with the weights.
        self.input_norm = nn.ModuleDict({m: _Standardise(d) for m, d in dims.items()})
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(config.dropout))
                for m, d in dims.items()
            }
        )
        self.pools = nn.ModuleDict()
        self.fusers = nn.ModuleDict()
        self.classifiers = nn.ModuleDict()
        n_mod = len(dims)
        for task, classes in config.tasks.items():
            pools = nn.ModuleDict({m: pool_cls(config, len(classes)) for m in dims})
            branches = {p.n_branches for p in pools.values() if isinstance(p, MILPool)}
            if len(branches) != 1 or next(iter(branches)) not in (1, len(classes)):
                raise ValueError(
                    f"head {config.name!r} has n_branches {branches}; must be 1 or the number "
                    f"of classes ({len(classes)})."
                )
            self.pools[task] = pools
            if not config.multimodal:
                fused = hidden
            elif config.fusion == "concat":
                fused = n_mod * hidden + n_mod
            else:
                fused = hidden
                self.fusers[task] = _ModalityAttention(hidden, config.attn_dim)
            self.classifiers[task] = _TaskClassifier(
                fused + config.covariates, len(classes), branches.pop()
            )

    # ---- input checks -------------------------------------------------------------------

    def _prepare_bags(
        self, bags: Tensor | Mapping[str, Tensor | None], mask: Tensor | Mapping[str, Tensor] | None
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], bool]:
        cfg = self.config
        dims = cfg.modality_dims
        if cfg.multimodal:
            given = present_modalities(bags, dims, "the bags")
            masks: Mapping[str, Tensor] = {}
            if mask is not None:
                if not isinstance(mask, Mapping):
                    raise TypeError("for a multi-modal head, mask must be a dict modality -> mask.")
                masks = mask
        else:
            if isinstance(bags, Mapping):
                raise TypeError(
                    f"this head takes one bag (in_dims={cfg.in_dims}); pass a (N, D) tensor, not "
                    "a dict. Build it with in_dims={modality: dim} for multi-modal input."
                )
            given = {_SINGLE: bags}
            if isinstance(mask, Mapping):
                raise TypeError("for a single-bag head, mask must be a (B, N) tensor.")
            masks = {} if mask is None else {_SINGLE: mask}

        out: dict[str, tuple[Tensor, Tensor]] = {}
        batched: bool | None = None
        batch = -1
        dtype = next(self.parameters()).dtype
        for modality, x in given.items():
            where = "" if modality == _SINGLE else f"modality {modality!r}: "
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"{where}features must be a torch.Tensor, got {type(x).__name__}; "
                    "convert with torch.from_numpy(array)."
                )
            if x.ndim not in (2, 3):
                raise ValueError(
                    f"{where}features must be (N, D) for one case or (B, N, D) for a padded "
                    f"batch, got shape {tuple(x.shape)}."
                )
            is_batched = x.ndim == 3
            if batched is None:
                batched = is_batched
            elif batched != is_batched:
                raise ValueError("mix of batched (B, N, D) and unbatched (N, D) bags.")
            if not x.is_floating_point():
                raise TypeError(f"{where}features must be floating point, got {x.dtype}.")
            if x.shape[-1] != dims[modality]:
                raise ValueError(
                    f"{where}features have dim {x.shape[-1]} but this head expects "
                    f"{dims[modality]} (in_dims). The features were probably extracted with a "
                    "different encoder than the one this head was built/trained for; re-extract "
                    "them with that encoder or build a head with the matching in_dims."
                )
            x = x.to(dtype) if is_batched else x.to(dtype).unsqueeze(0)
            m = masks.get(modality)
            if m is None:
                m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            else:
                m = m.to(torch.bool)
                m = m if is_batched else m.unsqueeze(0)
                if m.shape != x.shape[:2]:
                    raise ValueError(
                        f"{where}mask has shape {tuple(m.shape)}, expected {tuple(x.shape[:2])} "
                        "(B, N) to match the features."
                    )
            if x.shape[1] == 0 or (not cfg.multimodal and not bool(m.any(dim=1).all())):
                raise ValueError(
                    f"{where}empty bag (no instances); the case has no tiles/features. Drop it "
                    "from the data set or check tiling/tissue detection for that slide."
                )
            bad = torch.isnan(x).any(dim=-1) & m
            if bool(bad.any()):
                idx = bad.nonzero()[:5, -1].tolist()
                raise ValueError(
                    f"{where}NaN in features of {int(bad.sum())} instance(s) (e.g. rows {idx}); "
                    "check the feature extraction (blank/corrupt tiles, fp16 overflow)."
                )
            if batch >= 0 and x.shape[0] != batch:
                raise ValueError(f"bags disagree on batch size: {x.shape[0]} vs {batch}.")
            batch = x.shape[0]
            out[modality] = (x, m)
        if cfg.multimodal:
            present = torch.stack([m.any(dim=1) for _, m in out.values()]).any(dim=0)
            if not bool(present.all()):
                raise ValueError(
                    f"case(s) {(~present).nonzero().flatten().tolist()} have no instances in "
                    "any modality (empty bags)."
                )
        return out, bool(batched)

    def _prepare_covariates(
        self, covariates: Tensor | Sequence[float] | None, batch: int, batched: bool, ref: Tensor
    ) -> Tensor | None:
        k = self.config.covariates
        if covariates is None:
            if k:
                raise ValueError(f"this head expects {k} covariates per case; pass covariates=.")
            return None
        if not k:
            raise ValueError(
                "covariates were passed but this head was built with covariates=0; build it "
                "with covariates=<length> to use them."
            )
        c = torch.as_tensor(covariates, dtype=ref.dtype, device=ref.device)
        expected = (batch, k) if batched else (k,)
        if tuple(c.shape) != expected:
            raise ValueError(f"covariates have shape {tuple(c.shape)}, expected {expected}.")
        if bool(torch.isnan(c).any()):
            raise ValueError(
                "NaN in covariates; impute missing clinical values (and consider adding a "
                "missingness indicator covariate) before calling the head."
            )
        return c if batched else c.unsqueeze(0)

    def _prepare_labels(
        self, labels: Mapping[str, LabelValue] | None, batch: int, device: torch.device
    ) -> dict[str, Tensor]:
        if labels is None:
            return {}
        tasks = self.config.tasks
        out: dict[str, Tensor] = {}
        for task, value in labels.items():
            if task not in tasks:
                raise ValueError(
                    f"unknown task {task!r} in labels; this head predicts {list(tasks)}."
                )
            classes = list(tasks[task])
            if isinstance(value, Tensor):
                y = value.to(device=device, dtype=torch.long).reshape(-1)
            else:
                values: Sequence[Any] = (
                    [value] if isinstance(value, (int, str, numbers.Integral)) else list(value)
                )
                idx = []
                for v in values:
                    if isinstance(v, str):
                        if v not in classes:
                            raise ValueError(
                                f"unknown class {v!r} for task {task!r}; classes are {classes}."
                            )
                        idx.append(classes.index(v))
                    else:
                        idx.append(int(v))
                y = torch.tensor(idx, dtype=torch.long, device=device)
            if y.numel() != batch:
                raise ValueError(f"labels[{task!r}] has {y.numel()} values for {batch} case(s).")
            if bool(((y < -1) | (y >= len(classes))).any()):
                raise ValueError(
                    f"labels[{task!r}] must be class indices in [0, {len(classes)}) or -1 "
                    f"(unknown), got {y.tolist()}."
                )
            out[task] = y
        return out

    def set_input_stats(self, stats: Mapping[str, tuple[Any, Any]]) -> None:
        """Standardise each modality's instance features with training ``(mean, std)``.

        Parameters
        ----------
        stats : dict modality -> ``(mean, std)`` arrays of shape (D_m,); for a single-bag head
            the key is ``"bag"`` (see :attr:`HeadConfig.modality_dims`). Features whose
            std is 0 (constant in training) are zeroed rather than divided by 0.
        """
        for m, (mean, std) in stats.items():
            if m not in self.input_norm:
                raise ValueError(
                    f"unknown modality {m!r}; this head has {sorted(self.input_norm)}."
                )
            norm = cast(_Standardise, self.input_norm[m])
            mu = torch.as_tensor(np.asarray(mean, np.float64), dtype=norm.mean.dtype)
            sd = torch.as_tensor(np.asarray(std, np.float64), dtype=norm.scale.dtype)
            if mu.shape != norm.mean.shape or sd.shape != norm.scale.shape:
                raise ValueError(
                    f"modality {m!r}: stats of shape {tuple(mu.shape)}/{tuple(sd.shape)}, "
                    f"expected ({norm.mean.shape[0]},)."
                )
            norm.mean.copy_(mu)
            norm.scale.copy_(torch.where(sd > 0, 1.0 / sd.clamp_min(1e-12), torch.zeros_like(sd)))

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        bags: Tensor | Mapping[str, Tensor | None],
        covariates: Tensor | Sequence[float] | None = None,
        *,
        mask: Tensor | Mapping[str, Tensor] | None = None,
        labels: Mapping[str, LabelValue] | None = None,
    ) -> MILOutput:
        """Predict every task for one case, or for a padded batch of cases.

        Parameters
        ----------
        bags : (N, D) float tensor, or dict modality -> (N_m, D_m) tensor
            Instance features of one case. For a padded batch: (B, N, D) tensors with ``mask``.
            Multi-modal: a modality missing for the case is omitted from the dict (or None); in
            a padded batch, a modality missing for one case has an all-False mask row.
        covariates : (K,) float tensor, or (B, K) for a batch; required iff ``covariates > 0``.
        mask : (B, N) bool tensor (or dict modality -> mask), optional
            True for real instances of a padded batch. Default: all instances are real.
        labels : dict task -> class index / class name (or (B,) int tensor, -1 = unknown)
            Only used for the auxiliary instance loss of CLAM heads; tasks may be omitted.

        Returns
        -------
        MILOutput
            Shapes as documented there, with a leading ``B`` axis when the input was batched.
        """
        cfg = self.config
        inputs, batched = self._prepare_bags(bags, mask)
        ref = next(iter(inputs.values()))[0]
        batch = ref.shape[0]
        cov = self._prepare_covariates(covariates, batch, batched, ref)
        ys = self._prepare_labels(labels, batch, ref.device)
        encoded = {
            m: (self.encoders[m](self.input_norm[m](x)), msk) for m, (x, msk) in inputs.items()
        }
        modalities = list(cfg.modality_dims)
        present = torch.stack(
            [
                inputs[m][1].any(dim=1) if m in inputs else ref.new_zeros(batch, dtype=torch.bool)
                for m in modalities
            ],
            dim=1,
        )  # (B, M)

        logits: dict[str, Tensor] = {}
        attention: dict[str, Any] = {}
        modality_attention: dict[str, Tensor] = {}
        aux_terms: list[Tensor] = []
        for task in cfg.tasks:
            pools = cast(nn.ModuleDict, self.pools[task])
            pooled: dict[str, Tensor] = {}
            attn: dict[str, Tensor] = {}
            for m, (h, msk) in encoded.items():
                pool = cast(MILPool, pools[m])
                pooled[m], attn[m] = pool(h, msk)
                if task in ys:
                    term = pool.instance_loss(h, attn[m], msk, ys[task])
                    if term is not None:
                        aux_terms.append(term)
            if not cfg.multimodal:
                z = pooled[_SINGLE]
            else:
                p = next(iter(pooled.values())).shape[1]
                zs = [
                    pooled[m] * present[:, i, None, None]
                    if m in pooled
                    else ref.new_zeros(batch, p, cfg.hidden)
                    for i, m in enumerate(modalities)
                ]
                if cfg.fusion == "concat":
                    flags = present.to(ref.dtype).unsqueeze(1).expand(-1, p, -1)
                    z = torch.cat([*zs, flags], dim=-1)
                else:
                    z, modality_attention[task] = self.fusers[task](torch.stack(zs, dim=2), present)
            if cov is not None:
                z = torch.cat([z, cov.unsqueeze(1).expand(-1, z.shape[1], -1)], dim=-1)
            task_logits = self.classifiers[task](z)
            logits[task] = task_logits
            branch = task_logits.argmax(dim=-1)
            chosen = {m: _pick_branch(a, branch) for m, a in attn.items()}
            attention[task] = chosen if cfg.multimodal else chosen[_SINGLE]
            if task in modality_attention:
                modality_attention[task] = _pick_branch(modality_attention[task], branch)
        aux = (
            torch.stack(aux_terms).mean() * cfg.instance_loss_weight
            if aux_terms
            else ref.new_zeros(())
        )
        if not batched:
            logits = {t: v[0] for t, v in logits.items()}
            attention = {t: _unbatch(v) for t, v in attention.items()}
            modality_attention = {t: v[0] for t, v in modality_attention.items()}
        return MILOutput(logits, attention, aux, modality_attention)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, tasks={list(self.config.tasks)}"


def _pick_branch(attention: Tensor, branch: Tensor) -> Tensor:
    """(B, P, N) -> (B, N): the only branch, or the branch of the predicted class."""
    if attention.shape[1] == 1:
        return attention[:, 0]
    return attention[torch.arange(attention.shape[0], device=attention.device), branch]


def _unbatch(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: v[0] for k, v in value.items()}
    return value[0]


def create_head(
    name: str,
    in_dims: int | Mapping[str, int],
    tasks: Mapping[str, Sequence[str]],
    *,
    covariates: int = 0,
    **kw: Any,
) -> MILHead:
    """Build a registered MIL head.

    Parameters
    ----------
    name : one of :func:`list_heads`.
    in_dims : int, or mapping modality -> int
        Instance feature dimension (the encoder's embedding dim), or one per modality.
    tasks : mapping task -> list of class names.
    covariates : length of the per-case clinical covariate vector (0: none).
    **kw : further :class:`HeadConfig` fields (``hidden``, ``dropout``, ``fusion``, ...).

    Returns
    -------
    MILHead
    """
    HEADS.entry(name)  # an unknown name lists the choices
    options = {f.name for f in fields(HeadConfig)} - {"name", "in_dims", "tasks", "covariates"}
    unknown = sorted(set(kw) - options)
    if unknown:
        raise TypeError(f"unknown head option(s) {unknown}; valid options are {sorted(options)}.")
    config = HeadConfig(name=name, in_dims=in_dims, tasks=tasks, covariates=covariates, **kw)
    return MILHead(config)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def write_weights(model: MILHead, directory: str | Path) -> Path:
    """Write ``model.safetensors`` into ``directory`` (created); the card is the caller's."""
    from safetensors.torch import save_file

    if not isinstance(model, MILHead):
        raise TypeError(f"expected a MILHead, got {type(model).__name__}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / _WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def save_head(model: MILHead, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (weights) and ``model.json`` (config) into ``directory``.

    The ``model.json`` is a :class:`mil.ModelCard` holding the head's config only; a trained
    model with its encoder, covariates and calibration is saved by :func:`mil.save_model`.

    Parameters
    ----------
    model : a head from :func:`create_head` or :func:`load_head`.
    directory : created if needed; existing files of these two names are overwritten.

    Returns
    -------
    Path of the directory.
    """
    from ._card import ModelCard

    directory = write_weights(model, directory)
    ModelCard(head=model.config).with_versions().write(directory)
    return directory


def load_head(directory: str | Path, *, device: str | torch.device = "cpu") -> MILHead:
    """Rebuild a head written by :func:`save_head` or :func:`mil.save_model`, in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``model.json`` or ``model.safetensors`` is missing.
    ModelFileError
        If the weights file is truncated, not safetensors, or a pickle (never unpickled).
    ValueError
        If the file is not a head, or the weights do not match the config (lists the missing,
        unexpected and mis-shaped tensors, expected vs found).
    """
    from ._card import ModelCard

    directory = Path(directory)
    config_path, weights_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; save the head with save_head(model, dir).")
    model = MILHead(ModelCard.read(directory).head)
    found = read_weights(weights_path)
    problem = state_dict_mismatch(model.state_dict(), found)
    if problem:
        raise ValueError(
            f"{weights_path} does not match the config in {config_path}: "
            + problem
            + ". Were the two files written by different save_head calls?"
        )
    model.load_state_dict(found)
    return model.to(device).eval()
