"""The demo's spatial step: immune maps for the scored slides, carried onto phantom ultrasound frames.

For every scored slide: ``spatial.detect_immune_cells`` → ``slides/<id>/immune/`` (what
``oncotrace immune`` writes); a phantom B-mode frame holding the specimen at a known pose, with
noisy landmark pairs (``landmarks.json``, the format users write) → ``fit_landmarks`` →
the attention and immune-density heatmaps resampled onto the frame in
``slides/<id>/ultrasound/`` (what ``oncotrace map-us`` writes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def spatial_demo(
    results: Path, on_slide: Callable[[str], None] | None = None, *, workers: int = 2
) -> dict[str, Any]:
    """Run the immune + ultrasound step for every scored slide under ``results/slides``.

    Returns per slide: positive cells, registration model and hold-out TRE (mm), and the
    ultrasound distance between where the true transform puts the hottest attention cell and
    where the fitted one does (mm).
    """
    from oncotrace import spatial

    summary: dict[str, Any] = {}
    for i, here in enumerate(sorted((results / "slides").iterdir())):
        result_file = here / "result.json"
        if not result_file.is_file():
            continue
        result = json.loads(result_file.read_text())
        cells = spatial.detect_immune_cells(result["path"], stain="he", workers=workers)
        density = spatial.density_map(cells, bin_um=50.0)
        spatial.write_immune_outputs(here / "immune", cells, density)
        attention = spatial.read_heatmap(here / "attention.ome.zarr")
        size_um = (
            cells.level0_size[0] * cells.mpp[0],
            cells.level0_size[1] * cells.mpp[1],
        )
        us_dir = here / "ultrasound"
        us_dir.mkdir(parents=True, exist_ok=True)
        phantom = spatial.render_ultrasound_phantom(size_um, seed=i, path=us_dir / "frame.png")
        # the documented landmarks.json format (µm on the slide, mm on the frame)
        (us_dir / "landmarks.json").write_text(
            json.dumps(phantom.landmarks.to_dict(), indent=1) + "\n"
        )
        reg = spatial.fit_landmarks(phantom.landmarks, bin_um=50.0)
        spatial.to_ultrasound(attention, reg, phantom.ultrasound, us_dir, name="attention")
        spatial.to_ultrasound(
            density.primary,
            reg,
            phantom.ultrasound,
            us_dir,
            name="immune-density",
            unit=spatial.DENSITY_UNIT,
        )
        # the hottest attention cell, through the truth and through the fit
        r, c = np.unravel_index(np.nanargmax(attention.grid), attention.grid.shape)
        hot_x, hot_y = attention.cell_centre_level0(r, c)
        hot_um = np.array([[hot_x * attention.mpp[0], hot_y * attention.mpp[1]]], np.float64)
        err = float(np.hypot(*(reg.transform(hot_um) - phantom.truth(hot_um))[0]))
        hold = reg.report.get("holdout_tre_mm") or {}
        summary[here.name] = {
            "n_cells": len(cells),
            "n_positive": cells.n_positive,
            "registration": reg.model,
            "holdout_tre_mm": hold.get("mean"),
            "hot_cell_error_mm": err,
        }
        if on_slide is not None:
            on_slide(here.name)
    return summary
