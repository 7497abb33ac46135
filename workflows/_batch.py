"""Tile a folder (or list) of slides: one store per slide, failures isolated into errors.csv."""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oncotrace import __version__
from oncotrace.wsi import SlideError, TilingConfig, UpsamplingWarning, slide_id_for, tile_slide

from ._flags import cli_message

#: File types picked up when a folder is given (DICOM-WSI folders are picked up as folders).
SLIDE_SUFFIXES = frozenset(
    {
        ".svs",
        ".ndpi",
        ".mrxs",
        ".scn",
        ".bif",
        ".vms",
        ".tif",
        ".tiff",
        ".dcm",
        ".svslide",
        ".qptiff",
        ".png",
        ".jpg",
        ".jpeg",
    }
)
ERRORS_HEADER = ("slide", "stage", "error_type", "message")


@dataclass
class BatchReport:
    """What a batch run did; written as ``tiling.json`` beside the stores."""

    done: list[dict[str, object]] = field(default_factory=list)
    skipped: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.errors)


def find_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into slide paths (sorted, de-duplicated).

    A folder whose files are all ``.dcm`` is one DICOM-WSI slide; other folders are searched
    one level deep for slide files and DICOM-WSI sub-folders.
    """
    found: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            if _is_dicom_folder(p):
                found.append(p)
                continue
            for child in sorted(p.iterdir()):
                if child.name.startswith("."):
                    continue
                if (child.is_dir() and _is_dicom_folder(child)) or (
                    child.is_file() and child.suffix.lower() in SLIDE_SUFFIXES
                ):
                    found.append(child)
        else:
            found.append(p)  # named explicitly: let the reader say what is wrong with it
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _is_dicom_folder(p: Path) -> bool:
    files = [c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")]
    return bool(files) and all(c.suffix.lower() == ".dcm" for c in files)


def _stage_of(exc: BaseException) -> str:
    from oncotrace.wsi import (
        CorruptSlideError,
        MppError,
        NoTissueError,
        ResolutionError,
        UnsupportedSlideError,
    )

    if isinstance(exc, UnsupportedSlideError | MppError):
        return "open"
    if isinstance(exc, NoTissueError):
        return "detect"
    if isinstance(exc, ResolutionError):
        return "tile"
    if isinstance(exc, CorruptSlideError):
        return "read"
    return "tile"


def tile_batch(
    slides: Sequence[Path],
    out_dir: Path,
    config: TilingConfig,
    *,
    mpp: float | None = None,
    workers: int = 2,
    on_start: Callable[[str], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done: Callable[[str, bool], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> BatchReport:
    """Tile every slide; a failure becomes one ``errors.csv`` row and the rest go on.

    ``errors.csv`` and ``tiling.json`` in ``out_dir`` describe this run (rewritten each run,
    so a slide fixed since the last run drops out of the error list).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    t0 = time.perf_counter()
    ids: dict[str, Path] = {}
    for path in slides:
        sid = slide_id_for(path)
        if on_start:
            on_start(sid)
        ok = False
        if sid in ids:
            report.errors.append(
                _error_row(
                    path,
                    "open",
                    "DuplicateSlideId",
                    f"{path}: slide id {sid!r} is already used by {ids[sid]}. Fix: rename one of"
                    " the files; stores are named by file stem.",
                )
            )
        else:
            ids[sid] = path
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", UpsamplingWarning)
                    res = tile_slide(
                        path,
                        out_dir,
                        config,
                        mpp=mpp,
                        workers=workers,
                        slide_id=sid,
                        progress=on_progress,
                        on_total=on_total,
                    )
                for w in caught:  # upsampled slides: said once, in tiling.json too
                    if isinstance(w.message, UpsamplingWarning):
                        text = cli_message(str(w.message))
                        report.warnings.append({"slide": str(path), "message": text})
                        if on_warning:
                            on_warning(text)
                    else:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            except SlideError as exc:
                report.errors.append(
                    _error_row(path, _stage_of(exc), type(exc).__name__, cli_message(exc))
                )
            except (OSError, MemoryError, RuntimeError, ValueError) as exc:
                report.errors.append(
                    _error_row(
                        path,
                        "tile",
                        type(exc).__name__,
                        f"{path}: {cli_message(exc)}. Fix: see the message;"
                        " rerun the same command to retry this slide.",
                    )
                )
            else:
                ok = True
                row = {
                    "slide_id": res.slide_id,
                    "store": str(res.store),
                    "n_tiles": res.n_tiles,
                    "seconds": round(res.seconds, 3),
                }
                (report.skipped if res.skipped else report.done).append(row)
        if on_done:
            on_done(sid, ok)
    report.seconds = time.perf_counter() - t0
    write_errors_csv(out_dir / "errors.csv", report.errors)
    summary = {
        "package_version": __version__,
        "config": asdict(config),
        "mpp_override": mpp,
        "workers": workers,
        **asdict(report),
    }
    (out_dir / "tiling.json").write_text(json.dumps(summary, indent=2))
    return report


def _error_row(path: Path, stage: str, error_type: str, message: str) -> dict[str, str]:
    return {"slide": str(path), "stage": stage, "error_type": error_type, "message": message}


def write_errors_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ERRORS_HEADER)
        writer.writeheader()
        writer.writerows(rows)
