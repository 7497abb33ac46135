"""A Dask worker preload for the fault tests: every prediction waits 1.5 s.

The tests that kill a worker or the client mid-run need slides that take long enough to be
caught half-done. They load this module into each worker through Dask's own configuration
(``DASK_DISTRIBUTED__WORKER__PRELOAD``), so OncoTrace's scoring code carries no test hook.
"""

from __future__ import annotations

import time
from typing import Any

from oncotrace import mil

DELAY_S = 1.5
# Dask may import a preload more than once per process: wrap the original, once.
_predict = getattr(mil.predict, "__wrapped__", mil.predict)


def _slow_predict(*args: Any, **kwargs: Any) -> Any:
    time.sleep(DELAY_S)
    return _predict(*args, **kwargs)


_slow_predict.__wrapped__ = _predict  # type: ignore[attr-defined]
mil.predict = _slow_predict  # scoring looks it up on the module at call time
