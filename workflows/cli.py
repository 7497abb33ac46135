"""``oncotrace`` command line. Each subcommand is a thin layer over one library function."""

from __future__ import annotations

import typer
from oncotrace.workflows import (
    _demo,
    _embed_cli,
    _evaluate_cli,
    _import_cli,
    _score_cli,
    _spatial_cli,
    _tile_cli,
    _train_cli,
    _view_cli,
    _viewer_setup_cli,
)
from rich.console import Console

app = typer.Typer(
    name="oncotrace",
    help="OncoTrace: slides and smears → tiles → attention-MIL → heatmaps.",
    no_args_is_help=True,
    add_completion=False,
    # Help texts are plain text: "[default: …]" and "reader, [call], …" must print as written,
    # not be eaten as rich markup tags.
    rich_markup_mode=None,
)
console = Console(stderr=True)


# Every command lives in its own module and registers itself on the app, in this order.
_tile_cli.register(app, console)
_embed_cli.register(app, console)
_train_cli.register(app, console)
_evaluate_cli.register(app, console)
_import_cli.register(app, console)
_score_cli.register(app, console)
_spatial_cli.register(app, console)
_view_cli.register(app, console)
_viewer_setup_cli.register(app, console)
_demo.register(app, console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
