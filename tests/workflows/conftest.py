"""Shared workflow fixtures: one `oncotrace demo` run for the tests that read a demo's outputs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_disk("600k")``: a folder on a tmpfs of that size (a real full disk: ENOSPC from
    the kernel, for Python and for the Rust Zarr writer alike). Needs the right to mount."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
