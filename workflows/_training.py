"""``oncotrace train``: evaluate with patient-grouped splits, then fit the model to keep."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

import mil

Split = Literal["kfold", "site", "holdout"]


def _summary(metrics: Any) -> Any:
    """Metric dataclasses → plain JSON (estimates with CIs)."""
    if metrics is None:
        return None
    if is_dataclass(metrics) and not isinstance(metrics, type):
        return {k: _summary(v) for k, v in asdict(metrics).items()}
    if isinstance(metrics, dict):
        return {str(k): _summary(v) for k, v in metrics.items()}
    if isinstance(metrics, np.ndarray):
        return metrics.tolist()
    if isinstance(metrics, float | np.floating):
        return float(metrics) if np.isfinite(metrics) else None
    if isinstance(metrics, np.integer):
        return int(metrics)
    return metrics


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
) -> dict[str, Any]:
    """Run the evaluation the user asked for and save the final model in ``out``.

    ``kfold`` and ``site`` report out-of-fold metrics, then train the kept model on every case;
    ``holdout`` (7:3 by default, or the listed test sites) keeps the model trained on the
    training side and reports the held-out metrics.
    """
    t0 = time.perf_counter()
    data = mil.load_cohort(stores, labels, encoder, tasks, covariates)
    fit_kw: dict[str, Any] = {"head": head, "epochs": epochs, "lr": lr}
    if split == "holdout":
        if test_sites:
            train_idx, test_idx = mil.site_holdout(data.sites, test_sites, groups=data.patient_ids)
            evaluation = _fit_eval(data, train_idx, test_idx, seed, n_boot, fit_kw)
            model = evaluation.pop("model")
        else:
            model, ev = mil.train_and_evaluate(
                data, test_fraction=test_fraction, seed=seed, n_boot=n_boot, **fit_kw
            )
            evaluation = {"evaluation": ev}
    else:
        ev = mil.cross_validate(data, k=folds, split=split, seed=seed, n_boot=n_boot, **fit_kw)
        evaluation = {"evaluation": ev}
        val_idx_tr, val_idx = mil.inner_validation(
            np.arange(len(data)), data.labels[tasks[0]], data.patient_ids, seed=seed
        )
        model, _ = _fit(data, val_idx_tr, val_idx, seed, fit_kw)
    ev = evaluation["evaluation"]
    metrics = {task: _summary(m) for task, m in ev.metrics.items()}
    config = {
        "split": split,
        "folds": folds if split == "kfold" else None,
        "test_sites": test_sites,
        "test_fraction": test_fraction if split == "holdout" and not test_sites else None,
        "seed": seed,
        **fit_kw,
    }
    out.mkdir(parents=True, exist_ok=True)
    mil.save_model(out, model, config, metrics, data=data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_predictions(out / "predictions_heldout.csv", data, ev)
    return {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 1), "n_cases": len(data)}


def _fit(
    data: mil.CohortData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    seed: int,
    fit_kw: dict[str, Any],
) -> Any:
    def part(idx: np.ndarray) -> tuple[list[Any], dict[str, Any], Any]:
        cov = None if data.covariates is None else data.covariates[idx]
        return [data.bags[i] for i in idx], {t: y[idx] for t, y in data.labels.items()}, cov

    bags, labels, cov = part(train_idx)
    vb, vl, vc = part(val_idx)
    return mil.fit(
        bags,
        labels,
        tasks=data.tasks,
        in_dim=data.in_dim,
        covariates=cov,
        val=(vb, vl, vc),
        seed=seed,
        **fit_kw,
    )


def _fit_eval(
    data: mil.CohortData,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    seed: int,
    n_boot: int,
    fit_kw: dict[str, Any],
) -> dict[str, Any]:
    from mil._train import Evaluation, _metrics

    tr, va = mil.inner_validation(
        train_idx, data.labels[next(iter(data.tasks))], data.patient_ids, seed=seed
    )
    model, history = _fit(data, tr, va, seed, fit_kw)
    cov = None if data.covariates is None else data.covariates[test_idx]
    proba, attention = mil.predict(model, [data.bags[i] for i in test_idx], cov)
    ev = Evaluation(
        case_idx=np.asarray(test_idx),
        fold=np.zeros(len(test_idx), np.int64),
        proba=proba,
        attention=attention,
        metrics=_metrics(data, np.asarray(test_idx), proba, n_boot, seed),
        histories=[history],
    )
    return {"evaluation": ev, "model": model}


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
