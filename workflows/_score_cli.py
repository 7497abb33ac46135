"""``oncotrace score``: batch-score a folder or manifest of slides with a trained model on Dask."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from oncotrace.wsi import Mode
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ._failures import EXIT_FAILED, DiskFullError, finish
from ._flags import Device, cli_message
from ._score import DASHBOARD


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``score`` command to ``app``."""

    @app.command()
    def score(
        inputs: Annotated[
            list[Path],
            typer.Argument(
                help="Slide files, folders of slides, or a manifest .csv (path[, slide_id], covariates)."
            ),
        ],
        model: Annotated[Path, typer.Option("--model", help="Folder from `oncotrace train`.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Results folder.")],
        workers: Annotated[
            int | None,
            typer.Option("--workers", help="LocalCluster worker processes [default: cores // 2]."),
        ] = None,
        scheduler: Annotated[
            str | None,
            typer.Option("--scheduler", help="Address of a running Dask scheduler (tcp://…)."),
        ] = None,
        threads: Annotated[
            int | None,
            typer.Option(
                "--threads", help="Reader/torch threads per worker [default: cores/workers]."
            ),
        ] = None,
        device: Annotated[Device, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
        mode: Annotated[
            Mode | None,
            typer.Option("--mode", help="tissue or smear [default: as the model was trained]."),
        ] = None,
        mpp_target: Annotated[
            float | None,
            typer.Option("--mpp-target", help="Tile µm/px [default: as the model was trained]."),
        ] = None,
        tile_px: Annotated[
            int | None,
            typer.Option("--tile-px", help="Tile side in px [default: as the model was trained]."),
        ] = None,
        mpp: Annotated[
            float | None, typer.Option("--mpp", help="Override the slides' level-0 µm/px.")
        ] = None,
        weights: Annotated[
            str | None, typer.Option("--weights", help="Encoder weights file/folder.")
        ] = None,
        heatmaps: Annotated[
            bool, typer.Option("--heatmaps/--no-heatmaps", help="Write attention heatmaps.")
        ] = True,
        dashboard: Annotated[
            str,
            typer.Option(
                "--dashboard",
                help="Own cluster's dashboard: HOST:PORT, or none (default: loopback only).",
            ),
        ] = DASHBOARD,
    ) -> None:
        """Tile → embed → predict → heatmaps for every slide; one Dask task per slide, resumable."""
        from oncotrace.workflows._score import score_slides

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        progress = Progress(*columns, console=console)
        bar = progress.add_task("slides", total=None, failed=0, visible=False)
        failed = 0

        def on_total(n: int, skipped: int) -> None:
            progress.start()
            progress.update(
                bar, total=n, completed=skipped, visible=True,
                description=f"slides ({skipped} up to date)",
            )  # fmt: skip

        def on_done(sid: str, ok: bool) -> None:
            nonlocal failed
            failed += not ok
            progress.update(bar, advance=1, failed=failed)

        def on_warning(text: str) -> None:
            console.print(f"[yellow]warning:[/yellow] {cli_message(text)}")

        def on_dashboard(link: str) -> None:
            live = "" if scheduler else " (live while this run lasts)"
            progress.console.print(f"Dask dashboard{live}: {link}")

        try:
            run = score_slides(
                inputs,
                model,
                out,
                workers=workers,
                scheduler=scheduler,
                threads=threads,
                device=device,
                tiling={"target_mpp": mpp_target, "tile_px": tile_px, "mode": mode},
                mpp=mpp,
                weights=weights,
                heatmaps=heatmaps,
                dashboard=None if dashboard.lower() == "none" else dashboard,
                on_warning=on_warning,
                on_total=on_total,
                on_done=on_done,
                on_dashboard=on_dashboard,
            )
        except DiskFullError as exc:  # the tables could not be written; the slides' files were
            progress.stop()
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(EXIT_FAILED) from exc
        except (ValueError, FileNotFoundError) as exc:
            progress.stop()  # before the message, so the bar does not draw over it
            typer.echo(f"error: {cli_message(exc)}", err=True)
            raise typer.Exit(2) from exc
        finally:
            progress.stop()
        report, files = run.report, run.files
        n_err = len(report.errors)
        console.print(
            f"{len(report.done)} scored, {len(report.skipped)} up to date, {n_err} failed in"
            f" {report.seconds:.1f} s → {files['predictions']}"
        )
        finish(
            (
                {
                    "slide": e.get("path", e["slide_id"]),
                    "stage": e["stage"],
                    "error_type": e["error_type"],
                    "message": cli_message(e["message"]),
                }
                for e in report.errors
            ),
            errors_csv=files["errors"],
        )
