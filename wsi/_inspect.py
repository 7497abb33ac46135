"""Cheap pre-flight checks on a file before any native reader touches it.

Native readers (cuCIM in particular) can crash the interpreter on inputs they do not support
(cuCIM segfaults on Deflate-compressed TIFF) or on truncated data, so the file's magic bytes,
its extension and, for TIFF, the tile table are checked here first with pure-Python tifffile.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tifffile

from ._errors import CorruptSlideError, UnsupportedSlideError
from ._tilecache import MAX_SEGMENT_BYTES, segment_nbytes, segment_too_large

Container = Literal["tiff", "dicom", "png", "jpeg", "bmp", "jp2", "text", "unknown"]

#: Extensions whose format is TIFF-based: content that is not TIFF is a renamed file.
TIFF_EXTENSIONS = frozenset(
    {".svs", ".ndpi", ".tif", ".tiff", ".scn", ".bif", ".svslide", ".qptiff"}
)
#: Largest plausible side of a slide in pixels (75 mm at 0.1 µm/px is 750 000).
MAX_SIDE_PX = 1_000_000
#: TIFF compressions cuCIM's CPU reader decodes without crashing (none, JPEG, Aperio JPEG 2000).
CUCIM_COMPRESSIONS = frozenset({1, 7, 33003, 33005})


@dataclass(frozen=True)
class FileInfo:
    """What the bytes of a file say it is."""

    path: Path
    container: Container
    size_bytes: int
    cucim_safe: bool = False
    is_ome: bool = False
    #: bytes of the largest decoded tile or strip of the slide's images (TIFF only)
    max_segment_bytes: int = 0


def sniff(path: Path) -> Container:
    """Identify a file by its magic bytes, never by its extension."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM":
        return "bmp"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    try:
        # final=False: a multi-byte character cut at the end of the sample is still text
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "unknown"
    return "text"


def inspect_file(path: Path) -> FileInfo:
    """Check that ``path`` is a non-empty file whose content matches its extension.

    Raises
    ------
    UnsupportedSlideError
        Missing, empty, text, or content that contradicts the extension.
    CorruptSlideError
        A TIFF whose directory or tile table is unreadable, truncated or empty.
    """
    if not path.exists():
        raise UnsupportedSlideError(path, "the file does not exist.", "check the path.")
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedSlideError(
            path,
            "the file is empty (0 bytes).",
            "copy or export the slide again; the transfer failed.",
        )
    container = sniff(path)
    ext = path.suffix.lower()
    if ext in TIFF_EXTENSIONS and container != "tiff":
        what = {"text": "text", "unknown": "unrecognised binary data"}.get(
            container, container.upper()
        )
        raise UnsupportedSlideError(
            path,
            f"the extension {ext!r} promises a TIFF-based slide but the content is {what}.",
            "rename the file to its real type, or export the slide again from the scanner software.",
        )
    if ext == ".dcm" and container != "dicom":
        raise UnsupportedSlideError(
            path,
            "the extension '.dcm' promises DICOM but the file has no DICM preamble.",
            "export the image again as DICOM Part 10 (with preamble).",
        )
    if container == "text" and ext not in {".vms", ".vmu", ".mrxs"}:
        raise UnsupportedSlideError(
            path, "this is a text file, not an image.", "point OncoTrace at the slide file itself."
        )
    if container != "tiff":
        return FileInfo(path, container, size)
    return _inspect_tiff(path, size)


def open_tiff(path: Path) -> tifffile.TiffFile:
    """``path`` as tifffile reads it, also when a plain TIFF is named ``.ndpi``.

    tifffile reads a classic TIFF named ``.ndpi`` as Hamamatsu's variant with 64-bit offsets
    (by the name alone), so a plain TIFF renamed so parsed as garbage ("no image directory").
    A ``.ndpi`` file is therefore first read as a plain TIFF, and as NDPI only if its first page
    carries Hamamatsu's tags (an NDPI under 4 GiB reads as a plain TIFF too).
    """
    if path.suffix.lower() != ".ndpi":
        return tifffile.TiffFile(path)
    try:
        plain = tifffile.TiffFile(path, is_ndpi=False)
    except Exception:
        return tifffile.TiffFile(path)  # an NDPI past 4 GiB, or damage: tifffile's own reading
    try:
        if len(plain.pages) and not plain.pages.first.is_ndpi:
            return plain
    except Exception:
        pass
    plain.close()
    return tifffile.TiffFile(path)


def _inspect_tiff(path: Path, size: int) -> FileInfo:
    try:
        with open_tiff(path) as tf:
            pages = list(tf.pages)
            is_ome = bool(tf.is_ome)
            if not pages:
                raise CorruptSlideError(
                    path,
                    "the TIFF holds no image directory.",
                    "export the slide again; it is truncated.",
                )
            _refuse_multichannel(path, tf)
            check_pyramid(path, _pyramid_pages(tf))
            safe = True
            largest = 0
            for page in pages:
                if not isinstance(page, tifffile.TiffPage):
                    continue
                if page.imagewidth > MAX_SIDE_PX or page.imagelength > MAX_SIDE_PX:
                    raise CorruptSlideError(
                        path,
                        f"the TIFF declares {page.imagewidth}×{page.imagelength} px, larger than any glass"
                        f" slide ({MAX_SIDE_PX} px per side).",
                        "the header is damaged; export the slide again.",
                    )
                if page.imagewidth == 0 or page.imagelength == 0:
                    raise CorruptSlideError(
                        path,
                        f"image directory {page.index} declares a {page.imagewidth}×"
                        f"{page.imagelength} px image: there are no pixels to read.",
                        "the file was written without its image (an export that failed or was"
                        " cancelled); export the slide again from the scanner software.",
                    )
                _check_page_data(path, page, size, pages)
                main = page.is_tiled or page.index == 0
                if main:
                    largest = max(largest, _check_segment_size(path, page))
                if main and not (_cucim_decodes(page) and _jpeg_tiles_sane(tf.filehandle, page)):
                    safe = False
    except (CorruptSlideError, UnsupportedSlideError):
        raise
    except Exception as exc:  # tifffile raises many types for damaged headers
        raise CorruptSlideError(
            path,
            f"the TIFF structure cannot be parsed ({type(exc).__name__}: {exc}).",
            "the file is truncated or damaged; copy or export it again.",
        ) from exc
    return FileInfo(
        path, "tiff", size, cucim_safe=safe and not is_ome, is_ome=is_ome, max_segment_bytes=largest
    )


def _check_segment_size(path: Path, page: tifffile.TiffPage) -> int:
    """Bytes of one decoded tile or strip of ``page``; refused past MAX_SEGMENT_BYTES."""
    nbytes = segment_nbytes(page)
    if nbytes > MAX_SEGMENT_BYTES:
        if page.is_tiled:
            kind, tile = "tile", (int(page.tilewidth), int(page.tilelength))
        else:
            rows = min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
            kind, tile = "strip", (int(page.imagewidth), rows)
        raise UnsupportedSlideError(path, *segment_too_large(kind, tile, nbytes))
    return nbytes


#: Photometric interpretations of grey planes (MinIsWhite, MinIsBlack): one channel per sample.
_GREY = frozenset({0, 1})
#: ExtraSamples values that are alpha (associated, unassociated), not another channel.
_ALPHA = frozenset({1, 2})
#: Channel names quoted in the message, at most; each cut to this many characters.
MAX_NAMES, MAX_NAME_CHARS = 12, 40


def _refuse_multichannel(path: Path, tf: tifffile.TiffFile) -> None:
    """Refuse a fluorescence / multichannel image: it has no RGB stain colours to tile.

    Its level-0 image holds grey planes (MinIsBlack/White samples): a PerkinElmer/Akoya QPTIFF
    with such planes, or at least two channels, whether as pages of one size (QPTIFF, plain
    multi-page), an OME ``C`` axis, or several samples per pixel. One grey plane alone stays
    allowed (it reads as grey brightfield), and so do RGB QPTIFF/OME files.
    """
    page = tf.pages.first
    if int(page.photometric) not in _GREY:
        return
    desc = page.description or ""
    qpi = (page.software or "").startswith("PerkinElmer-QPI") or "<PerkinElmer-QPI-" in desc
    extra = tuple(int(e) for e in (page.extrasamples or ()))
    n = int(page.samplesperpixel) - sum(1 for e in extra if e in _ALPHA)
    names: list[str] = []
    if tf.is_ome and tf.ome_metadata:
        series = tf.series[0]
        if "C" in series.axes:
            n = max(n, int(series.shape[series.axes.index("C")]))
        names = re.findall(r'<(?:\w+:)?Channel\b[^>]*?\bName="([^"]*)"', tf.ome_metadata)[:n]
    elif n == 1:  # one sample per page: the channels are the full-resolution pages of this size
        level0 = [
            p
            for p in tf.pages
            if isinstance(p, tifffile.TiffPage)
            and (p.imagewidth, p.imagelength) == (page.imagewidth, page.imagelength)
            and not p.is_reduced
            and int(p.samplesperpixel) == 1
        ]
        n = len(level0)
        if qpi:
            names = [_qpi_channel(p.description or "") for p in level0]
    if n < 2 and not qpi:
        return
    kind = (
        "a PerkinElmer/Akoya QPTIFF fluorescence image"
        if qpi
        else "a fluorescence / multichannel image"
    )
    listed = [_printable(x) for x in names if x.strip()]
    if listed and len(listed) == n:
        more = f", … ({n} in all)" if n > MAX_NAMES else ""
        channels = f"{n} channel{'s' if n > 1 else ''}: {', '.join(listed[:MAX_NAMES])}{more}"
    else:
        channels = f"{n} unnamed channel{'s' if n > 1 else ''}"
    raise UnsupportedSlideError(
        path,
        f"it is {kind} ({channels}; {page.dtype} grey planes), not a brightfield RGB slide,"
        " so there are no stain colours to find tissue in or to tile.",
        "OncoTrace needs a brightfield RGB scan (H&E or IHC: SVS, NDPI, RGB TIFF/QPTIFF, …):"
        " tile the brightfield scan of this section instead; fluorescence and multiplex"
        " images are not supported.",
    )


def _qpi_channel(description: str) -> str:
    """``"CD8 (Opal 520)"`` from a QPTIFF page's XML (``<Biomarker>`` and ``<Name>``)."""
    name = re.search(r"<Name>([^<]*)</Name>", description)
    marker = re.search(r"<Biomarker>([^<]*)</Biomarker>", description)
    n = name.group(1).strip() if name else ""
    m = marker.group(1).strip() if marker else ""
    if m and n and m != n:
        return f"{m} ({n})"
    return m or n


def _printable(text: str) -> str:
    """A channel name as quoted in a message: printable characters only, and short."""
    clean = "".join(c for c in text.strip() if c.isprintable())
    return clean if len(clean) <= MAX_NAME_CHARS else clean[: MAX_NAME_CHARS - 1] + "…"


def _pyramid_pages(tf: tifffile.TiffFile) -> list[tuple[int, int]]:
    """(width, height) of the levels cuCIM and OpenSlide build, in file order; level 0 first.

    An SVS's levels are its tiled pages; a generic TIFF's are page 0 and the tiled reduced-
    resolution pages after it. Both readers sort them by size, so a later page larger than
    page 0 silently becomes level 0. Vendor formats with their own layout are left out.
    """
    tiled = [p for p in tf.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
    if tf.is_svs:
        return [(p.imagewidth, p.imagelength) for p in tiled]
    vendor = tf.is_ome or tf.is_scn or tf.is_ndpi or tf.is_philips or tf.is_bif or tf.is_qpi
    first = tf.pages.first
    if vendor or not first.is_tiled:
        return []
    reduced = [p for p in tiled if p.index != 0 and p.is_reduced]
    return [(p.imagewidth, p.imagelength) for p in (first, *reduced)]


#: Fix for a pyramid whose levels do not shrink from level 0 down.
PYRAMID_FIX = (
    "re-export the slide with a proper pyramid (full resolution first, each level smaller), from"
    " the scanner software or with `vips tiffsave in.svs out.tif --tile --pyramid"
    " --compression jpeg`."
)


def check_pyramid(
    path: Path,
    dims: Sequence[tuple[int, int]],
    downsamples: Sequence[float] | None = None,
) -> None:
    """Refuse levels that do not shrink or whose downsample disagrees with their size.

    Parameters
    ----------
    path : the slide, for the message.
    dims : (width, height) of each level, level 0 first, as the file or a reader orders them.
    downsamples : a reader's downsample per level, checked against ``dims`` when given.

    Raises
    ------
    CorruptSlideError
        A level no smaller than the one before (level 0 would not be the finest: readers that
        re-sort read an upsampled page at the file's µm/px), a level stretched differently
        along x and y, or a downsample that does not match the level's size.
    """
    if not dims:
        return
    w0, h0 = dims[0]
    for i in range(1, len(dims)):
        (pw, ph), (w, h) = dims[i - 1], dims[i]
        # each side shrinks (one already 1 px wide cannot), and the level is not a repeat
        if not (_shrinks(w, pw) and _shrinks(h, ph)) or (w, h) == (pw, ph):
            raise CorruptSlideError(
                path,
                f"its pyramid is out of order: level {i} is {w}×{h} px, not smaller than level"
                f" {i - 1} ({pw}×{ph} px), so level 0 is not the full-resolution image and"
                " tiles would be cut at the wrong scale.",
                PYRAMID_FIX,
            )
        dx, dy = w0 / w, h0 / h
        # each side is rounded to whole pixels: dx and dy differ by at most that rounding
        if abs(dx - dy) > dx / w + dy / h + 1e-9:
            raise CorruptSlideError(
                path,
                f"level {i} ({w}×{h} px) is downsampled ×{dx:.4g} in x but ×{dy:.4g} in y"
                f" from level 0 ({w0}×{h0} px); it is not a scaled copy of level 0.",
                PYRAMID_FIX,
            )
    for i, ds in enumerate(downsamples or ()):
        w, h = dims[i]
        expect = (w0 / w + h0 / h) / 2
        if not abs(ds - expect) <= 0.01 * expect:
            raise CorruptSlideError(
                path,
                f"the reader gives level {i} ({w}×{h} px) a downsample of {ds:.4g}, but its size"
                f" says ×{expect:.4g} from level 0 ({w0}×{h0} px).",
                PYRAMID_FIX,
            )


def _shrinks(side: int, previous: int) -> bool:
    return side < previous or side == previous == 1


def _check_page_data(
    path: Path, page: tifffile.TiffPage, size: int, pages: Sequence[object]
) -> None:
    offsets = page.dataoffsets
    counts = page.databytecounts
    if not offsets or not any(counts):
        raise CorruptSlideError(
            path,
            f"image directory {page.index} declares {page.imagewidth}×{page.imagelength} px"
            " but holds no pixel data.",
            "the file is a header without image data; export the slide again.",
        )
    expected = _expected_segments(page)
    if len(offsets) < expected:
        raise CorruptSlideError(
            path,
            f"image directory {page.index} lists {len(offsets)} tiles/strips but its size"
            f" ({page.imagewidth}×{page.imagelength} px) needs {expected}.",
            "the tile table is damaged; export the slide again.",
        )
    end = max(o + c for o, c in zip(offsets, counts, strict=False))
    if end > size:
        missing = sum(1 for o, c in zip(offsets, counts, strict=False) if o + c > size)
        if _cut_short(pages, size):
            raise CorruptSlideError(
                path,
                f"the file is truncated: {missing} tile(s) of directory {page.index} lie beyond its"
                f" end ({size} bytes on disk, {end} needed), and no data follows them in the"
                " file: it was cut short.",
                "copy the slide again from its source (the copy or download was interrupted);"
                " the new copy must be as large as the original.",
            )
        raise CorruptSlideError(
            path,
            f"its tile table is ill-formed: {missing} tile(s) of directory {page.index} point past"
            f" the end of the file ({size} bytes; they would need {end}), while tiles stored"
            " after them in the file are present, so the file is not merely cut short.",
            "the file was written wrongly, not damaged in transfer, so copying it again will not"
            " help: export the slide again from the scanner software (or rescan the glass slide).",
        )


def _cut_short(pages: Sequence[object], size: int) -> bool:
    """Whether the data past the end of a ``size``-byte file is what a cut would lose: every
    segment (of any page) beyond the end lies after every segment inside it, and the first of
    them starts within the file (the cut fell in it or just before)."""
    inside: list[int] = []
    beyond: list[int] = []
    for page in pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        for o, c in zip(page.dataoffsets, page.databytecounts, strict=False):
            if c:
                (beyond if o + c > size else inside).append(int(o))
    return bool(beyond) and min(beyond) <= size and min(beyond) > max(inside, default=-1)


def _expected_segments(page: tifffile.TiffPage) -> int:
    planes = page.samplesperpixel if int(page.planarconfig) == 2 else 1
    depth = max(1, int(page.imagedepth or 1))
    if page.is_tiled:
        tiles_x = -(-page.imagewidth // page.tilewidth)
        tiles_y = -(-page.imagelength // page.tilelength)
        tiles_z = -(-depth // max(1, int(page.tiledepth or 1)))
        return tiles_x * tiles_y * tiles_z * planes
    rows = page.rowsperstrip or page.imagelength
    return -(-page.imagelength // max(1, rows)) * depth * planes


#: JPEG tiles whose SOF size is compared with the header before cuCIM may read a level: cuCIM
#: crashes on tiles larger than declared. Parsing the header of every tile would cost more than
#: the markers below, so a spread sample guards the common case of one wrong TileWidth.
JPEG_SAMPLE_TILES = 16
#: Bytes read at the end of a JPEG tile to find its EOI marker past any zero padding.
JPEG_TAIL_BYTES = 64
#: Fewest bytes of a decodable JPEG tile: SOI, a minimal SOF and SOS segment, one byte, EOI.
MIN_JPEG_TILE_BYTES = 2 + 13 + 10 + 1 + 2


def _jpeg_tiles_sane(fh: tifffile.FileHandle, page: tifffile.TiffPage) -> bool:
    """Whether every JPEG tile of ``page`` is framed as one (SOI … EOI, plausible length).

    cuCIM neither raises nor warns the caller on a tile it cannot decode: it hands back stale
    or grey pixels. So *every* tile's markers are checked (two short reads per tile, in file
    order through one handle), not a sample; a tile that fails sends the file to the readers
    that refuse it when that region is read.
    """
    if int(page.compression) != 7:
        return True
    if page.tilewidth % 16 or page.tilelength % 16:
        return False
    offsets, counts = page.dataoffsets, page.databytecounts
    for offset, count in sorted(zip(offsets, counts, strict=False)):
        if count == 0:
            continue  # sparse tile: readers fill it with background
        if count < MIN_JPEG_TILE_BYTES:
            return False
        fh.seek(offset)
        if fh.read(2) != b"\xff\xd8":
            return False
        tail = min(JPEG_TAIL_BYTES, count - 2)
        fh.seek(offset + count - tail)
        if fh.read(tail).rstrip(b"\x00")[-2:] != b"\xff\xd9":
            return False
    step = max(1, len(offsets) // JPEG_SAMPLE_TILES)
    for i in range(0, len(offsets), step):
        if counts[i] == 0:
            continue
        fh.seek(offsets[i])
        sof = _jpeg_frame_size(fh.read(counts[i]))
        if sof is not None and sof != (page.tilelength, page.tilewidth):
            return False
    return True


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first SOFn marker of a JPEG stream, if any."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(
                data[i + 7 : i + 9], "big"
            )
        if marker == 0xDA:
            return None
        i += 2 + seg_len
    return None


def _cucim_decodes(page: tifffile.TiffPage) -> bool:
    return (
        page.is_tiled
        and int(page.compression) in CUCIM_COMPRESSIONS
        and page.samplesperpixel in (3, 4)
        and page.bitspersample == 8
        and int(page.planarconfig) == 1
        and int(page.photometric) in (2, 6)  # RGB, YCbCr
    )


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a source file: size and mtime (ns). Changes whenever the file does."""
    st = os.stat(path)
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"
