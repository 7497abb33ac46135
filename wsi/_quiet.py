"""Keep cuCIM's GPU-Direct-Storage probe out of the console and out of the working directory.

cuCIM tries NVIDIA's cuFile (GPU Direct Storage) when ``libcufile`` is loadable — it is once
torch's CUDA wheels are imported. On a machine without a CUDA driver that probe prints
"dlopen error libcuda.so.1 … cuFile initialization failed" from C (twice per process: at
``import cucim`` and at the first open) and appends it to ``cufile.log`` in the working
directory. Reading on the CPU never needs cuFile, so:

* ``CUFILE_LOGFILE_PATH`` (cuFile's own setting) points at a file in the temporary folder
  unless the user set it;
* without a CUDA driver, the process's stdout and stderr file descriptors are pointed at
  ``/dev/null`` for the two calls that print (a few milliseconds, once per process). With a
  driver nothing is hidden: cuFile's messages then matter.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_LOCK = threading.Lock()
_QUIETED = False


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads in this process."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _cufile_log_path() -> None:
    if os.environ.get("CUFILE_LOGFILE_PATH"):
        return
    folder = Path(tempfile.gettempdir()) / f"oncotrace-cucim-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CUFILE_LOGFILE_PATH"] = str(folder / "cufile.log")


@contextlib.contextmanager
def _native_output_to_devnull() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@contextlib.contextmanager
def cucim_first_use() -> Iterator[None]:
    """Wrap ``import cucim`` and the first ``CuImage(...)`` of the process (see the module)."""
    global _QUIETED
    _cufile_log_path()
    with _LOCK:  # a second thread's first open waits for the first one's
        first = not _QUIETED
        _QUIETED = True
        silence = first and not cuda_driver_present()
        with _native_output_to_devnull() if silence else contextlib.nullcontext():
            yield
