"""One typed slide API over cuCIM, OpenSlide, tifffile and Pillow."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from PIL import Image

from ._backends import BACKENDS, Backend, BackendName, cucim_available
from ._errors import (
    CorruptSlideError,
    MppError,
    ParameterError,
    SlideError,
    UnsupportedSlideError,
    reader_failure,
)
from ._inspect import TIFF_EXTENSIONS, FileInfo, inspect_file
from ._io import link_problem, source_fingerprint
from ._tilecache import DAMAGED_TILE_FIX

BackendChoice = Literal["auto", "cucim", "openslide", "tifffile", "pillow"]
MppSource = Literal["file", "override"]

#: Level-0 resolutions outside this window are treated as broken metadata. The upper bound is
#: 50, not 20: real DICOM overview images sit at ~29 µm/px, while bogus TIFF tags read as
#: hundreds or thousands (72 dpi is 353 µm/px).
PLAUSIBLE_MPP = (0.05, 50.0)

#: Slide properties that may be copied into outputs. Anything else (labels, barcodes, file
#: names, operator names, dates) stays inside the reader.
EXPORTED_PROPERTIES = (
    "backend",
    "vendor",
    "objective_power",
    "mpp_x",
    "mpp_y",
    "mpp_source",
    "mpp_detail",
    "level_count",
    "level_dimensions",
    "level_downsamples",
    "n_focal_planes",
)

#: What ``Mpp.detail`` may say about a resolution read from the file. It is stored in every
#: tile store and printed by ``info``, so it is one of these fixed phrases, never file text.
MPP_DETAILS = frozenset(
    {
        "Aperio ImageDescription MPP",
        "OME PhysicalSizeX/Y",
        "Philips DICOM_PIXEL_SPACING",
        "TIFF resolution tags",
        "image DPI",
    }
    | {
        f"OpenSlide {vendor} metadata"
        for vendor in (
            "aperio",
            "dicom",
            "generic-tiff",
            "hamamatsu",
            "leica",
            "mirax",
            "philips",
            "sakura",
            "synthetic",
            "trestle",
            "ventana",
            "zeiss",
        )
    }
)


@dataclass(frozen=True)
class Mpp:
    """Physical pixel size at level 0, in micrometres per pixel, and where it came from."""

    x: float
    y: float
    source: MppSource
    detail: str


class Slide:
    """An opened slide or smear image. Use :func:`open_slide`; close it or use ``with``.

    Coordinates given to and returned by the slide are level-0 pixels ``(x, y)``.
    """

    def __init__(
        self,
        path: Path,
        backend: Backend,
        mpp: Mpp | None,
        info: FileInfo,
        *,
        fingerprint: str | None = None,
        mpp_problem: MppError | None = None,
    ) -> None:
        self.path = path
        self._backend = backend
        self.mpp = mpp
        #: why ``mpp`` is None (opened with ``require_mpp=False``): the error, naming the fix,
        #: that opening with ``require_mpp=True`` raises
        self.mpp_problem = mpp_problem
        self.info = info
        #: :func:`source_fingerprint` of what was opened (every instance of a DICOM-WSI folder)
        self.fingerprint = fingerprint if fingerprint is not None else source_fingerprint(path)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def backend(self) -> BackendName:
        return self._backend.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self._backend.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._backend.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._backend.level_downsamples

    @property
    def n_focal_planes(self) -> int:
        return self._backend.n_focal_planes

    @property
    def vendor(self) -> str | None:
        return self._backend.vendor

    @property
    def objective_power(self) -> float | None:
        return self._backend.objective_power

    @property
    def mpp_xy(self) -> tuple[float, float]:
        """Level-0 µm/px ``(x, y)``; raises :class:`MppError` if the slide has none."""
        if self.mpp is None:
            raise MppError(
                self.path,
                "the slide has no physical pixel size.",
                "pass mpp=0.25 (40× scan) or mpp=0.5 (20×).",
                param="mpp",
            )
        return self.mpp.x, self.mpp.y

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (0.1 % slack)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = i
        return best

    def level_mpp(self, level: int) -> float:
        """Mean µm/px of a pyramid level."""
        mx, my = self.mpp_xy
        return 0.5 * (mx + my) * self.level_downsamples[level]

    # -- pixels -----------------------------------------------------------------------------
    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        *,
        z: int = 0,
    ) -> np.ndarray:
        """Read ``size = (w, h)`` pixels of ``level`` whose top-left is level-0 ``location``.

        Returns
        -------
        (h, w, 3) uint8 ndarray
            RGB; transparent or out-of-slide areas are white.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        if not 0 <= z < self.n_focal_planes:
            raise ValueError(
                f"{self.path}: focal plane {z} out of range 0..{self.n_focal_planes - 1}"
            )
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        try:
            return self._backend.read_region(
                (int(location[0]), int(location[1])), level, (w, h), z=z
            )
        except SlideError:
            raise
        except Exception as exc:  # decoders raise anything from IndexError to Jpeg8Error
            raise self._decode_error(exc, f"level {level} at {tuple(location)}") from exc

    def iter_regions(
        self,
        locations: np.ndarray,
        level: int,
        size: tuple[int, int],
        *,
        batch_size: int = 64,
        workers: int = 2,
    ) -> Iterator[np.ndarray]:
        """Read many same-sized regions in order, as ``(n, h, w, 3)`` uint8 batches.

        Uses the backend's fastest bulk path (cuCIM's native batch loader, reader threads
        otherwise); memory is bounded by a few batches.
        """
        locs = np.asarray(locations, np.int64).reshape(-1, 2)
        batches = self._backend.iter_regions(
            locs, level, (int(size[0]), int(size[1])), batch_size=batch_size, workers=workers
        )
        done = 0
        try:
            for batch in batches:
                yield batch
                done += len(batch)
        except SlideError:
            raise
        except Exception as exc:
            where = f"level {level}, tiles {done}..{min(done + batch_size, len(locs)) - 1}"
            raise self._decode_error(exc, where) from exc

    def _decode_error(self, exc: BaseException, where: str) -> CorruptSlideError:
        return CorruptSlideError(
            self.path,
            f"the {self.backend} reader failed to decode {where} ({reader_failure(exc)}).",
            DAMAGED_TILE_FIX,
        )

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """Whole slide as RGB with its longer side at most ``max_px``: (h, w, 3) uint8."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_px
        return self.read_downsampled(max(scale, 1.0))

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """Whole slide resampled by ``downsample`` (≥ 1) from the closest finer level.

        Reads in strips so memory stays bounded by the output plus one strip.
        """
        w0, h0 = self.dimensions
        out_w = max(1, round(w0 / downsample))
        out_h = max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        if lw * lh <= 64_000_000:
            region = self.read_region((0, 0), level, (lw, lh))
            return resize_rgb(region, (out_w, out_h))
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows_per_strip = max(1, int(16_000_000 / (lw * downsample / ds)))
        for oy in range(0, out_h, rows_per_strip):
            oh = min(rows_per_strip, out_h - oy)
            y0 = oy * downsample
            src_h = max(1, round(oh * downsample / ds))
            strip = self.read_region((0, round(y0)), level, (lw, src_h))
            out[oy : oy + oh] = resize_rgb(strip, (out_w, oh))
        return out

    def exported_properties(self) -> dict[str, Any]:
        """The allow-listed, non-identifying description of the slide for outputs."""
        props: dict[str, Any] = {
            "backend": self.backend,
            "vendor": self.vendor,
            "objective_power": self.objective_power,
            "mpp_x": self.mpp.x if self.mpp else None,
            "mpp_y": self.mpp.y if self.mpp else None,
            "mpp_source": self.mpp.source if self.mpp else None,
            "mpp_detail": self.mpp.detail if self.mpp else None,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "n_focal_planes": self.n_focal_planes,
        }
        return props

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp.x:.4g} µm/px ({self.mpp.source})" if self.mpp else "no mpp"
        return f"Slide({self.path.name!r}, {self.backend}, {self.dimensions[0]}×{self.dimensions[1]}, {mpp})"


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (h, w, 3) uint8 to ``size = (w, h)``: area averaging when shrinking, bicubic up."""
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    pil = Image.fromarray(img)
    shrinking = size[0] <= img.shape[1] and size[1] <= img.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(pil.resize(size, resample=resample))


def _resolve_path(path: Path) -> Path:
    broken = link_problem(path)  # else a loop or a dangling link reads as "does not exist"
    if broken is not None:
        raise UnsupportedSlideError(path, *broken)
    if path.is_dir():
        return _dicom_series_file(path)
    return path


#: Suffixes of slide *files*: a folder named with one is not a slide.
_SLIDE_FILE_SUFFIXES = TIFF_EXTENSIONS | {".mrxs", ".vms", ".dcm", ".png", ".jpg", ".jpeg"}
#: SOP Class UID of a VL Whole Slide Microscopy Image instance (DICOM PS3.4).
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _dicom_series_file(folder: Path) -> Path:
    """The instance of ``folder``'s one DICOM-WSI series to hand to OpenSlide.

    OpenSlide reads the whole series (every level) from any one of its instances, looking for
    the others beside it, so a folder is one slide only if it holds one series. A second series
    (another slide, or a rescan of the same one) would be silently never tiled, and guessing
    which one the folder "means" could score the wrong slide under the folder's name; so it is
    refused, naming each series by its files. Instances of other SOP classes (annotations,
    segmentations) are not slides and are passed over.
    """
    dcm = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not dcm:
        if folder.suffix.lower() in _SLIDE_FILE_SUFFIXES:  # x.svs/: an unpacked archive
            raise UnsupportedSlideError(
                folder,
                f"it is a folder named like a {folder.suffix} file, and holds no DICOM-WSI"
                " instances (.dcm).",
                "put the slide file itself in its place, or rename the folder.",
            )
        raise UnsupportedSlideError(
            folder,
            "the folder holds no .dcm files, so it is not a DICOM-WSI slide (a folder of slide"
            " files is not searched from here).",
            "point at a DICOM-WSI folder or a slide file (for a folder of slides, name its"
            " files, or the folder itself on the command line).",
        )
    series = _wsi_series(dcm)
    if len(series) > 1:
        described = "; ".join(
            f"series {i} ({_files_text(files)})" for i, files in enumerate(series.values(), 1)
        )
        raise UnsupportedSlideError(
            folder,
            f"the folder holds {len(series)} DICOM-WSI series, i.e. {len(series)} slides:"
            f" {described}. A folder is one slide (its name is the slide id).",
            "split them into one folder per series, each named as its slide id should be.",
        )
    if series:
        return next(iter(series.values()))[0]
    return dcm[0]  # no readable WSI instance: the readers say what is wrong with this one


def _wsi_series(files: list[Path]) -> dict[str, list[Path]]:
    """The VL WSI instances among ``files`` by SeriesInstanceUID, in file-name order.

    Only header elements are read. Unreadable or non-WSI files are left out.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"]
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = ds.get("SeriesInstanceUID")
        if ds.get("SOPClassUID") == WSI_SOP_CLASS and uid:
            series.setdefault(str(uid), []).append(f)
    return series


def _files_text(files: list[Path]) -> str:
    """``"2 files: a.dcm, b.dcm"``, or the first and last of many (UIDs are never quoted: they
    may embed dates and institution roots)."""
    names = [f.name for f in files]
    count = f"{len(names)} file{'s' if len(names) != 1 else ''}"
    if len(names) <= 3:
        return f"{count}: {', '.join(names)}"
    return f"{count}: {names[0]} … {names[-1]}"


#: Decoded tile (or strip) size past which OpenSlide is not the first choice: its tile cache
#: (32 MiB) would hold too few, so every region read decodes whole tiles again.
OPENSLIDE_TILE_BYTES = 8 << 20


def _candidates(info: FileInfo) -> list[BackendName]:
    if info.container == "tiff":
        order: list[BackendName] = []
        if info.cucim_safe and cucim_available():
            order.append("cucim")
        if info.max_segment_bytes > OPENSLIDE_TILE_BYTES:  # tifffile caches what it decodes
            order += ["tifffile", "openslide"]
        else:
            order += ["openslide", "tifffile"]
        if info.is_ome:  # Z planes and OME metadata are only seen through tifffile
            order = ["tifffile", "openslide"]
        return order
    if info.container == "dicom":
        return ["openslide"]
    if info.container in ("png", "jpeg", "bmp", "jp2"):
        return ["pillow"]
    return ["openslide"]


def open_slide(
    path: str | Path,
    *,
    backend: BackendChoice = "auto",
    mpp: float | tuple[float, float] | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a whole-slide image, DICOM-WSI folder or plain microscope image.

    Parameters
    ----------
    path : file, or folder of DICOM-WSI instances.
    backend : ``"auto"`` picks the fastest reader that handles the file (cuCIM, OpenSlide,
        tifffile, Pillow in that order); a name forces that reader.
    mpp : level-0 micrometres per pixel, overriding the file (recorded as ``source="override"``).
    require_mpp : raise :class:`MppError` when the file has no plausible resolution and none
        is given. Pass ``False`` only for tools that never use physical units (thumbnails).

    Raises
    ------
    UnsupportedSlideError, CorruptSlideError, MppError
        Each names the file and what to do.
    """
    given = Path(path)
    path = _resolve_path(given)
    info = inspect_file(path)
    if backend == "auto":
        order = _candidates(info)
    else:
        _check_forced(path, info, backend)
        order = [backend]
    errors: list[tuple[str, SlideError]] = []
    for name in order:
        try:
            be = BACKENDS[name](path)
        except ImportError:
            if backend != "auto":
                raise
            continue
        except SlideError as exc:
            errors.append((name, exc))
            continue
        except Exception as exc:
            problem = f"{name} failed ({reader_failure(exc)})."
            errors.append((name, CorruptSlideError(path, problem, "export it again.")))
            continue
        try:
            resolved, why_no_mpp = _resolve_mpp(path, be, mpp, require_mpp)
        except Exception:
            be.close()
            raise
        return Slide(
            path, be, resolved, info, fingerprint=source_fingerprint(given), mpp_problem=why_no_mpp
        )
    corrupt = [e for _, e in errors if isinstance(e, CorruptSlideError)]
    if corrupt:  # the first reader that recognised the format says best what is wrong
        raise corrupt[0]
    if len(order) == 1 and len(errors) == 1 and order[0] == "pillow":
        raise errors[0][1]  # the plain-image reader's refusal (too large) names its own fix
    reasons = "; ".join(f"{name}: {err.problem}" for name, err in errors)
    raise UnsupportedSlideError(
        path,
        f"no reader could open it (content looks like {info.container}; {reasons or 'none installed'}).",
        "check that it is a whole-slide image (SVS, NDPI, MRXS, SCN, BIF, DICOM-WSI, TIFF) or a"
        " PNG/JPEG microscope image.",
    )


def _check_forced(path: Path, info: FileInfo, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    if info.container not in BACKENDS[backend].containers:
        raise UnsupportedSlideError(
            path,
            f"the {backend} reader cannot read {info.container.upper()} files.",
            f"use backend='auto' (it picks {_candidates(info)[0]} for this file).",
        )
    if backend == "cucim" and not info.cucim_safe:
        raise UnsupportedSlideError(
            path,
            "cuCIM cannot safely decode this TIFF (not tiled, compressed with something other"
            " than JPEG/JPEG 2000/none, or JPEG tiles that disagree with the header); its native"
            " reader would crash.",
            "use backend='auto' or 'openslide'.",
        )


def _plausible_mpp(mpp: object) -> tuple[float, float] | None:
    """A level-0 µm/px (one number or an x, y pair) as a pair, or None if implausible."""
    lo, hi = PLAUSIBLE_MPP
    pair = tuple(mpp) if isinstance(mpp, tuple | list) else (mpp, mpp)
    ok = len(pair) == 2 and all(
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and lo <= v <= hi
        for v in pair
    )
    return (float(pair[0]), float(pair[1])) if ok else None


def check_mpp(mpp: object, *, param: str = "mpp") -> tuple[float, float]:
    """A user-given level-0 µm/px (one number or an x, y pair) as a pair; else ParameterError.

    Callers that take ``mpp=`` for many slides check it once with this, before any is read.
    """
    pair = _plausible_mpp(mpp)
    if pair is None:
        lo, hi = PLAUSIBLE_MPP
        raise ParameterError(
            f"{param}={mpp!r} is not a plausible level-0 resolution: it must be a finite number"
            f" from {lo:g} to {hi:g} µm/px. Fix: pass the scanner's real resolution (e.g."
            f" {param}=0.25 for a 40× scan, {param}=0.5 for 20×).",
            param=param,
        )
    return pair


def _resolve_mpp(
    path: Path, be: Backend, override: float | tuple[float, float] | None, require: bool
) -> tuple[Mpp | None, MppError | None]:
    """The level-0 pixel size, or (``require`` False) None with the error that says why."""
    lo, hi = PLAUSIBLE_MPP
    if override is not None:
        pair = _plausible_mpp(override)
        if pair is None:
            raise MppError(
                path,
                f"the given mpp {override!r} µm/px is outside the plausible {lo}–{hi} µm/px.",
                "pass the scanner's real resolution (e.g. mpp=0.25 at 40×, mpp=0.5 at 20×).",
                param="mpp",
            )
        return Mpp(*pair, "override", "given by the user"), None
    found = be.file_mpp
    detail = _mpp_detail(be)
    if found is None:
        # a reader that found a resolution field it cannot parse says which (never its value)
        unreadable = getattr(be, "file_mpp_problem", None)
        missing = MppError(
            path,
            f"{unreadable}." if unreadable else "the file records no physical pixel size (µm/px).",
            "pass it explicitly: mpp=0.25 (40× scan) or mpp=0.5 (20×); ask the scanner operator if unsure.",
            param="mpp",
        )
        if not require:
            return None, missing
        raise missing
    mx, my = found
    if not all(math.isfinite(v) and lo <= v <= hi for v in (mx, my)):
        implausible = MppError(
            path,
            f"the file's resolution ({detail}) reads as {mx:.6g}×{my:.6g} µm/px,"
            f" outside the plausible {lo}–{hi} µm/px, so its metadata is wrong.",
            "pass the real value explicitly: mpp=0.25 (40×) or mpp=0.5 (20×).",
            param="mpp",
        )
        if not require:
            return None, implausible
        raise implausible
    if not math.isclose(mx, my, rel_tol=0.05):
        raise CorruptSlideError(
            path,
            f"pixels are not square ({mx:.4g}×{my:.4g} µm/px).",
            "pass mpp=<µm/px> to override.",
            param="mpp",
        )
    return Mpp(mx, my, "file", detail), None


def _mpp_detail(be: Backend) -> str:
    """Where the reader found the resolution, as one of :data:`MPP_DETAILS` (or ``"file"``)."""
    detail = be.file_mpp_detail
    return detail if detail in MPP_DETAILS else "file"
