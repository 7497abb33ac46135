"""``oncotrace view``: a local web viewer for scoring results (slides, heatmaps, ultrasound).

The server (Starlette + uvicorn) lives in :mod:`workflows._viewer.server`; the pages it serves in
``static/``; OpenSeadragon is installed from npm by ``oncotrace viewer-setup``.
Nothing here touches the disk or the network at import time.
"""

from __future__ import annotations

from ._assets import openseadragon_dir, setup_viewer
from .server import RunningServer, create_app, start_server

__all__ = ["RunningServer", "create_app", "openseadragon_dir", "setup_viewer", "start_server"]
