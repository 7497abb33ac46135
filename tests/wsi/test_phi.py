"""Patient data in a slide's metadata never reaches a message, a report or a store (issue 12).

Each file below carries ``DOE^JOHN MRN00123456`` where a number belongs: the Aperio ``MPP``
field, the TIFF ``ResolutionUnit`` / ``XResolution`` tags (rewritten as text), the OME
``PhysicalSizeX``. ``oncotrace info`` and ``oncotrace tile`` run on each; the name and the record
number must appear in nothing they print or write.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from oncotrace.workflows import cli_message
from oncotrace.workflows.cli import app
from oncotrace.wsi import SlideError, open_slide
from oncotrace.wsi._backends import Backend
from oncotrace.wsi._errors import WITHHELD, metadata_float, metadata_value, reader_failure
from oncotrace.wsi._slide import _resolve_mpp
from oncotrace.wsi.synthetic import he_texture, write_pyramid_tiff
from typer.testing import CliRunner

PATIENT = "DOE^JOHN MRN00123456"
SECRETS = ("DOE", "JOHN", "MRN00123456")


def _aperio(mpp: str, mag: str = "20") -> str:
    return (
        "Aperio Image Library v12.0.15\r\n1024x768 [0,0 1024x768] (256x256) JPEG/RGB Q=70"
        f"|AppMag = {mag}|MPP = {mpp}|Filename = slide|Date = 01/02/24"
    )


def _image() -> np.ndarray:
    img = np.full((768, 1024, 3), 235, np.uint8)
    img[128:640, 128:896] = he_texture((512, 768), np.random.default_rng(12))
    return img


def _text_tag(path: Path, code: int, text: str) -> None:
    """Rewrite tag ``code`` of the first IFD as an ASCII value (a writer that mislabels types)."""
    with tifffile.TiffFile(path) as tf:
        entry = tf.pages.first.tags[code].offset
    data = bytearray(path.read_bytes())
    value = text.encode() + b"\x00"
    data[entry : entry + 12] = struct.pack("<HHII", code, 2, len(value), len(data))
    path.write_bytes(bytes(data + value))


def _stripped(path: Path, **kw: object) -> Path:
    """An untiled RGB TIFF: OpenSlide refuses it, so tifffile (which parses the metadata) reads it."""
    tifffile.imwrite(path, _image(), photometric="rgb", metadata=None, **kw)  # type: ignore[arg-type]
    return path


def _svs_stripped_mpp(d: Path) -> Path:
    return _stripped(d / "aperio-strip.svs", description=_aperio(PATIENT))


def _svs_tiled_mpp(d: Path) -> Path:  # OpenSlide's Aperio reader opens it
    path = d / "aperio-tiled.svs"
    return write_pyramid_tiff(
        path, _image(), mpp=None, description=_aperio(PATIENT), compression="jpeg"
    )


def _svs_tiled_appmag(d: Path) -> Path:
    path = d / "aperio-appmag.svs"
    desc = _aperio("0.5", mag=PATIENT)
    return write_pyramid_tiff(path, _image(), mpp=None, description=desc, compression="jpeg")


def _tiff_text_unit(d: Path) -> Path:
    path = _stripped(d / "unit-text.tif", resolution=(20_000, 20_000), resolutionunit="CENTIMETER")
    _text_tag(path, 296, PATIENT)
    return path


def _tiff_text_xres(d: Path) -> Path:
    path = _stripped(d / "xres-text.tif", resolution=(20_000, 20_000), resolutionunit="CENTIMETER")
    _text_tag(path, 282, PATIENT)
    return path


def _ome_text_size(d: Path) -> Path:
    path = d / "ome-text.ome.tif"
    tifffile.imwrite(
        path,
        _image(),
        photometric="rgb",
        tile=(256, 256),
        metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    with tifffile.TiffFile(path) as tf:
        xml = tf.ome_metadata or ""
    assert 'PhysicalSizeX="0.5"' in xml  # the generator writes what the test rewrites
    tifffile.tiffcomment(path, xml.replace('PhysicalSizeX="0.5"', f'PhysicalSizeX="{PATIENT}"'))
    return path


MAKERS = {
    "aperio-mpp-stripped": _svs_stripped_mpp,
    "aperio-mpp-openslide": _svs_tiled_mpp,
    "aperio-appmag-openslide": _svs_tiled_appmag,
    "tiff-resolutionunit-text": _tiff_text_unit,
    "tiff-xresolution-text": _tiff_text_xres,
    "ome-physicalsize-text": _ome_text_size,
}


def _assert_clean(where: str, text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {where}:\n{text}"


@pytest.fixture(params=sorted(MAKERS))
def leaky(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = MAKERS[request.param](tmp_path)
    assert PATIENT.encode() in path.read_bytes()  # the name really is in the file
    return path


def test_info_never_prints_metadata_text(leaky: Path) -> None:
    res = CliRunner().invoke(app, ["info", str(leaky)])
    _assert_clean("info output", res.output + (res.stderr if res.stderr_bytes else ""))
    assert res.exit_code in (0, 1), res.output


@pytest.mark.parametrize("mpp", [None, 0.5])
def test_tile_never_writes_metadata_text(leaky: Path, tmp_path: Path, mpp: float | None) -> None:
    out = tmp_path / "tiles"
    args = ["tile", str(leaky), "--out", str(out), "--tile-px", "128"]
    if mpp is not None:
        args += ["--mpp", str(mpp)]
    res = CliRunner().invoke(app, args)
    _assert_clean("tile output", res.output + (res.stderr if res.stderr_bytes else ""))
    for name in ("errors.csv", "tiling.json"):
        assert (out / name).is_file(), res.output
        _assert_clean(name, (out / name).read_text())
    for store in out.glob("*.zarr"):
        _assert_clean(f"{store.name} attrs", json.dumps(dict(zarr.open_group(store).attrs)))


def test_library_errors_withhold_metadata_text(leaky: Path) -> None:
    """What ``score`` writes into error.json is ``str(exc)``: the same text as the CLI's."""
    for backend in ("auto", "openslide", "tifffile"):
        try:
            with open_slide(leaky, backend=backend, require_mpp=False) as s:
                text = json.dumps(s.exported_properties()) + str(s.mpp_problem)
        except SlideError as exc:
            text = str(exc)
        _assert_clean(f"open_slide(backend={backend!r})", text)


def test_stripped_aperio_says_the_value_is_withheld(tmp_path: Path) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(_svs_stripped_mpp(tmp_path), backend="tifffile")
    assert WITHHELD in str(err.value)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.2527, "0.2527"),
        (20, "20"),
        ("0.499", "0.499"),
        (" 1e-3 ", "1e-3"),
        ((10_000, 3), "10000, 3"),
    ],
)
def test_metadata_value_shows_numbers(value: object, shown: str) -> None:
    assert metadata_value(value) == shown


@pytest.mark.parametrize(
    "value",
    [PATIENT, "0.5 DOE", "nan", "inf", math.nan, True, b"0.5", "1" * 40, ("0.5", PATIENT), None],
)
def test_metadata_value_withholds_the_rest(value: object) -> None:
    assert metadata_value(value) == f"({WITHHELD})"


def test_metadata_float_names_the_field_not_the_value() -> None:
    assert metadata_float(" 0.25 ", "Aperio MPP") == 0.25
    with pytest.raises(ValueError, match="Aperio MPP field is not a number") as err:
        metadata_float(PATIENT, "Aperio MPP")
    _assert_clean("metadata_float", str(err.value))


@pytest.mark.parametrize(
    ("exc", "kept"),
    [
        (ValueError(f"could not convert string to float: '{PATIENT}'"), "could not convert"),
        (ValueError(f"invalid literal for int() with base 10: '{PATIENT}'"), "invalid literal"),
        (KeyError(PATIENT), "KeyError"),
        (ValueError(f'can\'t parse "{PATIENT}"'), "can"),
        (ValueError("too many values to unpack (expected 2)"), "(expected 2)"),
    ],
)
def test_reader_failure_cuts_quoted_values(exc: Exception, kept: str) -> None:
    text = reader_failure(exc)
    _assert_clean("reader_failure", text)
    assert kept in text
    assert text.startswith(type(exc).__name__)


class _Reader(Backend):
    """A reader reporting what a careless one might: file text as the resolution's source."""

    name = "tifffile"
    containers = frozenset({"tiff"})

    def __init__(self, mpp: tuple[float, float] | None, detail: str, problem: str | None) -> None:
        super().__init__(Path("slide.tif"))
        self.file_mpp, self.file_mpp_detail = mpp, detail
        self.file_mpp_problem = problem


@pytest.mark.parametrize("mpp", [(0.5, 0.5), (400.0, 400.0)])
def test_mpp_detail_is_a_fixed_phrase(mpp: tuple[float, float]) -> None:
    found, problem = _resolve_mpp(Path("slide.tif"), _Reader(mpp, PATIENT, None), None, False)
    text = f"{found} {problem}"
    _assert_clean("Mpp.detail / mpp_problem", text)
    assert (found is not None and found.detail == "file") or "reads as 400" in str(problem)
    real = _Reader(mpp, "TIFF resolution tags", None)
    assert "TIFF resolution tags" in str(_resolve_mpp(Path("slide.tif"), real, None, False))


def test_unreadable_mpp_field_is_named_in_the_mpp_problem() -> None:
    try:
        metadata_float(PATIENT, "Aperio MPP")
    except ValueError as exc:
        reader = _Reader(None, "Aperio ImageDescription MPP", str(exc))
    found, problem = _resolve_mpp(Path("slide.tif"), reader, None, False)
    assert found is None
    assert "Aperio MPP field is not a number" in str(problem)
    assert WITHHELD in str(problem)
    _assert_clean("mpp_problem", str(problem))


@pytest.mark.parametrize(
    "make", [_svs_stripped_mpp, _tiff_text_unit, _tiff_text_xres, _ome_text_size]
)
def test_a_text_resolution_field_opens_without_mpp_and_the_fix_works(
    make: object, tmp_path: Path
) -> None:
    """The field is named (not its value), the slide opens without an mpp, and following the
    message — pass --mpp — tiles it."""
    path = make(tmp_path)  # type: ignore[operator]
    with open_slide(path, backend="tifffile", require_mpp=False) as s:
        assert s.mpp is None and s.mpp_problem is not None
        assert "field" in str(s.mpp_problem) and "--mpp" in cli_message(s.mpp_problem)
        _assert_clean("mpp_problem", str(s.mpp_problem))
    out = tmp_path / "tiles"
    res = CliRunner().invoke(
        app, ["tile", str(path), "--out", str(out), "--tile-px", "128", "--mpp", "0.5"]
    )
    assert res.exit_code == 0, res.output
    _assert_clean("tile output", res.output)
