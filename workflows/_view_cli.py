"""``oncotrace view``: serve a results folder to the browser until Ctrl-C."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _stop_on_sigterm() -> None:
    """Let ``kill`` / ``Popen.terminate()`` stop the server as cleanly as Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``view`` command to ``app``."""

    @app.command()
    def view(
        results_dir: Annotated[
            Path, typer.Argument(help="Output folder of `oncotrace score` (holds slides/).")
        ],
        port: Annotated[int, typer.Option("--port", help="TCP port (0 = any free port).")] = 8000,
        host: Annotated[
            str,
            typer.Option(
                "--host", help="Address to listen on; anything but loopback exposes the slides."
            ),
        ] = "127.0.0.1",
        cache_mib: Annotated[
            float, typer.Option("--cache-mib", help="Tile cache in MiB of JPEG (0 = off).")
        ] = 256,
        no_browser: Annotated[
            bool, typer.Option("--no-browser", help="Only print the URL; open no browser.")
        ] = False,
    ) -> None:
        """Browse slides, predictions, heatmaps and ultrasound overlays in a local web viewer."""
        from oncotrace.workflows._viewer.server import (
            LOOPBACK_HOSTS,
            RunningServer,
            bind,
            create_app,
            is_loopback,
        )

        if not 0 <= port <= 65535:
            raise typer.BadParameter("--port must be 0..65535")
        if cache_mib < 0:
            raise typer.BadParameter("--cache-mib must be >= 0 (0 turns the cache off)")
        loopback = is_loopback(host)
        try:
            web = create_app(
                results_dir, cache_mib=cache_mib, allowed_hosts=LOOPBACK_HOSTS if loopback else None
            )
            sock = bind(host, port)
        except (FileNotFoundError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        server = RunningServer(web, sock)
        if not loopback:
            console.print(
                f"[yellow]listening on {host}: anyone who can reach this machine can see these "
                "slides and results.[/yellow]"
            )
        server.start()
        _stop_on_sigterm()
        # Plain print, flushed: scripts and tests read the URL from stdout.
        print(f"OncoTrace viewer: {server.url}  (Ctrl-C to stop)", flush=True)
        if not no_browser:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.wait()
        except KeyboardInterrupt:
            console.print("stopping the viewer")
        finally:
            server.stop()
