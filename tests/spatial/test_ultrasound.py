"""Ultrasound frames and heatmaps mapped onto them.

Reading: the three real DICOM files of ``../shared/data/ultrasound`` (MANIFEST.md) and generated
PNG / garbage files. Mapping: heatmaps with planted signals (a Gaussian peak, a linear ramp,
immune-cell clusters) at known slide positions, through known affine registrations; every
expected ultrasound position is computed here from the known transform, not by the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import ArrayLike, NDArray
from oncotrace.spatial import (
    Affine,
    Heatmap,
    Registration,
    Ultrasound,
    UltrasoundError,
    fit_landmarks,
    landmarks_from_arrays,
    landmarks_overlay_png,
    read_heatmap,
    read_ultrasound,
    sample_heatmap,
    to_ultrasound,
    write_ome_zarr,
)
from PIL import Image

CINE = "ultrasound/cardiac-cine-calibrated.dcm"
NODE = "ultrasound/lymph-node-power-doppler.dcm"
TWO_REGIONS = "ultrasound/obstetric-two-regions.dcm"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_calibrated_cine_gives_051_mm_per_px_and_the_chosen_frame(shared_data: Path) -> None:
    path = shared_data / CINE
    # The file's region bounds (84..595 x 31..414) exceed its 320 x 240 frames: it was resized.
    with pytest.warns(UserWarning, match="extends past"):
        us = read_ultrasound(path, frame=7)
    # PhysicalDeltaX/Y = 0.0510497 cm (MANIFEST.md) -> 0.510497 mm.
    assert us.spacing_mm == pytest.approx((0.510497, 0.510497), abs=1e-6)
    assert round(us.spacing_mm[0], 2) == round(us.spacing_mm[1], 2) == 0.51
    assert us.spacing_source == "dicom-region"
    assert us.region is not None and us.region["index"] == 0
    assert (us.region["x0"], us.region["y0"], us.region["x1"], us.region["y1"]) == (
        84,
        31,
        595,
        414,
    )
    assert us.region["within_image"] is False
    assert (us.frame, us.n_frames, us.size_px) == (7, 30, (320, 240))
    assert us.image.dtype == np.uint8 and us.image.shape == (240, 320, 3)
    frames = pydicom.dcmread(path).pixel_array  # (30, 240, 320, 3) RGB
    assert np.array_equal(us.image, frames[7])
    assert not np.array_equal(frames[7], frames[20])
    with pytest.warns(UserWarning):
        assert np.array_equal(read_ultrasound(path, frame=20).image, frames[20])


@pytest.mark.parametrize("frame", [None, 30, -1])
def test_cine_without_a_valid_frame_is_refused(shared_data: Path, frame: int | None) -> None:
    with pytest.raises(UltrasoundError, match=r"frame.*0 <= N <= 29") as err:
        read_ultrasound(shared_data / CINE, frame=frame)
    assert CINE.split("/")[1] in str(err.value)


def test_uncalibrated_lymph_node_needs_spacing(shared_data: Path) -> None:
    path = shared_data / NODE
    with pytest.raises(UltrasoundError, match="spacing_mm=") as err:
        read_ultrasound(path)
    assert str(path) in str(err.value)
    us = read_ultrasound(path, spacing_mm=(0.08, 0.09))
    assert us.spacing_mm == (0.08, 0.09) and us.spacing_source == "override"
    assert us.region is None and (us.frame, us.n_frames) == (0, 1)
    assert np.array_equal(us.image, pydicom.dcmread(path).pixel_array)
    assert read_ultrasound(path, spacing_mm=0.1).spacing_mm == (0.1, 0.1)


def test_pixel_spacing_is_read_row_then_column(shared_data: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared_data / NODE)
    ds.PixelSpacing = [0.2, 0.1]  # DICOM order: between rows (y), between columns (x)
    path = tmp_path / "spaced.dcm"
    ds.save_as(path)
    us = read_ultrasound(path)
    assert us.spacing_mm == (0.1, 0.2) and us.spacing_source == "dicom-pixel-spacing"
    assert read_ultrasound(path, spacing_mm=0.3).spacing_source == "override"


@pytest.mark.parametrize("bad", [50.0, 0.001, (0.1, 0.0), float("nan")])
def test_implausible_spacing_is_refused(shared_data: Path, bad: Any) -> None:
    with pytest.raises(UltrasoundError, match="mm/px"):
        read_ultrasound(shared_data / NODE, spacing_mm=bad)


def test_two_regions_must_be_chosen(shared_data: Path) -> None:
    path = shared_data / TWO_REGIONS
    with pytest.raises(UltrasoundError, match="region=") as err:
        read_ultrasound(path)
    message = str(err.value)
    assert "2 ultrasound regions" in message
    assert "region 0: 2D, x 120-800, y 60-518 px, 0.2623 x 0.2623 mm/px" in message
    assert "region 1" in message and "no spatial calibration" in message
    with pytest.warns(UserWarning, match="extends past"):
        us = read_ultrasound(path, region=0)
    assert us.spacing_mm == pytest.approx((0.2622879, 0.2622879), abs=1e-6)
    assert us.spacing_source == "dicom-region" and us.region is not None
    assert us.region["index"] == 0 and us.region["spatial_format"] == "2D"
    # Palette colour -> RGB: the Philips header band (top rows) is dark blue in the image.
    assert us.image.shape == (350, 800, 3)
    band = us.image[5:25, 200:300].reshape(-1, 3).mean(axis=0)
    assert band[2] > band[0] + 30
    # The waveform strip has time units: it cannot give a spacing, but an override can.
    with pytest.raises(UltrasoundError, match="region 1 has no spatial calibration"):
        read_ultrasound(path, region=1)
    with pytest.raises(UltrasoundError, match="out of range"):
        read_ultrasound(path, region=2)
    assert read_ultrasound(path, region=1, spacing_mm=0.3).spacing_source == "override"


def test_png_needs_spacing(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(UltrasoundError, match="spacing_mm="):
        read_ultrasound(path)
    us = read_ultrasound(path, spacing_mm=(0.2, 0.25))
    assert us.size_px == (90, 60) and np.array_equal(us.image, rgb)
    assert us.spacing_mm == (0.2, 0.25) and us.spacing_source == "override"
    grey = tmp_path / "grey.png"
    Image.fromarray(rgb[..., 0]).save(grey)
    us = read_ultrasound(grey, spacing_mm=0.2)
    assert np.array_equal(us.image, np.repeat(rgb[..., :1], 3, axis=2))
    # Pixel centre convention: pixel (0, 0)'s centre is 0 mm.
    assert np.allclose(us.px_to_mm([[0, 0], [10, 4]]), np.array([[0, 0], [2.0, 0.8]]))
    assert np.allclose(us.mm_to_px(us.px_to_mm([[3.5, 7.25]])), [[3.5, 7.25]])


def test_garbage_and_truncated_files_are_one_clear_error(tmp_path: Path, shared_data: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UltrasoundError, match="neither a DICOM file nor an image") as err:
        read_ultrasound(junk, spacing_mm=0.1)
    assert str(junk) in str(err.value)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((shared_data / CINE).read_bytes()[:3000])
    with pytest.raises(UltrasoundError, match=r"cut\.dcm"):
        read_ultrasound(cut, frame=0)
    with pytest.raises(FileNotFoundError, match=r"missing\.dcm"):
        read_ultrasound(tmp_path / "missing.dcm")


# --------------------------------------------------------------------------------------------
# Mapping: a known affine registration
# --------------------------------------------------------------------------------------------


class StandInRegistration:
    """What ``spatial._landmarks.fit_landmarks`` returns, reduced to what the mapping uses."""

    # A known transform with a chosen TRE; fit_landmarks is used in the planted-cluster test.
    def __init__(self, transform: Affine, tre_mm: float = 0.0) -> None:
        self.transform, self.model = transform, "affine"
        self.report = {"holdout_tre_mm": {"mean": tre_mm}}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "transform": self.transform.to_dict(), "report": self.report}


def similarity(scale: float, angle_deg: float, offset_mm: tuple[float, float]) -> NDArray[Any]:
    """slide_um -> us_mm: rotate, scale (mm per µm), shift."""
    a = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = rot, offset_mm
    return m


# 0.5 µm/px slide, 256-px cells (128 µm bins), 60 x 80 cells = 7.68 x 10.24 mm.
MPP, CELL, GRID_HW = 0.5, 256.0, (60, 80)
BIN_UM = CELL * MPP
# Ultrasound 0.1 mm/px, 240 x 320 px = 24 x 32 mm; the slide lands rotated 25° inside it.
US_SPACING, US_HW = 0.1, (240, 320)
TRUE = similarity(1e-3 * 1.05, 25.0, (9.0, 3.0))  # 5 % tissue shrinkage in the slide


def centres_um(shape: tuple[int, int] = GRID_HW) -> tuple[NDArray[Any], NDArray[Any]]:
    """(x, y) µm of every cell centre, each (H, W)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return (cols + 0.5) * CELL * MPP, (rows + 0.5) * CELL * MPP


def make_heatmap(grid: NDArray[Any]) -> Heatmap:
    h, w = grid.shape
    return Heatmap(
        grid=grid.astype(np.float32),
        origin_level0=(0.0, 0.0),
        cell_size_level0=(CELL, CELL),
        mpp=(MPP, MPP),
        level0_size=(int(w * CELL), int(h * CELL)),
        tile_size_level0=(CELL, CELL),
        n_tiles=int(np.isfinite(grid).sum()),
    )


def grey_frame(hw: tuple[int, int] = US_HW, level: int = 40) -> Ultrasound:
    return Ultrasound(
        image=np.full((*hw, 3), level, np.uint8),
        spacing_mm=(US_SPACING, US_SPACING),
        spacing_source="override",
        region=None,
        frame=0,
        n_frames=1,
        source="<generated>",
    )


def us_px_of(slide_um: ArrayLike, matrix: NDArray[Any] = TRUE) -> NDArray[np.float64]:
    p = np.asarray(slide_um, np.float64)
    return (p @ matrix[:2, :2].T + matrix[:2, 2]) / US_SPACING


def slide_um_of_every_us_pixel(matrix: NDArray[Any] = TRUE) -> tuple[NDArray[Any], NDArray[Any]]:
    rows, cols = np.mgrid[0 : US_HW[0], 0 : US_HW[1]].astype(np.float64)
    mm = np.stack([cols.ravel(), rows.ravel()], axis=1) * US_SPACING
    um = np.linalg.solve(matrix[:2, :2], (mm - matrix[:2, 2]).T).T
    return um[:, 0].reshape(US_HW), um[:, 1].reshape(US_HW)


def registration(matrix: NDArray[Any] = TRUE, tre_mm: float = 0.0) -> StandInRegistration:
    return StandInRegistration(Affine(matrix, "slide_um", "us_mm"), tre_mm)


PEAK_CELL = (23, 51)  # (row, col)
PEAK_UM = ((PEAK_CELL[1] + 0.5) * BIN_UM, (PEAK_CELL[0] + 0.5) * BIN_UM)


def peak_heatmap() -> Heatmap:
    x, y = centres_um()
    d2 = (x - PEAK_UM[0]) ** 2 + (y - PEAK_UM[1]) ** 2
    grid = np.exp(-d2 / (2 * 600.0**2))
    grid[5:12, 5:20] = np.nan  # a tissue hole
    return make_heatmap(grid)


def test_planted_peak_lands_on_the_predicted_ultrasound_pixel(tmp_path: Path) -> None:
    mapped = to_ultrasound(peak_heatmap(), registration(), grey_frame(), name="attention")
    assert mapped.grid.shape == US_HW and mapped.grid.dtype == np.float32
    truth = us_px_of(PEAK_UM)
    got = np.array(mapped.peak_px(), np.float64)
    # Bilinear peaks sit on a pixel centre: at most half a pixel off on each axis.
    assert np.hypot(*(got - truth)) <= math.sqrt(0.5) + 1e-9
    assert mapped.bin_um == (BIN_UM, BIN_UM)
    assert mapped.value_range[1] == pytest.approx(1.0)


def test_nan_outside_the_heatmap_and_in_its_holes() -> None:
    heat = peak_heatmap()
    mapped = to_ultrasound(heat, registration(), grey_frame())
    x, y = slide_um_of_every_us_pixel()
    h_um, w_um = GRID_HW[0] * BIN_UM, GRID_HW[1] * BIN_UM
    margin = 2.0  # µm, away from the exact edge where rounding decides
    outside = (x < -margin) | (y < -margin) | (x > w_um + margin) | (y > h_um + margin)
    inside = (x > margin) & (y > margin) & (x < w_um - margin) & (y < h_um - margin)
    hole = (x > 5 * BIN_UM + margin) & (x < 20 * BIN_UM - margin)
    hole &= (y > 5 * BIN_UM + margin) & (y < 12 * BIN_UM - margin)
    assert outside.sum() > 50_000 and hole.sum() > 150
    assert np.isnan(mapped.grid[outside]).all()
    assert np.isnan(mapped.grid[hole]).all()
    assert np.isfinite(mapped.grid[inside & ~hole & ~_near_hole(x, y)]).all()


def _near_hole(x: NDArray[Any], y: NDArray[Any]) -> NDArray[np.bool_]:
    m = 3.0
    return (
        (x > 5 * BIN_UM - m) & (x < 20 * BIN_UM + m) & (y > 5 * BIN_UM - m) & (y < 12 * BIN_UM + m)
    )


@pytest.mark.parametrize("order", [0, 1])
def test_linear_ramp_is_reproduced_at_every_pixel(order: int) -> None:
    """A linear heatmap (value = a x + b y at cell centres) is recovered exactly by bilinear
    interpolation between cell centres, so any half-cell or axis slip shows up at once."""
    a, b = 1e-3, -2e-3  # per µm
    x, y = centres_um()
    heat = make_heatmap(a * x + b * y + 20.0)
    mapped = to_ultrasound(heat, registration(), grey_frame(), order=order)  # type: ignore[arg-type]
    ux, uy = slide_um_of_every_us_pixel()
    w_um, h_um = GRID_HW[1] * BIN_UM, GRID_HW[0] * BIN_UM
    if order == 1:  # interior: between the outermost cell centres
        lo, hi = BIN_UM / 2 + 1, np.array([w_um, h_um]) - BIN_UM / 2 - 1
        sel = (ux > lo) & (uy > lo) & (ux < hi[0]) & (uy < hi[1])
        expected = a * ux + b * uy + 20.0
        assert np.abs(mapped.grid[sel] - expected[sel]).max() < 2e-5 * 20
    else:  # the value of the cell holding the point
        sel = (ux > 1) & (uy > 1) & (ux < w_um - 1) & (uy < h_um - 1)
        col = np.floor(ux / BIN_UM)
        row = np.floor(uy / BIN_UM)
        expected = a * (col + 0.5) * BIN_UM + b * (row + 0.5) * BIN_UM + 20.0
        assert np.abs(mapped.grid[sel] - expected[sel]).max() < 2e-5 * 20
    assert sel.sum() > 8000  # of ~8,700 pixels the slide covers


def test_sample_heatmap_agrees_with_value_at_for_nearest() -> None:
    heat = peak_heatmap()
    pts = np.random.default_rng(3).uniform(-500, 11_000, (5000, 2))
    got = sample_heatmap(heat, pts, order=0)
    want = heat.value_at(pts[:, 0] / MPP, pts[:, 1] / MPP)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])


def test_outputs_read_back_at_the_right_physical_place(tmp_path: Path) -> None:
    import warnings

    from matplotlib import colormaps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

    us = grey_frame()
    reg = registration(tre_mm=0.12)
    mapped = to_ultrasound(peak_heatmap(), reg, us, tmp_path, name="attention", alpha=0.5)
    assert set(mapped.paths) == {"ome_zarr", "png", "registration_json"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    # OME-Zarr through ome-zarr-py: millimetre axes, scale = spacing, NGFF pixel centres.
    nodes = list(Reader(parse_url(str(tmp_path / "attention.ome.zarr")))())
    meta = nodes[0].metadata
    assert [ax["unit"] for ax in meta["axes"]] == ["millimeter", "millimeter"]
    s0, s1 = meta["coordinateTransformations"][:2]
    scale0 = next(t["scale"] for t in s0 if t["type"] == "scale")
    trans0 = next(t["translation"] for t in s0 if t["type"] == "translation")
    assert scale0 == pytest.approx([US_SPACING, US_SPACING]) and trans0 == pytest.approx([0, 0])
    # Level 1 pixel (0, 0) averages full-resolution pixels 0 and 1: centre at spacing / 2.
    assert next(t["translation"] for t in s1 if t["type"] == "translation") == pytest.approx(
        [US_SPACING / 2, US_SPACING / 2]
    )
    data = np.asarray(nodes[0].data[0])
    assert data.shape == US_HW
    assert np.array_equal(np.isnan(data), np.isnan(mapped.grid))
    row, col = np.unravel_index(int(np.nanargmax(data)), data.shape)
    physical_yx = np.array([row, col]) * scale0 + trans0
    truth_xy_mm = us_px_of(PEAK_UM) * US_SPACING
    assert np.hypot(*(physical_yx[::-1] - truth_xy_mm)) <= US_SPACING * math.sqrt(0.5) + 1e-9
    import zarr

    attrs: Any = zarr.open_group(tmp_path / "attention.ome.zarr", mode="r").attrs["oncotrace"]
    assert attrs["spacing_mm_xy"] == [US_SPACING, US_SPACING]
    assert attrs["bin_um_xy"] == [BIN_UM, BIN_UM]

    # PNG: the frame 1:1 (never resampled: it is the full resolution) below the title, the
    # colour bar below the (wide) frame, no wider than it.
    png = np.asarray(Image.open(tmp_path / "attention_us.png").convert("RGB"))
    frame_rows = np.flatnonzero((png[:, 0] == 40).all(axis=-1))  # column 0 is off the slide
    top = int(frame_rows[0])
    assert np.array_equal(frame_rows, np.arange(top, top + US_HW[0]))
    assert png.shape[1] == US_HW[1] and top > 0 and png.shape[0] > top + US_HW[0]
    # The peak pixel is viridis at its value's place in the source range, half over grey 40.
    lo, hi = mapped.value_range
    level = (mapped.grid[row, col] - lo) / (hi - lo)
    want = 0.5 * 40 + 0.5 * np.asarray(colormaps["viridis"](level)[:3]) * 255
    assert np.abs(png[top + row, col] - want).max() <= 3
    assert level > 0.9  # so this is the map's bright, yellow end
    nan_rc = np.argwhere(np.isnan(mapped.grid))[0]
    assert (png[top + nan_rc[0], nan_rc[1]] == 40).all()  # NaN leaves the frame unchanged

    # registration.json: the registration, the frame and the mapping, per heatmap.
    to_ultrasound(make_heatmap(np.ones(GRID_HW)), reg, us, tmp_path, name="density")
    doc = json.loads((tmp_path / "registration.json").read_text())
    assert np.allclose(doc["transform"]["matrix"], TRUE)
    assert doc["report"]["holdout_tre_mm"]["mean"] == 0.12
    assert doc["ultrasound"]["spacing_mm_xy"] == [US_SPACING, US_SPACING]
    assert set(doc["heatmaps"]) == {"attention", "density"}
    assert doc["heatmaps"]["attention"]["bin_um_xy"] == [BIN_UM, BIN_UM]


def test_a_scored_attention_store_maps_the_same_way(tmp_path: Path) -> None:
    """``oncotrace score`` writes attention.ome.zarr; read back, it maps like the grid itself."""
    heat = peak_heatmap()
    store = write_ome_zarr(heat, tmp_path / "attention.ome.zarr", name="attention")
    direct = to_ultrasound(heat, registration(), grey_frame())
    loaded = to_ultrasound(read_heatmap(store), registration(), grey_frame(), unit="rank")
    assert np.array_equal(direct.grid, loaded.grid, equal_nan=True)
    assert loaded.unit == "rank" and loaded.bin_um == (BIN_UM, BIN_UM)


def test_the_heatmap_unit_travels_into_every_mapped_output(tmp_path: Path) -> None:
    """A heatmap's unit, recorded in its store, labels the mapped store, JSON and colour bar."""
    import dataclasses

    import zarr
    from oncotrace.spatial import ATTENTION_RANK_UNIT

    heat = dataclasses.replace(peak_heatmap(), value_unit=ATTENTION_RANK_UNIT)
    store = write_ome_zarr(heat, tmp_path / "attention.ome.zarr", name="attention")
    loaded = read_heatmap(store)
    assert loaded.value_unit == "rank within the slide, (0, 1]"
    mapped = to_ultrasound(loaded, registration(), grey_frame(), tmp_path / "us", name="att")
    assert mapped.unit == ATTENTION_RANK_UNIT
    attrs = zarr.open_group(mapped.paths["ome_zarr"], mode="r").attrs["oncotrace"]
    assert attrs["value_unit"] == ATTENTION_RANK_UNIT
    doc = json.loads(mapped.paths["registration_json"].read_text())
    assert doc["heatmaps"]["att"]["value_unit"] == ATTENTION_RANK_UNIT
    # an explicit unit still wins; a store without one stays without (never guessed)
    assert to_ultrasound(loaded, registration(), grey_frame(), unit="x").unit == "x"
    bare = write_ome_zarr(peak_heatmap(), tmp_path / "bare.ome.zarr", name="bare")
    assert to_ultrasound(read_heatmap(bare), registration(), grey_frame()).unit is None


def test_mapping_refuses_a_registration_between_the_wrong_systems() -> None:
    reg = StandInRegistration(Affine(TRUE, "slide_px", "us_px"))
    with pytest.raises(ValueError, match="'slide_um' -> 'us_mm'"):
        to_ultrasound(peak_heatmap(), reg, grey_frame())


def test_landmarks_overlay_marks_the_points(tmp_path: Path) -> None:
    us = grey_frame((60, 80), level=0)
    path = landmarks_overlay_png(us, [[10, 20], [70, 50]], tmp_path / "lm.png", labels=["a", "b"])
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (60, 80, 3)
    assert tuple(img[20, 10]) == (255, 255, 0) and tuple(img[50, 70]) == (255, 255, 0)
    assert tuple(img[5, 40]) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Planted immune clusters through a noisy-landmark registration
# --------------------------------------------------------------------------------------------


def test_planted_immune_clusters_peak_within_bin_or_two_tre(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    # Three immune clusters (µm on the slide), the first the densest; 50-µm bins over 10 x 7.5 mm
    # give a 100k-cell-scale density map (200 x 150 = 30k cells here, to stay fast).
    centres = np.array([[2500.0, 2000.0], [7500.0, 2500.0], [5000.0, 5800.0]])
    counts, sigma_um, bin_um = (4000, 2500, 2500), 250.0, 50.0
    cells = np.vstack(
        [rng.normal(c, sigma_um, (n, 2)) for c, n in zip(centres, counts, strict=True)]
        + [rng.uniform((0, 0), (10_000, 7500), (3000, 2))]  # scattered background lymphocytes
    )
    shape = (150, 200)
    hist, _, _ = np.histogram2d(
        cells[:, 1], cells[:, 0], bins=shape, range=((0, 7500), (0, 10_000))
    )
    from scipy.ndimage import gaussian_filter

    density = gaussian_filter(hist, 2.0) / (bin_um * 1e-3) ** 2  # cells / mm²
    heat = Heatmap(
        grid=density.astype(np.float32),
        origin_level0=(0.0, 0.0),
        cell_size_level0=(bin_um / MPP, bin_um / MPP),
        mpp=(MPP, MPP),
        level0_size=(20_000, 15_000),
        tile_size_level0=(bin_um / MPP, bin_um / MPP),
        n_tiles=30_000,
    )
    # Landmarks: 8 fit + 6 holdout, ultrasound positions with 0.15 mm noise per axis.
    truth = similarity(1e-3 * 0.95, -35.0, (6.0, 14.0))
    lm_um = rng.uniform((500, 500), (9500, 7000), (14, 2))
    lm_mm = us_px_of(lm_um, truth) * US_SPACING + rng.normal(0, 0.15, (14, 2))
    landmarks = landmarks_from_arrays(
        pathology_um=lm_um, ultrasound_mm=lm_mm, roles=["fit"] * 8 + ["holdout"] * 6
    )
    reg = fit_landmarks(landmarks, bin_um=bin_um)  # affine or spline, by leave-one-out TRE
    tre_mm = reg.report["holdout_tre_mm"]["mean"]
    assert 0.02 < tre_mm < 0.6  # held-out points carry the 0.15 mm noise themselves

    mapped = to_ultrasound(heat, reg, grey_frame(), tmp_path, name="immune")
    tol_mm = max(bin_um * 1e-3, 2 * tre_mm)
    truth_mm = us_px_of(centres, truth) * US_SPACING
    got_mm = np.array(mapped.peak_px(), np.float64) * US_SPACING
    assert np.hypot(*(got_mm - truth_mm[0])) <= tol_mm
    # Every cluster: the local maximum within 2 mm of its predicted place.
    rows, cols = np.mgrid[0 : US_HW[0], 0 : US_HW[1]] * US_SPACING
    for c_mm in truth_mm:
        near = np.hypot(cols - c_mm[0], rows - c_mm[1]) < 2.0
        local = np.where(near, np.nan_to_num(mapped.grid, nan=-1.0), -1.0)
        r, c = np.unravel_index(int(np.argmax(local)), local.shape)
        assert np.hypot(c * US_SPACING - c_mm[0], r * US_SPACING - c_mm[1]) <= tol_mm
    # registration.json stays readable by Registration.read_json beside the mapping metadata.
    again = Registration.read_json(tmp_path / "registration.json")
    probe = np.array([[1000.0, 2000.0], [8000.0, 6000.0]])
    assert np.allclose(again.transform(probe), reg.transform(probe))
