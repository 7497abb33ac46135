"""``oncotrace`` command line. Each subcommand is a thin layer over one library function."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer
from oncotrace.workflows import (
    _embed_cli,
    _evaluate_cli,
    _import_cli,
    _score_cli,
    _spatial_cli,
    _tile_cli,
    _view_cli,
    _viewer_setup_cli,
)
from oncotrace.workflows._tile_cli import default_threads, print_summary, run_with_progress
from oncotrace.wsi import TilingConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

app = typer.Typer(
    name="oncotrace",
    help="OncoTrace: slides and smears → tiles → attention-MIL → heatmaps.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


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
    mode: Literal["kfold", "site", "holdout"] = (
        "site" if leave_site_out else ("holdout" if (split or test_site) else "kfold")
    )
    try:
        config = mil.TrainConfig(
            encoder=encoder,
            head=head,
            tasks=tuple(task or ["label"]),
            covariates=tuple(c for c in covariates.split(",") if c),
            split=mode,
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
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path(
        "oncotrace-demo"
    ),
    cases: Annotated[int, typer.Option("--cases", help="Patients in the phantom cohort.")] = 24,
    workers: Annotated[
        int, typer.Option("--workers", help="Dask worker processes for scoring.")
    ] = 2,
    threads: Annotated[
        int, typer.Option("--threads", help="Threads for tiling, embedding and cell detection.")
    ] = default_threads(),
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
    report = run_with_progress(console, train_paths, stores, TilingConfig(), None, threads)
    if report.n_failed:
        print_summary(console, report, stores)
        raise typer.Exit(1)
    encoder = mil.create_encoder("pathomics", threads=threads)
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
    n_workers = max(1, workers)
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
            results, lambda sid: progress.advance(bar), workers=max(1, min(threads, 2))
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
_tile_cli.register(app, console)
_embed_cli.register(app, console)
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
