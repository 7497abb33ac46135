"""Tile a folder (or list) of slides: one store per slide, failures isolated into errors.csv."""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oncotrace import __version__
from oncotrace.wsi import (
    ParameterError,
    SlideError,
    TilingConfig,
    UpsamplingWarning,
    atomic_write_text,
    check_mpp,
    link_problem,
    slide_id_for,
    sniff,
    tile_slide,
)

from ._failures import DISK_FULL, DiskFullError, disk_full_message, is_disk_full
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
    """Expand files and folders into slide paths (de-duplicated, in the order given).

    A folder whose files are all ``.dcm`` is one DICOM-WSI slide; other folders are searched
    one level deep for slide files and DICOM-WSI sub-folders. Whatever in a folder looks meant
    as a slide but cannot be one is returned too, so that it becomes one failure (see
    :func:`input_problem`) instead of being passed over: a broken or looping symbolic link, a
    folder named like a slide file, a sub-folder holding slides (not searched). A file with no
    suffix is taken when its bytes are TIFF.
    """
    return expand_inputs(inputs, SLIDE_SUFFIXES, unit=_is_dicom_folder, sniff=_slide_bytes)


def expand_inputs(
    inputs: Iterable[str | Path],
    suffixes: frozenset[str],
    *,
    unit: Callable[[Path], bool] = lambda p: False,
    sniff: Callable[[Path], bool] = lambda p: False,
) -> list[Path]:
    """Files and folders → input paths, for every batch command.

    A path named on the command line is kept as given (the reader says what is wrong with it).
    A folder (``unit`` false for it) is searched one level deep: files with one of ``suffixes``,
    sub-folders for which ``unit`` is true (a DICOM-WSI folder is one slide), and — so that
    nothing is dropped without a word — links that cannot be followed, folders named with one
    of ``suffixes``, and sub-folders holding such files deeper down. A file without a suffix
    is taken when ``sniff`` (its first bytes) says it is one (scanners and PACS exports often
    drop the suffix). Hidden names are skipped.
    """
    found: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and not unit(p):
            found += [c for c in sorted(p.iterdir()) if _wanted(c, suffixes, unit, sniff)]
        else:
            found.append(p)  # named explicitly: let the reader say what is wrong with it
    seen: set[str] = set()
    unique = []
    for p in found:
        key = os.path.realpath(p)  # never raises: a symlink loop is kept, and reported
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


#: What embed and score take from a folder of stores: folders named ``<slide_id>.zarr``.
STORE_SUFFIXES = frozenset({".zarr"})


def is_store(p: Path) -> bool:
    """A Zarr group: one input, never searched into."""
    return (p / "zarr.json").is_file()


def is_store_named(p: Path) -> bool:
    """Named like a store: one input (its reader says what is wrong with an unfinished one)."""
    return p.suffix.lower() in STORE_SUFFIXES or is_store(p)


def _wanted(
    child: Path,
    suffixes: frozenset[str],
    unit: Callable[[Path], bool],
    sniff: Callable[[Path], bool],
) -> bool:
    if child.name.startswith("."):
        return False
    named_like = child.suffix.lower() in suffixes
    if link_problem(child) is not None:
        return named_like or not child.suffix  # a link to a DICOM-WSI folder has no suffix
    if child.is_dir():
        return named_like or unit(child) or _holds(child, suffixes)
    if not child.is_file():
        return False
    return named_like or (not child.suffix and _sniffed(child, sniff))


def _sniffed(path: Path, sniff: Callable[[Path], bool]) -> bool:
    try:
        return sniff(path)
    except OSError:  # unreadable: not taken here (a named file's reader says why)
        return False


def _slide_bytes(path: Path) -> bool:
    """A TIFF-family file by its magic bytes (a slide that lost its suffix). DICOM instances
    are not taken one by one: a DICOM-WSI slide is a folder of them."""
    return sniff(path) == "tiff"


def _holds(folder: Path, suffixes: frozenset[str]) -> bool:
    """Whether any file below ``folder`` has one of ``suffixes`` (Zarr stores and hidden
    folders not searched; links to folders not followed)."""
    ends = tuple(suffixes)
    for here, dirs, files in os.walk(folder, onerror=lambda exc: None):
        if any(f.lower().endswith(ends) and not f.startswith(".") for f in files):
            return True
        if any(d.lower().endswith(ends) and not d.startswith(".") for d in dirs):
            return True  # inputs that are folders: tile stores (embed), x.svs/ (reported)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".zarr")]
        del here
    return False


def input_problem(
    path: Path,
    suffixes: frozenset[str] = SLIDE_SUFFIXES,
    *,
    unit: Callable[[Path], bool] | None = None,
) -> tuple[str, str] | None:
    """``(error_type, message)`` for an input that cannot be read as one, before any reader.

    A symbolic link that is dangling or loops (``BrokenLink``), a folder named with one of
    ``suffixes`` that is not one input (``unit``, default: a DICOM-WSI folder) (``NotAFile``),
    and a folder that is not one input but holds files (or folders) with ``suffixes``
    (``NotSearched``: folders are searched one level deep). None otherwise: the reader judges
    the rest.
    """
    is_unit = _is_dicom_folder if unit is None else unit
    broken = link_problem(path)
    if broken is not None:
        return "BrokenLink", f"{path}: {broken[0]} Fix: {broken[1]}"
    if path.is_dir() and path.suffix.lower() in suffixes and not is_unit(path):
        return (
            "NotAFile",
            f"{path}: a folder named like a {path.suffix} file (an unpacked archive, or a copy"
            " that went wrong?). Fix: put the file itself in its place, or rename the folder.",
        )
    if path.is_dir() and not is_unit(path) and _holds(path, suffixes):
        return (
            "NotSearched",
            f"{path}: a folder inside the folder given, with files to process in it; it was"
            " not searched (a folder is searched one level deep). Fix: name this folder (or"
            " its files) on the command line too.",
        )
    return None


def _is_dicom_folder(p: Path) -> bool:
    try:
        files = [c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")]
    except OSError:  # unreadable: the reader says so
        return False
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


def check_count(name: str, value: object) -> None:
    """``value`` (workers, threads) is a whole number ≥ 1; else ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(
            f"{name}= must be a whole number ≥ 1, got {value!r}. Fix: pass one, e.g. {name}=2.",
            param=name,
        )


def check_out_dir(out_dir: str | Path, *, param: str = "out_dir") -> None:
    """``out_dir`` can be (or become) a folder: neither it nor a parent is a file. Else
    ParameterError, before anything is read or written."""
    path = Path(out_dir)
    for here in (path, *path.parents):
        if here.is_dir():
            return
        if here.exists() or here.is_symlink():
            what = "is" if here == path else f"lies inside {here}, which is"
            raise ParameterError(
                f"{param}={path} {what} a file or a broken link, not a folder. Fix: pass a"
                " folder path (a new one is created), or move that file away.",
                param=param,
            )


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
    so a slide fixed since the last run drops out of the error list). Raises ParameterError
    for a ``workers`` or ``mpp`` that no slide could use.
    """
    check_count("workers", workers)  # numbers for every slide: refused once, before any is read
    if mpp is not None:
        check_mpp(mpp)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    t0 = time.perf_counter()
    ids: dict[str, Path] = {}
    full: str | None = None  # the disk-full message, once the output disk has filled up
    for path in slides:
        sid = slide_id_for(path)
        if on_start:
            on_start(sid)
        ok = False
        if full is not None:  # every other slide would fail the same way: not started
            report.errors.append(
                _error_row(path, "tile", DISK_FULL, full + " (not started: the disk was full)")
            )
        elif sid in ids:
            report.errors.append(
                _error_row(
                    path,
                    "open",
                    "DuplicateSlideId",
                    f"{path}: slide id {sid!r} is already used by {ids[sid]}. Fix: rename one of"
                    " the files; stores are named by file stem.",
                )
            )
        elif (problem := input_problem(path)) is not None:
            report.errors.append(_error_row(path, "open", *problem))
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
                if is_disk_full(exc):
                    full = disk_full_message(out_dir, "tile stores")
                    report.errors.append(_error_row(path, "tile", DISK_FULL, full))
                else:
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
    try:
        atomic_write_text(out_dir / "tiling.json", json.dumps(summary, indent=2))
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(out_dir, "tiling.json") from exc
        raise
    return report


def _error_row(path: Path, stage: str, error_type: str, message: str) -> dict[str, str]:
    return {"slide": str(path), "stage": stage, "error_type": error_type, "message": message}


def write_errors_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``errors.csv`` atomically: the old table or the new one, never a cut-off file.

    Raises
    ------
    DiskFullError
        The disk holding ``path`` is full (or over quota); the previous file is kept.
    """
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=ERRORS_HEADER)
    writer.writeheader()
    writer.writerows(rows)
    try:
        # a batch where every input failed early (immune over a folder of bad entries) has
        # made no output folder yet; its errors.csv is the one thing it must still write
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, table.getvalue())
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(Path(path).parent, Path(path).name) from exc
        raise
