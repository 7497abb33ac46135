"""Visium spatial transcriptomics: read a Space Ranger folder, validate cell maps against it.

:func:`read_visium` reads spot positions (Space Ranger 1.x ``tissue_positions_list.csv`` without
a header, or 2.x ``tissue_positions.csv`` with one), ``scalefactors_json.json`` and the 10x
HDF5 count matrix (h5py + scipy.sparse; no scanpy/anndata needed for four arrays).

:func:`st_validate` counts detected (immune) cells in every 55 um spot and compares that map
with a per-spot immune gene score: Spearman's rho (with its naive p), Moran's I of each map and
Lee's L / the bivariate Moran's I, with p-values from a spatial null (toroidal shifts or block
permutation on the hex lattice, see :mod:`spatial._spatialstats`): neighbouring spots are not
independent, so the naive p is too small.

Coordinates
-----------
Space Ranger's *full-resolution* pixels are those of the image given to it; ``pxl_col_in_fullres``
is ``x`` and ``pxl_row_in_fullres`` is ``y``. The hires / lowres PNGs are that image scaled by
``tissue_hires_scalef`` / ``tissue_lowres_scalef``. Cells come in slide level-0 pixels and are
mapped to full-resolution pixels by ``slide_to_fullres`` (1.0 when the slide *is* the image
Space Ranger was given; see :func:`visium_image_scale` for the PNGs).

Gene policy
-----------
Requested genes are matched against gene symbols, then Ensembl ids (the defaults carry their
GRCh38 ids, so a matrix whose ``name`` column holds ids still resolves). Genes not found are
listed in the result. When none is found the score is an error naming the genes and the fix
(pass ``genes`` / ``--genes`` with names from the file), unless ``fallback="total-counts"`` asks
for log1p(total counts per spot) instead, which the report then names as the score used.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from oncotrace import __version__

from ._checks import check_null_options
from ._heatmap import _atomic
from ._spatialstats import (
    Alternative,
    NullName,
    Statistic,
    association_test,
    bivariate_association,
    block_permutation_null,
    hex_lattice_weights,
    moran_test,
    toroidal_null,
)

Normalise = Literal["cp10k-log1p", "log1p", "none"]
Fallback = Literal["total-counts"]
ImageName = Literal["fullres", "hires", "lowres"]

#: Visium spot diameter (10x Genomics: 55 um spots, 100 um centre to centre).
VISIUM_SPOT_DIAMETER_UM = 55.0
#: The issue's T-cell / pan-immune panel.
DEFAULT_IMMUNE_GENES: tuple[str, ...] = ("CD3D", "CD3E", "CD2", "CD8A", "PTPRC", "GZMK")
#: GRCh38 Ensembl gene ids of the defaults, for matrices that carry ids in place of symbols.
ENSEMBL_IDS: Mapping[str, str] = {
    "CD3D": "ENSG00000167286",
    "CD3E": "ENSG00000198851",
    "CD2": "ENSG00000116824",
    "CD8A": "ENSG00000153563",
    "PTPRC": "ENSG00000081237",
    "GZMK": "ENSG00000113088",
}
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_SCALEFACTORS = "scalefactors_json.json"
_COUNT_FILES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")


_BIVARIATE: tuple[tuple[str, Statistic], ...] = (("lee_L", "lee"), ("moran_bv", "moran_bv"))


class VisiumError(ValueError):
    """A Space Ranger folder or file that cannot be read as Visium output."""


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Visium:
    """Spots of one Visium capture area, with their counts when a matrix was read.

    Attributes
    ----------
    barcodes : (n,) str ndarray, in the order of the positions file.
    in_tissue : (n,) bool ndarray; Space Ranger's tissue call.
    array_row, array_col : (n,) int64 ndarray; hex-lattice indices (``row + col`` even).
    pxl_x_fullres, pxl_y_fullres : (n,) float64 ndarray; spot centres in full-resolution pixels
        (``pxl_col_in_fullres``, ``pxl_row_in_fullres``).
    scalefactors : the ``scalefactors_json.json`` entries.
    spot_diameter_fullres : spot diameter in full-resolution pixels.
    counts : (n, n_genes) scipy.sparse.csr_matrix aligned with ``barcodes`` (zero rows where
        ``has_counts`` is False), or None when no matrix was read.
    has_counts : (n,) bool ndarray; the spot's barcode is in the count matrix.
    gene_names, gene_ids : (n_genes,) str ndarray.
    source : the folder read.
    counts_source : the count file read, or None.
    """

    barcodes: NDArray[np.str_]
    in_tissue: NDArray[np.bool_]
    array_row: NDArray[np.int64]
    array_col: NDArray[np.int64]
    pxl_x_fullres: NDArray[np.float64]
    pxl_y_fullres: NDArray[np.float64]
    scalefactors: Mapping[str, float]
    spot_diameter_fullres: float
    counts: sp.csr_matrix | None
    has_counts: NDArray[np.bool_]
    gene_names: NDArray[np.str_]
    gene_ids: NDArray[np.str_]
    source: Path
    counts_source: Path | None = None

    @property
    def n_spots(self) -> int:
        """Spots in the positions file (in and out of tissue)."""
        return int(self.barcodes.size)

    @property
    def mpp_fullres(self) -> float:
        """Micrometres per full-resolution pixel, from the 55 um spot diameter."""
        return VISIUM_SPOT_DIAMETER_UM / self.spot_diameter_fullres

    @property
    def spot_radius_fullres(self) -> float:
        """Spot radius in full-resolution pixels."""
        return 0.5 * self.spot_diameter_fullres

    @property
    def xy_fullres(self) -> NDArray[np.float64]:
        """(n, 2) spot centres ``(x, y)`` in full-resolution pixels."""
        return np.column_stack([self.pxl_x_fullres, self.pxl_y_fullres])


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    for p in candidates:
        if p.is_file():
            return p
    return None


def _roots(folder: Path) -> list[Path]:
    """Folders that may hold Space Ranger outputs: the folder, its ``outs/``, and the parent of
    a ``spatial/`` folder given directly."""
    roots = [folder, folder / "outs"]
    if folder.name == "spatial":
        roots.append(folder.parent)
    return roots


def _read_positions(path: Path) -> dict[str, NDArray[Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise VisiumError(f"{path} is empty; expected one line per Visium spot.")
    header = [c.strip() for c in rows[0]]
    if "barcode" in header:
        missing = [c for c in _POSITION_COLUMNS if c not in header]
        if missing:
            raise VisiumError(
                f"{path}: header lacks column(s) {missing}; expected Space Ranger's"
                f" {list(_POSITION_COLUMNS)}."
            )
        take = [header.index(c) for c in _POSITION_COLUMNS]
        body = rows[1:]
    else:
        take = list(range(len(_POSITION_COLUMNS)))
        body = rows
    if not body:
        raise VisiumError(f"{path} has a header but no spots; expected one line per Visium spot.")
    bad = [i for i, r in enumerate(body) if len(r) <= max(take)]
    if bad:
        raise VisiumError(
            f"{path}: line {bad[0] + 1 + (body is not rows)} has fewer than"
            f" {len(_POSITION_COLUMNS)} columns; is this a Space Ranger positions file?"
        )
    cols = list(zip(*[[r[j].strip() for j in take] for r in body], strict=True))
    try:
        out: dict[str, NDArray[Any]] = {
            "barcode": np.asarray(cols[0], dtype=str),
            "in_tissue": np.asarray(cols[1], dtype=np.int64),
            "array_row": np.asarray(cols[2], dtype=np.int64),
            "array_col": np.asarray(cols[3], dtype=np.int64),
            "y": np.asarray(cols[4], dtype=np.float64),
            "x": np.asarray(cols[5], dtype=np.float64),
        }
    except ValueError as exc:
        raise VisiumError(
            f"{path}: non-numeric in_tissue/array/pixel value ({exc}); is this a Space Ranger"
            " positions file?"
        ) from exc
    if not np.isin(out["in_tissue"], (0, 1)).all():
        raise VisiumError(f"{path}: in_tissue must be 0 or 1.")
    first_line = 1 + (body is not rows)
    _check_spot_geometry(path, out, first_line)
    if len(set(out["barcode"].tolist())) != out["barcode"].size:
        raise VisiumError(f"{path}: barcodes are not unique.")
    return out


#: Visium capture areas are 78 x 128 (6.5 mm) or 112 x 256 (11 mm, CytAssist) lattice positions;
#: far larger indices are a corrupt file (and the spatial nulls lay the lattice out densely).
MAX_ARRAY_INDEX = 1024


def _check_spot_geometry(path: Path, pos: Mapping[str, NDArray[Any]], first_line: int) -> None:
    """Finite pixel positions, lattice indices in range, no two spots on one lattice position."""
    finite = np.isfinite(pos["x"]) & np.isfinite(pos["y"])
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise VisiumError(
            f"{path}: line {k + first_line} (barcode {pos['barcode'][k]}) has a non-finite pixel "
            f"position ({int((~finite).sum())} such spot(s)). Fix: use the file Space Ranger wrote."
        )
    row, col = pos["array_row"], pos["array_col"]
    bad = (row < 0) | (col < 0) | (row > MAX_ARRAY_INDEX) | (col > MAX_ARRAY_INDEX)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise VisiumError(
            f"{path}: line {k + first_line} (barcode {pos['barcode'][k]}) is at array_row "
            f"{int(row[k])}, array_col {int(col[k])}, outside 0-{MAX_ARRAY_INDEX} of any Visium "
            "slide. Fix: use the file Space Ranger wrote."
        )
    key = row * (MAX_ARRAY_INDEX + 1) + col
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(key[first[counts > 1][0]])
        a, b = (int(i) for i in np.flatnonzero(key == dup)[:2])
        raise VisiumError(
            f"{path}: lines {a + first_line} and {b + first_line} (barcodes {pos['barcode'][a]},"
            f" {pos['barcode'][b]}) share array position ({int(row[a])}, {int(col[a])}); each "
            "lattice position holds one spot. Fix: use the file Space Ranger wrote."
        )


def _read_scalefactors(path: Path) -> dict[str, float]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VisiumError(f"{path} is not valid JSON: {exc}.") from exc
    if not isinstance(doc, dict):
        raise VisiumError(f"{path} must hold a JSON object of scale factors.")
    out = {str(k): float(v) for k, v in doc.items() if isinstance(v, int | float)}
    d = out.get("spot_diameter_fullres")
    if d is None or not math.isfinite(d) or d <= 0:
        raise VisiumError(
            f"{path} has no positive 'spot_diameter_fullres' (got {d!r}); it is needed to turn"
            " full-resolution pixels into micrometres."
        )
    return out


def _decode(a: NDArray[Any]) -> NDArray[np.str_]:
    return np.asarray([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a], dtype=str)


def read_10x_h5(
    path: str | Path,
) -> tuple[NDArray[np.str_], NDArray[np.str_], NDArray[np.str_], sp.csr_matrix]:
    """Read a Cell Ranger / Space Ranger (v3+) feature-barcode HDF5 matrix.

    Parameters
    ----------
    path : str or Path
        ``filtered_feature_bc_matrix.h5`` (or raw).

    Returns
    -------
    barcodes : (n_barcodes,) str ndarray
    gene_ids : (n_genes,) str ndarray
    gene_names : (n_genes,) str ndarray
    counts : (n_barcodes, n_genes) scipy.sparse.csr_matrix, float32
        The file stores genes x barcodes in CSC order; its transpose is this CSR matrix.
    """
    import h5py

    p = Path(path)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise VisiumError(f"{p} is not a readable HDF5 file ({exc}).") from exc
    with f:
        if "matrix" not in f:
            raise VisiumError(
                f"{p} has no 'matrix' group: not a Cell Ranger v3+ / Space Ranger feature-barcode"
                f" matrix (groups: {sorted(f.keys())})."
            )
        m = f["matrix"]
        need = ("barcodes", "data", "indices", "indptr", "shape", "features")
        missing = [k for k in need if k not in m]
        if missing:
            raise VisiumError(f"{p}: matrix group lacks {missing}.")
        n_genes, n_bc = (int(v) for v in m["shape"][:])
        barcodes = _decode(m["barcodes"][:])
        feats = m["features"]
        ids = _decode(feats["id"][:]) if "id" in feats else np.asarray([], dtype=str)
        names = _decode(feats["name"][:]) if "name" in feats else ids
        if barcodes.size != n_bc or names.size != n_genes:
            raise VisiumError(
                f"{p}: shape {n_genes} x {n_bc} disagrees with {names.size} features and"
                f" {barcodes.size} barcodes."
            )
        csc = sp.csc_matrix(
            (m["data"][:].astype(np.float32), m["indices"][:], m["indptr"][:]),
            shape=(n_genes, n_bc),
        )
    return barcodes, ids, names, sp.csr_matrix(csc.T)


def read_visium(folder: str | Path, *, counts: bool | str | Path = True) -> Visium:
    """Read a Space Ranger output folder.

    Parameters
    ----------
    folder : str or Path
        The Space Ranger ``outs/`` folder (or its parent, or its ``spatial/`` subfolder): holds
        ``spatial/`` (or the files flat) with ``tissue_positions.csv`` (SR 2.x, header) or
        ``tissue_positions_list.csv`` (SR 1.x, no header) and ``scalefactors_json.json``, and
        ``filtered_feature_bc_matrix.h5`` (possibly with a sample prefix).
    counts : bool or path
        True: read the filtered (else raw) matrix if present; a path: read that file; False:
        positions only.

    Returns
    -------
    Visium

    Raises
    ------
    FileNotFoundError
        A required file is missing (the message names every place looked at).
    VisiumError
        A file is malformed, or the matrix has barcodes that are not in the positions file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Visium folder {root} does not exist or is not a folder.")
    places = [d for r in _roots(root) for d in (r / "spatial", r)]
    pos_candidates = [d / name for d in places for name in _POSITION_FILES]
    pos_path = _first_existing(pos_candidates)
    if pos_path is None:
        parquet = _first_existing([d / "tissue_positions.parquet" for d in places])
        hint = (
            f" Found {parquet}: Parquet positions (Visium HD) are not supported; export them to"
            " tissue_positions.csv."
            if parquet
            else ""
        )
        raise FileNotFoundError(
            f"no spot positions in {root}: looked for {', '.join(str(p) for p in pos_candidates)}"
            f" (Space Ranger 2.x tissue_positions.csv or 1.x tissue_positions_list.csv).{hint}"
        )
    sf_candidates = [pos_path.parent / _SCALEFACTORS] + [d / _SCALEFACTORS for d in places]
    sf_path = _first_existing(sf_candidates)
    if sf_path is None:
        raise FileNotFoundError(
            f"no {_SCALEFACTORS} beside {pos_path} or in {root}; Space Ranger writes it to"
            " outs/spatial/ and it is needed for the spot diameter."
        )
    pos = _read_positions(pos_path)
    scalefactors = _read_scalefactors(sf_path)
    n = pos["barcode"].size

    matrix: sp.csr_matrix | None = None
    has_counts = np.zeros(n, dtype=bool)
    gene_names = np.asarray([], dtype=str)
    gene_ids = np.asarray([], dtype=str)
    counts_path: Path | None = None
    if counts is not False:
        if counts is True:
            count_roots = [r for r in _roots(root) if r.is_dir()]
            counts_path = _first_existing([r / name for r in count_roots for name in _COUNT_FILES])
            if counts_path is None:
                prefixed = sorted(
                    p for r in count_roots for p in r.glob(f"*{_COUNT_FILES[0]}") if p.is_file()
                )
                counts_path = prefixed[0] if prefixed else None
        else:
            counts_path = Path(counts)
            if not counts_path.is_file():
                raise FileNotFoundError(f"count matrix {counts_path} does not exist.")
        if counts_path is not None:
            bc, gene_ids, gene_names, csr = read_10x_h5(counts_path)
            index = {b: i for i, b in enumerate(pos["barcode"].tolist())}
            rows = np.asarray([index.get(b, -1) for b in bc.tolist()], dtype=np.int64)
            if np.any(rows < 0):
                stray = bc[rows < 0]
                raise VisiumError(
                    f"{counts_path} has {stray.size} barcode(s) not in {pos_path} (e.g."
                    f" {', '.join(stray[:3].tolist())}): the matrix and positions come from"
                    " different samples or Space Ranger runs."
                )
            place = sp.csr_matrix(
                (np.ones(rows.size, dtype=np.float32), (rows, np.arange(rows.size))),
                shape=(n, rows.size),
            )
            matrix = sp.csr_matrix(place @ csr)
            has_counts[rows] = True
    return Visium(
        barcodes=pos["barcode"],
        in_tissue=pos["in_tissue"].astype(bool),
        array_row=pos["array_row"],
        array_col=pos["array_col"],
        pxl_x_fullres=pos["x"],
        pxl_y_fullres=pos["y"],
        scalefactors=scalefactors,
        spot_diameter_fullres=scalefactors["spot_diameter_fullres"],
        counts=matrix,
        has_counts=has_counts,
        gene_names=gene_names,
        gene_ids=gene_ids,
        source=root,
        counts_source=counts_path,
    )


def visium_image_scale(visium: Visium, image: ImageName = "fullres") -> float:
    """Factor taking pixels of a Space Ranger image to full-resolution pixels.

    Pass it as ``slide_to_fullres`` when that image is the slide: 1 for the full-resolution
    image, ``1 / tissue_hires_scalef`` for ``tissue_hires_image.png``, ``1 / tissue_lowres_scalef``
    for ``tissue_lowres_image.png``.
    """
    if image == "fullres":
        return 1.0
    key = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}.get(image)
    if key is None:
        raise ValueError(f"image must be 'fullres', 'hires' or 'lowres', got {image!r}.")
    s = visium.scalefactors.get(key)
    if s is None or not (math.isfinite(s) and s > 0):
        raise VisiumError(f"{visium.source}: scalefactors have no positive {key!r} (got {s!r}).")
    return 1.0 / s


# --------------------------------------------------------------------------------------------
# Gene score and cell counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeneScore:
    """A per-spot gene score.

    Attributes
    ----------
    score : (n,) float64 ndarray; NaN where the spot has no counts (or zero total counts when
        normalising by library size).
    used : genes (as requested) found in the matrix.
    missing : genes not found.
    method : how the score was made, e.g. ``"mean cp10k-log1p of 3 genes"`` or the fallback.
    fallback : True when no requested gene was found and total counts were used.
    """

    score: NDArray[np.float64]
    used: tuple[str, ...]
    missing: tuple[str, ...]
    method: str
    fallback: bool = False


def _gene_columns(visium: Visium, gene: str) -> NDArray[np.intp]:
    names, ids = visium.gene_names, visium.gene_ids
    for hit in (
        names == gene,
        np.char.upper(names) == gene.upper(),
        ids == gene,
        ids == ENSEMBL_IDS.get(gene.upper(), "\0"),
    ):
        if hit.size and hit.any():
            return np.flatnonzero(hit)
    return np.asarray([], dtype=np.intp)


def immune_gene_score(
    visium: Visium,
    genes: Sequence[str] = DEFAULT_IMMUNE_GENES,
    *,
    normalise: Normalise = "cp10k-log1p",
    fallback: Fallback | None = None,
) -> GeneScore:
    """Mean normalised expression of a gene set in each spot.

    Parameters
    ----------
    visium : Visium
        Read with counts.
    genes : sequence of str
        Gene symbols or Ensembl ids.
    normalise : {"cp10k-log1p", "log1p", "none"}
        ``cp10k-log1p``: ``log1p(1e4 * count / total counts of the spot)`` (the scanpy default);
        ``log1p``: of raw counts; ``none``: raw counts.
    fallback : {"total-counts"} or None
        When no gene is found: None raises, ``"total-counts"`` scores ``log1p(total counts)``.

    Returns
    -------
    GeneScore
    """
    if visium.counts is None:
        raise VisiumError(
            f"{visium.source}: no count matrix was read; a gene score needs"
            " filtered_feature_bc_matrix.h5 (read_visium(..., counts=True or a path))."
        )
    if normalise not in ("cp10k-log1p", "log1p", "none"):
        raise ValueError(f"normalise must be 'cp10k-log1p', 'log1p' or 'none', got {normalise!r}.")
    requested = tuple(dict.fromkeys(str(g) for g in genes))
    if not requested:
        raise ValueError("genes is empty; pass at least one gene symbol or Ensembl id.")
    cols_per_gene = {g: _gene_columns(visium, g) for g in requested}
    used = tuple(g for g in requested if cols_per_gene[g].size)
    missing = tuple(g for g in requested if not cols_per_gene[g].size)
    x = visium.counts
    total = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    if not used:
        if fallback != "total-counts":
            sample = ", ".join(visium.gene_names[:5].tolist())
            raise VisiumError(
                f"none of the genes {list(requested)} is in {visium.counts_source}"
                f" ({visium.gene_names.size} features, e.g. {sample}). Pass genes present in the"
                " matrix (genes=...), or fallback=total-counts to compare with log1p(total"
                " counts) instead."
            )
        score = np.where(visium.has_counts, np.log1p(total), np.nan)
        return GeneScore(
            score=score,
            used=(),
            missing=missing,
            method=f"log1p(total counts over all {visium.gene_names.size} features) [fallback:"
            " no requested gene in the matrix]",
            fallback=True,
        )
    cols = np.concatenate([cols_per_gene[g] for g in used])
    sub = np.asarray(x[:, cols].toarray(), dtype=np.float64)
    valid = visium.has_counts.copy()
    if normalise == "cp10k-log1p":
        valid &= total > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            sub = np.log1p(1e4 * sub / total[:, None])
    elif normalise == "log1p":
        sub = np.log1p(sub)
    score = np.where(valid, sub.mean(axis=1), np.nan)
    return GeneScore(
        score=score,
        used=used,
        missing=missing,
        method=f"mean {normalise} of {len(used)} gene(s)",
    )


def count_cells_per_spot(
    cell_x_fullres: ArrayLike,
    cell_y_fullres: ArrayLike,
    visium: Visium,
    *,
    mask: ArrayLike | None = None,
) -> NDArray[np.int64]:
    """Cells whose centre lies within each spot's circle.

    Parameters
    ----------
    cell_x_fullres, cell_y_fullres : (N,) float ndarray
        Cell centres in full-resolution pixels.
    visium : Visium
        Spots (centres and diameter).
    mask : (N,) bool ndarray, optional
        Count only these cells (e.g. immune-positive ones).

    Returns
    -------
    (n_spots,) int64 ndarray
        Cells with distance to the spot centre <= ``spot_diameter_fullres / 2``.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(cell_x_fullres, dtype=np.float64).ravel()
    y = np.asarray(cell_y_fullres, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cell x and y must have equal length, got {x.size} and {y.size}.")
    keep = np.isfinite(x) & np.isfinite(y)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != x.shape or m.dtype != np.bool_:
            raise ValueError(f"mask must be an ({x.size},) bool array, got {m.dtype} {m.shape}.")
        keep &= m
    if not keep.any():
        return np.zeros(visium.n_spots, dtype=np.int64)
    tree = cKDTree(np.column_stack([x[keep], y[keep]]))
    n = tree.query_ball_point(visium.xy_fullres, r=visium.spot_radius_fullres, return_length=True)
    return np.asarray(n, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


SlideToFullres = float | Callable[[NDArray[np.float64]], NDArray[np.float64]]


def _map_points(transform: SlideToFullres, xy: NDArray[np.float64]) -> NDArray[np.float64]:
    if callable(transform):
        out = np.asarray(transform(xy), dtype=np.float64)
        if out.shape != xy.shape:
            raise ValueError(
                f"slide_to_fullres returned shape {out.shape} for points of shape {xy.shape};"
                " it must map (N, 2) level-0 (x, y) to (N, 2) full-resolution (x, y)."
            )
        return out
    s = float(transform)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(
            f"slide_to_fullres must be a positive scale (fullres px per slide level-0 px), got"
            f" {transform!r}; use visium_image_scale() when the slide is a Space Ranger PNG."
        )
    return xy * s


def _spot_centres_level0(transform: SlideToFullres, visium: Visium) -> NDArray[np.float64]:
    """(n, 2) spot centres in slide level-0 pixels; NaN when the transform has no inverse."""
    xy = visium.xy_fullres
    if not callable(transform):
        return xy / float(transform)
    inverse = getattr(transform, "inverse", None)
    if inverse is None:
        return np.full_like(xy, np.nan)
    return np.asarray(inverse()(xy), dtype=np.float64)


def _spots_on_slide(
    transform: SlideToFullres, visium: Visium, slide_size_level0: tuple[int, int]
) -> NDArray[np.bool_]:
    """Spots whose whole circle lies on the slide (so they cannot under-count cells)."""
    centre = _spot_centres_level0(transform, visium)
    if not np.isfinite(centre).all():
        raise ValueError(
            "slide_size_level0 needs slide_to_fullres.inverse() to place spots on the slide;"
            " pass a transform object with inverse(), or a scale."
        )
    rim = visium.xy_fullres + np.array([visium.spot_radius_fullres, 0.0])
    if callable(transform):
        rim_level0 = np.asarray(transform.inverse()(rim), dtype=np.float64)  # type: ignore[attr-defined]
    else:
        rim_level0 = rim / float(transform)
    r = np.hypot(*(rim_level0 - centre).T)
    w, h = slide_size_level0
    x, y = centre[:, 0], centre[:, 1]
    return (x - r >= 0) & (y - r >= 0) & (x + r <= w) & (y + r <= h)


def _describe(transform: SlideToFullres) -> Any:
    if callable(transform):
        to_dict = getattr(transform, "to_dict", None)
        return to_dict() if callable(to_dict) else repr(transform)
    return float(transform)


def _checked_inputs(
    cell_xy_level0: ArrayLike,
    cell_positive: ArrayLike | None,
    null: NullName,
    n_null: int,
    seed: int,
    n_spots: int,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Check :func:`st_validate`'s cells and null settings.

    Returns
    -------
    xy : (N, 2) float64 ndarray
        Cell centres in slide level-0 pixels.
    positive : (N,) bool ndarray
        Immune-positive cells (all True when ``cell_positive`` is None).
    """
    xy = np.asarray(cell_xy_level0, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"cell_xy_level0 must be (N, 2) level-0 (x, y), got shape {xy.shape}.")
    if cell_positive is None:
        positive = np.ones(xy.shape[0], dtype=bool)
    else:
        positive = np.asarray(cell_positive)
        if positive.shape != (xy.shape[0],) or positive.dtype != np.bool_:
            raise ValueError(
                f"cell_positive must be an ({xy.shape[0]},) bool array, got {positive.dtype}"
                f" {positive.shape}."
            )
    if null not in ("toroidal", "block"):
        raise ValueError(f"null must be 'toroidal' or 'block', got {null!r}.")
    check_null_options(n_null, seed, n_spots=n_spots)
    return xy, positive


@dataclass(frozen=True, eq=False)
class _SpotMaps:
    """The two maps :func:`st_validate` compares, with the per-spot counts behind them.

    Attributes
    ----------
    used : (n,) bool ndarray; spots compared.
    n_cells, n_positive : (n,) int64 ndarray; all / immune-positive cells in each spot.
    score : (n,) float64 ndarray; the gene score of every spot.
    centre_level0 : (n, 2) float64 ndarray; spot centres in slide level-0 px (NaN without an
        inverse transform).
    """

    used: NDArray[np.bool_]
    n_cells: NDArray[np.int64]
    n_positive: NDArray[np.int64]
    score: NDArray[np.float64]
    centre_level0: NDArray[np.float64]

    @property
    def n_used(self) -> int:
        """Spots compared."""
        return int(self.used.sum())

    @property
    def cells_map(self) -> NDArray[np.float64]:
        """Immune-positive cells per used spot, NaN elsewhere."""
        return np.where(self.used, self.n_positive.astype(np.float64), np.nan)

    @property
    def genes_map(self) -> NDArray[np.float64]:
        """Gene score of each used spot, NaN elsewhere."""
        return np.where(self.used, self.score, np.nan)


def _used_spots(
    visium: Visium,
    score: NDArray[np.float64],
    slide_to_fullres: SlideToFullres,
    slide_size_level0: tuple[int, int] | None,
    warnings: list[str],
) -> NDArray[np.bool_]:
    """Spots in tissue, with counts and a finite gene score (and wholly on the slide, if sized).

    Appends to ``warnings`` how many spots with data lie off the slide; raises
    :class:`VisiumError` when fewer than 3 spots are left to compare.
    """
    used = visium.in_tissue & visium.has_counts & np.isfinite(score)
    if slide_size_level0 is not None:
        on_slide = _spots_on_slide(slide_to_fullres, visium, slide_size_level0)
        off = int((used & ~on_slide).sum())
        if off:
            warnings.append(
                f"{off} spot(s) with data lie (partly) off the slide and were excluded."
            )
        used &= on_slide
    n_used = int(used.sum())
    if n_used < 3:
        raise VisiumError(
            f"only {n_used} spot(s) are in tissue, have counts and a gene score"
            f" (of {visium.n_spots}; {int(visium.has_counts.sum())} with counts): nothing to"
            " compare. Check that the count matrix belongs to these positions."
        )
    return used


def _spot_maps(
    xy: NDArray[np.float64],
    positive: NDArray[np.bool_],
    visium: Visium,
    score: NDArray[np.float64],
    slide_to_fullres: SlideToFullres,
    slide_size_level0: tuple[int, int] | None,
    warnings: list[str],
) -> _SpotMaps:
    """Count level-0 cells in each spot and choose the spots to compare (see :func:`_used_spots`)."""
    cells_fr = _map_points(slide_to_fullres, xy) if xy.size else xy
    n_cells = count_cells_per_spot(cells_fr[:, 0], cells_fr[:, 1], visium)
    n_pos = count_cells_per_spot(cells_fr[:, 0], cells_fr[:, 1], visium, mask=positive)
    centre_level0 = _spot_centres_level0(slide_to_fullres, visium)
    used = _used_spots(visium, score, slide_to_fullres, slide_size_level0, warnings)
    return _SpotMaps(used, n_cells, n_pos, score, centre_level0)


def _spearman(maps: _SpotMaps, warnings: list[str]) -> tuple[float, float]:
    """Spearman's rho and its naive p over the used spots; NaN, and a warning, if a map is flat."""
    from scipy.stats import spearmanr

    used, cells_map, genes_map = maps.used, maps.cells_map, maps.genes_map
    constant = [
        name
        for name, values in (("cell counts", cells_map[used]), ("gene score", genes_map[used]))
        if np.ptp(values) == 0
    ]
    if constant:
        # a rank correlation with a constant map is undefined: say why instead of scipy's warning
        warnings.append(
            f"the {' and the '.join(constant)} are constant over the {maps.n_used} spots used:"
            " no correlation can be measured (no positive cells detected? check stain=)."
        )
        return math.nan, math.nan
    rho, p_naive = spearmanr(cells_map[used], genes_map[used])
    return float(rho), float(p_naive)


def _warn_few_neighbours(W: sp.csr_array, used: NDArray[np.bool_], warnings: list[str]) -> None:
    """Warn when fewer than half the used spots have a used neighbour (few pairs to test)."""
    n_used = int(used.sum())
    with_neighbour = int(((W @ used.astype(np.float64)) > 0)[used].sum())
    if with_neighbour < 0.5 * n_used:
        warnings.append(
            f"only {with_neighbour} of {n_used} spots with data have a neighbouring spot with"
            " data: Moran's I and Lee's L rest on few pairs and the spatial null may be undefined."
        )


def _spatial_null(
    visium: Visium,
    used: NDArray[np.bool_],
    warnings: list[str],
    *,
    null: NullName,
    n_null: int,
    block_rows: int,
    min_overlap: float,
    alternative: Alternative,
    seed: int,
) -> tuple[NDArray[np.int64] | None, dict[str, Any]]:
    """Draw the spatial null over the used spots.

    Returns
    -------
    src : (n_null, n) int64 ndarray or None
        ``src[k, i]``: the spot whose value lands on spot ``i`` in draw ``k`` (see
        :mod:`spatial._spatialstats`); None when the spots admit no null, whose reason goes to
        ``warnings`` and to ``info["error"]``.
    info : dict
        The report's ``"null"`` entry.
    """
    null_info: dict[str, Any] = {
        "name": null,
        "n": n_null,
        "seed": seed,
        "alternative": alternative,
    }
    try:
        if null == "toroidal":
            null_info["min_overlap"] = min_overlap
            src = toroidal_null(
                visium.array_row,
                visium.array_col,
                n_null,
                valid=used,
                min_overlap=min_overlap,
                seed=seed,
            )
        else:
            null_info["block_rows"] = block_rows
            null_info["block_um"] = block_rows * 100.0 * math.sqrt(3) / 2
            src = block_permutation_null(
                visium.array_row,
                visium.array_col,
                n_null,
                block_rows=block_rows,
                valid=used,
                seed=seed,
            )
    except ValueError as exc:
        # A few scattered spots (e.g. a subset of barcodes) admit no spatial null; the
        # observed statistics are still reported, with the reason instead of a p-value.
        null_info["error"] = str(exc)
        warnings.append(f"spatial null unavailable: {exc}")
        return None, null_info
    return src, null_info


def _association(
    maps: _SpotMaps,
    W: sp.csr_array,
    src: NDArray[np.int64] | None,
    *,
    null: NullName,
    alternative: Alternative,
) -> tuple[float, dict[str, dict[str, Any]]]:
    """Spatial-null p of Spearman's rho, and Lee's L / the bivariate Moran's I.

    Without a null (``src`` None) the p-values are NaN and the bivariate statistics are the
    observed values only.
    """
    cells_map, genes_map = maps.cells_map, maps.genes_map
    if src is not None:
        assoc = association_test(
            cells_map, genes_map, W, src, alternative=alternative, null_name=null
        )
        return assoc["spearman"].p_value, {name: assoc[stat].as_dict() for name, stat in _BIVARIATE}
    return math.nan, {
        name: {
            "statistic": float(bivariate_association(cells_map, genes_map, W, statistic=stat)),
            "p_value": math.nan,
            "null": null,
            "n_null": 0,
            "n": maps.n_used,
        }
        for name, stat in _BIVARIATE
    }


def _map_statistics(
    visium: Visium,
    maps: _SpotMaps,
    warnings: list[str],
    *,
    n_null: int,
    null: NullName,
    block_rows: int,
    min_overlap: float,
    alternative: Alternative,
    seed: int,
) -> dict[str, Any]:
    """The report's ``"spearman"``, ``"moran"``, ``"bivariate"`` and ``"null"`` entries.

    Why a statistic is undefined or weak is appended to ``warnings``.
    """
    cells_map, genes_map = maps.cells_map, maps.genes_map
    rho, p_naive = _spearman(maps, warnings)
    W = hex_lattice_weights(visium.array_row, visium.array_col)
    _warn_few_neighbours(W, maps.used, warnings)
    moran = {
        "n_positive_cells": moran_test(cells_map, W, n_perm=n_null, seed=seed).as_dict(),
        "gene_score": moran_test(genes_map, W, n_perm=n_null, seed=seed + 1).as_dict(),
    }
    src, null_info = _spatial_null(
        visium,
        maps.used,
        warnings,
        null=null,
        n_null=n_null,
        block_rows=block_rows,
        min_overlap=min_overlap,
        alternative=alternative,
        seed=seed,
    )
    p_spatial, bivariate = _association(maps, W, src, null=null, alternative=alternative)
    return {
        "spearman": {"rho": rho, "p_naive": p_naive, "p_spatial": p_spatial},
        "moran": moran,
        "bivariate": bivariate,
        "null": null_info,
    }


def _visium_summary(visium: Visium) -> dict[str, Any]:
    """The report's ``"visium"`` entry: where the spots came from and their geometry."""
    return {
        "source": str(visium.source),
        "counts_source": str(visium.counts_source) if visium.counts_source else None,
        "n_spots_total": visium.n_spots,
        "n_spots_in_tissue": int(visium.in_tissue.sum()),
        "n_spots_with_counts": int(visium.has_counts.sum()),
        "spot_diameter_fullres": visium.spot_diameter_fullres,
        "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM,
        "mpp_fullres": visium.mpp_fullres,
        "scalefactors": dict(visium.scalefactors),
    }


def _cells_summary(
    xy: NDArray[np.float64], positive: NDArray[np.bool_], maps: _SpotMaps
) -> dict[str, Any]:
    """The report's ``"cells"`` entry: cells given and cells counted in the used spots."""
    used, n_pos = maps.used, maps.n_positive
    spot_area_mm2 = math.pi * (VISIUM_SPOT_DIAMETER_UM / 2000.0) ** 2
    return {
        "n_cells": int(xy.shape[0]),
        "n_positive": int(positive.sum()),
        "n_cells_in_used_spots": int(maps.n_cells[used].sum()),
        "n_positive_in_used_spots": int(n_pos[used].sum()),
        "mean_positive_per_mm2_in_used_spots": float(n_pos[used].mean() / spot_area_mm2),
    }


def _genes_summary(genes: Sequence[str], gs: GeneScore, normalise: Normalise) -> dict[str, Any]:
    """The report's ``"genes"`` entry: genes asked for, found and missing, and the score made."""
    return {
        "requested": list(dict.fromkeys(str(g) for g in genes)),
        "used": list(gs.used),
        "missing": list(gs.missing),
        "score": gs.method,
        "fallback": gs.fallback,
        "normalise": normalise,
    }


def _spot_rows(visium: Visium, maps: _SpotMaps) -> list[dict[str, Any]]:
    """The report's ``"spots"``: one row per Visium spot (the columns of ``spots.csv``)."""
    return [
        {
            "barcode": str(visium.barcodes[i]),
            "x_fullres": float(visium.pxl_x_fullres[i]),
            "y_fullres": float(visium.pxl_y_fullres[i]),
            "x_level0": float(maps.centre_level0[i, 0]),
            "y_level0": float(maps.centre_level0[i, 1]),
            "in_tissue": bool(visium.in_tissue[i]),
            "has_counts": bool(visium.has_counts[i]),
            "used": bool(maps.used[i]),
            "n_cells": int(maps.n_cells[i]),
            "n_positive": int(maps.n_positive[i]),
            "gene_score": float(maps.score[i]),
        }
        for i in range(visium.n_spots)
    ]


def st_validate(
    cell_xy_level0: ArrayLike,
    cell_positive: ArrayLike | None,
    visium: Visium,
    *,
    slide_to_fullres: SlideToFullres = 1.0,
    slide_size_level0: tuple[int, int] | None = None,
    genes: Sequence[str] = DEFAULT_IMMUNE_GENES,
    normalise: Normalise = "cp10k-log1p",
    fallback: Fallback | None = None,
    n_null: int = 999,
    null: NullName = "toroidal",
    block_rows: int = 8,
    min_overlap: float = 0.5,
    alternative: Alternative = "two-sided",
    seed: int = 0,
) -> dict[str, Any]:
    """Compare detected immune cells per Visium spot with an immune gene score.

    Spots used: in tissue, with counts, with a finite gene score (and, given
    ``slide_size_level0``, lying wholly on the slide).

    Parameters
    ----------
    cell_xy_level0 : (N, 2) float ndarray
        Cell centres ``(x, y)`` in slide level-0 pixels.
    cell_positive : (N,) bool ndarray or None
        Immune-positive cells; None counts every cell as immune.
    visium : Visium
        Read with counts.
    slide_to_fullres : float or callable
        Scale from slide level-0 px to full-resolution px (1.0: the slide is Space Ranger's
        full-resolution image; :func:`visium_image_scale` for the PNGs), or a transform mapping
        (N, 2) level-0 points to (N, 2) full-resolution points (with ``inverse()`` if
        ``slide_size_level0`` is given).
    slide_size_level0 : (width, height), optional
        Exclude spots not wholly on the slide (they would count zero cells wrongly).
    genes, normalise, fallback
        See :func:`immune_gene_score`.
    n_null : int
        Draws of the spatial null (and of the permutation null for Moran's I).
    null : {"toroidal", "block"}
        Spatial null for the association tests.
    block_rows : int
        Block height for ``null="block"`` (even; lattice rows).
    min_overlap : float
        For ``null="toroidal"``: the fraction of spots a shift must keep on spots with data.
    alternative : {"two-sided", "greater", "less"}
        Direction of the association tests.
    seed : int
        Randomness of both nulls.

    Returns
    -------
    dict
        JSON-ready report (NaN for undefined values), with ``"spots"``: one row per Visium spot
        (barcode, x/y in full-resolution and level-0 px, in_tissue, has_counts, used, n_cells,
        n_positive, gene_score). ``"warnings"`` lists why a statistic may be undefined or weak.
    """
    xy, positive = _checked_inputs(
        cell_xy_level0, cell_positive, null, n_null, seed, visium.n_spots
    )
    gs = immune_gene_score(visium, genes, normalise=normalise, fallback=fallback)
    warnings: list[str] = []
    maps = _spot_maps(xy, positive, visium, gs.score, slide_to_fullres, slide_size_level0, warnings)
    statistics = _map_statistics(
        visium,
        maps,
        warnings,
        n_null=n_null,
        null=null,
        block_rows=block_rows,
        min_overlap=min_overlap,
        alternative=alternative,
        seed=seed,
    )
    return {
        "kind": "oncotrace.st_validation",
        "version": __version__,
        "visium": _visium_summary(visium),
        "slide_to_fullres": _describe(slide_to_fullres),
        "n_spots": maps.n_used,
        "cells": _cells_summary(xy, positive, maps),
        "genes": _genes_summary(genes, gs, normalise),
        **statistics,  # "spearman", "moran", "bivariate", "null", in this order
        "warnings": warnings,
        "spots": _spot_rows(visium, maps),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


_SPOT_COLUMNS = (
    "barcode",
    "x_fullres",
    "y_fullres",
    "x_level0",
    "y_level0",
    "in_tissue",
    "has_counts",
    "used",
    "n_cells",
    "n_positive",
    "gene_score",
)


def _write_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    with _atomic(final) as tmp:
        write(tmp)
    return final


def write_st_report(
    report: Mapping[str, Any], out_dir: str | Path, *, png: bool = True
) -> dict[str, Path]:
    """Write ``st_validation.json``, ``spots.csv`` and (optionally) ``st_validation.png``.

    Each file is written under a temporary name and renamed when complete. The JSON holds the
    report without the per-spot rows (NaN as null); the CSV holds those rows (empty cells for
    NaN); the PNG shows both maps on the spot positions and their scatter plot.

    Parameters
    ----------
    report : dict
        From :func:`st_validate`.
    out_dir : str or Path
        Created if missing.

    Returns
    -------
    dict name -> path written ("json", "csv", "png").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spots = list(report.get("spots", []))
    doc = {k: v for k, v in report.items() if k != "spots"}
    doc["spots_csv"] = "spots.csv"
    paths: dict[str, Path] = {}

    def write_json(tmp: Path) -> None:
        tmp.write_text(json.dumps(_json_ready(doc), indent=2) + "\n", encoding="utf-8")

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(_SPOT_COLUMNS)
            for row in spots:
                cells = []
                for c in _SPOT_COLUMNS:
                    v = row[c]
                    if isinstance(v, float):
                        cells.append("" if not math.isfinite(v) else f"{v:.6g}")
                    elif isinstance(v, bool):
                        cells.append(str(int(v)))
                    else:
                        cells.append(str(v))
                w.writerow(cells)

    paths["csv"] = _write_atomic(out / "spots.csv", write_csv)
    if png and spots:
        paths["png"] = _write_atomic(
            out / "st_validation.png", lambda tmp: _render_png(report, spots, tmp)
        )
    # The JSON goes last: its presence means the folder is complete.
    paths["json"] = _write_atomic(out / "st_validation.json", write_json)
    return paths


def _score_label(genes: Mapping[str, Any]) -> str:
    if genes.get("fallback"):
        return "log1p total counts (fallback: no requested gene)"
    used = list(genes.get("used", []))
    shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
    return f"gene score ({shown})"


def _render_png(report: Mapping[str, Any], spots: Sequence[Mapping[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [s for s in spots if s["used"]]
    x = np.array([s["x_fullres"] for s in rows])
    y = np.array([s["y_fullres"] for s in rows])
    cells = np.array([s["n_positive"] for s in rows], dtype=np.float64)
    score = np.array([s["gene_score"] for s in rows], dtype=np.float64)
    fig = Figure(figsize=(13.5, 4.5), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    size = max(2.0, 6000.0 / max(len(rows), 1))
    for ax, values, title in (
        (axes[0], cells, "immune cells per spot"),
        (axes[1], score, _score_label(report["genes"])),
    ):
        sc = ax.scatter(x, y, c=values, s=size, cmap="viridis", linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(sc, ax=ax, shrink=0.8)
    sp_ = report["spearman"]
    axes[2].scatter(cells, score, s=6, alpha=0.6)
    axes[2].set_xlabel("immune cells per spot")
    axes[2].set_ylabel("gene score")
    axes[2].set_title(
        f"Spearman rho {sp_['rho']:.2f}, naive p {sp_['p_naive']:.2g},"
        f" {report['null']['name']} p {sp_['p_spatial']:.2g} (n={report['n_spots']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
