"""``oncotrace score``: batch-score a folder or manifest of slides with a trained model on Dask."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

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

from ._flags import Device


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
        strict: Annotated[
            bool, typer.Option("--strict", help="Exit non-zero if any slide failed.")
        ] = False,
    ) -> None:
        """Tile → embed → predict → heatmaps for every slide; one Dask task per slide, resumable."""
        from oncotrace import mil
        from oncotrace.workflows._batch import find_slides
        from oncotrace.workflows._score import (
            ScoreConfig,
            SlideJob,
            _check_unique,
            model_hash,
            read_manifest,
            run_score,
            scoring_encoder,
            write_outputs,
        )
        from oncotrace.wsi import slide_id_for

        if workers is not None and scheduler is not None:
            raise typer.BadParameter("choose --workers (a LocalCluster) or --scheduler, not both")
        try:
            digest = model_hash(model)
            card = mil.ModelCard.read(model)
            scoring_encoder(card, model)
            covariates = list(card.covariates.names)
            manifests = [p for p in inputs if p.suffix.lower() == ".csv"]
            jobs = [j for m in manifests for j in read_manifest(m, covariates)]
            paths = find_slides([p for p in inputs if p.suffix.lower() != ".csv"])
            if paths and covariates:
                raise ValueError(
                    f"the model needs covariates {covariates}; pass a manifest CSV with those"
                    " columns instead of slide files."
                )
            jobs += [SlideJob(slide_id_for(p), str(p)) for p in paths]
            _check_unique(jobs, "the inputs")
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not jobs:
            typer.echo(f"error: no slides found in {', '.join(map(str, inputs))}.", err=True)
            raise typer.Exit(2)
        tiling, differs = resolve_tiling(
            card.tiling, {"target_mpp": mpp_target, "tile_px": tile_px, "mode": mode}
        )
        for key, (given, trained) in differs.items():
            console.print(
                f"[yellow]warning:[/yellow] {key} = {given} but the model was trained on tiles"
                f" with {key} = {trained}; its predictions may not transfer."
            )
        cores = os.cpu_count() or 2
        n_workers = workers if workers is not None else max(1, cores // 2)
        cfg = ScoreConfig(
            model_dir=str(model.resolve()),
            model_hash=digest,
            out_dir=str(out.resolve()),
            tiling=tiling,
            weights=weights,
            device=device,
            mpp=mpp,
            threads=threads or max(1, cores // n_workers),
            heatmaps=heatmaps,
            delay_s=float(os.environ.get("ONCOTRACE_TEST_SLIDE_DELAY", "0") or 0),
        )
        out.mkdir(parents=True, exist_ok=True)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("slides", total=len(jobs), failed=0)
            failed = 0

            def on_total(n: int, skipped: int) -> None:
                progress.update(
                    bar, completed=skipped, description=f"slides ({skipped} up to date)"
                )

            def on_done(sid: str, ok: bool) -> None:
                nonlocal failed
                failed += not ok
                progress.update(bar, advance=1, failed=failed)

            def on_dashboard(link: str) -> None:
                progress.console.print(f"Dask dashboard: {link}")

            report = run_score(
                jobs,
                cfg,
                workers=None if scheduler else n_workers,
                scheduler=scheduler,
                on_total=on_total,
                on_done=on_done,
                on_dashboard=on_dashboard,
            )
        files = write_outputs(jobs, cfg, report, {"inputs": [str(p) for p in inputs]})
        n_err = len(report.errors)
        console.print(
            f"{len(report.done)} scored, {len(report.skipped)} up to date, {n_err} failed in"
            f" {report.seconds:.1f} s → {files['predictions']}"
        )
        if n_err:
            console.print(f"[yellow]{n_err} slide(s) failed; see {files['errors']}.[/yellow]")
        if n_err and strict:
            raise typer.Exit(1)


#: Tiling for models trained before model.json recorded it (wsi.TilingConfig's defaults).
_DEFAULT_TILING: dict[str, Any] = {"target_mpp": 0.5, "tile_px": 224, "mode": "tissue"}


def resolve_tiling(
    trained: Mapping[str, Any] | None, given: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Scoring tiling: the model's training tiling, with any value the user gave on top.

    Parameters
    ----------
    trained : the card's ``tiling`` (``wsi.TilingConfig`` fields), or None when the model
        does not record it (then ``wsi.TilingConfig``'s defaults).
    given : key -> value the user set on the command line (None: not set).

    Returns the tiling (``wsi.TilingConfig`` fields) and, per key the user set differently
    from the training, ``(given, trained)`` for a warning.
    """
    base = dict(trained) if trained is not None else dict(_DEFAULT_TILING)
    differs: dict[str, tuple[Any, Any]] = {}
    for key, value in given.items():
        if value is None:
            continue
        if trained is not None and key in trained and trained[key] != value:
            differs[key] = (value, trained[key])
        base[key] = value
    return base, differs
