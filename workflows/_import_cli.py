"""``oncotrace import-features``: CLAM/TRIDENT ``.h5`` feature files → one tile store per slide.

A file that cannot be imported becomes one row of ``<out>/errors.csv`` (the same columns as
``oncotrace tile`` writes) and the others go on; the exit status is 1 when any file failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from oncotrace import __version__
from oncotrace.workflows._batch import (
    BatchReport,
    check_count,
    check_out_dir,
    expand_inputs,
    input_problem,
    write_errors_csv,
)
from oncotrace.workflows._failures import DiskFullError, finish, is_disk_full, usage_error
from oncotrace.workflows._flags import cli_message
from oncotrace.wsi import ParameterError, atomic_write_json, check_mpp
from rich.console import Console
from rich.table import Table

H5_SUFFIXES = frozenset({".h5", ".hdf5"})
SUMMARY_FILE = "import-features.json"


def find_feature_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (one level deep, ``*.h5`` / ``*.hdf5``) into unique paths.

    As for slides (:func:`~oncotrace.workflows._batch.expand_inputs`), broken links, folders
    named ``*.h5`` and sub-folders holding feature files are kept, to be reported; a file with
    no suffix is taken when it starts with the HDF5 signature.
    """
    return expand_inputs(inputs, H5_SUFFIXES, sniff=_hdf5_bytes)


def _hdf5_bytes(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def import_batch(
    files: Sequence[Path],
    out_dir: Path,
    name: str,
    *,
    tile_px: int | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    on_done: Callable[[str, bool], None] | None = None,
) -> BatchReport:
    """Import every file; a failure becomes one ``errors.csv`` row and the rest go on.

    ``errors.csv`` and ``import-features.json`` in ``out_dir`` describe this run (rewritten
    each run, so a file fixed since the last run drops out of the error list).
    """
    from oncotrace.mil import FeatureImportError, import_features

    if mpp is not None:  # numbers for every file: refused once, before any is read
        check_mpp(mpp)
    if tile_px is not None:
        check_count("tile_px", tile_px)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    t0 = time.perf_counter()
    ids: dict[str, Path] = {}
    for path in files:
        sid = path.stem
        ok = False
        if sid in ids:
            report.errors.append(
                _row(
                    path,
                    "DuplicateSlideId",
                    f"{path}: slide id {sid!r} is already used by {ids[sid]}. Fix: rename one of"
                    " the files; stores are named by file stem.",
                )
            )
        elif (problem := input_problem(path, H5_SUFFIXES)) is not None:
            report.errors.append(_row(path, *problem))
        else:
            ids[sid] = path
            try:
                res = import_features(
                    path, out_dir, name, tile_px=tile_px, mpp=mpp, overwrite=overwrite
                )
            except FeatureImportError as exc:
                report.errors.append(_row(path, type(exc).__name__, cli_message(exc)))
            except (OSError, MemoryError, RuntimeError, ValueError, KeyError) as exc:
                report.errors.append(
                    _row(
                        path,
                        type(exc).__name__,
                        f"{path}: {cli_message(exc)}. Fix: see the message; rerun the same command to retry"
                        " this file.",
                    )
                )
            else:
                ok = True
                row: dict[str, object] = {
                    "slide_id": res.slide_id,
                    "store": str(res.store),
                    "n_tiles": res.n_tiles,
                    "dim": res.dim,
                    "format": res.format,
                    "action": res.action,
                    "seconds": round(res.seconds, 3),
                }
                (report.skipped if res.skipped else report.done).append(row)
        if on_done:
            on_done(sid, ok)
    report.seconds = time.perf_counter() - t0
    write_errors_csv(out_dir / "errors.csv", report.errors)
    summary = {
        "package_version": __version__,
        "name": name,
        "tile_px_level0": tile_px,
        "mpp": mpp,
        "overwrite": overwrite,
        "files": [str(p) for p in files],
        "done": report.done,
        "skipped": report.skipped,
        "errors": report.errors,
        "seconds": report.seconds,
    }
    try:
        atomic_write_json(out_dir / SUMMARY_FILE, summary, indent=2)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(out_dir, SUMMARY_FILE) from exc
        raise
    return report


def _row(path: Path, error_type: str, message: str) -> dict[str, str]:
    return {"slide": str(path), "stage": "import", "error_type": error_type, "message": message}


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``import-features`` command to ``app``."""

    @app.command("import-features")
    def import_features_cmd(
        files: Annotated[
            list[Path],
            typer.Argument(help="CLAM/TRIDENT .h5 feature files, or folders of them."),
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Folder for the per-slide Zarr stores.")
        ],
        name: Annotated[
            str,
            typer.Option(
                "--name",
                help="Encoder name to store them under (features/<name>); pass it to"
                " `oncotrace train --encoder`.",
            ),
        ],
        mpp: Annotated[
            float | None,
            typer.Option("--mpp", help="Level-0 µm/px, for files that do not record it."),
        ] = None,
        tile_px: Annotated[
            int | None,
            typer.Option(
                "--tile-px", help="Tile side in level-0 pixels, for files that do not record it."
            ),
        ] = None,
        overwrite: Annotated[
            bool,
            typer.Option(
                "--overwrite", help="Replace features/<name> that came from another file."
            ),
        ] = False,
    ) -> None:
        """Import patch features from CLAM/TRIDENT .h5 files: one store per slide, no patches."""
        paths = find_feature_files(files)
        if not paths:
            console.print(f"[red]No .h5 files found in {', '.join(map(str, files))}.[/red]")
            raise typer.Exit(2)
        try:
            report = import_batch(paths, out, name, tile_px=tile_px, mpp=mpp, overwrite=overwrite)
        except DiskFullError as exc:  # the stores written are kept; the tables could not be
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(1) from exc
        except ParameterError as exc:  # refused before any file was read
            raise usage_error(exc) from exc
        table = Table(title=f"import-features → {out} (features/{name})")
        for col in ("slide", "status", "tiles", "dim", "from"):
            table.add_column(col)
        for r in report.done:
            table.add_row(
                str(r["slide_id"]),
                f"[green]{r['action']}",
                str(r["n_tiles"]),
                str(r["dim"]),
                str(r["format"]),
            )
        for r in report.skipped:
            table.add_row(str(r["slide_id"]), "[cyan]up to date", str(r["n_tiles"]), "", "")
        for e in report.errors:
            table.add_row(Path(e["slide"]).stem, f"[red]{e['error_type']}", "", "", "")
        console.print(table)
        console.print(
            f"{len(report.done)} file(s) imported, {len(report.skipped)} up to date,"
            f" {report.n_failed} failed → {out}"
        )
        finish(report.errors, errors_csv=out / "errors.csv")
