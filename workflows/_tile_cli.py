"""``oncotrace tile`` and ``oncotrace info``: slides → per-slide tile stores; a slide's description."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from oncotrace.wsi import BackendChoice, Mode, TilingConfig, check_mpp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._batch import BatchReport, check_count, check_out_dir, find_slides, tile_batch
from ._failures import DiskFullError, finish, usage_error
from ._flags import cli_message


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def run_with_progress(
    console: Console,
    paths: list[Path],
    out: Path,
    config: TilingConfig,
    mpp: float | None,
    workers: int,
) -> BatchReport:

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("slides", total=len(paths))
        tiles = progress.add_task("tiles", total=None)

        def on_start(sid: str) -> None:
            progress.reset(tiles, total=None, description=f"tiles {sid}")

        def on_total(n: int) -> None:
            progress.update(tiles, total=n)

        def on_progress(n: int) -> None:
            progress.advance(tiles, n)

        def on_done(sid: str, ok: bool) -> None:
            progress.advance(overall)

        return tile_batch(
            paths,
            out,
            config,
            mpp=mpp,
            workers=workers,
            on_start=on_start,
            on_total=on_total,
            on_progress=on_progress,
            on_done=on_done,
            on_warning=lambda text: progress.console.print(f"[yellow]warning:[/yellow] {text}"),
        )


def print_summary(console: Console, report: BatchReport, out: Path) -> None:
    table = Table(title=f"Tiling → {out}")
    for col in ("slide", "status", "tiles", "seconds"):
        table.add_column(col)
    for row in report.done:
        table.add_row(
            str(row["slide_id"]), "[green]tiled", str(row["n_tiles"]), str(row["seconds"])
        )
    for row in report.skipped:
        table.add_row(str(row["slide_id"]), "[cyan]up to date", str(row["n_tiles"]), "")
    for err in report.errors:
        table.add_row(Path(err["slide"]).name, f"[red]{err['error_type']} ({err['stage']})", "", "")
    console.print(table)
    console.print(
        f"{len(report.done)} slide(s) tiled, {len(report.skipped)} up to date,"
        f" {report.n_failed} failed → {out}"
    )


def register(app: typer.Typer, console: Console) -> None:
    """Add ``tile`` and ``info`` to ``app``."""

    @app.command()
    def tile(
        slides: Annotated[
            list[Path], typer.Argument(help="Slide files, DICOM-WSI folders, or folders of slides.")
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Folder for the per-slide Zarr stores.")
        ],
        mpp_target: Annotated[
            float, typer.Option("--mpp-target", help="Tile resolution in µm/px.")
        ] = 0.5,
        tile_px: Annotated[int, typer.Option("--tile-px", help="Tile side in pixels.")] = 224,
        max_upsample: Annotated[
            float,
            typer.Option(
                "--max-upsample",
                help="Largest finest-level µm/px ÷ target µm/px a slide may be upsampled by.",
            ),
        ] = TilingConfig().max_upsample,
        stride_px: Annotated[
            int | None,
            typer.Option("--stride-px", help="Grid step in pixels (< tile-px overlaps)."),
        ] = None,
        mode: Annotated[
            Mode, typer.Option("--mode", help="tissue (sections) or smear (cytology).")
        ] = "tissue",
        min_tissue: Annotated[
            float | None,
            typer.Option(
                "--min-tissue",
                help="Minimum mask coverage of a tile [default: 0.25 tissue, 0.05 smear].",
            ),
        ] = None,
        min_focus: Annotated[
            float | None,
            typer.Option("--min-focus", help="Drop tiles whose Laplacian variance is below this."),
        ] = None,
        focus: Annotated[
            bool,
            typer.Option(
                "--focus", help="Store a per-tile blur score (variance of the Laplacian)."
            ),
        ] = False,
        mpp: Annotated[
            float | None, typer.Option("--mpp", help="Override the slides' level-0 µm/px.")
        ] = None,
        threads: Annotated[
            int, typer.Option("--threads", help="Reader threads (one process).")
        ] = default_threads(),
    ) -> None:
        """Cut tissue (or smear) tiles at an exact µm/px into one Zarr store per slide."""
        try:  # every number checked once, before any slide is read
            config = TilingConfig(
                target_mpp=mpp_target,
                tile_px=tile_px,
                stride_px=stride_px,
                min_tissue=min_tissue,
                mode=mode,
                min_focus=min_focus,
                focus=focus,
                max_upsample=max_upsample,
            )
            check_count("threads", threads)
            if mpp is not None:
                check_mpp(mpp)
            check_out_dir(out)
        except ValueError as exc:
            raise usage_error(exc) from exc
        paths = find_slides(slides)
        if not paths:
            console.print(f"[red]No slides found in {', '.join(map(str, slides))}.[/red]")
            raise typer.Exit(2)
        try:
            report = run_with_progress(console, paths, out, config, mpp, threads)
        except DiskFullError as exc:  # the stores written are kept; the tables could not be
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(1) from exc
        print_summary(console, report, out)
        finish(report.errors, errors_csv=out / "errors.csv")

    @app.command()
    def info(
        slide: Annotated[Path, typer.Argument(help="A slide file or DICOM-WSI folder.")],
        mpp: Annotated[
            float | None, typer.Option("--mpp", help="Override the level-0 µm/px.")
        ] = None,
        backend: Annotated[
            BackendChoice,
            typer.Option("--backend", help="auto, cucim, openslide, tifffile, pillow."),
        ] = "auto",
    ) -> None:
        """Print the allow-listed description of a slide (never labels, macros or raw metadata)."""
        from oncotrace.wsi import SlideError, open_slide

        try:
            with open_slide(slide, backend=backend, mpp=mpp, require_mpp=False) as s:
                props = s.exported_properties()
                props["dimensions"] = list(s.dimensions)
                problem = s.mpp_problem
        except SlideError as exc:  # plain lines: rich would fold long paths
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(json.dumps(props, indent=2))
        if problem is not None:  # say why mpp is null, and what to pass
            typer.echo(f"warning: mpp_x/mpp_y are null: {cli_message(problem)}", err=True)
