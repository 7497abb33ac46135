"""``predictions.csv``: one layout for ``oncotrace score`` and ``oncotrace evaluate``.

One row per slide and task. Columns, in order:

``slide_id, patient_id, site, task``
    the case; ``patient_id``/``site`` are empty when the input did not give them.
``true_class``
    the label (``evaluate``); empty for ``score`` and for unlabelled cases.
``predicted_class``
    the model's call after calibration (the binary threshold fitted at training).
``p_<class>``
    calibrated probability of each class (temperature-scaled); one column per class name
    over all tasks, empty for classes of another task.
``uncalibrated_p_<class>``
    the head's softmax before calibration.
``top_k``
    the most probable classes, best first, ``|``-separated (at most 3).
``conformal_set``
    the conformal prediction set at the model's level, ``|``-separated; empty when the model
    has no conformal calibration.
``n_tiles``
    tiles in the slide's bag.
``ood_distance, ood``
    the slide's distance from the training data (see ``mil.OODStats``) and ``True``/``False``
    against the threshold; empty when the model records no training statistics.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from oncotrace.wsi import atomic_write_text

#: Classes listed in ``top_k``.
TOP_K = 3

#: The columns before the per-class probabilities.
LEAD_COLUMNS = ("slide_id", "patient_id", "site", "task", "true_class", "predicted_class")
#: The columns after them.
TAIL_COLUMNS = ("top_k", "conformal_set", "n_tiles", "ood_distance", "ood")


@dataclass(frozen=True)
class PredictionRow:
    """One slide's prediction for one task, as a row of ``predictions.csv``."""

    slide_id: str
    task: str
    classes: tuple[str, ...]
    proba: Sequence[float]
    predicted_class: str
    uncalibrated: Sequence[float] | None = None
    true_class: str = ""
    patient_id: str = ""
    site: str = ""
    conformal_set: Sequence[str] | None = None
    n_tiles: int | None = None
    ood_distance: float | None = None
    ood: bool | None = None

    @property
    def top_k(self) -> list[str]:
        order = np.argsort(-np.asarray(self.proba, float), kind="stable")
        return [self.classes[int(i)] for i in order[: min(TOP_K, len(self.classes))]]


def header_for(rows: Sequence[PredictionRow]) -> list[str]:
    """The header of ``predictions.csv`` for ``rows`` (class columns in first-seen order)."""
    classes = list(dict.fromkeys(c for r in rows for c in r.classes))
    return [
        *LEAD_COLUMNS,
        *(f"p_{c}" for c in classes),
        *(f"uncalibrated_p_{c}" for c in classes),
        *TAIL_COLUMNS,
    ]


def write_predictions(path: Path, rows: Sequence[PredictionRow]) -> Path:
    """Write ``rows`` to ``path`` atomically (a temporary file renamed into place; removed again
    if the write fails, e.g. on a full disk, so the previous table stays as it was)."""
    header = header_for(rows)
    classes = [h.removeprefix("p_") for h in header if h.startswith("p_")]
    fh = io.StringIO(newline="")  # small: built in memory, written in one go
    w = csv.writer(fh)
    w.writerow(header)
    for r in rows:
        p = dict(zip(r.classes, r.proba, strict=True))
        raw = dict(zip(r.classes, r.uncalibrated, strict=True)) if r.uncalibrated else {}
        w.writerow(
            [
                r.slide_id,
                r.patient_id,
                r.site,
                r.task,
                r.true_class,
                r.predicted_class,
                *(f"{p[c]:.6f}" if c in p else "" for c in classes),
                *(f"{raw[c]:.6f}" if c in raw else "" for c in classes),
                "|".join(r.top_k),
                "" if r.conformal_set is None else "|".join(r.conformal_set),
                "" if r.n_tiles is None else r.n_tiles,
                "" if r.ood_distance is None else f"{r.ood_distance:.4f}",
                "" if r.ood is None else r.ood,
            ]
        )
    atomic_write_text(path, fh.getvalue())
    return path
