"""The training protocol: evaluate with patient-grouped splits, then fit and keep one model.

:func:`train_model` is the whole of what ``oncotrace train`` does, so a notebook that calls it
with the same :class:`TrainConfig` reproduces the command exactly:

``kfold`` / ``site``
    out-of-fold metrics of a patient-grouped cross-validation, then the kept model is trained
    on every case (minus an inner validation split for early stopping and calibration);
``holdout``
    one patient-grouped split (``test_fraction``, or the ``test_sites``): the kept model is
    trained on the training side and the metrics are those of the test side, with the kept
    model's calibration applied.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from oncotrace.wsi import TilingConfig

    from ._card import ModelCard
    from ._heads import MILHead
    from ._train import CohortData, Evaluation

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "train_model"]

Split = Literal["kfold", "site", "holdout"]
_SPLITS = ("kfold", "site", "holdout")


class TrainConfigError(ValueError):
    """A training option out of range; :attr:`param` names the :class:`TrainConfig` field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; recorded in ``model.json`` under ``train_config``.

    Parameters
    ----------
    encoder : name of the ``features/<encoder>`` arrays to train on (a registered encoder or
        any name features were imported under).
    head : registered head name (:func:`mil.list_heads`).
    tasks : label columns to predict (class names are their sorted distinct values).
    covariates : numeric clinical columns fused after pooling (``sex`` may be M/F).
    split : ``"kfold"`` (patient-grouped, stratified on the first task), ``"site"`` (one fold
        per site) or ``"holdout"`` (one train/test split).
    folds : folds of ``split="kfold"``.
    test_sites : for ``split="holdout"``: hold these sites out (empty: a random patient split).
    test_fraction : for ``split="holdout"`` without ``test_sites``: share of patients tested.
    epochs, lr : optimisation (AdamW), with early stopping on an inner validation split.
    seed : splits, initialisation and bootstrap.
    n_boot : bootstrap resamples for the metric CIs.
    conformal_level : coverage of the conformal prediction sets fitted on validation patients.
    """

    encoder: str = "pathomics"
    head: str = "abmil-gated"
    tasks: tuple[str, ...] = ("label",)
    covariates: tuple[str, ...] = ()
    split: Split = "kfold"
    folds: int = 5
    test_sites: tuple[str, ...] = ()
    test_fraction: float = 0.3
    epochs: int = 40
    lr: float = 2e-4
    seed: int = 0
    n_boot: int = 1000
    conformal_level: float = 0.9

    def __post_init__(self) -> None:
        for name in ("tasks", "covariates", "test_sites"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TrainConfigError(
                    name, f"{name}={value!r}: give a sequence of column names, e.g. ['label']."
                )
            object.__setattr__(self, name, tuple(str(v) for v in value))
        if not self.tasks:
            raise TrainConfigError("tasks", "tasks=(): name at least one label column to predict.")
        clash = sorted(set(self.tasks) & set(self.covariates))
        if clash:
            raise TrainConfigError(
                "covariates", f"covariates={list(self.covariates)}: {clash} are also tasks."
            )
        if not self.encoder or not self.head:
            which = "encoder" if not self.encoder else "head"
            raise TrainConfigError(which, f"{which}='': give a name.")
        if self.split not in _SPLITS:
            raise TrainConfigError("split", f"split={self.split!r}: choose one of {_SPLITS}.")
        if not _int(self.folds) or self.folds < 2:
            raise TrainConfigError("folds", f"folds={self.folds!r}: cross-validation needs >= 2.")
        if self.test_sites and self.split != "holdout":
            raise TrainConfigError(
                "test_sites",
                f"test_sites={list(self.test_sites)} holds sites out only with split='holdout'"
                f" (split={self.split!r}).",
            )
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise TrainConfigError(
                "test_fraction", f"test_fraction={self.test_fraction!r}: must lie in (0, 1)."
            )
        if not _int(self.epochs) or self.epochs < 1:
            raise TrainConfigError("epochs", f"epochs={self.epochs!r}: must be an int >= 1.")
        if not float(self.lr) > 0.0:
            raise TrainConfigError("lr", f"lr={self.lr!r}: the learning rate must be > 0.")
        if not _int(self.seed):
            raise TrainConfigError("seed", f"seed={self.seed!r}: must be an int.")
        if not _int(self.n_boot) or self.n_boot < 1:
            raise TrainConfigError("n_boot", f"n_boot={self.n_boot!r}: must be an int >= 1.")
        if not 0.0 < float(self.conformal_level) < 1.0:
            raise TrainConfigError(
                "conformal_level",
                f"conformal_level={self.conformal_level!r}: a coverage in (0, 1), e.g. 0.9.",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | Path = "dict") -> TrainConfig:
        """Build a config from :meth:`to_dict` output; ``source`` is named in errors."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: train_config must be a JSON object, got {data!r}.")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown train_config key(s) {unknown}; known keys are"
                f" {sorted(known)}. Was the file written by a newer OncoTrace?"
            )
        return cls(**data)

    def provenance(self) -> dict[str, Any]:
        """The ``training`` section model.json has always held (keys kept for old readers)."""
        holdout = self.split == "holdout"
        return {
            "split": self.split,
            "folds": self.folds if self.split == "kfold" else None,
            "test_sites": list(self.test_sites) or None,
            "test_fraction": self.test_fraction if holdout and not self.test_sites else None,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` produced.

    Attributes
    ----------
    model : the kept head, in eval mode.
    card : its model card (what ``model.json`` holds).
    evaluation : held-out predictions (out-of-fold, or of the test side) and their fold.
    metrics : task -> JSON summary of the evaluation (None: one class on the evaluated side).
    n_cases : slides in the cohort.
    seconds : wall time of the run.
    out_dir : where the files were written, or None.
    """

    model: MILHead
    card: ModelCard
    evaluation: Evaluation
    metrics: dict[str, Any]
    n_cases: int
    seconds: float
    out_dir: Path | None


def train_model(
    stores: str | Path,
    labels: str | Path,
    config: TrainConfig,
    out_dir: str | Path | None = None,
) -> TrainResult:
    """Run the evaluation ``config`` asks for and fit the model to keep.

    Parameters
    ----------
    stores : folder of ``<slide_id>.zarr`` tile stores holding ``features/<config.encoder>``.
    labels : ``labels.csv`` (``slide_id, patient_id``, optional ``site``, task and covariate
        columns), see :func:`mil.load_cohort`.
    config : every training option.
    out_dir : if given, written there: ``model.safetensors`` + ``model.json`` (the kept model
        and its card), ``metrics.json`` (the evaluation) and ``predictions_heldout.csv`` (one
        row per evaluated slide and task).

    Returns
    -------
    TrainResult

    Notes
    -----
    The kept model's calibration (temperature, binary threshold, conformal quantile at
    ``config.conformal_level``) is fitted on its inner validation patients. When they are too
    few for a split, k-fold/site runs borrow the fold models' out-of-fold predictions (noted in
    the record) and a hold-out run keeps the model uncalibrated.
    """
    from ._train import card_for, load_cohort, write_model

    t0 = time.perf_counter()
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    stores, labels = Path(stores), Path(labels)
    data = load_cohort(stores, labels, config.encoder, config.tasks, config.covariates)
    fit_kw: dict[str, Any] = {"head": config.head, "epochs": config.epochs, "lr": config.lr}
    if config.split == "holdout":
        model, ev, calibration = _holdout(data, config, fit_kw)
        evaluations = ev.metrics
    else:
        model, ev, calibration = _cross_validated(data, config, fit_kw)
        evaluations = _evaluate(data, ev.case_idx, ev.proba, None, config)
    metrics = {t: None if e is None else e.summary() for t, e in evaluations.items()}
    training = {**config.provenance(), "trained_at": trained_at, "labels": str(labels), **fit_kw}
    card = card_for(
        model,
        training,
        metrics,
        data=data,
        calibration=calibration,
        tiling=_store_tiling(stores, [str(s) for s in data.slide_ids]),
        train_config=config,
    )
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        write_model(out, model, card)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
        _write_predictions(out / "predictions_heldout.csv", data, ev)
    return TrainResult(
        model=model,
        card=card,
        evaluation=ev,
        metrics=metrics,
        n_cases=len(data),
        seconds=round(time.perf_counter() - t0, 1),
        out_dir=out,
    )


# --------------------------------------------------------------------------------------------
# The two protocols
# --------------------------------------------------------------------------------------------


def _cross_validated(
    data: CohortData, config: TrainConfig, fit_kw: Mapping[str, Any]
) -> tuple[MILHead, Evaluation, dict[str, Any]]:
    """Out-of-fold evaluation, then the kept model on every case."""
    from ._train import cross_validate

    ev = cross_validate(
        data,
        k=config.folds,
        split=config.split,  # type: ignore[arg-type]
        seed=config.seed,
        n_boot=config.n_boot,
        **fit_kw,
    )
    model, val_idx, _ = _fit_kept(data, np.arange(len(data)), config.seed, fit_kw)
    need = max(MIN_CALIBRATION_CASES, min_conformal_cases(config.conformal_level))
    if val_idx is not None and len(val_idx) >= need:
        return model, ev, _calibrate(data, model, val_idx, config.conformal_level)
    why = (
        "the training cases were too few for a validation split, so the kept model was "
        "trained on every case without one"
        if val_idx is None
        else f"the kept model's {len(val_idx)} validation cases are fewer than the {need} a"
        f" decision threshold and {config.conformal_level:.0%} conformal sets need"
    )
    calibration = _calibrate_from_proba(
        data,
        ev.case_idx,
        ev.proba,
        config.conformal_level,
        f"out-of-fold predictions of the cross-validation: {why}, and its calibration borrows"
        " the fold models' predictions on every training case (approximate).",
    )
    return model, ev, calibration


#: Fewest validation cases a k-fold run calibrates the kept model on; with fewer, the
#: out-of-fold predictions of every training case are used (a threshold picked on 5 cases
#: moved a call against p = 0.9999 in the demo).
MIN_CALIBRATION_CASES = 20


def min_conformal_cases(level: float) -> int:
    """Fewest calibration cases for which split-conformal sets at ``level`` are finite:
    ``ceil((n + 1) level) <= n``, i.e. ``n >= level / (1 - level)``."""
    return math.ceil(level / (1.0 - level) - 1e-9)


def _holdout(
    data: CohortData, config: TrainConfig, fit_kw: Mapping[str, Any]
) -> tuple[MILHead, Evaluation, dict[str, Any]]:
    """Fit on the training side, calibrate on its validation patients, evaluate the test side."""
    from ._splits import grouped_split, site_holdout
    from ._train import Evaluation, predict

    if config.test_sites:
        train_idx, test_idx = site_holdout(
            data.sites, list(config.test_sites), groups=data.patient_ids
        )
    else:
        first = config.tasks[0]
        train_idx, test_idx = grouped_split(
            data.labels[first], data.patient_ids, config.test_fraction, config.seed
        )
    model, val_idx, history = _fit_kept(data, train_idx, config.seed, fit_kw)
    if val_idx is not None:
        calibration = _calibrate(data, model, val_idx, config.conformal_level)
    else:
        calibration = {
            "version": 1,
            "source": None,
            "level": config.conformal_level,
            "tasks": {},
            "notes": [
                "not fitted: the training side has too few patients of a class for a "
                "validation split (or for out-of-fold predictions); threshold 0.5 / argmax "
                "and no prediction sets."
            ],
        }
    test_idx = np.asarray(test_idx)
    bags, _, cov = _part(data, test_idx)
    proba, attention = predict(model, bags, cov)
    ev = Evaluation(
        case_idx=test_idx,
        fold=np.zeros(len(test_idx), np.int64),
        proba=proba,
        attention=attention,
        metrics=_evaluate(data, test_idx, proba, calibration, config),
        histories=[history],
    )
    return model, ev, calibration


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def _part(data: CohortData, idx: NDArray[np.int64]) -> tuple[list[Any], dict[str, Any], Any]:
    cov = None if data.covariates is None else data.covariates[idx]
    return [data.bags[i] for i in idx], {t: y[idx] for t, y in data.labels.items()}, cov


def _fit_kept(
    data: CohortData, train_idx: NDArray[np.int64], seed: int, fit_kw: Mapping[str, Any]
) -> tuple[MILHead, NDArray[np.int64] | None, dict[str, Any]]:
    """Fit on ``train_idx`` minus an inner validation split (early stopping, calibration).

    Returns ``(model, val_idx, history)``; ``val_idx`` is None when the training side has too
    few patients of a class for a split, and the model then trains for the full epochs.
    """
    from ._splits import inner_validation
    from ._train import fit

    train_idx = np.asarray(train_idx)
    try:
        fit_idx, val_idx = inner_validation(
            train_idx, data.labels[next(iter(data.tasks))], data.patient_ids, seed=seed
        )
    except ValueError:
        fit_idx, val_idx = train_idx, None
    bags, labels, cov = _part(data, fit_idx)
    model, history = fit(
        bags,
        labels,
        tasks=data.tasks,
        in_dim=data.in_dim,
        covariates=cov,
        val=None if val_idx is None else _part(data, val_idx),
        seed=seed,
        **fit_kw,
    )
    return model, val_idx, history


def _calibrate(
    data: CohortData, model: MILHead, val_idx: NDArray[np.int64], level: float
) -> dict[str, Any]:
    from ._train import predict

    bags, _, cov = _part(data, val_idx)
    proba, _ = predict(model, bags, cov)
    n_pat = len(set(data.patient_ids[val_idx].tolist()))
    return _calibrate_from_proba(
        data,
        val_idx,
        proba,
        level,
        f"the kept model's inner validation split of the training side: {len(val_idx)} "
        f"slide(s) from {n_pat} patient(s), also used for early stopping.",
    )


def _calibrate_from_proba(
    data: CohortData,
    idx: NDArray[np.int64],
    proba: Mapping[str, NDArray[np.float64]],
    level: float,
    source: str,
) -> dict[str, Any]:
    from ._evaluate import fit_calibration

    labels = {t: data.labels[t][idx] for t in data.tasks}
    return fit_calibration(labels, proba, data.tasks, level=level, source=source)


def _evaluate(
    data: CohortData,
    idx: NDArray[np.int64],
    proba: Mapping[str, NDArray[np.float64]],
    calibration: Mapping[str, Any] | None,
    config: TrainConfig,
) -> dict[str, Any]:
    from ._evaluate import evaluate_predictions

    return evaluate_predictions(
        {t: data.labels[t][idx] for t in data.tasks},
        proba,
        data.tasks,
        data.patient_ids[idx],
        calibration,
        n_boot=config.n_boot,
        seed=config.seed,
    )


def _store_tiling(stores: Path, slide_ids: Sequence[str]) -> TilingConfig | None:
    """The tiling every training store was cut with, or None.

    Recorded in the card so ``oncotrace score`` cuts new slides the same way. None when the
    stores disagree or predate the record (imported features have none).
    """
    from oncotrace.wsi import Store

    seen: list[TilingConfig] = []
    for sid in slide_ids:
        store = Store.find(stores / f"{sid}.zarr")
        if store is None or store.attrs.tiling is None:
            return None
        tiling = store.attrs.tiling
        if tiling not in seen:
            seen.append(tiling)
    return seen[0] if len(seen) == 1 else None


def _write_predictions(path: Path, data: CohortData, ev: Evaluation) -> None:
    """``predictions_heldout.csv``: one row per evaluated slide and task."""
    header = ["slide_id", "patient_id", "site", "fold", "task", "label", "predicted"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*header, "probabilities"])
        for row, case in enumerate(ev.case_idx):
            for task, names in data.class_names.items():
                p = ev.proba[task][row]
                y = data.labels[task][case]
                w.writerow(
                    [
                        data.slide_ids[case],
                        data.patient_ids[case],
                        data.sites[case],
                        int(ev.fold[row]),
                        task,
                        names[y] if y >= 0 else "",
                        names[int(np.argmax(p))],
                        ";".join(f"{n}={v:.4f}" for n, v in zip(names, p, strict=True)),
                    ]
                )
