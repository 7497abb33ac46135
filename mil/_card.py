"""The model card: what ``model.json`` beside a head's ``model.safetensors`` holds.

One reader (:meth:`ModelCard.read`) and one writer (:meth:`ModelCard.write`) for the file;
:func:`mil.save_head` / :func:`mil.save_model` write through it, :func:`mil.load_head` /
:func:`mil.load_model` read through it, and scoring, evaluation and reports read its typed
fields instead of the JSON.

Format versions
---------------
1  head config, ``tasks``, and when saved with a cohort ``encoder`` and ``covariates``; free-form
   ``training`` and ``metrics``; ``calibration`` and ``tiling`` when ``oncotrace train`` wrote it.
   Files written before the card existed have ``format_version`` 1 (or none) and still load.
2  the same sections with the same meaning, plus ``train_config`` (a :class:`mil.TrainConfig`)
   when the model came from :func:`mil.train_model`.
3  plus ``ood``: the out-of-domain check's threshold and the sha256 of ``ood.safetensors``
   beside it (:class:`mil.OODStats`), when the model was saved with its training cohort.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from oncotrace.wsi import TilingConfig

from ._heads import HeadConfig
from ._ood import OODStats
from ._protocol import TrainConfig

__all__ = ["CARD_FILE", "CARD_FORMAT_VERSION", "CovariateSpec", "ModelCard", "ModelEncoder"]

CARD_FILE = "model.json"
CARD_FORMAT_VERSION = 3
_FORMAT = "oncotrace.mil.head"
_WEIGHTS = "model.safetensors"
_SECTIONS = frozenset(
    {
        "format",
        "format_version",
        "oncotrace_version",
        "torch_version",
        "weights",
        "config",
        "tasks",
        "encoder",
        "covariates",
        "tiling",
        "calibration",
        "training",
        "train_config",
        "metrics",
        "ood",
    }
)


def _frozen(value: Any) -> Any:
    """A read-only deep copy of JSON-like data (dicts become mapping proxies, lists tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _jsonable(obj: Any) -> Any:
    """Plain JSON data from dataclasses, mappings, numpy values; NaN/inf become None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return _jsonable(to_dict() if callable(to_dict) else asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True)
class ModelEncoder:
    """The features a model takes: ``features/<name>`` arrays of ``dim`` columns.

    ``name`` is a registered encoder (:func:`mil.list_encoders`) or any name features were
    imported under (``oncotrace import-features --name``).
    """

    name: str
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim}


@dataclass(frozen=True)
class CovariateSpec:
    """Clinical covariates a model takes and the standardisation fitted on its training cohort.

    Attributes
    ----------
    names : K covariate column names, in the order the head reads them.
    mean, std : K floats; a case's covariates enter the head as ``(x - mean) / std``.
    encoding : column -> raw value -> number for non-numeric columns (``sex``: M=0, F=1).
    """

    names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    encoding: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.names)
        if len(self.mean) != k or len(self.std) != k:
            raise ValueError(
                f"covariates {list(self.names)} need {k} means and stds; got {len(self.mean)}"
                f" and {len(self.std)}."
            )
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "encoding", _frozen(self.encoding))

    def standardise(self, values: ArrayLike) -> NDArray[np.float32]:
        """Covariates as the head takes them.

        Parameters
        ----------
        values : (N, K) or (K,) raw numeric covariates, columns in :attr:`names` order.

        Returns
        -------
        (N, K) float32 ndarray, ``(values - mean) / std``.
        """
        x = np.asarray(values, dtype=np.float64)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        if x.shape[1] != len(self.names):
            raise ValueError(
                f"the model takes covariates {list(self.names)} ({len(self.names)} columns),"
                f" got {x.shape[1]} value(s) per case."
            )
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "mean": list(self.mean),
            "std": list(self.std),
            "encoding": _jsonable(self.encoding),
        }


@dataclass(frozen=True)
class ModelCard:
    """Everything ``model.json`` records about a trained head, typed.

    Attributes
    ----------
    head : the head's configuration (name, input dims, tasks and class names, sizes).
    encoder : the features the head was trained on; None for a head saved without a cohort.
    covariates : clinical covariates and their standardisation (empty: none).
    tiling : the ``wsi.TilingConfig`` every training store was cut with, or None when unknown
        (stores disagreed or predate the record).
    calibration : per-task temperature, threshold and conformal quantile, as returned by
        :func:`mil.fit_calibration`; None when not fitted.
    training : provenance of the training run (split, folds, seed, ``trained_at``, labels file,
        head, epochs, lr, ...), free-form.
    train_config : the :class:`mil.TrainConfig` of :func:`mil.train_model`, when it trained
        the model.
    metrics : task -> metric summary of the training evaluation (free-form JSON).
    ood : the out-of-domain check's training statistics (:class:`mil.OODStats`), or None when
        the model was saved without its cohort (or the cohort was multi-modal or too small).
    oncotrace_version, torch_version : versions that wrote the weights.
    format_version : layout version of the file the card was read from (see the module
        notes); :meth:`write` always writes the current :data:`CARD_FORMAT_VERSION`.
    """

    head: HeadConfig
    encoder: ModelEncoder | None = None
    covariates: CovariateSpec = field(default_factory=CovariateSpec)
    tiling: TilingConfig | None = None
    calibration: Mapping[str, Any] | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    train_config: TrainConfig | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    ood: OODStats | None = None
    oncotrace_version: str = ""
    torch_version: str = ""
    format_version: int = CARD_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.tiling is not None and not isinstance(self.tiling, TilingConfig):
            raise TypeError(f"tiling must be a wsi.TilingConfig, not {type(self.tiling).__name__}")
        if self.calibration is not None:
            object.__setattr__(self, "calibration", _frozen(_jsonable(self.calibration)))
        object.__setattr__(self, "training", _frozen(_jsonable(self.training)))
        object.__setattr__(self, "metrics", _frozen(_jsonable(self.metrics)))

    @property
    def tasks(self) -> dict[str, tuple[str, ...]]:
        """task -> class names, in the order of the head's probability columns."""
        return {t: tuple(c) for t, c in self.head.tasks.items()}

    def with_versions(self) -> ModelCard:
        """This card stamped with the running OncoTrace and torch versions."""
        import torch
        from oncotrace import __version__

        return replace(self, oncotrace_version=__version__, torch_version=torch.__version__)

    # ---------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``model.json`` contents; inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {
            "format": _FORMAT,
            "format_version": CARD_FORMAT_VERSION,
            "oncotrace_version": self.oncotrace_version,
            "torch_version": self.torch_version,
            "weights": _WEIGHTS,
            "config": self.head.to_dict(),
            "tasks": {t: list(c) for t, c in self.tasks.items()},
            "covariates": self.covariates.to_dict(),
            "training": _jsonable(self.training),
            "metrics": _jsonable(self.metrics),
        }
        if self.encoder is not None:
            out["encoder"] = self.encoder.to_dict()
        if self.tiling is not None:
            out["tiling"] = self.tiling.to_dict()
        if self.calibration is not None:
            out["calibration"] = _jsonable(self.calibration)
        if self.train_config is not None:
            out["train_config"] = self.train_config.to_dict()
        if self.ood is not None:
            out["ood"] = self.ood.record()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | Path = CARD_FILE) -> ModelCard:
        """Build a card from :meth:`to_dict` output or an older ``model.json``.

        Parameters
        ----------
        data : the parsed JSON.
        source : the file it came from, named in errors.

        Raises
        ------
        ValueError
            If the data is not a MIL head's card, is newer than this OncoTrace reads, has
            unknown sections or lacks a required one.
        """
        if isinstance(data, Mapping) and data.get("format") == "oncotrace-fewshot-head":
            raise ValueError(
                f"{source}: a few-shot head ({data.get('kind')!r} on frozen case embeddings), not"
                " an attention-MIL head. Fix: load it with mil.load_fewshot_head; score and"
                " evaluate take the folder `oncotrace train` wrote."
            )
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(
                f"{source}: not an OncoTrace MIL head (format {_FORMAT!r} expected). Fix: pass"
                " the folder `oncotrace train` or mil.save_model wrote."
            )
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > CARD_FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version!r} is newer than this OncoTrace reads"
                f" ({CARD_FORMAT_VERSION}); upgrade OncoTrace."
            )
        unknown = sorted(set(data) - _SECTIONS)
        if unknown:
            raise ValueError(
                f"{source}: unknown section(s) {unknown}; a model card holds {sorted(_SECTIONS)}."
                " Fix: remove them, or read the file with the OncoTrace that wrote it."
            )
        if "config" not in data:
            raise ValueError(
                f"{source}: no 'config' section (the head's configuration). Fix: restore the"
                " file from the run that wrote model.safetensors, or retrain."
            )
        try:
            head = HeadConfig.from_dict(data["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: bad head 'config': {exc}") from exc
        tasks = data.get("tasks")
        if tasks is not None and {t: list(c) for t, c in head.tasks.items()} != dict(tasks):
            raise ValueError(
                f"{source}: 'tasks' {dict(tasks)} disagree with the head config's tasks"
                f" {dict(head.tasks)}. Fix: restore the file from one `oncotrace train` run."
            )
        try:
            enc = data.get("encoder")
            encoder = None if enc is None else ModelEncoder(str(enc["name"]), int(enc["dim"]))
            cov = data.get("covariates") or {}
            covariates = CovariateSpec(
                names=tuple(cov.get("names") or ()),
                mean=tuple(cov.get("mean") or ()),
                std=tuple(cov.get("std") or ()),
                encoding=cov.get("encoding") or {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{source}: malformed 'encoder' or 'covariates' section ({exc}). Expected"
                " encoder {'name': str, 'dim': int} and covariates {'names', 'mean', 'std'} of"
                " equal lengths. Fix: restore the file, or retrain."
            ) from exc
        in_dim = head.in_dims
        if encoder is not None and isinstance(in_dim, int) and encoder.dim != in_dim:
            raise ValueError(
                f"{source}: the head takes {in_dim}-dim features but the file says encoder"
                f" {encoder.name!r} has dim {encoder.dim}; the model files are inconsistent."
                " Fix: retrain, or restore both files from the same `oncotrace train` run."
            )
        tc = data.get("train_config")
        tiling = data.get("tiling")
        ood = data.get("ood")
        if ood is not None and not isinstance(ood, Mapping):
            raise ValueError(
                f"{source}: malformed 'ood' section. Fix: restore the file, or retrain."
            )
        return cls(
            head=head,
            encoder=encoder,
            covariates=covariates,
            tiling=None if tiling is None else TilingConfig.from_dict(tiling, source=source),
            calibration=data.get("calibration"),
            training=data.get("training") or {},
            train_config=None if tc is None else TrainConfig.from_dict(tc, source=source),
            metrics=data.get("metrics") or {},
            ood=None if ood is None else OODStats.read(Path(source).parent, ood),
            oncotrace_version=str(data.get("oncotrace_version", "")),
            torch_version=str(data.get("torch_version", "")),
            format_version=version,
        )

    # ---------------------------------------------------------------------------- files

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/model.json`` (the folder is created); returns the file's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CARD_FILE
        if self.ood is not None:  # first: model.json names it by its sha256
            self.ood.write(directory)
        tmp = path.with_name(f".{CARD_FILE}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: str | Path) -> ModelCard:
        """Read ``directory/model.json``.

        Raises
        ------
        FileNotFoundError
            If the file is missing.
        ValueError
            If it is not valid JSON or not a valid card (see :meth:`from_dict`).
        """
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found. Fix: pass the folder `oncotrace train` (or mil.save_model"
                " / mil.save_head) wrote."
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}). Fix: restore the file.") from exc
        return cls.from_dict(data, source=path)
