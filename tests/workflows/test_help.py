"""Every command's --help prints every option's help text whole (no text eaten as markup)."""

from __future__ import annotations

import re

import pytest
import typer
from oncotrace.workflows.cli import app
from typer.testing import CliRunner

COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)  # type: ignore[attr-defined]


def _flat(text: str) -> str:
    """Without the wrapping: click breaks lines at spaces and after hyphens."""
    return re.sub(r"(?<=-)\s+", "", re.sub(r"\s+", " ", text)).strip()


@pytest.mark.parametrize("name", NAMES)
def test_every_option_help_renders_whole(name: str) -> None:
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    shown = _flat(res.output)
    command = COMMAND.commands[name]  # type: ignore[attr-defined]
    helps = [p.help for p in command.params if getattr(p, "help", None)]
    for text in helps:
        assert _flat(text) in shown, f"{name}: help {text!r} is not shown whole"
    assert _flat((command.help or "").split("\n\n")[0]) in shown


def test_bracketed_help_survives() -> None:
    """The two texts a user saw eaten: score's '[default: …]' and evaluate's '[task]'."""
    score = _flat(CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "100"}).output)
    assert "Tile µm/px [default: as the model was trained]." in score
    evaluate = _flat(CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "100"}).output)
    assert "[task], call, [score]" in evaluate
