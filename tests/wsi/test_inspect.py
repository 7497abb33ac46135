"""The pre-flight check ``wsi._inspect``: sniffing, TIFF tile tables, and the cuCIM crash guard.

The property tests feed random and mutated bytes to ``open_slide``. Native readers can kill the
interpreter on such input, so they run in a child process and the parent reports a signal.
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oncotrace import wsi
from oncotrace.wsi import inspect_file
from oncotrace.wsi._backends import cucim_available  # private: open_slide's own cuCIM probe
from oncotrace.wsi._inspect import sniff  # private: the sniffer inspect_file uses

from tests.wsi import badinput, multichannel

REPO_ROOT = Path(__file__).resolve().parents[2]

# -- sniffing by content, not by name ------------------------------------------------------------

JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"II+\x00\x08\x00\x00\x00", "tiff"),  # BigTIFF
        (bytes(128) + b"DICM\x02\x00\x00\x00", "dicom"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (b"BM6\x00\x00\x00\x00\x00", "bmp"),
        (JP2_SIGNATURE + b"\x00\x00\x00\x14ftyp", "jp2"),
        (b"\xff\x4f\xff\x51\x00\x2f", "jp2"),  # raw JPEG 2000 codestream
        (b"Slide 4, H&E, scanned 2024-05-02\n", "text"),
        (b"\x00\x81\xfe\xff" * 40, "unknown"),
        (bytes(132), "text"),  # NULs decode as UTF-8; only the extension check can refuse it
    ],
)
def test_sniff_reads_magic_bytes(head: bytes, container: str, tmp_path: Path) -> None:
    path = tmp_path / "slide.bin"
    path.write_bytes(head)
    assert sniff(path) == container


def test_sniff_text_with_a_multibyte_character_at_the_cut(tmp_path: Path) -> None:
    """Only 132 bytes are read; a 2-byte UTF-8 character split by that cut is still text."""
    text = (
        "x" * 131 + "µm per pixel: unknown, ask the scanner operator\n"
    )  # 'µ' spans bytes 131-132
    assert text.encode()[131:133] == "µ".encode()
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    assert sniff(path) == "text"


def test_sniff_ignores_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "looks-like.svs"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert sniff(path) == "png"


# -- real files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "container", "cucim_safe"),
    [
        ("slides/cmu-1-small-region.svs", "tiff", True),  # tiled JPEG
        ("slides/openslide-small.svs", "tiff", True),
        ("slides/tcga-cr-7395-01a-01-ts1.svs", "tiff", True),  # Aperio JPEG 2000 (33005)
        ("slides/bracs-1640-n-3-cropped.tiff", "tiff", True),  # tiled, uncompressed
        ("slides/openslide-boxes.tiff", "tiff", False),  # Deflate: cuCIM would segfault
        ("dicom-wsi/camelyon-lymph-node/multiframe_camelyon_challenge_image.dcm", "dicom", False),
        ("dicom-wsi/bone-marrow/bone-marrow-jpeg.dcm", "dicom", False),
        ("bad-input/malformed-sm-column-major.dcm", "dicom", False),  # refused later, by OpenSlide
    ],
)
def test_inspect_real_files(rel: str, container: str, cucim_safe: bool, shared_data: Path) -> None:
    info = inspect_file(shared_data / rel)
    assert (info.container, info.cucim_safe, info.is_ome) == (container, cucim_safe, False)
    assert info.size_bytes == (shared_data / rel).stat().st_size


def test_auto_never_hands_a_deflate_tiff_to_cucim(shared_data: Path) -> None:
    path = shared_data / "slides/openslide-boxes.tiff"
    with tifffile.TiffFile(path) as tf:
        assert int(tf.pages.first.compression) == 8  # Adobe Deflate, independently of wsi
    with wsi.open_slide(path, mpp=0.25) as slide:
        assert slide.backend == "openslide"
    with pytest.raises(wsi.UnsupportedSlideError, match="cuCIM"):
        wsi.open_slide(path, backend="cucim", mpp=0.25)


# -- generated TIFF variants: which ones cuCIM may see ---------------------------------------------

IMG = badinput.tissue_like_rgb(200, 300, salt=11)


def _writer(
    *, data: np.ndarray = IMG, photometric: str = "rgb", **kw: object
) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        tifffile.imwrite(
            path,
            data,
            photometric=photometric,
            resolution=(20_000, 20_000),  # 0.5 µm/px
            resolutionunit="CENTIMETER",
            **kw,
        )

    return write


TILE = (128, 128)
#: name: (writer, whether cuCIM may decode it). Only variants every reader path opens.
TIFF_VARIANTS = {
    "tiled-none": (_writer(tile=TILE), True),
    "tiled-jpeg": (_writer(tile=TILE, compression="jpeg"), True),
    "tiled-deflate": (_writer(tile=TILE, compression="zlib"), False),
    "tiled-lzw": (_writer(tile=TILE, compression="lzw"), False),
    "tiled-zstd": (_writer(tile=TILE, compression="zstd"), False),
    "stripped": (_writer(), False),
    "tiled-planar": (
        _writer(tile=TILE, data=np.moveaxis(IMG, -1, 0), planarconfig="separate"),
        False,
    ),
    "tiled-gray": (_writer(tile=TILE, data=IMG[..., 0], photometric="minisblack"), False),
    "tiled-uint16": (_writer(tile=TILE, data=IMG.astype(np.uint16) * 257), False),
}


@pytest.mark.parametrize("name", list(TIFF_VARIANTS))
def test_cucim_guard_on_generated_tiffs(name: str, tmp_path: Path) -> None:
    write, safe = TIFF_VARIANTS[name]
    path = tmp_path / f"{name}.tif"
    write(path)
    info = inspect_file(path)
    assert (info.container, info.cucim_safe) == ("tiff", safe)
    with wsi.open_slide(path) as slide:
        if cucim_available():
            assert (slide.backend == "cucim") == safe
        else:
            assert slide.backend != "cucim"


# -- the bad-input corpus: what the pre-flight must catch, and what it must let through -----------


@pytest.mark.parametrize(
    "make", badinput.GENERATORS + badinput.CRASHERS, ids=lambda f: f.__name__.removeprefix("make_")
)
def test_preflight_catches_exactly_the_inspect_stage_inputs(
    make: Callable[[Path], badinput.BadInput], tmp_path: Path
) -> None:
    record = make(tmp_path)
    if record.path.is_dir():  # open_slide resolves folders before inspecting a file
        assert record.stage != "inspect"
    elif record.stage == "inspect":
        with pytest.raises(wsi.SlideError) as info:
            inspect_file(record.path)
        assert type(info.value) is record.error
        assert record.match in str(info.value)
        assert str(record.path) in str(info.value)
    else:
        inspect_file(record.path)  # damage found later must not be guessed at here


def test_preflight_reads_no_pixels_of_a_huge_header(tmp_path: Path) -> None:
    """A header declaring 10⁷×10⁷ px must be refused from its tags, without allocating."""
    record = badinput.make_huge_tiff_with_a_tile(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(wsi.CorruptSlideError, match="larger than any glass slide"):
            inspect_file(record.path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


# -- properties: no input crashes the interpreter; every refusal is a SlideError -------------------

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=True,  # the same examples on every run: a failure here is never a fluke
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Prefixes that reach the TIFF parser (with and without a plausible first-IFD offset) and
#: cuCIM behind it, and ones the sniffer must refuse on its own.
PREFIXES = [
    b"",
    b"II*\x00",
    b"II*\x00\x08\x00\x00\x00",
    b"MM\x00*\x00\x00\x00\x08",
    b"II+\x00\x08\x00",
]


def check_random_bytes(directory: Path) -> None:
    """Random non-empty bytes named ``.svs`` never open and always raise a SlideError."""
    counter = itertools.count()

    @FUZZ
    @given(prefix=st.sampled_from(PREFIXES), body=st.binary(min_size=1, max_size=2048))
    def prop(prefix: bytes, body: bytes) -> None:
        path = directory / f"random-{next(counter)}.svs"
        path.write_bytes(prefix + body)
        try:
            slide = wsi.open_slide(path)
        except wsi.SlideError as exc:
            assert str(path) in str(exc) and "Fix:" in str(exc), str(exc)
            return
        finally:
            path.unlink()  # skipped if the interpreter dies, leaving the culprit behind
        slide.close()
        raise AssertionError(f"{len(prefix + body)} random bytes opened as {slide!r}")

    prop()


def _mutation_bases() -> list[bytes]:
    bases = []
    for compression in (None, "jpeg"):
        buf = io.BytesIO()
        badinput.write_tiled_tiff(buf, compression=compression, salt=12)
        bases.append(buf.getvalue())
    return bases


def check_mutated_tiff(directory: Path) -> None:
    """A valid tiled TIFF with a few header bytes changed, and perhaps cut short, either
    opens and reads at every level, or raises a SlideError: never a reader's own exception."""
    bases = _mutation_bases()
    counter = itertools.count()
    header_len = 400  # IFD and tag values come first in tifffile's layout

    @settings(FUZZ, max_examples=100)  # one in ~15 header edits reaches a reader's own error
    @given(
        which=st.sampled_from(range(len(bases))),
        edits=st.lists(
            st.tuples(st.integers(0, header_len), st.integers(0, 255)), min_size=1, max_size=6
        ),
        cut=st.one_of(st.none(), st.floats(0.05, 1.0)),
    )
    def prop(which: int, edits: list[tuple[int, int]], cut: float | None) -> None:
        data = bytearray(bases[which])
        for pos, value in edits:
            data[pos] = value
        if cut is not None:
            data = data[: max(8, int(len(data) * cut))]
        path = directory / f"mutated-{next(counter)}.svs"
        path.write_bytes(bytes(data))
        try:
            with wsi.open_slide(path, mpp=0.5) as slide:
                for level, dims in enumerate(slide.level_dimensions):
                    region = slide.read_region((0, 0), level, dims)
                    assert region.shape == (dims[1], dims[0], 3) and region.dtype == np.uint8
        except wsi.SlideError as exc:
            assert str(path) in str(exc) and "Fix:" in str(exc), str(exc)
        finally:
            path.unlink()

    prop()


def check_crasher(name: str, directory: Path) -> None:
    """Open and read one of ``badinput.CRASHERS``; it must be refused as its record says."""
    record = getattr(badinput, name)(directory)
    try:
        with wsi.open_slide(record.path) as slide:
            for level, dims in enumerate(slide.level_dimensions):
                slide.read_region((0, 0), level, dims)
    except wsi.SlideError as exc:
        assert type(exc) is record.error, repr(exc)
        assert record.match in str(exc) and str(record.path) in str(exc) and "Fix:" in str(exc)
        return
    raise AssertionError(f"{record.why}: {record.path.name} was read without an error")


PROPERTIES: dict[str, Callable[[Path], None]] = {
    "random_bytes": check_random_bytes,
    "mutated_tiff": check_mutated_tiff,
    **{f.__name__: partial(check_crasher, f.__name__) for f in badinput.CRASHERS},
}


def run_property(name: str, directory: str) -> None:
    """Entry point of the child process: run one check, writing inputs into ``directory``."""
    PROPERTIES[name](Path(directory))


def _summary(stderr: str) -> str:
    """The exception lines and falsifying examples of a Hypothesis report, then its tail."""
    lines = stderr.strip().splitlines()
    keep = []
    for i, line in enumerate(lines):
        text = line.lstrip(" |+-")
        if text.startswith(("Failing test case", "Falsifying example")):
            keep += [*lines[i : i + 6], ""]
        elif ":" in text and text.split(":")[0].split(".")[-1].endswith(
            ("Error", "Exception", "Group")
        ):
            keep.append(line)
    tail = lines[-25:]
    return "\n".join([*keep, "--- last lines ---", *tail])


def _run_in_child(name: str, directory: Path) -> None:
    inputs = directory / "inputs"
    inputs.mkdir()
    code = (
        f"from tests.wsi.test_inspect import run_property; run_property({name!r}, {str(inputs)!r})"
    )
    # Hypothesis keeps a cache beside the working directory unless told otherwise.
    env = {**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(directory / "hypothesis")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode < 0:
        left = sorted(inputs.iterdir(), key=lambda p: p.stat().st_mtime)
        where = (
            f"The input is kept at {left[-1]}."
            if left
            else "Every input had been closed and removed: an earlier one corrupted memory"
            " and the interpreter died later (often at exit)."
        )
        pytest.fail(
            f"the interpreter was killed by {signal.Signals(-proc.returncode).name} while running"
            f" {name}: a native reader crashed on an input the pre-flight let through."
            f" {where}\n{_summary(proc.stderr)}"
        )
    if proc.returncode != 0:
        pytest.fail(f"{name} does not hold:\n{_summary(proc.stderr)}")


def test_random_bytes_never_crash_and_raise_slide_error(tmp_path: Path) -> None:
    _run_in_child("random_bytes", tmp_path)


def test_mutated_tiff_raises_only_slide_errors(tmp_path: Path) -> None:
    _run_in_child("mutated_tiff", tmp_path)


@pytest.mark.parametrize("make", badinput.CRASHERS, ids=lambda f: f.__name__.removeprefix("make_"))
def test_input_that_crashed_a_reader_is_refused(
    make: Callable[[Path], badinput.BadInput], tmp_path: Path
) -> None:
    _run_in_child(make.__name__, tmp_path)


# -- fluorescence / multichannel images are not brightfield slides ------------------------------

MULTICHANNEL = {
    "qptiff-uint16": (partial(multichannel.write_qptiff), "x.qptiff", 4),
    "qptiff-uint8": (partial(multichannel.write_qptiff, dtype=np.uint8), "y.qptiff", 4),
    "ome-channels": (partial(multichannel.write_ome_channels), "z.ome.tif", 3),
    "plain-pages": (partial(multichannel.write_plain_pages), "pages.tif", 5),
    "multisample": (partial(multichannel.write_multisample), "samples.tif", 6),
}


@pytest.mark.parametrize("name", list(MULTICHANNEL))
def test_fluorescence_image_is_refused_naming_the_file_and_its_channels(
    name: str, tmp_path: Path
) -> None:
    write, filename, n = MULTICHANNEL[name]
    path = tmp_path / filename
    planted = write(path)
    for step in (inspect_file, wsi.open_slide):  # the pre-flight already refuses it
        with pytest.raises(wsi.UnsupportedSlideError) as err:
            step(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ")
        assert "fluorescence" in message and "brightfield RGB" in message
        assert "H&E or IHC" in err.value.fix
        if planted:  # names as the file records them, in order
            assert f"{n} channels: {', '.join(planted)};" in message
        else:
            assert f"{n} unnamed channels" in message
    if name.startswith("qptiff"):
        assert "QPTIFF" in message and "DAPI" in message and "CD8 (Opal 520)" in message


def test_brightfield_qptiff_and_single_grey_plane_still_open(tmp_path: Path) -> None:
    bright = tmp_path / "bright.qptiff"
    multichannel.write_qptiff(bright, rgb=True)
    with wsi.open_slide(bright) as slide:
        assert wsi.detect_tissue(slide).mask.any()  # H&E texture everywhere
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(
        grey,
        multichannel.fluorescence_planes(1, dtype=np.uint8)[0],
        photometric="minisblack",
        resolution=(20_000, 20_000),
        resolutionunit="CENTIMETER",
    )
    with wsi.open_slide(grey) as slide:
        assert slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)
