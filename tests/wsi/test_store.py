"""Tile stores: atomic commit, resume, SIGKILL safety, focus filter, Z-stacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
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
