"""cuCIM reads: never another file's or another level's tile, and regions tile for tile equal to
the file's pages as tifffile decodes them (the cache composes regions from decoded file tiles)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from oncotrace import wsi
from oncotrace.wsi._backends import cucim_available  # private: open_slide's own cuCIM probe
from oncotrace.wsi._tilecache import TILES  # private: whether regions came from the cache

pytestmark = pytest.mark.skipif(not cucim_available(), reason="cuCIM is not installed")


def _colour(i: int) -> np.ndarray:
    return np.array([40 + i % 200, 40 + (i * 7) % 200, 40 + (i * 13) % 200], np.uint8)


def test_four_hundred_slides_each_read_back_as_their_own_pixels(tmp_path: Path) -> None:
    """cuCIM's own cache (compared keys by tile index only) returned 6 regions of another file in
    these 3,200 reads; a phantom slide's one-tile overview came back blank now and then."""
    n = 400
    for i in range(n):
        tifffile.imwrite(
            tmp_path / f"s{i}.tif",
            np.broadcast_to(_colour(i), (512, 512, 3)).copy(),
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            resolution=(20000, 20000),
            resolutionunit="CENTIMETER",
        )
    wrong = []
    for _ in range(2):
        for i in range(n):
            with wsi.open_slide(tmp_path / f"s{i}.tif", backend="cucim") as s:
                for x in (10, 266):
                    for y in (10, 266):
                        got = s.read_region((x, y), 0, (32, 32)).astype(int)
                        if np.abs(got - _colour(i)).max() > 8:
                            wrong.append((i, x, y))
    assert wrong == []


def _truth(page: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The level's pixels at level coordinates (x, y), white past its edges."""
    out = np.full((h, w, 3), 255, np.uint8)
    ph, pw = page.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(pw, x + w), min(ph, y + h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = page[y0:y1, x0:x1, :3]
    return out


def test_regions_equal_the_pages_on_a_pyramid_with_uneven_downsamples(shared_data: Path) -> None:
    """BRACS crop: uncompressed 256-px tiles, levels at 2.0013x and 4.0143x (not integers), so
    the level-0 origin of every file tile is found by rounding. Regions inside, across tile
    seams and past every edge equal tifffile's decoded pages exactly."""
    path = shared_data / "slides/bracs-1640-n-3-cropped.tiff"
    with tifffile.TiffFile(path) as tf:
        pages = [p.asarray() for p in tf.pages]
    rng = np.random.default_rng(3)
    with wsi.open_slide(path, backend="cucim", mpp=0.25) as s:  # its tags are bogus
        assert s.level_count == 3
        for level, page in enumerate(pages):
            cached = len(TILES)
            ds = s.level_downsamples[level]
            ph, pw = page.shape[:2]
            spots = [(0, 0), (-40, -40), (pw - 10, ph - 10), (250, 250), (pw + 5, 0)]
            spots += [(int(a), int(b)) for a, b in rng.integers(-30, max(pw, ph), (40, 2))]
            for lx, ly in spots:
                for w, h in ((64, 64), (300, 17), (1, 1)):
                    # a level-0 location mapping onto (lx, ly) as the Slide API does: floor(X / ds)
                    loc = (math.ceil(lx * ds), math.ceil(ly * ds))
                    x, y = math.floor(loc[0] / ds), math.floor(loc[1] / ds)
                    got = s.read_region(loc, level, (w, h))
                    np.testing.assert_array_equal(got, _truth(page, x, y, w, h), f"{level} {x} {y}")
            assert len(TILES) > cached  # the regions were composed from cached file tiles


def test_jpeg_regions_equal_cucims_own_uncached_reads(tmp_path: Path) -> None:
    """On a JPEG pyramid the truth is cuCIM decoding the same region itself in one call (its
    cache is off in this process); a read spanning more than MAX_CACHED_SPAN tiles is that
    call."""
    from cucim import CuImage
    from oncotrace.wsi.synthetic import write_pyramid_tiff

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1100, 1500, 3), dtype=np.uint8)
    path = tmp_path / "noise.tif"
    write_pyramid_tiff(path, img, mpp=0.5, levels=3, factor=3, compression="jpeg")
    raw = CuImage(str(path))
    with wsi.open_slide(path, backend="cucim") as s:
        for level in range(s.level_count):
            cached = len(TILES)
            ds = s.level_downsamples[level]
            w_l, h_l = s.level_dimensions[level]
            for _ in range(30):
                w = int(rng.integers(1, min(400, w_l) + 1))  # inside the level: past its
                h = int(rng.integers(1, min(400, h_l) + 1))  # edge cuCIM itself gives black
                lx = int(rng.integers(0, max(1, w_l - w)))
                ly = int(rng.integers(0, max(1, h_l - h)))
                loc = (math.ceil(lx * ds), math.ceil(ly * ds))
                want = np.asarray(raw.read_region(location=loc, size=(w, h), level=level))
                np.testing.assert_array_equal(s.read_region(loc, level, (w, h)), want[..., :3])
            assert len(TILES) > cached


def test_a_slide_rewritten_in_place_reads_its_new_pixels(tmp_path: Path) -> None:
    """Same inode, same mtime nanoseconds: what made cuCIM's own cache serve the old file. The
    tiles kept now belong to one opened slide and go when it closes."""
    from oncotrace.wsi.synthetic import write_pyramid_tiff

    path, other = tmp_path / "a.tif", tmp_path / "b.tif"
    for value, target in ((50, path), (200, other)):
        write_pyramid_tiff(
            target, np.full((1024, 1024, 3), value, np.uint8), mpp=0.5, levels=2, factor=4,
            compression="jpeg",
        )  # fmt: skip
    os.utime(path, ns=(10**18 + 123, 10**18 + 123))
    with wsi.open_slide(path) as s:
        assert s.backend == "cucim"
        assert s.read_region((0, 0), 0, (64, 64)).mean() == pytest.approx(50, abs=2)
    inode = os.stat(path).st_ino
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(other.read_bytes())
    os.utime(path, ns=(2 * 10**18 + 123, 2 * 10**18 + 123))
    assert os.stat(path).st_ino == inode
    with wsi.open_slide(path) as s:
        assert s.backend == "cucim"
        assert s.read_region((0, 0), 0, (64, 64)).mean() == pytest.approx(200, abs=2)


def test_the_tile_cache_is_bounded_least_recently_used_and_per_slide() -> None:
    from oncotrace.wsi._tilecache import TileCache

    tile = np.zeros((10, 10, 3), np.uint8)  # 300 bytes
    cache = TileCache(1000)
    decoded: list[tuple[int, int, int, int]] = []

    def get(key: tuple[int, int, int, int]) -> np.ndarray:
        return cache.get(key, lambda: decoded.append(key) or tile.copy())

    for k in range(3):
        get((1, 0, k, 0))
    get((1, 0, 0, 0))  # a hit: (1, 0, 1, 0) is now the least recently used
    get((2, 0, 0, 0))  # a fourth tile: 1,200 bytes > 1,000, one goes
    assert len(cache) == 3 and cache.nbytes == 900
    get((1, 0, 1, 0))  # decoded again: it was the one evicted
    assert decoded == [(1, 0, 0, 0), (1, 0, 1, 0), (1, 0, 2, 0), (2, 0, 0, 0), (1, 0, 1, 0)]
    cache.drop(1)  # slide 1 closed: only slide 2's tile stays
    assert len(cache) == 1 and cache.nbytes == 300
    get((2, 0, 0, 0))
    assert len(decoded) == 5  # still a hit
    with pytest.raises(ValueError):
        get((2, 0, 0, 0))[0, 0, 0] = 1  # tiles handed out are read-only


def test_a_users_cucim_config_keeps_its_settings_with_the_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncotrace.wsi._backends import _configure_cucim  # private: runs before the first open

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"cache": {"type": "per_process", "memory_capacity": 64}, "x": 1}))
    monkeypatch.setenv("CUCIM_CONFIG_PATH", str(mine))
    _configure_cucim()
    used = Path(os.environ["CUCIM_CONFIG_PATH"])
    assert used != mine
    assert json.loads(used.read_text()) == {
        "cache": {"type": "nocache", "memory_capacity": 64},
        "x": 1,
    }
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"cache": {"type": "nocache"}}))
    monkeypatch.setenv("CUCIM_CONFIG_PATH", str(off))
    _configure_cucim()
    assert os.environ["CUCIM_CONFIG_PATH"] == str(off)  # nothing to change: left alone


@pytest.mark.parametrize(
    ("location", "size"),
    [((-100, -100), (3000, 3000)), ((0, 0), (4096, 4096)), ((2100, 2900), (512, 512)),
     ((-300, 500), (400, 200))],
)  # fmt: skip
def test_regions_past_the_edge_of_a_single_level_slide_are_its_pixels_on_white(
    shared_data: Path, location: tuple[int, int], size: tuple[int, int]
) -> None:
    """cuCIM refuses a size beyond the level; the read was reported as a damaged file. The part
    inside is the slide's (as OpenSlide reads it), the rest white."""
    path = shared_data / "slides" / "cmu-1-small-region.svs"  # one level, 2220 x 2967
    with wsi.open_slide(path, backend="cucim") as c, wsi.open_slide(path, backend="openslide") as o:
        got = c.read_region(location, 0, size)
        want = o.read_region(location, 0, size)
        w0, h0 = c.dimensions
    assert got.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(got, want)
    x, y = location
    outside = np.ones(got.shape[:2], bool)
    outside[max(0, -y) : max(0, h0 - y), max(0, -x) : max(0, w0 - x)] = False
    assert outside.any() and (got[outside] == 255).all()
    assert (got[~outside] < 250).any()  # real tissue pixels, not a white canvas
