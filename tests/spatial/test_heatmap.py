"""Attention heatmaps: a planted hot rectangle must land where it was planted in every output.

The slide: 256-px tiles (level 0) on a 20 x 14 grid of a 5200 x 3700 slide at 0.5 µm/px, with
a few tiles missing (tissue holes). Tiles whose top-left corner lies in the rectangle
x in [1280, 2304), y in [768, 1536) — grid columns 5..8, rows 3..5 — score 1, all others 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from oncotrace import spatial

TILE = 256
MPP = 0.5
SLIDE = (5200, 3700)  # (width, height): 20.3 x 14.5 tiles, so the grid is 21 x 15 cells
COLS, ROWS = 20, 14
HOT_COLS, HOT_ROWS = range(5, 9), range(3, 6)
HOLES = {(0, 0), (1, 7), (10, 12), (13, 19)}  # (row, col) of missing tiles


def planted() -> tuple[np.ndarray, np.ndarray]:
    cells = [(r, c) for r in range(ROWS) for c in range(COLS) if (r, c) not in HOLES]
    coords = np.array([(c * TILE, r * TILE) for r, c in cells], dtype=np.int64)
    scores = np.array(
        [1.0 if (r in HOT_ROWS and c in HOT_COLS) else 0.0 for r, c in cells], np.float32
    )
    return coords, scores


def planted_heatmap() -> spatial.Heatmap:
    coords, scores = planted()
    return spatial.attention_heatmap(
        coords, scores, tile_size_level0=TILE, level0_size=SLIDE, mpp=MPP
    )


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def test_planted_rectangle_lands_in_its_cells() -> None:
    heat = planted_heatmap()
    assert heat.shape == (15, 21)  # ceil(3700 / 256), ceil(5200 / 256)
    assert heat.grid.dtype == np.float32
    assert heat.origin_level0 == (0.0, 0.0)
    assert heat.cell_size_level0 == (256.0, 256.0)
    assert heat.cell_size_um == (128.0, 128.0)
    for r in range(15):
        for c in range(21):
            value = heat.grid[r, c]
            if r >= ROWS or c >= COLS or (r, c) in HOLES:
                assert np.isnan(value), (r, c)
            elif r in HOT_ROWS and c in HOT_COLS:
                assert value == 1.0, (r, c)
            else:
                assert value == 0.0, (r, c)


def test_cell_helpers_map_level0_points_both_ways() -> None:
    heat = planted_heatmap()
    row, col = heat.cell_of([0, 255, 256, 1300], [0, 700, 767, 768])
    assert row.tolist() == [0, 2, 2, 3]
    assert col.tolist() == [0, 0, 1, 5]
    x, y = heat.cell_origin_level0(3, 5)
    assert (float(x), float(y)) == (1280.0, 768.0)
    cx, cy = heat.cell_centre_level0(3, 5)
    assert (float(cx), float(cy)) == (1408.0, 896.0)
    values = heat.value_at([1300, 100, 100, -5, 6000], [800, 100, 300, 0, 0])
    assert values[0] == 1.0 and values[2] == 0.0
    assert np.isnan(values[1])  # hole at (0, 0)
    assert np.isnan(values[3]) and np.isnan(values[4])  # off the grid


def test_overlapping_tiles_average_into_the_cells_they_cover() -> None:
    # 200-px tiles at a 100-px stride each cover 2 x 2 cells. Hand-computed:
    # A (0, 0) = 1 covers cells (0,0) (0,1) (1,0) (1,1); B (100, 0) = 3 covers (0,1) (0,2) (1,1)
    # (1,2); C (0, 100) = 5 covers (1,0) (1,1) (2,0) (2,1).
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    heat = spatial.attention_heatmap(
        coords,
        [1.0, 3.0, 5.0],
        tile_size_level0=200,
        stride_level0=100,
        level0_size=(300, 300),
        mpp=0.25,
    )
    expected = np.array([[1, 2, 3], [3, 3, 3], [5, 5, np.nan]], np.float32)
    np.testing.assert_array_equal(heat.grid, expected)
    assert heat.cell_size_um == (25.0, 25.0)


def test_partial_overlap_covers_cells_whose_centre_is_inside_the_tile() -> None:
    # 224-px tile at a 100-px stride: cell centres at +50, +150 are inside, +250 is not.
    heat = spatial.attention_heatmap(
        [[100, 0]],
        [2.0],
        tile_size_level0=224,
        stride_level0=100,
        level0_size=(1000, 500),
        mpp=0.5,
    )
    assert heat.shape == (5, 10)
    hot = np.argwhere(~np.isnan(heat.grid))
    assert hot.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]


def test_fractional_stride_grid_and_offset_origin() -> None:
    # wsi.tile_coords places tiles at round(i * stride); a non-integer stride must still map
    # tile i to cell i.
    stride = 448.5
    xs = np.round(np.arange(6) * stride).astype(np.int64)
    coords = np.stack([xs, np.zeros_like(xs)], axis=1)
    heat = spatial.attention_heatmap(
        coords, np.arange(6.0), tile_size_level0=stride, level0_size=(3000, 500), mpp=0.5
    )
    assert heat.grid[0, :6].tolist() == [0, 1, 2, 3, 4, 5]
    # A grid cut from an offset of 30 px (e.g. imported CLAM coords) keeps its own origin.
    shifted = coords[1:] + np.array([30, 0])
    heat2 = spatial.attention_heatmap(
        shifted, np.arange(5.0), tile_size_level0=stride, level0_size=(3000, 500), mpp=0.5
    )
    assert heat2.origin_level0[0] == pytest.approx(30.0, abs=1.0)
    assert heat2.origin_level0[1] == 0.0
    assert heat2.value_at(30 + 3 * stride + 10, 10)[()] == 2.0


def test_tiles_overhanging_the_slide_edge_are_clipped() -> None:
    # 256-px tile at x=400 on a 100-px grid of a 500-px-wide slide: it would cover columns 4..6,
    # but the grid has ceil(500 / 100) = 5 columns.
    heat = spatial.attention_heatmap(
        [[400, 0]],
        [1.0],
        tile_size_level0=256,
        stride_level0=100,
        level0_size=(500, 256),
        mpp=0.5,
    )
    assert heat.shape == (3, 5)
    assert np.argwhere(~np.isnan(heat.grid)).tolist() == [[0, 4], [1, 4], [2, 4]]


def test_normalise_attention() -> None:
    np.testing.assert_allclose(
        spatial.normalise_attention([10.0, 20.0, 20.0, 40.0]), [0.25, 0.625, 0.625, 1.0]
    )
    np.testing.assert_allclose(
        spatial.normalise_attention([2.0, 4.0, 6.0], method="minmax"), [0, 0.5, 1]
    )
    np.testing.assert_allclose(spatial.normalise_attention([3.0, 3.0], method="minmax"), [0.5, 0.5])
    raw = spatial.normalise_attention(np.array([1e-5, 2e-5]), method="raw")
    assert raw.dtype == np.float32 and raw.tolist() == pytest.approx([1e-5, 2e-5])
    with pytest.raises(ValueError, match="method"):
        spatial.normalise_attention([1.0], method="zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        spatial.normalise_attention([1.0, np.nan])


GOOD = {"tile_size_level0": 256, "level0_size": (1024, 1024), "mpp": 0.5}


@pytest.mark.parametrize(
    ("coords", "scores", "kwargs", "message"),
    [
        ([[0, 0], [256, 0]], [1.0], {}, "coords has 2 rows but scores"),
        ([[0, 0], [256, 0]], [1.0, np.nan], {}, "NaN/inf values .first at tile 1"),
        ([[0, 0]], [1.0], {"tile_size_level0": 0}, "tile_size_level0 must be positive"),
        ([[0, 0]], [1.0], {"mpp": -0.5}, "mpp must be positive"),
        ([[0, 0]], [1.0], {"stride_level0": 0}, "stride_level0 must be positive"),
        ([[0, 0], [1024, 0]], [1.0, 2.0], {}, "1 of 2 tiles start outside the 1024 x 1024 slide"),
        ([[-256, 0]], [1.0], {}, "outside"),
        ([[0, 0], [100, 0]], [1.0, 2.0], {}, "not on a grid of stride .256, 256. .*stride_level0"),
        ([0, 0], [1.0], {}, r"\(N, 2\)"),
        ([[0.5, 0]], [1.0], {}, "whole level-0 pixels"),
        (np.zeros((0, 2), np.int64), [], {}, "no tiles"),
        ([[0, 0]], [1.0], {"level0_size": (0, 10)}, "level0_size"),
    ],
)
def test_bad_input_is_a_clear_value_error(
    coords: object, scores: object, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        spatial.attention_heatmap(coords, scores, **{**GOOD, **kwargs})  # type: ignore[arg-type]


def test_multimodal_attention_dict_names_the_fix() -> None:
    with pytest.raises(TypeError, match="slide modality"):
        spatial.attention_heatmap(
            [[0, 0]],
            {"slide": np.ones(1), "ultrasound": np.ones(3)},  # type: ignore[arg-type]
            **GOOD,  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------------------------
# OME-Zarr
# --------------------------------------------------------------------------------------------


def _read_ngff(path: Path) -> tuple[list[np.ndarray], dict]:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(str(path))
    assert location is not None
    node = next(iter(Reader(location)()))
    return [np.asarray(level) for level in node.data], node.metadata


def _corner_extent_um(
    hot: np.ndarray, scale: float, translation: float, mpp: float
) -> tuple[float, float]:
    """µm extent (corner frame) of hot indices, given a pixel-centre NGFF transform."""
    centre_first = translation + hot.min() * scale
    centre_last = translation + hot.max() * scale
    return centre_first - scale / 2 + mpp / 2, centre_last + scale / 2 + mpp / 2


def test_ome_zarr_reads_back_with_the_rectangle_at_its_micrometre_extent(tmp_path: Path) -> None:
    heat = planted_heatmap()
    out = spatial.write_ome_zarr(heat, tmp_path / "attention.ome.zarr", name="attention (t)")
    assert out == tmp_path / "attention.ome.zarr"
    assert [p.name for p in tmp_path.iterdir()] == ["attention.ome.zarr"]  # no partials left

    meta = json.loads((out / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["attributes"]["ome"]["version"] == "0.5"

    levels, md = _read_ngff(out)
    assert md["name"] == "attention (t)"
    assert [a["name"] for a in md["axes"]] == ["y", "x"]
    assert {a["unit"] for a in md["axes"]} == {"micrometer"}
    s0 = levels[0]
    assert s0.dtype == np.float32 and s0.shape == (15, 21)
    np.testing.assert_array_equal(np.isnan(s0), np.isnan(heat.grid))

    (scale, translation) = md["coordinateTransformations"][0]
    assert scale["type"] == "scale" and translation["type"] == "translation"
    sy, sx = scale["scale"]
    ty, tx = translation["translation"]
    assert (sy, sx) == (128.0, 128.0)  # 256 px x 0.5 µm/px
    rows, cols = np.nonzero(s0 == 1.0)
    # The rectangle: x in [1280, 2304) px = [640, 1152) µm; y in [768, 1536) px = [384, 768) µm.
    assert _corner_extent_um(cols, sx, tx, MPP) == pytest.approx((640.0, 1152.0))
    assert _corner_extent_um(rows, sy, ty, MPP) == pytest.approx((384.0, 768.0))


def test_ome_zarr_pyramid_levels_are_nan_aware_means(tmp_path: Path) -> None:
    # 100 x 80 cells of 64 px: longer side 100 -> 50 (stop at <= 64): two levels.
    ys, xs = np.mgrid[0:80, 0:100]
    keep = ~((ys == 1) & (xs == 1))  # one empty cell inside block (0, 0) of level 1
    coords = np.stack([xs[keep] * 64, ys[keep] * 64], axis=1)
    scores = np.where((xs[keep] >= 20) & (xs[keep] < 30) & (ys[keep] >= 10) & (ys[keep] < 16), 1, 0)
    scores = scores + 0.0
    scores[0] = 6.0  # cell (0, 0)
    heat = spatial.attention_heatmap(
        coords, scores, tile_size_level0=64, level0_size=(6400, 5120), mpp=0.25
    )
    out = spatial.write_ome_zarr(heat, tmp_path / "a.ome.zarr", name="a")
    levels, md = _read_ngff(out)
    assert [lv.shape for lv in levels] == [(80, 100), (40, 50)]
    s1 = levels[1]
    assert s1[0, 0] == pytest.approx(2.0)  # (6 + 0 + 0) / 3 valid cells, NaN ignored
    (scale, translation) = md["coordinateTransformations"][1]
    assert scale["scale"] == [32.0, 32.0]  # 2 x 64 px x 0.25 µm
    rows, cols = np.nonzero(s1 == 1.0)
    # Hot cells x in [20, 30) * 64 px * 0.25 = [320, 480) µm; y in [10, 16) -> [160, 256) µm.
    tx, ty = translation["translation"][1], translation["translation"][0]
    assert _corner_extent_um(cols, 32.0, tx, 0.25) == pytest.approx((320.0, 480.0))
    assert _corner_extent_um(rows, 32.0, ty, 0.25) == pytest.approx((160.0, 256.0))


def test_ome_zarr_rewrite_replaces_the_old_store(tmp_path: Path) -> None:
    heat = planted_heatmap()
    spatial.write_ome_zarr(heat, tmp_path / "a.ome.zarr", name="first")
    spatial.write_ome_zarr(heat, tmp_path / "a.ome.zarr", name="second")
    _, md = _read_ngff(tmp_path / "a.ome.zarr")
    assert md["name"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.ome.zarr"]


def test_read_heatmap_round_trips_the_grid_and_its_level0_frame(tmp_path: Path) -> None:
    heat = planted_heatmap()
    spatial.write_ome_zarr(
        heat, tmp_path / "d.ome.zarr", name="density", kind="immune density", unit="cells/mm²"
    )
    back = spatial.read_heatmap(tmp_path / "d.ome.zarr")
    np.testing.assert_array_equal(back.grid, heat.grid)  # NaN holes included
    assert back.origin_level0 == heat.origin_level0
    assert back.cell_size_level0 == heat.cell_size_level0
    assert back.mpp == heat.mpp and back.level0_size == heat.level0_size
    assert back.n_tiles == heat.n_tiles
    # the planted rectangle's first hot tile is still found at its level-0 position
    x, y = HOT_COLS[0] * TILE + 1, HOT_ROWS[0] * TILE + 1
    assert back.value_at([x], [y])[0] == 1.0


def test_read_heatmap_refuses_a_foreign_zarr_with_the_fix(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="oncotrace score"):
        spatial.read_heatmap(tmp_path / "other.zarr")
    with pytest.raises(FileNotFoundError, match=r"missing\.ome\.zarr"):
        spatial.read_heatmap(tmp_path / "missing.ome.zarr")


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------


def test_geojson_tiles_carry_their_polygons_and_measurements(tmp_path: Path) -> None:
    coords, scores = planted()
    other = np.linspace(0.0, 1.0, len(coords))  # float64, non-integral
    names = ["attention", 'odd "name" 100%']
    out = spatial.write_geojson(
        tmp_path / "attention.geojson",
        coords,
        {names[0]: scores, names[1]: other},
        tile_size_level0=TILE,
        classification="tumour",
    )
    text = out.read_text()
    assert "\n" not in text and ": " not in text  # compact
    doc = json.loads(text)
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(coords)
    for (x, y), s, o, feature in zip(coords.tolist(), scores, other, features, strict=True):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + TILE, y], [x + TILE, y + TILE], [x, y + TILE], [x, y]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"] == {"name": "tumour"}
        assert np.float32(props["measurements"][names[0]]) == s
        assert props["measurements"][names[1]] == o  # exact float64 round trip
    hot = [f for f in features if f["properties"]["measurements"]["attention"] == 1]
    xs = [f["geometry"]["coordinates"][0][0][0] for f in hot]
    ys = [f["geometry"]["coordinates"][0][0][1] for f in hot]
    assert (min(xs), max(xs) + TILE, min(ys), max(ys) + TILE) == (1280, 2304, 768, 1536)


def test_geojson_fractional_tile_size_per_tile_classes_and_no_class(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [449, 0]])
    out = spatial.write_geojson(
        tmp_path / "a.geojson",
        coords,
        {"a": np.array([0.1, 0.7], np.float32)},
        tile_size_level0=448.5,
        classification=["x", "y"],
    )
    doc = json.loads(out.read_text())
    assert doc["features"][1]["geometry"]["coordinates"][0][2] == [897.5, 448.5]
    assert [f["properties"]["classification"]["name"] for f in doc["features"]] == ["x", "y"]
    assert np.float32(doc["features"][0]["properties"]["measurements"]["a"]) == np.float32(0.1)
    out = spatial.write_geojson(tmp_path / "a.geojson", coords, {"a": [1, 2]}, tile_size_level0=1)
    doc = json.loads(out.read_text())
    assert "classification" not in doc["features"][0]["properties"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.geojson"]


@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        ({"a": [1.0]}, {}, "coords has 2 rows but scores_by_name\\['a'\\]"),
        ({"a": [1.0, np.inf]}, {}, "NaN/inf"),
        ({}, {}, "scores_by_name is empty"),
        ({"a": [1.0, 2.0]}, {"classification": ["x"]}, "classification has 1 names for 2"),
        ({"a": [1.0, 2.0]}, {"tile_size_level0": -1}, "tile_size_level0 must be positive"),
    ],
)
def test_geojson_bad_input(
    tmp_path: Path, scores: dict[str, list[float]], kwargs: dict[str, object], message: str
) -> None:
    args = {"tile_size_level0": 256, **kwargs}
    with pytest.raises(ValueError, match=message):
        spatial.write_geojson(tmp_path / "a.geojson", [[0, 0], [256, 0]], scores, **args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# PNG overlay
# --------------------------------------------------------------------------------------------

DS = 32.0  # level-0 px per thumbnail px: one 256-px tile = 8 thumbnail px
GREY = 128
THUMB_HW = (115, 162)  # ceil(3700 / 32), ceil(5200 / 32)


def _rgb(cmap: str, level: float) -> np.ndarray:
    """matplotlib's own colour at ``level`` in [0, 1], 0-255 floats."""
    from matplotlib import colormaps

    return np.asarray(colormaps[cmap](level)[:3]) * 255


def _classify(rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """0 untouched grey, 1 cold (viridis(0) over grey), 2 hot (viridis(1) over grey), -1 other."""
    px = rgb.astype(float)
    grey = np.full(3, float(GREY))
    refs = [grey, *((1 - alpha) * grey + alpha * _rgb("viridis", v) for v in (0.0, 1.0))]
    dist = np.stack([np.abs(px - ref).max(axis=-1) for ref in refs])
    return np.where(dist.min(axis=0) <= 3, dist.argmin(axis=0), -1)


def _expected_classes(h: int, w: int, ds: float = DS) -> np.ndarray:
    """By hand: the centre of pixel (i, j) is level-0 ((j + .5) ds, (i + .5) ds) -> its tile."""
    out = np.zeros((h, w), int)
    for i in range(h):
        for j in range(w):
            r, c = int((i + 0.5) * ds // TILE), int((j + 0.5) * ds // TILE)
            if r < ROWS and c < COLS and (r, c) not in HOLES:
                out[i, j] = 2 if (r in HOT_ROWS and c in HOT_COLS) else 1
    return out


def _lightness(rgb01: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours in [0, 1] (the standard sRGB -> linear -> Y -> L* formulas)."""
    lin = np.where(rgb01 <= 0.04045, rgb01 / 12.92, ((rgb01 + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, y * (29 / 3) ** 3)


def _overlay_box(png: np.ndarray) -> tuple[int, int, int]:
    """(top, height, width) of the overlay: the rows whose first pixel is not white (title and
    a colour bar below keep a white margin there), and the non-white run from column 0."""
    rows = np.flatnonzero((png[:, 0] != 255).any(axis=-1))
    assert rows.size and np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)), "not one block"
    middle = png[(rows[0] + rows[-1]) // 2]
    white = np.flatnonzero((middle == 255).all(axis=-1))
    return int(rows[0]), int(rows.size), int(white[0]) if white.size else png.shape[1]


def _ink(rgb: np.ndarray) -> float:
    return float((255.0 - rgb.astype(float).mean(axis=-1)).sum())


def test_colour_maps_are_perceptually_ordered() -> None:
    """Every offered map rises in lightness from its low end to its high end (jet does not)."""
    from typing import get_args

    from matplotlib import colormaps

    names = get_args(spatial.Colormap)
    assert spatial.DEFAULT_COLORMAP in names
    for name in names:
        light = _lightness(colormaps[name](np.linspace(0, 1, 256))[:, :3])
        assert (np.diff(light) > 0).all(), name
    assert not (np.diff(_lightness(colormaps["jet"](np.linspace(0, 1, 256))[:, :3])) > 0).all()


def test_overlay_hot_pixels_fall_in_the_scaled_rectangle() -> None:
    heat = planted_heatmap()
    h, w = THUMB_HW
    thumb = np.full((h, w, 3), GREY, np.uint8)
    rgb = spatial.render_overlay(heat, thumb, DS, alpha=0.5)  # the default map: viridis
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(_classify(rgb), _expected_classes(h, w))
    # The rectangle in thumbnail pixels: x [1280, 2304) / 32 = [40, 72), y [768, 1536) -> [24, 48).
    hot = np.argwhere(_classify(rgb) == 2)
    assert hot.min(axis=0).tolist() == [24, 40] and hot.max(axis=0).tolist() == [47, 71]


@pytest.mark.parametrize("cmap", ["viridis", "cividis", "magma", "inferno"])
def test_overlay_colours_are_matplotlibs(cmap: str) -> None:
    # A ramp of 21 cells 0.00, 0.05, ..., 1.00 drawn opaque: each pixel is cmap(value).
    grid = np.linspace(0, 1, 21, dtype=np.float32)[None, :]
    heat = spatial.Heatmap(grid, (0.0, 0.0), (10.0, 10.0), (1.0, 1.0), (210, 10), (10.0, 10.0), 21)
    thumb = np.zeros((1, 21, 3), np.uint8)
    rgb = spatial.render_overlay(heat, thumb, 10.0, alpha=1.0, cmap=cmap)  # type: ignore[arg-type]
    for px, v in zip(rgb[0].astype(float), grid[0], strict=True):
        # within one step of matplotlib's 256-entry table, rounded to 8 bits
        near = [np.abs(px - _rgb(cmap, float(v) + d)).max() for d in (-1 / 256, 0, 1 / 256)]
        assert min(near) <= 0.51, (v, px, _rgb(cmap, float(v)))


def test_overlay_png_has_the_overlay_at_the_left_and_a_colour_bar(tmp_path: Path) -> None:
    from PIL import Image

    heat = planted_heatmap()
    h, w = THUMB_HW
    thumb = np.full((h, w, 3), GREY, np.uint8)
    out = spatial.write_overlay_png(heat, thumb, DS, tmp_path / "attention.png", title="slide 1")
    png = np.asarray(Image.open(out).convert("RGB"))
    # The slide is 5200 px wide at level 0, so the 162-px thumbnail is drawn 1024 px wide.
    top, oh, ow = _overlay_box(png)
    assert (ow, oh) == (1024, round(1024 * h / w))
    assert max(png.shape[:2]) >= 1024
    # Each PNG pixel shows the tile under its centre: ds = 162 * 32 / 1024 level-0 px per pixel.
    body = png[top : top + oh, :ow]
    np.testing.assert_array_equal(_classify(body), _expected_classes(oh, ow, w * DS / ow))
    assert oh * ow / (png.shape[0] * png.shape[1]) > 0.75  # the slide fills the picture
    # The colour bar (below a wide slide) spans viridis end to end and is narrower than it.
    below = png[top + oh :]
    drawn = np.flatnonzero((below != 255).any(axis=-1).any(axis=0))
    assert drawn.size and drawn[-1] - drawn[0] < ow
    assert below.shape[0] < oh / 3
    colours = below.reshape(-1, 3).astype(float)
    for end in (0.0, 1.0):
        assert np.abs(colours - _rgb("viridis", end)).max(axis=1).min() <= 6, end
    assert [p.name for p in tmp_path.iterdir()] == ["attention.png"]


def test_overlay_png_is_never_finer_than_level0(tmp_path: Path) -> None:
    from PIL import Image

    # 100 x 70 px at 4 level-0 px each: the slide spans 400 x 280 level-0 px, so the overlay is
    # 400 px wide, not 1024; an image at full resolution (downsample 1) stays 1:1.
    heat = planted_heatmap()
    for thumb_hw, ds, want_wh in (((70, 100), 4.0, (400, 280)), ((90, 60), 1.0, (60, 90))):
        thumb = np.full((*thumb_hw, 3), GREY, np.uint8)
        out = spatial.write_overlay_png(heat, thumb, ds, tmp_path / "a.png")
        _, oh, ow = _overlay_box(np.asarray(Image.open(out).convert("RGB")))
        assert (ow, oh) == want_wh


def test_overlay_png_subsamples_a_large_thumbnail(tmp_path: Path) -> None:
    from PIL import Image

    # A thumbnail at twice the resolution (16 level-0 px per pixel), capped at 162 px: every
    # other pixel is kept, which is the 32-px grid of the other tests (min_side=None: no
    # resampling up afterwards).
    thumb = np.full((230, 324, 3), GREY, np.uint8)
    out = spatial.write_overlay_png(
        planted_heatmap(), thumb, DS / 2, tmp_path / "a.png", max_side=162, min_side=None
    )
    png = np.asarray(Image.open(out).convert("RGB"))
    top, oh, ow = _overlay_box(png)
    assert (top, oh, ow) == (0, 115, 162)
    np.testing.assert_array_equal(_classify(png[:115, :162]), _expected_classes(115, 162))


@pytest.mark.parametrize("thumb_hw", [THUMB_HW, (200, 60)])
def test_a_long_title_is_wrapped_not_cut_off(tmp_path: Path, thumb_hw: tuple[int, int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    # Much wider than the PNG: 1024 px for the wide thumbnail, ~150 px for the narrow frame.
    title = "lymphocyte density, 50 µm bins, " * 8 + "end"
    thumb = np.full((*thumb_hw, 3), GREY, np.uint8)
    ds = DS if thumb_hw == THUMB_HW else 1.0
    out = spatial.write_overlay_png(planted_heatmap(), thumb, ds, tmp_path / "t.png", title=title)
    png = np.asarray(Image.open(out).convert("RGB"))
    top, _, _ = _overlay_box(png)
    band = png[:top]
    dark = np.argwhere(band.mean(axis=-1) < 200)
    assert dark.size, "no title drawn"
    # Nothing touches the band's edges, and all of the title's ink is there: the same text drawn
    # by matplotlib alone, at 12 pt on a page wide enough for one line, has as much.
    assert dark[:, 1].min() > 0 and dark[:, 1].max() < png.shape[1] - 1 and dark[:, 0].min() > 0
    fig = Figure(figsize=(60, 1), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, title, ha="center", va="center", fontsize=12)
    canvas.draw()
    reference = _ink(np.asarray(canvas.buffer_rgba())[..., :3])
    assert _ink(band) == pytest.approx(reference, rel=0.05)


def test_overlay_rejects_bad_thumbnail() -> None:
    heat = planted_heatmap()
    with pytest.raises(ValueError, match=r"\(h, w, 3\) uint8"):
        spatial.render_overlay(heat, np.zeros((10, 10), np.uint8), DS)
    with pytest.raises(ValueError, match="thumbnail_downsample must be positive"):
        spatial.render_overlay(heat, np.zeros((10, 10, 3), np.uint8), 0)
