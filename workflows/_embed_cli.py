"""``oncotrace embed`` and ``oncotrace encoders``: tile stores → features with a registered encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ._batch import (
    STORE_SUFFIXES,
    expand_inputs,
    input_problem,
    is_store,
    is_store_named,
    write_errors_csv,
)
from ._failures import DISK_FULL, DiskFullError, finish, is_disk_full
from ._flags import Device, Precision, cli_message


def register(app: typer.Typer, console: Console) -> None:
    """Add ``embed`` and ``encoders`` to ``app``."""

    @app.command()
    def embed(
        stores: Annotated[
            list[Path], typer.Argument(help="Tile stores (<slide>.zarr) or folders of them.")
        ],
        encoder: Annotated[
            str, typer.Option("--encoder", help="A name from `oncotrace encoders`.")
        ] = "pathomics",
        weights: Annotated[
            str | None,
            typer.Option("--weights", help="Local checkpoint file or folder (default: the hub)."),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
        device: Annotated[
            Device, typer.Option("--device", help="cuda when present (auto).")
        ] = "auto",
        precision: Annotated[
            Precision,
            typer.Option("--precision", help="bf16/fp16 on GPU, bf16 autocast on CPU (auto)."),
        ] = "auto",
    ) -> None:
        """Embed the tiles of each store with an encoder: features/<encoder> (N, D)."""
        from oncotrace import mil

        paths = expand_inputs(stores, STORE_SUFFIXES, unit=is_store)
        if not paths:
            typer.echo(
                f"error: no .zarr stores in {', '.join(map(str, stores))}."
                " Fix: give the folder `oncotrace tile --out` wrote, or store paths.",
                err=True,
            )
            raise typer.Exit(2)
        enc = mil.create_encoder(encoder, weights=weights, device=device, precision=precision)
        done: list[tuple[Path, int]] = []
        skipped: list[Path] = []
        failed: list[tuple[Path, str, str]] = []
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for store in paths:
                # a dangling or looping link, a sub-folder of stores (not searched): said as such,
                # not as "not a finished store, run tile first"
                problem = input_problem(store, STORE_SUFFIXES, unit=is_store_named)
                if problem is not None:
                    failed.append((store, *problem))
                    continue
                task = progress.add_task(store.name, total=_n_tiles(store))
                seen = [0]

                def advance(n: int, t: TaskID = task, seen: list[int] = seen) -> None:
                    seen[0] += n
                    progress.advance(t, n)

                try:
                    mil.embed(store, enc, batch_size=batch_size, progress=advance)
                except (ValueError, KeyError, OSError) as exc:
                    kind = DISK_FULL if is_disk_full(exc) else type(exc).__name__
                    failed.append((store, kind, cli_message(exc)))
                    progress.remove_task(task)
                    continue
                if seen[0]:
                    done.append((store, seen[0]))
                else:  # embed returned without computing: the features were up to date
                    skipped.append(store)
                    progress.update(task, description=f"{store.name} (already embedded)")
        console.print(
            f"{len(done)} store(s) embedded ({sum(n for _, n in done)} tiles),"
            f" {len(skipped)} already embedded with these weights, {len(failed)} failed;"
            f" features/{enc.config.name} in each store."
        )
        rows = [
            {"slide": str(store.absolute()), "stage": "embed", "error_type": kind, "message": m}
            for store, kind, m in failed
        ]
        table = errors_table_for(paths)
        try:
            write_errors_csv(table, rows)
        except DiskFullError as exc:
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(1) from exc
        except OSError as exc:  # a folder embed may not write in: the failures are still said
            typer.echo(f"warning: {table} could not be written ({exc}).", err=True)
            finish(rows)
        finish(rows, errors_csv=table)

    @app.command()
    def encoders() -> None:
        """List the registered patch encoders with their dims, resolution and licence."""
        from oncotrace import mil

        table = Table(title="encoders")
        for col in ("name", "dim", "µm/px", "weights (hub)", "licence"):
            table.add_column(col)
        for name in mil.list_encoders():
            c = mil.encoder_config(name)
            table.add_row(
                name, str(c.dim), f"{c.native_mpp:g}", c.hub_id or "none needed", c.licence
            )
        console.print(table)


def _n_tiles(store: Path) -> int | None:
    """Tiles in ``store`` (the progress bar's total), or None when it cannot be read here
    (embed then says what is wrong with it)."""
    from oncotrace.wsi import Store, StoreError

    try:
        return Store.open(store, require_complete=False).attrs.n_tiles
    except (StoreError, OSError, ValueError):
        return None


#: embed's table of failures, beside the stores (tile's own errors.csv there is left alone)
EMBED_ERRORS = "embed-errors.csv"


def errors_table_for(stores: list[Path]) -> Path:
    """Where embed writes its ``errors.csv``: in the folder holding the stores (their nearest
    common folder when they come from several), as ``embed-errors.csv``; rewritten each run."""
    import os

    parents = [str(p.absolute().parent) for p in stores]
    return Path(os.path.commonpath(parents)) / EMBED_ERRORS
