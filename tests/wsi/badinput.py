"""Generators for a corpus of inputs that :func:`wsi.open_slide` must refuse politely.

Each ``make_*`` function writes one small file (or folder) into ``directory`` and returns a
:class:`BadInput` record saying which :class:`wsi.SlideError` subclass it must raise, a
substring the message must contain, and the first step that must notice the damage.
:func:`build_corpus` makes all of them. Everything is seeded and at most a few hundred
kilobytes, so the whole corpus is built in well under a second.

Inputs in :data:`CRASHERS` have killed the interpreter through a native reader (cuCIM); open
them only in a child process.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from oncotrace.wsi import CorruptSlideError, MppError, SlideError, UnsupportedSlideError
from PIL import Image

SEED = 20240611

#: Real malformed DICOM shipped with the shared data (relative to the data root).
MALFORMED_DICOM = Path("bad-input") / "malformed-sm-column-major.dcm"
#: Real SVS whose head is copied to make a truncated slide (relative to the data root).
SVS_SOURCE = Path("slides") / "cmu-1-small-region.svs"


Stage = Literal["inspect", "open", "read"]


@dataclass(frozen=True)
class BadInput:
    """One bad input and how the library must refuse it."""

    path: Path
    error: type[SlideError]
    match: str  # substring the error message must contain
    why: str  # what is wrong, for test ids and failure messages
    #: First step that must refuse it: the pre-flight ``wsi._inspect.inspect_file``, the rest
    #: of ``open_slide`` (backends, mpp), or ``Slide.read_region`` over every level.
    stage: Stage = "inspect"

    @property
    def filename(self) -> str:
        return self.path.name


def _rng(salt: int) -> np.random.Generator:
    return np.random.default_rng([SEED, salt])


def tissue_like_rgb(height: int, width: int, *, salt: int = 0) -> np.ndarray:
    """Seeded (height, width, 3) uint8 image: smooth pink blobs on near-white, plus noise."""
    rng = _rng(salt)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for cy, cx, r in zip(
        rng.uniform(0, height, 6), rng.uniform(0, width, 6), rng.uniform(20, 80, 6), strict=True
    ):
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    field = np.clip(field, 0, 1)
    pink = np.array([200, 90, 160], np.float32)
    white = np.array([242, 240, 244], np.float32)
    img = white * (1 - field[..., None]) + pink * field[..., None]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- a hand-rolled classic TIFF writer, for headers no well-behaved writer would produce ---------

_TIFF_TYPES = {"SHORT": (3, "H"), "LONG": (4, "I"), "RATIONAL": (5, "II")}


def tiff_from_entries(entries: Sequence[tuple[int, str, Sequence[int]]]) -> bytes:
    """Little-endian classic TIFF with one IFD made of ``(tag, type, values)`` entries.

    ``RATIONAL`` values are given flat as ``(num, den, ...)``. Values longer than four bytes
    are placed after the IFD, as the format requires.
    """
    entries = sorted(entries, key=lambda e: e[0])
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    extra = bytearray()
    packed = []
    for tag, type_name, values in entries:
        code, fmt = _TIFF_TYPES[type_name]
        count = len(values) // 2 if type_name == "RATIONAL" else len(values)
        data = struct.pack("<" + fmt[0] * len(values), *values)
        if len(data) <= 4:
            field = data.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", ifd_offset + ifd_size + len(extra))
            extra += data
            if len(extra) % 2:
                extra += b"\x00"
        packed.append(struct.pack("<HHI", tag, code, count) + field)
    ifd = struct.pack("<H", len(entries)) + b"".join(packed) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + bytes(extra)


def _huge_tiled_rgb_entries(
    side: int, tile_offset: int, tile_bytes: int
) -> list[tuple[int, str, Sequence[int]]]:
    return [
        (256, "LONG", [side]),  # ImageWidth
        (257, "LONG", [side]),  # ImageLength
        (258, "SHORT", [8, 8, 8]),  # BitsPerSample
        (259, "SHORT", [1]),  # Compression: none
        (262, "SHORT", [2]),  # Photometric: RGB
        (277, "SHORT", [3]),  # SamplesPerPixel
        (284, "SHORT", [1]),  # PlanarConfiguration: contig
        (322, "SHORT", [256]),  # TileWidth
        (323, "SHORT", [256]),  # TileLength
        # A real table would need (side / 256)² ≈ 1.5e9 entries; a header this broken
        # declares one, the way a scanner that died before writing the table might.
        (324, "LONG", [tile_offset]),  # TileOffsets
        (325, "LONG", [tile_bytes]),  # TileByteCounts
    ]


# -- the corpus ----------------------------------------------------------------------------------


def make_empty_svs(directory: Path) -> BadInput:
    path = directory / "empty.svs"
    path.write_bytes(b"")
    return BadInput(path, UnsupportedSlideError, "empty", "zero-byte file")


def make_text_svs(directory: Path) -> BadInput:
    path = directory / "notes.svs"
    path.write_text(
        "Case 12, block A3: H&E re-cut requested.\nScanner queue: tomorrow 9:00.\n",
        encoding="utf-8",
    )
    return BadInput(path, UnsupportedSlideError, "text", "text file named .svs")


def make_png_as_ndpi(directory: Path) -> BadInput:
    path = directory / "field.ndpi"
    path.write_bytes(_png_bytes(tissue_like_rgb(64, 96, salt=1)))
    return BadInput(path, UnsupportedSlideError, "PNG", "PNG renamed .ndpi")


def make_not_dicom_dcm(directory: Path) -> BadInput:
    path = directory / "series.dcm"
    path.write_bytes(_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return BadInput(path, UnsupportedSlideError, "DICM", ".dcm without a DICOM preamble")


def write_tiled_tiff(
    path: Path | io.BytesIO, *, compression: str | None = None, salt: int = 3, side: int = 256
) -> None:
    """A single-level tiled RGB TIFF (128² tiles) at a plausible 0.5 µm/px."""
    tifffile.imwrite(
        path,
        tissue_like_rgb(side, side, salt=salt),
        tile=(128, 128),
        photometric="rgb",
        compression=compression,
        resolution=(20_000, 20_000),  # px/cm = 0.5 µm/px, so only the damage is wrong
        resolutionunit="CENTIMETER",
    )


def make_truncated_tiff(directory: Path) -> BadInput:
    """A valid tiled TIFF cut to its first 60 %: tiles lie beyond the end."""
    buf = io.BytesIO()
    write_tiled_tiff(buf, side=512)
    data = buf.getvalue()
    path = directory / "truncated.tif"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return BadInput(path, CorruptSlideError, "truncated", "generated tiled TIFF cut at 60 %")


def make_truncated_svs(directory: Path, source: Path) -> BadInput:
    """The first 60 % of a real SVS (an interrupted copy)."""
    data = source.read_bytes()
    path = directory / "truncated.svs"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return BadInput(path, CorruptSlideError, "truncated", f"first 60 % of {source.name}")


def make_huge_tiff_no_data(directory: Path) -> BadInput:
    """Declares 10 000 000² px; its one tile offset and byte count are zero."""
    path = directory / "huge-empty.tif"
    path.write_bytes(tiff_from_entries(_huge_tiled_rgb_entries(10_000_000, 0, 0)))
    return BadInput(path, CorruptSlideError, "10000000×10000000", "10⁷×10⁷ px header, no data")


def make_huge_tiff_past_eof(directory: Path) -> BadInput:
    """Declares 10 000 000² px; its one tile points 1 GiB past the end of the file.

    Re-copying cannot help a 152-byte file that claims 10¹⁴ px, so the message must name the
    impossible size rather than blame an interrupted transfer.
    """
    path = directory / "huge-past-eof.tif"
    path.write_bytes(tiff_from_entries(_huge_tiled_rgb_entries(10_000_000, 1 << 30, 196_608)))
    return BadInput(
        path, CorruptSlideError, "10000000×10000000", "10⁷×10⁷ px header, tile past EOF"
    )


def make_huge_tiff_with_a_tile(directory: Path) -> BadInput:
    """Declares 10 000 000² px and holds one short tile inside the file: only the size is wrong."""
    tile_bytes = 64
    header_len = len(tiff_from_entries(_huge_tiled_rgb_entries(10_000_000, 0, tile_bytes)))
    header = tiff_from_entries(_huge_tiled_rgb_entries(10_000_000, header_len, tile_bytes))
    path = directory / "huge-one-tile.tif"
    path.write_bytes(header + bytes(tile_bytes))
    return BadInput(path, CorruptSlideError, "10000000×10000000", "10⁷×10⁷ px header, one tile")


def make_missing_mpp_tiff(directory: Path) -> BadInput:
    path = directory / "no-mpp.tif"
    tifffile.imwrite(
        path,
        tissue_like_rgb(256, 384, salt=4),
        tile=(128, 128),
        photometric="rgb",
        resolutionunit="NONE",
    )
    return BadInput(
        path, MppError, "no physical pixel size", "tiled TIFF, ResolutionUnit NONE", "open"
    )


def make_bogus_mpp_tiff(directory: Path) -> BadInput:
    """72 dpi, the default of desktop software: 25 400 / 72 = 352.78 µm/px."""
    path = directory / "72dpi.tif"
    tifffile.imwrite(
        path,
        tissue_like_rgb(256, 384, salt=5),
        tile=(128, 128),
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    return BadInput(path, MppError, "352.778", "tiled TIFF at 72 dpi", "open")


def make_truncated_png(directory: Path) -> BadInput:
    data = _png_bytes(tissue_like_rgb(128, 128, salt=6))
    path = directory / "field.png"
    path.write_bytes(data[: len(data) // 2])
    return BadInput(path, CorruptSlideError, "decoded", "PNG cut in half", "open")


def make_folder_without_dicom(directory: Path) -> BadInput:
    path = directory / "dicom-series"
    path.mkdir()
    (path / "README.txt").write_text("DICOM export pending\n", encoding="utf-8")
    return BadInput(path, UnsupportedSlideError, ".dcm", "folder with no .dcm files", "open")


def _patch_tile(
    path: Path, tile: int, *, byte_count: int | None = None, garbage: bool = False
) -> None:
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        counts_at = page.tags["TileByteCounts"].valueoffset
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    data = bytearray(path.read_bytes())
    if byte_count is not None:
        struct.pack_into("<I", data, counts_at + 4 * tile, byte_count)
    if garbage:
        data[offset : offset + count] = _rng(7).integers(0, 256, count, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def make_short_tile_tiff(directory: Path) -> BadInput:
    """Uncompressed tiles; tile 1 declares 296 bytes instead of 128·128·3 = 49 152."""
    path = directory / "short-tile.tif"
    write_tiled_tiff(path, salt=8)
    _patch_tile(path, 1, byte_count=296)
    return BadInput(path, CorruptSlideError, "decode", "tile byte count too small", "read")


def make_garbage_jpeg_tile_tiff(directory: Path) -> BadInput:
    """JPEG tiles; tile 1 is overwritten with random bytes (no JPEG markers at all)."""
    path = directory / "garbage-jpeg-tile.tif"
    write_tiled_tiff(path, compression="jpeg", salt=9)
    _patch_tile(path, 1, garbage=True)
    return BadInput(path, CorruptSlideError, "decode", "JPEG tile replaced by noise", "read")


def make_tile_table_too_short(directory: Path) -> BadInput:
    """ImageWidth says 384 px (3 × 2 tiles of 128²); the tile table lists the 2 × 2 of 256 px."""
    path = directory / "short-tile-table.tif"
    write_tiled_tiff(path, salt=10)
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages.first.tags["ImageWidth"]
        at, fmt = tag.valueoffset, "<I" if tag.dtype == 4 else "<H"
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, 384)
    path.write_bytes(bytes(data))
    return BadInput(path, CorruptSlideError, "tile", "tile table shorter than the image needs")


def make_float_tiff(directory: Path) -> BadInput:
    """A float32 RGB map (e.g. model output) handed over as a slide: not brightfield RGB."""
    path = directory / "probability-map.tif"
    rgb = tissue_like_rgb(96, 128, salt=11).astype(np.float32) / 255
    tifffile.imwrite(
        path, rgb, photometric="rgb", resolution=(20_000, 20_000), resolutionunit="CENTIMETER"
    )
    return BadInput(path, UnsupportedSlideError, "float32", "float32 RGB TIFF", "open")


def make_jpeg_tiles_wider_than_declared(directory: Path) -> BadInput:
    """JPEG tiles are 128 px wide but TileWidth says 64 (ImageWidth halved to keep the tile
    table consistent). cuCIM decodes each tile into a 64-px buffer and kills the interpreter
    (SIGSEGV / SIGABRT), so the pre-flight keeps cuCIM away from it (sampled SOF check) and
    OpenSlide reports the mismatch when a region is read."""
    path = directory / "jpeg-tiles-wider-than-declared.tif"
    write_tiled_tiff(path, compression="jpeg", salt=13)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        for name, value in (("TileWidth", 64), ("ImageWidth", 128)):
            tag = tf.pages.first.tags[name]
            struct.pack_into("<I" if tag.dtype == 4 else "<H", data, tag.valueoffset, value)
    path.write_bytes(bytes(data))
    return BadInput(path, CorruptSlideError, "decode", "JPEG tiles larger than TileWidth", "read")


GENERATORS: tuple[Callable[[Path], BadInput], ...] = (
    make_empty_svs,
    make_text_svs,
    make_png_as_ndpi,
    make_not_dicom_dcm,
    make_truncated_tiff,
    make_huge_tiff_no_data,
    make_huge_tiff_past_eof,
    make_huge_tiff_with_a_tile,
    make_missing_mpp_tiff,
    make_bogus_mpp_tiff,
    make_truncated_png,
    make_folder_without_dicom,
    make_short_tile_tiff,
    make_garbage_jpeg_tile_tiff,
    make_tile_table_too_short,
    make_float_tiff,
)

#: Inputs that have killed the interpreter through a native reader. Open them only in a child
#: process (``wsi._inspect.inspect_file`` alone is pure Python and safe in-process).
CRASHERS: tuple[Callable[[Path], BadInput], ...] = (make_jpeg_tiles_wider_than_declared,)


def real_bad_inputs(directory: Path, shared_data: Path) -> list[BadInput]:
    """Bad inputs made from (or being) real files of the shared data; empty if it is absent."""
    records = []
    if (shared_data / SVS_SOURCE).is_file():
        records.append(make_truncated_svs(directory, shared_data / SVS_SOURCE))
    if (shared_data / MALFORMED_DICOM).is_file():
        records.append(
            BadInput(
                shared_data / MALFORMED_DICOM,
                CorruptSlideError,
                "DICOM",
                "DICOM SM without ImageType / DimensionOrganizationType / frame positions",
                "open",
            )
        )
    return records


def build_corpus(
    directory: Path, *, shared_data: Path | None = None, include_crashers: bool = False
) -> list[BadInput]:
    """Write every generated bad input into ``directory``; add the real ones if data exists.

    Parameters
    ----------
    directory : an existing, empty folder (e.g. pytest's ``tmp_path``).
    shared_data : root of the shared test data. When given and present, the corpus also holds a
        truncated copy of a real SVS and a reference (not a copy) to the real malformed DICOM.
    include_crashers : also write :data:`CRASHERS`; only for code that opens the corpus in a
        child process.
    """
    makers = GENERATORS + CRASHERS if include_crashers else GENERATORS
    records = [make(directory) for make in makers]
    if shared_data is not None:
        records += real_bad_inputs(directory, shared_data)
    return records


#: Real DICOM-WSI instances of two different slides (series), relative to the data root.
DICOM_SERIES = (
    Path("dicom-wsi") / "bone-marrow" / "bone-marrow-jpeg.dcm",
    Path("dicom-wsi") / "camelyon-lymph-node" / "multiframe_camelyon_challenge_image.dcm",
)


def make_two_series_dicom_folder(directory: Path, shared_data: Path) -> BadInput:
    """One folder holding the instances of two DICOM-WSI series (two slides), as a PACS export
    of a whole case gives. Copies (~270 kB): OpenSlide looks for a series' other instances
    beside the file it is given, so the files must really sit together."""
    import shutil

    folder = directory / "case-17"
    folder.mkdir()
    for rel in DICOM_SERIES:
        shutil.copyfile(shared_data / rel, folder / rel.name)
    return BadInput(
        folder, UnsupportedSlideError, "2 DICOM-WSI series", "two DICOM-WSI series in one folder"
    )


def make_jpeg_tile_scan_cut_short(directory: Path, *, tile: int = 5) -> tuple[BadInput, int]:
    """64 JPEG tiles of 128²; tile ``tile`` keeps its markers (SOI, headers, SOS, EOI) but its
    scan's last three quarters are zero bytes, as a disk or copy fault leaves it. Every marker the
    pre-flight checks is intact; libjpeg only *warns* ("premature end of data segment") and fills
    the rest with grey, which cuCIM and tifffile pass on as pixels. Returns the record and the
    tile's index (its level-0 position is ``(tile % 8 * 128, tile // 8 * 128)``)."""
    path = directory / "jpeg-tile-scan-cut-short.tif"
    write_tiled_tiff(path, compression="jpeg", salt=22, side=1024)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        offset, count = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    data = bytearray(path.read_bytes())
    stream = bytes(data[offset : offset + count])
    sos = stream.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(stream[sos + 2 : sos + 4], "big")
    keep = scan + (count - 2 - scan) // 4
    data[offset + keep : offset + count - 2] = bytes(count - 2 - keep)
    path.write_bytes(bytes(data))
    record = BadInput(path, CorruptSlideError, "cannot be decoded", "JPEG scan cut short", "read")
    return record, tile


# -- issue 12, slide readers: work bounds and messages (appended) ---------------------------------

#: Side of the one Deflate tile of :func:`make_one_big_deflate_tile`, and where its planted square
#: lies (level-0 x, y, side) with the square's colour; the rest is BACKGROUND.
BIG_TILE_SIDE = 8192
PLANTED = (5000, 3000, 300)
PLANTED_RGB = (200, 90, 160)
BACKGROUND = (240, 238, 242)


def make_one_big_deflate_tile(directory: Path) -> Path:
    """A ~200 KB TIFF holding one 8192×8192 RGB Deflate tile (192 MiB decoded) at 0.5 µm/px,
    near-white with one planted square: a decompression ratio near Deflate's ~1000:1."""
    img = np.empty((BIG_TILE_SIDE, BIG_TILE_SIDE, 3), np.uint8)
    img[...] = BACKGROUND
    x, y, side = PLANTED
    img[y : y + side, x : x + side] = PLANTED_RGB
    path = directory / "one-8192-deflate-tile.tif"
    tifffile.imwrite(
        path,
        img,
        tile=(BIG_TILE_SIDE, BIG_TILE_SIDE),
        compression="zlib",
        photometric="rgb",
        resolution=(20_000, 20_000),
        resolutionunit="CENTIMETER",
    )
    return path


def make_oversized_segment(directory: Path, *, tiled: bool) -> tuple[Path, int]:
    """A hand-made TIFF whose one tile (``tiled``) or strip is 16384 px square, RGB, Deflate:
    768 MiB decoded, from a few hundred bytes. Returns the path and that decoded size in bytes,
    computed by hand (16384 · 16384 · 3)."""
    import zlib

    side = 16_384
    payload = zlib.compress(bytes(4096))
    layout: list[tuple[int, str, Sequence[int]]] = [
        (256, "LONG", [side]),  # ImageWidth
        (257, "LONG", [side]),  # ImageLength
        (258, "SHORT", [8, 8, 8]),  # BitsPerSample
        (259, "SHORT", [8]),  # Compression: Deflate
        (262, "SHORT", [2]),  # Photometric: RGB
        (277, "SHORT", [3]),  # SamplesPerPixel
        (282, "RATIONAL", [20_000, 1]),  # XResolution: 0.5 µm/px
        (283, "RATIONAL", [20_000, 1]),  # YResolution
        (284, "SHORT", [1]),  # PlanarConfiguration: contig
        (296, "SHORT", [3]),  # ResolutionUnit: cm
    ]
    if tiled:
        layout += [(322, "LONG", [side]), (323, "LONG", [side])]
        offsets_tag, counts_tag = 324, 325
    else:
        layout += [(278, "LONG", [side])]  # RowsPerStrip: the whole image
        offsets_tag, counts_tag = 273, 279
    header_len = len(
        tiff_from_entries([*layout, (offsets_tag, "LONG", [0]), (counts_tag, "LONG", [0])])
    )
    entries = [*layout, (offsets_tag, "LONG", [header_len]), (counts_tag, "LONG", [len(payload)])]
    path = directory / f"one-16384-{'tile' if tiled else 'strip'}.tif"
    path.write_bytes(tiff_from_entries(entries) + payload)
    return path, side * side * 3


_BIGTIFF_TYPES = {"SHORT": (3, "H"), "LONG": (4, "I"), "LONG8": (16, "Q")}


def bigtiff_from_entries(entries: Sequence[tuple[int, str, Sequence[int]]]) -> bytes:
    """Little-endian BigTIFF with one IFD of ``(tag, type, values)``, each value fitting the
    entry's 8 bytes (BigTIFF: 8-byte counts and offsets, 20-byte entries)."""
    entries = sorted(entries, key=lambda e: e[0])
    packed = []
    for tag, type_name, values in entries:
        code, fmt = _BIGTIFF_TYPES[type_name]
        data = struct.pack("<" + fmt * len(values), *values)
        if len(data) > 8:
            raise ValueError("values longer than 8 bytes are not supported here")
        packed.append(struct.pack("<HHQ", tag, code, len(values)) + data.ljust(8, b"\x00"))
    ifd = struct.pack("<Q", len(entries)) + b"".join(packed) + struct.pack("<Q", 0)
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + ifd


def make_zero_size_bigtiff(directory: Path, *, with_data: bool = False) -> Path:
    """A BigTIFF whose one image is 0×0 px (RGB, uncompressed, one strip): empty, or
    (``with_data``) pointing at 8 bytes of the file, which passes a "has data" check."""
    entries: list[tuple[int, str, Sequence[int]]] = [
        (256, "LONG", [0]),  # ImageWidth
        (257, "LONG", [0]),  # ImageLength
        (258, "SHORT", [8, 8, 8]),  # BitsPerSample
        (259, "SHORT", [1]),  # Compression: none
        (262, "SHORT", [2]),  # Photometric: RGB
        (273, "LONG8", [0]),  # StripOffsets
        (277, "SHORT", [3]),  # SamplesPerPixel
        (278, "LONG", [1 if with_data else 0]),  # RowsPerStrip
        (279, "LONG8", [8 if with_data else 0]),  # StripByteCounts
    ]
    path = directory / f"zero-size{'-with-data' if with_data else ''}.tif"
    path.write_bytes(bigtiff_from_entries(entries))
    return path


def make_tile_offset_past_eof(directory: Path) -> tuple[Path, int]:
    """A valid 2 × 2-tile TIFF whose tile 1 is pointed 1 MB past the end of the file, while
    tiles 2 and 3, stored after it, are intact: an ill-formed table, not a cut file. Returns
    the path and the file's size."""
    path = directory / "tile-offset-past-eof.tif"
    write_tiled_tiff(path, salt=40)
    with tifffile.TiffFile(path) as tf:
        at = tf.pages.first.tags["TileOffsets"].valueoffset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, at + 4, len(data) + 1_000_000)
    path.write_bytes(bytes(data))
    return path, len(data)


def make_plain_tiff_named_ndpi(directory: Path) -> Path:
    """A valid tiled JPEG TIFF at 0.5 µm/px, named ``.ndpi`` (a renamed export)."""
    path = directory / "renamed.ndpi"
    write_tiled_tiff(path, compression="jpeg", salt=41)
    return path


def make_huge_png(directory: Path) -> Path:
    """A 14 000 × 14 000 px (196 megapixel) PNG, 1-bit so that writing it takes 25 MB of memory."""
    path = directory / "whole-slide-export.png"
    Image.new("1", (14_000, 14_000), 1).save(path)
    return path
