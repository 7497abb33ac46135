"""``oncotrace`` command line. Each subcommand is a thin layer over one library function."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from oncotrace.workflows import (
    _evaluate_cli,
    _import_cli,
    _score_cli,
    _spatial_cli,
    _view_cli,
    _viewer_setup_cli,
)
from oncotrace.workflows._batch import BatchReport, find_slides, tile_batch
from oncotrace.wsi import TilingConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(
    name="oncotrace",
    help="OncoTrace: slides and smears → tiles → attention-MIL → heatmaps.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@app.command()
def tile(
    slides: Annotated[
        list[Path], typer.Argument(help="Slide files, DICOM-WSI folders, or folders of slides.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the per-slide Zarr stores.")],
    mpp_target: Annotated[
        float, typer.Option("--mpp-target", help="Tile resolution in µm/px.")
    ] = 0.5,
    tile_px: Annotated[int, typer.Option("--tile-px", help="Tile side in pixels.")] = 224,
    stride_px: Annotated[
        int | None, typer.Option("--stride-px", help="Grid step in pixels (< tile-px overlaps).")
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="tissue (sections) or smear (cytology).")
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
        typer.Option("--focus", help="Store a per-tile blur score (variance of the Laplacian)."),
    ] = False,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Override the slides' level-0 µm/px.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Reader threads.")] = _default_workers(),
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit non-zero if any slide failed.")
    ] = False,
) -> None:
    """Cut tissue (or smear) tiles at an exact µm/px into one Zarr store per slide."""
    from oncotrace.wsi import TilingConfig

    if mode not in ("tissue", "smear"):
        raise typer.BadParameter("--mode must be 'tissue' or 'smear'")
    config = TilingConfig(
        target_mpp=mpp_target,
        tile_px=tile_px,
        stride_px=stride_px,
        min_tissue=min_tissue,
        mode=mode,  # type: ignore[arg-type]
        min_focus=min_focus,
        focus=focus,
    )
    paths = find_slides(slides)
    if not paths:
        console.print(f"[red]No slides found in {', '.join(map(str, slides))}.[/red]")
        raise typer.Exit(2)
    report = _run_with_progress(paths, out, config, mpp, workers)
    _print_summary(report, out)
    if report.n_failed and strict:
        raise typer.Exit(1)


def _run_with_progress(
    paths: list[Path], out: Path, config: TilingConfig, mpp: float | None, workers: int
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
        )


def _print_summary(report: BatchReport, out: Path) -> None:
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
    if report.errors:
        console.print(
            f"[yellow]{report.n_failed} slide(s) failed; see {out / 'errors.csv'}.[/yellow]"
        )
        for err in report.errors:
            console.print(f"  [red]•[/red] {err['message']}")


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
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")
    ] = "auto",
) -> None:
    """Embed the tiles of each store with an encoder: features/<encoder> (N, D)."""
    from oncotrace import mil

    paths: list[Path] = []
    for p in stores:
        paths += sorted(p.glob("*.zarr")) if p.is_dir() and not (p / "zarr.json").exists() else [p]
    enc = mil.create_encoder(encoder, weights=weights, device=device, precision=precision)  # type: ignore[arg-type]
    failed = 0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for store in paths:
            task = progress.add_task(store.name, total=None)

            def advance(n: int, t: TaskID = task) -> None:
                progress.advance(t, n)

            try:
                mil.embed(store, enc, batch_size=batch_size, progress=advance)
            except (ValueError, KeyError, OSError) as exc:
                failed += 1
                console.print(f"[red]{store}: {exc}[/red]")
    if failed:
        raise typer.Exit(1)


#: TrainConfig fields whose command-line option has another name
_TRAIN_FLAGS = {"tasks": "task", "test_sites": "test_site", "test_fraction": "split"}


@app.command()
def train(
    stores: Annotated[
        Path, typer.Option("--stores", help="Folder of tile stores embedded with --encoder.")
    ],
    labels: Annotated[
        Path,
        typer.Option("--labels", help="labels.csv: slide_id, patient_id, site, tasks, covariates."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Model folder: model.safetensors, model.json, metrics.json."),
    ],
    encoder: Annotated[str, typer.Option("--encoder")] = "pathomics",
    head: Annotated[
        str,
        typer.Option("--head", help="abmil, abmil-gated, clam-sb, clam-mb, transmil, mean, max."),
    ] = "abmil-gated",
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="Label column(s) to predict; repeat for multi-task."),
    ] = None,
    covariates: Annotated[
        str, typer.Option("--covariates", help="Comma-separated covariate columns, e.g. age,sex.")
    ] = "",
    folds: Annotated[
        int | None, typer.Option("--folds", help="Patient-grouped stratified k-fold CV.")
    ] = None,
    test_site: Annotated[
        list[str] | None,
        typer.Option("--test-site", help="Hold whole sites out (external validation)."),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Train:test ratio by patient, e.g. 7:3.")
    ] = None,
    leave_site_out: Annotated[
        bool, typer.Option("--leave-site-out", help="One fold per site.")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs")] = 40,
    lr: Annotated[float, typer.Option("--lr")] = 2e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    n_boot: Annotated[
        int, typer.Option("--n-boot", help="Bootstrap resamples for the CIs.")
    ] = 1000,
    conformal_level: Annotated[
        float,
        typer.Option(
            "--conformal-level",
            min=0.5,
            max=0.999,
            help="Coverage of the conformal prediction sets calibrated on validation patients.",
        ),
    ] = 0.9,
) -> None:
    """Train an attention-MIL model with patient-grouped evaluation; never splits a patient."""
    from oncotrace import mil

    chosen = sum(
        x is not None and x is not False for x in (folds, test_site, split, leave_site_out or None)
    )
    if chosen > 1:
        raise typer.BadParameter("choose one of --folds, --test-site, --split, --leave-site-out")
    test_fraction = 0.3
    if split:
        try:
            a, b = (float(x) for x in split.split(":"))
            test_fraction = b / (a + b)
        except ValueError as exc:
            raise typer.BadParameter(f"--split must look like 7:3, got {split!r}") from exc
    mode = "site" if leave_site_out else ("holdout" if (split or test_site) else "kfold")
    try:
        config = mil.TrainConfig(
            encoder=encoder,
            head=head,
            tasks=tuple(task or ["label"]),
            covariates=tuple(c for c in covariates.split(",") if c),
            split=mode,  # type: ignore[arg-type]
            folds=folds or 5,
            test_sites=tuple(test_site or ()),
            test_fraction=test_fraction,
            epochs=epochs,
            lr=lr,
            seed=seed,
            n_boot=n_boot,
            conformal_level=conformal_level,
        )
    except mil.TrainConfigError as exc:
        flag = "--" + _TRAIN_FLAGS.get(exc.param, exc.param).replace("_", "-")
        raise typer.BadParameter(f"{exc} (option {flag})") from exc
    try:
        result = mil.train_model(stores, labels, config, out)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        typer.echo(f"error: {msg}", err=True)  # plain: rich would fold long paths
        raise typer.Exit(2) from exc
    table = Table(title=f"{result.n_cases} cases, {mode}, {result.seconds} s → {out}")
    for col in ("task", "metric", "estimate", "95 % CI"):
        table.add_column(col)
    for t, m in result.metrics.items():
        if not m:
            table.add_row(t, "(one class on the evaluated side)", "", "")
            continue
        for name, v in (m.get("metrics") or {}).items():
            if isinstance(v, dict) and "estimate" in v:
                ci = f"{v['low']:.3f}–{v['high']:.3f}" if v.get("low") is not None else ""
                table.add_row(
                    t, name, f"{v['estimate']:.3f}" if v["estimate"] is not None else "", ci
                )
    console.print(table)


@app.command()
def encoders() -> None:
    """List the registered patch encoders with their dims, resolution and licence."""
    from oncotrace import mil

    table = Table(title="encoders")
    for col in ("name", "dim", "µm/px", "weights (hub)", "licence"):
        table.add_column(col)
    for name in mil.list_encoders():
        c = mil.encoder_config(name)
        table.add_row(name, str(c.dim), f"{c.native_mpp:g}", c.hub_id or "none needed", c.licence)
    console.print(table)


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="A slide file or DICOM-WSI folder.")],
    mpp: Annotated[float | None, typer.Option("--mpp", help="Override the level-0 µm/px.")] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="auto, cucim, openslide, tifffile, pillow.")
    ] = "auto",
) -> None:
    """Print the allow-listed description of a slide (never labels, macros or raw metadata)."""
    from oncotrace.wsi import SlideError, open_slide

    try:
        with open_slide(slide, backend=backend, mpp=mpp, require_mpp=False) as s:  # type: ignore[arg-type]
            props = s.exported_properties()
            props["dimensions"] = list(s.dimensions)
    except SlideError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(props, indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path(
        "oncotrace-demo"
    ),
    cases: Annotated[int, typer.Option("--cases", help="Patients in the phantom cohort.")] = 24,
    workers: Annotated[
        int, typer.Option("--workers", help="Dask workers for scoring (and reader threads).")
    ] = _default_workers(),
) -> None:
    """Phantom cohort → train on two thirds of the patients → score the rest on a Dask
    LocalCluster → evaluation report and heatmaps. No downloads; a few minutes on 2 cores."""
    import csv

    from oncotrace import mil
    from oncotrace.mil.phantom import make_cohort
    from oncotrace.workflows._evaluate_cli import evaluate_command
    from oncotrace.workflows._score import (
        ScoreConfig,
        SlideJob,
        model_hash,
        run_score,
        write_outputs,
    )

    if cases < 9:
        raise typer.BadParameter("--cases must be at least 9 (3 per fold and a test third)")
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]1/6[/bold] generating a phantom cohort: {cases} patients, benign glands vs"
        " malignant sheets of dark nuclei planted in known regions…"
    )
    cohort = make_cohort(out / "cohort", n_cases=cases, size_px=(2048, 1536), seed=0)
    with open(cohort.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([r["label"] for r in rows])
    train_idx, test_idx = mil.grouped_split(
        labels, np.array([r["patient_id"] for r in rows]), 1 / 3, 0
    )
    train_csv, test_csv = out / "train_labels.csv", out / "test_labels.csv"
    for path, idx in ((train_csv, train_idx), (test_csv, test_idx)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows[i] for i in sorted(idx))
    by_id = {p.stem: p for p in cohort.slide_paths}
    train_paths = [by_id[rows[i]["slide_id"]] for i in sorted(train_idx)]
    console.print(
        f"[bold]2/6[/bold] tiling {len(train_paths)} training slides"
        f" ({len(set(rows[i]['patient_id'] for i in train_idx))} patients) at 0.5 µm/px, 224 px…"
    )
    stores = out / "train" / "stores"
    report = _run_with_progress(train_paths, stores, TilingConfig(), None, workers)
    if report.n_failed:
        _print_summary(report, stores)
        raise typer.Exit(1)
    encoder = mil.create_encoder("pathomics", threads=workers)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("embedding (pathomics)", total=len(train_paths))
        for path in sorted(stores.glob("*.zarr")):
            mil.embed(path, encoder)
            progress.advance(task)
    console.print("[bold]3/6[/bold] training gated attention-MIL, 3-fold patient-grouped CV…")
    model_dir = out / "model"
    config = mil.TrainConfig(
        encoder="pathomics", head="abmil-gated", folds=3, epochs=20, lr=1e-3, seed=0, n_boot=300
    )
    result = mil.train_model(stores, train_csv, config, model_dir)
    auc = (result.metrics.get("label") or {}).get("metrics", {}).get("auc", {})
    if auc:
        console.print(
            f"cross-validated AUC {auc['estimate']:.3f} (95 % CI {auc['low']:.3f}–"
            f"{auc['high']:.3f}, patient-grouped bootstrap)"
        )
    test_paths = [by_id[rows[i]["slide_id"]] for i in sorted(test_idx)]
    n_workers = max(1, min(workers, 2))
    console.print(
        f"[bold]4/6[/bold] scoring {len(test_paths)} held-out slides on a Dask LocalCluster"
        f" ({n_workers} workers): tile → embed → predict → heatmaps…"
    )
    results = out / "scores"
    cfg = ScoreConfig(
        model_dir=str(model_dir.resolve()),
        model_hash=model_hash(model_dir),
        out_dir=str(results.resolve()),
        tiling={"target_mpp": 0.5, "tile_px": 224, "mode": "tissue"},
        threads=max(1, (os.cpu_count() or 2) // n_workers),
    )
    jobs = [SlideJob(p.stem, str(p)) for p in test_paths]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("slides", total=len(jobs))
        scored = run_score(
            jobs,
            cfg,
            workers=n_workers,
            on_total=lambda n, skipped: progress.update(bar, completed=skipped),
            on_done=lambda sid, ok: progress.advance(bar),
            on_dashboard=lambda link: progress.console.print(f"Dask dashboard: {link}"),
        )
    files = write_outputs(jobs, cfg, scored, {"demo": True})
    if scored.errors:
        console.print(f"[red]{len(scored.errors)} slide(s) failed; see {files['errors']}[/red]")
        raise typer.Exit(1)
    console.print(
        "[bold]5/6[/bold] immune-cell maps, carried with the attention maps onto phantom"
        " ultrasound frames by landmark registration…"
    )
    from oncotrace.workflows._demo_spatial import spatial_demo

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        bar = progress.add_task("slides", total=len(jobs))
        spatial_summary = spatial_demo(
            results, lambda sid: progress.advance(bar), workers=max(1, min(workers, 2))
        )
    (results / "spatial_demo.json").write_text(json.dumps(spatial_summary, indent=1) + "\n")
    tre = [v["holdout_tre_mm"] for v in spatial_summary.values() if v["holdout_tre_mm"] is not None]
    if tre:
        console.print(
            f"hold-out landmark TRE {np.mean(tre) * 1000:.0f} µm on average over"
            f" {len(tre)} slides (landmark noise 10 µm per axis)"
        )
    console.print("[bold]6/6[/bold] evaluating the held-out predictions…")
    report_dir = out / "report"
    ev = evaluate_command(model_dir, results / "stores", test_csv, report_dir, n_boot=300)
    task_ev = (ev["metrics"]["tasks"] or {}).get("label") or {}
    test_auc = (task_ev.get("metrics") or {}).get("auc") or {}
    if test_auc and test_auc.get("estimate") is not None:
        console.print(
            f"held-out AUC {test_auc['estimate']:.3f} (95 % CI {test_auc['low']:.3f}–"
            f"{test_auc['high']:.3f}) on {len(test_paths)} slides never seen in training"
        )
    console.print(
        "\nDone. Look at:\n"
        f"  slides and planted-region masks   {cohort.labels_csv.parent}\n"
        f"  model (+ CV metrics, calibration) {model_dir}\n"
        f"  predictions, errors, run.json     {results}\n"
        f"  heatmaps (OME-Zarr, GeoJSON, PNG) {results / 'slides'}/<slide>/attention.*\n"
        f"  immune cells and density maps     {results / 'slides'}/<slide>/immune/\n"
        f"  heatmaps on the ultrasound frame  {results / 'slides'}/<slide>/ultrasound/\n"
        f"  evaluation report                 {report_dir / 'report.html'}\n"
        f"\nBrowse it all: oncotrace view {results}   (once: oncotrace viewer-setup)"
    )


# Commands that live in their own modules register themselves on the app.
_evaluate_cli.register(app, console)
_import_cli.register(app, console)
_score_cli.register(app, console)
_spatial_cli.register(app, console)
_view_cli.register(app, console)
_viewer_setup_cli.register(app, console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
