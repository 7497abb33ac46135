"""Ultrasound frames with a physical pixel spacing, and heatmaps mapped onto them.

:func:`read_ultrasound` reads one frame of a DICOM ultrasound (pydicom) or a PNG/JPEG (Pillow)
as RGB with its pixel spacing in millimetres. The spacing comes from, in order: an explicit
``spacing_mm`` (the CLI's ``--spacing-mm``), the chosen ``SequenceOfUltrasoundRegions`` item
(``PhysicalDeltaX/Y`` in cm when ``PhysicalUnitsX/YDirection`` is 3), or the DICOM
``PixelSpacing``. Nothing is assumed: a file without any of them is an error, as is a cine loop
without a chosen frame or a file with several regions without a chosen region.

:func:`to_ultrasound` resamples a :class:`~spatial._heatmap.Heatmap` (slide level-0 grid) onto
the ultrasound pixel grid through a registration (``slide_um`` -> ``us_mm``) by reverse mapping:
every ultrasound pixel centre goes back to the slide and reads the heatmap there.

Ultrasound coordinates
----------------------
``us_px`` are continuous pixel coordinates ``(x, y)`` = (column, row) with the centre of the
image's top-left pixel at ``(0, 0)``; ``us_mm = us_px * spacing_mm`` (same origin, whatever the
chosen region). The OME-Zarr outputs follow NGFF, which places pixel centres at
``index * scale + translation``: scale ``spacing_mm`` and translation 0 at full resolution. A
QuPath-style frame, with the top-left *corner* of the image at 0, is shifted by half a pixel:
``mm_corner = mm + spacing_mm / 2``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._checks import MAX_SPACING_MM, MIN_SPACING_MM, check_parameters
from ._heatmap import (
    Heatmap,
    _atomic,
    _write_ngff_grid,
    write_overlay_png,
)

SpacingSource = Literal["dicom-region", "dicom-pixel-spacing", "override"]

#: DICOM PhysicalUnitsX/YDirection code for centimetres (PS3.3 C.8.5.5.1.15).
_UNITS_CM = 3
_UNIT_NAMES = {
    0: "none",
    1: "percent",
    2: "dB",
    3: "cm",
    4: "seconds",
    5: "hertz",
    6: "dB/seconds",
    7: "cm/sec",
    8: "cm2",
    9: "cm2/sec",
    10: "cm3",
    11: "cm3/sec",
    12: "degrees",
}
_SPATIAL_FORMATS = {0: "none", 1: "2D", 2: "M-mode", 3: "spectral", 4: "waveform", 5: "graphics"}


class UltrasoundError(ValueError):
    """An ultrasound file that cannot be read as asked; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# The frame
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ultrasound:
    """One ultrasound frame with its physical pixel spacing.

    Attributes
    ----------
    image : (H, W, 3) uint8 RGB ndarray, the chosen frame (greyscale and palette converted).
    spacing_mm : (x, y) millimetres per pixel.
    spacing_source : where the spacing came from: ``"dicom-region"`` (SequenceOfUltrasoundRegions),
        ``"dicom-pixel-spacing"`` (PixelSpacing) or ``"override"`` (given by the user).
    region : the chosen ultrasound region (``index``, bounds ``x0, y0, x1, y1`` in pixels,
        inclusive as in DICOM, ``spatial_format``, units, spacing) or None.
    frame : index of the frame in the file (0 for a single image).
    n_frames : number of frames in the file.
    source : path of the file read.
    """

    image: NDArray[np.uint8]
    spacing_mm: tuple[float, float]
    spacing_source: SpacingSource
    region: dict[str, Any] | None
    frame: int
    n_frames: int
    source: str

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the frame in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def px_to_mm(self, points: ArrayLike) -> NDArray[np.float64]:
        """``us_px`` -> ``us_mm``: (N, 2) or (2,) pixel ``(x, y)`` (centre-based) to millimetres."""
        return np.asarray(points, dtype=np.float64) * np.asarray(self.spacing_mm)

    def mm_to_px(self, points: ArrayLike) -> NDArray[np.float64]:
        """``us_mm`` -> ``us_px``: (N, 2) or (2,) millimetres to continuous pixel ``(x, y)``."""
        return np.asarray(points, dtype=np.float64) / np.asarray(self.spacing_mm)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (source, frame, spacing and where it came from, region, size)."""
        return {
            "source": self.source,
            "frame": self.frame,
            "n_frames": self.n_frames,
            "size_px": list(self.size_px),
            "spacing_mm_xy": list(self.spacing_mm),
            "spacing_source": self.spacing_source,
            "region": self.region,
            "pixel_convention": "us_mm = us_px * spacing_mm; pixel (0, 0) centre at 0 mm",
        }


def _check_spacing(value: float | Sequence[float], what: str) -> tuple[float, float]:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)):
        raise UltrasoundError(
            f"{what}: spacing must be one number or an (x, y) pair in mm/px, got {value!r}."
        )
    if np.any(arr < MIN_SPACING_MM) or np.any(arr > MAX_SPACING_MM):
        raise UltrasoundError(
            f"{what}: pixel spacing {arr[0]:g} x {arr[1]:g} mm/px is outside the plausible "
            f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm/px for ultrasound; check the unit (cm vs "
            "mm vs µm) and pass spacing_mm= in millimetres per pixel."
        )
    return float(arr[0]), float(arr[1])


def _choose_frame(path: Path, n_frames: int, frame: int | None) -> int:
    if frame is None:
        if n_frames > 1:
            raise UltrasoundError(
                f"{path} is a cine loop of {n_frames} frames; choose one with frame=N "
                f"(0 <= N <= {n_frames - 1}); no frame is picked for you."
            )
        return 0
    if not 0 <= frame < n_frames:
        raise UltrasoundError(
            f"{path} has {n_frames} frame(s); frame={frame} is out of range "
            f"(0 <= N <= {n_frames - 1})."
        )
    return int(frame)


def read_ultrasound(
    path: str | Path,
    *,
    frame: int | None = None,
    region: int | None = None,
    spacing_mm: float | tuple[float, float] | None = None,
) -> Ultrasound:
    """Read one ultrasound frame and its pixel spacing.

    Parameters
    ----------
    path : DICOM file (any ultrasound SOP class pydicom decodes) or a PNG/JPEG/TIFF image.
    frame : frame index; required for multi-frame (cine) files, else 0 or None.
    region : index into ``SequenceOfUltrasoundRegions``; required when the file has several
        regions (the spacing of one region does not hold in another). Regions without spatial
        units in cm (spectral Doppler, M-mode time axes) cannot give a spacing.
    spacing_mm : ``(x, y)`` mm/px, or one number for both; overrides the file
        (``spacing_source == "override"``), required for PNG/JPEG and uncalibrated DICOM.

    Returns
    -------
    Ultrasound

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    UltrasoundError (ValueError)
        Not a readable image; no spacing anywhere; a multi-frame file without ``frame`` or a
        frame out of range; several regions without ``region``; a region without spatial units;
        a spacing outside ``MIN_SPACING_MM``-``MAX_SPACING_MM``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ultrasound file {p} does not exist.")
    override = None if spacing_mm is None else _check_spacing(spacing_mm, f"{p}: spacing_mm=")

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(p)
    except InvalidDicomError:
        return _read_image(p, frame=frame, region=region, override=override)
    except (OSError, ValueError, EOFError) as err:
        raise UltrasoundError(f"{p} looks like DICOM but cannot be parsed: {err}") from err
    return _read_dicom(p, ds, frame=frame, region=region, override=override)


def _read_image(
    path: Path, *, frame: int | None, region: int | None, override: tuple[float, float] | None
) -> Ultrasound:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1))
            index = _choose_frame(path, n_frames, frame)
            img.seek(index)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UltrasoundError(
            f"{path} is neither a DICOM file nor an image Pillow can read (PNG, JPEG, TIFF); "
            f"check the file ({err})."
        ) from err
    if region is not None:
        raise UltrasoundError(
            f"{path} is a plain image with no ultrasound regions; drop region={region}."
        )
    if override is None:
        raise UltrasoundError(
            f"{path} is a plain image without physical calibration; pass spacing_mm= "
            "(millimetres per pixel, one value or x,y), e.g. read off the depth scale."
        )
    return Ultrasound(
        image=np.ascontiguousarray(rgb),
        spacing_mm=override,
        spacing_source="override",
        region=None,
        frame=index,
        n_frames=n_frames,
        source=str(Path(path).absolute()),  # resolves from any working directory
    )


def _regions(ds: Any) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or []):
        ux, uy = item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection")
        dx, dy = item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY")
        spatial = ux == _UNITS_CM and uy == _UNITS_CM and dx is not None and dy is not None
        fmt = item.get("RegionSpatialFormat")
        out.append(
            {
                "index": i,
                "x0": _int_or_none(item.get("RegionLocationMinX0")),
                "y0": _int_or_none(item.get("RegionLocationMinY0")),
                "x1": _int_or_none(item.get("RegionLocationMaxX1")),
                "y1": _int_or_none(item.get("RegionLocationMaxY1")),
                "spatial_format": _SPATIAL_FORMATS.get(fmt, str(fmt)),
                "units_xy": [_UNIT_NAMES.get(ux, str(ux)), _UNIT_NAMES.get(uy, str(uy))],
                "physical_delta_xy": [_float_or_none(dx), _float_or_none(dy)],
                # cm -> mm; None when the region's axes are not both lengths.
                "spacing_mm_xy": [float(dx) * 10.0, float(dy) * 10.0] if spatial else None,
            }
        )
    return out


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _region_line(r: dict[str, Any]) -> str:
    if r["spacing_mm_xy"] is None:
        what = f"no spatial calibration (units {r['units_xy'][0]} x {r['units_xy'][1]})"
    else:
        what = f"{r['spacing_mm_xy'][0]:.4g} x {r['spacing_mm_xy'][1]:.4g} mm/px"
    return (
        f"  region {r['index']}: {r['spatial_format']}, x {r['x0']}-{r['x1']}, "
        f"y {r['y0']}-{r['y1']} px, {what}"
    )


def _read_dicom(
    path: Path,
    ds: Any,
    *,
    frame: int | None,
    region: int | None,
    override: tuple[float, float] | None,
) -> Ultrasound:
    if "PixelData" not in ds:
        raise UltrasoundError(f"{path} is a DICOM file without pixel data (not an image).")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = _choose_frame(path, n_frames, frame)

    regions = _regions(ds)
    chosen: dict[str, Any] | None = None
    if region is not None:
        if not 0 <= region < len(regions):
            listed = "\n".join(_region_line(r) for r in regions) or "  (none)"
            raise UltrasoundError(
                f"{path} has {len(regions)} ultrasound region(s); region={region} is out of "
                f"range:\n{listed}"
            )
        chosen = regions[region]
        if chosen["spacing_mm_xy"] is None and override is None:
            usable = [r["index"] for r in regions if r["spacing_mm_xy"] is not None]
            raise UltrasoundError(
                f"{path}: region {region} has no spatial calibration:\n{_region_line(chosen)}\n"
                f"choose a region with cm units (usable: {usable or 'none'}) or pass spacing_mm=."
            )
    elif len(regions) > 1 and override is None:
        # Never a silent guess: even one spatial region beside a Doppler strip is named by the
        # user, so a wrong choice is theirs to see in the command line.
        usable = [r["index"] for r in regions if r["spacing_mm_xy"] is not None]
        hint = f" (usable: {', '.join(map(str, usable))})" if usable else ""
        raise UltrasoundError(
            f"{path} has {len(regions)} ultrasound regions with different calibrations:\n"
            + "\n".join(_region_line(r) for r in regions)
            + f"\npass region=N to choose the one your landmarks and tissue lie in{hint}."
        )
    elif len(regions) == 1:
        chosen = regions[0]

    source: SpacingSource
    if override is not None:
        spacing, source = override, "override"
    elif chosen is not None and chosen["spacing_mm_xy"] is not None:
        what = f"{path}: region {chosen['index']}"
        spacing, source = _check_spacing(chosen["spacing_mm_xy"], what), "dicom-region"
    elif ds.get("PixelSpacing") is not None:
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # DICOM order: row, column
        spacing, source = (
            _check_spacing((col_mm, row_mm), f"{path}: PixelSpacing"),
            ("dicom-pixel-spacing"),
        )
    else:
        raise UltrasoundError(
            f"{path} has no physical calibration (no SequenceOfUltrasoundRegions with cm units, "
            "no PixelSpacing); pass spacing_mm= (millimetres per pixel, one value or x,y), "
            "e.g. read off the image's depth scale."
        )

    rgb = _decode_rgb(path, ds, index if n_frames > 1 else None)
    h, w = rgb.shape[:2]
    if chosen is not None:
        chosen = dict(chosen)
        inside = all(v is not None for v in (chosen["x0"], chosen["y0"], chosen["x1"]))
        inside = inside and chosen["x1"] < w and chosen["y1"] is not None and chosen["y1"] < h
        chosen["within_image"] = bool(inside)
        if not inside and source == "dicom-region":
            warnings.warn(
                f"{path}: region {chosen['index']} (x {chosen['x0']}-{chosen['x1']}, y "
                f"{chosen['y0']}-{chosen['y1']}) extends past the {w} x {h} image; if the image "
                "was resized after acquisition its spacing is not the region's "
                f"{spacing[0]:.4g} mm/px; check a known distance or pass spacing_mm=.",
                UserWarning,
                stacklevel=3,
            )
    return Ultrasound(
        image=rgb,
        spacing_mm=spacing,
        spacing_source=source,
        region=chosen,
        frame=index,
        n_frames=n_frames,
        source=str(Path(path).absolute()),  # resolves from any working directory
    )


def _decode_rgb(path: Path, ds: Any, index: int | None) -> NDArray[np.uint8]:
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        # YBR (JPEG) is converted to RGB by pydicom; only the chosen frame is decoded.
        arr = np.asarray(pixel_array(ds, index=index))
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as err:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise UltrasoundError(
            f"{path}: pydicom cannot decode the pixel data (transfer syntax {syntax}): {err}. "
            "For JPEG-LS / JPEG 2000 install pylibjpeg with pylibjpeg-libjpeg/-openjpeg."
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds))
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return (rgb >> max(0, bits - 8)).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 3:
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        return _to_uint8(arr)
    if arr.ndim != 2:
        raise UltrasoundError(
            f"{path}: unsupported pixel layout {arr.shape} ({photometric}); expected one "
            "greyscale, palette or RGB frame."
        )
    grey = _to_uint8(arr)
    if photometric == "MONOCHROME1":  # high values are dark
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


def _to_uint8(arr: NDArray[Any]) -> NDArray[np.uint8]:
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.rint(scaled).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Mapping a heatmap
# --------------------------------------------------------------------------------------------


class _PointMap(Protocol):
    def __call__(self, points: ArrayLike) -> NDArray[np.float64]: ...


class _Transform(Protocol):
    def __call__(self, points: ArrayLike) -> NDArray[np.float64]: ...

    def inverse(self) -> _PointMap: ...


class _Registration(Protocol):
    @property
    def transform(self) -> _Transform: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, eq=False)
class MappedHeatmap:
    """A heatmap resampled onto an ultrasound frame's pixel grid.

    Attributes
    ----------
    grid : (H, W) float32 ndarray, one value per ultrasound pixel; NaN where the pixel maps
        outside the heatmap or into an empty cell.
    spacing_mm : (x, y) mm per pixel of the ultrasound frame.
    name : the heatmap's name (layer name, file stem).
    value_range : (min, max) of the source heatmap's finite values (the colour range used).
    bin_um : (x, y) source heatmap cell size in micrometres.
    unit : the values' unit (e.g. :data:`DENSITY_UNIT`, ``"cells/mm²"``) or None.
    paths : files written (``ome_zarr``, ``png``, ``registration_json``); empty if none.
    """

    grid: NDArray[np.float32]
    spacing_mm: tuple[float, float]
    name: str
    value_range: tuple[float, float]
    bin_um: tuple[float, float]
    unit: str | None = None
    paths: Mapping[str, Path] = field(default_factory=dict)

    def peak_px(self) -> tuple[int, int]:
        """``(x, y)`` ultrasound pixel of the largest finite value."""
        if not np.isfinite(self.grid).any():
            raise ValueError(f"heatmap {self.name!r} maps entirely outside the ultrasound frame.")
        row, col = np.unravel_index(int(np.nanargmax(self.grid)), self.grid.shape)
        return int(col), int(row)


def sample_heatmap(
    heatmap: Heatmap, slide_um: ArrayLike, *, order: Literal[0, 1] = 1
) -> NDArray[np.float32]:
    """Heatmap values at slide positions in micrometres.

    Parameters
    ----------
    heatmap : grid over level-0 pixels (``slide_um = level0_px * mpp``).
    slide_um : (N, 2) float ``(x, y)`` micrometres from the slide's top-left corner.
    order : 0 — the value of the cell holding the point (as :meth:`Heatmap.value_at`);
        1 — bilinear between cell centres, NaN-aware (empty neighbours are left out and the
        weights renormalised). Either way a point is NaN when the cell holding it is empty or it
        falls off the grid, so the footprint of the data is the same for both orders.

    Returns
    -------
    (N,) float32 ndarray.
    """
    from scipy.ndimage import map_coordinates

    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest cell) or 1 (bilinear), got {order!r}.")
    um = np.asarray(slide_um, dtype=np.float64).reshape(-1, 2)
    (mx, my), (ox, oy) = heatmap.mpp, heatmap.origin_level0
    cx, cy = heatmap.cell_size_level0
    # Fractional cell index with cell centres at integers.
    fx = (um[:, 0] / mx - ox) / cx - 0.5
    fy = (um[:, 1] / my - oy) / cy - 0.5
    h, w = heatmap.shape
    grid = heatmap.grid
    valid = np.isfinite(grid)
    with np.errstate(invalid="ignore"):
        col = np.floor(fx + 0.5)
        row = np.floor(fy + 0.5)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.full(um.shape[0], np.nan, np.float32)
    ri, ci = row[inside].astype(np.intp), col[inside].astype(np.intp)
    keep = valid[ri, ci]
    hit = np.flatnonzero(inside)[keep]
    if order == 0:
        out[hit] = grid[ri[keep], ci[keep]]
        return out
    coords = np.stack([fy[hit], fx[hit]])
    filled = np.where(valid, grid, 0.0).astype(np.float64)
    # mode="nearest" holds edge cells flat over their outer half, like order 0 does.
    total = map_coordinates(filled, coords, order=1, mode="nearest")
    weight = map_coordinates(valid.astype(np.float64), coords, order=1, mode="nearest")
    out[hit] = (total / weight).astype(np.float32)  # weight > 0: the nearest cell is valid
    return out


def to_ultrasound(
    heatmap: Heatmap,
    registration: _Registration,
    ultrasound: Ultrasound,
    out_dir: str | Path | None = None,
    *,
    name: str = "heatmap",
    order: Literal[0, 1] = 1,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    unit: str | None = None,
) -> MappedHeatmap:
    """Resample a slide heatmap onto the ultrasound pixel grid, and optionally write it.

    Reverse mapping: each ultrasound pixel centre ``(x, y)`` -> ``us_mm`` (``* spacing_mm``) ->
    ``slide_um`` (``registration.transform.inverse()``) -> :func:`sample_heatmap`.

    Parameters
    ----------
    heatmap : attention (``attention_heatmap``) or density map; grid over level-0 pixels.
    registration : object with ``transform`` (``slide_um`` -> ``us_mm``, with ``inverse()``
        mapping (N, 2) float64 arrays back) and ``to_dict()`` (as ``spatial.fit_landmarks``
        returns).
    ultrasound : from :func:`read_ultrasound`.
    out_dir : if given, write into it (atomically, replacing files of the same name):
        ``<name>.ome.zarr`` (NGFF 0.5, axes y, x in millimetres, see the module docstring),
        ``<name>_us.png`` (the frame with the heatmap over it and a colour bar) and
        ``registration.json`` (``registration.to_dict()`` plus the ultrasound and, per mapped
        heatmap name, the mapping metadata).
    name : heatmap name (file stem, layer name, colour-bar label).
    order : 1 bilinear (NaN-aware) or 0 nearest cell; see :func:`sample_heatmap`.
    alpha : overlay opacity in [0, 1].
    vmin, vmax : colour range; default the source heatmap's finite min and max.
    unit : the values' unit (e.g. :data:`DENSITY_UNIT`, ``"cells/mm²"``), recorded and shown on
        the colour bar; default ``heatmap.value_unit``.

    Returns
    -------
    MappedHeatmap
    """
    _check_registration(registration)
    check_parameters(alpha=alpha)
    unit = unit if unit is not None else heatmap.value_unit
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name {name!r} must be a plain file stem (no slashes, no leading dot).")
    w, h = ultrasound.size_px
    dx, dy = ultrasound.spacing_mm
    us_mm = np.empty((h * w, 2), np.float64)
    us_mm[:, 0] = np.tile(np.arange(w, dtype=np.float64) * dx, h)
    us_mm[:, 1] = np.repeat(np.arange(h, dtype=np.float64) * dy, w)
    slide_um = np.asarray(registration.transform.inverse()(us_mm), dtype=np.float64)
    if slide_um.shape != us_mm.shape:
        raise ValueError(
            f"registration.transform.inverse() returned shape {slide_um.shape} for "
            f"{us_mm.shape} points; it must map (N, 2) us_mm to (N, 2) slide_um."
        )
    grid = sample_heatmap(heatmap, slide_um, order=order).reshape(h, w)

    finite = heatmap.grid[np.isfinite(heatmap.grid)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    mapped = MappedHeatmap(
        grid=grid,
        spacing_mm=ultrasound.spacing_mm,
        name=name,
        value_range=(lo, hi),
        bin_um=heatmap.cell_size_um,
        unit=unit,
    )
    if out_dir is None:
        return mapped
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = _mapping_meta(heatmap, registration, mapped, order)
    paths = {
        "ome_zarr": write_mapped_ome_zarr(
            mapped, out / f"{name}.ome.zarr", ultrasound=ultrasound, extra=meta
        ),
        "png": write_mapped_png(mapped, ultrasound, out / f"{name}_us.png", alpha=alpha),
        "registration_json": _write_registration_json(
            out / "registration.json", registration, ultrasound, name, meta
        ),
    }
    return MappedHeatmap(
        grid=grid,
        spacing_mm=mapped.spacing_mm,
        name=name,
        value_range=mapped.value_range,
        bin_um=mapped.bin_um,
        unit=unit,
        paths=paths,
    )


def _check_registration(registration: Any) -> None:
    transform = getattr(registration, "transform", None)
    if transform is None or not callable(getattr(transform, "inverse", None)):
        raise TypeError(
            "registration must have a .transform (slide_um -> us_mm) with .inverse(), as "
            f"spatial.fit_landmarks returns; got {type(registration).__name__}."
        )
    src, dst = getattr(transform, "source", "slide_um"), getattr(transform, "target", "us_mm")
    if (src, dst) != ("slide_um", "us_mm"):
        raise ValueError(
            f"registration.transform maps {src!r} -> {dst!r}; to_ultrasound needs "
            "'slide_um' -> 'us_mm' (fit landmarks with pathology in µm and ultrasound in mm)."
        )


def _mapping_meta(
    heatmap: Heatmap, registration: Any, mapped: MappedHeatmap, order: int
) -> dict[str, Any]:
    report = getattr(registration, "report", None)
    return {
        "heatmap": mapped.name,
        "value_unit": mapped.unit,
        "bin_um_xy": list(mapped.bin_um),
        "value_range": list(mapped.value_range),
        "order": "bilinear" if order == 1 else "nearest",
        "source_grid": {
            "origin_level0_xy": list(heatmap.origin_level0),
            "cell_size_level0_xy": list(heatmap.cell_size_level0),
            "mpp_xy": list(heatmap.mpp),
            "level0_size": list(heatmap.level0_size),
            "shape_hw": list(heatmap.shape),
        },
        "registration_model": getattr(registration, "model", None),
        "registration_report": report if isinstance(report, dict) else None,
    }


def mapped_ngff_transforms(spacing_mm: Sequence[float], level: int = 0) -> list[dict[str, Any]]:
    """NGFF ``coordinateTransformations`` (y then x, mm) of pyramid level ``level``.

    A level-``k`` pixel averages ``2**k`` full-resolution pixels per axis; its centre is the
    mean of their centres, ``(2**k - 1) / 2 * spacing`` from pixel (0, 0)'s centre.
    """
    f = 2**level
    dx, dy = float(spacing_mm[0]), float(spacing_mm[1])
    return [
        {"type": "scale", "scale": [dy * f, dx * f]},
        {"type": "translation", "translation": [(f - 1) / 2 * dy, (f - 1) / 2 * dx]},
    ]


def write_mapped_ome_zarr(
    mapped: MappedHeatmap,
    path: str | Path,
    *,
    ultrasound: Ultrasound | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a mapped heatmap as an NGFF 0.5 OME-Zarr in millimetres, atomically.

    Layout as :func:`spatial._heatmap.write_ome_zarr` (``s0`` full resolution, NaN-aware 2 x 2
    mean pyramid, float32 with NaN fill), axes ``y, x`` in ``millimeter``, transforms from
    :func:`mapped_ngff_transforms`. The ``oncotrace`` attrs hold the ultrasound description and
    ``extra`` (mapping metadata).

    Returns
    -------
    Path of the finished store.
    """
    return _write_ngff_grid(
        path,
        mapped.grid,
        lambda k: mapped_ngff_transforms(mapped.spacing_mm, k),
        unit="millimeter",
        name=mapped.name,
        attrs={
            "kind": "heatmap on ultrasound",
            "name": mapped.name,
            "empty_cells": "NaN",
            "spacing_mm_xy": list(mapped.spacing_mm),
            "value_range": list(mapped.value_range),
            "pixel_convention": "us_mm = us_px * spacing_mm with pixel (0, 0)'s centre at 0 "
            "(NGFF pixel centres); the image's top-left corner is at -spacing_mm / 2",
            "ultrasound": None if ultrasound is None else ultrasound.describe(),
            **(dict(extra) if extra else {}),
        },
    )


def _pixel_heatmap(mapped: MappedHeatmap) -> Heatmap:
    """The mapped grid as a :class:`Heatmap` with one cell per ultrasound pixel.

    Lets the slide overlay renderer draw it on the frame 1:1 (downsample 1: pixel ``i``'s centre
    ``i + 0.5`` falls in cell ``i``).
    """
    h, w = mapped.grid.shape
    return Heatmap(
        grid=mapped.grid,
        origin_level0=(0.0, 0.0),
        cell_size_level0=(1.0, 1.0),
        mpp=(mapped.spacing_mm[0] * 1000.0, mapped.spacing_mm[1] * 1000.0),
        level0_size=(w, h),
        tile_size_level0=(1.0, 1.0),
        n_tiles=int(np.isfinite(mapped.grid).sum()),
    )


def write_mapped_png(
    mapped: MappedHeatmap,
    ultrasound: Ultrasound,
    path: str | Path,
    *,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write the ultrasound frame with the mapped heatmap over it and a colour bar (PNG).

    The frame is drawn 1:1 at the left edge below the title (it is the full resolution: never
    resampled, whatever its size), NaN pixels show it unchanged, colours span
    ``mapped.value_range`` so they match the slide overlay of the same heatmap; the colour bar
    runs along the frame's longer side (see :func:`write_overlay_png`).
    """
    if mapped.grid.shape != ultrasound.image.shape[:2]:
        raise ValueError(
            f"mapped grid {mapped.grid.shape} does not match the {ultrasound.image.shape[:2]} "
            f"frame of {ultrasound.source}; map the heatmap onto this frame first."
        )
    lo, hi = mapped.value_range
    return write_overlay_png(
        _pixel_heatmap(mapped),
        ultrasound.image,
        1.0,
        path,
        alpha=alpha,
        title=title if title is not None else f"{mapped.name} on ultrasound",
        vmin=lo,
        vmax=hi,
        label=mapped.name if mapped.unit is None else f"{mapped.name} ({mapped.unit})",
        max_side=None,
    )


def _write_registration_json(
    path: Path,
    registration: Any,
    ultrasound: Ultrasound,
    name: str,
    meta: dict[str, Any],
) -> Path:
    doc: dict[str, Any] = dict(registration.to_dict())
    heatmaps: dict[str, Any] = {}
    if path.is_file():
        # Several heatmaps mapped with the same registration share one registration.json.
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        same = {k: v for k, v in old.items() if k not in ("ultrasound", "heatmaps")}
        if same == json.loads(json.dumps(doc)) and isinstance(old.get("heatmaps"), dict):
            heatmaps = dict(old["heatmaps"])
    entry = {k: v for k, v in meta.items() if k not in ("registration_model", "heatmap")}
    entry["files"] = {"ome_zarr": f"{name}.ome.zarr", "png": f"{name}_us.png"}
    heatmaps[name] = entry
    doc["ultrasound"] = ultrasound.describe()
    doc["heatmaps"] = heatmaps
    return _write_json_atomic(path, doc)


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> Path:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# Landmarks on the frame
# --------------------------------------------------------------------------------------------


def landmarks_overlay_png(
    ultrasound: Ultrasound,
    points_px: ArrayLike,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    colour: tuple[int, int, int] = (255, 255, 0),
) -> Path:
    """Write the frame with landmark crosses (and labels) as a PNG, atomically.

    Parameters
    ----------
    ultrasound : the frame.
    points_px : (N, 2) ``us_px`` ``(x, y)`` (e.g. ``ultrasound.mm_to_px(landmarks.ultrasound_mm)``).
    path : destination PNG.
    labels : N texts drawn beside the crosses (landmark ids), or None.
    colour : RGB of the marks.
    """
    from PIL import Image, ImageDraw

    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise ValueError(f"points_px must be a finite (N, 2) array of (x, y), got {pts.shape}.")
    if labels is not None and len(labels) != len(pts):
        raise ValueError(f"{len(labels)} labels for {len(pts)} points: pass one per point.")
    img = Image.fromarray(ultrasound.image)
    draw = ImageDraw.Draw(img)
    arm = max(3, round(min(ultrasound.size_px) / 80))
    for i, (x, y) in enumerate(pts):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=1)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=1)
        if labels is not None:
            draw.text((x + arm + 2, y - arm - 2), str(labels[i]), fill=colour)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(final) as tmp:
        img.save(tmp, format="PNG")
    return final


__all__ = [
    "MappedHeatmap",
    "Ultrasound",
    "UltrasoundError",
    "landmarks_overlay_png",
    "mapped_ngff_transforms",
    "read_ultrasound",
    "sample_heatmap",
    "to_ultrasound",
    "write_mapped_ome_zarr",
    "write_mapped_png",
]
