"""``oncotrace viewer-setup``: install the viewer's browser dependencies (OpenSeadragon) from npm."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``viewer-setup`` command to ``app``."""

    @app.command("viewer-setup")
    def viewer_setup(
        force: Annotated[
            bool, typer.Option("--force", help="Reinstall even if the pinned version is there.")
        ] = False,
    ) -> None:
        """Install OpenSeadragon (pinned in the package's package-lock.json) with `npm ci` into
        the user cache (or $ONCOTRACE_VIEWER_DIR), once per machine, for `oncotrace view`."""
        from oncotrace.workflows._viewer._assets import (
            install_dir,
            installed_version,
            pinned_openseadragon_version,
            setup_viewer,
        )

        where = install_dir()
        want = pinned_openseadragon_version()
        if force or installed_version(where) != want:
            console.print(f"installing OpenSeadragon {want} into {where} (npm ci)…")
        else:
            console.print(f"OpenSeadragon {want} is already installed in {where}.")
        try:
            build = setup_viewer(where, force=force)
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)  # plain: rich would fold long paths
            raise typer.Exit(2) from exc
        typer.echo(str(build))
