"""Spatial statistics for maps on spot lattices, with nulls that respect spatial autocorrelation.

Two smooth maps that have nothing to do with each other are still often strongly correlated
by chance, because neighbouring spots are not independent samples: the naive Spearman p-value
assumes ``n`` independent spots and is far too small. The association tests here compare the
observed statistic with a *spatially aware* null that keeps each map's autocorrelation and
breaks only the alignment between the two maps:

* :func:`toroidal_null` shifts one map over the Visium hex lattice by a random
  ``(d_row, d_col)`` with wrap-around (``d_row + d_col`` even, so hex parity is kept);
* :func:`block_permutation_null` cuts the lattice into square blocks and permutes whole blocks.

Both return *source maps*: for null draw ``k`` and spot ``i``, the index of the spot whose value
lands on ``i`` (``-1`` when it lands on background). :func:`association_test` evaluates Spearman's
rho, Lee's L and the bivariate Moran's I on all draws at once (one sparse-dense product).

Moran's I of a single map is tested against random permutation of its values over the spots:
that *is* the null of "no spatial autocorrelation", so a spatially aware null is not wanted there
(a toroidal shift keeps a map's autocorrelation and would test nothing).

Weights are always averaged over the *valid* neighbours of a spot (row-standardised after
missing spots are dropped); spots without valid neighbours contribute nothing (islands).
Moran's I and the bivariate Moran's I then agree with PySAL's ``esda.Moran`` and
``esda.Moran_BV`` on row-standardised weights; Lee's L follows Lee (2001), J. Geogr. Syst. 3:369.

The formulas are written here with :mod:`scipy.sparse` rather than depending on esda/libpysal:
those pull geopandas, pyogrio (GDAL), pyproj and pandas, about 250 MB for three formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree
from scipy.stats import rankdata

Alternative = Literal["two-sided", "greater", "less"]
Statistic = Literal["spearman", "lee", "moran_bv"]
NullName = Literal["toroidal", "block"]

#: Null draws evaluated per sparse-dense product; bounds memory at about 8 * n_spots * this bytes
#: per temporary (5k spots: 10 MB).
_CHUNK = 256
_STATISTICS: tuple[Statistic, ...] = ("spearman", "lee", "moran_bv")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _lattice(
    array_row: ArrayLike, array_col: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    row = np.asarray(array_row)
    col = np.asarray(array_col)
    if row.ndim != 1 or row.shape != col.shape:
        raise ValueError(
            f"array_row and array_col must be 1-D and of equal length, got shapes {row.shape}"
            f" and {col.shape}."
        )
    if row.dtype.kind not in "iu" or col.dtype.kind not in "iu":
        raise ValueError("array_row and array_col must be integer Visium array indices.")
    if row.size and (row.min() < 0 or col.min() < 0):
        raise ValueError("array_row and array_col must be non-negative Visium array indices.")
    return row.astype(np.int64), col.astype(np.int64)


def hex_lattice_weights(array_row: ArrayLike, array_col: ArrayLike) -> sp.csr_array:
    """Binary neighbour weights of spots on the Visium hexagonal array.

    Visium numbers spots on a doubled-column hex lattice: a spot ``(row, col)`` has ``row + col``
    even and its six neighbours at ``(row, col +- 2)`` and ``(row +- 1, col +- 1)``.

    Parameters
    ----------
    array_row, array_col : (n,) int ndarray
        Space Ranger ``array_row`` / ``array_col`` of each spot.

    Returns
    -------
    W : (n, n) float64 scipy.sparse.csr_array
        ``W[i, j] = 1`` when spots ``i`` and ``j`` are lattice neighbours; symmetric, zero diagonal.
    """
    row, col = _lattice(array_row, array_col)
    n = row.size
    if n == 0:
        return sp.csr_array((0, 0), dtype=np.float64)
    width = int(col.max()) + 3
    key = row * width + col
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    if np.any(sorted_key[1:] == sorted_key[:-1]):
        raise ValueError("two spots share the same (array_row, array_col); positions are corrupt.")
    rows: list[NDArray[np.int64]] = []
    cols: list[NDArray[np.int64]] = []
    for dr, dc in ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        nkey = (row + dr) * width + (col + dc)
        pos = np.clip(np.searchsorted(sorted_key, nkey), 0, n - 1)
        hit = (sorted_key[pos] == nkey) & (col + dc >= 0) & (row + dr >= 0)
        rows.append(np.flatnonzero(hit))
        cols.append(order[pos[hit]])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    return sp.csr_array((np.ones(r.size), (r, c)), shape=(n, n))


def knn_weights(xy: ArrayLike, k: int = 6) -> sp.csr_array:
    """Binary, symmetrised k-nearest-neighbour weights on point positions.

    Parameters
    ----------
    xy : (n, 2) float ndarray
        Positions (any unit).
    k : int
        Neighbours per point (6 matches a hexagonal lattice).

    Returns
    -------
    W : (n, n) float64 scipy.sparse.csr_array
        ``W[i, j] = 1`` when ``j`` is among the ``k`` nearest of ``i`` or vice versa.
    """
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"xy must be an (n, 2) array of positions, got shape {pts.shape}.")
    n = pts.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}.")
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    r = np.repeat(np.arange(n), k)
    c = np.asarray(idx)[:, 1:].ravel()
    w = sp.csr_array((np.ones(r.size), (r, c)), shape=(n, n))
    w = ((w + w.T) > 0).astype(np.float64)
    w.setdiag(0)
    w.eliminate_zeros()
    return sp.csr_array(w)


def _as_weights(W: sp.sparray | sp.spmatrix, n: int) -> sp.csr_array:
    if not sp.issparse(W):
        raise ValueError("W must be a scipy.sparse matrix; build it with hex_lattice_weights().")
    w = sp.csr_array(W, dtype=np.float64)
    if w.shape != (n, n):
        raise ValueError(f"W has shape {w.shape} but the values have {n} spots.")
    if w.nnz and float(w.data.min()) < 0:
        raise ValueError("W must have non-negative weights.")
    return w


# --------------------------------------------------------------------------------------------
# Statistics (batched: columns are maps, NaN marks a missing spot)
# --------------------------------------------------------------------------------------------


def _as_values(values: ArrayLike, name: str) -> tuple[NDArray[np.float64], bool]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        return arr[:, None], True
    if arr.ndim == 2:
        return arr, False
    raise ValueError(f"{name} must be (n,) or (n, K), got shape {arr.shape}.")


def _standardised_lag(
    W: sp.csr_array, values: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Centred values, their row-standardised spatial lag and the valid mask, per column.

    Missing spots (NaN) are dropped from every column before centring and before averaging
    neighbours, so the lag of a spot is the mean of its *valid* neighbours (0 for islands).
    """
    valid = np.isfinite(values)
    m = valid.astype(np.float64)
    count = m.sum(axis=0)
    filled = np.where(valid, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / count
    z = np.where(valid, filled - mean, 0.0)
    n_nb = W @ m
    with np.errstate(invalid="ignore", divide="ignore"):
        lag = np.where(n_nb > 0, (W @ z) / n_nb, 0.0)
    lag = np.where(valid, lag, 0.0)
    return z, lag, valid & (n_nb > 0)


def _finish(out: NDArray[np.float64], scalar: bool) -> float | NDArray[np.float64]:
    return float(out[0]) if scalar else out


def morans_i(values: ArrayLike, W: sp.sparray | sp.spmatrix) -> float | NDArray[np.float64]:
    """Moran's I with row-standardised weights over the valid spots.

    ``I = (n / S0) * sum_i z_i lag_i / sum_i z_i**2`` where ``z`` is the centred map, ``lag`` the
    mean of ``z`` over a spot's valid neighbours and ``S0`` the number of valid spots that have
    at least one valid neighbour. Under no autocorrelation ``E[I] = -1 / (n - 1)``.

    Parameters
    ----------
    values : (n,) or (n, K) float ndarray
        One map, or ``K`` maps as columns; NaN marks a spot to leave out.
    W : (n, n) scipy.sparse matrix
        Non-negative neighbour weights (e.g. :func:`hex_lattice_weights`).

    Returns
    -------
    float, or (K,) float64 ndarray for 2-D ``values``; NaN where a map is constant or has < 3 spots.
    """
    v, scalar = _as_values(values, "values")
    w = _as_weights(W, v.shape[0])
    z, lag, has_nb = _standardised_lag(w, v)
    n = np.isfinite(v).sum(axis=0)
    s0 = has_nb.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (n / s0) * (z * lag).sum(axis=0) / (z * z).sum(axis=0)
    out[(n < 3) | (s0 == 0)] = np.nan
    return _finish(np.asarray(out, np.float64), scalar)


def _joint(
    x: NDArray[np.float64], y: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Restrict both maps to the spots where both are finite (NaN elsewhere), column by column."""
    both = np.isfinite(x) & np.isfinite(y)
    return np.where(both, x, np.nan), np.where(both, y, np.nan)


def _bivariate(
    x: NDArray[np.float64], y: NDArray[np.float64], W: sp.csr_array, statistic: Statistic
) -> NDArray[np.float64]:
    xb, yb = np.broadcast_arrays(x, y)
    xj, yj = _joint(np.array(xb), np.array(yb))
    n = np.isfinite(xj).sum(axis=0)
    if statistic == "spearman":
        rx = rankdata(xj, axis=0, nan_policy="omit")
        ry = rankdata(yj, axis=0, nan_policy="omit")
        zx = np.nan_to_num(rx - np.nanmean(rx, axis=0))
        zy = np.nan_to_num(ry - np.nanmean(ry, axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (zx * zy).sum(0) / np.sqrt((zx * zx).sum(0) * (zy * zy).sum(0))
    else:
        zx, lagx, has_nb = _standardised_lag(W, xj)
        zy, lagy, _ = _standardised_lag(W, yj)
        s0 = has_nb.sum(axis=0)
        norm = np.sqrt((zx * zx).sum(axis=0) * (zy * zy).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            if statistic == "moran_bv":
                # Wartenberg's I_xy = (n / S0) * z_x' W z_y / (|z_x| |z_y|): x against y's lag.
                out = (n / s0) * (zx * lagy).sum(axis=0) / norm
            elif statistic == "lee":
                # Lee's L: correlation of the two smoothed maps, scaled by n / sum_i (sum_j w_ij)^2
                # which is n / S0 once rows are standardised.
                out = (n / s0) * (lagx * lagy).sum(axis=0) / norm
            else:
                raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}.")
        out[s0 == 0] = np.nan
    out = np.asarray(out, np.float64)
    out[n < 3] = np.nan
    return out


def bivariate_association(
    x: ArrayLike,
    y: ArrayLike,
    W: sp.sparray | sp.spmatrix,
    *,
    statistic: Statistic = "lee",
) -> float | NDArray[np.float64]:
    """Spatial association of two maps over the spots where both are finite.

    Parameters
    ----------
    x : (n,) float ndarray
        First map (NaN = missing).
    y : (n,) or (n, K) float ndarray
        Second map, or ``K`` versions of it as columns (e.g. null draws); NaN = missing.
    W : (n, n) scipy.sparse matrix
        Non-negative neighbour weights.
    statistic : {"lee", "moran_bv", "spearman"}
        ``"lee"``: Lee's L (symmetric; the correlation of the spatially smoothed maps, scaled);
        ``"moran_bv"``: Wartenberg's bivariate Moran's I (``x`` against the lag of ``y``);
        ``"spearman"``: Spearman's rho, ignoring ``W``.

    Returns
    -------
    float, or (K,) float64 ndarray for 2-D ``y``.
    """
    xv, _ = _as_values(x, "x")
    yv, scalar = _as_values(y, "y")
    if xv.shape[1] != 1 or xv.shape[0] != yv.shape[0]:
        raise ValueError(f"x must be (n,) with n = {yv.shape[0]} spots, got {np.shape(x)}.")
    w = _as_weights(W, yv.shape[0])
    return _finish(_bivariate(xv, yv, w, statistic), scalar)


# --------------------------------------------------------------------------------------------
# Nulls
# --------------------------------------------------------------------------------------------


def _valid_mask(valid: ArrayLike | None, n: int) -> NDArray[np.bool_]:
    if valid is None:
        return np.ones(n, dtype=bool)
    v = np.asarray(valid)
    if v.shape != (n,) or v.dtype != np.bool_:
        raise ValueError(f"valid must be an (n,) bool mask with n = {n}, got {v.dtype} {v.shape}.")
    return v


def _lattice_index(
    row: NDArray[np.int64], col: NDArray[np.int64], n_rows: int, n_cols: int
) -> NDArray[np.int64]:
    """Dense (n_rows, n_cols) lattice with the spot index in each occupied cell, -1 elsewhere."""
    grid = np.full((n_rows, n_cols), -1, dtype=np.int64)
    grid[row, col] = np.arange(row.size)
    return grid


def _even_ceiling(v: int) -> int:
    return v + (v % 2)


def _null_lattice(
    array_row: ArrayLike, array_col: ArrayLike, valid: ArrayLike | None, n_null: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """Checked lattice indices and valid mask shared by the spatial nulls."""
    row, col = _lattice(array_row, array_col)
    ok = _valid_mask(valid, row.size)
    if n_null < 1:
        raise ValueError(f"n_null must be >= 1, got {n_null}.")
    return row, col, ok


def toroidal_null(
    array_row: ArrayLike,
    array_col: ArrayLike,
    n_null: int,
    *,
    valid: ArrayLike | None = None,
    min_overlap: float = 0.5,
    seed: int | np.random.Generator | None = 0,
) -> NDArray[np.int64]:
    """Random toroidal shifts of a map over the Visium hex lattice.

    The lattice is wrapped on a torus of even size (so a shift with ``d_row + d_col`` even maps
    hex cells onto hex cells) and each draw shifts the whole map by one uniformly chosen shift,
    keeping its autocorrelation. Shifts that move fewer than ``min_overlap`` of the valid spots
    onto valid spots are redrawn (a map shifted mostly off the tissue tests little); the zero
    shift is excluded.

    Parameters
    ----------
    array_row, array_col : (n,) int ndarray
        Visium lattice indices of the spots.
    n_null : int
        Number of draws.
    valid : (n,) bool ndarray, optional
        Spots that carry a value (others neither send nor receive values).
    min_overlap : float
        Minimum fraction of valid spots that must receive a valid value in every draw.
    seed : int or numpy Generator
        Randomness.

    Returns
    -------
    src : (n_null, n) int64 ndarray
        ``src[k, i]``: the spot whose value lands on spot ``i`` in draw ``k``; -1 for none.
    """
    row, col, ok = _null_lattice(array_row, array_col, valid, n_null)
    n = row.size
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be a fraction in [0, 1], got {min_overlap}.")
    if n == 0 or not ok.any():
        raise ValueError("toroidal_null needs at least one valid spot.")
    n_rows = _even_ceiling(int(row.max()) + 1)
    n_cols = _even_ceiling(int(col.max()) + 1)
    grid = _lattice_index(row[ok], col[ok], n_rows, n_cols)
    valid_idx = np.flatnonzero(ok)
    grid = np.where(grid >= 0, valid_idx[np.maximum(grid, 0)], -1)
    # Every parity-preserving shift; its overlap with the valid spots decides if it may be drawn.
    dr_all, dc_all = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = ((dr_all + dc_all) % 2 == 0) & ((dr_all != 0) | (dc_all != 0))
    shifts = np.column_stack([dr_all[keep], dc_all[keep]])
    rr, cc = row[ok], col[ok]
    n_valid = int(ok.sum())
    overlap = np.empty(len(shifts), dtype=np.int64)
    occupied = grid >= 0
    for k0 in range(0, len(shifts), 512):
        s = shifts[k0 : k0 + 512]
        src_r = (rr[None, :] - s[:, :1]) % n_rows
        src_c = (cc[None, :] - s[:, 1:]) % n_cols
        overlap[k0 : k0 + 512] = occupied[src_r, src_c].sum(axis=1)
    allowed = shifts[overlap >= math.ceil(min_overlap * n_valid)]
    if len(allowed) == 0:
        raise ValueError(
            f"no toroidal shift keeps {min_overlap:.0%} of the {n_valid} valid spots on valid spots;"
            " lower min_overlap or use the block-permutation null."
        )
    rng = np.random.default_rng(seed)
    pick = allowed[rng.integers(0, len(allowed), size=n_null)]
    src = np.full((n_null, n), -1, dtype=np.int64)
    src[:, ok] = grid[(rr[None, :] - pick[:, :1]) % n_rows, (cc[None, :] - pick[:, 1:]) % n_cols]
    return src


def block_permutation_null(
    array_row: ArrayLike,
    array_col: ArrayLike,
    n_null: int,
    *,
    block_rows: int = 8,
    valid: ArrayLike | None = None,
    seed: int | np.random.Generator | None = 0,
) -> NDArray[np.int64]:
    """Random permutations of square blocks of the Visium lattice.

    The lattice is cut into blocks of ``block_rows`` rows by ``2 * block_rows`` columns (Visium
    columns are half a spot pitch apart, so blocks are about square: 8 rows ~ 690 x 800 um).
    Blocks that hold at least one valid spot are permuted among themselves; each keeps its
    inner layout, so autocorrelation shorter than a block survives. ``block_rows`` must be even
    so hex parity is kept, and should exceed the correlation length of the maps.

    Parameters and result as :func:`toroidal_null`, with ``block_rows`` (int, even) the block
    height in lattice rows instead of ``min_overlap``.
    """
    row, col, ok = _null_lattice(array_row, array_col, valid, n_null)
    n = row.size
    if block_rows < 2 or block_rows % 2:
        raise ValueError(f"block_rows must be an even number >= 2, got {block_rows}.")
    b_r, b_c = block_rows, 2 * block_rows
    n_rows = -(-(int(row.max()) + 1) // b_r) * b_r
    n_cols = -(-(int(col.max()) + 1) // b_c) * b_c
    grid = np.full((n_rows, n_cols), -1, dtype=np.int64)
    grid[row[ok], col[ok]] = np.flatnonzero(ok)
    # (n_blocks, b_r * b_c): the spot index at every offset of every block.
    blocks = (
        grid.reshape(n_rows // b_r, b_r, n_cols // b_c, b_c).swapaxes(1, 2).reshape(-1, b_r * b_c)
    )
    used = np.flatnonzero((blocks >= 0).any(axis=1))
    if used.size < 2:
        raise ValueError(
            f"only {used.size} block of {block_rows} rows holds valid spots; use a smaller"
            " block_rows or the toroidal null."
        )
    block_of = (row // b_r) * (n_cols // b_c) + col // b_c
    offset = (row % b_r) * b_c + col % b_c
    position = np.full(blocks.shape[0], -1, dtype=np.int64)
    position[used] = np.arange(used.size)
    rng = np.random.default_rng(seed)
    src = np.full((n_null, n), -1, dtype=np.int64)
    target_pos = position[block_of[ok]]
    for k in range(n_null):
        perm = used[rng.permutation(used.size)]
        src[k, ok] = blocks[perm[target_pos], offset[ok]]
    return src


def apply_null(values: ArrayLike, src: NDArray[np.int64]) -> NDArray[np.float64]:
    """Move a map by null source maps.

    Parameters
    ----------
    values : (n,) float ndarray
        The map.
    src : (K, n) int ndarray
        From :func:`toroidal_null` or :func:`block_permutation_null`.

    Returns
    -------
    (n, K) float64 ndarray; column ``k`` is the map under draw ``k`` (NaN where nothing lands).
    """
    v = np.asarray(values, dtype=np.float64)
    s = np.asarray(src)
    if v.ndim != 1 or s.ndim != 2 or s.shape[1] != v.size:
        raise ValueError(f"src must be (K, {v.size}) for {v.size} values, got {s.shape}.")
    out = np.where(s >= 0, v[np.maximum(s, 0)], np.nan)
    return np.ascontiguousarray(out.T)


def permutation_pvalue(
    observed: float, null: ArrayLike, *, alternative: Alternative = "two-sided"
) -> float:
    """Monte-Carlo p-value ``(k + 1) / (m + 1)``, with ``k`` null draws at least as extreme.

    Two-sided compares ``|null - centre|`` with ``|observed - centre|`` where ``centre`` is the
    null mean (the nulls here are not centred on 0: Moran's I has mean ``-1/(n-1)``). Draws that
    are NaN (too few overlapping spots) are dropped from ``m``.
    """
    d = np.asarray(null, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if not math.isfinite(observed) or d.size == 0:
        return math.nan
    if alternative == "greater":
        k = int((d >= observed).sum())
    elif alternative == "less":
        k = int((d <= observed).sum())
    elif alternative == "two-sided":
        centre = float(d.mean())
        k = int((np.abs(d - centre) >= abs(observed - centre)).sum())
    else:
        raise ValueError(
            f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}."
        )
    return (k + 1) / (d.size + 1)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestResult:
    """One statistic, its Monte-Carlo p-value and the null it came from.

    Attributes
    ----------
    statistic : observed value.
    p_value : ``(k + 1) / (m + 1)`` Monte-Carlo p-value.
    null : name of the null ("permutation", "toroidal", "block").
    n_null : valid null draws ``m``.
    null_mean, null_sd : of the null draws.
    n : spots the observed statistic used.
    """

    __test__ = False  # not a pytest class

    statistic: float
    p_value: float
    null: str
    n_null: int
    null_mean: float
    null_sd: float
    n: int

    def as_dict(self) -> dict[str, float | int | str]:
        """JSON-ready fields (NaN -> None is left to the writer)."""
        return {
            "statistic": self.statistic,
            "p_value": self.p_value,
            "null": self.null,
            "n_null": self.n_null,
            "null_mean": self.null_mean,
            "null_sd": self.null_sd,
            "n": self.n,
        }


def _result(
    observed: float, null: NDArray[np.float64], name: str, n: int, alt: Alternative
) -> TestResult:
    d = null[np.isfinite(null)]
    return TestResult(
        statistic=float(observed),
        p_value=permutation_pvalue(observed, d, alternative=alt),
        null=name,
        n_null=int(d.size),
        null_mean=float(d.mean()) if d.size else math.nan,
        null_sd=float(d.std(ddof=1)) if d.size > 1 else math.nan,
        n=n,
    )


def _chunks(k: int) -> Iterator[slice]:
    for start in range(0, k, _CHUNK):
        yield slice(start, min(start + _CHUNK, k))


def moran_test(
    values: ArrayLike,
    W: sp.sparray | sp.spmatrix,
    *,
    n_perm: int = 999,
    alternative: Alternative = "greater",
    seed: int | np.random.Generator | None = 0,
) -> TestResult:
    """Moran's I with a random-permutation p-value (values shuffled over the valid spots).

    Parameters
    ----------
    values : (n,) float ndarray
        The map; NaN marks spots to leave out.
    W : (n, n) scipy.sparse matrix
        Neighbour weights.
    n_perm : int
        Permutations.
    alternative : {"greater", "less", "two-sided"}
        "greater" tests for positive autocorrelation (clustering).
    seed : int or numpy Generator
        Randomness.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be (n,), got shape {v.shape}.")
    w = _as_weights(W, v.size)
    observed = float(morans_i(v, w))
    idx = np.flatnonzero(np.isfinite(v))
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm, dtype=np.float64)
    for sl in _chunks(n_perm):
        k = sl.stop - sl.start
        draws = np.full((v.size, k), np.nan)
        perm = rng.permuted(np.broadcast_to(v[idx], (k, idx.size)), axis=1)
        draws[idx, :] = perm.T
        null[sl] = morans_i(draws, w)
    return _result(observed, null, "permutation", int(idx.size), alternative)


def association_test(
    x: ArrayLike,
    y: ArrayLike,
    W: sp.sparray | sp.spmatrix,
    src: NDArray[np.int64],
    *,
    statistics: Sequence[Statistic] = _STATISTICS,
    alternative: Alternative = "two-sided",
    null_name: str = "spatial",
) -> dict[str, TestResult]:
    """Association of two maps against a spatial null that moves ``y`` over the lattice.

    Parameters
    ----------
    x, y : (n,) float ndarray
        The two maps (NaN = missing; only spots where both are finite count).
    W : (n, n) scipy.sparse matrix
        Neighbour weights for Lee's L and the bivariate Moran's I.
    src : (K, n) int ndarray
        Null source maps from :func:`toroidal_null` / :func:`block_permutation_null`.
    statistics : sequence of {"spearman", "lee", "moran_bv"}
        What to compute.
    alternative : {"two-sided", "greater", "less"}
        Direction of the test.
    null_name : str
        Recorded in the results ("toroidal", "block").

    Returns
    -------
    dict statistic name -> :class:`TestResult`.
    """
    xv = np.asarray(x, dtype=np.float64)
    yv = np.asarray(y, dtype=np.float64)
    if xv.ndim != 1 or xv.shape != yv.shape:
        raise ValueError(f"x and y must be (n,) of equal length, got {xv.shape} and {yv.shape}.")
    w = _as_weights(W, xv.size)
    for s in statistics:
        if s not in _STATISTICS:
            raise ValueError(f"statistics must be among {_STATISTICS}, got {s!r}.")
    n_obs = int((np.isfinite(xv) & np.isfinite(yv)).sum())
    observed = {s: float(_bivariate(xv[:, None], yv[:, None], w, s)[0]) for s in statistics}
    k_total = np.asarray(src).shape[0]
    null = {s: np.empty(k_total) for s in statistics}
    for sl in _chunks(k_total):
        ys = apply_null(yv, np.asarray(src)[sl])
        for s in statistics:
            null[s][sl] = _bivariate(xv[:, None], ys, w, s)
    return {s: _result(observed[s], null[s], null_name, n_obs, alternative) for s in statistics}
