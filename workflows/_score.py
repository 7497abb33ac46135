"""``oncotrace score``: tile → embed → predict → heatmaps for every slide, one Dask task each.

The unit of work is a slide. Each task writes only its own folder ``slides/<slide_id>/``
(``result.json`` or ``error.json`` last, atomically), so a run can die at any moment and the
rerun picks up where it stopped: finished slides are skipped (same source fingerprint and model
hash), a complete tile store or embedding is reused. ``predictions.csv``, ``errors.csv`` and
``run.json`` are assembled by the client from the per-slide files at the end.

Workers load the model and the encoder once per process (a module-level cache keyed by the model
hash), not once per slide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from oncotrace import __version__
from oncotrace.wsi import (
    ParameterError,
    ResolutionError,
    SlideError,
    Store,
    TilingConfig,
    UpsamplingWarning,
    atomic_write_json,
    check_mpp,
    check_slide_id,
    read_csv_rows,
    slide_id_for,
    source_fingerprint,
)

from ._batch import (
    STORE_SUFFIXES,
    check_count,
    check_out_dir,
    expand_inputs,
    input_problem,
    is_store,
    is_store_named,
    write_errors_csv,
)
from ._failures import (
    DISK_FULL,
    DiskFullError,
    disk_full_message,
    is_disk_full,
    remove_stale_temporaries,
)
from ._flags import Device, cli_message
from ._predictions import TOP_K, PredictionRow, write_predictions

if TYPE_CHECKING:
    from oncotrace.mil import MILHead, ModelCard

RESULT_FORMAT = 1
#: An own LocalCluster's dashboard: loopback, a free port (``:0`` would listen on every
#: interface, and task keys and worker logs name slide files).
DASHBOARD = "127.0.0.1:0"
#: How long to try reaching a ``--scheduler`` before giving up.
SCHEDULER_TIMEOUT = "30s"
_SLIDES = "slides"
_STORES = "stores"


# --------------------------------------------------------------------------------------------
# What a run is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideJob:
    """One slide to score."""

    slide_id: str
    path: str
    covariates: tuple[float, ...] | None = None
    patient_id: str = ""
    site: str = ""
    #: a tile store given as the input (``oncotrace tile`` output): reused when it was cut with
    #: the model's tiling, else the slide it names is tiled again
    store: str | None = None
    #: ``(error_type, message)`` of an input found unusable when the jobs were collected (a
    #: broken link or an unfinished store in a folder of stores): reported as its own row
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class ScoreConfig:
    """Everything a worker needs; small and picklable (sent with every task)."""

    model_dir: str
    model_hash: str
    out_dir: str
    tiling: TilingConfig
    weights: str | None = None
    device: Device = "auto"
    mpp: float | None = None
    threads: int = 1
    heatmaps: bool = True


def resolve_tiling(
    trained: TilingConfig | None, given: Mapping[str, Any]
) -> tuple[TilingConfig, dict[str, tuple[Any, Any]]]:
    """Scoring tiling: the model's training tiling, with any value the user gave on top.

    Parameters
    ----------
    trained : the card's tiling, or None when the model does not record it (then
        ``wsi.TilingConfig``'s defaults).
    given : ``TilingConfig`` field -> value the user set on the command line (None: not set).

    Returns the tiling and, per field the user set differently from the training,
    ``(given, trained)`` for a warning.
    """
    base = trained if trained is not None else TilingConfig()
    set_ = {k: v for k, v in given.items() if v is not None}
    differs = {
        k: (v, getattr(trained, k))
        for k, v in set_.items()
        if trained is not None and getattr(trained, k) != v
    }
    return replace(base, **set_), differs


def model_hash(model_dir: str | Path) -> str:
    """sha256 over ``model.json`` and ``model.safetensors``: what a result was computed with."""
    h = hashlib.sha256()
    for name in ("model.json", "model.safetensors"):
        p = Path(model_dir) / name
        if not p.is_file():
            raise FileNotFoundError(
                f"{model_dir}: no {name}. Fix: pass the folder `oncotrace train --out` wrote."
            )
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def slide_dir(out_dir: str | Path, slide_id: str) -> Path:
    """``<out>/slides/<slide_id>``; the id must be a plain name (:func:`wsi.check_slide_id`)."""
    return Path(out_dir) / _SLIDES / check_slide_id(slide_id)


def read_manifest(path: Path, covariates: Sequence[str] = ()) -> list[SlideJob]:
    """``manifest.csv``: ``path`` (relative to the CSV or absolute), optional ``slide_id``,
    ``patient_id`` and ``site`` (carried into ``predictions.csv``) and the model's covariate
    columns."""
    _, rows = read_csv_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows. Fix: one row per slide with a 'path' column.")
    cols = set(rows[0])
    missing = [c for c in ("path", *covariates) if c not in cols]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; it has {sorted(cols)}. Fix: add them"
            " (the model was trained with those covariates)."
        )
    jobs = []
    for i, r in enumerate(rows, start=2):
        p = Path(r["path"])
        # absolute, so results and workers resolve it from any working directory
        p = (p if p.is_absolute() else (path.parent / p)).absolute()
        cov = None
        if covariates:
            try:
                cov = tuple(_covariate_value(c, r[c]) for c in covariates)
            except ValueError as exc:
                raise ValueError(f"{path} line {i}: {exc}") from exc
        sid = check_slide_id(r.get("slide_id") or slide_id_for(p), f"{path} line {i}")
        jobs.append(
            SlideJob(sid, str(p), cov, r.get("patient_id") or "", (r.get("site") or "").strip())
        )
    _check_unique(jobs, path)
    return jobs


def _covariate_value(name: str, raw: str) -> float:
    v = raw.strip()
    sex = {"m": 0.0, "male": 0.0, "f": 1.0, "female": 1.0}
    if v.lower() in sex:
        return sex[v.lower()]
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"covariate {name!r} has value {raw!r}, not a number.") from None


def _check_unique(jobs: Sequence[SlideJob], where: Path | str) -> None:
    seen: dict[str, str] = {}
    for j in jobs:
        if j.slide_id in seen:
            raise ValueError(
                f"{where}: slide id {j.slide_id!r} names both {seen[j.slide_id]} and {j.path};"
                " results are stored by slide id. Fix: rename one, or give slide_id in a manifest."
            )
        seen[j.slide_id] = j.path


def collect_jobs(inputs: Sequence[str | Path], covariates: Sequence[str] = ()) -> list[SlideJob]:
    """The slides to score: slide files, folders of slides and manifest CSVs, in that order.

    Raises
    ------
    ValueError
        If the model needs ``covariates`` but slides were given without a manifest, if two
        inputs share a slide id, or if nothing was found.
    """
    from ._batch import find_slides

    manifests = [Path(p) for p in inputs if Path(p).suffix.lower() == ".csv"]
    jobs = [j for m in manifests for j in read_manifest(m, covariates)]
    rest = [Path(p) for p in inputs if Path(p).suffix.lower() != ".csv"]
    stores = [s for p in rest for s in _stores_in(p)]
    if stores and covariates:
        raise ValueError(
            f"the model needs covariates {list(covariates)}; pass a manifest CSV with those"
            " columns instead of tile stores."
        )
    jobs += [_store_job(s) for s in stores]
    paths = find_slides([p for p in rest if not _stores_in(p)])
    if paths and covariates:
        raise ValueError(
            f"the model needs covariates {list(covariates)}; pass a manifest CSV with those"
            " columns instead of slide files."
        )
    jobs += [
        SlideJob(check_slide_id(slide_id_for(p), str(p)), str(Path(p).absolute())) for p in paths
    ]
    if not jobs:
        raise ValueError(
            f"no slides found in {', '.join(map(str, inputs))}. Fix: pass slide files, folders"
            " holding them, tile stores (.zarr, or the folder `oncotrace tile` wrote) or a"
            " manifest .csv."
        )
    _check_unique(jobs, "the inputs")
    return jobs


def _stores_in(p: Path) -> list[Path]:
    """``p`` itself when it is a ``.zarr`` store, the stores in it when it is a folder of them
    (``oncotrace tile --out``), else nothing. Of a folder, whatever is named like a store but
    cannot be one (a broken link, a sub-folder of stores) is returned too, to become a row."""
    if p.suffix.lower() in STORE_SUFFIXES and p.is_dir():
        return [p.absolute()]
    if p.is_dir() and not is_store(p):
        return [c.absolute() for c in expand_inputs([p], STORE_SUFFIXES, unit=is_store)]
    return []


def _store_job(store: Path) -> SlideJob:
    """A job scoring a given store: named and fingerprinted by the slide it records. A store
    that cannot be scored is a job carrying its problem (one row; the others are scored)."""
    stem = store.name.removesuffix(store.suffix) or store.name
    problem = input_problem(store, STORE_SUFFIXES, unit=is_store_named)
    found = None if problem is not None else Store.find(store)
    if found is None:
        problem = problem or (
            "StoreError",
            f"{store}: not a finished OncoTrace tile store (no zarr.json with complete attrs)."
            " Fix: tile the slide again with `oncotrace tile`, or pass the slide itself.",
        )
        return SlideJob(
            check_slide_id(stem, str(store)), str(store), store=str(store), problem=problem
        )
    attrs = found.attrs
    sid = check_slide_id(attrs.slide_id or store.name.removesuffix(".zarr"), str(store))
    return SlideJob(sid, attrs.source_path or "", store=str(store))


@dataclass(frozen=True)
class ScoreRun:
    """What :func:`score_slides` did: the jobs, the worker config, the report, the tables."""

    jobs: tuple[SlideJob, ...]
    config: ScoreConfig
    report: ScoreReport
    files: dict[str, Path]


def score_slides(
    inputs: Sequence[str | Path],
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
    device: Device = "auto",
    tiling: Mapping[str, Any] | None = None,
    mpp: float | None = None,
    weights: str | None = None,
    heatmaps: bool = True,
    dashboard: str | None = DASHBOARD,
    on_warning: Callable[[str], None] | None = None,
    on_total: Callable[[int, int], None] | None = None,
    on_done: Callable[[str, bool], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> ScoreRun:
    """What ``oncotrace score`` does: score every slide of ``inputs`` with the model in
    ``model_dir`` on Dask, resumably, and write ``predictions.csv``, ``errors.csv`` and
    ``run.json`` into ``out_dir``.

    Parameters
    ----------
    inputs : slide files, folders of slides, manifest CSVs (``path[, slide_id]`` and the
        model's covariate columns).
    workers : LocalCluster worker processes (default: cores // 2); not with ``scheduler``.
    scheduler : address of a running Dask scheduler.
    threads : reader/torch threads per worker (default: cores // workers).
    tiling : ``wsi.TilingConfig`` fields to change from the model's training tiling (None
        values are ignored); each change from what the model was trained on is reported
        through ``on_warning``.
    mpp : level-0 µm/px for slides whose files lack it.
    weights : encoder weights file or folder.
    dashboard : address of an own LocalCluster's dashboard (default loopback only: task keys
        and worker logs name slide files); None for no dashboard.
    on_total, on_done, on_dashboard : progress callbacks (see :func:`run_score`).

    Raises
    ------
    ValueError, FileNotFoundError
        Before anything runs: a model folder or card that cannot score, bad inputs or
        manifests, ``workers`` with ``scheduler`` (the error carries ``param``).
    """

    if workers is not None and scheduler is not None:
        raise ParameterError(
            "choose workers= (a LocalCluster) or scheduler=, not both", param="workers"
        )
    if scheduler is None:
        check_dashboard(dashboard)
    digest = model_hash(model_dir)
    card = _loadable_card(model_dir)
    scoring_encoder(card, model_dir)
    jobs = collect_jobs(inputs, card.covariates.names)
    resolved, differs = resolve_tiling(card.tiling, dict(tiling or {}))
    for key, (given, trained) in differs.items():
        if on_warning:
            on_warning(
                f"{key}={given} differs from the model's training tiling ({key}={trained});"
                " its predictions may not transfer."
            )
    cores = os.cpu_count() or 2
    n_workers = workers if workers is not None else max(1, cores // 2)
    for name, value in (("workers", n_workers), ("threads", threads)):
        if value is not None:
            check_count(name, value)
    if mpp is not None:
        check_mpp(mpp)
    check_out_dir(out_dir)
    cfg = ScoreConfig(
        model_dir=str(Path(model_dir).resolve()),
        model_hash=digest,
        out_dir=str(Path(out_dir).resolve()),
        tiling=resolved,
        weights=weights,
        device=device,
        mpp=mpp,
        threads=threads or max(1, cores // n_workers),
        heatmaps=heatmaps,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    report = run_score(
        jobs,
        cfg,
        workers=None if scheduler else n_workers,
        scheduler=scheduler,
        on_total=on_total,
        on_done=on_done,
        on_dashboard=on_dashboard,
        dashboard=dashboard,
    )
    files = write_outputs(jobs, cfg, report, {"inputs": [str(Path(p).absolute()) for p in inputs]})
    if on_warning:
        for r in report.done:  # said in the worker (upsampled tiles): shown here, once each
            for text in r.get("warnings") or ():
                on_warning(text)
    warning = ood_warning([*report.done, *report.skipped])
    if warning and on_warning:
        on_warning(warning)
    return ScoreRun(tuple(jobs), cfg, report, files)


def check_dashboard(address: str | None) -> None:
    """``address`` is ``HOST:PORT`` (or ``:PORT``) with a host this machine can bind; else
    ParameterError before any cluster starts (Dask's own error is a traceback after start-up)."""
    import socket

    if address is None:
        return
    host, sep, port = address.rpartition(":")
    ok_port = sep and port.isdigit() and 0 <= int(port) <= 65535
    problem = None if ok_port else "is not HOST:PORT (e.g. 127.0.0.1:8787)"
    if problem is None and host:
        try:
            socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            problem = f"names a host this machine cannot resolve ({exc})"
    if problem is not None:
        raise ParameterError(
            f"dashboard={address!r} {problem}. Fix: pass HOST:PORT (127.0.0.1:8787 to keep it"
            " on this machine, 0.0.0.0:8787 to open it to the network), or none.",
            param="dashboard",
        )


def _loadable_card(model_dir: str | Path) -> ModelCard:
    """The model's card, once the whole model has been loaded here, before any slide is sent:
    a model that cannot load fails the run once, up front (it used to fail every slide in the
    workers, one row each). Nothing is unpickled: weights are read as safetensors only."""
    from oncotrace import mil

    try:
        _, card = mil.load_model(model_dir)
    except (ValueError, FileNotFoundError):
        raise  # the loader's own message names the file and the fix
    except Exception as exc:  # a loader failure it did not put into words
        raise ValueError(
            f"{model_dir}: the model cannot be loaded ({type(exc).__name__}: {exc}). Fix: point"
            " --model at a folder written by `oncotrace train` (model.json and"
            " model.safetensors), or copy that folder again if it was damaged in transit."
        ) from exc
    return card


def ood_warning(results: Sequence[Mapping[str, Any]]) -> str | None:
    """One warning naming the results whose slide lies outside the training data, or None."""
    flagged = sorted(
        (r["slide_id"], r["ood"]) for r in results if (r.get("ood") or {}).get("flagged")
    )
    if not flagged:
        return None
    names = ", ".join(f"{sid} ({o['distance']:.1f})" for sid, o in flagged[:10])
    more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
    return (
        f"{len(flagged)} slide(s) lie outside the data the model was trained on (ood_distance"
        f" above {flagged[0][1]['threshold']:.1f}): {names}{more}. Their predictions are not"
        " reliable: check stain, scanner, tissue type and resolution against the training"
        " slides (ood column of predictions.csv)."
    )


# --------------------------------------------------------------------------------------------
# The worker side
# --------------------------------------------------------------------------------------------

#: model_hash -> (head, model card); (encoder name, weights, device) -> encoder. Per process.
_MODELS: dict[str, tuple[MILHead, ModelCard]] = {}
_ENCODERS: dict[tuple[str, str | None, str], Any] = {}
_LOADS = {"model": 0, "encoder": 0}  # how often this process loaded them (run.json, tests)


def scoring_encoder(card: ModelCard, model_dir: str | Path) -> str:
    """The registered encoder that embeds new slides for the model ``card`` describes.

    Raises
    ------
    ValueError
        If the card names no encoder, or features that no registered encoder computes
        (imported under their own name): ``oncotrace score`` cannot embed slides for it.
    """
    from oncotrace import mil

    path = Path(model_dir) / "model.json"
    if card.encoder is None:
        raise ValueError(
            f"{path}: no 'encoder' section, so the features to embed new slides with are"
            " unknown. Fix: save the model with `oncotrace train`, or mil.save_model(...,"
            " data=cohort) / mil.save_model(..., encoder=mil.ModelEncoder(name, dim))."
        )
    name = card.encoder.name
    if name not in mil.list_encoders():
        raise ValueError(
            f"{path}: the model was trained on features named {name!r}, which no registered"
            f" encoder computes (imported features?), so `oncotrace score` cannot embed new"
            f" slides for it. Fix: import those slides' features too and run `oncotrace"
            f" evaluate`, or train on a registered encoder ({mil.list_encoders()})."
        )
    return name


def _load(cfg: ScoreConfig) -> tuple[MILHead, ModelCard, Any]:
    from oncotrace import mil

    if cfg.model_hash not in _MODELS:
        _MODELS.clear()  # one model per run; do not keep old ones in a long-lived worker
        _MODELS[cfg.model_hash] = mil.load_model(cfg.model_dir)
        _LOADS["model"] += 1
    model, card = _MODELS[cfg.model_hash]
    enc_name = scoring_encoder(card, cfg.model_dir)
    key = (enc_name, cfg.weights, cfg.device)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = mil.create_encoder(
            enc_name,
            weights=cfg.weights,
            device=cfg.device,
            threads=cfg.threads,
        )
        _LOADS["encoder"] += 1
    return model, card, _ENCODERS[key]


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def score_slide(job: SlideJob, cfg: ScoreConfig) -> dict[str, Any]:
    """Score one slide; writes ``slides/<id>/result.json`` or ``error.json``; returns either.

    Deterministic failures (the slide, its tissue, its features) are returned as an error record,
    not raised, so Dask does not retry them; only a dying worker makes the scheduler rerun it.
    """
    import torch

    torch.set_num_threads(max(1, cfg.threads))
    here = slide_dir(cfg.out_dir, job.slide_id)
    here.mkdir(parents=True, exist_ok=True)
    (here / "error.json").unlink(missing_ok=True)
    started = time.time()
    timings: dict[str, float] = {}
    said: list[str] = []
    stage = "load"
    try:
        if job.problem is not None:
            stage = "open"
            raise _InputProblem(*job.problem)
        fingerprint = job_fingerprint(job)
        model, card, encoder = _load(cfg)
        stage = "tile"
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UpsamplingWarning)
            tiled = _tiled_store(job, cfg, fingerprint)
        if tiled.note:
            said.append(tiled.note)
        for w in caught:  # said by the client: a worker's stderr is seen by nobody
            if isinstance(w.message, UpsamplingWarning):
                said.append(cli_message(str(w.message)))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        timings["tile_s"] = time.perf_counter() - t
        stage = "embed"
        t = time.perf_counter()
        from oncotrace import mil

        mil.embed(tiled.store, encoder)
        timings["embed_s"] = time.perf_counter() - t
        stage = "predict"
        t = time.perf_counter()
        prediction, attention, coords, ood = _predict(tiled.store, job, model, card, encoder)
        timings["predict_s"] = time.perf_counter() - t
        if cfg.heatmaps:
            stage = "heatmap"
            t = time.perf_counter()
            _heatmaps(tiled.store, here, attention, coords)
            timings["heatmap_s"] = time.perf_counter() - t
        result = {
            "format": RESULT_FORMAT,
            "status": "done",
            "slide_id": job.slide_id,
            "path": str(job.path),
            # the same file from the results folder: found again when both move together
            "path_from_results": os.path.relpath(job.path, Path(cfg.out_dir).absolute())
            if job.path
            else None,
            "source_fingerprint": fingerprint,
            "model_hash": cfg.model_hash,
            "n_tiles": len(coords),
            "store_reused": bool(tiled.skipped),
            "tasks": prediction,
            "ood": ood,
            "started_at": started,
            "finished_at": time.time(),
            "seconds": timings,
            "worker": _worker_name(),
            "pid": os.getpid(),
            "model_loads_in_this_process": _LOADS["model"],
            "worker_peak_rss_mib": _peak_rss_mib(),
            "warnings": said,
        }
        _atomic_json(here / "result.json", result)
        return result
    except Exception as exc:  # one slide's failure is one row; the run goes on
        full = is_disk_full(exc)
        error = {
            "format": RESULT_FORMAT,
            "status": "error",
            "slide_id": job.slide_id,
            "path": str(job.path),
            "stage": _stage_name(exc, stage),
            "error_type": DISK_FULL
            if full
            else exc.error_type
            if isinstance(exc, _InputProblem)
            else type(exc).__name__,
            "message": disk_full_message(cfg.out_dir, f"the slide's {stage} output")
            if full
            else str(exc)
            if isinstance(exc, SlideError | ValueError | KeyError)
            else f"{exc} ({traceback.format_exception_only(exc)[-1].strip()})",
            "model_hash": cfg.model_hash,
            "started_at": started,
            "finished_at": time.time(),
            "worker": _worker_name(),
        }
        _try_write_error(here, error)
        return error


class _InputProblem(ValueError):
    """A job's input was found unusable when the jobs were collected (``SlideJob.problem``)."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(message)


def _try_write_error(here: Path, error: Mapping[str, Any]) -> None:
    """Write ``error.json``; on a full disk the record still reaches the client (which reports
    it) and no temporary file is left behind."""
    try:
        _atomic_json(here / "error.json", error)
    except OSError as exc:
        if not is_disk_full(exc):
            raise


@dataclass(frozen=True)
class _Tiled:
    store: Path
    skipped: bool
    #: said to the user: a given store that could not be used as it was, and what was done
    note: str | None = None


def job_fingerprint(job: SlideJob) -> str:
    """The slide's :func:`source_fingerprint`; for a store input whose slide is not here (a
    store moved without it), the fingerprint the store recorded."""
    if job.store is not None and not Path(job.path).exists():
        attrs = Store.open(job.store).attrs
        if attrs.source_fingerprint:
            return attrs.source_fingerprint
    return source_fingerprint(job.path)


def _tiled_store(job: SlideJob, cfg: ScoreConfig, fingerprint: str) -> _Tiled:
    """The job's tile store: a given store cut with the model's tiling as it is, else the slide
    tiled into ``<out>/stores`` (reused there when complete)."""
    from oncotrace.wsi import is_complete, tile_slide

    note = None
    if job.store is not None:
        if is_complete(job.store, fingerprint=fingerprint, config=cfg.tiling):
            return _Tiled(Path(job.store), True)
        given = Store.open(job.store)
        damage = given.damage()
        why = (
            f"is damaged ({damage})"
            if damage is not None
            else f"was cut with {given.attrs.tiling} but the model needs {cfg.tiling}"
        )
        if not Path(job.path).exists():
            raise ValueError(
                f"{job.store}: {why}, and the slide it was cut from"
                f" ({job.path or 'not recorded'}) is not here to tile again. Fix: pass the slide"
                " file itself (or a store tiled as the model was trained)."
            )
        if damage is not None:  # a tiling that differs is already said once by the client
            note = (
                f"{job.store} {why}; scored from the slide, tiled again into"
                f" {Path(cfg.out_dir) / _STORES}."
            )
    try:
        res = tile_slide(
            job.path,
            Path(cfg.out_dir) / _STORES,
            cfg.tiling,
            mpp=cfg.mpp,
            workers=cfg.threads,
            slide_id=job.slide_id,
        )
    except ResolutionError as exc:
        raise _model_resolution_error(exc, cfg) from exc
    return _Tiled(res.store, bool(res.skipped), note)


def _model_resolution_error(exc: ResolutionError, cfg: ScoreConfig) -> ResolutionError:
    """The tiler's refusal reworded for scoring, where the tiling is the model's: the tiler's
    own fixes (a coarser target, more upsampling) would feed the model tiles unlike the ones it
    was trained on, and a later step would refuse them."""
    if exc.finest_mpp is None or exc.target_mpp is None or exc.max_upsample is None:
        return exc
    finest, target, limit = exc.finest_mpp, exc.target_mpp, exc.max_upsample
    return ResolutionError(
        exc.path,
        f"its finest level is {finest:.4g} µm/px, but the model takes tiles at {target:g} µm/px"
        f" (the tiling it was trained with), which would need ×{finest / target:.3g}"
        f" upsampling, beyond the ×{limit:g} allowed.",
        f"score it with a model trained on tiles of {finest / limit:.3g} µm/px or coarser, or"
        f" scan the slide at {target * limit:.3g} µm/px or finer. Changing the tiling here"
        " (--mpp-target) would give the model tiles unlike those it learnt from.",
        finest_mpp=finest,
        target_mpp=target,
        max_upsample=limit,
    )


def _peak_rss_mib() -> float:
    """Peak resident memory of this worker process so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stage_name(exc: BaseException, stage: str) -> str:
    if stage == "tile" and isinstance(exc, SlideError):
        from oncotrace.workflows._batch import _stage_of

        return _stage_of(exc)
    return stage


def _predict(
    store: Path, job: SlideJob, model: MILHead, card: ModelCard, encoder: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, dict[str, Any] | None]:
    """Per-task predictions, attention, tile coords and the out-of-domain check (or None when
    the model records no training statistics)."""
    from oncotrace import mil

    if model.config.multimodal:
        raise ValueError(
            f"the model takes several modalities {sorted(model.config.modality_dims)}; "
            "`oncotrace score` feeds slides only. Fix: score multi-modal cases with mil.predict."
        )
    feats, coords, _ = mil.read_features(store, encoder.config.name)
    if not np.isfinite(feats).all():
        raise ValueError(
            f"{store}: NaN/inf in the features. Fix: embed again (`oncotrace embed --overwrite`)."
        )
    cov = None
    names = list(card.covariates.names)
    if names:
        if job.covariates is None or len(job.covariates) != len(names):
            raise ValueError(
                f"the model needs covariates {names}; give them as columns of a manifest CSV."
            )
        cov = card.covariates.standardise(job.covariates)
    proba, att = mil.predict(model, [feats], cov)
    tasks = model.config.tasks
    calibrated = mil.apply_calibration(proba, tasks, card.calibration)
    out: dict[str, Any] = {}
    for task, classes in tasks.items():
        c = calibrated[task]
        p = c.proba[0]
        order = np.argsort(-p, kind="stable")[: min(TOP_K, len(classes))]
        out[task] = {
            "label": classes[int(c.predicted[0])],
            "classes": list(classes),
            "proba": [float(v) for v in p],
            "proba_uncalibrated": [float(v) for v in proba[task][0]],
            "top_k": [classes[int(i)] for i in order],
            "conformal_set": None
            if c.sets is None
            else [classes[int(i)] for i in np.flatnonzero(c.sets[0])],
            "conformal_level": c.level,
        }
    attention = {t: np.asarray(a[t], np.float32) for a in att for t in tasks}
    ood = None if card.ood is None else card.ood.check(feats).to_dict()
    return out, attention, np.asarray(coords, np.int64), ood


def _heatmaps(
    store: Path, here: Path, attention: Mapping[str, np.ndarray], coords: np.ndarray
) -> None:
    from oncotrace import spatial

    tiles = Store.open(store)
    attrs = tiles.attrs
    thumb, thumb_ds = tiles.thumbnail()
    ts, size, mpp = attrs.tile_size_level0, attrs.level0_size, attrs.mpp
    if ts is None or size is None or mpp is None:
        raise ValueError(
            f"{store}: its attrs lack the tile size, level-0 size or mpp a heatmap needs."
            " Fix: tile the slide again with `oncotrace tile`."
        )
    stride = attrs.stride_level0 or ts
    scores = {t: spatial.normalise_attention(a, method="rank") for t, a in attention.items()}
    heats = {
        t: spatial.attention_heatmap(
            coords,
            s,
            tile_size_level0=(float(ts[0]), float(ts[1])),
            level0_size=(int(size[0]), int(size[1])),
            mpp=(float(mpp[0]), float(mpp[1])),
            stride_level0=(float(stride[0]), float(stride[1])),
            value_unit=spatial.ATTENTION_RANK_UNIT,  # normalise_attention(method="rank")
        )
        for t, s in scores.items()
    }
    first = next(iter(heats))
    heat = heats[first]
    # the first task as attention.ome.zarr; the others (multi-task heads attend per task) for
    # viewers to switch to
    for task, task_heat in heats.items():
        stem = "" if task == first else "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task)
        spatial.write_ome_zarr(
            task_heat, here / f"attention{stem}.ome.zarr", name=f"attention ({task})"
        )
    spatial.write_geojson(
        here / "attention.geojson",
        coords,
        {f"attention_{t}": s for t, s in scores.items()},
        tile_size_level0=(float(ts[0]), float(ts[1])),
    )
    spatial.write_overlay_png(
        heat, thumb, thumb_ds, here / "attention.png", title=f"attention: {first}"
    )


# --------------------------------------------------------------------------------------------
# The client side
# --------------------------------------------------------------------------------------------


def finished(job: SlideJob, cfg: ScoreConfig) -> dict[str, Any] | None:
    """The slide's result when it is complete for the same source and model, else None."""
    if job.problem is not None:  # its input is gone or unfinished now: an old result is stale
        return None
    path = slide_dir(cfg.out_dir, job.slide_id) / "result.json"
    try:
        if not path.is_file():  # only regular files: a FIFO would block the rerun
            return None
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        same = job_fingerprint(job) == result.get("source_fingerprint")
    except (OSError, ValueError):
        return None
    if same and result.get("model_hash") == cfg.model_hash and result.get("status") == "done":
        return dict(result)
    return None


@dataclass
class ScoreReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None


def run_score(
    jobs: Sequence[SlideJob],
    cfg: ScoreConfig,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    on_total: Callable[[int, int], None] | None = None,
    on_done: Callable[[str, bool], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
    dashboard: str | None = DASHBOARD,
) -> ScoreReport:
    """Score ``jobs`` on a LocalCluster (``workers`` processes) or on ``scheduler``.

    Finished slides (same fingerprint and model hash) are skipped. Returns what happened; the
    caller writes the tables with :func:`write_outputs`.
    """
    t0 = time.perf_counter()
    report = ScoreReport()
    todo = []
    for job in jobs:
        prev = finished(job, cfg)
        if prev is not None:
            report.skipped.append(prev)
        else:
            todo.append(job)
    if on_total:
        on_total(len(jobs), len(report.skipped))
    if todo:
        with _client(workers, scheduler, cfg, dashboard) as client:
            link = (
                dashboard_link(client, None)
                if scheduler
                else (dashboard_link(client, dashboard) if dashboard else None)
            )
            if link:
                # an own LocalCluster's dashboard dies with the run: shown, not recorded
                report.dashboard = link if scheduler else None
                if on_dashboard:
                    on_dashboard(link)
            for job, outcome in _submit_all(client, todo, cfg):
                ok = outcome.get("status") == "done"
                (report.done if ok else report.errors).append(outcome)
                if on_done:
                    on_done(job.slide_id, ok)
    report.seconds = time.perf_counter() - t0
    return report


def dashboard_link(client: Any, bound: str | None) -> str | None:
    """The dashboard's URL as reachable: Dask names the machine's address in it, which is wrong
    for a dashboard ``bound`` to loopback (then 127.0.0.1, same port)."""
    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    from urllib.parse import urlsplit, urlunsplit

    if bound is not None and bound.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        parts = urlsplit(link)
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{parts.port}"))
    return str(link)


class _client:
    """A distributed Client on the given scheduler, or on a LocalCluster it owns."""

    def __init__(
        self,
        workers: int | None,
        scheduler: str | None,
        cfg: ScoreConfig,
        dashboard: str | None = DASHBOARD,
    ) -> None:
        self.workers, self.scheduler, self.cfg = workers, scheduler, cfg
        self.dashboard = dashboard

    def __enter__(self) -> Any:
        from distributed import Client, LocalCluster

        if self.scheduler:
            self.cluster = None
            try:
                self.client = Client(self.scheduler, timeout=SCHEDULER_TIMEOUT)
            except (OSError, TimeoutError) as exc:  # refused, unreachable, or not Dask
                raise ValueError(
                    f"cannot reach the Dask scheduler at {self.scheduler} within"
                    f" {SCHEDULER_TIMEOUT} ({type(exc).__name__}). Fix: start it there"
                    " (`dask scheduler`), check the address and port, or leave out"
                    " scheduler= to score on a local cluster."
                ) from None
        else:
            n = max(1, self.workers or 1)
            self.cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,  # one slide at a time per process; it uses cfg.threads
                processes=True,
                memory_limit=_memory_per_worker(n),
                # the scheduler's HTTP server listens even without a dashboard (health and
                # metrics routes), by default on every interface: loopback when "none"
                dashboard_address=self.dashboard or DASHBOARD,
                scheduler_kwargs={"dashboard": bool(self.dashboard)},
            )
            self.client = Client(self.cluster)
            _drop_late_comm_closed()
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.cluster is not None:
            # Every result is written by now. A worker still unwinding torch's or the readers'
            # threads is killed after a grace period, and the nanny says so with a warning
            # ("Worker process still alive after 4.0 seconds, killing") that asks nothing of
            # the user: keep it out of the run's output.
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                self.cluster.close()
            finally:
                nanny.setLevel(level)


class _LateCommClosed:
    """Drops distributed's INFO record "Batched Comm Closed <TCP (closed) …>" with its traceback.

    LocalCluster keeps distributed's INFO records off the console while it runs and restores the
    console handler's level as the last step of ``close()``; the scheduler's batched stream to a
    worker that has just exited can still report the closed connection from the event-loop thread
    after that, which put a CommClosedError traceback after a clean run's summary now and then.
    A connection closing is what shutting a cluster down means, at INFO level: nothing to show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.INFO and str(record.msg).startswith("Batched Comm Closed")
        )


_LATE_COMM_CLOSED = _LateCommClosed()


def _drop_late_comm_closed() -> None:
    logger = logging.getLogger("distributed.batched")
    if _LATE_COMM_CLOSED not in logger.filters:
        logger.addFilter(_LATE_COMM_CLOSED)


def _memory_per_worker(n: int) -> str:
    try:
        import psutil

        total = psutil.virtual_memory().total
    except ImportError:  # psutil ships with distributed; this is belt and braces
        return "auto"
    return f"{int(0.8 * total / n) // (1 << 20)}MiB"


def _submit_all(
    client: Any, jobs: Sequence[SlideJob], cfg: ScoreConfig
) -> Iterator[tuple[SlideJob, dict[str, Any]]]:
    from distributed import as_completed

    futures = {}
    resources = None
    if cfg.device == "cuda":  # target workers started with `--resources GPU=1`, when any are
        workers = client.scheduler_info().get("workers", {}).values()
        if any("GPU" in (w.get("resources") or {}) for w in workers):
            resources = {"GPU": 1}
    for job in jobs:
        fut = client.submit(
            score_slide,
            job,
            cfg,
            key=f"score-{job.slide_id}-{cfg.model_hash[:12]}",
            pure=False,
            resources=resources,
        )
        futures[fut] = job
    full: dict[str, Any] | None = None
    for fut in as_completed(futures):
        job = futures[fut]
        if full is not None:  # the disk is full: what has not finished is not started
            fut.cancel()
            yield job, {**full, "slide_id": job.slide_id, "path": job.path, "stage": "run"}
            continue
        try:
            outcome = fut.result()
        except Exception as exc:  # KilledWorker: the slide took down workers repeatedly
            outcome = {
                "status": "error",
                "slide_id": job.slide_id,
                "path": job.path,
                "stage": "worker",
                "error_type": type(exc).__name__,
                "message": f"the worker processing it died repeatedly ({exc}). Fix: check the"
                " file with `oncotrace info`, or give workers more memory.",
            }
            here = slide_dir(cfg.out_dir, job.slide_id)
            here.mkdir(parents=True, exist_ok=True)
            _try_write_error(here, outcome)
        if outcome.get("error_type") == DISK_FULL:
            full = {
                "status": "error",
                "error_type": DISK_FULL,
                "message": disk_full_message(cfg.out_dir, "results")
                + " (not started: the disk filled up during the run)",
            }
        yield job, outcome


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def write_outputs(
    jobs: Sequence[SlideJob], cfg: ScoreConfig, report: ScoreReport, run_config: Mapping[str, Any]
) -> dict[str, Path]:
    """``predictions.csv``, ``errors.csv`` and ``run.json`` from the per-slide files."""
    out = Path(cfg.out_dir)
    results, errors = [], []
    for job in jobs:
        here = slide_dir(out, job.slide_id)
        done = finished(job, cfg)
        if done is not None:
            results.append(done)
            continue
        try:
            if not (here / "error.json").is_file():
                raise OSError("no regular error.json")
            errors.append(json.loads((here / "error.json").read_text()))
        except (OSError, ValueError):
            errors.append(
                {
                    "slide_id": job.slide_id,
                    "path": job.path,
                    "stage": "run",
                    "error_type": "NotScored",
                    "message": "no result was written (the run was interrupted). Fix: rerun.",
                }
            )
    by_id = {j.slide_id: j for j in jobs}
    rows = [
        PredictionRow(
            slide_id=r["slide_id"],
            task=task,
            classes=tuple(t["classes"]),
            proba=t["proba"],
            predicted_class=t["label"],
            uncalibrated=t.get("proba_uncalibrated"),
            patient_id=by_id[r["slide_id"]].patient_id,
            site=by_id[r["slide_id"]].site,
            conformal_set=t["conformal_set"],
            n_tiles=r["n_tiles"],
            ood_distance=(r.get("ood") or {}).get("distance"),
            ood=(r.get("ood") or {}).get("flagged"),
        )
        for r in sorted(results, key=lambda r: r["slide_id"])
        for task, t in r["tasks"].items()
    ]
    err_path = out / "errors.csv"
    table = [
        {
            "slide": str(e.get("path", e["slide_id"])),
            "stage": e["stage"],
            "error_type": e["error_type"],
            "message": cli_message(e["message"]),  # read next to the CLI's flags
        }
        for e in sorted(errors, key=lambda e: e["slide_id"])
    ]
    try:  # errors.csv first: on a disk with room for one table, it is the one to keep
        write_errors_csv(err_path, table)
        pred_path = write_predictions(out / "predictions.csv", rows)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(out, "predictions.csv and errors.csv") from exc
        raise
    run = {
        "oncotrace": __version__,
        "versions": _versions(),
        "config": {**dict(run_config), **asdict(cfg)},
        "model_hash": cfg.model_hash,
        "seconds": round(report.seconds, 3),
        "n_slides": len(jobs),
        "n_scored": len(results),
        "n_scored_this_run": len(report.done),
        "n_skipped_finished": len(report.skipped),
        "n_failed": len(errors),
        "dashboard": report.dashboard,
        "slides": {
            r["slide_id"]: {
                "started_at": r["started_at"],
                "finished_at": r["finished_at"],
                "seconds": r["seconds"],
                "worker": r["worker"],
                "store_reused": r["store_reused"],
            }
            for r in results
        },
    }
    try:
        _atomic_json(out / "run.json", run)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(out, "run.json") from exc
        raise
    return {"predictions": pred_path, "errors": err_path, "run": out / "run.json"}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "numpy",
        "zarr",
        "torch",
        "timm",
        "dask",
        "distributed",
        "tifffile",
        "openslide-python",
        "cucim-cu12",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
