"""Generators for a corpus of inputs that :func:`wsi.open_slide` must refuse politely.

Each ``make_*`` function writes one small file (or folder) into ``directory`` and returns a
:class:`BadInput` record saying which :class:`wsi.SlideError` subclass it must raise and a
substring the message must contain. :func:`build_corpus` makes all of them. Everything is
seeded and a few kilobytes to a few hundred kilobytes in size, so the whole corpus is built in
well under a second.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi import CorruptSlideError, MppError, SlideError, UnsupportedSlideError

SEED = 20240611

#: Real malformed DICOM shipped with the shared data (relative to the data root).
MALFORMED_DICOM = Path("bad-input") / "malformed-sm-column-major.dcm"
#: Real SVS whose head is copied to make a truncated slide (relative to the data root).
SVS_SOURCE = Path("slides") / "cmu-1-small-region.svs"


@dataclass(frozen=True)
class BadInput:
    """One bad input and how the library must refuse it."""

    path: Path
    error: type[SlideError]
    match: str  # substring the error message must contain
    why: str  # what is wrong, for test ids and failure messages

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
        "Case 12, block A3: H&E re-cut requested.\nScanner queue: tomorrow 9:00.\n", encoding="utf-8"
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


def make_truncated_tiff(directory: Path) -> BadInput:
    """A valid tiled pyramid-less TIFF cut to its first 60 %: tiles lie beyond the end."""
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        tissue_like_rgb(512, 512, salt=3),
        tile=(128, 128),
        photometric="rgb",
        resolution=(20_000, 20_000),  # px/cm = 0.5 µm/px, so only the truncation is wrong
        resolutionunit="CENTIMETER",
    )
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
    """Declares 10 000 000² px; its one tile points 1 GB past the end of the file."""
    path = directory / "huge-past-eof.tif"
    path.write_bytes(
        tiff_from_entries(_huge_tiled_rgb_entries(10_000_000, 1 << 30, 256 * 256 * 3))
    )
    return BadInput(path, CorruptSlideError, "10000000", "10⁷×10⁷ px header, tile past EOF")


def make_missing_mpp_tiff(directory: Path) -> BadInput:
    path = directory / "no-mpp.tif"
    tifffile.imwrite(
        path,
        tissue_like_rgb(256, 384, salt=4),
        tile=(128, 128),
        photometric="rgb",
        resolutionunit="NONE",
    )
    return BadInput(path, MppError, "no physical pixel size", "tiled TIFF, ResolutionUnit NONE")


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
    return BadInput(path, MppError, "352.778", "tiled TIFF at 72 dpi")


def make_truncated_png(directory: Path) -> BadInput:
    data = _png_bytes(tissue_like_rgb(128, 128, salt=6))
    path = directory / "field.png"
    path.write_bytes(data[: len(data) // 2])
    return BadInput(path, CorruptSlideError, "decoded", "PNG cut in half")


def make_folder_without_dicom(directory: Path) -> BadInput:
    path = directory / "dicom-series"
    path.mkdir()
    (path / "README.txt").write_text("DICOM export pending\n", encoding="utf-8")
    return BadInput(path, UnsupportedSlideError, ".dcm", "folder with no .dcm files")


GENERATORS: tuple[Callable[[Path], BadInput], ...] = (
    make_empty_svs,
    make_text_svs,
    make_png_as_ndpi,
    make_not_dicom_dcm,
    make_truncated_tiff,
    make_huge_tiff_no_data,
    make_huge_tiff_past_eof,
    make_missing_mpp_tiff,
    make_bogus_mpp_tiff,
    make_truncated_png,
    make_folder_without_dicom,
)


def build_corpus(directory: Path, *, shared_data: Path | None = None) -> list[BadInput]:
    """Write every generated bad input into ``directory``; add the real ones if data exists.

    Parameters
    ----------
    directory : an existing, empty folder (e.g. pytest's ``tmp_path``).
    shared_data : root of the shared test data. When given and present, the corpus also holds a
        truncated copy of a real SVS and a reference (not a copy) to the real malformed DICOM.
    """
    records = [make(directory) for make in GENERATORS]
    if shared_data is not None and (shared_data / SVS_SOURCE).is_file():
        records.append(make_truncated_svs(directory, shared_data / SVS_SOURCE))
    if shared_data is not None and (shared_data / MALFORMED_DICOM).is_file():
        records.append(
            BadInput(
                shared_data / MALFORMED_DICOM,
                CorruptSlideError,
                "DICOM",
                "DICOM SM without ImageType / DimensionOrganizationType / frame positions",
            )
        )
    return records
