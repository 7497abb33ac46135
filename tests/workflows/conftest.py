"""Shared workflow fixtures: one `oncotrace demo` run for the tests that read a demo's outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``oncotrace demo --workers 2`` once per session: (output folder, console text)."""
    from oncotrace.workflows.cli import app

    launch = tmp_path_factory.mktemp("demo")
    out = launch / "demo"
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"  # rich wraps at 80 columns outside a terminal
    cwd = Path.cwd()
    os.chdir(launch)  # `--out demo`, relative, as a newcomer types it: results must not care
    try:
        # as README runs it, default cases
        res = CliRunner().invoke(app, ["demo", "--out", "demo", "--workers", "2"])
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output
