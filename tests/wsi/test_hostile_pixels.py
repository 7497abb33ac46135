"""Hostile pixels (issue 12): damage that readers may turn into plausible-looking garbage.

A JPEG tile that cannot be decoded must be an error in every reader, wherever it lies in the
file; a pyramid whose levels are out of order must be refused at open, not tiled at the wrong
scale. The bad files are generated here from valid ones, never shipped.
"""

from __future__ import annotations

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
