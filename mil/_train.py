"""Training and evaluation of MIL heads on embedded slides.

``load_cohort`` reads ``labels.csv`` and the embedded tile stores into a :class:`CohortData`;
``fit`` trains a head one case at a time; ``predict`` returns class probabilities and attention;
``cross_validate`` runs a patient-grouped evaluation with out-of-fold predictions;
``save_model`` / ``load_model`` write and read ``model.safetensors`` + the model card
``model.json`` (never pickle).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from oncotrace.wsi import Store, TilingConfig, read_csv_rows

from ._card import ModelCard
from ._splits import grouped_kfold, inner_validation, site_holdout

if TYPE_CHECKING:
    from ._card import ModelEncoder
    from ._heads import MILHead
    from ._protocol import TrainConfig

FloatArray = NDArray[np.float32]
IntArray = NDArray[np.int64]

_RESERVED = ("slide_id", "patient_id", "site")
_SEX = {"m": 0.0, "male": 0.0, "f": 1.0, "female": 1.0}


# --------------------------------------------------------------------------------------------
# Cohort loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortData:
    """Bags, labels and covariates of a cohort, row-aligned by case (slide).

    Attributes
    ----------
    slide_ids, patient_ids, sites : (N,) str ndarrays.
    bags : list of N (N_i, D) float32 ndarrays of tile features.
    coords : list of N (N_i, 2) int64 ndarrays, level-0 ``(x, y)`` of each tile.
    tile_size_level0 : (N,) int64 ndarray, tile side in level-0 px per slide.
    labels : dict task -> (N,) int64 class indices (-1 where the label is missing).
    class_names : dict task -> tuple of class names (sorted), indexed by ``labels``.
    covariates : (N, K) float32 standardised covariates, or None.
    covariate_names : names of the K covariates.
    covariate_mean, covariate_std : (K,) float64, the standardisation applied.
    encoder, in_dim : the encoder whose features were loaded and its embedding dim.
    """

    slide_ids: NDArray[np.str_]
    patient_ids: NDArray[np.str_]
    sites: NDArray[np.str_]
    bags: list[FloatArray]
    coords: list[IntArray]
    tile_size_level0: IntArray
    labels: dict[str, IntArray]
    class_names: dict[str, tuple[str, ...]]
    covariates: FloatArray | None
    covariate_names: tuple[str, ...]
    covariate_mean: NDArray[np.float64]
    covariate_std: NDArray[np.float64]
    encoder: str
    in_dim: int

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def tasks(self) -> dict[str, tuple[str, ...]]:
        return dict(self.class_names)


def _covariate_column(name: str, values: list[str], csv_path: Path) -> NDArray[np.float64]:
    values = [v or "" for v in values]  # a row shorter than the header gives None
    missing = [i for i, v in enumerate(values) if v.strip().lower() in MISSING_LABELS]
    if missing:
        raise ValueError(
            f"{csv_path}: covariate {name!r} is missing ({values[missing[0]].strip() or 'empty'!r})"
            f" in {len(missing)} row(s) (e.g. data row {missing[0] + 1}, line {missing[0] + 2})."
            " Fix: impute it (and add a missingness indicator column) or drop the covariate."
        )
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        pass
    else:
        rows = np.flatnonzero(~np.isfinite(numbers))
        if rows.size:
            first = int(rows[0])
            more = f" and {rows.size - 1} more row(s)" if rows.size > 1 else ""
            raise ValueError(
                f"{csv_path}: covariate {name!r} is {values[first].strip()!r} in data row"
                f" {first + 1} (line {first + 2}){more};"
                " covariates must be finite numbers. Fix: correct the cell in the labels file"
                " (a unit or export error?), or impute it."
            )
        return numbers
    lowered = {v.strip().lower() for v in values}
    if lowered <= set(_SEX):
        return np.array([_SEX[v.strip().lower()] for v in values], dtype=np.float64)
    bad = sorted({v for v in values if not _is_float(v)})[:5]
    raise ValueError(
        f"{csv_path}: covariate {name!r} is not numeric (values like {bad}). Covariates must be "
        "numbers, or M/F for sex; one-hot encode other categories into numeric columns."
    )


#: Label cells read as "no label" (compared case-insensitively, after stripping): the case is
#: left out of that task's loss and metrics and still counts for the other tasks. The spellings
#: spreadsheets and pandas write for a missing value; ``None`` is not among them, since "none"
#: can be a class (e.g. no nodal involvement).
MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "null", "<na>", "#n/a", "#na"})


def _label_value(cell: str | None) -> str:
    """A label cell as a class name, or ``""`` when it is missing (:data:`MISSING_LABELS`; a row
    shorter than the header gives None)."""
    value = (cell or "").strip()
    return "" if value.lower() in MISSING_LABELS else value


def _refuse_case_variants(task: str, values: Sequence[str], csv_path: Path) -> None:
    """Refuse one class written in two letter cases (``Benign`` / ``benign``): two classes."""
    spellings: dict[str, dict[str, int]] = {}
    for v in values:
        if v:
            counts = spellings.setdefault(v.casefold(), {})
            counts[v] = counts.get(v, 0) + 1
    clashes = [c for c in spellings.values() if len(c) > 1]
    if not clashes:
        return
    counts = clashes[0]
    keep = max(counts, key=lambda v: (counts[v], v))  # the commoner spelling
    shown = " and ".join(f"{v!r} ({n} row{'s' * (n > 1)})" for v, n in sorted(counts.items()))
    others = ", ".join(repr(v) for v in sorted(counts) if v != keep)
    more = f" ({len(clashes) - 1} more class(es) like this)" if len(clashes) > 1 else ""
    raise ValueError(
        f"{csv_path}: column {task!r} spells one class two ways: {shown}{more}; they would"
        f" become different classes. Fix: write one spelling in every row of {task!r} (e.g."
        f" replace {others} with {keep!r})."
    )


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def load_cohort(
    stores_dir: str | Path,
    labels_csv: str | Path,
    encoder: str,
    tasks: Sequence[str] = ("label",),
    covariates: Sequence[str] = (),
    *,
    covariate_stats: Mapping[str, Sequence[float]] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> CohortData:
    """Read ``labels.csv`` and the features of ``stores_dir/<slide_id>.zarr`` for each row.

    Parameters
    ----------
    stores_dir : folder of tile stores embedded with ``encoder``.
    labels_csv : CSV with columns ``slide_id, patient_id`` (``site`` optional: needed only for
        site splits; missing, every slide gets site ``""``), one column per task and one per
        covariate. A missing task cell (empty, ``NA``, ``N/A``, ``NaN``, ``null``, ...: see
        :data:`MISSING_LABELS`) becomes label -1: the case is ignored in that task's loss and
        metrics and still counts for the other tasks. One class spelled in two letter cases
        (``Benign`` / ``benign``) is an error.
    encoder : name of the ``features/<encoder>`` array to load: a registered encoder (its dim is
        checked) or any name features were imported or embedded under (dims must agree across
        the stores).
    tasks : task columns; class names are the sorted distinct values (at least two).
    covariates : numeric columns (``sex`` may be M/F, coded M=0, F=1), standardised.
    covariate_stats : ``{"mean": [...], "std": [...]}`` to reuse a trained model's
        standardisation instead of computing it from this cohort.
    class_names : dict task -> class names of a trained model: labels are indexed in that order
        and a cohort may then hold a single class (an external test set of one class); a value
        outside the model's classes is an error.

    Returns
    -------
    CohortData
    """
    from ._embed import read_features
    from ._encoders import ENCODERS, encoder_config

    stores_dir, labels_csv = Path(stores_dir), Path(labels_csv)
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv}: labels file not found.")
    _, rows = read_csv_rows(labels_csv)  # a UTF-8 BOM (Excel) is fine; UTF-16 is refused
    if not rows:
        raise ValueError(f"{labels_csv}: no data rows.")
    columns = list(rows[0])
    ids = [c for c in _RESERVED[:2] if c not in columns]
    if ids:
        raise ValueError(
            f"{labels_csv}: no {' and no '.join(repr(c) for c in ids)} column; the file has"
            f" {columns}. Fix: name the header cells slide_id (the tile store's name without"
            " .zarr) and patient_id exactly (a labels file needs both, one row per slide)."
        )
    need = [*tasks, *covariates]
    absent = [c for c in need if c not in columns]
    if absent:
        raise ValueError(
            f"{labels_csv}: missing column(s) {absent}; the file has {columns}. Check the task "
            "and covariate names."
        )
    if not tasks:
        raise ValueError("pass at least one task column.")
    slide_ids = [r["slide_id"] for r in rows]
    dup = sorted({s for s in slide_ids if slide_ids.count(s) > 1})
    if dup:
        raise ValueError(f"{labels_csv}: slide_id(s) {dup[:5]} appear more than once.")
    unknown = [s for s in slide_ids if not (stores_dir / f"{s}.zarr").exists()]
    if unknown:
        raise FileNotFoundError(
            f"{labels_csv}: {len(unknown)} slide(s) have no tile store in {stores_dir}: "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}. Fix: tile and embed them "
            f"(`oncotrace tile` then `oncotrace embed --encoder {encoder}`), or drop their rows."
        )

    labels: dict[str, IntArray] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    for task in tasks:
        values = [_label_value(r[task]) for r in rows]
        _refuse_case_variants(task, values, labels_csv)
        if class_names is not None and task in class_names:
            names = tuple(class_names[task])
            foreign = sorted({v for v in values if v} - set(names))
            if foreign:
                raise ValueError(
                    f"{labels_csv}: task {task!r} has value(s) {foreign} the model does not know;"
                    f" its classes are {list(names)}. Fix the labels or use a model trained on"
                    " those classes."
                )
        else:
            names = tuple(sorted({v for v in values if v}))
        if len(names) < 2:
            raise ValueError(
                f"{labels_csv}: task {task!r} has {len(names)} class(es) {list(names)}; a "
                "classifier needs at least two. Check the column or drop the task."
            )
        index = {n: i for i, n in enumerate(names)}
        labels[task] = np.array([index[v] if v else -1 for v in values], dtype=np.int64)
        names_of[task] = names

    cov: FloatArray | None = None
    k = len(covariates)
    mean, std = np.zeros(k), np.ones(k)
    if k:
        raw = np.stack(
            [_covariate_column(c, [r[c] for r in rows], labels_csv) for c in covariates], axis=1
        )
        if covariate_stats is not None:
            mean = np.asarray(covariate_stats["mean"], dtype=np.float64)
            std = np.asarray(covariate_stats["std"], dtype=np.float64)
            if mean.shape != (k,) or std.shape != (k,):
                raise ValueError(f"covariate_stats must give {k} means and stds.")
        else:
            mean, std = raw.mean(axis=0), raw.std(axis=0)
            std = np.where(std > 0, std, 1.0)  # a constant covariate stays 0, not NaN
        cov = ((raw - mean) / std).astype(np.float32)

    # imported or custom features (an unregistered name): the first store sets the dim
    dim = encoder_config(encoder).dim if encoder in ENCODERS else None
    bags: list[FloatArray] = []
    coords: list[IntArray] = []
    tile_sizes: list[int] = []
    for sid in slide_ids:
        store = stores_dir / f"{sid}.zarr"
        feats, xy, attrs = read_features(store, encoder)
        found = attrs.encoder.get("name")
        if found is not None and found != encoder:
            raise ValueError(
                f"{store}: features under {encoder!r} were written by encoder {found!r}. "
                f"Fix: re-embed with `oncotrace embed {store} --encoder {encoder} --overwrite`."
            )
        if feats.ndim == 2 and dim is None:
            dim = int(feats.shape[1])
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise ValueError(
                f"{store}: features/{encoder} have shape {feats.shape} but {encoder!r} features"
                f" have dim {dim} (the encoder's, or the first store's). Fix: re-embed or"
                " re-import that slide with the same encoder as the others."
            )
        if feats.shape[0] == 0:
            raise ValueError(f"{store}: no tiles; drop the slide or check tissue detection.")
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{store}: NaN/inf in the features of {int(bad.sum())} tile(s) (e.g. rows "
                f"{np.flatnonzero(bad)[:5].tolist()}). Fix: re-embed (try fp32 precision)."
            )
        found_store = Store.find(store)
        ts = None if found_store is None else found_store.attrs.tile_size_level0
        tile_sizes.append(0 if ts is None else round(float(ts[0])))
        bags.append(feats)
        coords.append(np.asarray(xy, dtype=np.int64))

    assert dim is not None  # rows is non-empty, so the first store set it
    return CohortData(
        slide_ids=np.array(slide_ids, dtype=str),
        patient_ids=np.array([r["patient_id"] for r in rows], dtype=str),
        sites=np.array([r.get("site") or "" for r in rows], dtype=str),
        bags=bags,
        coords=coords,
        tile_size_level0=np.array(tile_sizes, dtype=np.int64),
        labels=labels,
        class_names=names_of,
        covariates=cov,
        covariate_names=tuple(covariates),
        covariate_mean=np.asarray(mean, dtype=np.float64),
        covariate_std=np.asarray(std, dtype=np.float64),
        encoder=encoder,
        in_dim=dim,
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _label_arrays(
    labels: Mapping[str, ArrayLike], tasks: Mapping[str, Sequence[str]], n: int
) -> dict[str, IntArray]:
    missing = [t for t in tasks if t not in labels]
    if missing:
        raise ValueError(f"labels lack task(s) {missing}; pass labels for every task.")
    out = {}
    for task, classes in tasks.items():
        y = np.asarray(labels[task]).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(
                f"labels[{task!r}] must be integer class indices (-1 = unknown), got {y.dtype}."
            )
        if y.size != n:
            raise ValueError(f"labels[{task!r}] has {y.size} entries for {n} bags.")
        if y.size and (y.min() < -1 or y.max() >= len(classes)):
            raise ValueError(
                f"labels[{task!r}] must lie in -1..{len(classes) - 1} (classes {list(classes)})."
            )
        out[task] = y.astype(np.int64)
    return out


def _class_weights(y: IntArray, n_classes: int, mode: str | None) -> NDArray[np.float32]:
    if mode is None:
        return np.ones(n_classes, np.float32)
    if mode != "balanced":
        raise ValueError(f"class_weights must be 'balanced' or None, got {mode!r}.")
    known = y[y >= 0]
    counts = np.bincount(known, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, known.size / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


Bag = ArrayLike | Mapping[str, ArrayLike | None]
"""One case: an (N, D) array, or for a multi-modal head a dict modality -> (N_m, D_m) array
(``None`` or absent for a missing modality)."""


def _dims(in_dim: int | Mapping[str, int]) -> dict[str, int] | int:
    if isinstance(in_dim, Mapping):
        if not in_dim:
            raise ValueError("in_dim must name at least one modality.")
        return {str(m): int(d) for m, d in in_dim.items()}
    return int(in_dim)


def _check_shape(shape: tuple[int, ...], dim: int, where: str) -> None:
    if len(shape) != 2 or shape[1] != dim or shape[0] == 0:
        raise ValueError(f"{where} has shape {tuple(shape)}; expected (N_i >= 1, {dim}).")


def _check_bags(bags: Sequence[Bag], in_dim: dict[str, int] | int, what: str) -> None:
    """Shapes of every bag, without reading lazy bags (``bags.shapes``)."""
    from ._heads import present_modalities

    shapes = getattr(bags, "shapes", None)
    for i in range(len(bags)):
        if isinstance(in_dim, dict):
            if shapes is not None:
                raise TypeError(f"{what}: lazy bag sequences are single-modality.")
            given = present_modalities(bags[i], in_dim, f"{what} {i}")
            for m, x in given.items():
                _check_shape(np.shape(x), in_dim[m], f"{what} {i} modality {m!r}")
        else:
            single: Any = bags[i] if shapes is None else None
            if isinstance(single, Mapping):
                raise TypeError(
                    f"{what} {i} is a dict of modalities but in_dim is a single dim; pass "
                    "in_dim={modality: dim} for a multi-modal head."
                )
            shape = tuple(shapes[i]) if shapes is not None else np.shape(single)
            _check_shape(shape, in_dim, f"{what} {i}")


def _as_input(
    bag: Bag, rng: np.random.Generator | None = None, max_instances: int | None = None
) -> Any:
    """A case as the head takes it: a float32 tensor, or a dict modality -> tensor."""
    import torch

    def one(x: ArrayLike) -> Any:
        a = np.asarray(x, dtype=np.float32)
        if rng is not None and max_instances is not None and a.shape[0] > max_instances:
            a = a[np.sort(rng.choice(a.shape[0], max_instances, replace=False))]
        return torch.from_numpy(np.ascontiguousarray(a))

    if isinstance(bag, Mapping):
        return {m: one(x) for m, x in bag.items() if x is not None}
    return one(bag)


#: Bags sampled to estimate the instance-feature standardisation (all when fewer).
STATS_MAX_BAGS = 256


def _instance_stats(
    bags: Sequence[Bag], dims: dict[str, int] | int, rng: np.random.Generator
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Per-modality mean and std of the instance features of (a sample of) the training bags."""
    from ._bags import prefetch_bags
    from ._heads import _SINGLE

    n = len(bags)
    pick = np.sort(rng.choice(n, STATS_MAX_BAGS, replace=False)) if n > STATS_MAX_BAGS else range(n)
    sums: dict[str, list[Any]] = {}
    for _, bag in prefetch_bags(bags, pick):
        parts = bag.items() if isinstance(bag, Mapping) else [(_SINGLE, bag)]
        for m, x in parts:
            if x is None:
                continue
            a = np.asarray(x, dtype=np.float64)
            acc = sums.setdefault(m, [0, np.zeros(a.shape[1]), np.zeros(a.shape[1])])
            acc[0] += a.shape[0]
            acc[1] += a.sum(axis=0)
            acc[2] += np.square(a).sum(axis=0)
    out = {}
    for m, (count, s1, s2) in sums.items():
        mean = s1 / count
        out[m] = (mean, np.sqrt(np.maximum(s2 / count - mean**2, 0.0)))
    return out


def _attention_numpy(a: Any) -> Any:
    import torch

    if isinstance(a, Mapping):
        return {m: _attention_numpy(v) for m, v in a.items()}
    return a.numpy().astype(np.float32) if isinstance(a, torch.Tensor) else a


def _epoch_loss(
    model: MILHead,
    bags: Sequence[Bag],
    labels: Mapping[str, IntArray],
    covariates: FloatArray | None,
    weights: Mapping[str, Any],
) -> float:
    import torch
    import torch.nn.functional as F

    from ._bags import prefetch_bags

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i, bag in prefetch_bags(bags, range(len(bags))):
            cov = None if covariates is None else torch.from_numpy(covariates[i])
            out = model(_as_input(bag), cov)
            for task, w in weights.items():
                y = int(labels[task][i])
                if y >= 0:
                    logit = out.logits[task].unsqueeze(0)
                    total += float(F.cross_entropy(logit, torch.tensor([y]), weight=w))
    return total / max(len(bags), 1)


def fit(
    bags: Sequence[Bag],
    labels: Mapping[str, ArrayLike],
    *,
    tasks: Mapping[str, Sequence[str]],
    in_dim: int | Mapping[str, int],
    head: str = "abmil-gated",
    covariates: ArrayLike | None = None,
    epochs: int = 40,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    val: tuple[Sequence[Bag], Mapping[str, ArrayLike]]
    | tuple[Sequence[Bag], Mapping[str, ArrayLike], ArrayLike | None]
    | None = None,
    patience: int = 8,
    seed: int = 0,
    max_instances: int | None = None,
    class_weights: Literal["balanced"] | None = "balanced",
    head_options: Mapping[str, Any] | None = None,
    standardise: bool = True,
) -> tuple[MILHead, dict[str, Any]]:
    """Train a MIL head one case at a time (batch size 1) with AdamW.

    Loss per case: the sum over tasks of class-weighted cross entropy (cases with label -1 for a
    task skip it) plus the head's auxiliary loss.

    Parameters
    ----------
    bags : N cases. Each an (N_i, D) array of instance features, or, when ``in_dim`` is a dict,
        a dict modality -> (N_m, D_m) array (a missing modality ``None`` or absent). Any
        ``Sequence`` works: :class:`mil.ZarrBags` reads each case from its store when needed,
        the next ones on a background thread while the model trains.
    labels : dict task -> (N,) int class indices into ``tasks[task]`` (-1 = unknown).
    tasks : dict task -> class names.
    in_dim : D, or dict modality -> D_m for a multi-modal head (one attention pooling per
        modality, fused before the classifiers).
    head : a registered head name (:func:`mil.list_heads`).
    covariates : (N, K) float array of standardised covariates, optional.
    epochs : maximum passes over the training cases.
    lr, weight_decay : AdamW settings.
    val : ``(bags, labels)`` or ``(bags, labels, covariates)`` for early stopping: training stops
        after ``patience`` epochs without a lower validation loss and the best weights are kept.
    seed : seeds torch and the case order / instance subsampling.
    max_instances : random subsample of at most this many instances per bag (and modality) and
        step, for big bags (all instances are used for validation and prediction).
    class_weights : ``"balanced"`` (inverse class frequency) or None.
    head_options : further :func:`mil.create_head` options (``hidden``, ``dropout``, ...).
    standardise : standardise each instance feature with the mean and std of the training
        instances (of at most :data:`STATS_MAX_BAGS` sampled bags), stored in the head so
        prediction applies the same; hand-crafted features span six orders of magnitude.

    Returns
    -------
    model : the trained head, in eval mode.
    history : dict with ``train_loss`` and ``val_loss`` per epoch, ``best_epoch``, ``epochs_run``.

    Notes
    -----
    Runs on the CPU with the caller's ``torch.get_num_threads()``; the global torch RNG is
    re-seeded by this call. Same inputs and seed give the same model.
    """
    import torch
    import torch.nn.functional as F

    from ._bags import prefetch_bags
    from ._heads import create_head

    n = len(bags)
    if n == 0:
        raise ValueError("no training bags.")
    dims = _dims(in_dim)
    _check_bags(bags, dims, "bag")
    y = _label_arrays(labels, tasks, n)
    cov = None if covariates is None else np.asarray(covariates, dtype=np.float32).reshape(n, -1)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")

    val_data: tuple[Sequence[Bag], dict[str, IntArray], FloatArray | None] | None = None
    if val is not None:
        vb = val[0]
        _check_bags(vb, dims, "validation bag")
        vc = val[2] if len(val) == 3 else None
        val_data = (
            vb,
            _label_arrays(val[1], tasks, len(vb)),
            None if vc is None else np.asarray(vc, dtype=np.float32).reshape(len(vb), -1),
        )

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_head(
        head,
        dims,
        tasks,
        covariates=0 if cov is None else cov.shape[1],
        **dict(head_options or {}),
    )
    if standardise:
        model.set_input_stats(_instance_stats(bags, dims, rng))
    weights = {
        t: torch.from_numpy(_class_weights(y[t], len(c), class_weights)) for t, c in tasks.items()
    }
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "best_epoch": None}
    best = math.inf
    best_state: dict[str, Any] | None = None
    stale = 0
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for i, bag in prefetch_bags(bags, rng.permutation(n)):
            x = _as_input(bag, rng, max_instances)
            case_labels = {t: int(y[t][i]) for t in tasks if y[t][i] >= 0}
            out = model(x, None if cov is None else torch.from_numpy(cov[i]), labels=case_labels)
            loss = out.aux_loss
            for t, yi in case_labels.items():
                loss = loss + F.cross_entropy(
                    out.logits[t].unsqueeze(0), torch.tensor([yi]), weight=weights[t]
                )
            if not loss.requires_grad:  # no labelled task for this case
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += float(loss.detach())
        history["train_loss"].append(running / n)
        if val_data is None:
            continue
        vloss = _epoch_loss(model, val_data[0], val_data[1], val_data[2], weights)
        history["val_loss"].append(vloss)
        if vloss < best - 1e-6:
            best, stale = vloss, 0
            best_state = copy.deepcopy(model.state_dict())
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= patience:
                break
    history["epochs_run"] = len(history["train_loss"])
    if best_state is not None:
        model.load_state_dict(best_state)
    elif val_data is None:
        history["best_epoch"] = history["epochs_run"] - 1
    return model.eval(), history


def predict(
    model: MILHead,
    bags: Sequence[Bag],
    covariates: ArrayLike | None = None,
) -> tuple[dict[str, NDArray[np.float64]], list[dict[str, Any]]]:
    """Class probabilities and attention for each case.

    Parameters
    ----------
    model : a trained head.
    bags : N cases, as for :func:`fit` (arrays, dicts of modality arrays, or lazy bags).
    covariates : (N, K) array if the head takes covariates.

    Returns
    -------
    proba : dict task -> (N, C) float64 ndarray, rows summing to 1, columns in class order.
    attention : list of N dicts task -> (N_i,) float32 ndarray of attention over the tiles (for
        a multi-modal head: task -> modality -> (N_m,) array).
    """
    import torch

    from ._bags import prefetch_bags

    model.eval()
    n = len(bags)
    cov = None if covariates is None else np.asarray(covariates, dtype=np.float32).reshape(n, -1)
    tasks = model.config.tasks
    proba = {t: np.zeros((n, len(c)), np.float64) for t, c in tasks.items()}
    attention: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, bag in prefetch_bags(bags, range(n)):
            out = model(_as_input(bag), None if cov is None else torch.from_numpy(cov[i]))
            for t in tasks:
                proba[t][i] = torch.softmax(out.logits[t].double(), dim=-1).numpy()
            attention.append({t: _attention_numpy(out.attention[t]) for t in tasks})
    return proba, attention


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Held-out predictions and metrics.

    Attributes
    ----------
    case_idx : (M,) int64 indices into the cohort of the evaluated cases.
    fold : (M,) int64 fold of each evaluated case.
    proba : dict task -> (M, C) probabilities (out-of-fold for cross-validation).
    attention : list of M dicts task -> (N_i,) attention.
    metrics : dict task -> BinaryMetrics or MulticlassMetrics (patient-grouped bootstrap), or
        None when the evaluated cases hold a single class of that task.
    histories : one training history per fold.
    """

    case_idx: IntArray
    fold: IntArray
    proba: dict[str, NDArray[np.float64]]
    attention: list[dict[str, NDArray[np.float32]]]
    metrics: dict[str, Any]
    histories: list[dict[str, Any]] = field(default_factory=list)


def _subset(data: CohortData, idx: IntArray) -> tuple[list[FloatArray], dict[str, IntArray], Any]:
    return (
        [data.bags[i] for i in idx],
        {t: y[idx] for t, y in data.labels.items()},
        None if data.covariates is None else data.covariates[idx],
    )


def _metrics(
    data: CohortData,
    idx: IntArray,
    proba: Mapping[str, NDArray[np.float64]],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    from ._metrics import binary_metrics, multiclass_metrics

    out: dict[str, Any] = {}
    for task, names in data.class_names.items():
        y = data.labels[task][idx]
        keep = y >= 0
        groups = data.patient_ids[idx][keep]
        p = proba[task][keep]
        if len(np.unique(y[keep])) < 2:
            out[task] = None  # one class on the evaluated side: no AUC
        elif len(names) == 2:
            out[task] = binary_metrics(y[keep], p[:, 1], groups=groups, n_boot=n_boot, seed=seed)
        else:
            out[task] = multiclass_metrics(
                y[keep], p, class_names=names, groups=groups, n_boot=n_boot, seed=seed
            )
    return out


def _run_folds(
    data: CohortData,
    folds: Sequence[tuple[IntArray, IntArray]],
    *,
    val_fraction: float,
    seed: int,
    n_boot: int,
    fit_kw: Mapping[str, Any],
) -> tuple[Evaluation, MILHead]:
    first = next(iter(data.class_names))
    n = len(data)
    proba = {t: np.full((n, len(c)), np.nan) for t, c in data.class_names.items()}
    attention: list[dict[str, Any]] = [{} for _ in range(n)]
    fold_of = np.full(n, -1, np.int64)
    histories = []
    model = None
    for f, (train_idx, test_idx) in enumerate(folds):
        val = None
        fit_idx = train_idx
        if val_fraction > 0:
            fit_idx, val_idx = inner_validation(
                train_idx, data.labels[first], data.patient_ids, val_fraction, seed + f
            )
            val = _subset(data, val_idx)
        b, y, c = _subset(data, fit_idx)
        model, hist = fit(
            b,
            y,
            tasks=data.class_names,
            in_dim=data.in_dim,
            covariates=c,
            val=val,
            seed=seed + f,
            **fit_kw,
        )
        histories.append(hist)
        tb, _, tc = _subset(data, test_idx)
        p, att = predict(model, tb, tc)
        for t in proba:
            proba[t][test_idx] = p[t]
        for j, i in enumerate(test_idx):
            attention[i] = att[j]
        fold_of[test_idx] = f
    if model is None:
        raise ValueError("no folds to run.")
    idx = np.flatnonzero(fold_of >= 0).astype(np.int64)
    ev = Evaluation(
        case_idx=idx,
        fold=fold_of[idx],
        proba={t: p[idx] for t, p in proba.items()},
        attention=[attention[i] for i in idx],
        metrics=_metrics(data, idx, {t: p[idx] for t, p in proba.items()}, n_boot, seed),
        histories=histories,
    )
    return ev, model


def cross_validate(
    data: CohortData,
    *,
    k: int = 5,
    split: Literal["kfold", "site"] = "kfold",
    val_fraction: float = 0.2,
    seed: int = 0,
    n_boot: int = 1000,
    **fit_kw: Any,
) -> Evaluation:
    """Patient-grouped k-fold (stratified on the first task) or leave-one-site-out evaluation.

    Parameters
    ----------
    data : from :func:`load_cohort`.
    k : folds for ``split="kfold"``.
    split : ``"kfold"``, or ``"site"`` for one fold per site holding that site out.
    val_fraction : share of each fold's training patients held out for early stopping (0: none,
        train for ``epochs``).
    seed : split, initialisation and bootstrap seed.
    n_boot : bootstrap resamples for the metric CIs.
    **fit_kw : passed to :func:`fit` (``head``, ``epochs``, ``lr``, ``max_instances``, ...).

    Returns
    -------
    Evaluation
        Out-of-fold predictions of every case, with metrics on them.
    """
    first = next(iter(data.class_names))
    if split == "kfold":
        folds = grouped_kfold(data.labels[first], data.patient_ids, k, seed)
    elif split == "site":
        if len(np.unique(data.sites)) < 2:
            raise ValueError(
                f"a site split needs at least two sites; this cohort has {np.unique(data.sites)}"
                " (labels.csv without a 'site' column gives every slide site ''). Add the column"
                " or use k-fold."
            )
        folds = [
            site_holdout(data.sites, s, groups=data.patient_ids) for s in np.unique(data.sites)
        ]
    else:
        raise ValueError(f"split must be 'kfold' or 'site', got {split!r}.")
    ev, _ = _run_folds(
        data, folds, val_fraction=val_fraction, seed=seed, n_boot=n_boot, fit_kw=fit_kw
    )
    return ev


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def card_for(
    model: MILHead,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    data: CohortData | None = None,
    encoder: ModelEncoder | None = None,
    calibration: Mapping[str, Any] | None = None,
    tiling: TilingConfig | None = None,
    train_config: TrainConfig | None = None,
) -> ModelCard:
    """The card of ``model``: see :func:`save_model` for the parameters."""
    from ._card import CovariateSpec, ModelCard, ModelEncoder
    from ._ood import fit_ood_safely

    covariates = CovariateSpec()
    ood = None
    if data is not None:
        ood = fit_ood_safely(data.bags, groups=data.patient_ids.tolist())
        if encoder is not None and encoder != ModelEncoder(data.encoder, data.in_dim):
            raise ValueError(
                f"encoder={encoder} contradicts the cohort's features ({data.encoder!r}, dim"
                f" {data.in_dim}); pass one of them."
            )
        encoder = ModelEncoder(data.encoder, data.in_dim)
        covariates = CovariateSpec(
            names=data.covariate_names,
            mean=tuple(data.covariate_mean.tolist()),
            std=tuple(data.covariate_std.tolist()),
            encoding={"sex": {"M": 0, "F": 1}} if "sex" in data.covariate_names else {},
        )
    return ModelCard(
        head=model.config,
        encoder=encoder,
        covariates=covariates,
        tiling=tiling,
        calibration=calibration,
        training=dict(config or {}),
        train_config=train_config,
        metrics=dict(metrics or {}),
        ood=ood,
    ).with_versions()


def write_model(directory: str | Path, model: MILHead, card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``card`` as ``model.json``; returns the directory."""
    from ._heads import write_weights

    if card.head != model.config:
        raise ValueError("the card describes another head than the model; build it with card_for.")
    directory = write_weights(model, directory)
    card.write(directory)
    return directory


def save_model(
    directory: str | Path,
    model: MILHead,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    data: CohortData | None = None,
    encoder: ModelEncoder | None = None,
    calibration: Mapping[str, Any] | None = None,
    tiling: TilingConfig | None = None,
    train_config: TrainConfig | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (a :class:`mil.ModelCard`).

    Parameters
    ----------
    directory : created if needed.
    model : a trained head.
    config : provenance of the training (epochs, lr, split, seed, ...), stored under
        ``training``.
    metrics : dict task -> metrics object or plain values, stored under ``metrics``.
    data : the cohort trained on; its encoder name and dim and its covariate names with their
        standardisation are stored so new data can be prepared identically, and the
        out-of-domain statistics of its cases (:class:`mil.OODStats`, ``ood.safetensors``).
    encoder : the features the model takes, for a model saved without ``data``.
    calibration : per-task temperature, decision threshold and conformal quantile fitted on
        validation data (:func:`mil.fit_calibration`).
    tiling : the ``wsi.TilingConfig`` the training stores were cut with.
    train_config : the options of :func:`mil.train_model`.

    Returns
    -------
    Path of the directory.
    """
    card = card_for(
        model,
        config,
        metrics,
        data=data,
        encoder=encoder,
        calibration=calibration,
        tiling=tiling,
        train_config=train_config,
    )
    return write_model(directory, model, card)


def load_model(directory: str | Path) -> tuple[MILHead, ModelCard]:
    """Read a model written by :func:`save_model`: ``(head in eval mode, its card)``.

    Only JSON and safetensors are read; nothing is unpickled.

    Raises
    ------
    ModelFileError
        For every folder that cannot be loaded: a missing, truncated or non-safetensors
        ``model.safetensors`` (a pickle is refused unread), a ``model.json`` that is not JSON
        or not a valid card (see :meth:`ModelCard.from_dict`), weights of another head, a bad
        ``ood.safetensors``. The message names the file and the fix.
    """
    from ._heads import MILHead
    from ._state import ModelFileError, read_weights, state_dict_mismatch

    directory = Path(directory)
    card = ModelCard.read(directory)
    weights_path = directory / "model.safetensors"
    found = read_weights(weights_path)
    model = MILHead(card.head)
    problem = state_dict_mismatch(model.state_dict(), found)
    if problem:
        raise ModelFileError(
            weights_path,
            f"does not match the head in {directory / 'model.json'}: {problem} (the two files"
            " come from different runs?)",
        )
    bad = sorted(k for k, v in found.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise ModelFileError(weights_path, f"NaN/inf in the weights {bad[:5]}")
    model.load_state_dict(found)
    return model.eval(), card
