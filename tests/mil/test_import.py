"""Importing CLAM/TRIDENT .h5 features: stores equal the input, load_cohort reads them, refusals."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from oncotrace import wsi
from oncotrace.mil import (
    FeatureImportError,
    ZarrBags,
    import_features,
    load_cohort,
    read_h5_features,
)

DIM = 1024  # the registered "uni" encoder's dim, so load_cohort accepts the name


def _grid(n: int, step: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.choice(40 * 40, n, replace=False)
    return np.stack([cells % 40, cells // 40], axis=1).astype(np.int64) * step


def _h5(
    path: Path,
    feats: np.ndarray | None,
    coords: np.ndarray | None,
    coord_attrs: dict[str, Any] | None = None,
) -> Path:
    with h5py.File(path, "w") as f:
        if feats is not None:
            f.create_dataset("features", data=feats)
        if coords is not None:
            d = f.create_dataset("coords", data=coords)
            for k, v in (coord_attrs or {}).items():
                d.attrs[k] = v
    return path


def trident_file(
    path: Path, n: int = 12, seed: int = 0, dim: int = DIM
) -> tuple[Path, np.ndarray, np.ndarray]:
    """TRIDENT layout: 256-px patches at 20x from a 40x slide → 512 level-0 px."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    coords = _grid(n, 512, seed)
    attrs = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": path.stem,
        "savetodir": "/somewhere/else",
    }
    return _h5(path, feats, coords, attrs), feats, coords


def clam_file(
    path: Path, n: int = 9, seed: int = 1, with_attrs: bool = True
) -> tuple[Path, np.ndarray, np.ndarray]:
    """CLAM layout: 256-px patches read at level 1 (downsample 4) → 1024 level-0 px."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    coords = _grid(n, 1024, seed).astype(np.int32)  # CLAM writes int32 coords
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": np.array([4.0, 4.0]),
        "downsampled_level_dim": np.array([10000, 8000]),
        "level_dim": np.array([10000, 8000]),
        "name": path.stem,
        "save_path": "/x/patches",
    }
    return _h5(path, feats, coords, attrs if with_attrs else None), feats, coords


def _read_store(store: Path, name: str) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    g = zarr.open_group(store, mode="r")
    arr = g[f"features/{name}"]
    assert isinstance(arr, zarr.Array)
    coords = g["coords"]
    assert isinstance(coords, zarr.Array)
    return np.asarray(arr[...]), np.asarray(coords[...]), dict(arr.attrs), dict(g.attrs)


# --------------------------------------------------------------------------------------------
# what is written
# --------------------------------------------------------------------------------------------


def test_trident_file_becomes_a_store_equal_to_the_input(tmp_path: Path) -> None:
    src, feats, coords = trident_file(tmp_path / "slide-a.h5")
    res = import_features(src, tmp_path / "stores", "uni")
    assert (res.action, res.slide_id, res.n_tiles, res.dim, res.format) == (
        "created",
        "slide-a",
        12,
        DIM,
        "trident",
    )
    f, c, fattrs, gattrs = _read_store(res.store, "uni")
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_array_equal(c, coords)
    assert c.dtype == np.int64 and f.dtype == np.float32
    assert not (res.store / "patches").exists()
    imp = fattrs["imported"]
    assert imp["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert imp["source_path"] == str(src.resolve()) and imp["format"] == "trident"
    assert fattrs["complete"] and fattrs["encoder"]["name"] == "uni" and fattrs["dim"] == DIM
    attrs = wsi.read_store_attrs(res.store)  # the wsi reader sees a finished store
    assert attrs is not None and attrs == gattrs["oncotrace"]
    assert attrs["tile_size_level0"] == [512, 512]
    assert attrs["mpp"] == [0.25, 0.25] and attrs["mpp_source"] == "magnification"  # 10 / 40x
    assert attrs["target_mpp"] == pytest.approx(0.5)  # 256 px at 20x
    assert attrs["tile_px"] == 256 and attrs["has_patches"] is False
    assert attrs["backend"] == "import" and attrs["slide_id"] == "slide-a"


def test_clam_patch_attrs_give_the_level0_tile_size_and_need_mpp(tmp_path: Path) -> None:
    src, feats, coords = clam_file(tmp_path / "c.h5")
    with pytest.raises(FeatureImportError, match=r"c\.h5.*mpp=") as err:
        import_features(src, tmp_path / "stores", "uni")
    assert "tile_px=" not in str(err.value)  # the file knows its tile size
    assert err.value.param == "mpp"  # the CLI renders its own flag from it
    res = import_features(src, tmp_path / "stores", "uni", mpp=0.25)
    f, c, _, gattrs = _read_store(res.store, "uni")
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_array_equal(c, coords.astype(np.int64))
    attrs = gattrs["oncotrace"]
    assert attrs["tile_size_level0"] == [1024, 1024]  # 256 px at downsample 4
    assert attrs["target_mpp"] == pytest.approx(1.0) and attrs["mpp_source"] == "override"
    assert attrs["import"]["h5_attrs"]["patch_level"] == 1


def test_clam_features_without_attrs_need_tile_px_and_mpp(tmp_path: Path) -> None:
    src, feats, _ = clam_file(tmp_path / "plain.h5", with_attrs=False)
    with pytest.raises(FeatureImportError, match=r"plain\.h5.*tile_px= .*and mpp="):
        import_features(src, tmp_path / "stores", "uni")
    with pytest.raises(FeatureImportError, match=r"mpp="):
        import_features(src, tmp_path / "stores", "uni", tile_px=448)
    res = import_features(src, tmp_path / "stores", "uni", tile_px=448, mpp=0.5)
    attrs = wsi.read_store_attrs(res.store)
    assert attrs is not None
    assert attrs["tile_size_level0"] == [448, 448] and attrs["tile_size_source"] == "override"
    np.testing.assert_array_equal(_read_store(res.store, "uni")[0], feats)


def test_load_cohort_and_zarr_bags_read_imported_stores(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    a, fa, ca = trident_file(tmp_path / "a.h5", n=7, seed=3)
    b, fb, cb = clam_file(tmp_path / "b.h5", n=5, seed=4)
    import_features(a, stores, "uni")
    import_features(b, stores, "uni", mpp=0.25)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "site", "label"])
        w.writerows([["a", "p1", "s", "neg"], ["b", "p2", "s", "pos"]])
    data = load_cohort(stores, labels, "uni")
    np.testing.assert_array_equal(data.bags[0], fa)
    np.testing.assert_array_equal(data.coords[0], ca)
    np.testing.assert_array_equal(data.bags[1], fb)
    np.testing.assert_array_equal(data.coords[1], cb.astype(np.int64))
    assert data.tile_size_level0.tolist() == [512, 1024]
    bags = ZarrBags([stores / "a.zarr", stores / "b.zarr"], "uni")
    assert bags.shapes == [(7, DIM), (5, DIM)]
    np.testing.assert_array_equal(bags[0], fa)


# --------------------------------------------------------------------------------------------
# refusals, one clear error each
# --------------------------------------------------------------------------------------------


def _bad(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.h5"
    f = np.ones((4, 8), np.float32)
    c = np.arange(8, dtype=np.int64).reshape(4, 2)
    attrs = {"patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20}
    if kind == "no-features":
        return _h5(p, None, c, attrs)
    if kind == "no-coords":
        return _h5(p, f, None)
    if kind == "length":
        return _h5(p, np.ones((5, 8), np.float32), c, attrs)
    if kind == "nan":
        f[2, 3] = np.nan
        return _h5(p, f, c, attrs)
    if kind == "inf":
        f[1, 0] = -np.inf
        return _h5(p, f, c, attrs)
    if kind == "overflow":  # finite in float64, inf once stored as float32
        return _h5(p, np.full((4, 8), 1e300), c, attrs)
    if kind == "3d":
        return _h5(p, np.ones((1, 4, 8), np.float32), c, attrs)
    if kind == "coords-shape":
        return _h5(p, f, np.arange(12).reshape(4, 3), attrs)
    if kind == "frac-coords":
        return _h5(p, f, c + 0.5, attrs)
    if kind == "not-hdf5":
        p.write_text("slide_id,features\n")
        return p
    if kind == "negative-coords":
        c[2] = [-512, 1024]
        return _h5(p, f, c, attrs)
    if kind == "identical-coords":
        return _h5(p, f, np.zeros((4, 2), np.int64), attrs)
    if kind.startswith("attr:"):  # attr:<key>=<value>, over TRIDENT or CLAM attrs
        key, value = kind[5:].split("=")
        clam = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}
        base = clam if key in ("patch_level", "downsample") else {**attrs, "patch_size": 256}
        p = tmp_path / "attr.h5"
        return _h5(p, f, c, {**base, key: float(value) if value != "text" else "big"})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no-features", r"no 'features' dataset .*patch-coordinates file"),
        ("no-coords", r"no 'coords' dataset"),
        ("length", r"5 feature rows but 4 coordinates"),
        ("nan", r"NaN/inf in the features of 1 of 4 tile\(s\) \(e\.g\. rows \[2\]"),
        ("inf", r"NaN/inf .*rows \[1\]"),
        ("overflow", r"NaN/inf in the features of 4 of 4"),
        ("3d", r"'features' has shape \(1, 4, 8\); expected \(N, D\)"),
        ("coords-shape", r"'coords' has shape \(4, 3\)"),
        ("frac-coords", r"not whole level-0 pixels"),
        ("not-hdf5", r"not a readable HDF5 file"),
        ("negative-coords", r"'coords' has negative level-0 \(x, y\) in 1 row\(s\).*row 2"),
        ("identical-coords", r"'coords' holds the same \(x, y\) \[0, 0\] in all 4 rows"),
        ("attr:patch_size=-256", r"attr 'patch_size' is -256\.0, not a positive number"),
        ("attr:patch_size=0", r"attr 'patch_size' is 0\.0"),
        ("attr:patch_size_level0=-512", r"attr 'patch_size_level0' is -512"),
        ("attr:level0_magnification=-40", r"attr 'level0_magnification'"),
        ("attr:target_magnification=nan", r"attr 'target_magnification' is nan"),
        ("attr:patch_size=text", r"attr 'patch_size' is 'big'"),
        ("attr:downsample=-4", r"attr 'downsample'"),
        ("attr:patch_level=-1", r"attr 'patch_level' is -1\.0, not a pyramid level"),
    ],
)
def test_bad_files_are_refused_with_the_file_and_a_fix(
    tmp_path: Path, kind: str, message: str
) -> None:
    src = _bad(tmp_path, kind)
    with pytest.raises(FeatureImportError, match=message) as err:
        import_features(src, tmp_path / "stores", "enc-x")
    assert str(src) in str(err.value) and "Fix:" in str(err.value)
    assert not list((tmp_path / "stores").iterdir())  # nothing written, not even a partial


def test_tile_px_that_contradicts_the_file_is_refused(tmp_path: Path) -> None:
    src, _, _ = trident_file(tmp_path / "t.h5", n=3)
    with pytest.raises(FeatureImportError, match=r"512x512 level-0 px but tile_px=256"):
        read_h5_features(src, tile_px=256)
    assert read_h5_features(src, tile_px=512).tile_size_level0 == (512, 512)


def test_registered_name_with_another_dim_is_refused(tmp_path: Path) -> None:
    src, _, _ = trident_file(tmp_path / "t.h5", n=3, dim=1536)
    with pytest.raises(FeatureImportError, match=r"dim 1536 but the registered encoder 'uni'"):
        import_features(src, tmp_path / "stores", "uni")
    res = import_features(src, tmp_path / "stores", "uni2-h")  # the right name works
    assert res.dim == 1536


def test_bad_name_is_refused(tmp_path: Path) -> None:
    src, _, _ = trident_file(tmp_path / "t.h5", n=3)
    with pytest.raises(FeatureImportError, match="not a usable array name"):
        import_features(src, tmp_path / "stores", "../uni")


# --------------------------------------------------------------------------------------------
# existing stores: rerun, other sources, other encoders, tile stores
# --------------------------------------------------------------------------------------------


def test_rerun_skips_and_a_touched_identical_file_is_still_skipped(tmp_path: Path) -> None:
    src, _, _ = trident_file(tmp_path / "s.h5")
    out = tmp_path / "stores"
    first = import_features(src, out, "uni")
    stamp = (first.store / "features" / "uni" / "zarr.json").stat().st_mtime_ns
    assert import_features(src, out, "uni").action == "skipped"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert import_features(src, out, "uni").action == "skipped"
    assert (first.store / "features" / "uni" / "zarr.json").stat().st_mtime_ns == stamp


def test_features_from_another_source_are_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "stores"
    src, _, coords = trident_file(tmp_path / "s.h5")
    import_features(src, out, "uni")
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(9)
    new_feats = rng.normal(size=(len(coords), DIM)).astype(np.float32)
    attrs = {"patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20}
    src2 = _h5(other / "s.h5", new_feats, coords, attrs)
    with pytest.raises(
        FeatureImportError, match=r"already holds features/uni imported from .*overwrite=True"
    ):
        import_features(src2, out, "uni")
    res = import_features(src2, out, "uni", overwrite=True)
    assert res.action == "replaced"
    np.testing.assert_array_equal(_read_store(res.store, "uni")[0], new_feats)
    assert not [p for p in (out / "s.zarr" / "features").iterdir() if p.name.startswith(".")]


def test_second_encoder_with_the_same_tiles_joins_the_store(tmp_path: Path) -> None:
    out = tmp_path / "stores"
    src, feats, coords = trident_file(tmp_path / "s.h5")
    import_features(src, out, "uni")
    (tmp_path / "conch").mkdir()
    other = np.random.default_rng(5).normal(size=(len(coords), 768)).astype(np.float32)
    attrs = {"patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20}
    src2 = _h5(tmp_path / "conch" / "s.h5", other, coords, attrs)
    res = import_features(src2, out, "conch_v15")
    assert res.action == "added"
    np.testing.assert_array_equal(_read_store(res.store, "uni")[0], feats)
    np.testing.assert_array_equal(_read_store(res.store, "conch_v15")[0], other)


def test_other_tiles_are_refused_and_rebuilt_only_for_imported_stores(tmp_path: Path) -> None:
    out = tmp_path / "stores"
    src, _, _ = trident_file(tmp_path / "s.h5", n=6, seed=0)
    import_features(src, out, "uni")
    (tmp_path / "v2").mkdir()
    src2, feats2, coords2 = trident_file(tmp_path / "v2" / "s.h5", n=8, seed=1)
    with pytest.raises(
        FeatureImportError, match=r"holds 6 tiles at other coordinates .*overwrite=True"
    ):
        import_features(src2, out, "enc_b")  # another encoder, but not row-aligned
    res = import_features(src2, out, "enc_b", overwrite=True)
    f, c, _, _ = _read_store(res.store, "enc_b")
    np.testing.assert_array_equal(f, feats2)
    np.testing.assert_array_equal(c, coords2)
    assert not (res.store / "features" / "uni").exists()  # not aligned with the new coords
    assert sorted(p.name for p in out.iterdir()) == ["s.zarr"]  # no leftovers


def test_tile_store_with_other_coords_is_never_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "stores"
    store = out / "s.zarr"
    g = zarr.open_group(store, mode="w", zarr_format=3)
    g.create_array("coords", data=np.zeros((3, 2), np.int64))
    g.create_array("patches", data=np.zeros((3, 4, 4, 3), np.uint8))
    g.attrs["oncotrace"] = {"complete": True, "backend": "cucim", "tile_size_level0": [448, 448]}
    src, _, _ = trident_file(tmp_path / "s.h5", n=4)
    for overwrite in (False, True):
        with pytest.raises(FeatureImportError, match=r"cut by `oncotrace tile`"):
            import_features(src, out, "uni", overwrite=overwrite)
    assert (store / "patches").exists()


def test_unfinished_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stores" / "s.zarr").mkdir(parents=True)
    src, _, _ = trident_file(tmp_path / "s.h5", n=3)
    with pytest.raises(FeatureImportError, match=r"not a finished OncoTrace store"):
        import_features(src, tmp_path / "stores", "uni")


def test_interrupted_import_leaves_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oncotrace.mil._import as imp  # private: fails its internal _write_features step

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(imp, "_write_features", boom)
    src, _, _ = trident_file(tmp_path / "s.h5", n=3)
    with pytest.raises(OSError, match="disk full"):
        import_features(src, tmp_path / "stores", "uni")
    assert list((tmp_path / "stores").iterdir()) == []


def test_embed_refuses_an_imported_store_with_a_clear_error(tmp_path: Path) -> None:
    from oncotrace.mil import embed

    h5, _, _ = trident_file(tmp_path / "S1.h5")
    store = import_features(h5, tmp_path / "stores", "uni").store
    with pytest.raises(ValueError, match=r"S1\.zarr: its features were imported.*Fix:"):
        embed(store, "pathomics")


def test_imported_and_embedded_features_are_written_the_same_way(tmp_path: Path) -> None:
    from oncotrace import mil
    from oncotrace.wsi.synthetic import make_tissue_squares

    planted = make_tissue_squares(
        tmp_path / "t.tiff", size=(2048, 1536), mpp=0.25, squares=[(0, 0, 1792, 1344)]
    )
    tiled = wsi.tile_slide(planted.path, tmp_path / "tiled").store
    mil.embed(tiled, "pathomics")
    src, _, _ = trident_file(tmp_path / "s.h5", n=9, dim=16)
    imported = import_features(src, tmp_path / "imported", "enc16").store
    emb = zarr.open_array(tiled / "features" / "pathomics", mode="r")
    imp = zarr.open_array(imported / "features" / "enc16", mode="r")
    assert imp.compressors == emb.compressors == ()  # uncompressed, both (bench/train.py)
    assert imp.filters == emb.filters == ()
    assert imp.metadata.to_dict()["codecs"] == emb.metadata.to_dict()["codecs"]
    assert imp.dtype == emb.dtype == np.float32
    assert imp.chunks == (9, 16) and emb.chunks == emb.shape  # one chunk of min(N, 4096) rows
    assert imp.metadata.dimension_names == emb.metadata.dimension_names == ("tile", "feature")


def test_a_rewritten_import_keeps_its_attrs_keys(tmp_path: Path) -> None:
    src, _, _ = trident_file(tmp_path / "s.h5", n=4)
    store = import_features(src, tmp_path / "stores", "uni").store
    raw = zarr.open_group(store, mode="r").attrs["oncotrace"]
    assert wsi.Store.open(store).attrs.to_dict() == raw
    assert {"source_sha256", "has_patches", "tile_size_source", "import"} <= set(raw)
    assert "tiling" not in raw and raw["has_patches"] is False
