"""Tile geometry against independent truths: planted squares, exact area downsampling."""

from __future__ import annotations

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
    assert len(xs) == int((3000 - 373.33) // 373.33) + 1


def test_stride_gives_overlapping_tiles(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "s.tiff", size=(2048, 1024), squares=[(0, 0, 2048, 1024)]
    )
    with wsi.open_slide(planted.path) as slide:
        full = wsi.tile_coords(slide, None, target_mpp=0.5, tile_px=224)
        half = wsi.tile_coords(slide, None, target_mpp=0.5, tile_px=224, stride_px=112)
    assert len(full) == (2048 // 448) * (1024 // 448)
    assert len(half) == ((2048 - 448) // 224 + 1) * ((1024 - 448) // 224 + 1)


def test_coarser_slide_than_target_is_a_resolution_error(tmp_path: Path) -> None:
    planted = make_tissue_squares(
        tmp_path / "c.tiff", size=(512, 512), mpp=2.0, squares=[(0, 0, 512, 512)]
    )
    with (
        wsi.open_slide(planted.path) as slide,
        pytest.raises(wsi.ResolutionError, match="target_mpp="),
    ):
        wsi.tile_geometry(slide, target_mpp=0.5)


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
