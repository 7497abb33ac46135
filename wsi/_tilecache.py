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
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

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

    def get(self, key: tuple[int, int, int, int], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The tile under ``key``, decoded by ``decode()`` on a miss (outside the lock: two
        threads missing the same tile at once both decode it, and one copy is kept)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        tile = decode()
        tile.setflags(write=False)
        if tile.nbytes > self.capacity:
            return tile
        with self._lock:
            if key not in self._items:
                self._items[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > self.capacity:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return tile

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
