"""Deep Zoom tiles rendered on demand through the project's Slide API, with bounded caches.

Deep Zoom numbering (what OpenSeadragon's DZI tile source asks for): level ``L`` of
``max_level + 1`` levels shows the slide downsampled by ``2 ** (max_level - L)``, with size
``ceil(W / 2 ** (max_level - L))``; ``max_level = ceil(log2(max(W, H)))`` so level 0 is 1 x 1.
Tile ``(col, row)`` of a level covers level pixels ``[col * 254 - 1, (col + 1) * 254 + 1)``
(the leading overlap only when ``col > 0``), clipped to the level size, so edge tiles are smaller.

A tile is the level-0 area under it, area-averaged (Pillow's box filter) to the tile's pixels,
white past the slide's edge (a tile pixel half over the edge averages the slide with white) —
never from label or macro images, which the Slide API does not expose. It comes from one of:

- the slide itself, read from the coarsest pyramid level that is still as fine as the tile
  (:meth:`wsi.Slide.best_level_for_downsample`), when that level is at most :data:`MAX_SHRINK`
  times finer than the tile: a tile then reads at most ~1 Mpx of slide pixels;
- otherwise (the overview levels of a single-level or shallow-pyramid slide, where that read
  would be the whole slide padded to a power of two) the *overview*: every coarser Deep Zoom
  level as an image, built once per slide version in bounded memory and kept on disk
  (:func:`write_overview`, :class:`OverviewStore`), from which a tile is a crop.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from oncotrace.wsi import Slide, atomic_dir, open_slide, remove_stale_partials
from PIL import Image

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 85
#: Slide-level pixels per tile pixel (along each axis) a tile may read from the slide; coarser
#: Deep Zoom levels come from the overview. A 255-px tile reads at most ~1,020 x 1,020 pixels.
MAX_SHRINK = 4
#: Output pixels per side of the blocks (and rows per strip) the overview is built in.
OVERVIEW_BLOCK_PX = 256
#: Version of the overview files; a change rebuilds every cached overview.
OVERVIEW_FORMAT = 1
#: Folder under a results folder that holds the viewer's overviews (``oncotrace view``).
VIEWER_CACHE_DIR = "viewer-cache"
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


def read_shrunk(
    slide: Slide, location: tuple[int, int], size: tuple[int, int], downsample: int
) -> NDArray[np.uint8]:
    """The level-0 area at ``location`` averaged in ``downsample`` x ``downsample`` blocks.

    Parameters
    ----------
    location : level-0 ``(x, y)`` (>= 0) of the first block's top-left corner.
    size : ``(w, h)`` of the output in blocks.
    downsample : level-0 pixels per output pixel.

    Returns
    -------
    (h, w, 3) uint8 ndarray; white past the slide's edge (a block half over the edge averages
    the slide with white). Reads ``size * downsample / level_downsample`` pixels of the level
    :meth:`wsi.Slide.best_level_for_downsample` picks, never past that level's edge.
    """
    out_w, out_h = size
    level = slide.best_level_for_downsample(downsample)
    lds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    # The whole area in level pixels, so the shrink factor is exactly downsample / lds ...
    full_w = max(1, round(out_w * downsample / lds))
    full_h = max(1, round(out_h * downsample / lds))
    # ... of which only the part inside the level is read (cuCIM refuses a region wider or
    # taller than the level), the rest is white.
    lx, ly = math.floor(location[0] / lds), math.floor(location[1] / lds)
    read_w, read_h = min(full_w, lw - lx), min(full_h, lh - ly)
    if read_w <= 0 or read_h <= 0:
        return np.full((out_h, out_w, 3), 255, np.uint8)
    pixels = slide.read_region(location, level, (read_w, read_h))
    if (read_w, read_h) != (full_w, full_h):
        padded = np.full((full_h, full_w, 3), 255, np.uint8)
        padded[:read_h, :read_w] = pixels
        pixels = padded
    if (full_w, full_h) != (out_w, out_h):
        pixels = np.asarray(
            Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BOX), np.uint8
        )
    return pixels


def overview_level(slide: Slide, dz: DeepZoom) -> int | None:
    """The finest Deep Zoom level served from the overview, or None if the slide serves all.

    That is the first level, going coarser, whose tiles would read more than
    :data:`MAX_SHRINK` slide-level pixels per tile pixel along an axis; it and every coarser
    level come from the overview. At that level the factor is at most ``2 * MAX_SHRINK``
    (the level before it was within bounds), so building it reads bounded blocks too.
    """
    for level in range(dz.max_level, -1, -1):
        ds = dz.downsample(level)
        lds = slide.level_downsamples[slide.best_level_for_downsample(ds)]
        if ds / lds > MAX_SHRINK * 1.001:
            return level
    return None


def _reduce2(pixels: NDArray[np.uint8], size: tuple[int, int]) -> NDArray[np.uint8]:
    """2 x 2 block means of ``pixels`` padded with white to ``2 * size``: (h, w, 3) uint8."""
    w, h = size
    if pixels.shape[:2] != (2 * h, 2 * w):
        padded = np.full((2 * h, 2 * w, 3), 255, np.uint8)
        padded[: pixels.shape[0], : pixels.shape[1]] = pixels
        pixels = padded
    return np.asarray(Image.fromarray(pixels).reduce(2), np.uint8)


def _level_file(folder: Path, level: int) -> Path:
    return folder / f"level-{level}.npy"


def _rows(path: Path, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> NDArray[np.uint8]:
    """Rows ``[y0, y1)`` (columns ``[x0, x1)``) of a stored level, copied out of a memory map
    that is dropped again, so only the pages of the crop are ever resident."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        return np.array(arr[y0:y1, x0:x1], np.uint8)
    finally:
        del arr


def write_overview(slide: Slide, dz: DeepZoom, base: int, folder: Path) -> None:
    """Write Deep Zoom levels ``base`` down to 0 of ``slide`` as ``level-<L>.npy`` files.

    Level ``base`` is read from the slide in blocks of :data:`OVERVIEW_BLOCK_PX` output pixels
    (at most ``(2 * MAX_SHRINK * OVERVIEW_BLOCK_PX)^2`` slide pixels each, see
    :func:`overview_level`); each coarser level is the 2 x 2 block mean of the one before,
    read back from disk a strip at a time. Memory is bounded by one block, one output strip
    (``OVERVIEW_BLOCK_PX`` rows of level ``base``) and one input strip, whatever the slide.

    :meth:`wsi.Slide.read_downsampled` is not used: it returns the whole downsampled slide in
    memory (the bound would grow with the slide's area) and sizes it by rounding, not on the
    Deep Zoom grid (``ceil``, white past the edge), so tiles would be offset by up to a pixel.
    """
    block = OVERVIEW_BLOCK_PX
    for level in range(base, -1, -1):
        w, h = dz.level_size(level)
        ds = dz.downsample(level)
        path = _level_file(folder, level)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (h, w, 3)}
            )
            for y in range(0, h, block):
                sh = min(block, h - y)
                if level == base:
                    strip = np.empty((sh, w, 3), np.uint8)
                    for x in range(0, w, block):
                        sw = min(block, w - x)
                        strip[:, x : x + sw] = read_shrunk(slide, (x * ds, y * ds), (sw, sh), ds)
                else:
                    finer = _rows(_level_file(folder, level + 1), 2 * y, 2 * (y + sh))
                    strip = _reduce2(finer, (w, sh))
                f.write(np.ascontiguousarray(strip).data)


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
    def lease(self, path: Path, version: Hashable = None) -> Iterator[Slide]:
        """The open slide at ``path`` for the duration of the ``with`` block.

        A different ``version`` (the file's identity, :meth:`TileService._version`) opens the
        file again: a slide rewritten in place is never read through its old handle.
        """
        key = str(path) if version is None else repr((str(path), version))
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
# The overview store
# --------------------------------------------------------------------------------------------


class OverviewStore:
    """Slide overviews (:func:`write_overview`) kept in a folder, one per slide version.

    Each overview is a sub-folder ``<path hash>-<version hash>`` holding ``overview.json`` and
    ``level-<L>.npy`` per Deep Zoom level; the version hash covers the slide's
    :attr:`wsi.Slide.fingerprint` (size and mtime), its geometry and :data:`OVERVIEW_FORMAT`,
    so a changed slide gets a new overview and the old one is removed. A sub-folder is written
    under a temporary name and renamed when complete (:func:`wsi.atomic_dir`), so a viewer
    stopped mid-build never leaves one that looks finished. One thread builds a given overview;
    others asking for it wait.

    Parameters
    ----------
    folder : where overviews live (created when first needed). None, or a folder that cannot
        be created or written to (a read-only results folder): a private temporary folder,
        removed by :meth:`close`.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._root: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._checked: set[Path] = set()
        #: overviews built by this store (a test's and a log's count)
        self.built = 0

    def root(self) -> Path:
        """The folder overviews are written to (the fallback temporary one if need be)."""
        with self._lock:
            if self._root is None:
                self._root = self._usable(self.folder)
                if self._root is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="oncotrace-viewer-")
                    self._root = Path(self._tmp.name)
            return self._root

    @staticmethod
    def _usable(folder: Path | None) -> Path | None:
        if folder is None:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            return None
        return folder

    @staticmethod
    def names(slide: Slide, dz: DeepZoom, base: int) -> tuple[str, str]:
        """``(prefix, name)`` of a slide's overview folder: the prefix is the same for every
        version of the slide at this path, the name is unique to this version."""
        where = hashlib.sha256(str(slide.path.resolve()).encode()).hexdigest()[:16]
        version = json.dumps(
            [OVERVIEW_FORMAT, slide.fingerprint, dz.width, dz.height, base, OVERVIEW_BLOCK_PX]
        )
        return where, f"{where}-{hashlib.sha256(version.encode()).hexdigest()[:16]}"

    def level_file(self, slide: Slide, dz: DeepZoom, base: int, level: int) -> Path:
        """The ``.npy`` of Deep Zoom ``level`` (<= ``base``), building the overview if needed."""
        prefix, name = self.names(slide, dz, base)
        final = self.root() / name
        with self._lock:
            building = self._building.setdefault(name, threading.Lock())
        with building:
            if final not in self._checked:
                if not self._complete(final, dz, base):
                    self._build(slide, dz, base, final, prefix)
                self._checked.add(final)
        return _level_file(final, level)

    @staticmethod
    def _complete(folder: Path, dz: DeepZoom, base: int) -> bool:
        """Whether ``folder`` holds the overview described (anything else is rebuilt)."""
        try:
            meta = json.loads((folder / "overview.json").read_text(encoding="utf-8"))
            if meta != _overview_meta(dz, base):
                return False
            for level in range(base + 1):
                w, h = dz.level_size(level)
                arr = np.load(_level_file(folder, level), mmap_mode="r", allow_pickle=False)
                if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
                    return False
                del arr
        except (OSError, ValueError):
            return False
        return True

    def _build(self, slide: Slide, dz: DeepZoom, base: int, final: Path, prefix: str) -> None:
        remove_stale_partials(final)
        with atomic_dir(final) as tmp:
            tmp.mkdir()
            write_overview(slide, dz, base, tmp)
            (tmp / "overview.json").write_text(json.dumps(_overview_meta(dz, base)))
        self.built += 1
        for old in final.parent.glob(f"{prefix}-*"):  # earlier versions of this slide
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
                self._root = None
            self._checked.clear()


def _overview_meta(dz: DeepZoom, base: int) -> dict[str, object]:
    """What ``overview.json`` records: enough to check the files and to read them alone."""
    return {
        "format": OVERVIEW_FORMAT,
        "what": "Deep Zoom levels 0..base_level of a slide (oncotrace view), level-<L>.npy",
        "width": dz.width,
        "height": dz.height,
        "base_level": base,
        "base_downsample": dz.downsample(base),
    }


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
    overview_dir : folder for slide overviews (:class:`OverviewStore`); None: a temporary one.
    opener : how a slide file is opened (default: :func:`wsi.open_slide`, any mpp).
    """

    def __init__(
        self,
        *,
        cache_bytes: int = DEFAULT_CACHE_MIB * 2**20,
        max_open: int = DEFAULT_MAX_OPEN_SLIDES,
        quality: int = JPEG_QUALITY,
        overview_dir: Path | None = None,
        opener: Callable[[Path], Slide] | None = None,
    ) -> None:
        self.cache = ByteLRU(cache_bytes)
        self.pool = SlidePool(max_open, opener)
        self.overviews = OverviewStore(overview_dir)
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
        with self.pool.lease(path, self._version(path)) as slide:
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

    def pixels(self, path: Path, level: int, col: int, row: int) -> NDArray[np.uint8]:
        """The tile's (h, w, 3) uint8 pixels, from the slide or its overview (module doc)."""
        dz = self.info(path).deepzoom
        region = dz.tile(level, col, row)
        with self.pool.lease(path, self._version(path)) as slide:
            base = overview_level(slide, dz)
            if base is None or level > base:
                return read_shrunk(slide, region.location, region.size, region.downsample)
            stored = self.overviews.level_file(slide, dz, base, level)
        x0, y0 = (v // region.downsample for v in region.location)
        w, h = region.size
        return _rows(stored, y0, y0 + h, x0, x0 + w)

    def render(self, path: Path, key: Hashable, level: int, col: int, row: int) -> bytes:
        """Render, encode and cache a tile (slow: reads the slide, or builds its overview)."""
        data = encode_jpeg(self.pixels(path, level, col, row), self.quality)
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
        self.overviews.close()
