"""``oncotrace demo``: phantom cohort → tile → embed → train → score on Dask → immune and ultrasound maps → report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
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


def register(app: typer.Typer, console: Console) -> None:
    """Add ``demo`` to ``app``."""

    @app.command()
    def demo(
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")
        ] = Path("oncotrace-demo"),
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
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
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
            tiling=TilingConfig(),  # the training stores' tiling (stage 2)
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
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("slides", total=len(jobs))
            spatial_summary = spatial_demo(
                results, lambda sid: progress.advance(bar), workers=max(1, min(threads, 2))
            )
        (results / "spatial_demo.json").write_text(json.dumps(spatial_summary, indent=1) + "\n")
        tre = [
            v["holdout_tre_mm"] for v in spatial_summary.values() if v["holdout_tre_mm"] is not None
        ]
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
