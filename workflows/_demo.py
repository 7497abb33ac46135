"""``oncotrace demo``: phantom cohort → tile → embed → train → score on Dask → immune and ultrasound maps → report."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

if TYPE_CHECKING:
    from oncotrace.mil.phantom import Cohort

#: the demo's tiling: training stores and scoring cut slides the same way (wsi's defaults)
_TILING = TilingConfig()
#: fraction of the tissue carrying the class morphology: small, so a slide's evidence is a few
#: tiles among many and the model is not certain of every case
DEMO_REGION = (0.12, 0.25)
#: fraction of patients whose recorded diagnosis is the other class (the slide shows its own):
#: no model can be perfect on such labels, so the metrics and their intervals say something;
#: kept below 1 - the conformal level (0.9), so that sets stay single where the model is sure
DEMO_LABEL_NOISE = 0.08


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
        if cases < 9:
            raise typer.BadParameter("--cases must be at least 9 (3 per fold and a test third)")
        _Demo(out, console, max(1, workers), threads).run(cases)


def _bar(console: Console, *, elapsed: bool = False) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if elapsed:
        columns.append(TimeElapsedColumn())
    return Progress(*columns, console=console)


@dataclass(frozen=True)
class _Split:
    """The phantom cohort split by patient: what stage 1 hands the others."""

    cohort: Cohort
    train_csv: Path
    test_csv: Path
    train_paths: list[Path]
    test_paths: list[Path]
    train_patients: int


@dataclass
class _Demo:
    """The demo's six stages, each a method; a failed stage ends the command with exit 1."""

    out: Path
    console: Console
    workers: int
    threads: int

    def run(self, cases: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        split = self.cohort(cases)
        stores = self.tile_and_embed(split.train_paths, split.train_patients)
        model_dir = self.train(stores, split.train_csv)
        results = self.score(model_dir, split.test_paths)
        self.spatial(results, len(split.test_paths))
        report_dir = self.evaluate(model_dir, results, split.test_csv, len(split.test_paths))
        self.console.print(
            "\nDone. Look at:\n"
            f"  slides and planted-region masks   {split.cohort.labels_csv.parent}\n"
            f"  model (+ CV metrics, calibration) {model_dir}\n"
            f"  predictions, errors, run.json     {results}\n"
            f"  heatmaps (OME-Zarr, GeoJSON, PNG) {results / 'slides'}/<slide>/attention.*\n"
            f"  immune cells and density maps     {results / 'slides'}/<slide>/immune/\n"
            f"  heatmaps on the ultrasound frame  {results / 'slides'}/<slide>/ultrasound/\n"
            f"  evaluation report                 {report_dir / 'report.html'}\n"
            f"\nBrowse it all: oncotrace view {results}   (once: oncotrace viewer-setup)"
        )

    def cohort(self, cases: int) -> _Split:
        """1/6: the phantom cohort, split by patient into a training two thirds and a test third."""
        from oncotrace import mil
        from oncotrace.mil.phantom import make_cohort

        self.console.print(
            f"[bold]1/6[/bold] generating a phantom cohort: {cases} patients, benign glands vs"
            " malignant sheets of dark nuclei planted in small known regions"
            f" ({DEMO_REGION[0]:.0%}–{DEMO_REGION[1]:.0%} of the tissue), with"
            f" {DEMO_LABEL_NOISE:.0%} of the patients' recorded diagnoses disagreeing with"
            " their slides, as in real cohorts…"
        )
        cohort = make_cohort(
            self.out / "cohort",
            n_cases=cases,
            size_px=(2048, 1536),
            seed=0,
            region_fraction=DEMO_REGION,
            label_noise=DEMO_LABEL_NOISE,
        )
        with open(cohort.labels_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        # stratified by recorded label and by whether it disagrees with the slide, so both
        # the training and the test patients carry the label noise
        planted = {
            s: cohort.class_names[int(k)]
            for s, k in zip(cohort.slide_ids, cohort.planted_labels, strict=True)
        }
        strata = np.array(
            [r["label"] if r["label"] == planted[r["slide_id"]] else "relabelled" for r in rows]
        )
        train_idx, test_idx = mil.grouped_split(
            strata, np.array([r["patient_id"] for r in rows]), 1 / 3, 0
        )
        train_csv, test_csv = self.out / "train_labels.csv", self.out / "test_labels.csv"
        for path, idx in ((train_csv, train_idx), (test_csv, test_idx)):
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, list(rows[0]))
                w.writeheader()
                w.writerows(rows[i] for i in sorted(idx))
        by_id = {p.stem: p for p in cohort.slide_paths}
        train_paths = [by_id[rows[i]["slide_id"]] for i in sorted(train_idx)]
        test_paths = [by_id[rows[i]["slide_id"]] for i in sorted(test_idx)]
        train_patients = len({rows[i]["patient_id"] for i in train_idx})
        return _Split(cohort, train_csv, test_csv, train_paths, test_paths, train_patients)

    def tile_and_embed(self, train_paths: list[Path], n_patients: int) -> Path:
        """2/6: tile the training slides and embed them with the weight-free encoder."""
        from oncotrace import mil

        self.console.print(
            f"[bold]2/6[/bold] tiling {len(train_paths)} training slides"
            f" ({n_patients} patients) at 0.5 µm/px, 224 px…"
        )
        stores = self.out / "train" / "stores"
        report = run_with_progress(self.console, train_paths, stores, _TILING, None, self.threads)
        if report.n_failed:
            print_summary(self.console, report, stores)
            raise typer.Exit(1)
        encoder = mil.create_encoder("pathomics", threads=self.threads)
        with _bar(self.console) as progress:
            task = progress.add_task("embedding (pathomics)", total=len(train_paths))
            for path in sorted(stores.glob("*.zarr")):
                mil.embed(path, encoder)
                progress.advance(task)
        return stores

    def train(self, stores: Path, train_csv: Path) -> Path:
        """3/6: gated attention-MIL with 3-fold patient-grouped cross-validation."""
        from oncotrace import mil

        self.console.print(
            "[bold]3/6[/bold] training gated attention-MIL, 3-fold patient-grouped CV…"
        )
        model_dir = self.out / "model"
        config = mil.TrainConfig(
            encoder="pathomics",
            head="abmil-gated",
            folds=3,
            epochs=20,
            lr=1e-3,
            seed=0,
            n_boot=300,
        )
        result = mil.train_model(stores, train_csv, config, model_dir)
        auc = (result.metrics.get("label") or {}).get("metrics", {}).get("auc", {})
        if auc:
            self.console.print(
                f"cross-validated AUC {auc['estimate']:.3f} (95 % CI {auc['low']:.3f}–"
                f"{auc['high']:.3f}, patient-grouped bootstrap)"
            )
        return model_dir

    def score(self, model_dir: Path, test_paths: list[Path]) -> Path:
        """4/6: score the held-out slides on a Dask LocalCluster, as ``oncotrace score`` does."""
        from oncotrace.workflows._score import score_slides

        self.console.print(
            f"[bold]4/6[/bold] scoring {len(test_paths)} held-out slides on a Dask LocalCluster"
            f" ({self.workers} workers): tile → embed → predict → heatmaps…"
        )
        results = self.out / "scores"
        with _bar(self.console, elapsed=True) as progress:
            bar = progress.add_task("slides", total=len(test_paths))
            run = score_slides(
                test_paths,
                model_dir,
                results,
                workers=self.workers,
                threads=max(1, (os.cpu_count() or 2) // self.workers),
                on_total=lambda n, skipped: progress.update(bar, completed=skipped),
                on_done=lambda sid, ok: progress.advance(bar),
                on_dashboard=lambda link: progress.console.print(
                    f"Dask dashboard (live while this run lasts): {link}"
                ),
                on_warning=lambda text: progress.console.print(f"[yellow]warning:[/yellow] {text}"),
            )
        if run.report.errors:
            self.console.print(
                f"[red]{len(run.report.errors)} slide(s) failed; see {run.files['errors']}[/red]"
            )
            raise typer.Exit(1)
        return results

    def spatial(self, results: Path, n_slides: int) -> None:
        """5/6: immune-cell maps, carried with the attention maps onto phantom ultrasound."""
        from oncotrace.workflows._demo_spatial import spatial_demo

        self.console.print(
            "[bold]5/6[/bold] immune-cell maps, carried with the attention maps onto phantom"
            " ultrasound frames by landmark registration…"
        )
        with _bar(self.console) as progress:
            bar = progress.add_task("slides", total=n_slides)
            summary = spatial_demo(
                results, lambda sid: progress.advance(bar), workers=max(1, min(self.threads, 2))
            )
        (results / "spatial_demo.json").write_text(json.dumps(summary, indent=1) + "\n")
        tre = [v["holdout_tre_mm"] for v in summary.values() if v["holdout_tre_mm"] is not None]
        if tre:
            self.console.print(
                f"hold-out landmark TRE {np.mean(tre) * 1000:.0f} µm on average over"
                f" {len(tre)} slides (landmark noise 10 µm per axis)"
            )

    def evaluate(self, model_dir: Path, results: Path, test_csv: Path, n_slides: int) -> Path:
        """6/6: the held-out evaluation report."""
        from oncotrace.workflows._evaluate_cli import evaluate_command

        self.console.print("[bold]6/6[/bold] evaluating the held-out predictions…")
        report_dir = self.out / "report"
        ev = evaluate_command(model_dir, results / "stores", test_csv, report_dir, n_boot=300)
        task_ev = (ev["metrics"]["tasks"] or {}).get("label") or {}
        test_auc = (task_ev.get("metrics") or {}).get("auc") or {}
        if test_auc and test_auc.get("estimate") is not None:
            self.console.print(
                f"held-out AUC {test_auc['estimate']:.3f} (95 % CI {test_auc['low']:.3f}–"
                f"{test_auc['high']:.3f}) on {n_slides} slides never seen in training"
            )
        return report_dir
