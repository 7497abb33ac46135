"""Hostile pixels (issue 12): damage that readers may turn into plausible-looking garbage.

A JPEG tile that cannot be decoded must be an error in every reader, wherever it lies in the
file; a pyramid whose levels are out of order must be refused at open, not tiled at the wrong
scale. The bad files are generated here from valid ones, never shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from oncotrace import wsi
from oncotrace.wsi import inspect_file
from oncotrace.wsi._backends import cucim_available  # private: open_slide's own cuCIM probe
from oncotrace.wsi._inspect import JPEG_SAMPLE_TILES  # private: the size of the SOF sample

from tests.wsi import badinput

SIDE, TILE = 1024, 128  # 8 × 8 = 64 JPEG tiles, four times the sampled ones
N_TILES = (SIDE // TILE) ** 2
#: A tile the spread sample of the SOF check skips (it takes every 4th tile from 0).
UNSAMPLED_TILE = 5


def _backends() -> list[str]:
    names = ["openslide", "tifffile"]
    return ["cucim", *names] if cucim_available() else names


def _garble_tile(path: Path, tile: int, *, keep_markers: bool) -> tuple[int, int]:
    """Overwrite JPEG tile ``tile`` of page 0 with seeded noise; return its level-0 (x, y).

    ``keep_markers`` keeps the SOI, the headers (first 600 bytes) and the EOI, so only the
    entropy-coded data is noise.
    """
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
        per_row = -(-page.imagewidth // page.tilewidth)
    start, stop = (offset + 600, offset + count - 2) if keep_markers else (offset, offset + count)
    data = bytearray(path.read_bytes())
    noise = np.random.default_rng([badinput.SEED, tile]).integers(0, 256, stop - start, np.uint8)
    data[start:stop] = noise.tobytes()
    path.write_bytes(bytes(data))
    return (tile % per_row) * TILE, (tile // per_row) * TILE


def make_garbage_jpeg_tile_beyond_sample(directory: Path) -> tuple[Path, tuple[int, int]]:
    """64 JPEG tiles; tile 5 (not among the 16 sampled) is random bytes, markers and all."""
    path = directory / "garbage-jpeg-tile-5-of-64.tif"
    badinput.write_tiled_tiff(path, compression="jpeg", salt=21, side=SIDE)
    return path, _garble_tile(path, UNSAMPLED_TILE, keep_markers=False)


def test_the_damaged_tile_is_outside_the_sample(tmp_path: Path) -> None:
    path, _ = make_garbage_jpeg_tile_beyond_sample(tmp_path)
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages.first.dataoffsets) == N_TILES
    assert UNSAMPLED_TILE % (N_TILES // JPEG_SAMPLE_TILES) != 0


def test_preflight_keeps_cucim_from_a_garbage_tile_anywhere(tmp_path: Path) -> None:
    path, _ = make_garbage_jpeg_tile_beyond_sample(tmp_path)
    assert not inspect_file(path).cucim_safe


def test_preflight_still_lets_cucim_read_clean_jpeg_tiles(
    tmp_path: Path, shared_data: Path
) -> None:
    """The check must not refuse sound files: a generated many-tile one and the real SVS."""
    clean = tmp_path / "clean.tif"
    badinput.write_tiled_tiff(clean, compression="jpeg", salt=21, side=SIDE)
    assert inspect_file(clean).cucim_safe
    svs = shared_data / "slides" / "cmu-1-small-region.svs"
    if svs.is_file():
        assert inspect_file(svs).cucim_safe


def test_a_garbage_tile_beyond_the_sample_is_an_error_when_read(tmp_path: Path) -> None:
    path, (x, y) = make_garbage_jpeg_tile_beyond_sample(tmp_path)
    with wsi.open_slide(path) as slide, pytest.raises(wsi.CorruptSlideError) as info:
        slide.read_region((x, y), 0, (TILE, TILE))
    assert str(path) in str(info.value)
    assert "export it again" in str(info.value)


@pytest.mark.parametrize("backend", _backends())
def test_every_reader_refuses_a_garbage_tile(backend: str, tmp_path: Path) -> None:
    """Forced onto the file, each reader refuses it at open or when the tile is read."""
    path, (x, y) = make_garbage_jpeg_tile_beyond_sample(tmp_path)
    clean_neighbour = (x + TILE, y)
    try:
        slide = wsi.open_slide(path, backend=backend)  # type: ignore[arg-type]
    except wsi.SlideError as exc:
        assert str(path) in str(exc) and "Fix:" in str(exc)
        return
    with slide:
        assert slide.read_region(clean_neighbour, 0, (TILE, TILE)).shape == (TILE, TILE, 3)
        with pytest.raises(wsi.CorruptSlideError) as info:
            slide.read_region((x, y), 0, (TILE, TILE))
    assert str(path) in str(info.value)


# -- a pyramid out of order ----------------------------------------------------------------------

APERIO = "Aperio Image Library v12.0.15\r\n{0}x{0} [0,0 {0}x{0}] (256x256) JPEG/RGB Q=70"


def make_pyramid_out_of_order_svs(directory: Path) -> Path:
    """An Aperio SVS (MPP 0.499 on page 0, 512² px) whose second page is 1024² px."""
    path = directory / "pyramid-out-of-order.svs"
    big = badinput.tissue_like_rgb(1024, 1024, salt=30)
    with tifffile.TiffWriter(path) as tw:
        for image, desc in (
            (big[::2, ::2].copy(), APERIO.format(512) + "|AppMag = 20|MPP = 0.499"),
            (big, APERIO.format(1024)),
        ):
            tw.write(image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     description=desc, metadata=None)  # fmt: skip
    return path


def make_pyramid_out_of_order_tiff(directory: Path) -> Path:
    """A generic tiled TIFF at 0.5 µm/px, 512² px, whose reduced-resolution page is 1024² px."""
    path = directory / "pyramid-out-of-order.tif"
    big = badinput.tissue_like_rgb(1024, 1024, salt=31)
    with tifffile.TiffWriter(path) as tw:
        for image, subfiletype in ((big[::2, ::2].copy(), 0), (big, 1)):
            tw.write(image, subfiletype=subfiletype, tile=(256, 256), photometric="rgb",
                     compression="jpeg", resolution=(20_000, 20_000),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    return path


def _assert_pyramid_refusal(exc: BaseException, path: Path) -> None:
    assert type(exc) is wsi.CorruptSlideError
    message = str(exc)
    assert str(path) in message
    assert "out of order" in message and "1024×1024" in message
    assert "re-export the slide with a proper pyramid" in message


@pytest.mark.parametrize("make", [make_pyramid_out_of_order_svs, make_pyramid_out_of_order_tiff])
def test_preflight_refuses_a_level_larger_than_level_0(
    make: Callable[[Path], Path], tmp_path: Path
) -> None:
    path = make(tmp_path)
    with tifffile.TiffFile(path) as tf:  # the file is what it claims: page 1 twice page 0
        assert [p.shape[:2] for p in tf.pages] == [(512, 512), (1024, 1024)]
    with pytest.raises(wsi.CorruptSlideError) as info:
        inspect_file(path)
    _assert_pyramid_refusal(info.value, path)


@pytest.mark.parametrize("make", [make_pyramid_out_of_order_svs, make_pyramid_out_of_order_tiff])
@pytest.mark.parametrize("backend", ["auto", *_backends()])
def test_no_reader_opens_a_pyramid_out_of_order(
    make: Callable[[Path], Path], backend: str, tmp_path: Path
) -> None:
    """Before the fix cuCIM gave the 1024² page as level 0 at the file's 0.499 µm/px."""
    path = make(tmp_path)
    with pytest.raises(wsi.SlideError) as info:
        wsi.open_slide(path, backend=backend)  # type: ignore[arg-type]
    _assert_pyramid_refusal(info.value, path)


@pytest.mark.skipif(not cucim_available(), reason="cuCIM not installed")
def test_the_cucim_reader_itself_refuses_a_page_larger_than_the_first(tmp_path: Path) -> None:
    """Opened without the pre-flight, cuCIM's size-sorted levels are compared with page 0."""
    from oncotrace.wsi._backends import CucimBackend  # private: the reader under test

    path = make_pyramid_out_of_order_svs(tmp_path)
    with pytest.raises(wsi.CorruptSlideError) as info:
        CucimBackend(path)
    _assert_pyramid_refusal(info.value, path)


@pytest.mark.parametrize(
    ("dims", "downsamples", "match"),
    [
        ([(1000, 800), (1000, 400)], None, "out of order"),  # width does not shrink
        ([(1000, 800), (500, 400), (500, 400)], None, "out of order"),  # a level repeated
        ([(1000, 800), (500, 200)], None, "×2 in x but ×4 in y"),  # stretched
        ([(1000, 800), (500, 400)], [1.0, 4.0], "downsample of 4"),  # reader's factor is wrong
    ],
)
def test_check_pyramid_refuses_inconsistent_levels(
    dims: list[tuple[int, int]], downsamples: list[float] | None, match: str
) -> None:
    from oncotrace.wsi._inspect import check_pyramid  # private: the shared level check

    with pytest.raises(wsi.CorruptSlideError, match=match):
        check_pyramid(Path("slide.svs"), dims, downsamples)


def test_check_pyramid_accepts_rounded_levels() -> None:
    """Real pyramids round odd sides (tcga-cr-7395: 4443×3567 → 2221×1783; 75×62 → 37×31)."""
    from oncotrace.wsi._inspect import check_pyramid  # private: the shared level check

    check_pyramid(Path("a.svs"), [(4443, 3567), (2221, 1783)], [1.0, 2.0005])
    check_pyramid(Path("b.tif"), [(300, 250), (150, 125), (75, 62), (37, 31)])


# -- a JPEG tile whose markers are sound but whose scan is cut short -------------------------------


def _tile_bytes(path: Path, index: int) -> tuple[bytes, bytes | None]:
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        tf.filehandle.seek(page.dataoffsets[index])
        return tf.filehandle.read(page.databytecounts[index]), page.jpegtables


def test_a_scan_cut_short_passes_the_preflight_and_decodes_silently_without_strictness(
    tmp_path: Path,
) -> None:
    """The damage the readers must catch: markers intact (the pre-flight lets cuCIM read it),
    imagecodecs decodes it without a word, OpenSlide refuses the very same region."""
    import imagecodecs
    import openslide

    record, tile = badinput.make_jpeg_tile_scan_cut_short(tmp_path)
    assert inspect_file(record.path).cucim_safe
    data, tables = _tile_bytes(record.path, tile)
    assert imagecodecs.jpeg8_decode(data, tables=tables).shape == (TILE, TILE, 3)
    x, y = tile % (SIDE // TILE) * TILE, tile // (SIDE // TILE) * TILE
    with openslide.OpenSlide(str(record.path)) as osr:
        osr.read_region((x + TILE, y), 0, (TILE, TILE))  # the clean neighbour reads
        with pytest.raises(openslide.OpenSlideError, match="premature end of data segment"):
            osr.read_region((x, y), 0, (TILE, TILE))


@pytest.mark.parametrize("backend", ["auto", *_backends()])
def test_every_reader_refuses_a_scan_cut_short(backend: str, tmp_path: Path) -> None:
    """Was: cuCIM (auto) and tifffile returned the tile's lower part as flat grey."""
    record, tile = badinput.make_jpeg_tile_scan_cut_short(tmp_path)
    col, row = tile % (SIDE // TILE), tile // (SIDE // TILE)
    x, y = col * TILE, row * TILE
    with wsi.open_slide(record.path, backend=backend) as slide:  # type: ignore[arg-type]
        neighbour = slide.read_region((x + TILE, y), 0, (TILE, TILE))
        assert neighbour.std() > 0  # real pixels, not a fill
        # a tiler-sized read straddling the damaged tile and its neighbours
        with pytest.raises(wsi.CorruptSlideError) as info:
            slide.read_region((x + TILE // 2, y + TILE // 2), 0, (224, 224))
        with pytest.raises(wsi.CorruptSlideError):
            next(slide.iter_regions(np.array([[x, y]]), 0, (TILE, TILE)))
    message = str(info.value)
    assert str(record.path) in message and "level 0" in message
    if slide.backend != "openslide":  # OpenSlide names no tile
        assert f"column {col}, row {row}" in message
    assert "rescan" in message or "export" in message
