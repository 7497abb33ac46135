"""How batch commands end: one stderr line per failed input, and the exit status.

Every command over several inputs (``tile``, ``embed``, ``score``, ``immune``,
``import-features``) exits 0 when every input is done (or already was), 1 when some input
failed (after finishing the others; each failure is one line on stderr and one row in
``errors.csv``), and 2 on a usage error (bad option, no inputs found), before doing any work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import typer

from ._flags import cli_message

#: Exit status when every input is done.
EXIT_OK = 0
#: Exit status when at least one input failed and the others were finished.
EXIT_FAILED = 1
#: Exit status for a usage error (nothing was done).
EXIT_USAGE = 2


def failure_line(path: object, stage: str, message: str) -> str:
    """``failed: <file>: <stage>: <message>`` on one line (newlines in the message folded)."""
    text = " ".join(str(message).split())
    return f"failed: {path}: {stage}: {text}"


def finish(rows: Iterable[Mapping[str, object]], *, errors_csv: object | None = None) -> None:
    """Print each failure row (``slide``, ``stage``, ``message``) on stderr and exit 1 if any.

    Rows whose ``error_type`` is :data:`DISK_FULL` are said once, as one ``error:`` line.

    Returns normally (exit 0) when ``rows`` is empty.
    """
    rows = list(rows)
    full = [r for r in rows if r.get("error_type") == DISK_FULL]
    if full:  # one cause, said once: every other input would fail the same way
        typer.echo(
            f"error: {len(full)} input(s) not done: {cli_message(str(full[0]['message']))}",
            err=True,
        )
    for r in rows:
        if r.get("error_type") != DISK_FULL:
            typer.echo(failure_line(r["slide"], str(r["stage"]), str(r["message"])), err=True)
    if rows:
        where = f" (also in {errors_csv})" if errors_csv is not None else ""
        typer.echo(f"{len(rows)} input(s) failed{where}.", err=True)
        raise typer.Exit(EXIT_FAILED)


def usage_error(exc: BaseException) -> typer.Exit:
    """Print ``error: <message>`` (library parameters as CLI flags) on stderr; the exit to raise."""
    typer.echo(f"error: {cli_message(exc)}", err=True)
    return typer.Exit(EXIT_USAGE)


#: ``error_type`` of an input that failed, or was not started, because the output disk is full.
DISK_FULL = "DiskFull"

_DISK_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (Linux)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is an out-of-space or over-quota failure.

    Python raises ``OSError`` with errno ENOSPC/EDQUOT; the Zarr codec pipeline (Rust) raises a
    ``RuntimeError`` whose text says "No space left on device (os error 28)".
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_space_text(folder: object) -> str:
    """``"12.3 MB free"`` for the file system holding ``folder`` (or its nearest parent)."""
    import shutil
    from pathlib import Path

    p = Path(str(folder)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free"


def disk_full_message(folder: object, what: str) -> str:
    """One sentence: what could not be written, where, how much room is left, and the fix."""
    return (
        f"no space left on the disk holding {folder} ({free_space_text(folder)}) while writing"
        f" {what}. Fix: free space there, or pass --out on a disk with room, then rerun the"
        " same command: finished work is kept and only the rest is redone."
    )


class DiskFullError(OSError):
    """The output disk is full (or over quota); the message names the folder and the fix."""

    def __init__(self, folder: object, what: str) -> None:
        super().__init__(28, disk_full_message(folder, what))
        self.folder = folder

    def __str__(self) -> str:
        return str(self.strerror)


def remove_stale_temporaries(folder: object) -> list[str]:
    """Remove temporary files an earlier run left in ``folder`` and its ``slides/*`` folders
    (:func:`wsi.remove_stale_temp_files` on each). Returns the names removed."""
    from pathlib import Path

    from oncotrace.wsi import remove_stale_temp_files

    root = Path(str(folder))
    return [
        str(p)
        for here in (root, *sorted(root.glob("slides/*")))
        for p in remove_stale_temp_files(here)
    ]
