"""Immune cells: classical detection on H&E or IHC, cell tables, and density maps.

``detect_immune_cells`` walks the tissue tile by tile at ~0.5 µm/px: colour deconvolution into
hematoxylin / eosin / DAB optical densities, nuclei from a smoothed stain signal (threshold,
distance-transform seeds, watershed), region properties, and a per-stain rule:

* H&E: a lymphocyte is a small (5–8.5 µm equivalent diameter), round, densely hematoxylin-stained
  nucleus; everything else is ``"other"``.
* IHC (DAB): cells are found in hematoxylin OR DAB signal (DAB+ cells may hide their nucleus);
  a cell is ``"dab-positive"`` when the mean DAB OD over its nucleus plus a thin ring (CD3/CD8
  stain the membrane) exceeds a threshold.

Tiles overlap by a halo wider than a nucleus, and a detection is kept only by the tile whose
core holds its centroid, so tile borders neither duplicate nor drop cells. Only the current tile
is in memory; the table grows.

``density_map`` bins a cell table on a micrometre grid into :class:`~spatial._heatmap.Heatmap`
objects (cells/mm², Saltz TIL-positive bins, positive fraction), NaN outside tissue, so the
heatmap writers and the ultrasound mapping take them unchanged. ``load_til_grid`` reads an
external u24 lymphocyte prediction grid into the same structure.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from oncotrace.wsi import ParameterError, Registry
from scipy import ndimage as ndi

from ._checks import MAX_GRID_CELLS, check_density_options, check_parameters
from ._heatmap import Heatmap, _atomic

if TYPE_CHECKING:
    from oncotrace.wsi import Slide

Stain = Literal["he", "ihc-dab"]
GeometryKind = Literal["polygon", "point"]

#: The unit of cell densities in every label, colour bar and ``value_unit`` attr OncoTrace
#: writes (UTF-8 like the rest of its JSON and Zarr attrs; there is no second, ASCII spelling).
DENSITY_UNIT = "cells/mm²"
#: Units of the other maps of :class:`DensityMaps`.
PROBABILITY_UNIT = "probability"
FRACTION_UNIT = "fraction of cells"
TIL_POSITIVE_UNIT = "1 = TIL-positive bin, 0 = not"

#: (positive class, negative class) per stain.
CLASSES: dict[str, tuple[str, str]] = {
    "he": ("lymphocyte", "other"),
    "ihc-dab": ("dab-positive", "dab-negative"),
}
#: QuPath-like class colours (QuPath's defaults for Immune cells / Positive / Negative).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "lymphocyte": (160, 90, 160),
    "other": (120, 120, 120),
    "dab-positive": (200, 50, 50),
    "dab-negative": (112, 112, 225),
}
#: Columns of a cell table, in CSV order.
COLUMNS = (
    "x",
    "y",
    "x_um",
    "y_um",
    "cls",
    "area_um2",
    "hematoxylin_od",
    "dab_od",
    "eccentricity",
)
_FLOAT_COLUMNS = tuple(c for c in COLUMNS if c != "cls")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImmuneConfig:
    """Parameters of the classical detector; sizes in micrometres so they scale with mpp.

    Attributes
    ----------
    work_mpp : resolution the detector works at (µm/px); slides within 10 % are read as is.
    smooth_um : Gaussian smoothing of the stain signal before thresholding.
    min_signal_od : floor on the nucleus threshold (Otsu on the tile, never below this), OD.
    min_area_um2 : objects smaller than this are noise, not nuclei.
    max_area_um2 : objects larger than this are clumps or folds, dropped.
    seed_distance_um : minimum distance between two nucleus seeds (splits touching nuclei).
    lymphocyte_diameter_um : (min, max) equivalent diameter of a lymphocyte nucleus.
    max_eccentricity : roundness bound for lymphocytes (0 = circle).
    lymphocyte_od_ratio : a lymphocyte's mean hematoxylin OD must be at least this multiple
        of the tile's nucleus threshold (dense chromatin relative to the tile's staining).
    lymphocyte_min_od : and at least this absolute hematoxylin OD.
    dab_ring_um : width of the ring around the nucleus where DAB is also measured (IHC).
    dab_positive_od : mean DAB OD over nucleus + ring above which a cell is DAB-positive
        (QuPath's positive-cell detection uses a comparable 0.2 default on the cell).
    halo_um : overlap between tiles; must exceed one nucleus diameter.
    """

    work_mpp: float = 0.5
    smooth_um: float = 0.75
    min_signal_od: float = 0.2
    min_area_um2: float = 12.0
    max_area_um2: float = 400.0
    seed_distance_um: float = 2.5
    lymphocyte_diameter_um: tuple[float, float] = (4.5, 8.5)
    max_eccentricity: float = 0.8
    lymphocyte_od_ratio: float = 1.8
    lymphocyte_min_od: float = 0.45
    dab_ring_um: float = 1.5
    dab_positive_od: float = 0.15
    halo_um: float = 16.0

    def __post_init__(self) -> None:
        lo, hi = self.lymphocyte_diameter_um
        if not 0 < lo < hi:
            raise ValueError(
                f"lymphocyte_diameter_um must be (min, max) with 0 < min < max, got "
                f"{self.lymphocyte_diameter_um!r}."
            )
        if self.halo_um < hi:
            raise ValueError(
                f"halo_um={self.halo_um} is smaller than a lymphocyte ({hi} µm): cells on tile "
                "borders would be cut; use a halo of at least one nucleus diameter."
            )
        if self.work_mpp <= 0:
            raise ValueError(f"work_mpp must be positive, got {self.work_mpp}.")


# --------------------------------------------------------------------------------------------
# Cell table
# --------------------------------------------------------------------------------------------


def _encode_mask(mask: NDArray[np.bool_]) -> str:
    packed = np.packbits(mask.astype(bool), axis=None)
    return base64.b64encode(zlib.compress(packed.tobytes(), 6)).decode("ascii")


def _decode_mask(text: str, shape: Sequence[int]) -> NDArray[np.bool_]:
    h, w = int(shape[0]), int(shape[1])
    packed = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    return np.unpackbits(packed, count=h * w).astype(bool).reshape(h, w)


@dataclass(frozen=True, eq=False)
class CellTable:
    """Detected cells of one slide (or region), columns as (N,) arrays.

    Attributes
    ----------
    x, y : (N,) float64 centroids in level-0 pixels (pixel-centre convention).
    x_um, y_um : (N,) float64, the same in micrometres from the slide's top-left corner.
    cls : (N,) str ndarray, class names (:data:`CLASSES`).
    area_um2 : (N,) float64 nucleus area (IHC: of the detected object) in µm².
    hematoxylin_od, dab_od : (N,) float64 mean optical densities (log10) in the nucleus; for
        IHC ``dab_od`` is over the nucleus plus a ``dab_ring_um`` ring.
    eccentricity : (N,) float64 of the nucleus' second-moment ellipse.
    mpp : (x, y) level-0 µm/px.
    level0_size : (width, height) of the slide at level 0.
    stain : ``"he"`` or ``"ihc-dab"``.
    positive_class : the class counted as positive (lymphocyte / dab-positive).
    tissue_area_mm2 : tissue area analysed.
    tissue_mask : (h, w) bool ndarray on an overview of the slide, or None (no masking).
    tissue_downsample : level-0 pixels per tissue-mask pixel.
    source : where the cells came from (file path or a description).
    parameters : the detector configuration, for the record.
    thumbnail : (h, w, 3) uint8 overview at ``tissue_downsample`` for overlays, or None.
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    x_um: NDArray[np.float64]
    y_um: NDArray[np.float64]
    cls: NDArray[np.str_]
    area_um2: NDArray[np.float64]
    hematoxylin_od: NDArray[np.float64]
    dab_od: NDArray[np.float64]
    eccentricity: NDArray[np.float64]
    mpp: tuple[float, float]
    level0_size: tuple[int, int]
    stain: Stain
    positive_class: str
    tissue_area_mm2: float
    tissue_mask: NDArray[np.bool_] | None = None
    tissue_downsample: float = 1.0
    source: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    thumbnail: NDArray[np.uint8] | None = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        for name in COLUMNS:
            col = getattr(self, name)
            if col.ndim != 1 or col.shape[0] != n:
                raise ValueError(
                    f"CellTable column {name!r} has shape {col.shape}, expected ({n},): all "
                    "columns must be aligned row for row."
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def positive(self) -> NDArray[np.bool_]:
        """(N,) bool, True for cells of :attr:`positive_class`."""
        return np.asarray(self.cls == self.positive_class)

    @property
    def n_positive(self) -> int:
        """Number of cells of :attr:`positive_class`."""
        return int(self.positive.sum())

    def columns(self) -> dict[str, NDArray[Any]]:
        """Column name -> (N,) array, in :data:`COLUMNS` order."""
        return {name: getattr(self, name) for name in COLUMNS}

    def metadata(self) -> dict[str, Any]:
        """Everything but the columns, JSON-ready (the tissue mask zlib/base64-encoded)."""
        meta: dict[str, Any] = {
            "mpp": list(self.mpp),
            "level0_size": list(self.level0_size),
            "stain": self.stain,
            "positive_class": self.positive_class,
            "tissue_area_mm2": self.tissue_area_mm2,
            "tissue_downsample": self.tissue_downsample,
            "source": self.source,
            "parameters": dict(self.parameters),
        }
        if self.tissue_mask is not None:
            meta["tissue_mask_shape"] = list(self.tissue_mask.shape)
            meta["tissue_mask"] = _encode_mask(self.tissue_mask)
        return meta

    # -- CSV ----------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV, atomically.

        The first line is ``# oncotrace-cells <json>`` holding :meth:`metadata` (so
        :meth:`from_csv` restores mpp, tissue mask and stain); then a header of
        :data:`COLUMNS` and one row per cell. Spreadsheet tools skip or show the comment line;
        pandas reads it with ``comment="#"``.
        """
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        cols = self.columns()
        # Positions to 1/1000 px or µm whatever the slide size; measurements to 6 digits.
        text = {
            k: _format_column(v, fixed=k in ("x", "y", "x_um", "y_um"))
            for k, v in cols.items()
            if k != "cls"
        }
        text["cls"] = [str(c) for c in self.cls.tolist()]
        with _atomic(final) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("# oncotrace-cells " + json.dumps(self.metadata()) + "\n")
            f.write(",".join(COLUMNS) + "\n")
            rows = zip(*(text[k] for k in COLUMNS), strict=True)
            f.writelines(",".join(r) + "\n" for r in rows)
        return final

    @classmethod
    def from_csv(cls, path: str | Path) -> CellTable:
        """Read a table written by :meth:`to_csv`.

        Raises
        ------
        ValueError
            If the file lacks the ``# oncotrace-cells`` line or a column.
        """
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            first = f.readline()
            header = f.readline().strip().split(",")
            body = f.read()
        tag = "# oncotrace-cells "
        if not first.startswith(tag):
            raise ValueError(
                f"{path}: not an OncoTrace cell table (first line must start with {tag!r}); "
                "write it with CellTable.to_csv."
            )
        try:
            meta = json.loads(first[len(tag) :])
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: line 1 (the {tag.strip()!r} metadata) is not valid JSON ({exc.msg}); "
                "write the table again with `oncotrace immune` or CellTable.to_csv."
            ) from None
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing from the header {header}.")
        # line numbers from 1, the metadata and header lines first
        fields = [(k + 3, line.split(",")) for k, line in enumerate(body.splitlines()) if line]
        for line_no, row in fields:
            if len(row) != len(header):
                raise ValueError(
                    f"{path}: line {line_no} has {len(row)} fields, the header {len(header)}; "
                    "the file is truncated or edited. Write it again."
                )
        data = {
            name: [row[i] for _, row in fields] for i, name in enumerate(header) if name in COLUMNS
        }
        mask = None
        if "tissue_mask" in meta:
            mask = _decode_mask(meta["tissue_mask"], meta["tissue_mask_shape"])
        num = {k: _float_column(path, k, data[k], fields) for k in _FLOAT_COLUMNS}
        return cls(
            x=num["x"],
            y=num["y"],
            x_um=num["x_um"],
            y_um=num["y_um"],
            area_um2=num["area_um2"],
            hematoxylin_od=num["hematoxylin_od"],
            dab_od=num["dab_od"],
            eccentricity=num["eccentricity"],
            cls=np.asarray(data["cls"], dtype=str).reshape(-1),
            mpp=(float(meta["mpp"][0]), float(meta["mpp"][1])),
            level0_size=(int(meta["level0_size"][0]), int(meta["level0_size"][1])),
            stain=meta["stain"],
            positive_class=meta["positive_class"],
            tissue_area_mm2=float(meta["tissue_area_mm2"]),
            tissue_mask=mask,
            tissue_downsample=float(meta["tissue_downsample"]),
            source=str(meta.get("source", "")),
            parameters=meta.get("parameters", {}),
        )

    # -- GeoJSON -------------------------------------------------------------------------------
    def to_geojson(
        self, path: str | Path, *, geometry: GeometryKind = "polygon", vertices: int = 12
    ) -> Path:
        """Write the cells as QuPath detections (GeoJSON FeatureCollection), atomically.

        Each cell is a ``Feature`` with ``properties.objectType = "detection"``,
        ``classification = {"name", "color": [r, g, b]}`` and ``measurements`` as a dict
        (``"Nucleus: Area µm^2"``, ``"Nucleus: Hematoxylin OD mean"``, ``"DAB OD mean"``,
        ``"Nucleus: Eccentricity"``), in level-0 pixels.

        The default geometry is a ``vertices``-gon of the nucleus' equivalent radius: QuPath
        fills it in the class colour at every zoom and measurement maps colour it, whereas a
        ``Point`` detection is drawn as a small fixed-size dot that vanishes when zoomed out and
        has no area. ``geometry="point"`` writes points (about 5x smaller files).
        """
        if geometry not in ("polygon", "point"):
            raise ValueError(f"geometry must be 'polygon' or 'point', got {geometry!r}.")
        if vertices < 3:
            raise ValueError(f"vertices must be at least 3, got {vertices}.")
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        mpp_mean = 0.5 * (self.mpp[0] + self.mpp[1])
        names = {
            "Nucleus: Area µm^2": self.area_um2,
            "Nucleus: Hematoxylin OD mean": self.hematoxylin_od,
            "DAB OD mean": self.dab_od,
            "Nucleus: Eccentricity": self.eccentricity,
        }
        keys = [json.dumps(k, ensure_ascii=False) for k in names]
        class_json = {
            c: json.dumps({"name": c, "color": list(CLASS_COLOURS.get(c, (128, 128, 128)))})
            for c in np.unique(self.cls).tolist()
        }
        angles = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
        batch = 20_000
        with _atomic(final) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type":"FeatureCollection","features":[')
            for start in range(0, len(self), batch):
                stop = min(len(self), start + batch)
                sl = slice(start, stop)
                vals = [_format_column(np.nan_to_num(v[sl])) for v in names.values()]
                if geometry == "point":
                    xs = [repr(v) for v in np.round(self.x[sl], 2).tolist()]
                    ys = [repr(v) for v in np.round(self.y[sl], 2).tolist()]
                    geoms = [
                        '{"type":"Point","coordinates":[' + a + "," + b + "]}"
                        for a, b in zip(xs, ys, strict=True)
                    ]
                else:
                    r_px = np.sqrt(np.maximum(self.area_um2[sl], 0.0) / np.pi) / mpp_mean
                    px = self.x[sl, None] + r_px[:, None] * np.cos(angles)[None, :]
                    py = self.y[sl, None] + r_px[:, None] * np.sin(angles)[None, :]
                    px, py = np.round(px, 2), np.round(py, 2)
                    geoms = [
                        '{"type":"Polygon","coordinates":[['
                        + ",".join(f"[{a!r},{b!r}]" for a, b in zip(rx, ry, strict=True))
                        + f",[{rx[0]!r},{ry[0]!r}]]]}}"
                        for rx, ry in zip(px.tolist(), py.tolist(), strict=True)
                    ]
                feats = []
                for i, g in enumerate(geoms):
                    meas = ",".join(k + ":" + v[i] for k, v in zip(keys, vals, strict=True))
                    feats.append(
                        '{"type":"Feature","geometry":' + g + ',"properties":{'
                        '"objectType":"detection","classification":'
                        + class_json[str(self.cls[start + i])]
                        + ',"measurements":{'
                        + meas
                        + "}}}"
                    )
                if start:
                    f.write(",")
                f.write(",".join(feats))
            f.write("]}")
        return final


def _float_column(
    path: Path, name: str, values: list[str], fields: list[tuple[int, list[str]]]
) -> NDArray[np.float64]:
    """A cell-table column as float64; a non-number, or a non-finite position, names its line."""
    try:
        arr = np.asarray(values, np.float64).reshape(-1)
    except ValueError:
        k = next(i for i, v in enumerate(values) if not _is_float(v))
        raise ValueError(
            f"{path}: line {fields[k][0]}: {name} {values[k]!r} is not a number; write the table "
            "again with `oncotrace immune` or CellTable.to_csv."
        ) from None
    if name in ("x", "y", "x_um", "y_um") and not np.isfinite(arr).all():
        k = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(
            f"{path}: line {fields[k][0]}: {name} {values[k]!r} is not a finite position; fix "
            "or remove the row."
        )
    return arr


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _format_column(values: NDArray[Any], *, fixed: bool = False) -> list[str]:
    """Compact text: 6 significant digits, or 3 decimals with ``fixed`` (coordinates)."""
    arr = np.asarray(values, np.float64)
    spec = ".3f" if fixed else ".6g"
    return [format(v, spec) for v in arr.tolist()]


# --------------------------------------------------------------------------------------------
# Colour deconvolution and the per-tile detector
# --------------------------------------------------------------------------------------------


def stain_matrix(stain_vectors: ArrayLike | None = None) -> NDArray[np.float32]:
    """(3, 3) float32 matrix taking RGB optical density to stain optical densities.

    Parameters
    ----------
    stain_vectors : None for scikit-image's standard H&E-DAB vectors
        (``skimage.color.hed_from_rgb``); or (2, 3) / (3, 3) stain OD vectors as rows in the
        order hematoxylin, eosin-or-other, DAB (a missing third row is their cross product,
        as in Ruifrok & Johnston). Rows are normalised to unit length.
    """
    from skimage.color import hed_from_rgb

    if stain_vectors is None:
        return np.asarray(hed_from_rgb, np.float32)
    v = np.asarray(stain_vectors, np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] not in (2, 3):
        raise ValueError(
            f"stain_vectors must be (3, 3) or (2, 3) OD vectors as rows (hematoxylin, "
            f"eosin/other, DAB), got shape {v.shape}."
        )
    if v.shape[0] == 2:
        v = np.vstack([v, np.cross(v[0], v[1])])
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms <= 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"stain_vectors rows must be finite and non-zero, got {v.tolist()}.")
    v = v / norms
    if abs(np.linalg.det(v)) < 1e-6:
        raise ValueError(
            "stain_vectors are linearly dependent (e.g. two equal stains); give distinct vectors."
        )
    return np.asarray(np.linalg.inv(v), np.float32)


def stain_od(
    rgb: NDArray[np.uint8], matrix: NDArray[np.float32], channels: Sequence[int] = (0, 1, 2)
) -> NDArray[np.float32]:
    """Per-stain optical density (log10) of an RGB image, clipped at 0.

    The same deconvolution as ``skimage.color.separate_stains(rgb, matrix)`` times
    ``-log10(1e-6) = 6`` (skimage scales OD by ``log(1e-6)``), in float32 and with the
    intensity floored at 1/255 instead of 1e-6, so black pixels read OD 2.4, not 6.

    Parameters
    ----------
    rgb : (h, w, 3) uint8.
    matrix : (3, 3) from :func:`stain_matrix` (RGB OD -> stain OD).
    channels : which stains to compute (0 hematoxylin, 1 eosin/other, 2 DAB).

    Returns
    -------
    (h, w, len(channels)) float32 ndarray.
    """
    lut = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)
    # A 256-entry table per channel, then three scaled adds: ~5x faster than (N, 3) @ (3, 3).
    od = [lut[rgb[..., c]] for c in range(3)]
    out = np.empty((*rgb.shape[:2], len(channels)), np.float32)
    for i, k in enumerate(channels):
        acc = od[0] * matrix[0, k]
        acc += od[1] * matrix[1, k]
        acc += od[2] * matrix[2, k]
        np.maximum(acc, 0.0, out=acc)
        out[..., i] = acc
    return out


@dataclass(frozen=True)
class TileCells:
    """Cells found in one tile, in tile (work) pixels, before the core filter."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    positive: NDArray[np.bool_]
    area_um2: NDArray[np.float64]
    hematoxylin_od: NDArray[np.float64]
    dab_od: NDArray[np.float64]
    eccentricity: NDArray[np.float64]

    @staticmethod
    def empty() -> TileCells:
        z = np.zeros(0, np.float64)
        return TileCells(z, z, np.zeros(0, bool), z, z, z, z)


TileDetector = Callable[
    [NDArray[np.uint8], float, Stain, NDArray[np.float32], ImmuneConfig], TileCells
]

CELL_DETECTORS: Registry[Callable[..., TileDetector]] = Registry("cell detector")
"""Every cell detector by name; :func:`register_cell_detector` adds to it."""


def register_cell_detector(
    name: str,
    *,
    requires: tuple[str, ...] = (),
    install: str | None = None,
) -> Callable[[Callable[..., TileDetector]], Callable[..., TileDetector]]:
    """Register a detector factory under ``name``.

    A factory takes ``weights_path`` (``None`` for weight-free detectors) and returns a tile
    detector ``(rgb, mpp, stain, stain_matrix, config) -> TileCells``, where ``rgb`` is an
    (h, w, 3) uint8 tile at ``mpp`` µm/px and positions are in tile pixels. A detector built on
    an optional package names it in ``requires`` (module names) and ``install`` (the command):
    it is listed, and asking for it before the install says what to run.
    """

    def wrap(factory: Callable[..., TileDetector]) -> Callable[..., TileDetector]:
        if name in CELL_DETECTORS:
            raise ValueError(f"a cell detector named {name!r} is already registered.")
        return CELL_DETECTORS.add(name, factory, requires=requires, install=install)

    return wrap


def list_cell_detectors() -> list[str]:
    """Names of the registered cell detectors."""
    return CELL_DETECTORS.names()


def create_cell_detector(
    name: str = "classical", *, weights_path: str | Path | None = None
) -> TileDetector:
    """Build a registered tile detector by name."""
    return CELL_DETECTORS.get(name)(weights_path=weights_path)


def _region_table(
    labels: NDArray[np.int32], channels: NDArray[np.float32], n: int
) -> dict[str, NDArray[np.float64]]:
    """Area, centroid, second moments and channel means per label 1..n, vectorised."""
    flat = labels.ravel()
    keep = flat > 0
    lab = flat[keep] - 1
    yy, xx = np.divmod(np.flatnonzero(keep), labels.shape[1])
    area = np.bincount(lab, minlength=n).astype(np.float64)
    safe = np.maximum(area, 1.0)
    cx = np.bincount(lab, xx, n) / safe
    cy = np.bincount(lab, yy, n) / safe
    dx, dy = xx - cx[lab], yy - cy[lab]
    mxx = np.bincount(lab, dx * dx, n) / safe
    myy = np.bincount(lab, dy * dy, n) / safe
    mxy = np.bincount(lab, dx * dy, n) / safe
    out = {"area": area, "x": cx, "y": cy, "mxx": mxx, "myy": myy, "mxy": mxy}
    for k in range(channels.shape[-1]):
        out[f"mean{k}"] = (
            np.bincount(lab, channels.reshape(-1, channels.shape[-1])[keep, k], n) / safe
        )
    return out


def _eccentricity(
    mxx: NDArray[np.float64], myy: NDArray[np.float64], mxy: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Eccentricity of the second-moment ellipse (as skimage.measure.regionprops defines it)."""
    half = 0.5 * (mxx + myy)
    root = np.sqrt(np.maximum(0.25 * (mxx - myy) ** 2 + mxy**2, 0.0))
    l1, l2 = half + root, np.maximum(half - root, 0.0)
    return np.sqrt(np.clip(1.0 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0))


def _threshold(smooth: NDArray[np.float32], floor: float) -> float:
    """Otsu on the tile, never below ``floor`` (a stain-free tile must not split its noise)."""
    from skimage.filters import threshold_otsu

    if float(smooth.max()) <= floor:
        return floor
    return max(floor, float(threshold_otsu(smooth[::2, ::2])))


def _split_nuclei(
    mask: NDArray[np.bool_], mpp: float, config: ImmuneConfig
) -> tuple[NDArray[np.int32], int]:
    """Label nuclei in a foreground mask, splitting touching ones (distance-transform seeds +
    watershed). Returns the (h, w) int32 labels 1..n and n."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    dist = ndi.gaussian_filter(dist, 1.0)
    min_d = max(1, round(config.seed_distance_um / mpp))
    # No per-object labels: skimage then loops over objects; nuclei centres are further apart
    # than min_d anyway.
    peaks = peak_local_max(dist, min_distance=min_d, threshold_abs=1.0 / mpp, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, peaks.shape[0] + 1, dtype=np.int32)
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    return labels, int(peaks.shape[0])


def classical_tile_cells(
    rgb: NDArray[np.uint8],
    mpp: float,
    stain: Stain,
    matrix: NDArray[np.float32],
    config: ImmuneConfig,
) -> TileCells:
    """Detect and classify nuclei in one RGB tile (the weight-free default detector).

    Parameters
    ----------
    rgb : (h, w, 3) uint8 tile.
    mpp : its µm/px.
    stain : ``"he"`` or ``"ihc-dab"``.
    matrix : from :func:`stain_matrix`.
    config : thresholds and sizes.

    Returns
    -------
    TileCells with centroids in tile pixels (pixel-centre convention).
    """
    from skimage.segmentation import expand_labels

    od = stain_od(rgb, matrix, (0, 2))
    h_od, d_od = od[..., 0], od[..., 1]
    sigma = config.smooth_um / mpp
    px_area_um2 = mpp * mpp
    smooth = ndi.gaussian_filter(h_od, sigma)
    thr = _threshold(smooth, config.min_signal_od)
    labels, n = _split_nuclei(smooth > thr, mpp, config)
    ring_px = max(1, round(config.dab_ring_um / mpp))
    ring = expand_labels(labels, distance=ring_px) if stain == "ihc-dab" else labels
    if stain == "ihc-dab":
        # A DAB+ cell may hide its nucleus under the brown: cell-sized DAB objects that touch
        # no hematoxylin nucleus (or its ring) are cells too.
        d_smooth = ndi.gaussian_filter(d_od, sigma)
        dab_lab, nd = ndi.label(d_smooth > _threshold(d_smooth, config.dab_positive_od))
        if nd:
            size = np.bincount(dab_lab.ravel(), minlength=nd + 1) * px_area_um2
            touches = np.bincount(dab_lab[ring > 0], minlength=nd + 1) > 0
            lone = (size >= config.min_area_um2) & (size <= config.max_area_um2) & ~touches
            lone[0] = False
            if lone.any():
                remap = np.zeros(nd + 1, np.int32)
                remap[lone] = n + 1 + np.arange(int(lone.sum()), dtype=np.int32)
                extra = remap[dab_lab]
                labels = np.where(extra > 0, extra, labels)
                ring = np.where(extra > 0, extra, ring)
                n += int(lone.sum())
    if n == 0:
        return TileCells.empty()
    props = _region_table(labels, np.stack([h_od, d_od], axis=-1), n)
    area_um2 = props["area"] * px_area_um2
    ecc = _eccentricity(props["mxx"], props["myy"], props["mxy"])
    ok = (area_um2 >= config.min_area_um2) & (area_um2 <= config.max_area_um2)
    h_mean, d_mean = props["mean0"], props["mean1"]
    if stain == "he":
        diam = 2.0 * np.sqrt(area_um2 / np.pi)
        lo, hi = config.lymphocyte_diameter_um
        dense = max(config.lymphocyte_min_od, config.lymphocyte_od_ratio * thr)
        positive = (
            (diam >= lo) & (diam <= hi) & (ecc <= config.max_eccentricity) & (h_mean >= dense)
        )
    else:
        # DAB over the nucleus plus a thin ring: CD3/CD8 staining sits on the membrane.
        d_mean = _region_table(ring, d_od[..., None], n)["mean0"]
        positive = d_mean >= config.dab_positive_od
    return TileCells(
        x=props["x"][ok],
        y=props["y"][ok],
        positive=positive[ok],
        area_um2=area_um2[ok],
        hematoxylin_od=h_mean[ok],
        dab_od=d_mean[ok],
        eccentricity=ecc[ok],
    )


@register_cell_detector("classical")
def _classical(weights_path: str | Path | None = None) -> TileDetector:
    if weights_path is not None:
        raise ValueError(
            f"the classical detector uses no weights, but weights_path={weights_path!r} was given;"
            " drop it or pick a deep detector."
        )
    return classical_tile_cells


# --------------------------------------------------------------------------------------------
# Walking a slide tile by tile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What the tile loop needs from a slide or an in-memory image."""

    read: Callable[[int, int, int, int], NDArray[np.uint8]]  # level-0 x, y, w, h -> work-res RGB
    level0_size: tuple[int, int]
    mpp: tuple[float, float]
    work_mpp: float
    scale: float  # level-0 pixels per work pixel
    name: str


def _resize(img: NDArray[np.uint8], size: tuple[int, int]) -> NDArray[np.uint8]:
    from PIL import Image

    if (img.shape[1], img.shape[0]) == size:
        return img
    shrinking = size[0] <= img.shape[1] and size[1] <= img.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize(size, resample=resample))


def _work_scale(mpp0: float, work_mpp: float) -> float:
    # Within 10 % of the target the slide is used as it is (a resample would only blur it).
    return 1.0 if abs(mpp0 - work_mpp) <= 0.1 * work_mpp else work_mpp / mpp0


def _slide_source(slide: Slide, work_mpp: float) -> _Source:
    mx, my = slide.mpp_xy
    mpp0 = 0.5 * (mx + my)
    scale = _work_scale(mpp0, work_mpp)
    level = slide.best_level_for_downsample(scale) if scale > 1 else 0
    ds = slide.level_downsamples[level]

    def read(x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        region = slide.read_region((x, y), level, (max(1, round(w / ds)), max(1, round(h / ds))))
        return _resize(region, (max(1, round(w / scale)), max(1, round(h / scale))))

    return _Source(read, slide.dimensions, (mx, my), mpp0 * scale, scale, str(slide.path))


def _array_source(image: NDArray[np.uint8], mpp: float, work_mpp: float) -> _Source:
    scale = _work_scale(mpp, work_mpp)
    h0, w0 = image.shape[:2]

    def read(x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        tile = np.ascontiguousarray(image[y : y + h, x : x + w, :3])
        return _resize(
            tile, (max(1, round(tile.shape[1] / scale)), max(1, round(tile.shape[0] / scale)))
        )

    return _Source(read, (w0, h0), (mpp, mpp), mpp * scale, scale, "in-memory image")


def _tile_grid(region: tuple[int, int, int, int], core_l0: int) -> NDArray[np.int64]:
    x, y, w, h = region
    xs = np.arange(x, x + w, core_l0, dtype=np.int64)
    ys = np.arange(y, y + h, core_l0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _mask_fraction(mask: NDArray[np.bool_], ds: float, x0: int, y0: int, x1: int, y1: int) -> float:
    mh, mw = mask.shape
    a, b = max(0, math.floor(x0 / ds)), min(mw, math.ceil(x1 / ds))
    c, d = max(0, math.floor(y0 / ds)), min(mh, math.ceil(y1 / ds))
    if a >= b or c >= d:
        return 0.0
    return float(mask[c:d, a:b].mean())


def _resolve_store(
    path: Path, mpp: float | None
) -> tuple[Path, float | tuple[float, float] | None]:
    """A per-slide Zarr store stands for its source slide (with the store's mpp override)."""
    from oncotrace import wsi

    if not path.is_dir() or path.suffix != ".zarr":
        return path, mpp
    store = wsi.Store.find(path)
    if store is None or store.attrs.source_path is None:
        raise ValueError(f"{path} is not a finished OncoTrace store; pass the slide file itself.")
    attrs = store.attrs
    source = Path(str(attrs.source_path))
    if not source.exists():
        raise FileNotFoundError(
            f"{path}: its source slide {source} is gone; cells are detected on the slide's "
            "pixels (the store holds only tiles at the tiling resolution), so pass the slide."
        )
    if mpp is None and attrs.mpp_source == "override" and attrs.mpp is not None:
        return source, (float(attrs.mpp[0]), float(attrs.mpp[1]))
    return source, mpp


def detect_immune_cells(
    slide_or_image: Slide | str | Path | NDArray[np.uint8],
    *,
    stain: Stain = "he",
    mpp: float | None = None,
    tile_um: float = 512.0,
    stain_vectors: ArrayLike | None = None,
    region: tuple[int, int, int, int] | None = None,
    tissue: bool = True,
    workers: int = 1,
    config: ImmuneConfig | None = None,
    detector: str = "classical",
    weights_path: str | Path | None = None,
) -> CellTable:
    """Find immune cells (H&E lymphocytes or IHC DAB+ cells) in the tissue of a slide.

    Parameters
    ----------
    slide_or_image : an open :class:`wsi.Slide`, a slide path (opened with
        :func:`wsi.open_slide`, ``mpp`` overriding the file), a per-slide ``*.zarr`` store
        (its source slide is opened, with the store's mpp override if it had one), or an
        (H, W, 3) uint8 RGB image with ``mpp`` given.
    stain : ``"he"`` (classes lymphocyte / other) or ``"ihc-dab"`` (dab-positive /
        dab-negative).
    mpp : level-0 µm/px; required for an image, an override for a path, ignored for a Slide.
    tile_um : side of a tile's core in micrometres (memory per tile ~ 40 bytes per work pixel:
        ~45 MB at the default 512 µm at 0.5 µm/px).
    stain_vectors : custom stain OD vectors (see :func:`stain_matrix`); default skimage's.
    region : level-0 ``(x, y, w, h)`` to analyse; default the whole slide.
    tissue : analyse only tissue (``wsi.detect_tissue``, mode tissue, or ``wsi.tissue_mask`` on
        an image overview); ``False`` analyses everything (an image already cropped to tissue).
    workers : threads over tiles (the numeric kernels release the GIL).
    config : detector parameters (:class:`ImmuneConfig`).
    detector : registered detector name (:func:`list_cell_detectors`).
    weights_path : local weights for deep detectors; never downloaded.

    Returns
    -------
    CellTable
        Cells whose centroids lie in tissue (and in ``region``), in tile order.

    Raises
    ------
    ValueError
        Bad stain, mpp, region or image. ``wsi`` errors (MppError, NoTissueError, …) pass
        through with the file named.
    """
    from oncotrace import wsi

    if stain not in CLASSES:
        raise ValueError(f"stain must be 'he' or 'ihc-dab', got {stain!r}.")
    check_parameters(mpp=mpp, workers=workers)
    cfg = config or ImmuneConfig()
    if tile_um < 4 * cfg.halo_um:
        raise ValueError(
            f"tile_um={tile_um} is too small for the {cfg.halo_um} µm halo; use at least "
            f"{4 * cfg.halo_um:g} µm (default 512)."
        )
    tile_fn = create_cell_detector(detector, weights_path=weights_path)
    matrix = stain_matrix(stain_vectors)

    opened: Slide | None = None
    thumb: NDArray[np.uint8] | None = None
    if isinstance(slide_or_image, np.ndarray):
        image = slide_or_image
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(
                f"an image must be (H, W, 3) uint8 RGB, got shape {image.shape} {image.dtype}."
            )
        if mpp is None or not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(
                f"mpp is required for an in-memory image and must be positive, got {mpp!r}; "
                "pass the µm per pixel it was captured at (0.5 for a 20x scan)."
            )
        src = _array_source(image, float(mpp), cfg.work_mpp)
        mask_mpp = 8.0
        ds = max(1.0, mask_mpp / float(mpp))
        tw, th = max(1, round(src.level0_size[0] / ds)), max(1, round(src.level0_size[1] / ds))
        thumb = _resize(np.ascontiguousarray(image[..., :3]), (tw, th))
        ds = src.level0_size[0] / tw
        if tissue:
            mask, _ = wsi.tissue_mask(thumb, float(mpp) * ds)
        else:
            mask = np.ones(thumb.shape[:2], bool)
    else:
        if isinstance(slide_or_image, (str, Path)):
            source, source_mpp = _resolve_store(Path(slide_or_image), mpp)
            opened = wsi.open_slide(source, mpp=source_mpp)
            slide = opened
        else:
            slide = slide_or_image
        src = _slide_source(slide, cfg.work_mpp)
        if tissue:
            tm = wsi.detect_tissue(slide, mode="tissue")
            mask, ds, thumb = tm.mask, tm.downsample, tm.thumbnail
        else:
            ds = max(1.0, 8.0 / float(np.mean(src.mpp)))
            thumb = slide.read_downsampled(ds)
            ds = src.level0_size[0] / thumb.shape[1]
            mask = np.ones(thumb.shape[:2], bool)
    try:
        return _detect(src, stain, tile_um, region, mask, ds, thumb, workers, cfg, tile_fn, matrix)
    finally:
        if opened is not None:
            opened.close()


def _detect(
    src: _Source,
    stain: Stain,
    tile_um: float,
    region: tuple[int, int, int, int] | None,
    mask: NDArray[np.bool_],
    ds: float,
    thumb: NDArray[np.uint8] | None,
    workers: int,
    cfg: ImmuneConfig,
    tile_fn: TileDetector,
    matrix: NDArray[np.float32],
) -> CellTable:
    w0, h0 = src.level0_size
    if region is None:
        region = (0, 0, w0, h0)
    rx, ry, rw, rh = (int(v) for v in region)
    if rw <= 0 or rh <= 0 or rx < 0 or ry < 0 or rx + rw > w0 or ry + rh > h0:
        raise ParameterError(
            f"{src.name}: region={','.join(str(int(v)) for v in region)} is not a box inside this"
            f" {w0} x {h0} slide (x, y, width, height in level-0 pixels; width and height > 0)."
            f" Fix: pass a box within 0,0,{w0},{h0}, or leave region out for the whole slide.",
            param="region",
        )
    # The region is part of the tissue mask, so tissue area and density masking agree with it.
    mask = mask.copy()
    mh, mw = mask.shape
    cxl = (np.arange(mw) + 0.5) * ds  # mask pixel centres in level-0 px
    cyl = (np.arange(mh) + 0.5) * ds
    mask &= ((cyl >= ry) & (cyl < ry + rh))[:, None] & ((cxl >= rx) & (cxl < rx + rw))[None, :]
    mpp0 = 0.5 * (src.mpp[0] + src.mpp[1])
    core = max(1, round(tile_um / mpp0))
    halo = math.ceil(cfg.halo_um / mpp0)
    tiles = _tile_grid((rx, ry, rw, rh), core)
    # A tile is worth reading if any mask pixel overlaps its core (plus halo rounding).
    todo = [
        (int(x), int(y))
        for x, y in tiles.tolist()
        if _mask_fraction(mask, ds, x - halo, y - halo, x + core + halo, y + core + halo) > 0
    ]

    def one(xy: tuple[int, int]) -> dict[str, NDArray[Any]]:
        x, y = xy
        cx1, cy1 = min(x + core, rx + rw), min(y + core, ry + rh)
        ax, ay = max(0, x - halo), max(0, y - halo)
        bx, by = min(w0, cx1 + halo), min(h0, cy1 + halo)
        rgb = src.read(ax, ay, bx - ax, by - ay)
        cells = tile_fn(rgb, src.work_mpp, stain, matrix, cfg)
        sx = (bx - ax) / rgb.shape[1]
        sy = (by - ay) / rgb.shape[0]
        # Work pixel centre i sits at level-0 ax + (i + 0.5) * s - 0.5.
        lx = ax + (cells.x + 0.5) * sx - 0.5
        ly = ay + (cells.y + 0.5) * sy - 0.5
        keep = (lx >= x - 0.5) & (lx < cx1 - 0.5) & (ly >= y - 0.5) & (ly < cy1 - 0.5)
        mi = np.clip(((lx + 0.5) / ds).astype(np.int64), 0, mw - 1)
        mj = np.clip(((ly + 0.5) / ds).astype(np.int64), 0, mh - 1)
        keep &= mask[mj, mi]
        return {
            "x": lx[keep],
            "y": ly[keep],
            "positive": cells.positive[keep],
            "area_um2": cells.area_um2[keep],
            "hematoxylin_od": cells.hematoxylin_od[keep],
            "dab_od": cells.dab_od[keep],
            "eccentricity": cells.eccentricity[keep],
        }

    parts = list(_run_ordered(one, todo, workers))
    cols = {
        k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
        for k in ("x", "y", "positive", "area_um2", "hematoxylin_od", "dab_od", "eccentricity")
    }
    pos, neg = CLASSES[stain]
    x = cols["x"].astype(np.float64)
    y = cols["y"].astype(np.float64)
    tissue_area_mm2 = float(mask.sum()) * (ds * src.mpp[0] * 1e-3) * (ds * src.mpp[1] * 1e-3)
    return CellTable(
        x=x,
        y=y,
        x_um=x * src.mpp[0],
        y_um=y * src.mpp[1],
        cls=np.where(cols["positive"].astype(bool), pos, neg),
        area_um2=cols["area_um2"].astype(np.float64),
        hematoxylin_od=cols["hematoxylin_od"].astype(np.float64),
        dab_od=cols["dab_od"].astype(np.float64),
        eccentricity=cols["eccentricity"].astype(np.float64),
        mpp=src.mpp,
        level0_size=src.level0_size,
        stain=stain,
        positive_class=pos,
        tissue_area_mm2=tissue_area_mm2,
        tissue_mask=mask,
        tissue_downsample=float(ds),
        source=src.name,
        parameters={**asdict(cfg), "tile_um": tile_um, "region": [rx, ry, rw, rh]},
        thumbnail=thumb,
    )


def _run_ordered(
    fn: Callable[[tuple[int, int]], dict[str, NDArray[Any]]],
    items: list[tuple[int, int]],
    workers: int,
) -> Iterator[dict[str, NDArray[Any]]]:
    """Map ``fn`` over ``items`` in order with at most ``2 * workers`` tiles in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Future[dict[str, NDArray[Any]]]] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


# --------------------------------------------------------------------------------------------
# Density maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DensityMaps:
    """Immune-cell maps on a micrometre grid, each a :class:`Heatmap`, NaN outside tissue.

    Attributes
    ----------
    bin_um : grid step in micrometres.
    til_positive : 1.0 where a bin is TIL-positive, 0.0 where not (cells: at least
        ``min_positive`` positive cells, Saltz et al. 2018; a loaded grid: ``lym_prob`` at or
        above ``threshold``).
    density : positive cells per mm² of tissue in the bin (cell tables only).
    all_cells : all cells per mm² of tissue (cell tables only).
    positive_fraction : positive / all cells in the bin, NaN where a bin has no cells.
    lymphocyte_probability : the loaded grid's ``lym_prob`` (loaded grids only).
    necrosis_probability : the loaded grid's ``nec_prob`` (loaded grids only).
    min_positive, threshold : the TIL-positive rule used.
    source : cell table source or grid file.
    """

    bin_um: float
    til_positive: Heatmap
    density: Heatmap | None = None
    all_cells: Heatmap | None = None
    positive_fraction: Heatmap | None = None
    lymphocyte_probability: Heatmap | None = None
    necrosis_probability: Heatmap | None = None
    min_positive: int | None = None
    threshold: float | None = None
    source: str = ""

    def maps(self) -> dict[str, Heatmap]:
        """Name -> Heatmap for every map present."""
        names = (
            "density",
            "all_cells",
            "til_positive",
            "positive_fraction",
            "lymphocyte_probability",
            "necrosis_probability",
        )
        return {n: h for n in names if (h := getattr(self, n)) is not None}

    @property
    def primary(self) -> Heatmap:
        """The map to show first: positive-cell density, else the lymphocyte probability."""
        return self.density or self.lymphocyte_probability or self.til_positive

    def summary(self) -> dict[str, float | int | None]:
        """TIL-positive bin fraction and per-map means over tissue bins."""
        til = self.til_positive.grid
        tissue = np.isfinite(til)
        n_bins = int(tissue.sum())
        out: dict[str, float | int | None] = {
            "bin_um": self.bin_um,
            "n_tissue_bins": n_bins,
            "n_til_positive_bins": int(np.nansum(til)),
            "til_positive_bin_fraction": float(np.nansum(til) / n_bins) if n_bins else None,
        }
        for name, hm in self.maps().items():
            if name == "til_positive":
                continue
            vals = hm.grid[np.isfinite(hm.grid)]
            out[f"{name}_mean"] = float(vals.mean()) if vals.size else None
        return out


def _bin_coverage(
    mask: NDArray[np.bool_] | None,
    mask_ds: float,
    cell_l0: tuple[float, float],
    shape: tuple[int, int],
) -> NDArray[np.float64]:
    """Fraction of each bin covered by tissue, from mask pixel centres (bins finer than the
    mask take the mask value at their centre)."""
    gh, gw = shape
    if mask is None:
        return np.ones(shape, np.float64)
    mh, mw = mask.shape
    col = np.floor((np.arange(mw) + 0.5) * mask_ds / cell_l0[0]).astype(np.int64)
    row = np.floor((np.arange(mh) + 0.5) * mask_ds / cell_l0[1]).astype(np.int64)
    ok_c, ok_r = col < gw, row < gh
    flat = (row[ok_r][:, None] * gw + col[ok_c][None, :]).ravel()
    hit = np.bincount(flat, mask[np.ix_(ok_r, ok_c)].ravel(), gh * gw)
    seen = np.bincount(flat, minlength=gh * gw).astype(np.float64)
    cover = np.divide(hit, seen, out=np.zeros(gh * gw), where=seen > 0)
    unseen = seen == 0
    if unseen.any():
        r, c = np.divmod(np.flatnonzero(unseen), gw)
        mi = np.clip(((c + 0.5) * cell_l0[0] / mask_ds).astype(np.int64), 0, mw - 1)
        mj = np.clip(((r + 0.5) * cell_l0[1] / mask_ds).astype(np.int64), 0, mh - 1)
        cover[unseen] = mask[mj, mi]
    return cover.reshape(shape)


def density_map(
    cells: CellTable,
    *,
    bin_um: float = 50.0,
    cls: str | None = None,
    min_positive: int = 2,
    min_coverage: float = 0.5,
) -> DensityMaps:
    """Bin a cell table on a micrometre grid.

    Bin ``(row, col)`` covers level-0 ``[col * b, (col + 1) * b)`` with ``b = bin_um / mpp``
    (origin at the slide corner). Densities are per mm² of tissue in the bin (the bin area
    times its tissue coverage), so a bin half in tissue is not diluted by glass.

    Parameters
    ----------
    cells : from :func:`detect_immune_cells` or :meth:`CellTable.from_csv`.
    bin_um : bin side in micrometres (Saltz et al. 2018 TIL maps: 50 µm).
    cls : class counted as positive; default ``cells.positive_class``.
    min_positive : TIL-positive when a bin holds at least this many positive cells (Saltz: 2).
    min_coverage : bins with a smaller tissue fraction (from ``cells.tissue_mask``) are NaN.

    Returns
    -------
    DensityMaps with ``density``, ``all_cells``, ``til_positive``, ``positive_fraction``.
    """
    mx, my = cells.mpp
    w0, h0 = cells.level0_size
    # the grid of this slide is bounded (a wrong mpp can make a slide metres wide)
    check_density_options(
        bin_um, min_positive, extent_um=(w0 * mx, h0 * my), min_coverage=min_coverage
    )
    positive_cls = cells.positive_class if cls is None else cls
    known = set(CLASSES[cells.stain]) if cells.stain in CLASSES else set()
    if known and positive_cls not in known:
        raise ValueError(
            f"cls={positive_cls!r} is not a class of {cells.stain} cell tables; use one of "
            f"{sorted(known)}."
        )
    cell_l0 = (bin_um / mx, bin_um / my)
    gw, gh = math.ceil(w0 / cell_l0[0]), math.ceil(h0 / cell_l0[1])
    col = np.floor((cells.x + 0.5) / cell_l0[0]).astype(np.int64)
    row = np.floor((cells.y + 0.5) / cell_l0[1]).astype(np.int64)
    ok = (col >= 0) & (col < gw) & (row >= 0) & (row < gh)
    flat = row[ok] * gw + col[ok]
    n_all = np.bincount(flat, minlength=gw * gh).reshape(gh, gw).astype(np.float64)
    pos = (cells.cls == positive_cls)[ok]
    n_pos = np.bincount(flat, pos.astype(np.float64), gw * gh).reshape(gh, gw)
    cover = _bin_coverage(cells.tissue_mask, cells.tissue_downsample, cell_l0, (gh, gw))
    tissue = cover >= min_coverage
    area_mm2 = (bin_um * 1e-3) ** 2 * np.maximum(cover, 1e-12)

    def heat(values: NDArray[np.float64], unit: str) -> Heatmap:
        grid = np.where(tissue, values, np.nan).astype(np.float32)
        return Heatmap(
            grid=grid,
            origin_level0=(0.0, 0.0),
            cell_size_level0=cell_l0,
            mpp=(mx, my),
            level0_size=(w0, h0),
            tile_size_level0=cell_l0,
            n_tiles=int(tissue.sum()),
            value_unit=unit,
        )

    frac = np.divide(n_pos, n_all, out=np.full_like(n_pos, np.nan), where=n_all > 0)
    return DensityMaps(
        bin_um=float(bin_um),
        til_positive=heat((n_pos >= min_positive).astype(np.float64), TIL_POSITIVE_UNIT),
        density=heat(n_pos / area_mm2, DENSITY_UNIT),
        all_cells=heat(n_all / area_mm2, DENSITY_UNIT),
        positive_fraction=heat(frac, FRACTION_UNIT),
        min_positive=int(min_positive),
        source=cells.source,
    )


def load_til_grid(
    path: str | Path,
    *,
    mpp: float | None = None,
    patch_px: float | None = None,
    level0_size: tuple[int, int] | None = None,
    threshold: float = 0.5,
) -> DensityMaps:
    """Load a u24 TIL prediction grid (``x y lym_prob nec_prob``) into :class:`DensityMaps`.

    Rows are patch centres in level-0 pixels on a regular grid (SBU-BMI u24_lymphocyte
    ``prediction-*.low_res`` files; e.g. TCGA-MP-A4T9's is 123 x 76 patches 792 px apart).

    Parameters
    ----------
    path : the text file (whitespace-separated; 3 columns are accepted, no necrosis).
    mpp : level-0 µm/px of the slide the grid was predicted on. Required: the file has no
        physical scale (TCGA 40x slides are ~0.25 µm/px; read it from the slide).
    patch_px : grid step in level-0 pixels; default inferred from the smallest step between
        patch centres.
    level0_size : slide size; default the grid's extent.
    threshold : ``lym_prob`` at or above which a patch is TIL-positive.

    Returns
    -------
    DensityMaps with ``lymphocyte_probability``, ``necrosis_probability`` (if present) and
    ``til_positive``; NaN where the file has no patch.
    """
    path = Path(path)
    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(
            f"{path}: a u24 TIL grid carries no physical scale; pass mpp= (the slide's level-0 "
            "µm/px, e.g. from wsi.open_slide(slide).mpp_xy; ~0.25 for TCGA 40x scans)."
        )
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(
            f"{path}: not a u24 TIL grid (expected whitespace-separated rows "
            f"'x y lym_prob nec_prob'): {exc}"
        ) from exc
    if data.shape[1] not in (3, 4) or data.shape[0] == 0:
        raise ValueError(
            f"{path}: expected rows 'x y lym_prob [nec_prob]', got {data.shape[1]} columns "
            f"in {data.shape[0]} rows."
        )
    _check_til_rows(path, data)
    x, y = data[:, 0], data[:, 1]
    if patch_px is None:
        steps = np.concatenate([np.diff(np.unique(x)), np.diff(np.unique(y))])
        steps = steps[steps > 0]
        if steps.size == 0:
            raise ValueError(f"{path}: one patch only; pass patch_px= (the grid step, level-0 px).")
        patch_px = float(steps.min())
    step = float(patch_px)
    # Patch centres sit at origin + (k + 0.5) * step.
    ox = float(x.min()) - step / 2
    oy = float(y.min()) - step / 2
    col = np.rint((x - ox) / step - 0.5).astype(np.int64)
    row = np.rint((y - oy) / step - 0.5).astype(np.int64)
    off = (np.abs((x - ox) / step - 0.5 - col) > 0.05) | (
        np.abs((y - oy) / step - 0.5 - row) > 0.05
    )
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{path}: {int(off.sum())} patch centres are off a {step:g}-px grid (first: "
            f"x={x[i]:g}, y={y[i]:g}); pass patch_px= with the real step."
        )
    gw, gh = int(col.max()) + 1, int(row.max()) + 1
    if gw * gh > MAX_GRID_CELLS:
        raise ValueError(
            f"{path}: its patch centres span {gw:,} x {gh:,} patches of {step:g} px "
            f"(more than {MAX_GRID_CELLS:,}): a stray row far off the slide, or the wrong "
            "patch_px=. Fix the file (x and y are level-0 px of the slide)."
        )
    flat = row * gw + col
    uniq, counts = np.unique(flat, return_counts=True)
    if (counts > 1).any():
        first = int(np.flatnonzero(flat == uniq[counts > 1][0])[1])
        raise ValueError(
            f"{path}: data row {first + 1} repeats the patch at x={x[first]:g}, y={y[first]:g} "
            f"({int((counts - 1).sum())} repeated patch(es)); one row per patch. Fix: remove "
            "the duplicates."
        )
    if level0_size is None:
        level0_size = (math.ceil(ox + gw * step), math.ceil(oy + gh * step))

    def heat(values: NDArray[np.float64], unit: str) -> Heatmap:
        grid = np.full((gh, gw), np.nan, np.float32)
        grid[row, col] = values
        return Heatmap(
            grid=grid,
            origin_level0=(ox, oy),
            cell_size_level0=(step, step),
            mpp=(float(mpp), float(mpp)),
            level0_size=(int(level0_size[0]), int(level0_size[1])),
            tile_size_level0=(step, step),
            n_tiles=int(data.shape[0]),
            value_unit=unit,
        )

    lym = data[:, 2]
    return DensityMaps(
        bin_um=step * float(mpp),
        til_positive=heat((lym >= threshold).astype(np.float64), TIL_POSITIVE_UNIT),
        lymphocyte_probability=heat(lym, PROBABILITY_UNIT),
        necrosis_probability=heat(data[:, 3], PROBABILITY_UNIT) if data.shape[1] == 4 else None,
        threshold=float(threshold),
        source=str(path),
    )


# --------------------------------------------------------------------------------------------
# Summary and output files
# --------------------------------------------------------------------------------------------


def _check_til_rows(path: Path, data: NDArray[np.float64]) -> None:
    """Every value finite; probabilities in [0, 1] (line numbers count from 1)."""
    bad = ~np.isfinite(data).all(axis=1)
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"{path}: data row {line} holds a non-finite value (nan/inf) ({int(bad.sum())} such "
            "row(s)); every x, y and probability must be a number. Fix or remove those rows."
        )
    probs = data[:, 2:]
    out = ((probs < 0) | (probs > 1)).any(axis=1)
    if out.any():
        line = int(np.flatnonzero(out)[0]) + 1
        raise ValueError(
            f"{path}: data row {line} has a probability outside [0, 1] ({int(out.sum())} such "
            "row(s)); columns 3-4 are lym_prob and nec_prob. Fix the file, or check that it is "
            "a u24 prediction grid ('x y lym_prob nec_prob')."
        )


def summary_dict(cells: CellTable, density: DensityMaps | None = None) -> dict[str, Any]:
    """The ``summary.json`` fields.

    ``cells_per_mm2`` is positive cells per mm² of analysed tissue; ``all_cells_per_mm2``
    counts every detected cell.
    """
    area = cells.tissue_area_mm2
    n, npos = len(cells), cells.n_positive
    out: dict[str, Any] = {
        "n_cells": n,
        "n_positive": npos,
        "positive_percent": 100.0 * npos / n if n else 0.0,
        "tissue_area_mm2": area,
        "cells_per_mm2": npos / area if area > 0 else None,
        "all_cells_per_mm2": n / area if area > 0 else None,
        "positive_class": cells.positive_class,
        "stain": cells.stain,
        "mpp": list(cells.mpp),
        "level0_size": list(cells.level0_size),
        "source": cells.source,
        "parameters": dict(cells.parameters),
    }
    if density is not None:
        s = density.summary()
        out["bin_um"] = density.bin_um
        out["min_positive"] = density.min_positive
        out["til_positive_bin_fraction"] = s["til_positive_bin_fraction"]
        out["n_tissue_bins"] = s["n_tissue_bins"]
    return out


def _write_json(path: Path, obj: Mapping[str, Any]) -> Path:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_immune_outputs(
    out_dir: str | Path,
    cells: CellTable,
    density: DensityMaps,
    *,
    thumbnail_rgb: NDArray[np.uint8] | None = None,
    thumbnail_downsample: float | None = None,
    geometry: GeometryKind = "polygon",
) -> dict[str, Path]:
    """Write ``cells.geojson``, ``cells.csv``, ``density.ome.zarr``, ``density.png`` and
    ``summary.json`` into ``out_dir`` (each atomically).

    The OME-Zarr and PNG show :attr:`DensityMaps.primary`: positive cells per mm² (named
    ``"<positive class> density"``, unit :data:`DENSITY_UNIT`), else a loaded grid's
    ``lym_prob`` (unit :data:`PROBABILITY_UNIT`). The PNG is drawn on ``thumbnail_rgb`` (level-0 px per thumbnail px
    ``thumbnail_downsample``), default the cell table's own overview, else a white canvas the
    size of the tissue mask.

    Returns
    -------
    dict of output name -> path.
    """
    from ._heatmap import write_ome_zarr, write_overlay_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["cells.geojson"] = cells.to_geojson(out / "cells.geojson", geometry=geometry)
    paths["cells.csv"] = cells.to_csv(out / "cells.csv")
    hm = density.primary
    unit = hm.value_unit
    if density.density is not None:
        name = f"{cells.positive_class} density"
    else:
        name = "lym_prob" if hm is density.lymphocyte_probability else "TIL-positive"
    paths["density.ome.zarr"] = write_ome_zarr(
        hm, out / "density.ome.zarr", name=name, kind="immune density", unit=unit
    )
    if thumbnail_rgb is None:
        if cells.thumbnail is not None:
            thumbnail_rgb, thumbnail_downsample = cells.thumbnail, cells.tissue_downsample
        else:
            ds = cells.tissue_downsample
            h = max(1, round(cells.level0_size[1] / ds))
            w = max(1, round(cells.level0_size[0] / ds))
            thumbnail_rgb, thumbnail_downsample = np.full((h, w, 3), 255, np.uint8), ds
    if thumbnail_downsample is None:
        raise ValueError("thumbnail_downsample is required with thumbnail_rgb (level-0 px per px).")
    paths["density.png"] = write_overlay_png(
        hm,
        thumbnail_rgb,
        thumbnail_downsample,
        out / "density.png",
        label=name if unit is None else f"{name} ({unit})",
        title=f"{name}, {density.bin_um:g} µm bins",
    )
    paths["summary.json"] = _write_json(out / "summary.json", summary_dict(cells, density))
    return paths
