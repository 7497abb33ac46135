"""Deep Zoom tiles rendered on demand through the project's Slide API, with bounded caches.

Deep Zoom numbering (what OpenSeadragon's DZI tile source asks for): level ``L`` of
``max_level + 1`` levels shows the slide downsampled by ``2 ** (max_level - L)``, with size
``ceil(W / 2 ** (max_level - L))``; ``max_level = ceil(log2(max(W, H)))`` so level 0 is 1 x 1.
Tile ``(col, row)`` of a level covers level pixels ``[col * 254 - 1, (col + 1) * 254 + 1)``
(the leading overlap only when ``col > 0``), clipped to the level size, so edge tiles are smaller.

A tile is the level-0 region under it read from the finest pyramid level that is not finer
than needed (:meth:`wsi.Slide.best_level_for_downsample`) and shrunk with Pillow's box filter
(an area average) — never from label or macro images, which the Slide API does not expose.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from oncotrace.wsi import Slide, open_slide
from PIL import Image

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 85
#: Default tile-cache budget in MiB (``--cache-mib``; 0 turns the cache off).
DEFAULT_CACHE_MIB = 256
#: Open slide handles kept (least recently used closed first).
DEFAULT_MAX_OPEN_SLIDES = 8


class TileNotFoundError(LookupError):
    """A tile or level outside the pyramid (the server answers 404)."""


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileRegion:
    """Where one Deep Zoom tile comes from.

    Attributes
    ----------
    size : (w, h) of the tile in pixels (smaller at the right and bottom edges).
    downsample : level-0 pixels per tile pixel, ``2 ** (max_level - level)``.
    location : level-0 ``(x, y)`` of the tile's top-left corner.
    extent : level-0 ``(w, h)`` of the region under the tile that lies inside the slide.
    """

    size: tuple[int, int]
    downsample: int
    location: tuple[int, int]
    extent: tuple[int, int]


@dataclass(frozen=True)
class DeepZoom:
    """Deep Zoom pyramid geometry of a ``width`` x ``height`` level-0 image."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(
                f"a Deep Zoom image needs a positive size, got {self.width}x{self.height}"
            )

    @property
    def max_level(self) -> int:
        """Index of the full-resolution level."""
        return math.ceil(math.log2(max(self.width, self.height)))

    @property
    def n_levels(self) -> int:
        return self.max_level + 1

    def downsample(self, level: int) -> int:
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(w, h) of Deep Zoom ``level``; :class:`TileNotFoundError` outside ``0..max_level``."""
        if not 0 <= level <= self.max_level:
            raise TileNotFoundError(f"level {level} is outside 0..{self.max_level}")
        ds = self.downsample(level)
        return -(-self.width // ds), -(-self.height // ds)

    def tile_counts(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_size(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def tile(self, level: int, col: int, row: int) -> TileRegion:
        """The region of tile ``(col, row)`` at ``level``; :class:`TileNotFoundError` if none."""
        lw, lh = self.level_size(level)
        cols, rows = self.tile_counts(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFoundError(
                f"tile ({col}, {row}) is outside the {cols} x {rows} tiles of level {level}"
            )
        ts, ov, ds = self.tile_size, self.overlap, self.downsample(level)
        x0 = col * ts - (ov if col > 0 else 0)
        y0 = row * ts - (ov if row > 0 else 0)
        x1 = min(lw, (col + 1) * ts + ov)
        y1 = min(lh, (row + 1) * ts + ov)
        # The last level pixel of a row can reach past the slide (ceil); only read what exists.
        ex = min(self.width, x1 * ds) - x0 * ds
        ey = min(self.height, y1 * ds) - y0 * ds
        return TileRegion(
            size=(x1 - x0, y1 - y0), downsample=ds, location=(x0 * ds, y0 * ds), extent=(ex, ey)
        )

    def dzi_xml(self, fmt: str = "jpeg") -> str:
        """The ``.dzi`` descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'TileSize="{self.tile_size}" Overlap="{self.overlap}" Format="{fmt}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_tile(slide: Slide, region: TileRegion) -> NDArray[np.uint8]:
    """Read and shrink the slide region under a tile.

    Returns
    -------
    (h, w, 3) uint8 ndarray of ``region.size``; white where the tile overhangs the slide (a
    tile pixel half over the edge averages the slide with white).
    """
    out_w, out_h = region.size
    ds = region.downsample
    level = slide.best_level_for_downsample(ds)
    lds = slide.level_downsamples[level]
    # The whole tile in level pixels, so the shrink factor is exactly ds / lds; the Slide API
    # gives white past the slide's edge, whichever reader is behind it.
    full_w = max(1, round(out_w * ds / lds))
    full_h = max(1, round(out_h * ds / lds))
    pixels = slide.read_region(region.location, level, (full_w, full_h))
    if (full_w, full_h) != (out_w, out_h):
        pixels = np.asarray(
            Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BOX), np.uint8
        )
    return pixels


def encode_jpeg(pixels: NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an (h, w, 3) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


class ByteLRU:
    """A thread-safe LRU of ``bytes`` values bounded by their total size.

    Parameters
    ----------
    max_bytes : budget for the values (keys are small and not counted); 0 disables caching.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        """Store ``value``, dropping least recently used entries to stay within budget."""
        size = len(value)
        if size > self.max_bytes:  # also the disabled case; never evict everything for one
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= len(old)
            self._items[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


@dataclass(eq=False)
class _Handle:
    slide: Slide | None = None
    users: int = 0
    opening: threading.Lock = field(default_factory=threading.Lock)


class SlidePool:
    """Open slides shared between request threads, at most ``max_open`` idle ones kept.

    A slide in use is never closed; the least recently used idle ones are closed when more than
    ``max_open`` are open.
    """

    def __init__(
        self,
        max_open: int = DEFAULT_MAX_OPEN_SLIDES,
        opener: Callable[[Path], Slide] | None = None,
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._open = opener or (lambda p: open_slide(p, require_mpp=False))
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(h.slide is not None for h in self._handles.values())

    @contextmanager
    def lease(self, path: Path) -> Iterator[Slide]:
        """The open slide at ``path`` for the duration of the ``with`` block."""
        key = str(path)
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                handle = self._handles[key] = _Handle()
            self._handles.move_to_end(key)
            handle.users += 1
        try:
            with handle.opening:  # one thread opens; the others wait for it
                if handle.slide is None:
                    handle.slide = self._open(path)
            yield handle.slide
        finally:
            with self._lock:
                handle.users -= 1
                if handle.slide is None and handle.users == 0:  # failed to open: forget it
                    self._handles.pop(key, None)
                self._evict()

    def _evict(self) -> None:
        idle = [k for k, h in self._handles.items() if h.users == 0]  # oldest first
        excess = len(self._handles) - self.max_open
        for key in idle[: max(0, excess)]:
            handle = self._handles.pop(key)
            if handle.slide is not None:
                handle.slide.close()

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                if handle.slide is not None and handle.users == 0:
                    handle.slide.close()
                    handle.slide = None
            self._handles.clear()


# --------------------------------------------------------------------------------------------
# The tile service
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideInfo:
    """What the viewer may say about a slide (an allow-list; no raw properties).

    Attributes
    ----------
    width, height : level-0 size in pixels.
    mpp : level-0 (x, y) µm/px, or None when the file records none.
    pyramid_levels : levels in the file.
    """

    width: int
    height: int
    mpp: tuple[float, float] | None
    pyramid_levels: int

    @property
    def deepzoom(self) -> DeepZoom:
        return DeepZoom(self.width, self.height)


class TileService:
    """Deep Zoom tiles of slide files, through a :class:`SlidePool` and a :class:`ByteLRU`.

    Parameters
    ----------
    cache_bytes : tile-cache budget (encoded JPEG bytes); 0 disables it.
    max_open : open slide handles kept.
    quality : JPEG quality.
    """

    def __init__(
        self,
        *,
        cache_bytes: int = DEFAULT_CACHE_MIB * 2**20,
        max_open: int = DEFAULT_MAX_OPEN_SLIDES,
        quality: int = JPEG_QUALITY,
    ) -> None:
        self.cache = ByteLRU(cache_bytes)
        self.pool = SlidePool(max_open)
        self.quality = quality
        self._info: dict[tuple[str, int, int], SlideInfo] = {}
        self._info_lock = threading.Lock()

    @staticmethod
    def _version(path: Path) -> tuple[str, int, int]:
        """File identity; FileNotFoundError names the file when it is gone."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise FileNotFoundError(
                f"the slide file {path} referenced by the results is gone or unreadable "
                f"({exc.strerror}); restore it or score the slide again from its new place"
            ) from exc
        return str(path), st.st_mtime_ns, st.st_size

    def info(self, path: Path) -> SlideInfo:
        """Size, mpp and level count of the slide at ``path`` (cached per file version)."""
        version = self._version(path)
        with self._info_lock:
            known = self._info.get(version)
        if known is not None:
            return known
        with self.pool.lease(path) as slide:
            info = SlideInfo(
                width=slide.dimensions[0],
                height=slide.dimensions[1],
                mpp=None if slide.mpp is None else (slide.mpp.x, slide.mpp.y),
                pyramid_levels=slide.level_count,
            )
        with self._info_lock:
            self._info[version] = info
        return info

    def key(self, path: Path, level: int, col: int, row: int) -> Hashable:
        """Cache key of a tile: the slide file's version and the tile's address."""
        return (*self._version(path), level, col, row)

    def cached(self, key: Hashable) -> bytes | None:
        """The tile's JPEG bytes if cached (cheap: the server calls it on its event loop)."""
        return self.cache.get(key)

    def render(self, path: Path, key: Hashable, level: int, col: int, row: int) -> bytes:
        """Render, encode and cache a tile (slow: reads the slide)."""
        region = self.info(path).deepzoom.tile(level, col, row)
        with self.pool.lease(path) as slide:
            pixels = render_tile(slide, region)
        data = encode_jpeg(pixels, self.quality)
        self.cache.put(key, data)
        return data

    def tile(self, path: Path, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of Deep Zoom tile ``(col, row)`` at ``level`` of the slide at ``path``.

        Raises
        ------
        TileNotFoundError
            The level or tile is outside the pyramid.
        FileNotFoundError, wsi.SlideError
            The slide file is gone or cannot be read.
        """
        key = self.key(path, level, col, row)
        data = self.cached(key)
        return data if data is not None else self.render(path, key, level, col, row)

    def close(self) -> None:
        self.pool.close()
        self.cache.clear()
