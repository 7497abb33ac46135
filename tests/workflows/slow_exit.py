"""A Dask worker preload: the worker takes 10 s to shut down, as one unwinding busy threads may.

The nanny of a LocalCluster kills such a worker after a grace period and warns "Worker process
still alive after … seconds, killing"; the test checks that ``oncotrace score`` keeps that out
of its output. Loaded through Dask's configuration (``DASK_DISTRIBUTED__WORKER__PRELOAD``).
"""

from __future__ import annotations

import time
from typing import Any

EXIT_DELAY_S = 10.0


def dask_teardown(worker: Any) -> None:
    time.sleep(EXIT_DELAY_S)
