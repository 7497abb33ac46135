"""``oncotrace evaluate`` (being written; registers nothing yet)."""

from __future__ import annotations

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``evaluate`` command to ``app``."""
