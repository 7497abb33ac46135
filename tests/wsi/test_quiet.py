"""cuCIM on a machine without a CUDA driver: no cuFile probe on the console or in the cwd."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import torch  # torch's CUDA wheels make libcufile loadable, which is what starts the probe
from oncotrace import wsi
with wsi.open_slide({path!r}) as s:  # auto: cuCIM, as tiling and scoring open slides
    assert s.backend == "cucim", s.backend
    print("read", s.read_region((0, 0), 0, (32, 32)).shape)
"""


def test_cucim_reads_without_cufile_noise_or_a_log_in_the_working_directory(
    tmp_path: Path, shared_data: Path
) -> None:
    if importlib.util.find_spec("cucim") is None:  # not imported here: that would probe
        pytest.skip("cuCIM is not installed")
    from oncotrace.wsi._quiet import cuda_driver_present  # private: what the silencing keys on

    if cuda_driver_present():
        pytest.skip("a CUDA driver is present: cuFile's messages are then kept")
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(path=str(slide))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "read (32, 32, 3)"
    for text in (proc.stdout, proc.stderr):
        assert "cuFile" not in text and "libcuda" not in text, text
    assert list(tmp_path.iterdir()) == []  # no cufile.log
