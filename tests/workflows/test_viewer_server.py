"""`oncotrace view`'s server: tiles against independently computed regions, overlays against
planted grids, ultrasound against a known registration, and every escape attempt gets a 404.

The results folder is written by hand in a module fixture (:func:`build_results_dir`, reusable
by the browser test): two generated pyramidal TIFFs (one 2048 x 1536, one 1300 x 1000 so edges
and downsamples do not divide evenly), a planted attention grid and an immune density map, an
ultrasound mapping through an exact affine, an error case, a case whose ultrasound file is gone,
and symlinks that point out of the folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from oncotrace.spatial import (
    DENSITY_UNIT,
    Heatmap,
    fit_landmarks,
    landmarks_from_arrays,
    read_ultrasound,
    to_ultrasound,
    write_ome_zarr,
)
from oncotrace.workflows import create_app, start_server
from oncotrace.workflows._viewer._results import NotFoundError  # private: safe_file's error
from oncotrace.workflows._viewer._tiles import (  # private: the server's tile machinery
    ByteLRU,
    DeepZoom,
    SlidePool,
    TileService,
)
from oncotrace.workflows._viewer.server import safe_file  # private: the path-escape guard
from oncotrace.wsi.synthetic import write_pyramid_tiff
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

MPP = 0.5
BIG = (2048, 1536)
ODD = (1300, 1000)
CELL = 256.0
ORIGIN = (32.0, 16.0)
US_SPACING_MM = 0.02
US_SIZE = (80, 60)  # (w, h) px
ROT_DEG = 10.0
SHIFT_MM = np.array([0.3, 0.2])


def smooth_image(width: int, height: int, phase: float) -> np.ndarray:
    """Smooth RGB fields (periods 70-200 px): JPEG keeps them, a few pixels of shift does not."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 140 + 50 * np.sin(xx / 23 + phase) + 40 * np.cos(yy / 17)
    g = 120 + 45 * np.sin((xx + yy) / 31) + 30 * np.cos(xx / 11 - yy / 29 + phase)
    b = 150 + 40 * np.cos(yy / 13 + phase) + 35 * np.sin(xx / 19)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def us_mm_of(slide_um: np.ndarray) -> np.ndarray:
    """The planted registration: slide µm -> ultrasound mm (rotation by 10°, shift)."""
    t = math.radians(ROT_DEG)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return (np.asarray(slide_um, np.float64) / 1000.0) @ rot.T + SHIFT_MM


def planted_grid() -> np.ndarray:
    """6 x 8 cells: min 0 at (4, 1), max 1 at (2, 3), NaN at (0, 0) and (0, 1)."""
    grid = np.random.default_rng(3).uniform(0.2, 0.8, (6, 8)).astype(np.float32)
    grid[2, 3], grid[4, 1] = 1.0, 0.0
    grid[0, :2] = np.nan
    return grid


def _heatmap(grid: np.ndarray, size: tuple[int, int]) -> Heatmap:
    return Heatmap(
        grid=grid,
        origin_level0=ORIGIN,
        cell_size_level0=(CELL, CELL),
        mpp=(MPP, MPP),
        level0_size=size,
        tile_size_level0=(CELL, CELL),
        n_tiles=int(np.isfinite(grid).sum()),
    )


def _result(slide_id: str, path: Path) -> dict[str, object]:
    return {
        "format": 1,
        "status": "done",
        "slide_id": slide_id,
        "path": str(path),
        "tasks": {
            "label": {
                "label": "malignant",
                "classes": ["benign", "malignant"],
                "proba": [0.25, 0.75],
                "top_k": ["malignant", "benign"],
            }
        },
    }


@dataclass(frozen=True)
class Fixture:
    root: Path
    images: dict[str, np.ndarray]
    frame: np.ndarray
    landmarks_px: np.ndarray
    outside: Path


def build_results_dir(base: Path) -> Fixture:
    """A small ``oncotrace score``-shaped results folder with every kind of case (see module doc)."""
    root = base / "results"
    slides = root / "slides"
    outside = base / "outside"
    outside.mkdir(parents=True)
    images = {"S_big": smooth_image(*BIG, 0.0), "S_odd": smooth_image(*ODD, 1.0)}
    for sid, img in images.items():
        tif = write_pyramid_tiff(base / f"{sid}.tif", img, mpp=MPP, levels=3, factor=4)
        (slides / sid).mkdir(parents=True)
        (slides / sid / "result.json").write_text(json.dumps(_result(sid, tif)))
    big = slides / "S_big"
    heat = _heatmap(planted_grid(), BIG)
    write_ome_zarr(heat, big / "attention.ome.zarr", name="attention (label)")
    density = _heatmap(np.full((6, 8), 120.0, np.float32), BIG)
    write_ome_zarr(density, big / "immune" / "density.ome.zarr", name="immune", unit=DENSITY_UNIT)
    (big / "immune" / "summary.json").write_text("{}")

    # Ultrasound: a PNG frame outside the results (referenced), an exact affine registration.
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (US_SIZE[1], US_SIZE[0], 3), dtype=np.uint8)
    frame_path = base / "us" / "frame.png"
    frame_path.parent.mkdir()
    Image.fromarray(frame).save(frame_path)
    us = read_ultrasound(frame_path, spacing_mm=US_SPACING_MM)
    lm_um = rng.uniform((50, 50), (BIG[0] * MPP - 50, BIG[1] * MPP - 50), (10, 2))
    marks = landmarks_from_arrays(
        pathology_um=lm_um, ultrasound_mm=us_mm_of(lm_um), roles=["fit"] * 8 + ["holdout"] * 2
    )
    reg = fit_landmarks(marks, model="affine")
    to_ultrasound(heat, reg, us, big / "ultrasound", name="attention", order=0)

    # Error case; a case whose ultrasound file has gone.
    (slides / "S_err").mkdir()
    (slides / "S_err" / "error.json").write_text(
        json.dumps(
            {
                "status": "error",
                "slide_id": "S_err",
                "path": str(base / "missing.svs"),
                "stage": "tissue",
                "error_type": "NoTissueError",
                "message": "no tissue found in missing.svs",
            }
        )
    )
    gone = slides / "S_gone"
    gone.mkdir()
    (gone / "result.json").write_text(json.dumps(_result("S_gone", base / "S_big.tif")))
    shutil.copytree(big / "ultrasound", gone / "ultrasound")
    reg_doc = json.loads((gone / "ultrasound" / "registration.json").read_text())
    reg_doc["ultrasound"]["source"] = str(base / "us" / "deleted.png")
    (gone / "ultrasound" / "registration.json").write_text(json.dumps(reg_doc))

    # Escapes: a slide folder, an overlay store and a chunk file linking outside.
    evil = outside / "evil"
    evil.mkdir()
    (evil / "result.json").write_text(json.dumps(_result("evil", base / "S_big.tif")))
    os.symlink(evil, slides / "evil")
    write_ome_zarr(heat, outside / "leak.ome.zarr", name="leak")
    os.symlink(outside / "leak.ome.zarr", big / "leak.ome.zarr")
    odd_immune = slides / "S_odd" / "immune"
    write_ome_zarr(_heatmap(planted_grid(), ODD), odd_immune / "density.ome.zarr", name="d")
    chunk = next(p for p in (odd_immune / "density.ome.zarr" / "s0").rglob("*") if p.is_file())
    shutil.copy(chunk, outside / "chunk")
    chunk.unlink()
    os.symlink(outside / "chunk", chunk)
    (outside / "secret.txt").write_text("secret")

    px = us_mm_of(lm_um) / US_SPACING_MM
    return Fixture(root, images, frame, px, outside)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return build_results_dir(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def client(fx: Fixture) -> Iterator[TestClient]:
    with TestClient(create_app(fx.root, cache_mib=64)) as c:
        yield c


def _jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)


def _encode(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(pixels).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def block_mean(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, ds: int) -> np.ndarray:
    """Level-0 rectangle [x0, x1) x [y0, y1) (white past the image) averaged in ds x ds blocks."""
    h, w = img.shape[:2]
    pad = np.full((y1 - y0, x1 - x0, 3), 255.0)
    part = img[y0 : min(y1, h), x0 : min(x1, w)]
    pad[: part.shape[0], : part.shape[1]] = part
    return pad.reshape((y1 - y0) // ds, ds, (x1 - x0) // ds, ds, 3).mean(axis=(1, 3))


# --------------------------------------------------------------------------------------------
# Cases and slides
# --------------------------------------------------------------------------------------------


def test_cases_list_predictions_errors_and_whitelist(client: TestClient) -> None:
    r = client.get("/api/cases")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    cases = {c["slide_id"]: c for c in doc["cases"]}
    # The symlinked folder that points outside is not a case.
    assert set(cases) == {"S_big", "S_odd", "S_err", "S_gone"}
    assert doc["tasks"] == ["label"]
    big = cases["S_big"]
    assert big["status"] == "done" and big["error"] is None
    assert big["tasks"]["label"] == {
        "label": "malignant",
        "probabilities": {"benign": 0.25, "malignant": 0.75},
        "top_k": [["malignant", 0.75], ["benign", 0.25]],
    }
    # The linked-in store and the store with a linked chunk are not overlays.
    assert big["overlays"] == ["attention", "immune-density"]
    assert cases["S_odd"]["overlays"] == []
    assert big["has_ultrasound"] and not cases["S_odd"]["has_ultrasound"]
    err = cases["S_err"]
    assert err["status"] == "error" and err["tasks"] == {}
    assert err["error"] == {
        "stage": "tissue",
        "type": "NoTissueError",
        "message": "no tissue found in missing.svs",
    }


def test_slide_json_allow_list_and_overlay_placement(client: TestClient) -> None:
    doc = client.get("/api/slides/S_big").json()
    assert set(doc) == {
        "slide_id", "status", "width", "height", "mpp", "mpp_source", "levels", "dz_levels",
        "dzi", "tile_size", "overlap", "overlays", "unavailable_overlays", "tasks", "error", "ood",
    }  # fmt: skip
    assert (doc["width"], doc["height"], doc["mpp"]) == (2048, 1536, [MPP, MPP])
    assert (doc["levels"], doc["dz_levels"]) == (3, 12)  # 3 TIFF levels; 2^11 = 2048
    assert (doc["tile_size"], doc["overlap"], doc["dzi"]) == (254, 1, "/dzi/S_big.dzi")
    att, dens = doc["overlays"]
    # Extent = origin + cell size x (8 columns, 6 rows), in level-0 px.
    assert (att["x"], att["y"], att["width"], att["height"]) == (32, 16, 8 * 256, 6 * 256)
    assert (att["vmin"], att["vmax"]) == (0.0, 1.0)
    assert att["url"] == "/overlay/S_big/attention.png"
    assert att["colorbar"] == "/overlay/S_big/attention/colorbar.png"
    assert att["label"] == "attention (label)"
    assert dens["name"] == "immune-density" and dens["unit"] == "cells/mm²"
    assert client.get(att["colorbar"]).status_code == 200


def test_dzi_xml_sizes(client: TestClient) -> None:
    for sid, (w, h) in (("S_big", BIG), ("S_odd", ODD)):
        r = client.get(f"/dzi/{sid}.dzi")
        assert r.status_code == 200
        assert 'TileSize="254" Overlap="1" Format="jpeg"' in r.text
        assert f'<Size Width="{w}" Height="{h}"/>' in r.text


def test_deepzoom_geometry_by_hand() -> None:
    dz = DeepZoom(*ODD)
    assert dz.max_level == 11  # 1024 < 1300 <= 2048
    assert dz.level_size(11) == (1300, 1000) and dz.level_size(8) == (163, 125)
    assert dz.level_size(0) == (1, 1) and dz.tile_counts(11) == (6, 4)
    t = dz.tile(11, 5, 3)  # last column and row: x 1269..1300, y 761..1000
    assert t.size == (31, 239) and t.location == (1269, 761)
    t = dz.tile(9, 1, 0)  # ds 4: level 325 x 250; x 253..325, y 0..250
    assert t.size == (72, 250) and t.location == (1012, 0) and t.extent == (288, 1000)


# --------------------------------------------------------------------------------------------
# Tiles against the image that was written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sid", "level", "col", "row", "rect", "ds"),
    [
        # Full resolution, an interior tile with the 1-px overlap on all sides.
        ("S_big", 11, 1, 1, (253, 253, 509, 509), 1),
        # ds 2: read from level 0 and shrunk.
        ("S_big", 10, 2, 1, (2 * 507, 2 * 253, 2 * 763, 2 * 509), 2),
        # ds 4: read straight from the TIFF's second level.
        ("S_big", 9, 1, 0, (4 * 253, 0, 4 * 509, 4 * 255), 4),
        # ds 8 on the odd slide: its second level shrunk by 2; 163 x 125, partial last column.
        ("S_odd", 8, 0, 0, (0, 0, 8 * 163, 8 * 125), 8),
        # Full-resolution bottom-right edge tile: clipped to 31 x 239.
        ("S_odd", 11, 5, 3, (1269, 761, 1300, 1000), 1),
    ],
)
def test_tile_equals_independent_region(
    client: TestClient,
    fx: Fixture,
    sid: str,
    level: int,
    col: int,
    row: int,
    rect: tuple[int, int, int, int],
    ds: int,
) -> None:
    r = client.get(f"/dzi/{sid}_files/{level}/{col}_{row}.jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    got = _jpeg(r.content)
    x0, y0, x1, y1 = rect
    want = block_mean(fx.images[sid], *rect, ds)
    assert got.shape == want.shape == ((y1 - y0) // ds, (x1 - x0) // ds, 3)
    diff = np.abs(got - want).mean()
    # As close as JPEG-encoding the true region itself gets (+1 for the pyramid's rounding).
    jpeg_only = np.abs(_jpeg(_encode(want)) - want).mean()
    assert diff < jpeg_only + 1.0, (diff, jpeg_only)
    # The comparison has power: the same region 4 level-0 px off is far worse.
    shifted = block_mean(fx.images[sid], x0 + 4 * ds, y0, x1 + 4 * ds, y1, ds)
    assert np.abs(got - shifted)[:, :-8].mean() > 3 * diff


def test_tiles_on_every_level_are_served(client: TestClient) -> None:
    dz = DeepZoom(*ODD)
    for level in range(dz.n_levels):
        cols, rows = dz.tile_counts(level)
        r = client.get(f"/dzi/S_odd_files/{level}/{cols - 1}_{rows - 1}.jpeg")
        assert r.status_code == 200, (level, r.text)
        lw, lh = dz.level_size(level)
        x0 = (cols - 1) * 254 - (1 if cols > 1 else 0)
        y0 = (rows - 1) * 254 - (1 if rows > 1 else 0)
        assert _jpeg(r.content).shape[:2] == (lh - y0, lw - x0)


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def viridis(level: float) -> np.ndarray:
    """matplotlib's viridis at ``level`` in [0, 1], as 0-255 floats."""
    from matplotlib import colormaps

    return np.asarray(colormaps["viridis"](level)[:3]) * 255


def test_overlay_png_matches_planted_grid(client: TestClient) -> None:
    r = client.get("/overlay/S_big/attention.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape == (6, 8, 4)  # one pixel per cell
    assert np.abs(img[2, 3, :3] - viridis(1.0)).max() <= 1  # max -> viridis' yellow end
    assert np.abs(img[4, 1, :3] - viridis(0.0)).max() <= 1  # min -> viridis' dark-purple end
    assert img[0, 0, 3] == 0 and img[0, 1, 3] == 0  # NaN -> transparent
    assert (img[1:, :, 3] == 255).all()
    # Every cell is viridis at its place between the grid's min and max (within one of
    # matplotlib's 256 steps).
    grid = planted_grid()
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for r_, c_ in np.argwhere(np.isfinite(grid)):
        level = (grid[r_, c_] - lo) / (hi - lo)
        near = [np.abs(img[r_, c_, :3] - viridis(level + d)).max() for d in (-1 / 256, 0, 1 / 256)]
        assert min(near) <= 1, (r_, c_)


def test_colorbar_runs_from_max_to_min(client: TestClient) -> None:
    img = np.asarray(
        Image.open(io.BytesIO(client.get("/overlay/S_big/attention/colorbar.png").content))
    )
    assert np.abs(img[0, 0, :3] - viridis(1.0)).max() <= 1  # top: vmax
    assert np.abs(img[-1, 0, :3] - viridis(0.0)).max() <= 1
    column = img[:, 0, :3].astype(float)  # the same map as the overlay, top to bottom
    for i in (64, 128, 192):
        assert np.abs(column[i] - viridis(1 - i / (len(column) - 1))).max() <= 4, i


# --------------------------------------------------------------------------------------------
# Ultrasound
# --------------------------------------------------------------------------------------------


def test_ultrasound_json_landmarks_report(client: TestClient, fx: Fixture) -> None:
    r = client.get("/api/ultrasound/S_big")
    assert r.status_code == 200
    doc = r.json()
    assert (doc["width"], doc["height"]) == US_SIZE
    assert doc["spacing_mm"] == [US_SPACING_MM, US_SPACING_MM]
    assert doc["frame"] == "/us/S_big/frame.png"
    marks = doc["landmarks"]
    assert [m["role"] for m in marks] == ["fit"] * 8 + ["holdout"] * 2
    got = np.array([[m["x"], m["y"]] for m in marks])
    assert np.allclose(got, fx.landmarks_px, atol=1e-6)
    report = doc["report"]
    assert report["model"] == "affine" and report["n_fit"] == 8
    assert report["holdout_tre_mm"]["mean"] < 1e-6  # the planted transform is exact
    (ov,) = doc["overlays"]
    assert ov["name"] == "attention" and ov["url"] == "/us/S_big/overlay/attention.png"
    assert (ov["vmin"], ov["vmax"]) == (0.0, 1.0)
    assert client.get(ov["colorbar"]).status_code == 200


def test_ultrasound_frame_and_overlay_pixels(client: TestClient, fx: Fixture) -> None:
    frame = np.asarray(Image.open(io.BytesIO(client.get("/us/S_big/frame.png").content)))
    assert np.array_equal(frame, fx.frame)
    img = np.asarray(Image.open(io.BytesIO(client.get("/us/S_big/overlay/attention.png").content)))
    assert img.shape == (US_SIZE[1], US_SIZE[0], 4)
    # The centre of the max cell (row 2, col 3) through the planted affine lands on dark red.
    centre_um = (np.array(ORIGIN) + (np.array([3, 2]) + 0.5) * CELL) * MPP
    x, y = np.rint(us_mm_of(centre_um[None])[0] / US_SPACING_MM).astype(int)
    assert np.abs(img[y, x, :3] - viridis(1.0)).max() <= 1 and img[y, x, 3] == 255
    # The frame's top-left corner maps off the slide: transparent.
    assert img[0, 0, 3] == 0


def test_ultrasound_source_gone_is_a_clear_404(client: TestClient) -> None:
    assert client.get("/api/ultrasound/S_gone").status_code == 200  # from registration.json
    r = client.get("/us/S_gone/frame.png")
    assert r.status_code == 404 and "deleted.png" in r.json()["error"]
    assert "map-us" in r.json()["error"]


def test_pages(client: TestClient) -> None:
    assert client.get("/").status_code == 200
    assert client.get("/slide/S_big").status_code == 200
    assert client.get("/ultrasound/S_big").status_code == 200
    for url in ("/slide/nope", "/ultrasound/S_odd", "/ultrasound/nope"):
        assert client.get(url).status_code == 404, url


# --------------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------------


NOT_FOUND = [
    # traversal, literal and encoded, through every route that takes a name
    "/static/%2e%2e/server.py",
    "/static/..%2f_results.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/.hidden",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/vendor/openseadragon/%2e%2e/%2e%2e/%2e%2e/package.json",
    "/vendor/openseadragon//etc/passwd",
    "/api/slides/..",
    "/api/slides/%2e%2e",
    "/api/slides/..%2fS_big",
    "/api/slides/%2fetc%2fpasswd",
    "/dzi/..%2f..%2fS_big.dzi",
    "/dzi/%2e%2e.dzi",
    "/overlay/S_big/..%2fresult.json",
    "/overlay/S_big/%2e%2e%2fattention.png",
    "/overlay/%2e%2e/attention.png",
    "/us/S_big/overlay/..%2fattention.png",
    "/api/ultrasound/..%2fS_big",
    # symlinks out of the folder: a slide folder, an overlay store, a chunk inside a store
    "/api/slides/evil",
    "/dzi/evil.dzi",
    "/dzi/evil_files/11/0_0.jpeg",
    "/overlay/S_big/leak.png",
    "/overlay/S_odd/immune-density.png",
    # unknown ids and names
    "/api/slides/nope",
    "/api/ultrasound/S_odd",
    "/dzi/nope.dzi",
    "/dzi/S_big",
    "/overlay/S_big/nope.png",
    "/overlay/S_big/attention.jpeg",
    "/overlay/S_big/nope/colorbar.png",
    "/us/S_odd/frame.png",
    "/us/S_big/overlay/nope.png",
    "/nope",
    # tiles outside the pyramid and non-numbers
    "/dzi/S_big_files/12/0_0.jpeg",
    "/dzi/S_big_files/11/9_0.jpeg",
    "/dzi/S_big_files/11/0_7.jpeg",
    "/dzi/S_big_files/-1/0_0.jpeg",
    "/dzi/S_big_files/a/0_0.jpeg",
    "/dzi/S_big_files/11/-1_0.jpeg",
    "/dzi/S_big_files/11/1e1_0.jpeg",
    "/dzi/S_big_files/11/0x1_0.jpeg",
    "/dzi/S_big_files/11/%20_0.jpeg",
    "/dzi/S_big_files/11/%D9%A1_0.jpeg",  # Arabic-Indic one: str.isdigit() but not a number
    "/dzi/S_big_files/11/0_0_0.jpeg",
    "/dzi/S_big_files/11/0-0.jpeg",
    "/dzi/S_big_files/11/0_0.png",
    "/dzi/S_big_files/99999999999999999999/0_0.jpeg",
    # a slide whose file is gone
    "/api/slides/S_err",
    "/dzi/S_err.dzi",
]


@pytest.mark.parametrize("url", NOT_FOUND)
def test_escapes_and_unknowns_are_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    assert r.headers["content-type"] == "application/json" and "error" in r.json()
    assert "secret" not in r.text


def test_safe_file_rejects_a_symlink_out(tmp_path: Path, fx: Fixture) -> None:
    (tmp_path / "ok.txt").write_text("ok")
    os.symlink(fx.outside / "secret.txt", tmp_path / "link.txt")
    assert safe_file(tmp_path, "ok.txt") == (tmp_path / "ok.txt").resolve()
    for rel in ("link.txt", "../outside/secret.txt", str(fx.outside / "secret.txt"), "", "."):
        with pytest.raises(NotFoundError):
            safe_file(tmp_path, rel)


def test_results_moved_with_their_slide_and_an_ood_flag_reach_the_api(
    tmp_path: Path, fx: Fixture
) -> None:
    """result.json's absolute path is gone (the project folder moved); path_from_results finds
    the slide again. Its out-of-domain check is passed on, flagged by distance > threshold."""
    import shutil

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    shutil.copy2(fx.root.parent / "S_big.tif", data / "moved.tif")
    here = tmp_path / "project" / "results" / "slides" / "M"
    here.mkdir(parents=True)
    doc = {
        **_result("M", tmp_path / "old-place" / "data" / "moved.tif"),
        "path_from_results": "../data/moved.tif",
        "ood": {"distance": 14.2, "threshold": 9.5, "flagged": True},
    }
    (here / "result.json").write_text(json.dumps(doc))
    with TestClient(create_app(tmp_path / "project" / "results", cache_mib=8)) as c:
        case = c.get("/api/cases").json()["cases"][0]
        assert case["ood"] == {"distance": 14.2, "threshold": 9.5, "flagged": True}
        info = c.get("/api/slides/M").json()
        assert info.get("error") is None and info["width"] == fx.images["S_big"].shape[1]
        assert info["ood"]["flagged"] is True
        assert c.get("/dzi/M_files/0/0_0.jpeg").status_code == 200
    # a distance within the threshold is not flagged, whatever the file says
    doc["ood"] = {"distance": 3.0, "threshold": 9.5, "flagged": True}
    (here / "result.json").write_text(json.dumps(doc))
    with TestClient(create_app(tmp_path / "project" / "results", cache_mib=8)) as c:
        assert c.get("/api/cases").json()["cases"][0]["ood"]["flagged"] is False


def test_missing_slide_file_names_it(client: TestClient) -> None:
    r = client.get("/api/slides/S_err")
    assert "missing.svs" in r.json()["error"] and "gone" in r.json()["error"]


# --------------------------------------------------------------------------------------------
# Caches and concurrency
# --------------------------------------------------------------------------------------------


def test_byte_lru_evicts_least_recently_used() -> None:
    cache = ByteLRU(10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now the most recent
    cache.put("c", b"cccc")  # 12 bytes > 10: b goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.nbytes == 8
    cache.put("big", b"x" * 11)  # larger than the budget: not cached, nothing evicted
    assert cache.get("big") is None and cache.nbytes == 8
    off = ByteLRU(0)
    off.put("a", b"a")
    assert off.get("a") is None and off.nbytes == 0


def test_tile_cache_stays_within_its_budget(fx: Fixture) -> None:
    limit = 60_000
    service = TileService(cache_bytes=limit)
    path = Path(json.loads((fx.root / "slides/S_big/result.json").read_text())["path"])
    dz = DeepZoom(*BIG)
    rendered = 0
    for level in (9, 10, 11):
        cols, rows = dz.tile_counts(level)
        for col in range(cols):
            for row in range(rows):
                service.tile(path, level, col, row)
                rendered += 1
                assert service.cache.nbytes <= limit
    assert rendered == 6 + 20 + 63
    assert 0 < len(service.cache) < rendered
    # The most recent tile is served from the cache, byte for byte.
    hits = service.cache.hits
    assert service.tile(path, 11, 8, 6) == service.tile(path, 11, 8, 6)
    assert service.cache.hits == hits + 2
    service.close()


def test_cache_on_and_off_give_identical_bytes(fx: Fixture) -> None:
    urls = [f"/dzi/S_odd_files/{lv}/0_0.jpeg" for lv in range(12)] + [
        "/dzi/S_odd_files/11/5_3.jpeg",
        "/dzi/S_big_files/10/2_1.jpeg",
    ]
    with (
        TestClient(create_app(fx.root, cache_mib=16)) as on,
        TestClient(create_app(fx.root, cache_mib=0)) as off,
    ):
        first = [on.get(u).content for u in urls]
        again = [on.get(u).content for u in urls]
        plain = [off.get(u).content for u in urls]
        assert first == again == plain
        assert on.app.state.viewer.tiles.cache.hits == len(urls)  # type: ignore[attr-defined]
        assert off.app.state.viewer.tiles.cache.nbytes == 0  # type: ignore[attr-defined]


def test_concurrent_tiles_with_one_open_slide(fx: Fixture) -> None:
    """Eight threads over two slides with a pool of one handle: slides are swapped under
    load, never closed while read, and every tile equals the single-threaded one."""
    paths = [
        Path(json.loads((fx.root / f"slides/{s}/result.json").read_text())["path"])
        for s in ("S_big", "S_odd")
    ]
    jobs = [(paths[i % 2], 11, i % 5, (i // 5) % 3) for i in range(40)]
    serial = TileService(cache_bytes=0)
    want = [serial.tile(*job) for job in jobs]
    shared = TileService(cache_bytes=0, max_open=1)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: shared.tile(*job), jobs))
    assert got == want
    assert len(shared.pool) <= 1
    serial.close()
    shared.close()


def test_slide_pool_closes_idle_handles() -> None:
    closed: list[str] = []

    class FakeSlide:
        def __init__(self, path: Path) -> None:
            self.path = path

        def close(self) -> None:
            closed.append(self.path.name)

    pool = SlidePool(2, opener=FakeSlide)  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        with pool.lease(Path(name)):
            pass
    assert closed == ["a"] and len(pool) == 2
    with pool.lease(Path("b")), pool.lease(Path("d")), pool.lease(Path("e")):
        assert closed == ["a"]  # three in use and one idle: only idle ones may go
    # When e is released, b and d are still in use: the idle c and e go, in LRU order.
    assert closed == ["a", "c", "e"] and len(pool) == 2


# --------------------------------------------------------------------------------------------
# Serving and the command
# --------------------------------------------------------------------------------------------


def test_server_thread_answers_loopback_names_only(fx: Fixture) -> None:
    with start_server(fx.root, port=0, cache_mib=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        r = httpx.get(server.url + "api/cases", timeout=10)
        assert r.status_code == 200 and len(r.json()["cases"]) == 4
        port = server.url.rstrip("/").rsplit(":", 1)[1]
        r = httpx.get(f"http://localhost:{port}/api/cases", timeout=10)
        assert r.status_code == 200
        # A page on another site that rebinds its name to 127.0.0.1 is refused.
        r = httpx.get(server.url + "api/cases", headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 400
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "api/cases", timeout=2)


def test_view_command_rejects_a_non_results_folder(tmp_path: Path) -> None:
    import typer
    from oncotrace.workflows._view_cli import register  # private: the `view` command alone
    from rich.console import Console

    app = typer.Typer()
    register(app, Console(stderr=True))

    @app.command()
    def other() -> None:  # a second command keeps typer from collapsing to the bare command
        pass

    res = CliRunner().invoke(app, ["view", str(tmp_path), "--no-browser", "--port", "0"])
    assert res.exit_code == 2 and "slides/" in res.output
    res = CliRunner().invoke(app, ["view", str(tmp_path / "none"), "--port", "0"])
    assert res.exit_code == 2 and "not a folder" in res.output
    res = CliRunner().invoke(app, ["view", str(tmp_path), "--cache-mib", "-1"])
    assert res.exit_code == 2


def test_real_svs_tile_matches_openslide(shared_data: Path, tmp_path: Path) -> None:
    """A real Aperio slide with label and macro images: the JSON holds only the allow-listed
    fields and a full-resolution tile equals OpenSlide's own read of the region."""
    import openslide

    svs = shared_data / "slides" / "cmu-1-small-region.svs"
    (tmp_path / "slides" / "cmu").mkdir(parents=True)
    (tmp_path / "slides" / "cmu" / "result.json").write_text(json.dumps(_result("cmu", svs)))
    with TestClient(create_app(tmp_path, cache_mib=0)) as c:
        doc = c.get("/api/slides/cmu").json()
        assert (doc["width"], doc["height"]) == (2220, 2967)
        assert doc["mpp"] == pytest.approx([0.499, 0.499])
        text = json.dumps(doc).lower()
        assert "macro" not in text and "aperio" not in text and "cmu-1" not in text
        got = _jpeg(c.get("/dzi/cmu_files/12/2_3.jpeg").content)
    with openslide.OpenSlide(str(svs)) as osr:
        want = np.asarray(osr.read_region((507, 761), 0, (256, 256)).convert("RGB"), np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 4.0


# --------------------------------------------------------------------------------------------
# Single-level slides: overview levels from a bounded-memory overview, built once
# --------------------------------------------------------------------------------------------


def _single_results(base: Path, slide: Path, sid: str = "one") -> Path:
    (base / "slides" / sid).mkdir(parents=True)
    (base / "slides" / sid / "result.json").write_text(json.dumps(_result(sid, slide)))
    return base


def test_every_level_of_a_real_single_level_svs(shared_data: Path, tmp_path: Path) -> None:
    """cmu-1-small-region.svs has one level (2220 x 2967), read by cuCIM: every tile of every
    Deep Zoom level is served and equals the slide area-averaged independently (OpenSlide's
    read of the whole image, block means in numpy, white past the edge as the viewer pads)."""
    import openslide

    svs = shared_data / "slides" / "cmu-1-small-region.svs"
    with openslide.OpenSlide(str(svs)) as osr:
        assert osr.level_count == 1
        image = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"), np.float64)
    dz = DeepZoom(2220, 2967)
    # ds 8: the first level whose tile would read more than 4 x 4 slide pixels per tile pixel
    overview_base = dz.max_level - 3
    results = _single_results(tmp_path / "results", svs, "cmu")
    with TestClient(create_app(results, cache_mib=0)) as c:
        tiles: TileService = c.app.state.viewer.tiles  # type: ignore[attr-defined]
        for level in range(dz.n_levels):
            cols, rows = dz.tile_counts(level)
            for col in range(cols):
                for row in range(rows):
                    r = c.get(f"/dzi/cmu_files/{level}/{col}_{row}.jpeg")
                    assert r.status_code == 200, (level, col, row, r.text)
                    t = dz.tile(level, col, row)
                    (x0, y0), (w, h), ds = t.location, t.size, t.downsample
                    want = block_mean(image, x0, y0, x0 + w * ds, y0 + h * ds, ds)
                    got = _jpeg(r.content)
                    assert got.shape == want.shape
                    # As close as JPEG-encoding the true tile itself gets (+1 for rounding).
                    jpeg_only = np.abs(_jpeg(_encode(want)) - want).mean()
                    assert np.abs(got - want).mean() < jpeg_only + 1.0, (level, col, row)
                    # Before JPEG: the two JPEG decoders and Pillow's fixed-point box filter
                    # differ by at most 1, and each halving in the overview rounds to uint8
                    # once more (<= 0.5 each).
                    raw = tiles.pixels(svs, level, col, row).astype(np.float64)
                    halvings = max(0, overview_base - level)
                    assert np.abs(raw - want).max() <= 1 + 0.5 * halvings, (level, col, row)
        # The home view's coarse levels are the slide, not white (the page was blank).
        home = _jpeg(c.get("/dzi/cmu_files/8/0_0.jpeg").content)
        assert np.abs(home - 255).mean() > 20
        assert tiles.overviews.built == 1  # every overview level from one build
    stored = list((results / "viewer-cache").iterdir())
    assert len(stored) == 1 and (stored[0] / "overview.json").is_file()


UNIFORM = (1500, 1000)


def _uniform_single_level(path: Path, colour: tuple[int, int, int]) -> Path:
    import tifffile

    img = np.empty((UNIFORM[1], UNIFORM[0], 3), np.uint8)
    img[...] = colour
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", metadata=None)
    return path


def _is_uniform(got: np.ndarray, colour: tuple[int, int, int], level: int) -> bool:
    """Whether Deep Zoom tile (0, 0) of ``level`` of a uniform slide is ``colour`` averaged
    with white where its pixels reach past the slide (level 0 is one pixel over 2048 x 2048)."""
    dz = DeepZoom(*UNIFORM)
    (w, h), ds = dz.tile(level, 0, 0).size, dz.downsample(level)
    want = block_mean(np.full((UNIFORM[1], UNIFORM[0], 3), colour), 0, 0, w * ds, h * ds, ds)
    return got.shape == want.shape and bool(np.abs(got - want).max() <= 1)


def test_overview_is_kept_and_rebuilt_when_the_slide_changes(tmp_path: Path) -> None:
    """The overview is built once and found again by a new viewer; a slide rewritten in place
    (new size/mtime fingerprint) gets a new overview and the old one is removed."""
    slide = _uniform_single_level(tmp_path / "one.tif", (200, 40, 90))
    cache = tmp_path / "cache"
    first = TileService(cache_bytes=0, overview_dir=cache)
    assert _is_uniform(first.pixels(slide, 0, 0, 0), (200, 40, 90), 0)
    assert first.overviews.built == 1
    first.close()
    (only,) = cache.iterdir()

    again = TileService(cache_bytes=0, overview_dir=cache)
    assert _is_uniform(again.pixels(slide, 3, 0, 0), (200, 40, 90), 3)
    assert again.overviews.built == 0 and list(cache.iterdir()) == [only]
    again.close()

    _uniform_single_level(slide, (10, 220, 30))
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime, surely
    changed = TileService(cache_bytes=0, overview_dir=cache)
    assert _is_uniform(changed.pixels(slide, 0, 0, 0), (10, 220, 30), 0)
    assert changed.overviews.built == 1
    (rebuilt,) = cache.iterdir()
    assert rebuilt != only
    changed.close()


def test_a_slide_rewritten_while_the_viewer_runs_is_read_again(tmp_path: Path) -> None:
    slide = _uniform_single_level(tmp_path / "one.tif", (200, 40, 90))
    service = TileService(cache_bytes=0, overview_dir=tmp_path / "cache")
    assert _is_uniform(service.pixels(slide, 11, 0, 0), (200, 40, 90), 11)  # from the slide
    assert _is_uniform(service.pixels(slide, 0, 0, 0), (200, 40, 90), 0)  # from the overview
    _uniform_single_level(slide, (10, 220, 30))
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _is_uniform(service.pixels(slide, 11, 0, 0), (10, 220, 30), 11)
    assert _is_uniform(service.pixels(slide, 0, 0, 0), (10, 220, 30), 0)
    service.close()


def test_an_interrupted_overview_build_leaves_nothing_that_looks_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncotrace.workflows._viewer import _tiles  # private: the overview writer

    slide = _uniform_single_level(tmp_path / "one.tif", (120, 60, 150))
    cache = tmp_path / "cache"
    real = _tiles.write_overview

    def dies_half_way(slide_: object, dz: DeepZoom, base: int, folder: Path) -> None:
        (folder / "level-0.npy").write_bytes(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_tiles, "write_overview", dies_half_way)
    service = TileService(cache_bytes=0, overview_dir=cache)
    with pytest.raises(OSError, match="No space"):
        service.tile(slide, 0, 0, 0)
    assert list(cache.iterdir()) == []  # no folder, finished or partial
    monkeypatch.setattr(_tiles, "write_overview", real)
    assert _is_uniform(service.pixels(slide, 0, 0, 0), (120, 60, 150), 0)
    service.close()


def test_an_unwritable_cache_folder_still_gets_overviews(tmp_path: Path) -> None:
    """Where the cache folder cannot be made (here its parent is a file, which stops root too,
    as a read-only results folder stops a user), overviews go to a temporary folder instead."""
    slide = _uniform_single_level(tmp_path / "one.tif", (90, 90, 200))
    blocked = tmp_path / "results-is-a-file"
    blocked.write_text("")
    service = TileService(cache_bytes=0, overview_dir=blocked / "viewer-cache")
    assert _is_uniform(service.pixels(slide, 0, 0, 0), (90, 90, 200), 0)
    where = service.overviews.root()
    assert not where.is_relative_to(blocked) and len(list(where.iterdir())) == 1
    service.close()
    assert not where.exists()  # the fallback folder was the service's own


#: Run in a fresh interpreter: the peak RSS (Linux's VmHWM, reset through clear_refs just
#: before) while one overview tile is rendered, over the RSS of the same process with the slide
#: already open, so imports and the reader's start-up are not counted. (getrusage's ru_maxrss
#: would not do: a child keeps its parent's peak across fork and exec, here pytest's.)
#: Prints "<peak - before in bytes> <tile mean R> <G> <B>".
_MEASURE = """
import sys, tempfile
from pathlib import Path
import numpy as np, psutil
from oncotrace.wsi import open_slide
from oncotrace.workflows._viewer._tiles import TileService
path, backend, level = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
service = TileService(
    cache_bytes=0,
    overview_dir=Path(tempfile.mkdtemp(dir=sys.argv[4])),
    opener=lambda p: open_slide(p, backend=backend, require_mpp=False),
)
service.info(path)
with service.pool.lease(path) as slide:
    slide.read_region((0, 0), 0, (64, 64))
Path("/proc/self/clear_refs").write_text("5")
before = psutil.Process().memory_info().rss
tile = service.pixels(path, level, 0, 0)
status = Path("/proc/self/status").read_text().splitlines()
peak = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
print(peak - before, *tile.reshape(-1, 3).mean(axis=0))
"""
#: 8200 x 8200, the size of the report: Deep Zoom level 0 was a read of 16384 x 16384 slide
#: pixels (measured: +6.0 GiB through OpenSlide, a 404 through cuCIM).
LARGE = (8200, 8200)
#: The slide's own pixels are 8200^2 x 3 B = 192 MiB; staying under this shows the slide was
#: never in memory whole. Measured: +32 MiB (cuCIM), +80 MiB (OpenSlide, whose own tile cache
#: is 32 MiB of it).
PEAK_BOUND_MIB = 128


@pytest.fixture(scope="module")
def large_single_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.workflows.viewer_fixtures import write_single_level_tiff

    return write_single_level_tiff(tmp_path_factory.mktemp("large") / "large.tif", LARGE)


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_overview_tile_of_a_large_single_level_slide_has_bounded_memory(
    large_single_level: Path, backend: str, tmp_path: Path
) -> None:
    """The first overview tile builds the overview (reading the whole slide once) within a
    fixed memory bound, and shows the slide: its one pixel is the slide's mean colour."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(large_single_level), backend, "0", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    extra, *mean = (float(v) for v in out.stdout.split())
    assert extra < PEAK_BOUND_MIB * 2**20, f"{extra / 2**20:.0f} MiB"
    # Level 0 is one pixel over 16384 x 16384 level-0 px: the slide's mean, then white. The
    # planted pattern is separable (viewer_fixtures.gradient_tile), so its mean is exact.
    w, h = LARGE
    xs, ys = np.arange(w), np.arange(h)
    odd_x, odd_y = ((xs // 512) % 2).mean(), ((ys // 512) % 2).mean()
    planted = np.array(
        [
            (xs * 255 // w).mean(),
            (ys * 255 // h).mean(),
            200 * (odd_x * (1 - odd_y) + (1 - odd_x) * odd_y),
        ]
    )
    fraction = w * h / 16384**2
    want = fraction * planted + (1 - fraction) * 255
    # JPEG (quality 90) barely moves a slide-wide mean; 11 halvings round to uint8 on top.
    assert np.abs(np.asarray(mean) - want).max() < 2, (mean, want)
