"""Tile stores: atomic commit, resume, SIGKILL safety, focus filter, Z-stacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from oncotrace import wsi
from oncotrace.wsi.synthetic import he_texture, make_tissue_squares
from scipy import ndimage as ndi


@pytest.fixture
def planted(tmp_path: Path) -> wsi.synthetic.PlantedSlide:
    return make_tissue_squares(
        tmp_path / "slide.tiff", size=(3072, 2048), squares=[(0, 0, 2688, 1792)]
    )


def test_rerun_skips_a_complete_store_and_redoes_a_changed_source(planted, tmp_path: Path) -> None:
    out = tmp_path / "stores"
    first = wsi.tile_slide(planted.path, out)
    assert not first.skipped and first.n_tiles == 6 * 4
    created = zarr.open_group(first.store, mode="r").attrs["oncotrace"]["created"]
    again = wsi.tile_slide(planted.path, out)
    assert again.skipped and again.n_tiles == first.n_tiles
    # a different tiling config is not "the same store"
    other = wsi.tile_slide(planted.path, out, wsi.TilingConfig(tile_px=112))
    assert not other.skipped and other.n_tiles == 4 * first.n_tiles
    # the source file changing (new mtime) invalidates the store
    st = planted.path.stat()
    os.utime(planted.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    redone = wsi.tile_slide(planted.path, out, wsi.TilingConfig(tile_px=112))
    assert not redone.skipped
    assert created  # attrs carry a timestamp


def test_a_store_without_completion_mark_is_not_complete(planted, tmp_path: Path) -> None:
    out = tmp_path / "stores"
    res = wsi.tile_slide(planted.path, out)
    g = zarr.open_group(res.store, mode="r+")
    attrs = dict(g.attrs["oncotrace"])
    attrs["complete"] = False
    g.attrs["oncotrace"] = attrs
    fp = wsi.open_slide(planted.path).fingerprint
    assert not wsi.is_complete(res.store, fingerprint=fp, config=wsi.TilingConfig())
    assert not wsi.tile_slide(planted.path, out).skipped


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from oncotrace import wsi
    path, out = sys.argv[1], sys.argv[2]
    state = {"n": 0}
    def progress(n):
        state["n"] += n
        if state["n"] >= 64:
            print("WRITING", flush=True)
            time.sleep(60)
    if __name__ == "__main__":
        with wsi.open_slide(path) as slide:
            mask = wsi.detect_tissue(slide)
            coords = wsi.tile_coords(slide, mask, tile_px=64)
            wsi.write_patches(slide, coords, out, mask=mask, workers=1, progress=progress,
                              config=wsi.TilingConfig(tile_px=64))
    """
)


def test_sigkill_mid_write_leaves_no_complete_looking_store(planted, tmp_path: Path) -> None:
    out = tmp_path / "stores"
    script = tmp_path / "killme.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(planted.path), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and "WRITING" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "WRITING" in line, "the writer never reached the middle of the store"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    final = wsi.store_path(out, "slide")
    assert not final.exists()
    partials = list(out.glob(".slide.zarr.partial-*"))
    assert partials, "the killed writer should have left its partial folder"
    assert wsi.read_store_attrs(partials[0]) is None
    # the rerun finishes the slide and cleans the dead writer's leftovers
    cfg = wsi.TilingConfig(tile_px=64)
    res = wsi.tile_slide(planted.path, out, cfg)
    assert not res.skipped and res.store == final
    assert wsi.read_store_attrs(final)["n_tiles"] == res.n_tiles > 64
    assert not list(out.glob(".slide.zarr.partial-*"))


def test_min_focus_drops_blurred_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = he_texture((1792, 1792), rng, mpp=0.25)
    img[:, :896] = ndi.gaussian_filter(img[:, :896], sigma=(6, 6, 0))  # left half out of focus
    path = tmp_path / "blur.tiff"
    wsi.synthetic.write_pyramid_tiff(path, img, mpp=0.25, levels=1, compression="none")
    with wsi.open_slide(path) as slide:
        mask = wsi.detect_tissue(slide)
        coords = wsi.tile_coords(slide, mask)
        assert len(coords) == 16
        all_tiles = wsi.write_patches(
            slide, coords, tmp_path / "a", mask=mask, config=wsi.TilingConfig(focus=True)
        )
        focus = zarr.open_group(all_tiles, mode="r")["focus"][:]
        sharp_left = coords[:, 0] < 896
        assert focus[sharp_left].max() < focus[~sharp_left].min()
        threshold = float((focus[sharp_left].max() + focus[~sharp_left].min()) / 2)
        kept = wsi.write_patches(
            slide, coords, tmp_path / "b", mask=mask, config=wsi.TilingConfig(min_focus=threshold)
        )
    g = zarr.open_group(kept, mode="r")
    np.testing.assert_array_equal(g["coords"][:], coords[~sharp_left])
    assert g["patches"].shape[0] == int((~sharp_left).sum()) == g.attrs["oncotrace"]["n_tiles"]
    full = zarr.open_group(all_tiles, mode="r")["patches"]
    np.testing.assert_array_equal(g["patches"][0], full[int(np.flatnonzero(~sharp_left)[0])])


def test_sharpest_focal_plane_is_chosen_per_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = he_texture((896, 1792), rng, mpp=0.25)
    blurred = ndi.gaussian_filter(base, sigma=(5, 5, 0))
    planes = np.stack([blurred.copy(), blurred.copy(), blurred.copy()])
    planes[0][:, :896] = base[:, :896]  # left half in focus on plane 0
    planes[2][:, 896:] = base[:, 896:]  # right half in focus on plane 2
    path = tmp_path / "zstack.ome.tiff"
    tifffile.imwrite(
        path,
        planes,
        photometric="rgb",
        tile=(256, 256),
        metadata={"axes": "ZYXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    with wsi.open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.n_focal_planes == 3
        assert slide.mpp is not None and slide.mpp.detail == "OME PhysicalSizeX/Y"
        mask = wsi.detect_tissue(slide)
        coords = wsi.tile_coords(slide, mask)
        store = wsi.write_patches(slide, coords, tmp_path / "z", mask=mask)
    g = zarr.open_group(store, mode="r")
    chosen = g["focal_plane"][:]
    expect = np.where(g["coords"][:, 0] < 896, 0, 2)
    np.testing.assert_array_equal(chosen, expect)


# --------------------------------------------------------------------------------------------
# wsi.Store: typed attrs, old formats, atomic commit, fingerprints
# --------------------------------------------------------------------------------------------


def _raw_attrs(store: Path) -> dict:
    """The attrs as the JSON file on disk holds them (independent of the Store code)."""
    return json.loads((store / "zarr.json").read_text())["attributes"]["oncotrace"]


def _set_raw_attrs(store: Path, attrs: dict) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["oncotrace"] = attrs
    (store / "zarr.json").write_text(json.dumps(meta))


def test_store_attrs_round_trip_every_field() -> None:
    attrs = wsi.StoreAttrs(
        complete=True,
        package_version="9.9",
        created="2024-01-02T03:04:05+00:00",
        slide_id="s1",
        source_path="/data/s1.svs",
        source_fingerprint="size=1;mtime_ns=2",
        backend="openslide",
        level0_size=(3072, 2048),
        mpp=(0.25, 0.26),
        mpp_source="file",
        mode="tissue",
        target_mpp=0.5,
        tile_px=224,
        tile_size_level0=(448.0, 430.0),
        n_tiles=17,
        tiling=wsi.TilingConfig(target_mpp=0.5, stride_px=112, min_focus=3.0, max_upsample=1.5),
        mpp_detail="aperio.MPP",
        stride_level0=(224.0, 215.0),
        read_level=1,
        read_size=(224, 215),
        upsample=1.24,
        edges="padded",
        tissue_qc={"tissue_fraction": 0.4},
        mask_mpp=8.0,
        slide_properties={"vendor": "aperio"},
        source_sha256="ab" * 32,
        has_patches=False,
        tile_size_source="file",
        import_info={"format": "trident", "h5_attrs": {"patch_size": 256}},
        extra={"written_by_a_later_version": [1, 2]},
    )
    d = attrs.to_dict()
    assert d["format"] == wsi.STORE_FORMAT and d["import"]["format"] == "trident"
    assert d["written_by_a_later_version"] == [1, 2]  # unknown keys survive a rewrite
    assert d["tiling"]["stride_px"] == 112 and d["level0_size"] == [3072, 2048]
    back = wsi.StoreAttrs.from_dict(json.loads(json.dumps(d)))  # through real JSON
    assert back == attrs


def test_a_tiled_store_reads_back_with_exactly_its_keys(planted, tmp_path: Path) -> None:
    res = wsi.tile_slide(planted.path, tmp_path / "o")
    raw = _raw_attrs(res.store)
    st = wsi.Store.open(res.store)
    assert st.attrs.to_dict() == raw  # nothing added, lost or changed on the way
    assert st.attrs.level0_size == (3072, 2048) and st.attrs.mpp == (0.25, 0.25)
    assert st.attrs.tiling == wsi.TilingConfig() and st.attrs.n_tiles == raw["n_tiles"]
    assert st.attrs.has_patches and st.feature_names() == []
    np.testing.assert_array_equal(st.coords(), zarr.open_group(res.store)["coords"][:])


def test_a_store_without_format_version_opens_and_is_reused(planted, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = wsi.tile_slide(planted.path, out)
    old = _raw_attrs(first.store)
    del old["format"]  # as a store written before the key (or by another tool) looks
    _set_raw_attrs(first.store, old)
    st = wsi.Store.open(first.store)
    assert st.format_on_disk is None and st.attrs.format_version == wsi.STORE_FORMAT
    assert st.attrs.slide_id == "slide" and st.attrs.n_tiles == first.n_tiles
    again = wsi.tile_slide(planted.path, out)
    assert again.skipped  # migrated in memory: same source and tiling, so reused
    assert "format" not in _raw_attrs(first.store)  # and nothing rewritten on disk


def test_a_store_cut_before_edge_tiles_and_max_upsample_opens_and_is_cut_again(
    planted, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    first = wsi.tile_slide(planted.path, out)
    raw = _raw_attrs(first.store)
    assert raw["edges"] == "padded" and raw["upsample"] == 1.0
    assert raw["tiling"]["max_upsample"] == 1.3
    old = {k: v for k, v in raw.items() if k not in ("edges", "upsample")}
    old["tiling"] = {k: v for k, v in raw["tiling"].items() if k != "max_upsample"}
    _set_raw_attrs(first.store, old)  # as the previous release wrote it, format 1 as ever
    st = wsi.Store.open(first.store)
    assert st.attrs.edges is None and st.attrs.upsample is None
    assert st.attrs.tiling == wsi.TilingConfig()  # the missing bound reads as the default
    fp = wsi.open_slide(planted.path).fingerprint
    # same source and config, but cut without the edge tiles: not up to date
    assert not wsi.is_complete(first.store, fingerprint=fp, config=wsi.TilingConfig())
    again = wsi.tile_slide(planted.path, out)
    assert not again.skipped and _raw_attrs(again.store)["edges"] == "padded"
    assert wsi.tile_slide(planted.path, out).skipped


def test_a_store_of_a_newer_format_is_refused_with_the_fix(planted, tmp_path: Path) -> None:
    res = wsi.tile_slide(planted.path, tmp_path / "o")
    _set_raw_attrs(res.store, {**_raw_attrs(res.store), "format": wsi.STORE_FORMAT + 1})
    with pytest.raises(wsi.StoreError, match=r"slide\.zarr.*newer.*upgrade OncoTrace"):
        wsi.Store.open(res.store)


def test_a_failure_inside_create_leaves_no_finished_looking_store(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="reader died"), wsi.Store.create(final) as st:
        st.write_coords(np.zeros((3, 2), np.int64))
        st.write_attrs(wsi.StoreAttrs(complete=True, slide_id="s", n_tiles=3))
        raise RuntimeError("reader died")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(wsi.StoreError, match="without complete attrs"), wsi.Store.create(final):
        pass  # a writer that never marks the store complete commits nothing either
    assert list(tmp_path.iterdir()) == []

    with wsi.Store.create(final) as st:  # a finished store ...
        st.write_coords(np.ones((2, 2), np.int64))
        st.write_attrs(wsi.StoreAttrs(complete=True, slide_id="old", n_tiles=2))
    assert st.path == final and wsi.Store.open(final).attrs.slide_id == "old"
    with pytest.raises(OSError, match="disk full"), wsi.Store.create(final) as st:
        st.write_attrs(wsi.StoreAttrs(complete=True, slide_id="new"))
        raise OSError("disk full")
    # ... survives a failed rewrite untouched, and no partial folder is left beside it
    assert _raw_attrs(final)["slide_id"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_features_round_trip_and_a_failed_write_keeps_the_old_ones(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(10, 4)).astype(np.float32)
    with wsi.Store.create(final) as st:
        st.write_coords(np.arange(20, dtype=np.int64).reshape(10, 2))
        meta = wsi.FeatureAttrs(encoder={"name": "enc", "dim": 4}, weights_fingerprint="w1")
        with st.write_features("enc", 10, 4, attrs=meta, chunk_rows=3) as w:
            for start in range(0, 10, 4):  # blocks of 4 straddle chunks of 3
                w.append(feats[start : start + 4])
        st.write_attrs(wsi.StoreAttrs(complete=True, n_tiles=10))
    st = wsi.Store.open(final, mode="r+")
    np.testing.assert_array_equal(st.read_features("enc"), feats)
    arr = zarr.open_array(final / "features" / "enc", mode="r")
    assert arr.chunks == (3, 4) and arr.attrs["complete"] and arr.attrs["n_tiles"] == 10
    assert st.feature_names() == ["enc"] and st.feature_attrs("enc").weights_fingerprint == "w1"
    with (
        pytest.raises(ValueError, match="got 5 of 10 rows"),
        st.write_features("enc", 10, 4, attrs=meta) as w,
    ):
        w.append(np.zeros((5, 4), np.float32))
    np.testing.assert_array_equal(st.read_features("enc"), feats)  # the old ones are intact
    assert st.feature_names() == ["enc"] and not list((final / "features").glob(".*"))
    with pytest.raises(wsi.StoreError, match=r"no features/other.*present: \['enc'\]"):
        st.features_array("other")


def test_source_fingerprint_covers_every_file_of_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"first instance")
    (folder / "b.dcm").write_bytes(b"second instance")
    before = wsi.source_fingerprint(folder)
    first_before = wsi.source_fingerprint(folder / "a.dcm")
    (folder / "b.dcm").write_bytes(b"second instance, rescanned")
    assert wsi.source_fingerprint(folder / "a.dcm") == first_before  # the first file is as it was
    assert wsi.source_fingerprint(folder) != before
    st = os.stat(folder / "a.dcm")
    assert wsi.source_fingerprint(folder / "a.dcm") == (
        f"size={st.st_size};mtime_ns={st.st_mtime_ns}"
    )


def test_a_changed_dicom_instance_is_tiled_again(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dicom-wsi"
    if not data.is_dir():
        pytest.skip("shared data not present")
    folder = tmp_path / "marrow"
    folder.mkdir()
    # one series (a folder of two series is refused since 3ad65ae); the fingerprint covers
    # every file of the folder, so touching the instance must re-tile it
    shutil.copy(data / "bone-marrow" / "bone-marrow-jpeg.dcm", folder / "a-marrow.dcm")
    cfg = wsi.TilingConfig(target_mpp=20, tile_px=32, min_tissue=0.5)
    out = tmp_path / "o"
    first = wsi.tile_slide(folder, out, cfg)
    assert not first.skipped and wsi.Store.open(first.store).attrs.backend == "openslide"
    assert wsi.tile_slide(folder, out, cfg).skipped  # unchanged: reused
    later = os.stat(folder / "a-marrow.dcm").st_mtime_ns + 5_000_000_000
    os.utime(folder / "a-marrow.dcm", ns=(later, later))  # touch the instance
    again = wsi.tile_slide(folder, out, cfg)
    assert not again.skipped
    assert wsi.Store.open(again.store).attrs.source_fingerprint == wsi.source_fingerprint(folder)


def test_atomic_json_writer_leaves_the_old_file_when_the_value_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    wsi.atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        wsi.atomic_write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [
        "r.json"
    ]


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_read_ahead_stops_its_reader_when_the_consumer_raises() -> None:
    produced: list[int] = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    with (
        pytest.raises(RuntimeError, match="consumer"),
        wsi.read_ahead(endless(), depth=2, name="t-read-ahead") as items,
    ):
        for i in items:
            if i == 3:
                raise RuntimeError("consumer failed")
    assert _threads("t-read-ahead") == []  # joined, not blocked on a full buffer forever
    assert len(produced) <= 3 + 1 + 2 + 1  # taken + current + buffered + one being read


def test_read_ahead_yields_in_order_and_raises_the_sources_error_in_place() -> None:
    def source() -> Iterator[int]:
        yield from range(5)
        raise OSError("bad shard")

    got = []
    with pytest.raises(OSError, match="bad shard"):
        for i in wsi.read_ahead(source(), depth=1, name="t-read-ahead-2"):
            got.append(i)
    assert got == [0, 1, 2, 3, 4] and _threads("t-read-ahead-2") == []
    assert list(wsi.read_ahead(iter(range(7)), depth=3)) == list(range(7))


def _shard_files(store: Path) -> list[Path]:
    return sorted(
        p for p in (store / "patches").rglob("*") if p.is_file() and p.name != "zarr.json"
    )


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_store_that_lost_a_shard_is_not_up_to_date_and_is_cut_again(
    planted, tmp_path: Path, damage: str
) -> None:
    cfg = wsi.TilingConfig(tile_px=112)  # 96 tiles: two shards of 64
    first = wsi.tile_slide(planted.path, tmp_path / "stores", cfg)
    before = np.asarray(wsi.Store.open(first.store).patches()[...])
    shards = _shard_files(first.store)
    assert first.n_tiles == 96 and len(shards) == 2
    if damage == "deleted":
        shards[1].unlink()  # zarr would read its 32 tiles as zeros
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:100])
    fp = wsi.open_slide(planted.path).fingerprint
    assert not wsi.is_complete(first.store, fingerprint=fp, config=cfg)
    again = wsi.tile_slide(planted.path, tmp_path / "stores", cfg)
    assert not again.skipped  # was: "up to date"
    after = np.asarray(wsi.Store.open(again.store).patches()[...])
    np.testing.assert_array_equal(after, before)
    assert after[64:].any(axis=(1, 2, 3)).all()  # no blank tile where the shard was


def test_a_store_from_before_manifests_that_lost_a_shard_is_cut_again(
    planted, tmp_path: Path
) -> None:
    """Stores written before manifests were trusted as they were; the tiler writes one shard per
    64 tiles, so a missing one is found without a manifest too."""
    cfg = wsi.TilingConfig(tile_px=112)  # 96 tiles: two shards of 64
    first = wsi.tile_slide(planted.path, tmp_path / "stores", cfg)
    (first.store / "oncotrace-manifest.json").unlink()  # as an older OncoTrace wrote it
    assert wsi.Store.open(first.store).damage() is None  # whole: still trusted
    fp = wsi.open_slide(planted.path).fingerprint
    assert wsi.is_complete(first.store, fingerprint=fp, config=cfg)
    _shard_files(first.store)[1].unlink()
    assert "patches has 1 of its 2 shard files" in (wsi.Store.open(first.store).damage() or "")
    assert not wsi.is_complete(first.store, fingerprint=fp, config=cfg)
    assert not wsi.tile_slide(planted.path, tmp_path / "stores", cfg).skipped


def test_reading_the_patches_of_a_damaged_store_refuses_naming_it_and_the_fix(
    planted, tmp_path: Path
) -> None:
    res = wsi.tile_slide(planted.path, tmp_path / "stores", wsi.TilingConfig(tile_px=112))
    lost = _shard_files(res.store)[0]
    lost.unlink()
    store = wsi.Store.open(res.store)
    with pytest.raises(wsi.StoreError) as err:
        store.patches()
    text = str(err.value)
    assert str(res.store) in text
    assert lost.relative_to(res.store).as_posix() in text
    assert "oncotrace tile" in text
