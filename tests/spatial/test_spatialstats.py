"""Spatial statistics: hand-computed values, planted fields, and calibration of the spatial nulls."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.typing import NDArray
from oncotrace.spatial import (
    apply_null,
    association_test,
    bivariate_association,
    block_permutation_null,
    hex_lattice_weights,
    knn_weights,
    moran_test,
    morans_i,
    permutation_pvalue,
    toroidal_null,
)
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

PATH4 = sp.csr_array(
    np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=np.float64)
)


def hex_lattice(n_rows: int, n_cols: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Visium-style doubled-column hex lattice: (row + col) even."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (r + c) % 2 == 0
    return r[keep].astype(np.int64), c[keep].astype(np.int64)


def smooth_field(
    rng: np.random.Generator, row: NDArray[np.int64], col: NDArray[np.int64], sigma: float
) -> NDArray[np.float64]:
    """Gaussian-smoothed white noise sampled at the spots (rows are ~sqrt(3) columns apart)."""
    grid = rng.normal(size=(2 * (int(row.max()) + 1), int(col.max()) + 1))
    return gaussian_filter(grid, sigma=(2 * sigma, sigma))[2 * row, col]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_hex_weights_have_six_neighbours_inside_and_match_knn_on_positions() -> None:
    row, col = hex_lattice(10, 20)
    W = hex_lattice_weights(row, col)
    assert (W != W.T).nnz == 0
    degree = np.asarray(W.sum(axis=1)).ravel()
    interior = (row > 0) & (row < 9) & (col > 1) & (col < 18)
    assert np.all(degree[interior] == 6)
    # A corner spot (0, 0) touches (0, 2) and (1, 1) only.
    assert degree[(row == 0) & (col == 0)][0] == 2
    # Physical positions of a regular hex lattice: the six nearest are the lattice neighbours
    # (away from the edge, where edge spots reach further and symmetrising adds their links).
    xy = np.column_stack([col * 50.0, row * 50.0 * np.sqrt(3)])
    K = knn_weights(xy, k=6)
    deep = (row >= 3) & (row <= 6) & (col >= 6) & (col <= 13)
    assert np.array_equal(K[deep].toarray(), W[deep].toarray())


def test_hex_weights_reject_duplicate_spots() -> None:
    with pytest.raises(ValueError, match="share the same"):
        hex_lattice_weights(np.array([0, 0]), np.array([2, 2]))


# --------------------------------------------------------------------------------------------
# Statistics against hand-computed values
# --------------------------------------------------------------------------------------------


def test_morans_i_on_a_path_equals_the_hand_value() -> None:
    # z = (-1.5, -0.5, 0.5, 1.5); row-standardised lags (-0.5, -0.5, 0.5, 0.5);
    # sum z * lag = 2, sum z^2 = 5, n / S0 = 1 -> I = 0.4.
    assert morans_i(np.array([1.0, 2.0, 3.0, 4.0]), PATH4) == pytest.approx(0.4)


def test_morans_i_drops_missing_spots_and_their_links() -> None:
    # Spot 2 missing: valid 0, 1, 3 with mean 7/3, z = (-4/3, -1/3, 5/3); only 0-1 linked, 3 is
    # an island. sum z * lag = 8/9, sum z^2 = 42/9, n = 3, S0 = 2 -> I = 1.5 * 8 / 42.
    assert morans_i(np.array([1.0, 2.0, np.nan, 4.0]), PATH4) == pytest.approx(1.5 * 8 / 42)


def test_bivariate_statistics_reduce_to_hand_values() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # Bivariate Moran of a map with itself is its Moran's I.
    assert bivariate_association(x, x, PATH4, statistic="moran_bv") == pytest.approx(0.4)
    # Lee's L of x with itself: (n / S0) sum lag^2 / sum z^2 = 1 * (4 * 0.25) / 5.
    assert bivariate_association(x, x, PATH4, statistic="lee") == pytest.approx(0.2)
    # Lee's L is symmetric and flips sign with -y; Spearman ignores W.
    y = np.array([2.0, 1.0, 4.0, 3.0])
    lxy = bivariate_association(x, y, PATH4, statistic="lee")
    assert lxy == pytest.approx(bivariate_association(y, x, PATH4, statistic="lee"))
    assert bivariate_association(x, -y, PATH4, statistic="lee") == pytest.approx(-lxy)
    assert bivariate_association(x, y, PATH4, statistic="spearman") == pytest.approx(0.6)


def test_batched_columns_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    row, col = hex_lattice(8, 16)
    W = hex_lattice_weights(row, col)
    Y = rng.normal(size=(row.size, 5))
    Y[rng.random(Y.shape) < 0.2] = np.nan
    x = rng.normal(size=row.size)
    batch = np.asarray(morans_i(Y, W))
    lee = np.asarray(bivariate_association(x, Y, W, statistic="lee"))
    for k in range(5):
        assert batch[k] == pytest.approx(morans_i(Y[:, k], W))
        assert lee[k] == pytest.approx(bivariate_association(x, Y[:, k], W, statistic="lee"))


def test_permutation_pvalue_counts_the_observed_draw() -> None:
    null = np.arange(999, dtype=np.float64)
    assert permutation_pvalue(1e6, null, alternative="greater") == pytest.approx(1 / 1000)
    assert permutation_pvalue(-1.0, null, alternative="greater") == pytest.approx(1.0)
    assert permutation_pvalue(989.0, null, alternative="greater") == pytest.approx(11 / 1000)
    assert permutation_pvalue(-1.0, null, alternative="less") == pytest.approx(1 / 1000)


# --------------------------------------------------------------------------------------------
# Moran's I on planted fields
# --------------------------------------------------------------------------------------------


def test_smooth_field_is_autocorrelated_and_white_noise_is_not() -> None:
    row, col = hex_lattice(30, 50)
    W = hex_lattice_weights(row, col)
    n = row.size
    smooth = moran_test(smooth_field(np.random.default_rng(0), row, col, 3.0), W, n_perm=199)
    assert smooth.statistic > 0.7
    assert smooth.p_value == pytest.approx(1 / 200)
    noise = moran_test(np.random.default_rng(1).normal(size=n), W, n_perm=199, seed=2)
    assert abs(noise.statistic - (-1 / (n - 1))) < 3 * noise.null_sd
    assert noise.p_value > 0.05
    assert noise.null_mean == pytest.approx(-1 / (n - 1), abs=0.01)


# --------------------------------------------------------------------------------------------
# The spatial nulls
# --------------------------------------------------------------------------------------------


def test_toroidal_null_is_one_parity_preserving_shift_per_draw() -> None:
    row, col = hex_lattice(12, 20)
    valid = np.random.default_rng(0).random(row.size) < 0.9
    src = toroidal_null(row, col, 50, valid=valid, min_overlap=0.6, seed=1)
    n_rows, n_cols = 12, 20
    for k in range(50):
        hit = src[k] >= 0
        # Only valid spots send and receive values, and at least 60% of the valid ones receive.
        assert np.all(valid[src[k][hit]]) and np.all(valid[hit])
        assert hit.sum() >= 0.6 * valid.sum()
        dr = (row[hit] - row[src[k][hit]]) % n_rows
        dc = (col[hit] - col[src[k][hit]]) % n_cols
        assert np.unique(dr).size == 1 and np.unique(dc).size == 1
        assert (dr[0] + dc[0]) % 2 == 0 and (dr[0], dc[0]) != (0, 0)


def test_block_permutation_moves_whole_blocks_and_loses_no_spot() -> None:
    row, col = hex_lattice(16, 32)  # 2 x 2 blocks of 8 rows x 16 columns
    src = block_permutation_null(row, col, 20, block_rows=8, seed=0)
    block = (row // 8) * 2 + col // 16
    for k in range(20):
        assert np.array_equal(np.sort(src[k]), np.arange(row.size))
        # Every block receives all its spots from one block, at the same offsets.
        for b in range(4):
            sources = src[k][block == b]
            assert np.unique(block[sources]).size == 1
            assert np.array_equal(row[sources] % 8, row[block == b] % 8)
    with pytest.raises(ValueError, match="even"):
        block_permutation_null(row, col, 5, block_rows=3)


def test_apply_null_moves_values_and_marks_background() -> None:
    values = np.array([10.0, 20.0, 30.0])
    out = apply_null(values, np.array([[2, -1, 0], [1, 2, 0]]))
    assert np.array_equal(out[:, 1], [20.0, 30.0, 10.0])
    assert np.isnan(out[1, 0]) and out[0, 0] == 30.0


@pytest.mark.parametrize("null", ["toroidal", "block"])
def test_independent_smooth_fields_fool_the_naive_test_but_not_the_spatial_null(null: str) -> None:
    # 40 pairs of independent smooth fields (correlation length ~3 lattice steps): the naive
    # Spearman p treats the spots as independent and rejects far more often than 5%.
    row, col = hex_lattice(36, 64)
    W = hex_lattice_weights(row, col)
    naive = spatial = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = smooth_field(rng, row, col, 3.0)
        y = smooth_field(rng, row, col, 3.0)
        if null == "toroidal":
            src = toroidal_null(row, col, 99, seed=seed)
        else:
            src = block_permutation_null(row, col, 99, block_rows=8, seed=seed)
        res = association_test(x, y, W, src, statistics=("spearman",), null_name=null)
        naive += spearmanr(x, y).pvalue < 0.05
        spatial += res["spearman"].p_value < 0.05
    assert naive / 40 > 0.4
    assert spatial / 40 <= 0.15


@pytest.mark.parametrize("null", ["toroidal", "block"])
def test_planted_correlated_fields_are_significant_under_the_spatial_null(null: str) -> None:
    row, col = hex_lattice(36, 64)
    W = hex_lattice_weights(row, col)
    rng = np.random.default_rng(7)
    x = smooth_field(rng, row, col, 3.0)
    y = x + 0.5 * x.std() * rng.normal(size=x.size)
    if null == "toroidal":
        src = toroidal_null(row, col, 199, seed=1)
    else:
        src = block_permutation_null(row, col, 199, block_rows=8, seed=1)
    res = association_test(x, y, W, src, null_name=null)
    for name in ("spearman", "lee", "moran_bv"):
        assert res[name].statistic > 0.5
        assert res[name].p_value == pytest.approx(1 / 200)
        assert res[name].null == null and res[name].n_null == 199
