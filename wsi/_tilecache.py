"""Decoded file tiles of open slides, kept so a region straddling them does not decode them again.

cuCIM has a per-process tile cache of its own, but it must stay off: its hash map compares
entries by the tile's index alone (``equal_to`` ignores the file-and-level half of the key), so a
lookup that lands in a bucket holding the same tile index of another file, or of another level
of the same file, returns that tile. Measured on this machine: 6 wrong regions in 3,200 reads of
400 small JPEG-tiled TIFFs, and a phantom slide's whole overview (one level-2 tile, index 0)
served as a white corner tile of another slide, reported as "no tissue" now and then in the test
suite. The reader is therefore configured with ``nocache`` and this module does the caching,
keyed by a token no other open slide ever shares, the level and the tile's column and row.

Tiles of 224 px straddle up to four 256-px file tiles; without a cache each file tile is decoded
~2.3 times on the tiler's row-major order (the figure that made cuCIM's cache worth having).

:class:`TiffSegments` reads the file tiles (or strips) of one TIFF image from their bytes and
decodes them one at a time with tifffile, so a reader that caches them here decodes each once: a
region read through tifffile's zarr view decodes every chunk it touches on every read (a 224-px
read of an 8192² one-tile file decoded the whole tile, 192 MiB, each time).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from ._errors import CorruptSlideError, reader_failure

#: Decoded tiles kept in one process across every open slide (an LRU; 256 MiB holds ~1,300
#: 256-px RGB tiles: several rows of tiles of even a 100,000-px-wide slide).
TILE_CACHE_MIB = 256

_tokens = itertools.count()


class TileCache:
    """A process-wide LRU of decoded tiles, bounded in bytes; thread-safe.

    Keys are ``(owner, level, column, row)`` with ``owner`` from :func:`new_owner`, unique for
    the life of the process, so a closed slide's entries can never be served for another file.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = int(capacity_bytes)
        self._items: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # one lock per tile being decoded: a thread missing a tile another thread is decoding
        # waits for it (an 8192² tile decoded twice at once would double the peak memory)
        self._decoding: dict[tuple[int, int, int, int], threading.Lock] = {}

    def get(self, key: tuple[int, int, int, int], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The tile under ``key``, decoded by ``decode()`` on a miss, once however many threads
        miss it at the same time (outside the cache's lock: other tiles are served meanwhile)."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            busy = self._decoding.setdefault(key, threading.Lock())
        with busy:
            with self._lock:
                hit = self._hit(key)
            if hit is not None:
                return hit
            try:
                tile = decode()
                tile.setflags(write=False)
            except BaseException:
                with self._lock:
                    self._decoding.pop(key, None)
                raise
            with self._lock:
                if tile.nbytes <= self.capacity:
                    self._items[key] = tile
                    self._bytes += tile.nbytes
                    while self._bytes > self.capacity:
                        _, old = self._items.popitem(last=False)
                        self._bytes -= old.nbytes
                self._decoding.pop(key, None)
        return tile

    def _hit(self, key: tuple[int, int, int, int]) -> np.ndarray | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def drop(self, owner: int) -> None:
        """Forget every tile of ``owner`` (its slide was closed)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == owner]:
                self._bytes -= self._items.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


TILES = TileCache(TILE_CACHE_MIB << 20)


def new_owner() -> int:
    """A token for one opened slide's tiles, never handed out twice in this process."""
    return next(_tokens)


#: Largest decoded tile or strip a slide may have: what the cache can hold (an 8192² RGBA tile).
#: Scanners write 240–1024 px tiles (≤ 4 MiB decoded); a larger one is decoded once and cached,
#: and past this bound every read would decode all of it again, so the file is refused.
MAX_SEGMENT_BYTES = TILE_CACHE_MIB << 20

#: What to do about a tile that no reader can decode.
DAMAGED_TILE_FIX = (
    "the pixel data in the file itself is damaged, so no reader (backend) can recover it: if this"
    " is a copy, copy the slide again from the scanner's original; otherwise re-export it from"
    " the scanner software, or rescan the glass slide."
)


def segment_nbytes(page: tifffile.TiffPage) -> int:
    """Bytes of one decoded tile (or strip) of ``page``."""
    if page.is_tiled:
        w, h, d = page.tilewidth, page.tilelength, max(1, int(page.tiledepth or 1))
    else:
        w, h, d = page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength), 1
    samples = 1 if int(page.planarconfig) == 2 else int(page.samplesperpixel)
    return int(w) * int(h) * d * samples * np.dtype(page.dtype or np.uint8).itemsize


def _keyframe(page: tifffile.TiffPage | tifffile.TiffFrame) -> tifffile.TiffPage:
    """The page holding ``page``'s tags (itself, for a TiffPage)."""
    key = page.keyframe
    if key is None:  # pragma: no cover - tifffile always sets it on pages of a series
        raise ValueError("a TIFF frame without its key page")
    return key


class TiffSegments:
    """The tiles (or strips) of one TIFF image, read from the file and decoded one at a time.

    Parameters
    ----------
    path : the file, for messages.
    page : the image (a TiffPage or TiffFrame of one pyramid level / focal plane).
    level : the reader's level number, for messages.
    to_rgb : turns a decoded (h, w, samples) segment into (h, w, 3) uint8.

    Only contiguous (chunky) 2-D images are handled; :meth:`supports` says which.
    """

    def __init__(
        self,
        path: Path,
        page: tifffile.TiffPage | tifffile.TiffFrame,
        level: int,
        to_rgb: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        key = _keyframe(page)
        self.path, self.level, self._to_rgb = path, level, to_rgb
        self.width, self.height = int(key.imagewidth), int(key.imagelength)
        if key.is_tiled:
            self.tile = (int(key.tilewidth), int(key.tilelength))
        else:
            self.tile = (self.width, min(int(key.rowsperstrip or self.height), self.height))
        self.columns = -(-self.width // self.tile[0])
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._key = key
        self._decode = key.decode
        self._tables = key.jpegtables
        self.nbytes = segment_nbytes(key)

    @staticmethod
    def supports(page: tifffile.TiffPage | tifffile.TiffFrame) -> bool:
        """Whether ``page`` is a 2-D image with all samples of a pixel together (chunky)."""
        key = _keyframe(page)
        return (
            (int(key.planarconfig) == 1 or int(key.samplesperpixel) == 1)
            and int(key.imagedepth or 1) == 1
            and int(key.tiledepth or 1) == 1
        )

    def decode(self, fd: int, col: int, row: int) -> np.ndarray:
        """Tile (col, row) as (h, w, 3) uint8, clipped to the image, read through the open file
        descriptor ``fd`` (``os.pread``: safe from many threads); CorruptSlideError if its data
        cannot be decoded."""
        index = row * self.columns + col
        w = min(self.tile[0], self.width - col * self.tile[0])
        h = min(self.tile[1], self.height - row * self.tile[1])
        count = int(self._counts[index]) if index < len(self._counts) else 0
        if count == 0:  # a sparse tile: readers show background
            return np.full((h, w, 3), 255, np.uint8)
        data = os.pread(fd, count, int(self._offsets[index]))
        try:
            if len(data) < count:
                raise ValueError(
                    f"{count - len(data)} of its {count} bytes lie past the file's end"
                )
            seg, _, _ = self._decode(data, index, jpegtables=self._tables)
            arr = np.asarray(seg)[0]
            if arr.shape[0] < h or arr.shape[1] < w:
                raise ValueError(f"it decodes to {arr.shape[1]}×{arr.shape[0]} px, not {w}×{h}")
        except Exception as exc:
            where = "tile" if self._key.is_tiled else "strip"
            raise CorruptSlideError(
                self.path,
                f"{where} {index} (column {col}, row {row}) of level {self.level} cannot be"
                f" decoded ({reader_failure(exc)}).",
                DAMAGED_TILE_FIX,
            ) from exc
        return self._to_rgb(arr[:h, :w])


def segment_too_large(kind: str, tile: tuple[int, int], nbytes: int) -> tuple[str, str]:
    """(problem, fix) for an image whose one ``kind`` ("tile", "strip") decodes to ``nbytes``."""
    return (
        f"one {kind} of it ({tile[0]}×{tile[1]} px)"
        f" decodes to {nbytes / (1 << 20):.0f} MiB, more than the {MAX_SEGMENT_BYTES >> 20} MiB"
        " a reader holds per tile: every region read would decode all of it.",
        "convert it to a tiled pyramidal TIFF with small tiles, e.g. `vips tiffsave in.tif"
        " out.tif --tile --tile-width 512 --tile-height 512 --pyramid --compression jpeg`,"
        " and open that.",
    )


def read_tiled(
    x: int,
    y: int,
    size: tuple[int, int],
    level_size: tuple[int, int],
    tile: tuple[int, int],
    get: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """Compose the (h, w, 3) region at level coordinates (x, y) from tiles ``get(col, row)``;
    white past the level's edges."""
    w, h = size
    w_l, h_l = level_size
    tw, th = tile
    out = np.empty((h, w, 3), np.uint8)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w_l, x + w), min(h_l, y + h)
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        out[...] = 255
    if x1 <= x0 or y1 <= y0:
        return out
    for r in range(y0 // th, (y1 - 1) // th + 1):
        for c in range(x0 // tw, (x1 - 1) // tw + 1):
            t = get(c, r)
            tx, ty = c * tw, r * th
            ix0, iy0 = max(x0, tx), max(y0, ty)
            ix1, iy1 = min(x1, tx + t.shape[1]), min(y1, ty + t.shape[0])
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = t[iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx]
    return out
