"""Readers behind :class:`wsi.Slide`. Each one turns a file into level geometry + RGB regions.

A backend reports what the *file* says (levels, raw resolution, vendor); the plausibility of
the physical pixel size and the override logic live in :mod:`wsi._slide`.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import tifffile
from PIL import Image

from ._errors import (
    WITHHELD,
    CorruptSlideError,
    MetadataValueError,
    UnsupportedSlideError,
    metadata_float,
    reader_failure,
)
from ._inspect import PYRAMID_FIX, check_pyramid, open_tiff
from ._tilecache import TILES, TiffSegments, new_owner, read_tiled

BackendName = Literal["cucim", "openslide", "tifffile", "pillow"]
WHITE = 255


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA (H, W, 4) uint8 onto white; returns (H, W, 3) uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _tiff_resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """µm per pixel from TIFF XResolution/YResolution and ResolutionUnit; ``None`` if unitless."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    unit = (
        int(metadata_float(tags["ResolutionUnit"].value, "TIFF ResolutionUnit"))
        if "ResolutionUnit" in tags
        else 2
    )
    # 2 inch, 3 cm (TIFF 6); 4 mm and 5 µm are tifffile's extensions, seen in the wild
    per_unit_um = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}.get(unit)
    if per_unit_um is None:
        return None
    out = []
    for name in ("XResolution", "YResolution"):
        value = tags[name].value
        if not (isinstance(value, tuple) and len(value) == 2):
            raise MetadataValueError(f"the file's TIFF {name} field is not a rational ({WITHHELD})")
        num, den = (metadata_float(v, f"TIFF {name}") for v in value)
        if num == 0 or den == 0:
            return None
        out.append(per_unit_um * den / num)
    return out[0], out[1]


def _aperio_fields(description: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            fields[key.strip()] = value.strip()
    return fields


def tiff_metadata(tf: tifffile.TiffFile) -> dict[str, Any]:
    """Vendor, objective power and resolution (µm/px, with its source) of a TIFF slide."""
    page = tf.pages.first
    desc = page.description or ""
    meta: dict[str, Any] = {
        "vendor": "generic-tiff",
        "objective_power": None,
        "mpp": None,
        "mpp_detail": None,
        "mpp_problem": None,  # which field could not be read as a number (never its value)
    }
    try:
        _fill_tiff_metadata(tf, page, desc, meta)
    except MetadataValueError as exc:  # a field holding text: no mpp, and say which field
        meta["mpp"], meta["mpp_detail"], meta["mpp_problem"] = None, None, str(exc)
    return meta


def _fill_tiff_metadata(
    tf: tifffile.TiffFile, page: tifffile.TiffPage, desc: str, meta: dict[str, Any]
) -> None:
    if tf.is_svs or desc.startswith("Aperio"):
        fields = _aperio_fields(desc)
        meta["vendor"] = "aperio"
        if "AppMag" in fields:
            try:
                meta["objective_power"] = metadata_float(fields["AppMag"], "Aperio AppMag")
            except MetadataValueError:
                meta["objective_power"] = None  # a magnification is only a hint
        if "MPP" in fields:
            mpp = metadata_float(fields["MPP"], "Aperio MPP")
            meta["mpp"] = (mpp, mpp)
            meta["mpp_detail"] = "Aperio ImageDescription MPP"
        return
    if tf.is_ome and tf.ome_metadata:
        meta["vendor"] = "ome"
        ome_mpp = _ome_mpp(tf.ome_metadata)
        if ome_mpp is not None:
            meta["mpp"] = ome_mpp
            meta["mpp_detail"] = "OME PhysicalSizeX/Y"
        mag = re.search(r'NominalMagnification="([0-9.]+)"', tf.ome_metadata)
        if mag:
            meta["objective_power"] = float(mag.group(1))
        return
    if tf.is_philips:
        meta["vendor"] = "philips"
        match = re.search(
            r'PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE.*?"DICOM_PIXEL_SPACING"[^>]*>&quot;([0-9.eE+-]+)&quot; &quot;([0-9.eE+-]+)&quot;',
            tf.philips_metadata or "",
            re.S,
        )
        if match:  # Philips stores (row, column) spacing in millimetres
            meta["mpp"] = (float(match.group(2)) * 1000, float(match.group(1)) * 1000)
            meta["mpp_detail"] = "Philips DICOM_PIXEL_SPACING"
            return
    res = _tiff_resolution_mpp(page)
    if res is not None:
        meta["mpp"] = res
        meta["mpp_detail"] = "TIFF resolution tags"


_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not pixels:
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', pixels.group(0)))
    if "PhysicalSizeX" not in attrs or "PhysicalSizeY" not in attrs:
        return None
    fx = _OME_UNITS_UM.get(attrs.get("PhysicalSizeXUnit", "µm"))
    fy = _OME_UNITS_UM.get(attrs.get("PhysicalSizeYUnit", "µm"))
    if fx is None or fy is None:
        return None
    sx = metadata_float(attrs["PhysicalSizeX"], "OME PhysicalSizeX")
    sy = metadata_float(attrs["PhysicalSizeY"], "OME PhysicalSizeY")
    return sx * fx, sy * fy


#: Said for a file tile whose compressed data is damaged: no reader can recover it from this file.
DAMAGED_TILE_FIX = (
    "the pixel data in the file itself is damaged, so no reader (backend) can recover it: if this"
    " is a copy, copy the slide again from the scanner's original; otherwise export it again"
    " from the scanner software, or rescan the glass slide."
)


def _jpeg_stream(tables: bytes | None, tile: bytes) -> bytes:
    """A TIFF JPEG tile as one self-contained stream: the page's shared JPEGTables (between their
    SOI and EOI) put in front of the tile's own segments, as TIFF Technical Note 2 defines it."""
    if not tables or len(tables) < 4:
        return tile
    return tables[:-2] + tile[2:]


class JpegTiles:
    """The JPEG-compressed file tiles of one TIFF page, read raw and decoded strictly.

    libjpeg treats damaged entropy-coded data (a scan that ends early, bytes left over before
    the EOI) as a *recoverable* error: cuCIM prints it and returns grey or stale pixels, and
    tifffile (imagecodecs) returns them without a word. Decoding through TurboJPEG with
    warnings as errors (simplejpeg, ``strict=True``) turns such a tile into an exception.

    Parameters
    ----------
    path : the file, for messages.
    fd : an open read-only descriptor of it (``os.pread`` is safe from any thread).
    page : the TIFF page; ``level`` is how messages name it.
    """

    def __init__(self, path: Path, fd: int, page: tifffile.TiffPage, level: int) -> None:
        self.path, self.fd, self.level = path, fd, level
        self.offsets = tuple(int(o) for o in page.dataoffsets)
        self.counts = tuple(int(c) for c in page.databytecounts)
        self.tables = page.jpegtables
        self.tile_size = (int(page.tilewidth), int(page.tilelength))
        self.across = -(-int(page.imagewidth) // self.tile_size[0])
        #: tiles already decoded strictly, so a cached or re-read tile is not checked twice
        self.checked: set[int] = set()

    def index(self, col: int, row: int) -> int:
        return row * self.across + col

    def raw(self, col: int, row: int) -> bytes | None:
        """The tile's stream, or None for a sparse tile (byte count 0: readers show background)."""
        i = self.index(col, row)
        if i >= len(self.offsets) or self.counts[i] == 0:
            return None
        data = os.pread(self.fd, self.counts[i], self.offsets[i])
        if len(data) < self.counts[i]:
            raise CorruptSlideError(
                self.path,
                f"file tile (column {col}, row {row}) of level {self.level} lies past the end of"
                f" the file ({self.counts[i]} bytes at offset {self.offsets[i]}).",
                "the file is shorter than its tile table says; copy it again from the original.",
            )
        return _jpeg_stream(self.tables, data)

    def decode(self, col: int, row: int, *, scale: int = 1) -> np.ndarray | None:
        """The tile as (h, w, 3) uint8 RGB (``scale`` > 1: 1/scale the size, for a check only).

        Raises
        ------
        CorruptSlideError
            The tile's data cannot be decoded without error, naming the level and the tile.
        """
        import simplejpeg

        stream = self.raw(col, row)
        if stream is None:
            return None
        try:
            out = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True, min_factor=scale)
        except (ValueError, RuntimeError) as exc:
            raise CorruptSlideError(
                self.path,
                f"file tile (column {col}, row {row}) of level {self.level}, at level pixel"
                f" ({col * self.tile_size[0]}, {row * self.tile_size[1]}), cannot be decoded"
                f" ({reader_failure(exc)}); readers that do not stop would show grey or stale"
                " pixels there.",
                DAMAGED_TILE_FIX,
            ) from exc
        self.checked.add(self.index(col, row))
        return np.asarray(out)

    def check(self, col: int, row: int) -> None:
        """Decode the tile strictly once (at 1/8 scale: libjpeg still reads all its data)."""
        if self.index(col, row) not in self.checked:
            self.decode(col, row, scale=8)

    def check_span(self, x0: int, y0: int, x1: int, y1: int) -> None:
        """Check every tile under level pixels [x0, x1) × [y0, y1)."""
        tw, th = self.tile_size
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                self.check(col, row)


def jpeg_pages(
    path: Path,
    fd: int,
    tf: tifffile.TiffFile,
    dims: tuple[tuple[int, int], ...],
) -> list[JpegTiles | None]:
    """:class:`JpegTiles` for each level of ``dims`` stored as a JPEG-tiled page (else None).

    A level is matched to the tiled page of its size; a size held by two tiled pages (an
    ambiguous file) gets the first, as cuCIM and OpenSlide take it.
    """
    by_size: dict[tuple[int, int], tifffile.TiffPage] = {}
    for page in tf.pages:
        if isinstance(page, tifffile.TiffPage) and page.is_tiled:
            by_size.setdefault((int(page.imagewidth), int(page.imagelength)), page)
    out: list[JpegTiles | None] = []
    for level, size in enumerate(dims):
        found = by_size.get(size)
        ok = found is not None and int(found.compression) == 7 and int(found.planarconfig) == 1
        out.append(JpegTiles(path, fd, found, level) if ok and found is not None else None)
    return out


class Backend:
    """Common shape of a reader. Subclasses fill the attributes in ``__init__``."""

    name: ClassVar[BackendName]
    #: File containers (as sniffed by :mod:`wsi._inspect`) this reader can open at all.
    containers: ClassVar[frozenset[str]]
    path: Path
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    n_focal_planes: int = 1
    vendor: str | None = None
    objective_power: float | None = None
    file_mpp: tuple[float, float] | None = None
    file_mpp_detail: str | None = None
    #: which metadata field could not be read as a number (never its value), or None
    file_mpp_problem: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, z: int = 0
    ) -> np.ndarray:
        raise NotImplementedError

    def iter_regions(
        self,
        locations: np.ndarray,
        level: int,
        size: tuple[int, int],
        *,
        batch_size: int,
        workers: int,
    ) -> Iterator[np.ndarray]:
        """Yield ``(n, h, w, 3)`` batches of regions at ``locations`` in order.

        Reader threads take one batch each; at most ``2 × workers`` batches are in flight, so
        memory stays bounded whatever the number of locations.
        """
        n = len(locations)
        w, h = size

        def read(start: int) -> np.ndarray:
            stop = min(n, start + batch_size)
            out = np.empty((stop - start, h, w, 3), np.uint8)
            for i in range(start, stop):
                out[i - start] = self.read_region(
                    (int(locations[i, 0]), int(locations[i, 1])), level, size
                )
            return out

        starts = range(0, n, batch_size)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="read") as pool:
            pending: deque[Future[np.ndarray]] = deque()
            for start in starts:
                pending.append(pool.submit(read, start))
                if len(pending) >= 2 * max(1, workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def close(self) -> None:
        pass

    @property
    def raw_properties(self) -> Mapping[str, str]:
        """Everything the file says. Never exported: it can hold names and scanner paths."""
        return {}


def _configure_cucim() -> None:
    """Point cuCIM at a config with its own tile cache off (see :mod:`wsi._tilecache` for why).

    The CPU wheel's reader plugin reads its cache settings from ``CUCIM_CONFIG_PATH`` when the
    first image of the process is opened; ``CuImage.cache(...)`` from Python does not reach it
    (measured). A user's own config is kept, with only its cache turned off.
    """
    import hashlib
    import json
    import os
    import tempfile

    want: dict[str, Any] = {}
    theirs = os.environ.get("CUCIM_CONFIG_PATH")
    if theirs:
        try:
            want = json.loads(Path(theirs).read_text() or "{}")
        except (OSError, ValueError):
            return  # cuCIM reports its own config problems
        if not isinstance(want, dict) or want.get("cache", {}).get("type", "nocache") == "nocache":
            return
    want["cache"] = {**want.get("cache", {}), "type": "nocache"}
    text = json.dumps(want, sort_keys=True)
    folder = Path(tempfile.gettempdir()) / f"oncotrace-cucim-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"cucim-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not cfg.exists() or cfg.read_text() != text:
        tmp = cfg.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, cfg)
    os.environ["CUCIM_CONFIG_PATH"] = str(cfg)


#: A region spanning more file tiles than this is decoded by cuCIM in one call, not tile by tile
#: through the cache (overviews and large viewer reads touch each file tile once anyway).
MAX_CACHED_SPAN = 16


def _level0_origin(a: int, ds: float) -> int | None:
    """A level-0 coordinate that cuCIM maps to level coordinate ``a`` (it takes ``floor(c / ds)``,
    measured): exact for an integer downsample, else clear of the pixel's edges in both float64
    and float32 arithmetic; None if no coordinate is (a downsample within a hair of 1)."""
    if a == 0:
        return 0
    if ds == int(ds):  # an integer downsample maps a * ds to a exactly in any arithmetic
        return a * int(ds)
    base = math.ceil(a * ds)
    for c in (base, base + 1):
        q, q32 = c / ds, float(np.float32(c) / np.float32(ds))
        if math.floor(q) == a == math.floor(q32) and 1e-6 < q - a < 1 - 1e-6:
            return c
    return None


class CucimBackend(Backend):
    """cuCIM's CPU reader: the fastest path for SVS and JPEG/uncompressed tiled TIFF."""

    name = "cucim"
    containers = frozenset({"tiff"})

    def __init__(self, path: Path) -> None:
        from ._quiet import cucim_first_use

        self.path = path
        self._owner = new_owner()
        self._fd = -1
        _configure_cucim()
        with cucim_first_use():  # the import and the first open print cuFile probes on CPUs
            try:
                from cucim import CuImage  # type: ignore[attr-defined]
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "the cuCIM backend needs cuCIM: `pip install --no-deps"
                    " 'cucim-cu12>=25.2,<27'` (CPU) or `pip install 'oncotrace[cucim]'` (GPU)"
                ) from exc
            try:
                self._img = CuImage(str(path))
            except Exception as exc:
                raise CorruptSlideError(
                    path, f"cuCIM cannot load it ({exc}).", "try backend='openslide'."
                ) from exc
        res = self._img.resolutions
        self.level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self.level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        self._tile_sizes = tuple(
            (int(w), int(h))
            for w, h in res.get("level_tile_sizes", ((0, 0),) * len(self.level_dimensions))
        )
        with open_tiff(path) as tf:
            meta = tiff_metadata(tf)
            first = tf.pages.first
            first_dims = (int(first.imagewidth), int(first.imagelength))
            if first.is_tiled and self.level_dimensions[0] != first_dims:
                # cuCIM sorts the pages by size, so a larger later page becomes its level 0
                w, h = self.level_dimensions[0]
                raise CorruptSlideError(
                    path,
                    f"its pyramid is out of order: a later image ({w}×{h} px) is larger than the"
                    f" first, full-resolution one ({first_dims[0]}×{first_dims[1]} px), so tiles"
                    " would be cut at the wrong scale.",
                    PYRAMID_FIX,
                )
            check_pyramid(path, self.level_dimensions, self.level_downsamples)
            self._fd = os.open(path, os.O_RDONLY)
            self._jpeg = [
                jt if jt is not None and jt.tile_size == self._tile_sizes[level] else None
                for level, jt in enumerate(jpeg_pages(path, self._fd, tf, self.level_dimensions))
            ]
        try:
            self._own_decode = [jt is not None and self._decodes_alike(jt) for jt in self._jpeg]
        except Exception:
            self.close()
            raise
        self.vendor = meta["vendor"]
        self.objective_power = meta["objective_power"]
        self.file_mpp = meta["mpp"]
        self.file_mpp_detail = meta["mpp_detail"]
        self.file_mpp_problem = meta["mpp_problem"]

    def _decodes_alike(self, jt: JpegTiles) -> bool:
        """Whether the strict decoder gives cuCIM's pixels for this level's first stored tile.

        TurboJPEG guesses a tile's colour space from its markers, cuCIM from the TIFF's
        Photometric tag; where the guess differs (RGB JPEG without an Adobe marker) the strict
        decoder only checks each tile and cuCIM's pixels are kept.
        """
        first = next((i for i, c in enumerate(jt.counts) if c), None)
        if first is None:
            return False
        col, row = first % jt.across, first // jt.across
        try:
            mine = jt.decode(col, row)
        except CorruptSlideError:
            return False  # the tile is reported when it is read
        w_l, h_l = self.level_dimensions[jt.level]
        tw, th = jt.tile_size
        size = (min(tw, w_l - col * tw), min(th, h_l - row * th))
        ds = self.level_downsamples[jt.level]
        ox, oy = _level0_origin(col * tw, ds), _level0_origin(row * th, ds)
        if mine is None or ox is None or oy is None:
            return False
        theirs = np.asarray(self._img.read_region(location=(ox, oy), size=size, level=jt.level))
        mine = mine[: size[1], : size[0]]
        return mine.shape == theirs[..., :3].shape and bool(
            np.abs(mine.astype(np.int16) - theirs[..., :3]).max() <= 1
        )

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, z: int = 0
    ) -> np.ndarray:
        ds = self.level_downsamples[level]
        w_l, h_l = self.level_dimensions[level]
        x, y = math.floor(location[0] / ds), math.floor(location[1] / ds)
        w, h = int(size[0]), int(size[1])
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w_l, x + w), min(h_l, y + h)
        if x1 <= x0 or y1 <= y0:  # wholly past the slide's edge
            return np.full((h, w, 3), WHITE, np.uint8)
        tw, th = self._tile_sizes[level] if level < len(self._tile_sizes) else (0, 0)
        if tw > 0 and th > 0:
            cols = range(x0 // tw, (x1 - 1) // tw + 1)
            rows = range(y0 // th, (y1 - 1) // th + 1)
            ox = [_level0_origin(c * tw, ds) for c in cols]
            oy = [_level0_origin(r * th, ds) for r in rows]
            if len(cols) * len(rows) <= MAX_CACHED_SPAN and None not in ox + oy:
                out = np.empty((h, w, 3), np.uint8)
                if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                    out[...] = WHITE  # the Slide API promises white past the slide's edge
                for r, o_y in zip(rows, oy, strict=True):
                    for c, o_x in zip(cols, ox, strict=True):
                        assert o_x is not None and o_y is not None
                        tile = self._tile(level, c, r, (o_x, o_y), (tw, th))
                        tx, ty = c * tw, r * th
                        ix0, iy0 = max(x0, tx), max(y0, ty)
                        ix1, iy1 = min(x1, tx + tile.shape[1]), min(y1, ty + tile.shape[0])
                        out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[
                            iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx
                        ]
                return out
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._read_direct((x, y), location, level, (w, h))
        # past the edge: cuCIM refuses a size beyond the level ("exceeds the original image
        # width"), so read the part inside and put it on white, as the Slide API promises
        ox0, oy0 = _level0_origin(x0, ds), _level0_origin(y0, ds)
        inner = (
            ox0 if ox0 is not None else round(x0 * ds),
            oy0 if oy0 is not None else round(y0 * ds),
        )
        out = np.full((h, w, 3), WHITE, np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_direct(
            (x0, y0), inner, level, (x1 - x0, y1 - y0)
        )
        return out

    def _tile(
        self, level: int, col: int, row: int, origin0: tuple[int, int], tile: tuple[int, int]
    ) -> np.ndarray:
        """File tile (col, row) of ``level``, clipped to the level, from the cache or cuCIM."""
        w_l, h_l = self.level_dimensions[level]

        jt = self._jpeg[level]

        def decode() -> np.ndarray:
            size = (min(tile[0], w_l - col * tile[0]), min(tile[1], h_l - row * tile[1]))
            if jt is not None and self._own_decode[level]:
                mine = jt.decode(col, row)
                if mine is not None:  # else a sparse tile: cuCIM's background
                    return np.ascontiguousarray(mine[: size[1], : size[0]])
            elif jt is not None:
                jt.check(col, row)
            arr = np.asarray(self._img.read_region(location=origin0, size=size, level=level))
            return composite_on_white(arr) if arr.shape[-1] == 4 else np.array(arr, copy=True)

        return TILES.get((self._owner, level, col, row), decode)

    def _read_direct(
        self,
        xy: tuple[int, int],
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
    ) -> np.ndarray:
        x, y = xy  # the region lies inside the level (read_region puts the rest on white)
        jt = self._jpeg[level]
        if jt is not None:  # cuCIM would hand back a damaged tile as grey pixels
            jt.check_span(x, y, x + size[0], y + size[1])
        region = self._img.read_region(
            location=(int(location[0]), int(location[1])), size=size, level=level
        )
        arr = np.asarray(region)
        if arr.shape[-1] == 4:
            arr = composite_on_white(arr)
        return arr

    def close(self) -> None:
        TILES.drop(self._owner)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # No iter_regions override: with the tile cache, per-tile reads from reader threads run
    # 1.7x faster than cuCIM's native batch loader (which also hands out reused buffers).

    @property
    def raw_properties(self) -> Mapping[str, str]:
        return {
            f"{ns}.{k}": str(v)
            for ns, d in self._img.metadata.items()
            if isinstance(d, dict)
            for k, v in d.items()
        }


class OpenSlideBackend(Backend):
    """OpenSlide 4 (openslide-bin): NDPI, MRXS, SCN, BIF, VMS, DICOM-WSI, generic tiled TIFF, SVS."""

    name = "openslide"
    containers = frozenset({"tiff", "dicom", "text", "unknown"})  # text: VMS/MRXS index files

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedSlideError(
                path, "OpenSlide does not recognise the format.", "check the file type."
            ) from exc
        except openslide.OpenSlideError as exc:
            if "Unsupported" in str(exc):
                raise UnsupportedSlideError(
                    path,
                    f"OpenSlide cannot decode this variant ({exc}).",
                    "try backend='tifffile'.",
                ) from exc
            raise CorruptSlideError(
                path,
                f"OpenSlide recognises the format but cannot read it ({exc}).",
                _openslide_fix(path, str(exc)),
            ) from exc
        props = self._osr.properties
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.vendor = props.get("openslide.vendor")
        if "openslide.objective-power" in props:
            self.objective_power = float(props["openslide.objective-power"])
        if "openslide.mpp-x" in props and "openslide.mpp-y" in props:
            self.file_mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
            self.file_mpp_detail = f"OpenSlide {self.vendor} metadata"
        try:
            check_pyramid(path, self.level_dimensions, self.level_downsamples)
        except CorruptSlideError:
            self._osr.close()
            raise

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, z: int = 0
    ) -> np.ndarray:
        import openslide

        try:
            img = self._osr.read_region((int(location[0]), int(location[1])), level, size)
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(
                self.path,
                f"OpenSlide failed to decode level {level} at {tuple(location)} ({exc}).",
                DAMAGED_TILE_FIX,
            ) from exc
        return composite_on_white(np.asarray(img))

    def close(self) -> None:
        self._osr.close()

    @property
    def raw_properties(self) -> Mapping[str, str]:
        return dict(self._osr.properties)


def _openslide_fix(path: Path, message: str) -> str:
    if path.suffix.lower() == ".dcm" or "DICOM" in message or "flavor" in message:
        return (
            "the DICOM lacks the VL Whole Slide Microscopy attributes OpenSlide needs (ImageType,"
            " DimensionOrganizationType, per-frame positions); convert the slide again with a"
            " DICOM-WSI converter (e.g. wsidicomizer)."
        )
    return "the file is damaged or a variant OpenSlide does not support; export it again."


class TifffileBackend(Backend):
    """tifffile for OME-TIFF (with Z planes) and plain/stripped TIFF that the others skip."""

    name = "tifffile"
    containers = frozenset({"tiff"})

    def __init__(self, path: Path) -> None:
        import zarr

        self.path = path
        self._tf = open_tiff(path)
        series = self._tf.series[0]
        meta = tiff_metadata(self._tf)
        self.vendor, self.objective_power = meta["vendor"], meta["objective_power"]
        self.file_mpp, self.file_mpp_detail = meta["mpp"], meta["mpp_detail"]
        self.file_mpp_problem = meta["mpp_problem"]
        self._axes = series.axes
        if np.dtype(series.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise UnsupportedSlideError(
                path,
                f"pixels are {series.dtype}, not 8/16-bit brightfield RGB.",
                "export the image as 8-bit RGB (fluorescence and label images are not slides).",
            )
        if "Y" not in self._axes or "X" not in self._axes:
            raise UnsupportedSlideError(
                path,
                f"the TIFF has axes {self._axes!r}, not an image plane.",
                "export a 2-D RGB image.",
            )
        levels = series.levels
        self._arrays = []
        dims = []
        for lvl in range(len(levels)):
            store = self._tf.aszarr(series=0, level=lvl)
            self._arrays.append(zarr.open_array(store, mode="r"))
            shape = levels[lvl].shape
            dims.append((int(shape[self._axes.index("X")]), int(shape[self._axes.index("Y")])))
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        # the mean of both axes' ratios, as OpenSlide and cuCIM define it
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
        try:
            check_pyramid(path, self.level_dimensions)
        except CorruptSlideError:
            self._tf.close()
            raise
        self.n_focal_planes = int(series.shape[self._axes.index("Z")]) if "Z" in self._axes else 1
        self._lock = threading.Lock()  # aszarr file handles are not thread-safe
        # imagecodecs returns a JPEG tile with damaged data as grey pixels without a word
        self._fd = os.open(path, os.O_RDONLY)
        planar = self._axes.replace("S", "") in ("YX",)
        self._jpeg = jpeg_pages(path, self._fd, self._tf, self.level_dimensions) if planar else []
        # Regions are composed from file tiles decoded once each, into the shared cache: through
        # the zarr view every read decoded each tile it touched (all 192 MiB of a one-tile 8192²
        # file for one 224-px region). One cache owner per focal plane.
        self._tiles = [self._tile_reader(i, lvl) for i, lvl in enumerate(series.levels)]
        self._owners = [new_owner() for _ in range(self.n_focal_planes)]

    def _tile_reader(self, n: int, level: tifffile.TiffPageSeries) -> list[TiffSegments] | None:
        """One TiffSegments per focal plane of ``level``, or None where the zarr view must do
        (planar samples, channels as pages, other axes)."""
        others = "".join(a for a in self._axes if a not in "YXS")
        pages = level.pages
        if others not in ("", "Z") or len(pages) != self.n_focal_planes:
            return None
        if not all(p is not None and TiffSegments.supports(p) for p in pages):
            return None
        return [TiffSegments(self.path, p, n, _to_rgb8) for p in pages if p is not None]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, z: int = 0
    ) -> np.ndarray:
        ds = self.level_downsamples[level]
        w_l, h_l = self.level_dimensions[level]
        x = math.floor(location[0] / ds)  # cuCIM's rule: same pixels whichever reader
        y = math.floor(location[1] / ds)
        out = np.full((size[1], size[0], 3), WHITE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + size[0], w_l), min(y + size[1], h_l)
        if x1 <= x0 or y1 <= y0:
            return out
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y0, y1))
            elif ax == "X":
                index.append(slice(x0, x1))
            elif ax == "Z":
                index.append(z)
            elif ax in "SC":
                index.append(slice(None))
            else:
                index.append(0)
        jt = self._jpeg[level] if level < len(self._jpeg) else None
        if jt is not None:
            jt.check_span(x0, y0, x1, y1)
        planes = self._tiles[level]
        if planes is not None:
            segs, owner = planes[z], self._owners[z]
            return read_tiled(
                x, y, (size[0], size[1]), (w_l, h_l), segs.tile,
                lambda c, r: TILES.get((owner, level, c, r), lambda: segs.decode(self._fd, c, r)),
            )  # fmt: skip
        with self._lock:
            data = np.asarray(self._arrays[level][tuple(index)])
        kept = [ax for ax in self._axes if ax in "YXSC"]
        channel = "S" if "S" in kept else ("C" if "C" in kept else None)
        if channel is not None and kept.index(channel) < kept.index("Y"):  # planar layout
            data = np.moveaxis(data, kept.index(channel), -1)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_rgb8(data)
        return out

    def close(self) -> None:
        self._tf.close()
        for owner in getattr(self, "_owners", ()):
            TILES.drop(owner)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def raw_properties(self) -> Mapping[str, str]:
        return {"ImageDescription": self._tf.pages.first.description or ""}


def _to_rgb8(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint16:
        data = (data >> 8).astype(np.uint8)
    elif data.dtype != np.uint8:
        raise ValueError(f"pixel type {data.dtype} is not brightfield RGB")  # checked at open
    if data.ndim == 2:
        return np.repeat(data[..., None], 3, axis=-1)
    if data.shape[-1] == 4:
        return composite_on_white(data)
    if data.shape[-1] == 1:
        return np.repeat(data, 3, axis=-1)
    return data[..., :3]


def _too_large_image(pixels: int | None) -> tuple[str, str]:
    """(problem, fix) for a plain image too large for :class:`PillowBackend`."""
    size = f" ({pixels / 1e6:.0f} megapixels)" if pixels else ""
    return (
        f"the image{size} is too large for the plain-image reader, which holds a PNG/JPEG/BMP"
        f" whole in memory (at most {PillowBackend.MAX_PIXELS / 1e6:.0f} megapixels).",
        "convert it to a tiled pyramidal TIFF, which the slide readers read tile by tile, e.g."
        " `vips tiffsave in.png out.tif --tile --pyramid --compression jpeg`, and open out.tif"
        " (with mpp=… if the image records no resolution).",
    )


class PillowBackend(Backend):
    """Plain PNG/JPEG/BMP camera fields (common in cytology): one level, held in memory."""

    name = "pillow"
    containers = frozenset({"png", "jpeg", "bmp", "jp2", "tiff"})
    #: Largest image held in memory: Pillow's own decompression-bomb bound (2 ×
    #: Image.MAX_IMAGE_PIXELS by default), ~1.2 GB as RGBA + RGB while it is converted.
    MAX_PIXELS = 178_956_970

    def __init__(self, path: Path) -> None:
        import warnings

        self.path = path
        try:
            with warnings.catch_warnings():
                # the size is checked here; Pillow's warning below its own bound says nothing more
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.width * im.height > self.MAX_PIXELS:
                        raise UnsupportedSlideError(path, *_too_large_image(im.width * im.height))
                    self.vendor = (im.format or "image").lower()
                    dpi = im.info.get("dpi")
                    im.load()
                    rgba = np.asarray(im.convert("RGBA"))
        except UnsupportedSlideError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's bound, when lower than ours
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise UnsupportedSlideError(
                path, *_too_large_image(int(pixels.group(1)) if pixels else None)
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptSlideError(
                path, f"the image cannot be decoded ({exc}).", "export the image again."
            ) from exc
        self._rgb = composite_on_white(rgba)
        h, w = self._rgb.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        # Pillow reports (1, 1) or 72 dpi when a file records nothing; only > 1 dpi counts
        if dpi and all(float(d) > 1 for d in dpi[:2]):
            self.file_mpp = (25_400.0 / float(dpi[0]), 25_400.0 / float(dpi[1]))
            self.file_mpp_detail = "image DPI"

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, z: int = 0
    ) -> np.ndarray:
        h_img, w_img = self._rgb.shape[:2]
        x, y = int(location[0]), int(location[1])
        out = np.full((size[1], size[0], 3), WHITE, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size[0], w_img), min(y + size[1], h_img)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out


BACKENDS: dict[str, type[Backend]] = {
    "cucim": CucimBackend,
    "openslide": OpenSlideBackend,
    "tifffile": TifffileBackend,
    "pillow": PillowBackend,
}


def cucim_available() -> bool:
    """Whether cuCIM is installed (found, not imported: importing it probes cuFile, which
    :class:`CucimBackend` does quietly)."""
    import importlib.util

    return importlib.util.find_spec("cucim") is not None
