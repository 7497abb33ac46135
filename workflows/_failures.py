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

    Returns normally (exit 0) when ``rows`` is empty.
    """
    rows = list(rows)
    for r in rows:
        typer.echo(failure_line(r["slide"], str(r["stage"]), str(r["message"])), err=True)
    if rows:
        where = f" (also in {errors_csv})" if errors_csv is not None else ""
        typer.echo(f"{len(rows)} input(s) failed{where}.", err=True)
        raise typer.Exit(EXIT_FAILED)


def usage_error(exc: BaseException) -> typer.Exit:
    """Print ``error: <message>`` (library parameters as CLI flags) on stderr; the exit to raise."""
    typer.echo(f"error: {cli_message(exc)}", err=True)
    return typer.Exit(EXIT_USAGE)
