"""The viewer end to end in headless Chromium: case list, slide view, ultrasound view.

Drives Debian's ``chromium`` through Playwright's Python API (``executable_path``; no Playwright
browser download) against the real server on a small results folder with planted contents
(:mod:`tests.workflows.viewer_fixtures`). Assertions compare the DOM, the viewer's state and the
HTTP responses with what the fixture planted: probabilities, the attention grid's level-0
rectangle, the slide size and µm/px, the landmarks in ``registration.json``.

Missing Chromium, Playwright or OpenSeadragon fails these tests (never skips): install with
``apt-get install -y chromium``, ``pip install playwright`` and ``oncotrace viewer-setup``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.workflows.viewer_fixtures import (
    MPP,
    PLANTED_ERROR,
    SIZE_PX,
    TILE_PX,
    ViewerResults,
    build_viewer_results,
)

#: Debian's package; ``ONCOTRACE_CHROMIUM`` may name another Chromium binary.
CHROMIUM = os.environ.get("ONCOTRACE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "Fix: `apt-get install -y chromium` (Debian's package; or set ONCOTRACE_CHROMIUM to a "
    "Chromium binary) and `pip install playwright` — no `playwright install` is needed."
)
VIEWPORT = {"width": 1100, "height": 760}
WAIT_MS = 30_000
#: DeepZoom levels: the deepest one is the full-resolution image (ceil(log2(longest side))).
MAX_DZ_LEVEL = math.ceil(math.log2(max(SIZE_PX)))
DZ_TILE = re.compile(r"/dzi/(?P<sid>[^/]+)_files/(?P<level>\d+)/(?P<col>\d+)_(?P<row>\d+)\.jpeg$")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> ViewerResults:
    return build_viewer_results(tmp_path_factory.mktemp("viewer-results"))


@pytest.fixture(scope="module")
def base_url(results: ViewerResults) -> Iterator[str]:
    from oncotrace.workflows import openseadragon_dir, start_server

    try:
        openseadragon_dir()
    except FileNotFoundError as exc:
        pytest.fail(f"the slide view needs OpenSeadragon: {exc}")

    server = start_server(results.results_dir, port=0)
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"Playwright's Python package is not installed ({exc}). {INSTALL_HINT}")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}. {INSTALL_HINT}")
    pw = sync_playwright().start()
    try:
        try:
            chromium = pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
        except PlaywrightError as exc:
            pytest.fail(f"{CHROMIUM} did not start under Playwright: {exc}. {INSTALL_HINT}")
        yield chromium
        chromium.close()
    finally:
        pw.stop()


@dataclass
class Traffic:
    """Every response (URL, status) and failed request the page saw, and its script errors."""

    responses: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def tiles(self, since: int = 0) -> list[tuple[int, int]]:
        """(DeepZoom level, HTTP status) of the tile responses after the first ``since``."""
        out = []
        for url, status in self.responses[since:]:
            m = DZ_TILE.search(url)
            if m:
                out.append((int(m["level"]), status))
        return out


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[tuple[Any, Traffic]]:
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    traffic = Traffic()
    pg.on("response", lambda r: traffic.responses.append((r.url, r.status)))
    pg.on("requestfailed", lambda r: traffic.failed.append((r.url, r.failure or "")))
    pg.on("pageerror", lambda e: traffic.errors.append(str(e)))
    try:
        yield pg, traffic
    finally:
        pg.screenshot(path=str(tmp_path / "last.png"))
        context.close()
    assert not traffic.errors, f"script errors in the page: {traffic.errors}"
    # The viewer cancels tile requests it no longer needs when the view moves on: not failures.
    failed = [f for f in traffic.failed if "ERR_ABORTED" not in f[1]]
    assert not failed, f"requests that failed: {failed}"


def _three_significant(value: float) -> str:
    """``value`` to 3 significant digits, as a colour bar's end should read: thousands commas,
    no trailing zeros (6533.3335 -> "6,530", 0.012345 -> "0.0123")."""
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(float(f"{value:.3g}")))))
    text = f"{float(f'{value:.3g}'):,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def test_three_significant_by_hand() -> None:
    cases = {6533.3335: "6,530", 0.012345: "0.0123", 1.0: "1", 0.0: "0", 999.7: "1,000"}
    assert {v: _three_significant(v) for v in cases} == cases
    assert _three_significant(-42.42) == "-42.4" and _three_significant(123456.0) == "123,000"


def _colorbar_shows(pg: Any, ov: dict[str, Any]) -> None:
    """The colour bar's label is the overlay's label and unit, its ends 3 significant digits."""
    assert pg.locator("#colorbar-label").inner_text() == (
        ov["label"] + (f" ({ov['unit']})" if ov.get("unit") else "")
    )
    assert pg.locator("#colorbar-max").inner_text() == _three_significant(ov["vmax"])
    assert pg.locator("#colorbar-min").inner_text() == _three_significant(ov["vmin"])


def _ready(pg: Any) -> None:
    """Wait until the page says it has rendered (or shows an error: fail with its text)."""
    pg.wait_for_function("() => document.body.dataset.ready === '1' || document.body.dataset.error")
    error = pg.locator("#error")
    assert error.is_hidden(), f"the page shows an error: {error.inner_text()}"


def _get_json(url: str) -> Any:
    """The server's JSON, fetched outside the page."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=WAIT_MS / 1000) as response:
        return json.loads(response.read())


def _wait_tiles_loaded(pg: Any) -> None:
    pg.wait_for_function("() => window.oncotrace.slide && window.oncotrace.slide.getFullyLoaded()")


# --------------------------------------------------------------------------------------------
# Case list
# --------------------------------------------------------------------------------------------


def _row_ids(pg: Any) -> list[str]:
    return pg.eval_on_selector_all(
        "[data-testid=case-row]", "rows => rows.map(r => r.dataset.slideId)"
    )


def test_case_list_shows_predictions_errors_and_sorts(
    page: tuple[Any, Traffic], base_url: str, results: ViewerResults, tmp_path: Path
) -> None:
    pg, traffic = page
    pg.goto(base_url + "/")
    _ready(pg)
    assert (base_url + "/api/cases", 200) in traffic.responses

    rows = pg.locator("[data-testid=case-row]")
    assert rows.count() == len(results.slide_ids) + 1
    for sid in results.slide_ids:
        row = pg.locator(f"[data-testid=case-row][data-slide-id='{sid}']")
        assert row.get_attribute("data-status") == "done"
        assert row.locator("[data-testid=predicted-label]").inner_text() == results.labels[sid]
        items = row.locator("[data-testid=topk-item]")
        shown = [
            (items.nth(i).get_attribute("data-class"), float(items.nth(i).get_attribute("data-p")))
            for i in range(items.count())
        ]
        planted = sorted(results.probabilities[sid].items(), key=lambda kv: -kv[1])
        assert [c for c, _ in shown] == [c for c, _ in planted]
        assert [p for _, p in shown] == pytest.approx([p for _, p in planted], abs=1e-9)
        # the ultrasound view is linked where the fixture wrote one
        assert row.locator("[data-testid=us-link]").count() == 1

    error_row = pg.locator(f"[data-testid=case-row][data-slide-id='{results.error_id}']")
    assert error_row.get_attribute("data-status") == "error"
    error_text = error_row.locator("[data-testid=case-error]").inner_text()
    for key in ("stage", "error_type", "message"):
        assert PLANTED_ERROR[key] in error_text
    assert error_row.locator("[data-testid=us-link]").count() == 0

    def by_p(cls: str, reverse: bool = True) -> list[str]:
        ranked = sorted(results.slide_ids, key=lambda s: results.probabilities[s][cls])
        return [*(reversed(ranked) if reverse else ranked), results.error_id]

    # Default sort: p(last class) high to low, failed slides last.
    assert pg.locator("#sort-class").input_value() == "malignant"
    assert _row_ids(pg) == by_p("malignant")
    pg.select_option("#sort-class", "benign")
    assert _row_ids(pg) == by_p("benign")
    pg.select_option("#sort-dir", "asc")
    assert _row_ids(pg) == by_p("benign", reverse=False)
    pg.screenshot(path=str(tmp_path / "cases-sorted-benign-asc.png"), full_page=True)

    # score threshold on p(benign): only the planted benign slide passes 0.5 (failures stay listed)
    pg.fill("#min-score", "0.5")
    benign = [s for s in results.slide_ids if results.probabilities[s]["benign"] >= 0.5]
    assert _row_ids(pg) == [*benign, results.error_id]
    pg.fill("#min-score", "0")
    pg.select_option("#status-filter", "error")
    assert _row_ids(pg) == [results.error_id]
    pg.select_option("#status-filter", "all")
    pg.fill("#filter", "truncated jpeg")
    assert _row_ids(pg) == [results.error_id]
    pg.fill("#filter", results.slide_ids[1])
    assert _row_ids(pg) == [results.slide_ids[1]]
    pg.screenshot(path=str(tmp_path / "cases-filtered.png"), full_page=True)


# --------------------------------------------------------------------------------------------
# Slide view
# --------------------------------------------------------------------------------------------


def _overlay_rect_level0(pg: Any, name: str) -> list[float]:
    """The overlay's (x, y, width, height) on the slide in level-0 px, from OpenSeadragon."""
    return pg.evaluate(
        """(name) => {
            const b = window.oncotrace.items.get(name).getBounds(true);
            const w = window.oncotrace.info.width;
            return [b.x * w, b.y * w, b.width * w, b.height * w];
        }""",
        name,
    )


def _opacity(pg: Any, name: str) -> float:
    return pg.evaluate("(n) => window.oncotrace.items.get(n).getOpacity()", name)


def test_slide_view_tiles_zoom_overlays_opacity_position(
    page: tuple[Any, Traffic], base_url: str, results: ViewerResults, tmp_path: Path
) -> None:
    pg, traffic = page
    sid = results.slide_ids[1]
    registration = json.loads(
        (results.results_dir / "slides" / sid / "ultrasound" / "registration.json").read_text()
    )
    assert registration  # the fixture wrote the ultrasound view this slide links to

    # open the slide from the case list, as a user would
    pg.goto(base_url + "/")
    _ready(pg)
    pg.click(f"[data-testid=case-row][data-slide-id='{sid}'] a.slide-link")
    pg.wait_for_url(f"**/slide/{sid}")
    _ready(pg)
    _wait_tiles_loaded(pg)
    pg.screenshot(path=str(tmp_path / "slide-home.png"))

    assert (f"{base_url}/dzi/{sid}.dzi", 200) in traffic.responses
    home_tiles = traffic.tiles()
    assert len(home_tiles) >= 4, f"only {len(home_tiles)} tiles requested at the home view"
    assert {status for _, status in home_tiles} == {200}
    home_level = max(level for level, _ in home_tiles)
    assert home_level < MAX_DZ_LEVEL, "the home view should not need full resolution"

    # predictions panel
    pred = pg.locator("[data-testid=prediction][data-task=label]")
    assert pred.locator("[data-testid=predicted-label]").inner_text() == results.labels[sid]
    assert pg.locator("#us-link").is_visible()

    # --- the scale bar and the mouse position at the home view, against the page geometry ---
    box = pg.locator("#osd").bounding_box()
    assert box is not None
    # Home fits the whole slide in the viewer, centred: its on-screen width is set by whichever
    # side of the viewer is tighter.
    shown_w = min(box["width"], box["height"] * SIZE_PX[0] / SIZE_PX[1])
    level0_per_screen_px = SIZE_PX[0] / shown_w
    bar = pg.locator("#scalebar")
    bar_um = float(bar.get_attribute("data-um"))
    bar_px = float(bar.get_attribute("data-px"))
    assert bar_um / bar_px == pytest.approx(MPP * level0_per_screen_px, rel=0.01)
    mantissa = bar_um / 10 ** math.floor(math.log10(bar_um))
    assert round(mantissa, 6) in (1, 2, 5)
    assert bar.locator(".label").inner_text().replace("\u00a0", " ") in (
        f"{bar_um:g} µm",
        f"{bar_um / 1000:g} mm",
    )

    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    pg.mouse.move(cx, cy)
    pos = pg.locator("#position")
    pg.wait_for_function("() => document.getElementById('position').dataset.inside === '1'")
    x_px, y_px = float(pos.get_attribute("data-x-px")), float(pos.get_attribute("data-y-px"))
    tolerance = 2 * level0_per_screen_px  # a pixel or two of rounding in the page layout
    assert x_px == pytest.approx(SIZE_PX[0] / 2, abs=tolerance)
    assert y_px == pytest.approx(SIZE_PX[1] / 2, abs=tolerance)
    pg.mouse.move(cx + 100, cy - 50)
    pg.wait_for_function(f"() => +document.getElementById('position').dataset.xPx > {x_px + 1}")
    x2, y2 = float(pos.get_attribute("data-x-px")), float(pos.get_attribute("data-y-px"))
    assert x2 - x_px == pytest.approx(100 * level0_per_screen_px, rel=0.02)
    assert y2 - y_px == pytest.approx(-50 * level0_per_screen_px, rel=0.02)
    assert float(pos.get_attribute("data-x-um")) == pytest.approx(x2 * MPP, rel=1e-9)
    assert float(pos.get_attribute("data-y-um")) == pytest.approx(y2 * MPP, rel=1e-9)
    text = pos.inner_text().replace(",", "")
    assert f"x {math.floor(x2)}" in text and "px" in text
    assert f"x {x2 * MPP:.1f}" in text and "µm" in text

    # --- zoom in to the full resolution: deeper-level tiles load, all of them succeed ---
    seen = len(traffic.responses)
    pg.evaluate(
        "() => { const v = window.oncotrace.viewer; v.viewport.zoomTo(v.viewport.getMaxZoom(), null, true); }"
    )
    pg.wait_for_timeout(100)  # let the viewer schedule the new level before asking if it loaded
    _wait_tiles_loaded(pg)
    deep = traffic.tiles(seen)
    assert deep, "zooming in requested no tiles"
    assert {status for _, status in deep} == {200}
    assert max(level for level, _ in deep) == MAX_DZ_LEVEL > home_level
    deep_bar = float(bar.get_attribute("data-um")) / float(bar.get_attribute("data-px"))
    assert deep_bar < bar_um / bar_px / 2, "the scale bar did not follow the zoom"
    pg.screenshot(path=str(tmp_path / "slide-zoomed.png"))
    pg.evaluate("() => window.oncotrace.viewer.viewport.goHome(true)")

    # --- overlays: the attention grid sits on its level-0 rectangle ---
    assert pg.evaluate("() => window.oncotrace.active") == "attention"
    assert (f"{base_url}/overlay/{sid}/attention.png", 200) in traffic.responses
    # The planted tiles start at (0, 0) on a 224-px grid; the heatmap's grid spans the whole
    # slide in whole cells (cells without a tile are NaN, drawn transparent).
    grid_w = math.ceil(SIZE_PX[0] / TILE_PX) * TILE_PX
    grid_h = math.ceil(SIZE_PX[1] / TILE_PX) * TILE_PX
    assert _overlay_rect_level0(pg, "attention") == pytest.approx([0, 0, grid_w, grid_h], abs=0.5)
    assert _opacity(pg, "attention") == pytest.approx(0.5)
    colorbar = pg.locator("#colorbar")
    attention_bar = colorbar.get_attribute("src")
    assert attention_bar == f"/overlay/{sid}/attention/colorbar.png"
    assert "attention" in pg.locator("#colorbar-label").inner_text()

    with pg.expect_response(f"{base_url}/overlay/{sid}/immune-density.png") as immune:
        pg.check("[data-testid=overlay-immune-density]")
    assert immune.value.status == 200
    pg.wait_for_function(
        "() => { const i = window.oncotrace.items.get('immune-density'); return i && i.getOpacity() > 0; }"
    )
    assert _opacity(pg, "attention") == 0
    assert _opacity(pg, "immune-density") == pytest.approx(0.5)
    assert colorbar.get_attribute("src") == f"/overlay/{sid}/immune-density/colorbar.png"
    assert colorbar.get_attribute("src") != attention_bar
    assert "attention" not in pg.locator("#colorbar-label").inner_text()
    overlays = {o["name"]: o for o in _get_json(f"{base_url}/api/slides/{sid}")["overlays"]}
    density = overlays["immune-density"]
    assert density["unit"] == "cells/mm²"
    assert float(f"{density['vmax']:.3g}") != density["vmax"]  # so rounding has work to do
    _colorbar_shows(pg, density)
    pg.wait_for_function("() => document.getElementById('colorbar').complete")
    assert colorbar.evaluate("img => img.naturalWidth") > 0
    pg.screenshot(path=str(tmp_path / "slide-immune-overlay.png"))

    # --- opacity: keyboard on the slider moves the active overlay's opacity ---
    slider = pg.locator("#opacity")
    slider.focus()
    for _ in range(20):
        pg.keyboard.press("ArrowLeft")
    assert slider.input_value() == "30"
    assert _opacity(pg, "immune-density") == pytest.approx(0.3)
    assert pg.locator("#opacity-value").inner_text().startswith("30")
    pg.screenshot(path=str(tmp_path / "slide-opacity-30.png"))

    # --- "none" hides every overlay and the colour bar ---
    pg.check("[data-testid=overlay-none]")
    assert _opacity(pg, "immune-density") == 0
    assert _opacity(pg, "attention") == 0
    assert pg.locator("#colorbar-box").is_hidden()
    # back to attention: the remembered opacity applies, no second download of the PNG
    n_attention = traffic.responses.count((f"{base_url}/overlay/{sid}/attention.png", 200))
    pg.check("[data-testid=overlay-attention]")
    pg.wait_for_function("() => window.oncotrace.items.get('attention').getOpacity() > 0")
    assert _opacity(pg, "attention") == pytest.approx(0.3)
    assert traffic.responses.count((f"{base_url}/overlay/{sid}/attention.png", 200)) == n_attention
    pg.screenshot(path=str(tmp_path / "slide-attention-30.png"))


# --------------------------------------------------------------------------------------------
# Ultrasound view
# --------------------------------------------------------------------------------------------


def test_ultrasound_view_frame_overlay_landmarks_tre(
    page: tuple[Any, Traffic], base_url: str, results: ViewerResults, tmp_path: Path
) -> None:
    pg, traffic = page
    sid = results.slide_ids[0]
    registration = json.loads(
        (results.results_dir / "slides" / sid / "ultrasound" / "registration.json").read_text()
    )
    us = registration["ultrasound"]
    points = registration["landmarks"]["points"]
    spacing = us["spacing_mm_xy"]

    pg.goto(f"{base_url}/slide/{sid}")
    _ready(pg)
    pg.click("#us-link")
    pg.wait_for_url(f"**/ultrasound/{sid}")
    _ready(pg)
    pg.screenshot(path=str(tmp_path / "ultrasound.png"))

    assert (f"{base_url}/us/{sid}/frame.png", 200) in traffic.responses
    frame = pg.locator("#us-frame")
    assert frame.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(us["size_px"])
    overlay = pg.locator("#us-overlay")
    assert overlay.is_visible()
    first_overlay = overlay.get_attribute("src")
    assert (base_url + first_overlay, 200) in traffic.responses
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(us["size_px"])

    # the millimetre scale bar: its drawn CSS width is its length over the frame's mm/px (from
    # registration.json) times the CSS px per frame px the page drew the frame at
    scalebar = pg.locator("#us-scalebar")
    assert scalebar.is_visible()
    bar_mm = float(scalebar.get_attribute("data-mm"))
    shown = frame.bounding_box()
    drawn = pg.locator("#us-scalebar .bar").bounding_box()
    assert shown is not None and drawn is not None
    css_per_frame_px = shown["width"] / us["size_px"][0]
    assert drawn["width"] == pytest.approx(bar_mm / spacing[0] * css_per_frame_px, abs=0.5)
    assert 20 < drawn["width"] <= 120
    mantissa = bar_mm / 10 ** math.floor(math.log10(bar_mm))
    assert round(mantissa, 6) in (1, 2, 5)
    assert scalebar.locator(".label").inner_text().replace("\u00a0", " ") in (
        f"{bar_mm:g} mm",
        f"{bar_mm * 1000:g} µm",
    )
    assert shown["x"] <= drawn["x"] and drawn["x"] + drawn["width"] <= shown["x"] + shown["width"]
    assert shown["y"] <= drawn["y"] and drawn["y"] + drawn["height"] <= shown["y"] + shown["height"]
    # the colour bar of the first overlay, against the server's JSON
    doc = _get_json(f"{base_url}/api/ultrasound/{sid}")
    _colorbar_shows(pg, doc["overlays"][0])

    # landmarks: one marker per point, roles as in the file, at ultrasound_mm / spacing
    markers = pg.locator("#us-landmarks [data-testid=landmark]")
    assert markers.count() == len(points)
    for role in ("fit", "holdout"):
        want = sum(p["role"] == role for p in points)
        assert pg.locator(f"#us-landmarks .landmark[data-role={role}]").count() == want
    assert pg.locator("#us-landmarks .landmark[data-role=holdout]").count() > 0
    for p in points:
        circle = pg.locator(f"#us-landmarks .landmark[data-id='{p['id']}'] circle")
        cx, cy = float(circle.get_attribute("cx")), float(circle.get_attribute("cy"))
        assert cx == pytest.approx(p["ultrasound_mm"][0] / spacing[0] + 0.5, abs=1e-3)
        assert cy == pytest.approx(p["ultrasound_mm"][1] / spacing[1] + 0.5, abs=1e-3)
    fit_fill = pg.locator("#us-landmarks .landmark[data-role=fit] circle").first.evaluate(
        "c => getComputedStyle(c).fill"
    )
    holdout_fill = pg.locator("#us-landmarks .landmark[data-role=holdout] circle").first.evaluate(
        "c => getComputedStyle(c).fill"
    )
    assert fit_fill != holdout_fill, "fit and hold-out landmarks must look different"

    # TRE report against registration.json
    report = registration["report"]
    table = pg.locator("#tre-report")

    def cell(key: str) -> str:
        return table.locator(f"tr[data-key={key}] td").inner_text()

    assert cell("model").startswith(
        registration["model"] if registration["model"] != "tps" else "thin-plate"
    )
    assert f"{report['chosen']['loo_tre_mm']:.3f}".rstrip("0").rstrip(".") in cell("loo_tre_mm")
    holdout = report["holdout_tre_mm"]
    assert f"{holdout['mean']:.3f}".rstrip("0").rstrip(".") in cell("holdout_tre_mm")
    assert "mm" in cell("holdout_tre_mm")
    assert cell("landmarks") == f"{report['n_fit']} fit, {report['n_holdout']} hold-out"
    assert f"{report['scale_mm_per_mm']:.4f}".rstrip("0").rstrip(".") in cell("scale")

    # overlay toggle and opacity
    pg.check("[data-testid=overlay-none]")
    assert overlay.is_hidden()
    assert pg.locator("#colorbar-box").is_hidden()
    with pg.expect_response(f"{base_url}/us/{sid}/overlay/immune-density.png") as second:
        pg.check("[data-testid=overlay-immune-density]")
    assert second.value.status == 200
    pg.wait_for_function("() => !document.getElementById('us-overlay').hidden")
    assert overlay.get_attribute("src") != first_overlay
    assert pg.locator("#colorbar").get_attribute("src") == (
        f"/us/{sid}/overlay/immune-density/colorbar.png"
    )
    density = next(o for o in doc["overlays"] if o["name"] == "immune-density")
    assert density["unit"] == "cells/mm²"
    _colorbar_shows(pg, density)
    slider = pg.locator("#opacity")
    slider.focus()
    for _ in range(10):
        pg.keyboard.press("ArrowRight")
    assert slider.input_value() == "70"
    assert float(overlay.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.7)
    pg.screenshot(path=str(tmp_path / "ultrasound-immune-70.png"))


# --------------------------------------------------------------------------------------------
# OpenSeadragon assets (no browser, no network: a stand-in npm)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bare_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The asset lookup pointed at a package folder with only the manifests, and an empty
    install folder, whatever is installed on this machine."""
    from oncotrace.workflows._viewer import _assets  # private: repoints its _PACKAGE_DIR

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name in ("package.json", "package-lock.json"):
        (pkg / name).write_bytes((_assets.package_dir() / name).read_bytes())
    monkeypatch.setattr(_assets, "_PACKAGE_DIR", pkg)
    monkeypatch.setenv("ONCOTRACE_VIEWER_DIR", str(tmp_path / "install"))
    return tmp_path


def _fake_npm(path: Path, version: str, *, fail: bool = False) -> Path:
    """An executable that does what `npm ci` would leave behind for OpenSeadragon ``version``."""
    body = (
        "echo 'npm ERR! network request failed' >&2; exit 1"
        if fail
        else f"""set -e
test "$1" = ci
mkdir -p node_modules/openseadragon/build/openseadragon/images
echo '{{"name": "openseadragon", "version": "{version}"}}' > node_modules/openseadragon/package.json
echo '/* stand-in */' > node_modules/openseadragon/build/openseadragon/openseadragon.min.js"""
    )
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_pinned_version_matches_package_json() -> None:
    from oncotrace.workflows._viewer._assets import (  # private: setup's manifests and pin
        package_dir,
        pinned_openseadragon_version,
    )

    manifest = json.loads((package_dir() / "package.json").read_text())
    # An exact pin (no ^ or ~): the lock file and package.json name the same release.
    assert manifest["dependencies"]["openseadragon"] == pinned_openseadragon_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_openseadragon_version())


def test_missing_openseadragon_names_the_setup_command(bare_assets: Path) -> None:
    from oncotrace.workflows import openseadragon_dir

    with pytest.raises(FileNotFoundError, match="oncotrace viewer-setup") as info:
        openseadragon_dir()
    assert str(bare_assets / "install") in str(info.value)


def test_setup_viewer_installs_the_pinned_version_atomically(bare_assets: Path) -> None:
    from oncotrace.workflows import openseadragon_dir, setup_viewer
    from oncotrace.workflows._viewer._assets import (  # private: where setup installs, the pin
        install_dir,
        pinned_openseadragon_version,
    )

    want = pinned_openseadragon_version()
    target = install_dir()
    # npm fails: nothing that looks installed is left behind, and the error says what ran
    with pytest.raises(RuntimeError, match="network request failed"):
        setup_viewer(npm=str(_fake_npm(bare_assets / "npm-fail", want, fail=True)))
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]
    # the registry served another version: refused
    with pytest.raises(RuntimeError, match=f"not the pinned {re.escape(want)}"):
        setup_viewer(npm=str(_fake_npm(bare_assets / "npm-old", "0.9.0")))
    assert not target.exists()
    # a good install lands in place and is what the viewer serves
    build = setup_viewer(npm=str(_fake_npm(bare_assets / "npm-ok", want)))
    assert build == target / "node_modules" / "openseadragon" / "build" / "openseadragon"
    assert (build / "openseadragon.min.js").is_file()
    assert json.loads((target / "package-lock.json").read_text())["packages"]
    assert openseadragon_dir() == build
    # up to date: npm is not run again (a missing npm would raise)
    assert setup_viewer(npm=str(bare_assets / "no-such-npm")) == build
    with pytest.raises(FileNotFoundError, match=r"Node\.js"):
        setup_viewer(npm=str(bare_assets / "no-such-npm"), force=True)


# --------------------------------------------------------------------------------------------
# A real single-level slide
# --------------------------------------------------------------------------------------------


def test_single_level_svs_home_view_shows_the_slide(
    browser: Any, shared_data: Path, tmp_path: Path
) -> None:
    """cmu-1-small-region.svs (one level, cuCIM) at the home view: every tile loads and the
    picture on screen is the slide (block means against OpenSlide's read; it was blank)."""
    import io

    import numpy as np
    import openslide
    from oncotrace.workflows import start_server
    from PIL import Image

    svs = shared_data / "slides" / "cmu-1-small-region.svs"
    with openslide.OpenSlide(str(svs)) as osr:
        width, height = osr.dimensions
        truth = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"), np.float64)
    folder = tmp_path / "results" / "slides" / "cmu"
    folder.mkdir(parents=True)
    doc = {"format": 1, "status": "done", "slide_id": "cmu", "path": str(svs), "tasks": {}}
    (folder / "result.json").write_text(json.dumps(doc))
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    traffic = Traffic()
    pg.on("response", lambda r: traffic.responses.append((r.url, r.status)))
    pg.on("pageerror", lambda e: traffic.errors.append(str(e)))
    server = start_server(tmp_path / "results", port=0)
    try:
        pg.goto(server.url.rstrip("/") + "/slide/cmu")
        _ready(pg)
        _wait_tiles_loaded(pg)
        tiles = traffic.tiles()
        assert len(tiles) >= 1 and all(status == 200 for _, status in tiles), tiles
        osd = pg.locator("#osd")
        box = osd.bounding_box()
        assert box is not None
        shot = np.asarray(Image.open(io.BytesIO(osd.screenshot())).convert("RGB"), np.float64)
    finally:
        server.stop()
        context.close()
    assert not traffic.errors, traffic.errors
    # Home fits the slide in the viewer, centred (as in the slide-view test above). Compare its
    # middle half (clear of the navigator and the scale bar) in 4 x 4 blocks.
    scale = shot.shape[1] / box["width"]  # screenshot px per CSS px
    shown_w = min(box["width"], box["height"] * width / height) * scale
    shown_h = shown_w * height / width
    left = (shot.shape[1] - shown_w) / 2
    top = (shot.shape[0] - shown_h) / 2
    on_screen, on_slide = [], []
    for i in range(4):
        for j in range(4):
            fx0, fx1 = 0.25 + 0.125 * j, 0.25 + 0.125 * (j + 1)
            fy0, fy1 = 0.25 + 0.125 * i, 0.25 + 0.125 * (i + 1)
            sx0, sx1 = round(left + fx0 * shown_w), round(left + fx1 * shown_w)
            sy0, sy1 = round(top + fy0 * shown_h), round(top + fy1 * shown_h)
            on_screen.append(shot[sy0:sy1, sx0:sx1].reshape(-1, 3).mean(axis=0))
            tx0, tx1 = round(fx0 * width), round(fx1 * width)
            ty0, ty1 = round(fy0 * height), round(fy1 * height)
            on_slide.append(truth[ty0:ty1, tx0:tx1].reshape(-1, 3).mean(axis=0))
    screen, slide = np.array(on_screen), np.array(on_slide)
    # A blank view is the viewer's black background (or white); the blocks differ from each
    # other by tens of levels, so a misplaced picture fails too.
    assert np.abs(screen - slide).mean() < 8, np.abs(screen - slide).mean(axis=1)
    assert np.abs(slide - slide.mean(axis=0)).mean() > 8  # the comparison has power


# --------------------------------------------------------------------------------------------
# The demo's own results
# --------------------------------------------------------------------------------------------


def test_demo_results_open_in_the_browser(
    browser: Any, demo_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a newcomer does after the README's first command: `oncotrace view DEMO/scores`,
    from another folder than the one the demo ran in (it ran with a relative --out)."""
    import csv

    from oncotrace.workflows import start_server

    monkeypatch.chdir(tmp_path)
    results = demo_run[0] / "scores"
    with open(results / "predictions.csv", newline="") as f:
        rows_csv = list(csv.DictReader(f))
    predicted = {r["slide_id"]: r["predicted_class"] for r in rows_csv}
    out_of_domain = {r["slide_id"]: r["ood"] == "True" for r in rows_csv}
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    traffic = Traffic()
    pg.on("response", lambda r: traffic.responses.append((r.url, r.status)))
    pg.on("pageerror", lambda e: traffic.errors.append(str(e)))
    server = start_server(results, port=0)
    try:
        base = server.url.rstrip("/")
        pg.goto(base + "/")
        _ready(pg)
        rows = pg.locator("[data-testid=case-row]")
        assert rows.count() == len(predicted)
        for sid, label in predicted.items():
            row = pg.locator(f"[data-testid=case-row][data-slide-id='{sid}']")
            assert row.locator("[data-testid=predicted-label]").inner_text() == label
            assert row.locator("[data-testid=ood-badge]").count() == int(out_of_domain[sid])
        pg.screenshot(path=str(tmp_path / "demo-cases.png"))

        sid = next(s for s, label in predicted.items() if label == "malignant")
        pg.locator(f"[data-testid=case-row][data-slide-id='{sid}'] a.slide-link").first.click()
        pg.wait_for_url(f"**/slide/{sid}")
        _ready(pg)
        _wait_tiles_loaded(pg)
        tiles = traffic.tiles()
        assert len(tiles) >= 4 and all(status == 200 for _, status in tiles)
        names = pg.locator("[data-testid=overlay-choices] input").evaluate_all(
            "els => els.map(e => e.value)"
        )
        assert {"attention", "immune-density"} <= set(names)
        pg.screenshot(path=str(tmp_path / "demo-slide.png"))

        pg.click("#us-link")
        pg.wait_for_url(f"**/ultrasound/{sid}")
        _ready(pg)
        assert (f"{base}/us/{sid}/frame.png", 200) in traffic.responses
        marks = json.loads((results / "slides" / sid / "ultrasound" / "landmarks.json").read_text())
        assert pg.locator("#us-landmarks [data-testid=landmark]").count() == len(marks["points"])
        assert "mm" in pg.locator("[data-testid=tre-report]").inner_text()
        pg.screenshot(path=str(tmp_path / "demo-ultrasound.png"))
        assert not traffic.errors, traffic.errors
    finally:
        server.stop()
        context.close()


def test_demo_results_moved_with_their_slides_still_show_tiles(
    browser: Any, demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The demo folder moved elsewhere (its recorded absolute slide paths gone): the viewer finds
    each slide again relative to the results folder."""
    import shutil

    from oncotrace.workflows import start_server

    original = demo_run[0]
    moved = tmp_path / "elsewhere" / "demo"
    moved.parent.mkdir()
    shutil.move(original, moved)
    context = browser.new_context(viewport=VIEWPORT)
    server = start_server(moved / "scores", port=0)
    try:
        sid = json.loads((moved / "scores" / "run.json").read_text())["slides"]
        sid = sorted(sid)[0]
        doc = json.loads((moved / "scores" / "slides" / sid / "result.json").read_text())
        assert not Path(doc["path"]).exists()  # the recorded absolute path is gone
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        traffic = Traffic()
        pg.on("response", lambda r: traffic.responses.append((r.url, r.status)))
        pg.goto(server.url.rstrip("/") + f"/slide/{sid}")
        _ready(pg)
        _wait_tiles_loaded(pg)
        tiles = traffic.tiles()
        assert len(tiles) >= 4 and all(status == 200 for _, status in tiles)
    finally:
        server.stop()
        context.close()
        shutil.move(moved, original)  # the session's demo folder, for the tests after this one
