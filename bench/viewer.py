"""Viewer tile throughput: tiles/s served vs a bare read_region + resize + JPEG loop, same run.

    python bench/viewer.py [--size 16384] [--tiles 300] [--rounds 3] [--http]

A synthetic Aperio-like slide (``bench.make_slide``, JPEG tiles, levels at downsample 1/4/16/64;
cached in ``bench/_data/``) is the only slide of a results folder. A fixed random set of Deep
Zoom tiles at mixed zoom levels (uniform over the five finest levels, downsample 1 to 16) is
requested by:

(a) bare — one open slide, for each tile: its level-0 region, ``read_region`` from the best
    pyramid level, Pillow box resize, JPEG encode (quality 85); no server, no cache;
(b) server, cache off — ``GET /dzi/...jpeg`` requests sent one after another straight into the
    ASGI app on one asyncio loop, as uvicorn would hand them over (routing, whitelist, cache
    lookup, thread-pool hop, response), without sockets or HTTP parsing;
(c) server, warm cache — the same requests again after one pass that filled a 256 MiB cache.

By default cuCIM's decoded-tile cache is off (a config with ``"type": "nocache"``), so every
pass decodes the slide's JPEG tiles as a first visit does and (a) and (b) do the same work
below the server; ``--decoder-cache`` keeps the project's 256 MiB cuCIM cache, which makes
repeated passes over the same tiles nearly free to read and leaves mostly resize + encode.

Each is timed ``--rounds`` times, interleaved; the best round counts (this machine is shared;
other processes' CPU use is reported). ``--http`` adds (b) and (c) over real HTTP (uvicorn on
127.0.0.1, one keep-alive httpx client, requests one at a time: the whole stack a browser
talks to). ``--http-process`` runs ``oncotrace view`` in its own process, as users do, with
``http.client`` keep-alive clients in this one: 1 connection (requests one at a time) and 4
(a browser fetches several tiles at once), cache off and warm; the bare loop is timed again in
the same rounds. Targets: b/a >= 0.8, c/a >= 3. One JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._load import CpuMonitor  # noqa: E402

TARGETS = {"server_over_bare": 0.8, "warm_over_bare": 3.0}
DATA = HERE / "_data"


def _no_decoder_cache(folder: Path) -> None:
    """Point cuCIM at a config without its tile cache (read when the first slide opens)."""
    import os

    cfg = folder / ".cucim.json"
    cfg.write_text(json.dumps({"cache": {"type": "nocache"}}))
    os.environ["CUCIM_CONFIG_PATH"] = str(cfg)


def _slide(size: int) -> Path:
    from bench.make_slide import make_svs_like

    path = DATA / f"viewer-{size}.svs"
    if not path.is_file():
        DATA.mkdir(parents=True, exist_ok=True)
        make_svs_like(path, width=size, height=size, seed=0)
    return path


def _results(slide: Path, root: Path) -> Path:
    folder = root / "slides" / "bench"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(
        json.dumps({"status": "done", "slide_id": "bench", "path": str(slide), "tasks": {}})
    )
    return root


def _tile_set(width: int, height: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    import numpy as np
    from oncotrace.workflows._viewer._tiles import DeepZoom  # private: the server's tile grid

    dz = DeepZoom(width, height)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        level = dz.max_level - int(rng.integers(0, 5))  # downsample 1, 2, 4, 8, 16
        cols, rows = dz.tile_counts(level)
        out.append((level, int(rng.integers(0, cols)), int(rng.integers(0, rows))))
    return out


def _bare(slide_path: Path, tiles: list[tuple[int, int, int]]) -> Callable[[], int]:
    """The baseline loop, written out: geometry, read_region, resize, encode."""
    from oncotrace.wsi import open_slide
    from PIL import Image

    slide = open_slide(slide_path)
    w0, h0 = slide.dimensions
    max_level = math.ceil(math.log2(max(w0, h0)))

    def run() -> int:
        nbytes = 0
        for level, col, row in tiles:
            ds = 2 ** (max_level - level)
            lw, lh = -(-w0 // ds), -(-h0 // ds)
            x0, y0 = col * 254 - (col > 0), row * 254 - (row > 0)
            x1, y1 = min(lw, (col + 1) * 254 + 1), min(lh, (row + 1) * 254 + 1)
            lvl = slide.best_level_for_downsample(ds)
            lds = slide.level_downsamples[lvl]
            size = (max(1, round((x1 - x0) * ds / lds)), max(1, round((y1 - y0) * ds / lds)))
            pixels = slide.read_region((x0 * ds, y0 * ds), lvl, size)
            img = Image.fromarray(pixels)
            if size != (x1 - x0, y1 - y0):
                img = img.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            nbytes += buf.tell()
        return nbytes

    return run


def _asgi_loop(app: Any, urls: list[str]) -> Callable[[], int]:
    """Requests one at a time into the ASGI app, on one event loop (as a server would)."""
    import asyncio

    async def get(url: str) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": url,
            "raw_path": url.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        status, body = 0, bytearray()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await app(scope, receive, send)
        return status, bytes(body)

    async def all_urls() -> int:
        nbytes = 0
        for url in urls:
            status, body = await get(url)
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status} {body[:200]!r}")
            nbytes += len(body)
        return nbytes

    return lambda: asyncio.run(all_urls())


def _http_loop(client: Any, base: str, urls: list[str]) -> Callable[[], int]:
    def run() -> int:
        nbytes = 0
        for url in urls:
            r = client.get(base + url)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text[:200]}")
            nbytes += len(r.content)
        return nbytes

    return run


class _ViewProcess:
    """``oncotrace view`` in its own process (as users run it; a browser is another process)."""

    def __init__(self, root: Path, cache_mib: float) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "oncotrace.workflows.cli", "view", str(root), "--port", "0"]
        cmd += ["--cache-mib", str(cache_mib), "--no-browser"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if "http://" in line:
                self.url = line[line.index("http://") :].split()[0].rstrip("/")
                break
        if not self.url:
            self.proc.kill()
            raise RuntimeError("oncotrace view did not print its URL")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _http_clients(base: str, urls: list[str], concurrency: int) -> Callable[[], int]:
    """``concurrency`` keep-alive connections (browsers open ~6 per host), urls split evenly."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    host = urlsplit(base)
    conns = [http.client.HTTPConnection(host.hostname, host.port) for _ in range(concurrency)]

    def one(k: int) -> int:
        nbytes = 0
        for url in urls[k::concurrency]:
            conns[k].request("GET", url)
            r = conns[k].getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: HTTP {r.status} {body[:200]!r}")
            nbytes += len(body)
        return nbytes

    pool = ThreadPoolExecutor(concurrency)

    def run() -> int:
        return sum(pool.map(one, range(concurrency)))

    return run


def _time(fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="slide side in level-0 px")
    ap.add_argument("--tiles", type=int, default=300, help="random tiles per pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--http", action="store_true", help="also measure over uvicorn + httpx")
    ap.add_argument(
        "--http-process",
        action="store_true",
        help="also measure `oncotrace view` in its own process, 1 and 4 client connections",
    )
    ap.add_argument(
        "--decoder-cache", action="store_true", help="keep cuCIM's decoded-tile cache on"
    )
    args = ap.parse_args()
    cfg_dir = Path(tempfile.mkdtemp(prefix="viewer-bench-cucim-"))
    if not args.decoder_cache:
        _no_decoder_cache(cfg_dir)

    from oncotrace.workflows import create_app, start_server

    slide = _slide(args.size)
    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as tmp:
        root = _results(slide, Path(tmp))
        tiles = _tile_set(args.size, args.size, args.tiles, args.seed)
        urls = [f"/dzi/bench_files/{lv}/{c}_{r}.jpeg" for lv, c, r in tiles]
        bare = _bare(slide, tiles)
        cold_app, warm_app = create_app(root, cache_mib=0), create_app(root, cache_mib=256)
        server, cached = _asgi_loop(cold_app, urls), _asgi_loop(warm_app, urls)
        # Untimed first pass: imports, page cache, open handles; fills the warm cache.
        sizes = {"bare": bare(), "server": server(), "warm": cached()}
        times: dict[str, list[float]] = {"bare": [], "server": [], "warm": []}
        mon = CpuMonitor()
        for _ in range(args.rounds):
            times["bare"].append(_time(bare))
            times["server"].append(_time(server))
            times["warm"].append(_time(cached))
        foreign = mon.foreign_fraction()
        cache_mib = warm_app.state.viewer.tiles.cache.nbytes / 2**20
        http: dict[str, float] = {}
        if args.http:
            import httpx

            for tag, mib in (("http_server", 0.0), ("http_warm", 256.0)):
                with start_server(root, port=0, cache_mib=mib) as srv, httpx.Client() as hc:
                    run = _http_loop(hc, srv.url.rstrip("/"), urls)
                    run()
                    http[tag] = min(_time(run) for _ in range(args.rounds))

        if args.http_process:
            for tag, mib in (("proc", 0.0), ("proc_warm", 256.0)):
                view = _ViewProcess(root, mib)
                try:
                    runs = {
                        f"{tag}_1conn": _http_clients(view.url, urls, 1),
                        f"{tag}_4conn": _http_clients(view.url, urls, 4),
                    }
                    for run in runs.values():
                        run()  # warm-up (and the cache fill for the warm server)
                    for _ in range(args.rounds):  # interleaved with the bare loop again
                        times["bare"].append(_time(bare))
                        for key, run in runs.items():
                            http[key] = min(http.get(key, math.inf), _time(run))
                finally:
                    view.close()

    shutil.rmtree(cfg_dir, ignore_errors=True)
    n = len(tiles)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / t for k, t in best.items()}
    out: dict[str, Any] = {
        "bench": "viewer",
        "slide_px": args.size,
        "tiles": n,
        "distinct_tiles": len(set(tiles)),
        "levels_downsample": [1, 2, 4, 8, 16],
        "rounds": args.rounds,
        "decoder_cache": args.decoder_cache,
        "bare_tiles_per_s": round(rate["bare"], 1),
        "server_tiles_per_s": round(rate["server"], 1),
        "warm_tiles_per_s": round(rate["warm"], 1),
        "server_over_bare": round(rate["server"] / rate["bare"], 3),
        "warm_over_bare": round(rate["warm"] / rate["bare"], 3),
        "warm_cache_mib": round(cache_mib, 1),
        "jpeg_kib_per_tile": round(sizes["server"] / len(tiles) / 1024, 1),
        "foreign_cpu": None if foreign is None else round(foreign, 3),
        "targets": TARGETS,
    }
    for tag, t in http.items():
        out[f"{tag}_tiles_per_s"] = round(n / t, 1)
        out[f"{tag}_over_bare"] = round(n / t / rate["bare"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
