"""``oncotrace train``: flags → one ``mil.TrainConfig`` → :func:`oncotrace.mil.train_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from ._batch import check_out_dir
from ._flags import HeadName, cli_message


def register(app: typer.Typer, console: Console) -> None:
    """Add ``train`` to ``app``."""

    @app.command()
    def train(
        stores: Annotated[
            Path, typer.Option("--stores", help="Folder of tile stores embedded with --encoder.")
        ],
        labels: Annotated[
            Path,
            typer.Option(
                "--labels", help="labels.csv: slide_id, patient_id, site, tasks, covariates."
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out", help="Model folder: model.safetensors, model.json, metrics.json."
            ),
        ],
        encoder: Annotated[str, typer.Option("--encoder")] = "pathomics",
        head: Annotated[HeadName, typer.Option("--head", help="MIL head (mil.list_heads()).")] = (
            "abmil-gated"
        ),
        task: Annotated[
            list[str] | None,
            typer.Option("--task", help="Label column(s) to predict; repeat for multi-task."),
        ] = None,
        covariates: Annotated[
            str,
            typer.Option("--covariates", help="Comma-separated covariate columns, e.g. age,sex."),
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
            x is not None and x is not False
            for x in (folds, test_site, split, leave_site_out or None)
        )
        if chosen > 1:
            raise typer.BadParameter(
                "choose one of --folds, --test-site, --split, --leave-site-out"
            )
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
            raise typer.BadParameter(cli_message(exc)) from exc  # it names the flag
        try:
            check_out_dir(out)
            result = mil.train_model(stores, labels, config, out)
        except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            typer.echo(f"error: {cli_message(msg)}", err=True)  # plain: rich folds long paths
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
