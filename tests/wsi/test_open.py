"""``wsi.open_slide`` on the real shared data, on a generated bad-input corpus, across backends."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from oncotrace import wsi
from oncotrace.wsi import inspect_file
from oncotrace.wsi._backends import cucim_available  # private: open_slide's own cuCIM probe
from PIL import Image

from tests.wsi import badinput

needs_cucim = pytest.mark.skipif(not cucim_available(), reason="cuCIM is not installed")
#: Readers of TIFF-based slides; cuCIM is an optional extra.
TIFF_BACKENDS = (pytest.param("cucim", marks=needs_cucim), "openslide", "tifffile")

CMU1 = "slides/cmu-1-small-region.svs"
BRACS = "slides/bracs-1640-n-3-cropped.tiff"
TCGA = "slides/tcga-cr-7395-01a-01-ts1.svs"
BOXES = "slides/openslide-boxes.tiff"
CAMELYON = "dicom-wsi/camelyon-lymph-node/multiframe_camelyon_challenge_image.dcm"
BONE_MARROW = "dicom-wsi/bone-marrow/bone-marrow-jpeg.dcm"


def assert_names_file_and_fix(exc: BaseException, path: Path) -> None:
    message = str(exc)
    assert str(path) in message, f"message does not name {path}: {message}"
    assert "Fix:" in message, f"message says nothing to do: {message}"


# -- real files: expected geometry and resolution ------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What one real file must do. Numbers from MANIFEST.md, checked with tifffile/pydicom."""

    rel: str
    size: tuple[int, int] | None  # level-0 (w, h) once opened (with an mpp override if needed)
    levels: int | None
    mpp: tuple[float, float] | None = None  # (x, y) µm/px read from the file
    error: type[wsi.SlideError] | None = None  # raised when opened without an override
    match: str = ""


EXPECTED = (
    # Label (387×463), macro (1280×431) and the 574×768 thumbnail are not pyramid levels.
    Expected(CMU1, (2220, 2967), 1, mpp=(0.499, 0.499)),
    Expected("slides/openslide-small.svs", (16, 16), 1, mpp=(0.499, 0.499)),
    Expected(TCGA, (4443, 3567), 2, error=wsi.MppError, match="no physical pixel size"),
    # XResolution 10 px/cm → 1000 µm/px.
    Expected(BRACS, (650, 743), 3, error=wsi.MppError, match="1000"),
    # XResolution 14861707/524288 px/cm = 72 dpi → 352.78 µm/px.
    Expected(BOXES, (300, 250), 4, error=wsi.MppError, match="352.7"),
    # DICOM PixelSpacing is (row, column) in mm: (0.028968, 0.028969) → x 28.969, y 28.968.
    Expected("dicom-wsi/camelyon-lymph-node", (1152, 700), 1, mpp=(28.969, 28.968)),
    Expected(CAMELYON, (1152, 700), 1, mpp=(28.969, 28.968)),
    Expected("dicom-wsi/bone-marrow", (957, 715), 1, mpp=(16.783, 16.783)),
    Expected(BONE_MARROW, (957, 715), 1, mpp=(16.783, 16.783)),
    Expected(
        "bad-input/malformed-sm-column-major.dcm",
        None,
        None,
        error=wsi.CorruptSlideError,
        match="DICOM",
    ),
)


def test_every_shared_slide_has_an_expectation(shared_data: Path) -> None:
    on_disk = {
        p.relative_to(shared_data).as_posix()
        for pattern in ("slides/*", "dicom-wsi/*", "dicom-wsi/*/*", "bad-input/*")
        for p in shared_data.glob(pattern)
    }
    assert on_disk == {e.rel for e in EXPECTED}


@pytest.mark.parametrize("case", EXPECTED, ids=lambda e: e.rel)
def test_real_file_opens_or_refuses_with_a_fix(case: Expected, shared_data: Path) -> None:
    path = shared_data / case.rel
    if case.error is not None:
        with pytest.raises(wsi.SlideError) as info:
            wsi.open_slide(path)
        assert type(info.value) is case.error, info.value
        assert case.match in str(info.value)
        assert_names_file_and_fix(info.value, path)
        if case.size is None:
            return
        with wsi.open_slide(path, mpp=0.25) as slide:
            assert (slide.mpp.x, slide.mpp.y, slide.mpp.source) == (0.25, 0.25, "override")
            assert slide.dimensions == case.size
            assert slide.level_count == case.levels
        return
    assert case.mpp is not None
    with wsi.open_slide(path) as slide:
        assert slide.dimensions == case.size
        assert slide.level_dimensions[0] == case.size
        assert slide.level_count == case.levels == len(slide.level_downsamples)
        assert slide.level_downsamples[0] == pytest.approx(1.0)
        assert slide.mpp is not None
        assert slide.mpp.source == "file"
        assert (slide.mpp.x, slide.mpp.y) == pytest.approx(case.mpp, abs=5e-4)


@pytest.mark.parametrize("rel", [CAMELYON, BONE_MARROW])
def test_dicom_geometry_matches_pydicom(rel: str, shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / rel, stop_before_pixels=True)
    row_mm, col_mm = (
        float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    )
    with wsi.open_slide(shared_data / rel) as slide:
        assert slide.dimensions == (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
        assert slide.mpp.x == pytest.approx(col_mm * 1000, abs=1e-6)
        assert slide.mpp.y == pytest.approx(row_mm * 1000, abs=1e-6)


def test_require_mpp_false_opens_without_a_resolution(shared_data: Path) -> None:
    with wsi.open_slide(shared_data / TCGA, require_mpp=False) as slide:
        assert slide.mpp is None
        props = slide.exported_properties()
        assert props["mpp_x"] is props["mpp_y"] is props["mpp_source"] is None
        with pytest.raises(wsi.MppError):
            _ = slide.mpp_xy
    with wsi.open_slide(shared_data / BRACS, require_mpp=False) as slide:
        assert slide.mpp is None  # 1000 µm/px is dropped, never passed on


@pytest.mark.parametrize("bad", [0.0, -0.5, 1000.0, float("nan"), float("inf")])
def test_implausible_mpp_override_is_refused(bad: float, shared_data: Path) -> None:
    path = shared_data / CMU1
    with pytest.raises(wsi.MppError) as info:
        wsi.open_slide(path, mpp=bad)
    assert_names_file_and_fix(info.value, path)


def test_mpp_override_may_differ_per_axis(shared_data: Path) -> None:
    with wsi.open_slide(shared_data / TCGA, mpp=(0.25, 0.26)) as slide:
        assert (slide.mpp.x, slide.mpp.y, slide.mpp.source) == (0.25, 0.26, "override")


def test_missing_path_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.svs"
    with pytest.raises(wsi.UnsupportedSlideError) as info:
        wsi.open_slide(path)
    assert "does not exist" in str(info.value)
    assert_names_file_and_fix(info.value, path)


# -- one file, several readers: the same pixels ---------------------------------------------------


@pytest.fixture(scope="module")
def cmu1_by_backend(shared_data: Path) -> Iterator[dict[str, wsi.Slide]]:
    names = ["openslide", "tifffile"] + (["cucim"] if cucim_available() else [])
    slides = {name: wsi.open_slide(shared_data / CMU1, backend=name) for name in names}
    yield slides
    for slide in slides.values():
        slide.close()


def test_cmu1_has_at_least_two_readers(cmu1_by_backend: dict[str, wsi.Slide]) -> None:
    for name, slide in cmu1_by_backend.items():
        assert slide.backend == name
        assert slide.dimensions == (2220, 2967)
        assert slide.vendor == "aperio"
        assert slide.objective_power == 20.0


@pytest.mark.parametrize(
    ("location", "size"),
    [((1000, 1200), (512, 384)), ((0, 0), (300, 200)), ((1500, 2600), (320, 267))],
)
def test_cmu1_level0_pixels_identical_across_backends(
    cmu1_by_backend: dict[str, wsi.Slide], location: tuple[int, int], size: tuple[int, int]
) -> None:
    reads = {name: s.read_region(location, 0, size) for name, s in cmu1_by_backend.items()}
    ref = reads.pop("openslide")
    assert ref.shape == (size[1], size[0], 3)
    assert ref.dtype == np.uint8
    assert ref.std() > 5  # tissue, not a blank frame that would match anything
    for name, arr in reads.items():
        np.testing.assert_array_equal(arr, ref, err_msg=f"{name} differs from openslide")


@pytest.mark.parametrize(
    ("location", "level", "size"),
    [((2000, 2800), 0, (400, 300)), ((-100, -50), 0, (300, 200)), ((1000, 2900), 0, (200, 150))],
)
def test_cmu1_past_the_edge_is_white_in_every_backend(
    cmu1_by_backend: dict[str, wsi.Slide],
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
) -> None:
    reads = {n: s.read_region(location, level, size) for n, s in cmu1_by_backend.items()}
    slide = cmu1_by_backend["openslide"]
    w_l, h_l = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    x, y = int(location[0] // ds), int(location[1] // ds)
    inside = np.zeros((size[1], size[0]), bool)
    inside[max(0, -y) : max(0, h_l - y), max(0, -x) : max(0, w_l - x)] = True
    assert inside.any() and not inside.all()  # the region straddles the edge
    for name, arr in reads.items():
        assert (arr[~inside] == 255).all(), f"{name}: not white past the slide's edge"
        # the slide's own pixels (tissue or 243-grey glass) are kept, not whitened
        assert (arr[inside] < 250).mean() > 0.9, f"{name}: lost the slide's pixels"
    ref = reads.pop("openslide")
    for name, arr in reads.items():
        np.testing.assert_array_equal(arr, ref, err_msg=f"{name} differs from openslide")


@pytest.mark.parametrize("level", [0, 1, 2])
def test_generic_tiff_past_the_edge_is_white_in_every_backend(tmp_path: Path, level: int) -> None:
    # cuCIM fills past the edge of a generic tiled TIFF with black (Aperio SVS: white)
    from oncotrace.wsi.synthetic import write_pyramid_tiff

    img = np.full((1000, 1300, 3), 128, np.uint8)
    path = write_pyramid_tiff(tmp_path / "grey.tif", img, mpp=0.5, levels=3, compression="jpeg")
    slides = _open_each(path, ("openslide", "tifffile", "cucim"))
    try:
        for name, slide in slides.items():
            ds = slide.level_downsamples[level]
            w_l, h_l = slide.level_dimensions[level]
            arr = slide.read_region((1100, 800), level, (300, 300))
            x, y = int(1100 // ds), int(800 // ds)
            inside = arr[: h_l - y - 1, : w_l - x - 1].astype(int)  # last row: pyramid blend
            assert np.abs(inside - 128).max() <= 4, name  # JPEG
            assert (arr[h_l - y :] == 255).all() and (arr[:, w_l - x :] == 255).all(), name
    finally:
        for slide in slides.values():
            slide.close()


def test_cmu1_thumbnails_identical_across_backends(cmu1_by_backend: dict[str, wsi.Slide]) -> None:
    thumbs = {name: s.thumbnail(256) for name, s in cmu1_by_backend.items()}
    ref = thumbs.pop("openslide")
    # 2220×2967 with the long side at 256: round(2220 · 256 / 2967) = 192.
    assert ref.shape == (256, 192, 3)
    for name, arr in thumbs.items():
        np.testing.assert_array_equal(arr, ref, err_msg=f"{name} thumbnail differs")


def _open_each(path: Path, names: tuple[str, ...], **kw: object) -> dict[str, wsi.Slide]:
    """Open with each reader that accepts the file (cuCIM is kept off Deflate TIFF: it crashes)."""
    cucim_ok = cucim_available() and inspect_file(path).cucim_safe
    names = tuple(n for n in names if n != "cucim" or cucim_ok)
    return {n: wsi.open_slide(path, backend=n, **kw) for n in names}  # type: ignore[arg-type]


def test_bracs_every_level_identical_across_backends(shared_data: Path) -> None:
    slides = _open_each(shared_data / BRACS, ("openslide", "cucim", "tifffile"), mpp=0.25)
    try:
        ref = slides["openslide"]
        assert ref.level_dimensions == ((650, 743), (325, 371), (162, 185))
        for level, dims in enumerate(ref.level_dimensions):
            want = ref.read_region((0, 0), level, dims)
            for name, slide in slides.items():
                assert slide.level_dimensions[level] == dims, name
                got = slide.read_region((0, 0), level, dims)
                np.testing.assert_array_equal(got, want, err_msg=f"{name}, level {level}")
    finally:
        for slide in slides.values():
            slide.close()


def test_tcga_jpeg2000_decoders_agree_within_rounding(shared_data: Path) -> None:
    slides = _open_each(shared_data / TCGA, ("openslide", "cucim", "tifffile"), mpp=0.25)
    try:
        for level in (0, 1):
            reads = {
                n: s.read_region((0, 0), level, (256, 256)).astype(int) for n, s in slides.items()
            }
            ref = reads.pop("openslide")
            for name, arr in reads.items():
                assert np.abs(arr - ref).max() <= 2, f"{name}, level {level}"
    finally:
        for slide in slides.values():
            slide.close()


@pytest.mark.parametrize("rel", [BRACS, BOXES, TCGA])
def test_level_downsamples_do_not_depend_on_the_backend(rel: str, shared_data: Path) -> None:
    """Tile grids are laid out in level-0 px from the downsamples: every reader must agree.

    OpenSlide (and cuCIM) use the mean of the width and height ratios; any reader that uses
    only one axis puts tiles of an odd-sized level at other level-0 positions.
    """
    slides = _open_each(shared_data / rel, ("openslide", "cucim", "tifffile"), mpp=0.25)
    try:
        w0, h0 = slides["openslide"].dimensions
        want = [(w0 / w + h0 / h) / 2 for w, h in slides["openslide"].level_dimensions]
        for name, slide in slides.items():
            assert slide.level_downsamples == pytest.approx(want, rel=1e-6), name
    finally:
        for slide in slides.values():
            slide.close()


@needs_cucim
@pytest.mark.parametrize("level", [1, 2])
def test_off_origin_reads_agree_between_cucim_and_tifffile(level: int, shared_data: Path) -> None:
    """One ``read_region`` call must return the same pixels whichever reader ``auto`` picked."""
    slides = _open_each(shared_data / BRACS, ("cucim", "tifffile"), mpp=0.25)
    try:
        for location in [(201, 301), (333, 517), (97, 45)]:
            a = slides["cucim"].read_region(location, level, (48, 40))
            b = slides["tifffile"].read_region(location, level, (48, 40))
            np.testing.assert_array_equal(a, b, err_msg=f"location {location}, level {level}")
    finally:
        for slide in slides.values():
            slide.close()


# -- healthy generated TIFF layouts: auto finds a reader that returns the planted pixels ----------

PLANTED = badinput.tissue_like_rgb(200, 300, salt=11)
TILE = (128, 128)
TIFF_LAYOUTS = {
    "stripped": {},
    "tiled-deflate": {"tile": TILE, "compression": "zlib"},
    "tiled-planar": {"tile": TILE, "planarconfig": "separate"},
    # Lossless WebP and JPEG 2000 (34712, not Aperio's 33003/33005): OpenSlide refuses these
    # compressions but tifffile reads them.
    "tiled-webp": {"tile": TILE, "compression": "webp", "compressionargs": {"lossless": True}},
    "tiled-jpeg2000": {
        "tile": TILE,
        "compression": "jpeg2000",
        "compressionargs": {"reversible": True},
    },
    # Only tifffile reads stripped TIFF, so planar (RRR…GGG…BBB) layout reaches it here.
    "stripped-planar": {"planarconfig": "separate"},
}


@pytest.mark.parametrize("layout", list(TIFF_LAYOUTS))
def test_auto_reads_planted_pixels_from_every_tiff_layout(layout: str, tmp_path: Path) -> None:
    kw = TIFF_LAYOUTS[layout]
    data = np.moveaxis(PLANTED, -1, 0) if kw.get("planarconfig") == "separate" else PLANTED
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(
        path,
        data,
        photometric="rgb",
        resolution=(20_000, 20_000),
        resolutionunit="CENTIMETER",
        **kw,
    )
    with wsi.open_slide(path) as slide:
        assert slide.dimensions == (300, 200)
        assert slide.mpp.x == pytest.approx(0.5)
        np.testing.assert_array_equal(
            slide.read_region((0, 0), 0, (300, 200)), PLANTED, err_msg=slide.backend
        )
        window = slide.read_region((250, 150), 0, (64, 64))  # straddles the corner
        np.testing.assert_array_equal(window[:50, :50], PLANTED[150:, 250:])
        assert (window[50:] == 255).all()
        assert (window[:, 50:] == 255).all()


# -- what may leave the reader --------------------------------------------------------------------

#: Identifying values in cmu-1's Aperio ImageDescription (file name, scanner, user GUID, date).
IDENTIFYING = ("CMU-1", "b414003d", "CPAPERIOCS", "12/29/09", "09:59:15")


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_exported_properties_are_allow_listed_and_anonymous(
    backend: str, shared_data: Path
) -> None:
    path = shared_data / CMU1
    with tifffile.TiffFile(path) as tf:
        raw = tf.pages.first.description
    assert all(s in raw for s in IDENTIFYING)  # the test is only meaningful if they are there
    with wsi.open_slide(path, backend=backend) as slide:
        props = slide.exported_properties()
    assert set(props) == set(wsi.EXPORTED_PROPERTIES)
    assert len(props) == len(wsi.EXPORTED_PROPERTIES)
    text = json.dumps(props)  # also proves it is JSON-serialisable
    for s in IDENTIFYING:
        assert s.lower() not in text.lower(), f"{s!r} leaked into {text}"
    assert props["mpp_x"] == props["mpp_y"] == pytest.approx(0.499)
    assert props["level_dimensions"] == [[2220, 2967]]


# -- out-of-slide areas and transparency ----------------------------------------------------------


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_out_of_slide_areas_are_white(backend: str, shared_data: Path) -> None:
    with wsi.open_slide(shared_data / CMU1, backend=backend) as slide:
        w, h = slide.dimensions
        inside = slide.read_region((0, 0), 0, (64, 48))
        corner = slide.read_region((-40, -30), 0, (104, 78))
        assert (corner[:30] == 255).all()
        assert (corner[:, :40] == 255).all()
        np.testing.assert_array_equal(corner[30:, 40:], inside)
        assert inside.min() < 255  # so the equality above says something
        edge = slide.read_region((w - 24, h - 16), 0, (64, 48))
        np.testing.assert_array_equal(
            edge[:16, :24], slide.read_region((w - 24, h - 16), 0, (24, 16))
        )
        assert (edge[16:] == 255).all()
        assert (edge[:, 24:] == 255).all()
        assert (slide.read_region((w + 500, 10), 0, (32, 32)) == 255).all()


def _rgba_field() -> np.ndarray:
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    rgba[..., 1] = 120
    rgba[..., 2] = np.arange(30, dtype=np.uint8)[:, None] * 8
    rgba[..., 3] = np.linspace(0, 255, 40).round().astype(np.uint8)[None, :]
    rgba[:10, :, 3] = 255  # an opaque band
    rgba[20:, :, 3] = 0  # a fully transparent band
    return rgba


def test_png_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = _rgba_field()
    path = tmp_path / "smear-field.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    alpha = rgba[..., 3:4] / 255.0
    want = rgba[..., :3] * alpha + 255.0 * (1 - alpha)
    with wsi.open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "pillow"
        assert slide.dimensions == (40, 30)
        got = slide.read_region((0, 0), 0, (40, 30))
        assert got.dtype == np.uint8
        assert np.abs(got - want).max() <= 0.5 + 1e-9  # correctly rounded
        np.testing.assert_array_equal(got[:10], rgba[:10, :, :3])
        assert (got[20:] == 255).all()
        beyond = slide.read_region((30, 25), 0, (20, 10))
        assert (beyond[5:] == 255).all()
        assert (beyond[:, 10:] == 255).all()


def test_png_dpi_gives_mpp(tmp_path: Path) -> None:
    path = tmp_path / "field.png"
    # 50 800 dpi = 2 000 000 px/m in the pHYs chunk = exactly 0.5 µm/px.
    Image.fromarray(badinput.tissue_like_rgb(32, 48)).save(path, dpi=(50_800, 50_800))
    with wsi.open_slide(path) as slide:
        assert (slide.mpp.x, slide.mpp.y, slide.mpp.source) == (
            pytest.approx(0.5),
            pytest.approx(0.5),
            "file",
        )


# -- the bad-input corpus -------------------------------------------------------------------------


def _refuse(record: badinput.BadInput, backend: str = "auto") -> wsi.SlideError:
    """Open ``record`` (and, for read-stage damage, read every level); return the error."""
    try:
        slide = wsi.open_slide(record.path, backend=backend)  # type: ignore[arg-type]
    except wsi.SlideError as exc:
        assert record.stage != "read", f"opening already failed: {exc}"
        return exc
    with slide:
        assert record.stage == "read", f"{record.why}: {record.filename} opened as {slide!r}"
        try:
            for level, dims in enumerate(slide.level_dimensions):
                slide.read_region((0, 0), level, dims)
        except wsi.SlideError as exc:
            return exc
    pytest.fail(f"{record.why}: {record.filename} read without an error through {slide.backend}")


def _check_refusal(record: badinput.BadInput, exc: wsi.SlideError) -> None:
    assert type(exc) is record.error, f"{record.why}: expected {record.error.__name__}, got {exc!r}"
    assert record.match in str(exc), f"{record.why}: {record.match!r} not in {exc}"
    assert_names_file_and_fix(exc, record.path)
    again = pickle.loads(pickle.dumps(exc))  # errors cross process boundaries in batch runs
    assert type(again) is type(exc)
    assert str(again) == str(exc)


@pytest.mark.parametrize(
    "make", badinput.GENERATORS, ids=lambda f: f.__name__.removeprefix("make_")
)
def test_generated_bad_input_is_refused(
    make: Callable[[Path], badinput.BadInput], tmp_path: Path
) -> None:
    record = make(tmp_path)
    _check_refusal(record, _refuse(record))


def test_real_bad_inputs_are_refused(tmp_path: Path, shared_data: Path) -> None:
    records = badinput.real_bad_inputs(tmp_path, shared_data)
    assert {r.filename for r in records} == {"truncated.svs", "malformed-sm-column-major.dcm"}
    for record in records:
        _check_refusal(record, _refuse(record))


def test_build_corpus_writes_distinct_files(tmp_path: Path) -> None:
    records = badinput.build_corpus(tmp_path)
    assert len({r.path for r in records}) == len(records) == len(badinput.GENERATORS)
    assert all(r.path.exists() and r.path.parent == tmp_path for r in records)


@pytest.mark.parametrize(
    "make",
    [badinput.make_short_tile_tiff, badinput.make_garbage_jpeg_tile_tiff],
    ids=["short", "noise"],
)
@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_damaged_tile_is_corrupt_through_every_backend(
    make: Callable[[Path], badinput.BadInput], backend: str, tmp_path: Path
) -> None:
    """A tile that cannot be decoded is a CorruptSlideError, never a reader's own exception
    or silently black / uninitialised pixels."""
    record = make(tmp_path)
    if backend == "cucim" and not inspect_file(record.path).cucim_safe:
        # the sampled pre-flight saw the damage: cuCIM is refused up front, never run on it
        with pytest.raises(wsi.UnsupportedSlideError, match="would crash") as info:
            wsi.open_slide(record.path, backend="cucim")
        assert_names_file_and_fix(info.value, record.path)
        return
    _check_refusal(record, _refuse(record, backend))


# -- forcing a reader that cannot read the container -----------------------------------------------

FORCED_MISMATCHES = [
    (CAMELYON, "tifffile", "dicom"),
    (CAMELYON, "pillow", "dicom"),
    pytest.param(CAMELYON, "cucim", "dicom", marks=needs_cucim),
    ("<png>", "tifffile", "png"),
    pytest.param("<png>", "cucim", "png", marks=needs_cucim),
    ("<png>", "openslide", "png"),
]


@pytest.mark.parametrize(("rel", "backend", "container"), FORCED_MISMATCHES)
def test_forced_backend_that_cannot_read_the_container_is_unsupported(
    rel: str, backend: str, container: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A healthy file given to the wrong reader is not 'corrupt'; the error says which reader
    was forced and what the file really is, so the user can pick another."""
    if rel == "<png>":
        path = tmp_path / "field.png"
        Image.fromarray(badinput.tissue_like_rgb(32, 48)).save(path, dpi=(50_800, 50_800))
    else:
        path = request.getfixturevalue("shared_data") / rel
    with pytest.raises(wsi.SlideError) as info:
        wsi.open_slide(path, backend=backend, mpp=0.5)  # type: ignore[arg-type]
    exc = info.value
    assert type(exc) is wsi.UnsupportedSlideError, repr(exc)
    assert backend.lower() in str(exc).lower()
    assert container in exc.problem.lower(), (
        f"the problem does not say the file is {container}: {exc.problem}"
    )
    assert_names_file_and_fix(exc, path)


def test_a_slide_opened_without_mpp_keeps_the_reason(tmp_path: Path) -> None:
    bad = badinput.make_missing_mpp_tiff(tmp_path)
    with pytest.raises(wsi.MppError) as required:
        wsi.open_slide(bad.path)
    with wsi.open_slide(bad.path, require_mpp=False) as s:
        assert s.mpp is None and isinstance(s.mpp_problem, wsi.MppError)
        assert str(s.mpp_problem) == str(required.value) and s.mpp_problem.param == "mpp"
    with wsi.open_slide(bad.path, mpp=0.5, require_mpp=False) as s:
        assert s.mpp is not None and s.mpp_problem is None


# -- issue 12: the work one file can demand ------------------------------------------------------


def _planted_truth(x: int, y: int, w: int, h: int) -> np.ndarray:
    """Hand-computed pixels of :func:`badinput.make_one_big_deflate_tile` at level 0."""
    out = np.empty((h, w, 3), np.uint8)
    out[...] = badinput.BACKGROUND
    px, py, side = badinput.PLANTED
    x0, y0 = max(x, px), max(y, py)
    x1, y1 = min(x + w, px + side), min(y + h, py + side)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = badinput.PLANTED_RGB
    return out


def test_one_big_deflate_tile_is_decoded_once_and_reads_right(tmp_path: Path) -> None:
    """Each 224-px read of a one-tile 8192² Deflate file used to decode all 192 MiB of it (minutes
    and 1.1 GB to tile it): now the tile is decoded once, into the shared tile cache."""
    from oncotrace.wsi._tilecache import TILES  # private: what the reader keeps decoded

    path = badinput.make_one_big_deflate_tile(tmp_path)
    assert path.stat().st_size < 400_000
    with tifffile.TiffFile(path) as tf:  # the file is what it says: one tile of 8192²
        assert len(tf.pages.first.dataoffsets) == 1
        assert tf.pages.first.tilewidth == badinput.BIG_TILE_SIDE
    decoded = badinput.BIG_TILE_SIDE**2 * 3
    with wsi.open_slide(path) as slide:
        assert slide.backend == "tifffile"  # OpenSlide's 32 MiB cache cannot hold the tile
        before = TILES.nbytes
        px, py, side = badinput.PLANTED
        rng = np.random.default_rng(0)
        for _ in range(25):
            x = int(rng.integers(px - 300, px + side + 100))
            y = int(rng.integers(py - 300, py + side + 100))
            np.testing.assert_array_equal(
                slide.read_region((x, y), 0, (224, 224)), _planted_truth(x, y, 224, 224)
            )
        assert TILES.nbytes - before == decoded  # one tile, decoded once and kept
    assert TILES.nbytes == before  # closing the slide lets it go


@pytest.mark.parametrize("tiled", [True, False], ids=["tile", "strip"])
def test_a_tile_or_strip_too_large_to_hold_is_refused(tiled: bool, tmp_path: Path) -> None:
    """16384² px in one Deflate segment (768 MiB decoded from 26 bytes): every read would decode
    all of it. Refused before any reader decodes a byte, naming the size and the conversion."""
    path, decoded = badinput.make_oversized_segment(tmp_path, tiled=tiled)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        assert page.is_tiled is tiled and page.shape == (16_384, 16_384, 3)
    for backend in ("auto", "openslide", "tifffile"):
        with pytest.raises(wsi.UnsupportedSlideError) as info:
            wsi.open_slide(path, backend=backend)  # type: ignore[arg-type]
        message = str(info.value)
        assert str(path) in message
        assert f"{decoded >> 20} MiB" in message and ("tile" if tiled else "strip") in message
        assert "vips tiffsave" in message and "--tile" in message and "--pyramid" in message


# -- issue 12: messages that name what is wrong and a fix that works ----------------------------


def test_a_plain_tiff_named_ndpi_opens_as_the_tiff_it_is(tmp_path: Path) -> None:
    """tifffile reads any classic TIFF named .ndpi with NDPI's 64-bit offsets; the pre-flight
    called such a file 'truncated'. It is read as the plain TIFF it is, by every reader."""
    path = badinput.make_plain_tiff_named_ndpi(tmp_path)
    with tifffile.TiffFile(path) as tf:  # the trap: read by its name, it has no image
        assert len(tf.pages) == 0
    truth = tifffile.imread(path, is_ndpi=False)
    for backend in ("auto", "openslide", "tifffile"):
        with wsi.open_slide(path, backend=backend) as slide:  # type: ignore[arg-type]
            assert slide.dimensions == (truth.shape[1], truth.shape[0])
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, slide.dimensions), truth)


@pytest.mark.parametrize("with_data", [False, True], ids=["empty", "with-data"])
def test_a_zero_size_bigtiff_is_refused_as_empty_by_every_reader(
    with_data: bool, tmp_path: Path
) -> None:
    """Was: 'holds no pixel data', or with a strip of data 'tifffile failed (ZeroDivisionError)'
    and, forced on cuCIM, 'use backend openslide' (OpenSlide refuses it too)."""
    path = badinput.make_zero_size_bigtiff(tmp_path, with_data=with_data)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff and tf.pages.first.shape == (0, 0, 3)
    for backend in ("auto", "openslide", "tifffile", *(["cucim"] if cucim_available() else [])):
        with pytest.raises(wsi.CorruptSlideError) as info:
            wsi.open_slide(path, backend=backend)  # type: ignore[arg-type]
        assert str(path) in str(info.value) and "0×0 px" in info.value.problem
        assert "export the slide again" in info.value.fix
        assert "openslide" not in info.value.fix.lower()


def test_a_cut_file_is_called_truncated_and_copying_it_again_works(tmp_path: Path) -> None:
    buf = __import__("io").BytesIO()
    badinput.write_tiled_tiff(buf, side=512)
    whole = buf.getvalue()
    cut = tmp_path / "copy.tif"
    cut.write_bytes(whole[: int(len(whole) * 0.6)])
    with pytest.raises(wsi.CorruptSlideError) as info:
        wsi.open_slide(cut)
    assert "truncated" in info.value.problem and "copy the slide again" in info.value.fix
    cut.write_bytes(whole)  # the fix: copy it again, whole
    with wsi.open_slide(cut) as slide:
        np.testing.assert_array_equal(
            slide.read_region((0, 0), 0, (512, 512)),
            tifffile.imread(__import__("io").BytesIO(whole)),
        )


def test_a_tile_offset_past_eof_in_a_whole_file_is_ill_formed_not_truncated(
    tmp_path: Path,
) -> None:
    """Copying again cannot help a file whose table points one tile past its end while tiles
    stored after it are present: the message must not blame the transfer."""
    path, size = badinput.make_tile_offset_past_eof(tmp_path)
    with tifffile.TiffFile(path) as tf:  # independent check of the damage
        page = tf.pages.first
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
        assert ends[1] > size and all(e <= size for i, e in enumerate(ends) if i != 1)
        assert page.dataoffsets[3] > page.dataoffsets[0]  # data follows in the file
    with pytest.raises(wsi.CorruptSlideError) as info:
        wsi.open_slide(path)
    assert str(path) in str(info.value)
    assert "ill-formed" in info.value.problem and "truncated" not in info.value.problem
    assert "export the slide again" in info.value.fix and "will not help" in info.value.fix


def test_a_196_megapixel_png_is_too_large_for_the_plain_image_reader(tmp_path: Path) -> None:
    """Was: 'pillow failed (DecompressionBombError …). Fix: export it again' — which cannot help."""
    path = badinput.make_huge_png(tmp_path)
    with pytest.raises(Image.DecompressionBombError):  # Pillow itself refuses to open it
        Image.open(path)
    with pytest.raises(wsi.UnsupportedSlideError) as info:
        wsi.open_slide(path, mpp=0.5)
    assert str(path) in str(info.value)
    assert "196 megapixels" in info.value.problem and "too large" in info.value.problem
    assert "tiled pyramidal TIFF" in info.value.fix and "vips tiffsave" in info.value.fix
    assert "export" not in info.value.fix


def test_converting_a_too_large_image_to_a_tiled_pyramid_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix followed, on a small image with the bound lowered: written as a tiled pyramidal
    TIFF (what `vips tiffsave --tile --pyramid` writes; tifffile here, vips is not installed in
    CI), the same pixels open with the slide readers."""
    from oncotrace.wsi._backends import PillowBackend  # private: the plain-image bound

    rgb = badinput.tissue_like_rgb(600, 800, salt=42)
    png = tmp_path / "field.png"
    Image.fromarray(rgb).save(png)
    monkeypatch.setattr(PillowBackend, "MAX_PIXELS", 100_000)
    with pytest.raises(wsi.UnsupportedSlideError, match="too large for the plain-image reader"):
        wsi.open_slide(png, mpp=0.5)
    tif = tmp_path / "field.tif"
    with tifffile.TiffWriter(tif) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", subifds=1)
        tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    with wsi.open_slide(tif, mpp=0.5) as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (800, 600)), rgb)
