"""The viewer's ASGI app (Starlette): pages, JSON APIs, Deep Zoom tiles and heatmap overlays.

Every slide id, overlay name and file comes from the :class:`ResultsIndex` whitelist; requests
for anything else — ``..``, encoded ``%2e%2e``, absolute paths, symlinks out of the results
folder, unknown ids or names, tiles outside the pyramid, non-numbers — get a JSON 404. Slide
pixels are read only through the Slide API (:mod:`wsi`), so label and macro images and raw
metadata are never reachable; the slide JSON holds size, mpp and level count only.

Endpoints are plain (synchronous) methods of :class:`Endpoints`: Starlette runs them in its thread
pool, so tile reads for concurrent requests overlap (the slide readers release the GIL while
decoding).
"""

from __future__ import annotations

import io
import ipaddress
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np
from numpy.typing import NDArray
from oncotrace.spatial import (
    DEFAULT_COLORMAP,
    Colormap,
    Heatmap,
    UltrasoundError,
    read_ultrasound,
    value_range,
)
from oncotrace.wsi import SlideError
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ._results import (
    Case,
    MappedOverlay,
    NotFoundError,
    ResultsIndex,
    SmallCache,
    file_key,
    load_heatmap,
    load_mapped,
    referenced_path,
    ultrasound_files,
)
from ._tiles import (
    DEFAULT_CACHE_MIB,
    OVERLAP,
    TILE_SIZE,
    VIEWER_CACHE_DIR,
    TileNotFoundError,
    TileService,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = {"cases": "index.html", "slide": "slide.html", "ultrasound": "ultrasound.html"}
COLORBAR_SIZE = (16, 256)  # (w, h) px; top = vmax
CMAP: Colormap = DEFAULT_COLORMAP  # the PNG overlays' map: one colour per value everywhere
#: Host names a loopback-bound server answers to (a DNS-rebinding page gets 400).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

_NOT_FOUND = (NotFoundError, TileNotFoundError, FileNotFoundError, SlideError, UltrasoundError)


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def colour_table(cmap: Colormap = CMAP) -> NDArray[np.uint8]:
    """(256, 3) uint8 colour table, built as ``spatial.render_overlay`` builds its own."""
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def colour_grid(
    grid: NDArray[np.float32], vmin: float, vmax: float, cmap: Colormap = CMAP
) -> NDArray[np.uint8]:
    """A heatmap grid as RGBA, one pixel per cell.

    Parameters
    ----------
    grid : (H, W) float ndarray; NaN cells become transparent.
    vmin, vmax : values at the two ends of the colour map (clipped beyond).

    Returns
    -------
    (H, W, 4) uint8 ndarray; alpha 255 on finite cells, 0 on NaN.
    """
    finite = np.isfinite(grid)
    span = vmax - vmin if vmax > vmin else 1.0
    level = np.clip((np.where(finite, grid, vmin) - vmin) / span, 0.0, 1.0)
    rgba = np.zeros((*grid.shape, 4), np.uint8)
    rgba[..., :3] = colour_table(cmap)[np.rint(level * 255).astype(np.intp)]
    rgba[..., 3] = np.where(finite, 255, 0)
    rgba[~finite, :3] = 0
    return rgba


def png_bytes(pixels: NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def colorbar_png(cmap: Colormap = CMAP) -> bytes:
    """A vertical colour bar, vmax at the top (the page labels its ends)."""
    w, h = COLORBAR_SIZE
    column = colour_table(cmap)[np.linspace(255, 0, h).round().astype(np.intp)]
    return png_bytes(np.repeat(column[:, None, :], w, axis=1))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _not_found(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=404)


def _guard(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Answer the 'not there' family of errors with a JSON 404 naming what is missing."""

    @wraps(fn)
    def wrapper(request: Request) -> Response:
        try:
            return fn(request)
        except _NOT_FOUND as exc:
            return _not_found(str(exc))

    return wrapper


def safe_file(base: Path, rel: str) -> Path:
    """``base / rel`` if it is a regular file inside ``base`` (symlinks followed), else
    :class:`NotFoundError`. Rejects absolute paths, ``..``, hidden names and NUL bytes."""
    pure = PurePosixPath(rel)
    if (
        not rel
        or "\x00" in rel
        or "\\" in rel
        or pure.is_absolute()
        or any(p in ("..", ".") or p.startswith(".") for p in pure.parts)
    ):
        raise NotFoundError(f"no file {rel!r}")
    root = base.resolve()
    try:
        target = (root / pure).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise NotFoundError(f"no file {rel!r}") from exc
    if not target.is_relative_to(root) or not target.is_file():
        raise NotFoundError(f"no file {rel!r}")
    return target


def _int(text: str, what: str) -> int:
    """A non-negative decimal integer from a URL segment (no signs, spaces or exponents)."""
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise NotFoundError(f"{what} {text!r} is not a tile index")
    return int(text)


def _url(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


#: Media types by suffix, so ES modules are served as JavaScript whatever the OS's MIME table says.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower()))


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewerConfig:
    """How the viewer serves a results folder.

    Attributes
    ----------
    results_dir : the ``oncotrace score`` output folder.
    cache_mib : tile-cache budget in MiB of encoded JPEG; 0 disables it.
    max_open_slides : open slide handles kept.
    allowed_hosts : Host header names accepted (None: any); loopback names when bound there.
    """

    results_dir: Path
    cache_mib: float = DEFAULT_CACHE_MIB
    max_open_slides: int = 8
    allowed_hosts: tuple[str, ...] | None = None


class Viewer:
    """State behind the routes: the results whitelist, the tile service and small caches."""

    def __init__(self, config: ViewerConfig) -> None:
        if config.cache_mib < 0:
            raise ValueError(f"--cache-mib must be >= 0, got {config.cache_mib}")
        self.config = config
        self.index = ResultsIndex(config.results_dir)
        self.tiles = TileService(
            cache_bytes=int(config.cache_mib * 2**20),
            max_open=config.max_open_slides,
            # Overviews of single-level slides, built once (see _tiles); a read-only results
            # folder gets a temporary folder instead.
            overview_dir=self.index.root / VIEWER_CACHE_DIR,
        )
        self._heatmaps = SmallCache(32)
        self._pngs = SmallCache(64)
        self._frames = SmallCache(8)
        self._colorbar = colorbar_png()

    @property
    def root(self) -> Path:
        return self.index.root

    # -- slide overlays ----------------------------------------------------------------------
    def heatmap(self, slide_id: str, name: str) -> Heatmap:
        ov = self.index.overlay(slide_id, name)
        return self._heatmaps.get(file_key(ov.path), lambda: load_heatmap(ov, self.root))

    def overlay_entry(self, case: Case, name: str) -> dict[str, Any]:
        ov = case.overlays[name]
        heat = self.heatmap(case.slide_id, name)
        lo, hi = value_range(heat, None, None)
        (ox, oy), (cx, cy) = heat.origin_level0, heat.cell_size_level0
        h, w = heat.shape
        return {
            "name": name,
            "label": ov.label,
            "unit": ov.unit,
            "url": _url("overlay", case.slide_id, f"{name}.png"),
            "x": ox,
            "y": oy,
            "width": cx * w,
            "height": cy * h,
            "cells": [w, h],
            "vmin": lo,
            "vmax": hi,
            "colorbar": _url("overlay", case.slide_id, name, "colorbar.png"),
        }

    def overlay_png(self, slide_id: str, name: str) -> bytes:
        ov = self.index.overlay(slide_id, name)

        def make() -> bytes:
            heat = self.heatmap(slide_id, name)
            lo, hi = value_range(heat, None, None)
            return png_bytes(colour_grid(heat.grid, lo, hi))

        return self._pngs.get(("slide", *file_key(ov.path)), make)

    # -- slides ------------------------------------------------------------------------------
    def source(self, case: Case) -> Path:
        if case.source is None:
            raise NotFoundError(
                f"slides/{case.slide_id}/ records no source slide path; score the slide again"
            )
        return case.source

    def slide_json(self, slide_id: str) -> dict[str, Any]:
        case = self.index.case(slide_id)
        info = self.tiles.info(self.source(case))
        overlays, unavailable = [], []
        for name in case.overlays:
            try:
                overlays.append(self.overlay_entry(case, name))
            except NotFoundError as exc:  # one damaged store does not hide the slide
                unavailable.append({"name": name, "error": str(exc)})
        mpp: list[float] | None = None if info.mpp is None else list(info.mpp)
        mpp_source = None if mpp is None else "file"
        if mpp is None and overlays:
            # The heatmap records the mpp scoring used (a --mpp override for such files).
            mpp = list(self.heatmap(slide_id, overlays[0]["name"]).mpp)
            mpp_source = "heatmap"
        return {
            "slide_id": slide_id,
            "status": case.status,
            "width": info.width,
            "height": info.height,
            "mpp": mpp,
            "mpp_source": mpp_source,
            "levels": info.pyramid_levels,
            "dz_levels": info.deepzoom.n_levels,
            "dzi": _url("dzi", f"{slide_id}.dzi"),
            "tile_size": TILE_SIZE,
            "overlap": OVERLAP,
            "overlays": overlays,
            "unavailable_overlays": unavailable,
            "tasks": case.tasks,
            "error": case.error,
            "ood": case.ood,
        }

    # -- ultrasound --------------------------------------------------------------------------
    def _us_block(self, case: Case) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
        files = ultrasound_files(case, self.root)
        return files.registration, files.registration["ultrasound"], files.stores

    def frame_png(self, slide_id: str) -> bytes:
        """The ultrasound frame as PNG, re-read from its source file as map-us read it."""
        case = self.index.case(slide_id)
        _, us, _ = self._us_block(case)
        src = referenced_path(us.get("source"), self.root)
        if src is None or not src.is_file():
            raise NotFoundError(
                f"the ultrasound file {us.get('source')!r} referenced by slides/{slide_id}/"
                "ultrasound/registration.json is gone; restore it or run `oncotrace map-us` again"
            )
        region = us.get("region")
        spacing = us.get("spacing_mm_xy")
        override: tuple[float, float] | None = None
        if (
            us.get("spacing_source") == "override"
            and isinstance(spacing, list)
            and len(spacing) == 2
        ):
            override = (float(spacing[0]), float(spacing[1]))

        def read() -> bytes:
            frame = read_ultrasound(
                src,
                frame=us.get("frame"),
                region=region.get("index") if isinstance(region, dict) else None,
                spacing_mm=override,
            )
            return png_bytes(frame.image)

        return self._frames.get((*file_key(src), str(us.get("frame")), str(region)), read)

    def mapped(self, slide_id: str, name: str) -> MappedOverlay:
        case = self.index.case(slide_id)
        _, _, stores = self._us_block(case)
        store = stores.get(name)
        if store is None:
            raise NotFoundError(f"slide {slide_id!r} has no ultrasound overlay {name!r}")
        return self._heatmaps.get(
            ("us", *file_key(store)), lambda: load_mapped(name, store, self.root)
        )

    def ultrasound_json(self, slide_id: str) -> dict[str, Any]:
        case = self.index.case(slide_id)
        reg, us, stores = self._us_block(case)
        sx, sy = (float(v) for v in us.get("spacing_mm_xy") or (1.0, 1.0))
        size = us.get("size_px") or [None, None]
        landmarks = []
        for p in (reg.get("landmarks") or {}).get("points") or []:
            mm = p.get("ultrasound_mm") or [math.nan, math.nan]
            landmarks.append(
                {
                    "id": str(p.get("id")),
                    "x": float(mm[0]) / sx,
                    "y": float(mm[1]) / sy,
                    "role": str(p.get("role", "fit")),
                }
            )
        overlays = []
        for name in stores:
            m = self.mapped(slide_id, name)
            overlays.append(
                {
                    "name": name,
                    "label": name,
                    "unit": m.unit,
                    "url": _url("us", slide_id, "overlay", f"{name}.png"),
                    "vmin": m.vmin,
                    "vmax": m.vmax,
                    "colorbar": _url("us", slide_id, "overlay", name, "colorbar.png"),
                }
            )
        report = dict(reg.get("report") or {})
        report.setdefault("model", reg.get("model"))
        report.setdefault("smoothing", reg.get("smoothing"))
        return {
            "slide_id": slide_id,
            "frame": _url("us", slide_id, "frame.png"),
            "width": size[0],
            "height": size[1],
            "spacing_mm": [sx, sy],
            "spacing_source": us.get("spacing_source"),
            "overlays": overlays,
            "landmarks": landmarks,
            "report": report,
        }

    def close(self) -> None:
        self.tiles.close()


def _page(kind: str) -> Response:
    return _file(safe_file(STATIC_DIR, PAGES[kind]))


def _png_name(file: str) -> str:
    """The overlay name in a ``<name>.png`` URL segment, else :class:`NotFoundError`."""
    if not file.endswith(".png"):
        raise NotFoundError(f"no overlay image {file!r}")
    return file.removesuffix(".png")


def _tile_address(name: str, level_text: str, file: str) -> tuple[str, int, int, int]:
    """``(slide_id, level, col, row)`` from a ``<id>_files/<level>/<col>_<row>.jpeg`` tile URL."""
    if not name.endswith("_files") or not file.endswith(".jpeg"):
        raise NotFoundError(f"no tile {name}/{file}")
    level = _int(level_text, "level")
    col_text, sep, row_text = file.removesuffix(".jpeg").partition("_")
    if not sep:
        raise NotFoundError(f"tile name {file!r} is not <col>_<row>.jpeg")
    return name.removesuffix("_files"), level, _int(col_text, "column"), _int(row_text, "row")


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse({"error": f"{detail}: {request.url.path}"}, status_code=status)


class Endpoints:
    """The route handlers over one :class:`Viewer`; :meth:`routes` maps URLs onto them.

    The synchronous handlers are wrapped in :func:`_guard` there (missing things answer a JSON
    404); :meth:`tile` is async and catches the same errors itself.
    """

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer

    def routes(self) -> list[Route]:
        return [
            Route("/", _guard(self.cases_page)),
            Route("/slide/{slide_id}", _guard(self.slide_page)),
            Route("/ultrasound/{slide_id}", _guard(self.ultrasound_page)),
            Route("/static/{path:path}", _guard(self.static)),
            Route("/vendor/openseadragon/{path:path}", _guard(self.vendor)),
            Route("/api/cases", _guard(self.api_cases)),
            Route("/api/slides/{slide_id}", _guard(self.api_slide)),
            Route("/api/ultrasound/{slide_id}", _guard(self.api_ultrasound)),
            Route("/dzi/{name}", _guard(self.dzi)),
            Route("/dzi/{name}/{level}/{tile}", self.tile),
            Route("/overlay/{slide_id}/{file}", _guard(self.overlay)),
            Route("/overlay/{slide_id}/{name}/colorbar.png", _guard(self.overlay_colorbar)),
            Route("/us/{slide_id}/frame.png", _guard(self.us_frame)),
            Route("/us/{slide_id}/overlay/{file}", _guard(self.us_overlay)),
            Route("/us/{slide_id}/overlay/{name}/colorbar.png", _guard(self.us_colorbar)),
        ]

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.viewer.close()

    # -- pages and static files --------------------------------------------------------------
    def cases_page(self, request: Request) -> Response:
        return _page("cases")

    def slide_page(self, request: Request) -> Response:
        self.viewer.index.case(request.path_params["slide_id"])
        return _page("slide")

    def ultrasound_page(self, request: Request) -> Response:
        case = self.viewer.index.case(request.path_params["slide_id"])
        if case.ultrasound is None:
            raise NotFoundError(f"slide {case.slide_id!r} has no ultrasound view")
        return _page("ultrasound")

    def static(self, request: Request) -> Response:
        return _file(safe_file(STATIC_DIR, request.path_params["path"]))

    def vendor(self, request: Request) -> Response:
        try:
            from ._assets import openseadragon_dir
        except ImportError as exc:
            raise NotFoundError(
                "the viewer's asset module is missing; reinstall oncotrace"
            ) from exc
        return _file(safe_file(openseadragon_dir(), request.path_params["path"]))

    # -- JSON APIs ---------------------------------------------------------------------------
    def api_cases(self, request: Request) -> Response:
        cases = self.viewer.index.cases()
        tasks: dict[str, None] = {}
        for case in cases.values():
            tasks.update(dict.fromkeys(case.tasks))
        return JSONResponse({"cases": [c.summary() for c in cases.values()], "tasks": list(tasks)})

    def api_slide(self, request: Request) -> Response:
        return JSONResponse(self.viewer.slide_json(request.path_params["slide_id"]))

    def api_ultrasound(self, request: Request) -> Response:
        return JSONResponse(self.viewer.ultrasound_json(request.path_params["slide_id"]))

    # -- Deep Zoom ---------------------------------------------------------------------------
    def dzi(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        if not name.endswith(".dzi"):
            raise NotFoundError(f"no Deep Zoom image {name!r}")
        case = self.viewer.index.case(name.removesuffix(".dzi"))
        info = self.viewer.tiles.info(self.viewer.source(case))
        return Response(info.deepzoom.dzi_xml(), media_type="application/xml")

    async def tile(self, request: Request) -> Response:
        # Async so that a cached tile is answered on the event loop, without the thread-pool
        # round trip; only slide reads (and the once-a-second folder check) go to threads.
        viewer = self.viewer
        try:
            params = request.path_params
            slide_id, level, col, row = _tile_address(
                params["name"], params["level"], params["tile"]
            )
            if viewer.index.due:
                await run_in_threadpool(viewer.index.cases)
            path = viewer.source(viewer.index.case(slide_id))
            key = viewer.tiles.key(path, level, col, row)
            data = viewer.tiles.cached(key)
            if data is None:
                data = await run_in_threadpool(viewer.tiles.render, path, key, level, col, row)
        except _NOT_FOUND as exc:
            return _not_found(str(exc))
        return Response(
            data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"}
        )

    # -- overlays ----------------------------------------------------------------------------
    def overlay(self, request: Request) -> Response:
        name = _png_name(request.path_params["file"])
        return _png(self.viewer.overlay_png(request.path_params["slide_id"], name))

    def overlay_colorbar(self, request: Request) -> Response:
        self.viewer.index.overlay(request.path_params["slide_id"], request.path_params["name"])
        return _png(self.viewer._colorbar)

    def us_frame(self, request: Request) -> Response:
        return _png(self.viewer.frame_png(request.path_params["slide_id"]))

    def us_overlay(self, request: Request) -> Response:
        name = _png_name(request.path_params["file"])
        m = self.viewer.mapped(request.path_params["slide_id"], name)
        return _png(png_bytes(colour_grid(m.grid, m.vmin, m.vmax)))

    def us_colorbar(self, request: Request) -> Response:
        self.viewer.mapped(request.path_params["slide_id"], request.path_params["name"])
        return _png(self.viewer._colorbar)


def create_app(
    results_dir: str | Path,
    *,
    cache_mib: float = DEFAULT_CACHE_MIB,
    max_open_slides: int = 8,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The viewer app for an ``oncotrace score`` results folder.

    Parameters
    ----------
    results_dir : the folder given to ``oncotrace score --out``.
    cache_mib : tile-cache budget (MiB of JPEG); 0 disables it.
    max_open_slides : open slide handles kept.
    allowed_hosts : Host header names to accept (None: any). :func:`serve` passes the loopback
        names when bound to a loopback address, so other sites cannot reach it by DNS rebinding.

    Raises
    ------
    FileNotFoundError
        ``results_dir`` is not a results folder.
    """
    viewer = Viewer(
        ViewerConfig(
            Path(results_dir),
            cache_mib=cache_mib,
            max_open_slides=max_open_slides,
            allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
        )
    )
    endpoints = Endpoints(viewer)
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(
        routes=endpoints.routes(),
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=endpoints.lifespan,
    )
    app.state.viewer = viewer
    return app


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one).

    Raises
    ------
    OSError
        The port is taken or the address is not this machine's; the message names both.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0 = any free "
            "port) or a --host address of this machine",
        ) from exc
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    elif host == "0.0.0.0":  # reachable from outside, but the local browser uses loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}/"


class RunningServer:
    """A uvicorn server answering in a background thread (tests, benches, ``oncotrace view``).

    Attributes
    ----------
    url : ``http://host:port/`` it answers on.
    """

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        import uvicorn

        self.url = url_of(sock)
        self._sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="viewer", daemon=True
        )

    def start(self, timeout_s: float = 10.0) -> RunningServer:
        """Start answering (once; later calls return at once) and wait until it does."""
        if not self._thread.is_alive() and not self._server.started:
            self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the viewer server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it: KeyboardInterrupt reaches here)."""
        while self._thread.is_alive():
            self._thread.join(0.2)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    results_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    cache_mib: float = DEFAULT_CACHE_MIB,
) -> RunningServer:
    """Serve ``results_dir`` on ``host:port`` in a background thread; returns once it answers.

    Call ``.stop()`` (or use it as a context manager) to shut it down.
    """
    allowed = LOOPBACK_HOSTS if is_loopback(host) else None
    app = create_app(results_dir, cache_mib=cache_mib, allowed_hosts=allowed)
    return RunningServer(app, bind(host, port)).start()
