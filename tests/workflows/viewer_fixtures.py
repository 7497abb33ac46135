"""A small ``oncotrace score`` results folder for the viewer tests, with known contents.

:func:`build_viewer_results` writes, in a few seconds instead of the demo's minute:

- two phantom H&E slides (``mil.phantom.make_cohort``, 2048 x 1536 px at 0.5 µm/px) with a
  ``result.json`` each in the shape ``workflows._score`` writes, holding planted probabilities;
- an ``attention.ome.zarr`` per slide on a 224-px tile grid that covers only the left part of
  the slide (cells to the right are NaN), whose value rises left to right (:func:`planted_attention`);
- ``immune/`` and ``ultrasound/`` per slide from the demo's own spatial step
  (``workflows._demo_spatial.spatial_demo``: ``oncotrace immune`` + ``map-us`` outputs);
- one failed slide (``error.json``, :data:`PLANTED_ERROR`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The failed slide's error.json fields.
PLANTED_ERROR = {
    "slide_id": "broken_slide",
    "stage": "tile",
    "error_type": "CorruptSlideError",
    "message": "broken_slide.svs: truncated JPEG tile at level 0 (x=4096, y=2048)",
}
TILE_PX = 224  # level-0 px per attention tile (224 px at 0.5 µm/px)
SIZE_PX = (2048, 1536)
MPP = 0.5
#: Attention tiles cover x < ATTENTION_WIDTH_PX only, so the overlay is narrower than the slide.
ATTENTION_WIDTH_PX = 5 * TILE_PX


@dataclass(frozen=True)
class ViewerResults:
    """What :func:`build_viewer_results` wrote.

    Attributes
    ----------
    results_dir : the ``oncotrace score``-style output folder (give it to the viewer).
    slide_ids : scored slides, sorted.
    error_id : the failed slide.
    slide_paths : source slide of each scored slide.
    probabilities : per scored slide, ``{class: p}`` of task ``"label"``.
    labels : per scored slide, the predicted label.
    seconds : time taken to build it.
    """

    results_dir: Path
    slide_ids: tuple[str, ...]
    error_id: str
    slide_paths: dict[str, Path]
    probabilities: dict[str, dict[str, float]]
    labels: dict[str, str]
    seconds: float


def planted_attention(coords: np.ndarray) -> np.ndarray:
    """(N,) float: the tile's column index / 4, so 0 at the left edge and 1 in column 4."""
    return (coords[:, 0] // TILE_PX).astype(np.float64) / 4.0


def build_viewer_results(root: Path, *, spatial: bool = True) -> ViewerResults:
    """Write the results folder under ``root`` (``root/results``) and return what is in it.

    ``spatial=False`` skips ``immune/`` and ``ultrasound/`` (the slowest part, ~5 s).
    """
    from oncotrace import spatial as sp
    from oncotrace.mil.phantom import make_cohort

    started = time.perf_counter()
    cohort = make_cohort(
        root / "cohort",
        n_cases=2,
        slides_per_patient=(1, 1),
        sites=("A",),
        size_px=SIZE_PX,
        mpp=MPP,
        seed=3,
        workers=1,
    )
    results = root / "results"
    slides_dir = results / "slides"
    probabilities: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {}
    # Probabilities chosen so the two slides sort differently by p(malignant) and by p(benign).
    planted = [(0.83, 0.17), (0.08, 0.92)]
    xs = np.arange(0, ATTENTION_WIDTH_PX, TILE_PX)
    ys = np.arange(0, SIZE_PX[1] - TILE_PX + 1, TILE_PX)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    for k, (sid, path) in enumerate(zip(cohort.slide_ids, cohort.slide_paths, strict=True)):
        here = slides_dir / sid
        here.mkdir(parents=True)
        classes = cohort.class_names
        proba = planted[k % len(planted)]
        label = classes[int(np.argmax(proba))]
        probabilities[sid] = dict(zip(classes, proba, strict=True))
        labels[sid] = label
        heat = sp.attention_heatmap(
            coords,
            planted_attention(coords),
            tile_size_level0=float(TILE_PX),
            level0_size=SIZE_PX,
            mpp=MPP,
        )
        sp.write_ome_zarr(heat, here / "attention.ome.zarr", name="attention (label)")
        order = np.argsort(-np.asarray(proba))
        result = {
            "format": 1,
            "status": "done",
            "slide_id": sid,
            "path": str(Path(path).resolve()),
            "n_tiles": len(coords),
            "tasks": {
                "label": {
                    "label": label,
                    "classes": list(classes),
                    "proba": list(proba),
                    "proba_uncalibrated": list(proba),
                    "top_k": [classes[int(i)] for i in order],
                    "conformal_set": [label],
                    "conformal_level": 0.9,
                }
            },
        }
        (here / "result.json").write_text(json.dumps(result, indent=1))
    broken = slides_dir / PLANTED_ERROR["slide_id"]
    broken.mkdir(parents=True)
    (broken / "error.json").write_text(
        json.dumps(
            {
                "format": 1,
                "status": "error",
                "path": str(root / "missing" / "broken_slide.svs"),
                **PLANTED_ERROR,
            },
            indent=1,
        )
    )
    if spatial:
        from oncotrace.workflows._demo_spatial import spatial_demo  # private: the demo's step

        spatial_demo(results, workers=1)
    return ViewerResults(
        results_dir=results,
        slide_ids=tuple(sorted(cohort.slide_ids)),
        error_id=PLANTED_ERROR["slide_id"],
        slide_paths={
            s: Path(p).resolve() for s, p in zip(cohort.slide_ids, cohort.slide_paths, strict=True)
        },
        probabilities=probabilities,
        labels=labels,
        seconds=time.perf_counter() - started,
    )


def gradient_tile(x0: int, y0: int, size: tuple[int, int], tile: int) -> np.ndarray:
    """(tile, tile, 3) uint8 of :func:`write_single_level_tiff`'s pattern at level-0 ``(x0, y0)``:
    red rises left to right, green top to bottom, blue is a 512-px checkerboard."""
    w, h = size
    yy, xx = np.mgrid[y0 : y0 + tile, x0 : x0 + tile]
    out = np.empty((tile, tile, 3), np.uint8)
    out[..., 0] = np.clip(xx * 255 // w, 0, 255)
    out[..., 1] = np.clip(yy * 255 // h, 0, 255)
    out[..., 2] = ((xx // 512 + yy // 512) % 2) * 200
    return out


def write_single_level_tiff(
    path: Path, size: tuple[int, int], *, tile: int = 256, mpp: float = MPP
) -> Path:
    """A tiled, JPEG-compressed TIFF with one level only (no pyramid) of ``size = (w, h)``.

    Written tile by tile (tifffile takes an iterator), so even a large slide costs the test
    one tile of memory; cuCIM, OpenSlide and tifffile all read it.
    """
    import tifffile

    w, h = size
    tiles = (gradient_tile(x, y, size, tile) for y in range(0, h, tile) for x in range(0, w, tile))
    tifffile.imwrite(
        path,
        tiles,
        shape=(h, w, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return path
