"""``oncotrace train``: evaluate with patient-grouped splits, then fit the model to keep."""

from __future__ import annotations

import csv
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from oncotrace import mil

Split = Literal["kfold", "site", "holdout"]


def _summary(evaluations: dict[str, Any]) -> dict[str, Any]:
    """task -> :class:`mil.TaskEvaluation` (or None) → plain JSON with estimates and CIs."""
    return {t: None if ev is None else ev.summary() for t, ev in evaluations.items()}


def train_command(
    stores: Path,
    labels: Path,
    out: Path,
    *,
    encoder: str,
    head: str,
    tasks: list[str],
    covariates: list[str],
    split: Split,
    folds: int = 5,
    test_sites: list[str] | None = None,
    test_fraction: float = 0.3,
    epochs: int = 40,
    lr: float = 2e-4,
    seed: int = 0,
    n_boot: int = 1000,
    conformal_level: float = 0.9,
) -> dict[str, Any]:
    """Run the evaluation the user asked for and save the final model in ``out``.

    ``kfold`` and ``site`` report out-of-fold metrics, then train the kept model on every case;
    ``holdout`` (7:3 by default, or the listed test sites) keeps the model trained on the
    training side and reports the held-out metrics (with the kept model's calibration applied).
    The kept model's calibration (temperature, binary threshold, conformal quantile at
    ``conformal_level``) is fitted on its inner validation patients and stored in
    ``model.json`` under ``calibration``.
    """
    t0 = time.perf_counter()
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    data = mil.load_cohort(stores, labels, encoder, tasks, covariates)
    fit_kw: dict[str, Any] = {"head": head, "epochs": epochs, "lr": lr}
    if split == "holdout":
        if test_sites:
            train_idx, test_idx = mil.site_holdout(data.sites, test_sites, groups=data.patient_ids)
        else:
            # the same patient-grouped, stratified split mil.train_and_evaluate makes
            train_idx, test_idx = mil.grouped_split(
                data.labels[tasks[0]], data.patient_ids, test_fraction, seed
            )
        result = _fit_eval(data, train_idx, test_idx, seed, n_boot, fit_kw, conformal_level)
        ev, model, calibration = result["evaluation"], result["model"], result["calibration"]
        evaluations = ev.metrics
    else:
        ev = mil.cross_validate(data, k=folds, split=split, seed=seed, n_boot=n_boot, **fit_kw)
        evaluations = _evaluate(data, ev.case_idx, ev.proba, None, n_boot, seed)
        model, val_idx, _ = _fit_kept(data, np.arange(len(data)), seed, fit_kw)
        if val_idx is not None:
            calibration = _calibrate(data, model, val_idx, conformal_level)
        else:
            calibration = _calibrate_from_proba(
                data,
                ev.case_idx,
                ev.proba,
                conformal_level,
                "out-of-fold predictions of the cross-validation: the training cases were too "
                "few for a validation split, so the kept model was trained on every case "
                "without one and its calibration borrows the fold models' predictions "
                "(approximate).",
            )
    metrics = _summary(evaluations)
    config = {
        "split": split,
        "folds": folds if split == "kfold" else None,
        "test_sites": test_sites,
        "test_fraction": test_fraction if split == "holdout" and not test_sites else None,
        "seed": seed,
        "trained_at": trained_at,
        "labels": str(labels),
        **fit_kw,
    }
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"calibration": calibration}
    tiling = training_tiling(Path(stores), [str(s) for s in data.slide_ids])
    if tiling is not None:
        extra["tiling"] = tiling
    mil.save_model(out, model, config, metrics, data=data, extra=extra)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    _write_predictions(out / "predictions_heldout.csv", data, ev)
    return {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 1), "n_cases": len(data)}


def _part(data: mil.CohortData, idx: np.ndarray) -> tuple[list[Any], dict[str, Any], Any]:
    cov = None if data.covariates is None else data.covariates[idx]
    return [data.bags[i] for i in idx], {t: y[idx] for t, y in data.labels.items()}, cov


def _fit(
    data: mil.CohortData,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    seed: int,
    fit_kw: dict[str, Any],
) -> Any:
    bags, labels, cov = _part(data, train_idx)
    return mil.fit(
        bags,
        labels,
        tasks=data.tasks,
        in_dim=data.in_dim,
        covariates=cov,
        val=None if val_idx is None else _part(data, val_idx),
        seed=seed,
        **fit_kw,
    )


def _fit_kept(
    data: mil.CohortData, train_idx: np.ndarray, seed: int, fit_kw: dict[str, Any]
) -> tuple[Any, np.ndarray | None, dict[str, Any]]:
    """Fit on ``train_idx`` minus an inner validation split (early stopping, calibration).

    Returns ``(model, val_idx, history)``; ``val_idx`` is None when the training side has too
    few patients of a class for a split, and the model then trains for the full epochs.
    """
    try:
        tr, va = mil.inner_validation(
            train_idx, data.labels[next(iter(data.tasks))], data.patient_ids, seed=seed
        )
    except ValueError:
        model, history = _fit(data, np.asarray(train_idx), None, seed, fit_kw)
        return model, None, history
    model, history = _fit(data, tr, va, seed, fit_kw)
    return model, va, history


def _calibrate(
    data: mil.CohortData, model: Any, val_idx: np.ndarray, level: float
) -> dict[str, Any]:
    _, _, cov = _part(data, val_idx)
    proba, _ = mil.predict(model, [data.bags[i] for i in val_idx], cov)
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
    data: mil.CohortData,
    idx: np.ndarray,
    proba: dict[str, np.ndarray],
    level: float,
    source: str,
) -> dict[str, Any]:
    labels = {t: data.labels[t][idx] for t in data.tasks}
    return mil.fit_calibration(labels, proba, data.tasks, level=level, source=source)


def _evaluate(
    data: mil.CohortData,
    idx: np.ndarray,
    proba: dict[str, np.ndarray],
    calibration: dict[str, Any] | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    return mil.evaluate_predictions(
        {t: data.labels[t][idx] for t in data.tasks},
        proba,
        data.tasks,
        data.patient_ids[idx],
        calibration,
        n_boot=n_boot,
        seed=seed,
    )


def _fit_eval(
    data: mil.CohortData,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    seed: int,
    n_boot: int,
    fit_kw: dict[str, Any],
    conformal_level: float = 0.9,
) -> dict[str, Any]:
    """Fit on the training side, calibrate on its validation patients, evaluate on the test side."""
    model, val_idx, history = _fit_kept(data, train_idx, seed, fit_kw)
    if val_idx is not None:
        calibration = _calibrate(data, model, val_idx, conformal_level)
    else:
        calibration = {
            "version": 1,
            "source": None,
            "level": conformal_level,
            "tasks": {},
            "notes": [
                "not fitted: the training side has too few patients of a class for a "
                "validation split (or for out-of-fold predictions); threshold 0.5 / argmax "
                "and no prediction sets."
            ],
        }
    test_idx = np.asarray(test_idx)
    _, _, cov = _part(data, test_idx)
    proba, attention = mil.predict(model, [data.bags[i] for i in test_idx], cov)
    ev = mil.Evaluation(
        case_idx=test_idx,
        fold=np.zeros(len(test_idx), np.int64),
        proba=proba,
        attention=attention,
        metrics=_evaluate(data, test_idx, proba, calibration, n_boot, seed),
        histories=[history],
    )
    return {"evaluation": ev, "model": model, "calibration": calibration}


def _write_predictions(path: Path, data: mil.CohortData, ev: Any) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "slide_id",
                "patient_id",
                "site",
                "fold",
                "task",
                "label",
                "predicted",
                "probabilities",
            ]
        )
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


def training_tiling(stores: Path, slide_ids: list[str]) -> dict[str, Any] | None:
    """The tiling every training store was cut with (``wsi.TilingConfig`` fields), or None.

    Recorded in ``model.json`` so ``oncotrace score`` cuts new slides the same way. None when
    the stores disagree (or predate the record): scoring then uses its command-line values.
    """
    from oncotrace.wsi import Store

    seen: list[dict[str, Any]] = []
    for sid in slide_ids:
        store = Store.find(stores / f"{sid}.zarr")
        if store is None or store.attrs.tiling is None:
            return None
        tiling = store.attrs.tiling.as_attrs()
        if tiling not in seen:
            seen.append(tiling)
    return seen[0] if len(seen) == 1 else None
