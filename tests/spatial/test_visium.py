"""Visium reading (real Space Ranger 1.0.0 folder, a 2.x-style copy, a synthetic capture area)
and st_validate on planted immune clusters."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from numpy.typing import NDArray
from oncotrace.spatial import (
    NullName,
    Visium,
    VisiumError,
    count_cells_per_spot,
    immune_gene_score,
    read_visium,
    st_validate,
    visium_image_scale,
    write_st_report,
)

SAMPLE = Path("spatial") / "visium-human-1.0.0"


@pytest.fixture(scope="module")
def real_folder() -> Path:
    from tests.conftest import require_shared_data

    return require_shared_data() / SAMPLE


@pytest.fixture(scope="module")
def real(real_folder: Path) -> Visium:
    return read_visium(real_folder)


# --------------------------------------------------------------------------------------------
# Writing Space Ranger-shaped folders
# --------------------------------------------------------------------------------------------


def write_h5(path: Path, barcodes: list[str], genes: list[str], counts: NDArray[np.int64]) -> None:
    """A 10x v3 feature-barcode HDF5: genes x barcodes in CSC order (counts is barcodes x genes)."""
    import scipy.sparse as sp

    csc = sp.csc_matrix(np.asarray(counts).T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array([f"ID_{g}" for g in genes], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")


def write_positions_sr2(path: Path, rows: list[tuple[str, int, int, int, float, float]]) -> None:
    """Space Ranger 2.x tissue_positions.csv: a header; columns deliberately reordered."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "pxl_col_in_fullres",
                "barcode",
                "in_tissue",
                "array_row",
                "array_col",
                "pxl_row_in_fullres",
            ]
        )
        for b, t, r, c, y, x in rows:
            w.writerow([x, b, t, r, c, y])


# --------------------------------------------------------------------------------------------
# The real Space Ranger 1.0.0 folder
# --------------------------------------------------------------------------------------------


def test_real_folder_positions_scalefactors_and_counts(real: Visium, real_folder: Path) -> None:
    # MANIFEST says 4,991 spots: the file has 4,992 lines (78 rows x 64 spots), all read.
    assert real.n_spots == 4992
    assert int(real.in_tissue.sum()) == 4235
    assert real.spot_diameter_fullres == pytest.approx(89.4275, abs=1e-3)
    assert real.mpp_fullres == pytest.approx(55.0 / 89.42751063343188)
    assert np.all((real.array_row + real.array_col) % 2 == 0)
    assert real.counts is not None and real.counts.shape == (4992, 100)
    assert int(real.has_counts.sum()) == 100
    # First line of tissue_positions_list.csv: ACGCCTGACACGCGCT-1,0,0,0,2546,2779 (row=y, col=x).
    assert real.barcodes[0] == "ACGCCTGACACGCGCT-1"
    assert (real.pxl_x_fullres[0], real.pxl_y_fullres[0]) == (2779.0, 2546.0)
    # Barcodes aligned: each matrix column (read here straight from the file) lands on its spot.
    with h5py.File(real_folder / "filtered_feature_bc_matrix.h5") as f:
        bc = [b.decode() for b in f["matrix/barcodes"][:]]
        data, ind, ptr = (f[f"matrix/{k}"][:] for k in ("data", "indices", "indptr"))
    spot_of = {b: i for i, b in enumerate(real.barcodes.tolist())}
    for j in (0, 17, 99):
        dense = np.zeros(100)
        dense[ind[ptr[j] : ptr[j + 1]]] = data[ptr[j] : ptr[j + 1]]
        assert np.array_equal(real.counts[spot_of[bc[j]]].toarray().ravel(), dense)
    no_counts = np.flatnonzero(~real.has_counts)
    assert real.counts[no_counts].nnz == 0


def test_real_folder_has_none_of_the_default_genes(real: Visium) -> None:
    # The subset holds the first 100 GRCh38 features (Ensembl ids as names); no immune gene.
    with pytest.raises(VisiumError, match=r"none of the genes .*CD3D.*genes="):
        immune_gene_score(real)
    fb = immune_gene_score(real, fallback="total-counts")
    assert fb.fallback and fb.used == () and "CD3D" in fb.missing
    total = np.asarray(real.counts.sum(axis=1)).ravel()  # type: ignore[union-attr]
    assert np.allclose(fb.score[real.has_counts], np.log1p(total[real.has_counts]))
    assert np.all(np.isnan(fb.score[~real.has_counts]))
    # Genes named by Ensembl id are found; missing ones are listed, not fatal.
    gs = immune_gene_score(real, ["ENSG00000187634", "ENSG00000188976", "CD3E"])
    assert gs.used == ("ENSG00000187634", "ENSG00000188976") and gs.missing == ("CD3E",)


def test_sr2_copy_with_header_reads_the_same(
    real: Visium, real_folder: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "outs"
    flat.mkdir()
    write_positions_sr2(
        flat / "tissue_positions.csv",
        [
            (b, int(t), int(r), int(c), float(y), float(x))
            for b, t, r, c, y, x in zip(
                real.barcodes,
                real.in_tissue,
                real.array_row,
                real.array_col,
                real.pxl_y_fullres,
                real.pxl_x_fullres,
                strict=True,
            )
        ],
    )
    (flat / "scalefactors_json.json").symlink_to(real_folder / "spatial" / "scalefactors_json.json")
    (flat / "filtered_feature_bc_matrix.h5").symlink_to(
        real_folder / "filtered_feature_bc_matrix.h5"
    )
    v2 = read_visium(tmp_path)  # finds outs/ and the flat layout
    for name in (
        "barcodes",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_x_fullres",
        "pxl_y_fullres",
    ):
        assert np.array_equal(getattr(v2, name), getattr(real, name)), name
    assert v2.counts is not None and real.counts is not None
    assert (v2.counts != real.counts).nnz == 0


def test_missing_files_and_stray_barcodes_are_clear_errors(
    real_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"tissue_positions_list\.csv"):
        read_visium(tmp_path)
    (tmp_path / "spatial").mkdir()
    (tmp_path / "spatial" / "tissue_positions_list.csv").write_text(
        "AAAC-1,1,0,0,100,200\nAAAG-1,1,0,2,100,400\n"
    )
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json\.json"):
        read_visium(tmp_path)
    (tmp_path / "spatial" / "scalefactors_json.json").write_text('{"spot_diameter_fullres": 90}')
    write_h5(
        tmp_path / "filtered_feature_bc_matrix.h5",
        ["AAAC-1", "TTTT-1"],
        ["CD3D"],
        np.ones((2, 1), np.int64),
    )
    with pytest.raises(VisiumError, match="TTTT-1"):
        read_visium(tmp_path)
    v = read_visium(tmp_path, counts=False)
    assert v.counts is None and v.n_spots == 2 and not v.has_counts.any()


_GOOD_SPOTS = "AAAC-1,1,0,0,100,200\nAAAG-1,1,0,2,100,400\nAACC-1,1,1,1,187,300\n"
_HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        (_HEADER, "has a header but no spots"),  # was IndexError
        (_GOOD_SPOTS.replace("100,400", "nan,400"), r"line 2 \(barcode AAAG-1\).*non-finite"),
        (_HEADER + _GOOD_SPOTS.replace("187,300", "187,inf"), r"line 4 \(barcode AACC-1\)"),
        # two spots on one lattice position: was refused only after cell detection
        (_GOOD_SPOTS.replace("AAAG-1,1,0,2", "AAAG-1,1,0,0"), r"lines 1 and 2 .* share array"),
        (_GOOD_SPOTS.replace("1,1,1,187", "1,99999999,1,187"), r"line 3 .*array_row 99999999"),
    ],
)
def test_corrupt_positions_are_refused_on_reading(
    tmp_path: Path, positions: str, message: str
) -> None:
    spatial_dir = tmp_path / "spatial"
    spatial_dir.mkdir()
    name = (
        "tissue_positions.csv" if positions.startswith("barcode") else "tissue_positions_list.csv"
    )
    (spatial_dir / name).write_text(positions)
    (spatial_dir / "scalefactors_json.json").write_text('{"spot_diameter_fullres": 90}')
    with pytest.raises(VisiumError, match=message) as info:
        read_visium(tmp_path, counts=False)
    assert name in str(info.value)


def test_an_infinite_image_scale_factor_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spatial").mkdir()
    (tmp_path / "spatial" / "tissue_positions_list.csv").write_text(_GOOD_SPOTS)
    # JSON's 1e999 reads as inf: was a scale of 0 that put every cell at the image corner
    (tmp_path / "spatial" / "scalefactors_json.json").write_text(
        '{"spot_diameter_fullres": 90, "tissue_lowres_scalef": 1e999}'
    )
    v = read_visium(tmp_path, counts=False)
    with pytest.raises(VisiumError, match="tissue_lowres_scalef"):
        visium_image_scale(v, "lowres")


# --------------------------------------------------------------------------------------------
# Scores and counts against hand values
# --------------------------------------------------------------------------------------------


def test_gene_score_cp10k_log1p_by_hand(tmp_path: Path) -> None:
    (tmp_path / "spatial").mkdir()
    (tmp_path / "spatial" / "tissue_positions_list.csv").write_text(
        "A-1,1,0,0,0,0\nB-1,1,0,2,0,200\nC-1,1,1,1,173,100\n"
    )
    (tmp_path / "spatial" / "scalefactors_json.json").write_text('{"spot_diameter_fullres": 110}')
    counts = np.array([[2, 0, 8], [0, 0, 5]])  # CD3D, PTPRC, ACTB for spots A and B; C has none
    write_h5(
        tmp_path / "filtered_feature_bc_matrix.h5",
        ["A-1", "B-1"],
        ["CD3D", "PTPRC", "ACTB"],
        counts,
    )
    v = read_visium(tmp_path)
    gs = immune_gene_score(v, ["CD3D", "ptprc", "GZMK"])
    assert gs.used == ("CD3D", "ptprc") and gs.missing == ("GZMK",)
    a = (math.log1p(1e4 * 2 / 10) + math.log1p(0.0)) / 2
    assert gs.score[0] == pytest.approx(a)
    assert gs.score[1] == pytest.approx(0.0)
    assert math.isnan(gs.score[2])


def test_count_cells_per_spot_uses_the_spot_circle(tmp_path: Path) -> None:
    (tmp_path / "tissue_positions_list.csv").write_text(
        "A-1,1,0,0,1000,1000\nB-1,1,0,2,1000,1200\n"
    )
    (tmp_path / "scalefactors_json.json").write_text('{"spot_diameter_fullres": 100}')
    v = read_visium(tmp_path, counts=False)
    # Spot A at (1000, 1000), radius 50: inside at 49.9 px, outside at 50.1 px.
    x = np.array([1000.0, 1049.9, 1050.1, 1000.0, 1200.0, 1230.0, 5000.0])
    y = np.array([1000.0, 1000.0, 1000.0, 950.5, 1000.0, 1040.0, 5000.0])
    assert count_cells_per_spot(x, y, v).tolist() == [3, 2]
    mask = np.array([True, False, True, True, False, True, True])
    assert count_cells_per_spot(x, y, v, mask=mask).tolist() == [2, 1]
    # The lowres image is the fullres one scaled by tissue_lowres_scalef.
    (tmp_path / "scalefactors_json.json").write_text(
        '{"spot_diameter_fullres": 100, "tissue_lowres_scalef": 0.05}'
    )
    assert visium_image_scale(read_visium(tmp_path, counts=False), "lowres") == pytest.approx(20.0)


# --------------------------------------------------------------------------------------------
# st_validate
# --------------------------------------------------------------------------------------------

PITCH_PX = 200.0  # 100 um centre to centre at 0.5 um/px
DIAMETER_PX = 110.0  # 55 um


def synthetic_capture_area(
    tmp_path: Path, seed: int, *, independent_genes: bool = False
) -> tuple[Path, NDArray[np.float64], NDArray[np.bool_], float]:
    """A 30 x 60 hex capture area whose immune genes follow planted immune-cell clusters.

    Cells (slide level-0 px, slide = fullres / 2) are a uniform background of non-immune cells
    plus immune cells drawn around 8 cluster centres; each spot's CD3D / CD3E / PTPRC counts are
    Poisson around a rate set by the same planted intensity at the spot centre (not by the
    counted cells), so agreement comes only from the shared biology. With
    ``independent_genes`` the genes follow 8 other, independently placed clusters.
    """
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(30), np.arange(60), indexing="ij")
    keep = (rr + cc) % 2 == 0
    row, col = rr[keep], cc[keep]
    x = 300.0 + col * PITCH_PX / 2
    y = 300.0 + row * PITCH_PX * math.sqrt(3) / 2
    in_tissue = ~((row < 3) & (col < 6))  # a corner off the tissue
    barcodes = [f"SPOT{i:05d}-1" for i in range(row.size)]
    centres = np.column_stack([rng.uniform(500, 6000, 8), rng.uniform(500, 5000, 8)])
    sigma = 350.0

    def intensity(px: NDArray[np.float64], py: NDArray[np.float64]) -> NDArray[np.float64]:
        d2 = (px[:, None] - centres[:, 0]) ** 2 + (py[:, None] - centres[:, 1]) ** 2
        return np.exp(-d2 / (2 * sigma**2)).sum(axis=1)

    immune = np.concatenate([c + sigma * rng.normal(size=(400, 2)) for c in centres])  # fullres px
    other = np.column_stack([rng.uniform(0, 6600, 40_000), rng.uniform(0, 5600, 40_000)])
    cells_fullres = np.vstack([immune, other])
    positive = np.r_[np.ones(len(immune), bool), np.zeros(len(other), bool)]

    if independent_genes:
        centres = np.column_stack([rng.uniform(500, 6000, 8), rng.uniform(500, 5000, 8)])
    lam = intensity(x, y)
    counts = np.column_stack(
        [
            rng.poisson(0.3 + 6 * lam),  # CD3D
            rng.poisson(0.3 + 4 * lam),  # CD3E
            rng.poisson(0.5 + 8 * lam),  # PTPRC
            rng.poisson(200, size=x.size),  # ACTB (library size)
        ]
    )
    genes = ["CD3D", "CD3E", "PTPRC", "ACTB"]
    with_counts = np.flatnonzero(in_tissue | (rng.random(x.size) < 0.5))
    spatial_dir = tmp_path / "spatial"
    spatial_dir.mkdir(parents=True)
    write_positions_sr2(
        spatial_dir / "tissue_positions.csv",
        [
            (barcodes[i], int(in_tissue[i]), int(row[i]), int(col[i]), float(y[i]), float(x[i]))
            for i in range(row.size)
        ],
    )
    (spatial_dir / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": DIAMETER_PX, "tissue_lowres_scalef": 0.05})
    )
    write_h5(
        tmp_path / "filtered_feature_bc_matrix.h5",
        [barcodes[i] for i in with_counts],
        genes,
        counts[with_counts],
    )
    slide_to_fullres = 2.0
    return tmp_path, cells_fullres / slide_to_fullres, positive, slide_to_fullres


@pytest.mark.parametrize("null", ["toroidal", "block"])
def test_st_validate_finds_planted_agreement(tmp_path: Path, null: NullName) -> None:
    folder, cells_level0, positive, scale = synthetic_capture_area(tmp_path, seed=3)
    v = read_visium(folder)
    report = st_validate(
        cells_level0, positive, v, slide_to_fullres=scale, n_null=199, null=null, block_rows=6
    )
    assert report["n_spots"] == int(v.in_tissue.sum())
    assert report["genes"]["used"] == ["CD3D", "CD3E", "PTPRC"]
    assert report["genes"]["missing"] == ["CD2", "CD8A", "GZMK"]
    assert report["spearman"]["rho"] > 0.6
    assert report["spearman"]["p_spatial"] < 0.02
    assert report["bivariate"]["lee_L"]["statistic"] > 0.5
    assert report["bivariate"]["lee_L"]["p_value"] < 0.02
    for m in ("n_positive_cells", "gene_score"):
        assert report["moran"][m]["statistic"] > 0.5 and report["moran"][m]["p_value"] < 0.01
    assert report["null"]["name"] == null and report["null"]["n"] == 199
    # Cells map back onto the planted geometry: all immune cells in used spots are counted.
    spots = report["spots"]
    assert (
        sum(s["n_positive"] for s in spots if s["used"])
        == report["cells"]["n_positive_in_used_spots"]
    )
    assert spots[0]["x_level0"] == pytest.approx(spots[0]["x_fullres"] / scale)


def test_st_validate_on_independent_clusters_is_calibrated(tmp_path: Path) -> None:
    # Genes follow clusters placed independently of the immune cells: both maps are clustered
    # but unrelated. The naive Spearman p is often tiny; the spatial-null p rarely is.
    naive = spatial = 0
    for seed in range(20):
        folder, cells_level0, positive, scale = synthetic_capture_area(
            tmp_path / str(seed), seed, independent_genes=True
        )
        report = st_validate(
            cells_level0, positive, read_visium(folder), slide_to_fullres=scale, n_null=99
        )
        naive += report["spearman"]["p_naive"] < 0.05
        spatial += report["spearman"]["p_spatial"] < 0.05
    assert naive >= 10
    assert spatial <= 4


def test_real_sample_runs_end_to_end_and_writes_the_report(real: Visium, tmp_path: Path) -> None:
    # The slide is the lowres PNG (600 x 600): cells placed on it in PNG pixels.
    scale = visium_image_scale(real, "lowres")
    rng = np.random.default_rng(0)
    cells = rng.uniform(0, 600, size=(30_000, 2))
    positive = rng.random(30_000) < 0.3
    report = st_validate(
        cells,
        positive,
        real,
        slide_to_fullres=scale,
        slide_size_level0=(600, 600),
        fallback="total-counts",
        n_null=99,
    )
    expected = int((real.in_tissue & real.has_counts).sum())  # 100 barcodes, all in tissue
    assert report["n_spots"] == expected == 100
    assert report["genes"]["fallback"] is True and report["genes"]["used"] == []
    assert math.isfinite(report["spearman"]["rho"])
    # 100 scattered barcodes of 4,992 spots: no shift keeps half of them on data, so the
    # spatial p is undefined and the report says why.
    assert math.isnan(report["spearman"]["p_spatial"])
    assert any("spatial null unavailable" in w for w in report["warnings"])
    paths = write_st_report(report, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert doc["n_spots"] == 100 and doc["spearman"]["p_spatial"] is None
    assert doc["visium"]["n_spots_in_tissue"] == 4235
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4992 and sum(r["used"] == "1" for r in rows) == 100
    # Expected cells per spot: density x spot area in PNG px (radius 89.43 * 0.045 / 2).
    r_png = real.spot_diameter_fullres / scale / 2
    density = 0.3 * 30_000 / 600**2
    mean_pos = np.mean([int(r["n_positive"]) for r in rows if r["used"] == "1"])
    assert mean_pos == pytest.approx(density * math.pi * r_png**2, rel=0.25)
    assert paths["png"].stat().st_size > 10_000
