"""Library messages name Python parameters; the CLI renders its own flags."""

from __future__ import annotations

import pytest
from oncotrace import wsi
from oncotrace.workflows import FLAGS, cli_message


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("tile at a coarser target: target_mpp=29 or more.", "--mpp-target 29 or more."),
        ("pass mpp=0.25 (40× scan) or mpp=0.5 (20×).", "pass --mpp 0.25 (40× scan) or --mpp 0.5"),
        ("For cytology smears use mode=smear.", "use --mode smear."),
        ("pass allow_reflection=True if the", "pass --allow-reflection if the"),
        ("check stain=)", "check --stain)"),
        ("pass spacing_mm= (millimetres", "pass --spacing-mm (millimetres"),
        ("x us_spacing_mm= [0.2, 0.2]", "x --spacing-mm [0.2, 0.2]"),
    ],
)
def test_parameters_become_flags(library: str, cli: str) -> None:
    assert cli in cli_message(library)
    assert "=" not in cli_message(library).split(cli)[0][-2:]


def test_names_inside_other_words_are_left_alone() -> None:
    text = "slide_id=abc, obj.mpp=3, the --mpp=1 flag, my_mode=x, tile_pxs=4"
    assert cli_message(text) == text


def test_a_library_error_carries_its_parameter_and_renders_with_the_flag(tmp_path) -> None:
    import numpy as np
    from oncotrace.wsi.synthetic import write_pyramid_tiff

    img = np.full((256, 256, 3), 200, np.uint8)
    path = write_pyramid_tiff(tmp_path / "coarse.tif", img, mpp=8.0, levels=1)
    with wsi.open_slide(path) as slide, pytest.raises(wsi.ResolutionError) as err:
        wsi.tile_geometry(slide, target_mpp=0.5, tile_px=224)
    assert err.value.param == "target_mpp"
    assert "target_mpp=8" in str(err.value) and "--mpp-target" not in str(err.value)
    assert "--mpp-target 8" in cli_message(err.value)
    assert FLAGS[err.value.param] == "--mpp-target"


def test_errors_keep_their_parameter_across_processes() -> None:
    import pickle

    e = wsi.MppError("a.svs", "no pixel size.", "pass mpp=0.25.", param="mpp")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is wsi.MppError and back.param == "mpp" and str(back) == str(e)
    p = pickle.loads(pickle.dumps(wsi.ParameterError("tile_px= must be > 0", param="tile_px")))
    assert p.param == "tile_px" and str(p) == "tile_px= must be > 0"


@pytest.mark.parametrize(
    ("cli_name", "library"),
    [
        ("Device", "mil.Device"),
        ("Precision", "mil.Precision"),
        ("Stain", "spatial.Stain"),
        ("GeometryKind", "spatial.GeometryKind"),
        ("RegistrationModel", "spatial.RegistrationModel"),
        ("VisiumImage", "spatial.VisiumImage"),
        ("NullName", "spatial.NullName"),
        ("Fallback", "spatial.Fallback"),
    ],
)
def test_cli_choices_are_the_libraries_choices(cli_name: str, library: str) -> None:
    from typing import get_args

    from oncotrace import mil, spatial
    from oncotrace.workflows import _flags  # private: the CLI's Literals are not API

    stage, name = library.split(".")
    lib = getattr({"mil": mil, "spatial": spatial}[stage], name)
    assert get_args(getattr(_flags, cli_name)) == get_args(lib)


def test_the_cli_heads_are_the_registered_heads() -> None:
    from typing import get_args

    from oncotrace import mil
    from oncotrace.workflows import _flags  # private: the CLI's Literal is not API

    assert list(get_args(_flags.HeadName)) == mil.list_heads()


def test_typer_refuses_a_choice_outside_the_literal() -> None:
    from oncotrace.workflows.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["tile", "x.svs", "--out", "o", "--mode", "smudge"])
    assert result.exit_code == 2 and "smudge" in result.output and "tissue" in result.output


def test_train_refuses_an_unknown_head_and_renders_config_errors_as_flags(tmp_path) -> None:
    from oncotrace.workflows.cli import app
    from typer.testing import CliRunner

    base = ["train", "--stores", str(tmp_path), "--labels", str(tmp_path / "l.csv")]
    base += ["--out", str(tmp_path / "m")]
    res = CliRunner().invoke(app, [*base, "--head", "attention"])
    assert res.exit_code == 2 and "attention" in res.output and "abmil-gated" in res.output
    res = CliRunner().invoke(app, [*base, "--epochs", "0"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich wraps the usage box
    assert "--epochs 0" in text and "epochs=" not in text
    assert not (tmp_path / "m").exists()
