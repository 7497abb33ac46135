"""Tile geometry against independent truths: planted squares, exact area downsampling."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from oncotrace import wsi
from oncotrace.wsi.synthetic import he_texture, make_tissue_squares, write_pyramid_tiff

TILE0 = 448  # a 224-px tile at 0.5 µm/px spans 448 level-0 px at 0.25 µm/px


def expected_tiles(squares: np.ndarray, size: tuple[int, int], tile0: int) -> set[tuple[int, int]]:
    """Grid cells lying entirely inside a planted square, enumerated by hand."""
    out = set()
    for ty in range(0, size[1] - tile0 + 1, tile0):
        for tx in range(0, size[0] - tile0 + 1, tile0):
            for x, y, w, h in squares:
                if x <= tx and tx + tile0 <= x + w and y <= ty and ty + tile0 <= y + h:
                    out.add((tx, ty))
    return out


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_planted_squares_give_exactly_the_expected_tiles(tmp_path: Path, compression: str) -> None:
    squares = [(448, 448, 896, 896), (2240, 896, 1344, 896), (896, 2240, 448, 448)]
    planted = make_tissue_squares(
        tmp_path / "sq.tiff",
        size=(4096, 3072),
        squares=squares,
        compression=compression,  # type: ignore[arg-type]
    )
    with wsi.open_slide(planted.path) as slide:
        # JPEG tiles go to cuCIM, Deflate tiles must not (cuCIM crashes on them)
        assert slide.backend == ("cucim" if compression == "jpeg" else "openslide")
        mask = wsi.detect_tissue(slide)
        coords = wsi.tile_coords(slide, mask, target_mpp=0.5, tile_px=224, min_tissue=0.5)
    got = {(int(x), int(y)) for x, y in coords}
    want = expected_tiles(planted.squares, planted.size, TILE0)
    assert len(want) == 4 + 6 + 1
    assert got == want
    assert coords.dtype == np.int64 and coords.shape == (len(want), 2)


def test_tile_at_half_resolution_is_an_exact_2x_area_downsample(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    level0 = he_texture((1024, 1536), rng, mpp=0.25)
    path = write_pyramid_tiff(
        tmp_path / "t.tiff", level0, mpp=0.25, levels=2, factor=4, compression="none"
    )
    with wsi.open_slide(path) as slide:
        geom = wsi.tile_geometry(slide, target_mpp=0.5, tile_px=224)
        assert geom.read_level == 0  # level 1 (1 µm/px) is coarser than the target
        assert geom.read_size == (448, 448)
        for x, y in [(0, 0), (448, 448), (1000, 300)]:
            tile = wsi.read_tile(slide, (x, y), geom)
            block = level0[y : y + 448, x : x + 448].astype(np.float64)
            truth = block.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
            assert tile.shape == (224, 224, 3)
            assert np.abs(tile - truth).max() <= 1.0


def test_target_matching_a_pyramid_level_reads_that_level_unresampled(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    level0 = he_texture((2048, 2048), rng, mpp=0.25)
    path = write_pyramid_tiff(
        tmp_path / "t.tiff", level0, mpp=0.25, levels=2, factor=4, compression="none"
    )
    with wsi.open_slide(path) as slide:
        geom = wsi.tile_geometry(slide, target_mpp=1.0, tile_px=128)
        assert geom.read_level == 1 and geom.read_size == (128, 128)
        level1 = slide.read_region((0, 0), 1, slide.level_dimensions[1])
        tile = wsi.read_tile(slide, (512, 1024), geom)
    np.testing.assert_array_equal(tile, level1[256:384, 128:256])


def test_non_integer_scale_covers_the_requested_micrometres(tmp_path: Path) -> None:
    # 0.3 µm/px scanner, 0.5 µm/px target: a 224-px tile spans 373.3 level-0 px
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(3000, 2000), mpp=0.3, squares=[(0, 0, 3000, 2000)]
    )
    with wsi.open_slide(planted.path) as slide:
        geom = wsi.tile_geometry(slide, target_mpp=0.5, tile_px=224)
        coords = wsi.tile_coords(slide, None, target_mpp=0.5, tile_px=224)
    assert geom.size_level0 == pytest.approx((224 * 0.5 / 0.3,) * 2)
    assert geom.read_size == (373, 373)
    xs = np.unique(coords[:, 0])
    # tile corners follow the exact (fractional) pitch, rounded: never drifting
    np.testing.assert_array_equal(xs, np.round(np.arange(len(xs)) * 224 * 0.5 / 0.3))
    # 3000 / 373.33 = 8.04 tiles: 8 whole ones and a ninth overhanging the right edge
    assert len(xs) == 9 and xs[-1] == 2987 and xs[-1] + 373.33 >= 3000


def test_stride_gives_overlapping_tiles(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(2048, 1024), squares=[(0, 0, 2048, 1024)]
    )
    with wsi.open_slide(planted.path) as slide:
        full = wsi.tile_coords(slide, None, target_mpp=0.5, tile_px=224)
        half = wsi.tile_coords(slide, None, target_mpp=0.5, tile_px=224, stride_px=112)
    # 2048 / 448 = 4.6 and 1024 / 448 = 2.3: the last column and row overhang the slide
    assert len(full) == 5 * 3
    # a 448-px tile every 224 px, until one reaches the edge: x = 0 … 1792 (9), y = 0 … 672 (4)
    assert len(half) == 9 * 4
    assert set(half[:, 0]) == set(range(0, 1793, 224)) and set(half[:, 1]) == {0, 224, 448, 672}


def test_coarser_slide_than_target_is_a_resolution_error(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "c.tiff", size=(512, 512), mpp=2.0, squares=[(0, 0, 512, 512)]
    )
    with (
        wsi.open_slide(planted.path) as slide,
        pytest.raises(wsi.ResolutionError, match="target_mpp=") as err,
    ):
        wsi.tile_geometry(slide, target_mpp=0.5)
    # ×4 is past what raising max_upsample should be suggested for; the targets are offered
    assert "max_upsample=4" not in str(err.value)
    assert "target_mpp=1.54 or more" in err.value.fix  # 2 / 1.3 = 1.538…, rounded up
    assert "target_mpp=2 is the slide's own resolution" in err.value.fix


def test_coords_and_pixels_round_trip_through_the_store(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "r.tiff", size=(3072, 2048), squares=[(448, 448, 1344, 896)], compression="none"
    )
    with wsi.open_slide(planted.path) as slide:
        mask = wsi.detect_tissue(slide)
        coords = wsi.tile_coords(slide, mask)
        store = wsi.write_patches(slide, coords, tmp_path / "stores", mask=mask, workers=2)
        level0 = slide.read_region((0, 0), 0, slide.dimensions)
    g = zarr.open_group(store, mode="r")
    np.testing.assert_array_equal(g["coords"][:], coords)
    assert g["coords"].dtype == np.int64
    patches = g["patches"]
    assert patches.shape == (len(coords), 224, 224, 3)
    assert patches.chunks == (1, 224, 224, 3) and patches.shards == (64, 224, 224, 3)
    for i in [0, len(coords) // 2, len(coords) - 1]:
        x, y = coords[i]
        truth = (
            level0[y : y + 448, x : x + 448]
            .astype(np.float64)
            .reshape(224, 2, 224, 2, 3)
            .mean(axis=(1, 3))
        )
        assert np.abs(patches[i].astype(np.float64) - truth).max() <= 1.0
    attrs = g.attrs["oncotrace"]
    assert attrs["complete"] is True
    assert attrs["level0_size"] == [3072, 2048]
    assert attrs["mpp"] == [0.25, 0.25] and attrs["mpp_source"] == "file"
    assert attrs["tile_px"] == 224 and attrs["tile_size_level0"] == [448.0, 448.0]
    assert attrs["n_tiles"] == len(coords) and attrs["mode"] == "tissue"
    assert attrs["source_fingerprint"] == slide.fingerprint
    assert set(attrs["slide_properties"]) == set(wsi.EXPORTED_PROPERTIES)
    assert g["mask"].shape == mask.mask.shape and g["thumbnail"].shape[2] == 3


# -- edge tiles ----------------------------------------------------------------------------------


def test_tissue_touching_the_right_and_bottom_edges_is_all_tiled(tmp_path: Path) -> None:
    # 2092 × 1644 px at 0.25 µm/px: a 448-px tile grid holds 4 × 3 whole tiles and a strip of
    # 300 px (67 % of a tile) at the right and bottom edges. The tissue fills x ≥ 896, y ≥ 448
    # up to both edges, so tiles x ∈ {896, 1344, 1792} × y ∈ {448, 896, 1344} hold it, the
    # corner one 0.67² = 45 % (≥ 25 %): nine tiles, five of them overhanging the slide.
    size = (2092, 1644)
    planted = make_tissue_squares(
        tmp_path / "edge.tiff", size=size, squares=[(896, 448, 2092 - 896, 1644 - 448)]
    )
    with wsi.open_slide(planted.path) as slide:
        mask = wsi.detect_tissue(slide)
        coords = wsi.tile_coords(slide, mask, target_mpp=0.5, tile_px=224)
        store = wsi.write_patches(slide, coords, tmp_path / "o", mask=mask)
        level0 = slide.read_region((0, 0), 0, slide.dimensions)
    want = {(x, y) for x in (896, 1344, 1792) for y in (448, 896, 1344)}
    assert {(int(x), int(y)) for x, y in coords} == want
    # every tissue pixel of the mask (its centre in level-0 px) lies inside some tile
    ys, xs = np.nonzero(mask.mask)
    px, py = (xs + 0.5) * mask.downsample, (ys + 0.5) * mask.downsample
    inside = np.zeros(len(px), bool)
    for x, y in coords:
        inside |= (px >= x) & (px < x + TILE0) & (py >= y) & (py < y + TILE0)
    assert len(px) > 0 and inside.all(), f"{(~inside).sum()} of {len(px)} tissue pixels untiled"
    assert px.max() > size[0] - mask.downsample and py.max() > size[1] - mask.downsample
    # the corner tile: the slide's own pixels, white beyond the edge, 2 × 2 area-averaged
    st = wsi.Store.open(store)
    i = [tuple(c) for c in st.coords().tolist()].index((1792, 1344))
    padded = np.full((TILE0, TILE0, 3), 255, np.float64)
    padded[: size[1] - 1344, : size[0] - 1792] = level0[1344:, 1792:]
    truth = padded.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
    assert np.abs(st.patches()[i].astype(np.float64) - truth).max() <= 1.0
    # coverage counts the padding as glass: 300 × 300 of 448 × 448 is tissue
    frac = zarr.open_group(store, mode="r")["tissue_fraction"][i]
    assert frac == pytest.approx((300 / 448) ** 2, abs=0.05)
    assert st.attrs.edges == "padded"


def test_padded_edge_tiles_stay_on_the_heatmap_grid(tmp_path: Path) -> None:
    # spatial.attention_heatmap places tiles by their coords on the stride grid and refuses
    # off-grid ones: the overhanging tiles are on the grid and land in the last column / row.
    from oncotrace import spatial

    planted = make_tissue_squares(
        tmp_path / "g.tiff", size=(2092, 1644), squares=[(0, 0, 2092, 1644)]
    )
    res = wsi.tile_slide(planted.path, tmp_path / "o")
    st = wsi.Store.open(res.store)
    coords, a = st.coords(), st.attrs
    assert a.tile_size_level0 is not None and a.level0_size is not None and a.mpp is not None
    assert len(coords) == 5 * 4  # ceil(2092 / 448) × ceil(1644 / 448)
    heat = spatial.attention_heatmap(
        coords,
        coords[:, 0] / 448.0 + 10 * coords[:, 1] / 448.0,  # planted: column + 10 × row
        tile_size_level0=a.tile_size_level0,
        level0_size=a.level0_size,
        mpp=a.mpp,
        stride_level0=a.stride_level0,
    )
    assert heat.shape == (4, 5)
    rows, cols = np.mgrid[0:4, 0:5]
    np.testing.assert_allclose(heat.grid, cols + 10 * rows)


@pytest.mark.parametrize(
    ("extent", "tile", "stride", "count"),
    [
        (2048, 448, 448, 5),  # 4.57 tiles: the fifth overhangs
        (1792, 448, 448, 4),  # exactly 4: nothing overhangs
        (1793, 448, 448, 5),  # one pixel more: a fifth tile for it
        (1792.4, 448, 448, 4),  # less than half a pixel past is rounding, not a strip
        (100, 448, 448, 1),  # smaller than a tile: one padded tile
        (1024, 448, 224, 4),  # 0, 224, 448, 672: the last ends at 1120 ≥ 1024
        (1000, 100, 300, 4),  # gaps: every start inside (0, 300, 600, 900)
        (1050, 100, 300, 4),  # 1200 would start past the edge
    ],
)
def test_grid_counts_reach_the_edge(extent: float, tile: float, stride: float, count: int) -> None:
    from oncotrace.wsi._tiling import grid_count  # private: the per-axis rule of tile_coords

    assert grid_count(extent, tile, stride) == count


# -- upsampling a slide slightly coarser than the target ----------------------------------------

GLAS = Path("mil") / "glas_dev" / "benign"


def test_glas_field_at_0_62_um_tiles_at_0_5_with_a_warning(
    shared_data: Path, tmp_path: Path
) -> None:
    field = sorted((shared_data / GLAS).glob("*.png"))[0]
    with pytest.warns(wsi.UpsamplingWarning, match=r"upsampled ×1\.24") as caught:
        res = wsi.tile_slide(field, tmp_path / "o", wsi.TilingConfig(target_mpp=0.5), mpp=0.62)
    assert [w.message.factor for w in caught] == [pytest.approx(0.62 / 0.5)]  # type: ignore[union-attr]
    assert str(field) in str(caught[0].message)
    st = wsi.Store.open(res.store)
    assert res.n_tiles > 0 and not res.skipped and res.upsample == pytest.approx(1.24)
    assert st.attrs.upsample == pytest.approx(1.24)
    assert st.attrs.tiling is not None and st.attrs.tiling.max_upsample == 1.3
    # a 224-px tile at 0.5 µm/px is 112 µm: 180.6 px of the 0.62 µm/px field
    assert st.attrs.tile_size_level0 == pytest.approx((224 * 0.5 / 0.62,) * 2)
    assert st.patches().shape[1:] == (224, 224, 3)


def _dark_square_slide(path: Path, mpp: float, side_um: float) -> Path:
    """Glass with H&E texture and, at its centre, a dark square of ``side_um`` µm."""
    side = round(side_um / mpp)
    img = he_texture((600, 600), np.random.default_rng(7), mpp=mpp)
    img[300 - side // 2 : 300 - side // 2 + side, 300 - side // 2 : 300 - side // 2 + side] = 30
    return write_pyramid_tiff(path, img, mpp=mpp, levels=1, compression="none")


def test_a_0_55_um_slide_is_upsampled_to_0_5_at_its_true_scale(tmp_path: Path) -> None:
    # a 55 µm square is 100 px at 0.55 µm/px and must be 110 px in 0.5 µm/px tiles
    path = _dark_square_slide(tmp_path / "s55.tiff", 0.55, 55.0)
    with wsi.open_slide(path) as slide, pytest.warns(wsi.UpsamplingWarning, match=r"×1\.1\b"):
        geom = wsi.tile_geometry(slide, target_mpp=0.5, tile_px=224)
        tile = wsi.read_tile(slide, (300 - 112, 300 - 112), geom)  # centred on the square
    assert geom.upsample == pytest.approx(1.1) and geom.read_level == 0
    dark = tile.mean(axis=2) < 80
    width = dark[112].sum(), dark[:, 112].sum()
    assert width == (pytest.approx(110, abs=2), pytest.approx(110, abs=2))


def test_max_upsample_1_refuses_a_0_55_um_slide_with_working_fixes(tmp_path: Path) -> None:
    path = _dark_square_slide(tmp_path / "s55.tiff", 0.55, 55.0)
    with wsi.open_slide(path) as slide:
        with pytest.raises(wsi.ResolutionError) as err:
            wsi.tile_geometry(slide, target_mpp=0.5, max_upsample=1.0)
        assert "target_mpp=0.55 or more (the slide's own resolution)" in err.value.fix
        assert "max_upsample=1.1" in err.value.fix
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # its own resolution: no upsampling, no warning
            assert wsi.tile_geometry(slide, target_mpp=0.55, max_upsample=1.0).upsample == 1.0


def test_slightly_coarse_scanner_calibration_is_not_warned_about(tmp_path: Path) -> None:
    path = _dark_square_slide(tmp_path / "s505.tiff", 0.505, 55.0)
    res = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = wsi.tile_slide(path, tmp_path / "o", wsi.TilingConfig(target_mpp=0.5))
    assert res.upsample == pytest.approx(1.01)  # still recorded


def _numbers_after(name: str, text: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\b{name}=([0-9.]*[0-9])", text)]


def test_a_0_8_um_slide_is_refused_and_every_suggested_fix_works(tmp_path: Path) -> None:
    # 0.8 / 0.5 = ×1.6 > 1.3. By hand: the finest target within ×1.3 is 0.8 / 1.3 = 0.6154,
    # i.e. 0.62 at two decimals; the slide's own resolution is 0.8; ×1.6 would allow 0.5.
    path = _dark_square_slide(tmp_path / "s80.tiff", 0.8, 80.0)
    out = tmp_path / "o"
    with pytest.raises(wsi.ResolutionError) as caught:
        wsi.tile_slide(path, out, wsi.TilingConfig(target_mpp=0.5))
    err = caught.value
    assert (err.finest_mpp, err.target_mpp, err.max_upsample) == (
        pytest.approx(0.8),
        0.5,
        1.3,
    )
    assert err.upsample == pytest.approx(1.6) and err.param == "target_mpp"
    assert str(path) in str(err) and "×1.6" in str(err) and "max_upsample=1.3" in str(err)
    assert sorted(_numbers_after("target_mpp", err.fix)) == [0.62, 0.8]
    assert _numbers_after("max_upsample", err.fix) == [1.6]
    back = pickle.loads(pickle.dumps(err))  # crosses Dask / multiprocessing intact
    assert type(back) is wsi.ResolutionError and str(back) == str(err)
    assert (back.finest_mpp, back.target_mpp, back.max_upsample) == (0.8, 0.5, 1.3)
    # following each suggestion tiles the slide
    for target in _numbers_after("target_mpp", err.fix):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = wsi.tile_slide(path, out / str(target), wsi.TilingConfig(target_mpp=target))
        assert res.n_tiles > 0
        factors = [w.message.factor for w in seen if isinstance(w.message, wsi.UpsamplingWarning)]
        assert factors == ([pytest.approx(0.8 / 0.62)] if target == 0.62 else [])
    cfg = wsi.TilingConfig(target_mpp=0.5, max_upsample=_numbers_after("max_upsample", err.fix)[0])
    with pytest.warns(wsi.UpsamplingWarning, match=r"×1\.6"):
        res = wsi.tile_slide(path, out / "up", cfg)
    assert res.n_tiles > 0 and wsi.Store.open(res.store).attrs.upsample == pytest.approx(1.6)


@pytest.mark.parametrize("bad", [0.99, 0.0, -1.0, float("nan"), float("inf"), True, "1.3", None])
def test_max_upsample_must_be_a_number_of_at_least_1(bad: object) -> None:
    with pytest.raises(wsi.ParameterError, match="max_upsample=") as err:
        wsi.TilingConfig(max_upsample=bad)  # type: ignore[arg-type]
    assert err.value.param == "max_upsample"
    with pytest.raises(ValueError, match="max_upsample="):
        wsi.TilingConfig.from_dict({"max_upsample": bad})


def test_max_upsample_round_trips_and_configs_without_it_take_the_default() -> None:
    cfg = wsi.TilingConfig(max_upsample=1.5)
    assert cfg.to_dict()["max_upsample"] == 1.5
    assert wsi.TilingConfig.from_dict(cfg.to_dict()) == cfg
    assert wsi.TilingConfig(max_upsample=1) == wsi.TilingConfig(max_upsample=1.0)
    old = {k: v for k, v in wsi.TilingConfig().to_dict().items() if k != "max_upsample"}
    assert wsi.TilingConfig.from_dict(old).max_upsample == 1.3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "10", True])
def test_min_focus_must_be_a_finite_number_of_at_least_0(bad: object) -> None:
    """NaN compares false with every focus score: every tile dropped, a "complete" empty store."""
    with pytest.raises(wsi.ParameterError, match="min_focus=") as err:
        wsi.TilingConfig(min_focus=bad)  # type: ignore[arg-type]
    assert err.value.param == "min_focus"
    assert "Fix:" in str(err.value)
    assert wsi.TilingConfig(min_focus=0.0).min_focus == 0.0  # 0 keeps every tile: allowed
