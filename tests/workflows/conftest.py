"""Shared workflow fixtures: one `oncotrace demo` run for the tests that read a demo's outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``oncotrace demo --cases 12 --workers 2`` once per session: (output folder, console text)."""
    from oncotrace.workflows.cli import app

    out = tmp_path_factory.mktemp("demo") / "demo"
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"  # rich wraps at 80 columns outside a terminal
    try:
        res = CliRunner().invoke(
            app, ["demo", "--out", str(out), "--cases", "12", "--workers", "2"]
        )
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output
