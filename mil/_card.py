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
from collections.abc import Mapping, Sequence
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
from ._state import ModelFileError

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT_VERSION",
    "CovariateSpec",
    "ModelCard",
    "ModelEncoder",
    "ModelFileError",
]

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
        ModelFileError
            If the data is not a MIL head's card, is newer than this OncoTrace reads, has
            unknown sections, lacks a required one or holds a section of the wrong shape (a
            string temperature, a list for covariates, ...); it names ``source``.
        """
        if isinstance(data, Mapping) and data.get("format") == "oncotrace-fewshot-head":
            raise ModelFileError(
                source,
                f"a few-shot head ({data.get('kind')!r} on frozen case embeddings), not an"
                " attention-MIL head",
                "load it with mil.load_fewshot_head; score and evaluate take the folder"
                " `oncotrace train` wrote.",
            )
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            got = f"a JSON {type(data).__name__}" if not isinstance(data, Mapping) else "a card"
            raise ModelFileError(
                source,
                f"not an OncoTrace MIL head ({got} without format {_FORMAT!r})",
                "pass the folder `oncotrace train` or mil.save_model wrote, or copy it again if"
                " this file was damaged in transit.",
            )
        version = data.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelFileError(source, f"format_version {version!r} is not a positive integer")
        if version > CARD_FORMAT_VERSION:
            raise ModelFileError(
                source,
                f"format_version {version} is newer than this OncoTrace reads"
                f" ({CARD_FORMAT_VERSION})",
                "upgrade OncoTrace.",
            )
        unknown = sorted(set(data) - _SECTIONS)
        if unknown:
            raise ModelFileError(
                source,
                f"unknown section(s) {unknown}; a model card holds {sorted(_SECTIONS)}",
                "remove them, or read the file with the OncoTrace that wrote it.",
            )
        if "config" not in data:
            raise ModelFileError(source, "no 'config' section (the head's configuration)")
        try:
            if not isinstance(data["config"], Mapping):
                raise TypeError(f"a JSON object is needed, got {data['config']!r}")
            head = HeadConfig.from_dict(data["config"])
        except (TypeError, ValueError) as exc:
            raise ModelFileError(source, f"bad head 'config': {exc}") from exc
        tasks = data.get("tasks")
        head_tasks = {t: list(c) for t, c in head.tasks.items()}
        if tasks is not None and (not isinstance(tasks, Mapping) or head_tasks != dict(tasks)):
            raise ModelFileError(
                source,
                f"'tasks' {tasks!r} disagree with the head config's tasks {head_tasks}",
            )
        for name in ("training", "metrics"):
            if data.get(name) is not None and not isinstance(data[name], Mapping):
                raise ModelFileError(source, f"{name!r} is {data[name]!r}, not a JSON object")
        try:
            enc = data.get("encoder")
            encoder = None if enc is None else _encoder(enc)
            cov = data.get("covariates") or {}
            if not isinstance(cov, Mapping):
                raise TypeError(f"covariates is {cov!r}, not a JSON object")
            covariates = CovariateSpec(
                names=_strings(cov.get("names") or (), "covariate names"),
                mean=_finite(cov.get("mean") or (), "covariate means"),
                std=_finite(cov.get("std") or (), "covariate stds", positive=True),
                encoding=_encoding(cov.get("encoding") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(
                source,
                f"malformed 'encoder' or 'covariates' section ({exc}). Expected encoder"
                " {'name': str, 'dim': int} and covariates {'names', 'mean', 'std'} of equal"
                " lengths, the stds above 0",
            ) from exc
        in_dim = head.in_dims
        if encoder is not None and isinstance(in_dim, int) and encoder.dim != in_dim:
            raise ModelFileError(
                source,
                f"the head takes {in_dim}-dim features but the file says encoder"
                f" {encoder.name!r} has dim {encoder.dim}; the model files are inconsistent",
            )
        calibration = data.get("calibration")
        if calibration is not None:
            _check_calibration(calibration, head.tasks, source)
        tc = data.get("train_config")
        tiling = data.get("tiling")
        try:
            tiling_config = (
                None if tiling is None else TilingConfig.from_dict(tiling, source=source)
            )
            train_config = None if tc is None else TrainConfig.from_dict(tc, source=source)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(source, _own_words(exc, source)) from exc
        ood = data.get("ood")
        if ood is not None and not isinstance(ood, Mapping):
            raise ModelFileError(source, f"malformed 'ood' section {ood!r}")
        return cls(
            head=head,
            encoder=encoder,
            covariates=covariates,
            tiling=tiling_config,
            calibration=calibration,
            training=data.get("training") or {},
            train_config=train_config,
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
        ModelFileError
            If the file is missing, is not UTF-8 JSON or not a valid card (see
            :meth:`from_dict`).
        """
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            where = "the folder does not exist" if not Path(directory).is_dir() else "not found"
            raise ModelFileError(
                path,
                where,
                "pass the folder `oncotrace train` (or mil.save_model / mil.save_head) wrote.",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError included
            raise ModelFileError(path, f"not valid UTF-8 JSON ({exc})") from exc
        return cls.from_dict(data, source=path)


# -------------------------------------------------------------------------------- checks


def _own_words(exc: BaseException, source: str | Path) -> str:
    """A nested reader's message without its own ``<file>: `` prefix (the error adds it)."""
    text = str(exc)
    prefix = f"{source}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(values: Any, what: str, *, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
        raise TypeError(f"{what} must be a list of numbers, got {values!r}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise ValueError(f"{what} must be finite{' and above 0' if positive else ''}: {values}")
    return out


def _strings(values: Any, what: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{what} must be a list of strings, got {values!r}")
    return tuple(values)


def _encoder(enc: Any) -> ModelEncoder:
    if not isinstance(enc, Mapping):
        raise TypeError(f"encoder is {enc!r}, not a JSON object")
    name, dim = enc["name"], enc["dim"]
    if not isinstance(name, str) or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise TypeError(f"encoder name {name!r} / dim {dim!r}")
    return ModelEncoder(name, dim)


def _encoding(enc: Any) -> Mapping[str, Mapping[str, int]]:
    ok = isinstance(enc, Mapping) and all(
        isinstance(m, Mapping) and all(_is_number(v) for v in m.values()) for m in enc.values()
    )
    if not ok:
        raise TypeError(f"covariate encoding must map column -> value -> number, got {enc!r}")
    return enc


def _check_calibration(rec: Any, tasks: Mapping[str, Sequence[str]], source: str | Path) -> None:
    """Refuse a ``calibration`` section :func:`mil.apply_calibration` could not use as written
    (the shape :func:`mil.fit_calibration` returns)."""

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(source, f"'calibration' {problem}")

    if not isinstance(rec, Mapping) or not isinstance(rec.get("tasks"), Mapping):
        raise bad("is not a record of mil.fit_calibration (a JSON object with 'tasks')")
    if not isinstance(rec.get("notes", []), list):
        raise bad(f"notes {rec['notes']!r} are not a list")
    for task, t in rec["tasks"].items():
        where = f"of task {task!r}"
        if task not in tasks:
            raise bad(f"names task {task!r}, which the head does not have ({list(tasks)})")
        if not isinstance(t, Mapping):
            raise bad(f"{where} is {t!r}, not a JSON object")
        names = t.get("class_names", list(tasks[task]))
        if not isinstance(names, list) or names != list(tasks[task]):
            raise bad(f"{where} was fitted for classes {names!r}, not {list(tasks[task])}")
        temp = t.get("temperature", 1.0)
        if not _is_number(temp) or not (math.isfinite(temp) and temp > 0):
            raise bad(f"{where}: temperature {temp!r} is not a number above 0")
        thr = t.get("threshold")
        if thr is not None and not (_is_number(thr) and 0.0 <= thr <= 1.0):
            raise bad(f"{where}: threshold {thr!r} is not a probability in [0, 1]")
        if not isinstance(t.get("notes", []), list):
            raise bad(f"{where}: notes {t['notes']!r} are not a list")
        conf = t.get("conformal")
        if conf is None:
            continue
        if not isinstance(conf, Mapping):
            raise bad(f"{where}: conformal {conf!r} is not a JSON object")
        scores, level, qhat = conf.get("scores") or [], conf.get("level", 0.0), conf.get("qhat")
        if not isinstance(scores, list) or not all(
            _is_number(v) and math.isfinite(v) for v in scores
        ):
            raise bad(f"{where}: conformal scores are not a list of numbers")
        if scores and not (_is_number(level) and 0.0 < level < 1.0):
            raise bad(f"{where}: conformal level {level!r} is not in (0, 1)")
        if qhat is not None and not (_is_number(qhat) and math.isfinite(qhat)):
            raise bad(f"{where}: conformal qhat {qhat!r} is not a number")
