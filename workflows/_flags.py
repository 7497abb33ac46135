"""The CLI's names for library parameters, and library messages rendered with them.

The stages do not know the command line: an error names a Python parameter (``target_mpp=29``)
and carries it as ``exc.param``. Everything the CLI shows or writes (console, ``errors.csv``,
``error.json``) goes through :func:`cli_message`, which puts the flag there (``--mpp-target 29``).
"""

from __future__ import annotations

import re
from typing import Literal

# Choices typer validates. The stages define the same Literals; importing mil or spatial for them
# would load torch / scipy.stats (~1 s) for every command, so tests/workflows/test_flags.py keeps
# each one equal to the library's.
Device = Literal["auto", "cpu", "cuda"]  # mil.Device
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # mil.Precision
Stain = Literal["he", "ihc-dab"]  # spatial.Stain
GeometryKind = Literal["polygon", "point"]  # spatial.GeometryKind
RegistrationModel = Literal["auto", "affine", "tps"]  # spatial.RegistrationModel
VisiumImage = Literal["fullres", "hires", "lowres"]  # spatial.VisiumImage
NullName = Literal["toroidal", "block"]  # spatial.NullName
Fallback = Literal["total-counts"]  # spatial.Fallback
#: mil.list_heads(): the registered MIL heads
HeadName = Literal["abmil", "abmil-gated", "clam-mb", "clam-sb", "max", "mean", "transmil"]

#: library parameter -> the flag that sets it (the same flag in every command that has it)
FLAGS: dict[str, str] = {
    "allow_reflection": "--allow-reflection",
    "alpha": "--alpha",
    "bin_um": "--bin-um",
    "conformal_level": "--conformal-level",
    "covariates": "--covariates",
    "epochs": "--epochs",
    "head": "--head",
    "lr": "--lr",
    "n_boot": "--n-boot",
    "seed": "--seed",
    "split": "--split",
    "tasks": "--task",
    "test_fraction": "--split",
    "test_sites": "--test-site",
    "dashboard": "--dashboard",
    "encoder": "--encoder",
    "fallback": "--fallback",
    "folds": "--folds",
    "frame": "--frame",
    "genes": "--genes",
    "min_focus": "--min-focus",
    "min_tissue": "--min-tissue",
    "mode": "--mode",
    "mpp": "--mpp",
    "max_upsample": "--max-upsample",
    "min_positive": "--min-positive",
    "n_null": "--n-null",
    "name": "--name",
    "out_dir": "--out",
    "overwrite": "--overwrite",
    "precision": "--precision",
    "region": "--region",
    "scheduler": "--scheduler",
    "slide_mpp": "--heatmap-mpp",
    "spacing_mm": "--spacing-mm",
    "stain": "--stain",
    "stride_px": "--stride-px",
    "target_mpp": "--mpp-target",
    "threads": "--threads",
    "tile_px": "--tile-px",
    "us_spacing_mm": "--spacing-mm",
    "weights": "--weights",
    "workers": "--workers",
}

# `name=value` -> `--flag value`; `name=True` -> `--flag`; a bare `name=` -> `--flag`. Only where
# the name stands alone (not `x.name=`, `some_name=`, `--name=`).
_PARAM = re.compile(
    r"(?<![\w.\-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")=(True\b)?(?=(\S?))"
)


def flag_for(param: str) -> str:
    """The CLI flag for a library parameter (``--`` + dashes when the CLI has no other name)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(exc: BaseException | str) -> str:
    """The message of ``exc`` with every library parameter written as its CLI flag."""
    text = str(exc)

    def sub(m: re.Match[str]) -> str:
        flag = FLAGS[m.group(1)]
        if m.group(2) or not m.group(3) or not m.group(3).strip(" ,;.)"):
            return flag  # a switch, or the parameter named without a value
        return flag + " "

    return _PARAM.sub(sub, text)
