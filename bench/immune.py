"""Immune-cell detection throughput (mm² of tissue per second) against a plain blob_log pass.

    python bench/immune.py [--size 8192] [--workers 1] [--sections detection]

Sections (each runs in its own child process so its peak RSS is its own, read with ``wait4``;
add a section by writing ``section_<name>(args) -> dict`` and listing it in ``SECTIONS``):

``detection``
    A planted-cell H&E slide (``--size``² px at 0.5 µm/px, a tissue ellipse on glass, tiled
    pyramidal JPEG TIFF) is rendered once in its own process. Then, in one process:
    (a) ``spatial.detect_immune_cells`` over it (tissue detection included);
    (b) the baseline: tissue detection, the same tiles (core + halo) read through the Slide API,
    ``rgb2hed`` and ``skimage.feature.blob_log`` on the hematoxylin channel with sigmas for
    lymphocytes (3–3.5 µm radius). Reported: mm² of tissue per second for both, the ratio
    (a)/(b), peak RSS after (a) and after (b), and how many cells / blobs each found.

``mapping``
    A 100 000-bin heatmap (400 × 250 bins of 50 µm: a 20 × 12.5 mm section) resampled onto an
    800 × 600 ultrasound frame (0.05 mm/px) through ``spatial.to_ultrasound``, with (i) an
    affine and (ii) a thin-plate spline fitted to 20 noisy landmarks (its inverse is a Newton
    solve), and (iii) the same with the three output files written. Baseline in the same
    process: one bare ``scipy.ndimage.map_coordinates`` (order 1) of the grid at coordinates
    computed in advance — the least any reverse mapping must cost. Best of 5 each; the target
    is ≤ 1 s for the mapping.

Prints a human summary, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
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

MPP = 0.5
BLOCK = 2048


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: KiB


def make_slide(path: Path, size: int, seed: int = 0) -> dict[str, Any]:
    """Render a ``size``² planted H&E slide block by block (bounded memory) and write it."""
    import numpy as np
    from oncotrace.spatial import render_cells, write_phantom_slide

    image = np.full((size, size, 3), 250, np.uint8)
    yy, xx = np.ogrid[:size, :size]
    tissue = ((xx - size / 2) / (0.45 * size)) ** 2 + ((yy - size / 2) / (0.4 * size)) ** 2 < 1
    n_cells = n_lym = 0
    for by in range(0, size, BLOCK):
        for bx in range(0, size, BLOCK):
            h, w = min(BLOCK, size - by), min(BLOCK, size - bx)
            block_tissue = tissue[by : by + h, bx : bx + w]
            if not block_tissue.any():
                continue
            rgb, truth = render_cells(w, h, mpp=MPP, stain="he", seed=seed + by * size + bx)
            view = image[by : by + h, bx : bx + w]
            view[block_tissue] = rgb[block_tissue]
            inside = block_tissue[truth.y.astype(int), truth.x.astype(int)]
            n_cells += int(inside.sum())
            n_lym += int((inside & truth.positive).sum())
    write_phantom_slide(path, image, mpp=MPP, compression="jpeg")
    return {
        "size_px": size,
        "planted_cells": n_cells,
        "planted_lymphocytes": n_lym,
        "tissue_mm2_planted": float(tissue.sum()) * (MPP * 1e-3) ** 2,
        "file_mb": path.stat().st_size / 1e6,
    }


def blob_log_pass(slide_path: Path, tile_um: float, halo_um: float) -> dict[str, Any]:
    """The baseline: same tissue tiles, read via the Slide API, blob_log on hematoxylin."""
    from oncotrace import wsi
    from oncotrace.spatial._immune import _mask_fraction, _tile_grid  # private: the detector's grid
    from skimage.color import rgb2hed
    from skimage.feature import blob_log

    t0 = time.perf_counter()
    n_blobs = 0
    with wsi.open_slide(slide_path) as slide:
        tm = wsi.detect_tissue(slide, mode="tissue")
        w0, h0 = slide.dimensions
        core = round(tile_um / MPP)
        halo = math.ceil(halo_um / MPP)
        n_tiles = 0
        for x, y in _tile_grid((0, 0, w0, h0), core).tolist():
            if (
                _mask_fraction(
                    tm.mask, tm.downsample, x - halo, y - halo, x + core + halo, y + core + halo
                )
                == 0
            ):
                continue
            ax, ay = max(0, x - halo), max(0, y - halo)
            bx, by = min(w0, x + core + halo), min(h0, y + core + halo)
            rgb = slide.read_region((ax, ay), 0, (bx - ax, by - ay))
            hema = rgb2hed(rgb)[..., 0]
            # Lymphocyte nuclei: radius 3-3.5 µm = 6-7 px, sigma = r / sqrt(2) ~ 4-5 px.
            blobs = blob_log(hema, min_sigma=3.0, max_sigma=6.0, num_sigma=4, threshold=0.02)
            cx = ax + blobs[:, 1]
            cy = ay + blobs[:, 0]
            core_hit = (cx >= x) & (cx < x + core) & (cy >= y) & (cy < y + core)
            n_blobs += int(core_hit.sum())
            n_tiles += 1
        tissue_mm2 = float(tm.mask.sum()) * (tm.mpp * 1e-3) ** 2
    return {
        "seconds": time.perf_counter() - t0,
        "tiles": n_tiles,
        "blobs": n_blobs,
        "tissue_mm2": tissue_mm2,
    }


def section_detection(args: argparse.Namespace) -> dict[str, Any]:
    from oncotrace.spatial import ImmuneConfig, detect_immune_cells

    path = Path(args.slide)
    made = json.loads(path.with_suffix(".json").read_text())
    rss_ready = _rss_mb()
    tile_um, halo_um = 512.0, ImmuneConfig().halo_um

    t0 = time.perf_counter()
    cells = detect_immune_cells(path, stain="he", tile_um=tile_um, workers=args.workers)
    det_s = time.perf_counter() - t0
    rss_after_detect = _rss_mb()

    base = blob_log_pass(path, tile_um, halo_um)
    rss_after_blob = _rss_mb()

    area = cells.tissue_area_mm2
    det_rate = area / det_s
    base_rate = base["tissue_mm2"] / base["seconds"]
    return {
        "slide": made,
        "workers": args.workers,
        "tile_um": tile_um,
        "detect": {
            "seconds": det_s,
            "tissue_mm2": area,
            "mm2_per_s": det_rate,
            "cells": len(cells),
            "lymphocytes": cells.n_positive,
        },
        "blob_log": {
            "seconds": base["seconds"],
            "tissue_mm2": base["tissue_mm2"],
            "mm2_per_s": base_rate,
            "tiles": base["tiles"],
            "blobs": base["blobs"],
        },
        "ratio_detect_over_blob_log": det_rate / base_rate,
        "rss_mb": {
            "after_imports": rss_ready,
            "peak_after_detect": rss_after_detect,
            "peak_after_blob_log": rss_after_blob,
        },
    }


def section_mapping(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from oncotrace import spatial
    from scipy import ndimage

    rng = np.random.default_rng(0)
    rows, cols, bin_um, mpp = 250, 400, 50.0, 0.5
    yy, xx = np.mgrid[:rows, :cols]
    grid = np.exp(-((xx - 120) ** 2 + (yy - 90) ** 2) / 800.0) + 0.1 * rng.random((rows, cols))
    grid = grid.astype(np.float32)
    grid[:10, :10] = np.nan
    step = bin_um / mpp
    heat = spatial.Heatmap(
        grid=grid,
        origin_level0=(0.0, 0.0),
        cell_size_level0=(step, step),
        mpp=(mpp, mpp),
        level0_size=(int(cols * step), int(rows * step)),
        tile_size_level0=(step, step),
        n_tiles=rows * cols,
    )
    spacing = 0.05
    frame = np.full((600, 800, 3), 40, np.uint8)
    us = spatial.Ultrasound(
        image=frame,
        spacing_mm=(spacing, spacing),
        spacing_source="override",
        region=None,
        frame=0,
        n_frames=1,
        source="<bench>",
    )
    # landmarks over the section, a rotation + a gentle bend, 0.05 mm noise
    p_um = rng.uniform([500, 500], [19_500, 12_000], (20, 2))
    th = np.deg2rad(15)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    us_mm = (p_um / 1000) @ rot.T + [10.0, 5.0]
    us_mm[:, 1] += 0.4 * np.sin(p_um[:, 0] / 4000)
    us_mm += rng.normal(0, 0.05, us_mm.shape)
    marks = spatial.landmarks_from_arrays(pathology_um=p_um, ultrasound_mm=us_mm)
    regs = {
        "affine": spatial.fit_landmarks(marks, model="affine", bin_um=bin_um),
        "tps": spatial.fit_landmarks(marks, model="tps", bin_um=bin_um),
    }

    def best(fn: Callable[[], object], n: int = 5) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    # baseline: coordinates already known (affine), one map_coordinates pass
    h, w = frame.shape[:2]
    py, px = np.mgrid[:h, :w]
    pts_mm = np.column_stack([px.ravel() * spacing, py.ravel() * spacing])
    src_um = regs["affine"].transform.inverse()(pts_mm)
    cr = np.stack([src_um[:, 1] / bin_um - 0.5, src_um[:, 0] / bin_um - 0.5])
    filled = np.nan_to_num(grid)
    bare = best(lambda: ndimage.map_coordinates(filled, cr, order=1, cval=np.nan))
    out: dict[str, Any] = {
        "heatmap_bins": int(grid.size),
        "frame_px": [w, h],
        "baseline_map_coordinates_s": bare,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, reg in regs.items():
            mapped = spatial.to_ultrasound(heat, reg, us)
            out[f"{name}_s"] = best(lambda reg=reg: spatial.to_ultrasound(heat, reg, us))
            out[f"{name}_write_s"] = best(
                lambda reg=reg: spatial.to_ultrasound(heat, reg, us, Path(tmp) / "m"), n=3
            )
            out[f"{name}_over_baseline"] = out[f"{name}_s"] / bare
            out[f"{name}_finite_fraction"] = float(np.isfinite(mapped.grid).mean())
            out[f"{name}_loo_tre_mm"] = reg.report["chosen"]["loo_tre_mm"]
    return out


def _print_mapping(r: dict[str, Any]) -> None:
    print(
        f"mapping {r['heatmap_bins']} bins onto {r['frame_px'][0]}×{r['frame_px'][1]} px: "
        f"bare map_coordinates {r['baseline_map_coordinates_s'] * 1e3:.0f} ms; "
        f"affine {r['affine_s'] * 1e3:.0f} ms ({r['affine_over_baseline']:.1f}×, with files "
        f"{r['affine_write_s'] * 1e3:.0f} ms); thin-plate spline {r['tps_s'] * 1e3:.0f} ms "
        f"({r['tps_over_baseline']:.1f}×, with files {r['tps_write_s'] * 1e3:.0f} ms); target ≤ 1000 ms"
    )


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "detection": section_detection,
    "mapping": section_mapping,
}


def _print_detection(r: dict[str, Any]) -> None:
    s, d, b = r["slide"], r["detect"], r["blob_log"]
    print(
        f"slide {s['size_px']}² px at {MPP} µm/px, {s['tissue_mm2_planted']:.1f} mm² planted tissue, "
        f"{s['planted_cells']} cells ({s['planted_lymphocytes']} lymphocytes); rendered in "
        f"{s['render_s']:.0f} s, {s['file_mb']:.0f} MB JPEG TIFF"
    )
    print(
        f"(a) detect_immune_cells: {d['seconds']:.1f} s for {d['tissue_mm2']:.1f} mm² = "
        f"{d['mm2_per_s']:.2f} mm²/s; {d['cells']} cells, {d['lymphocytes']} lymphocytes"
    )
    print(
        f"(b) blob_log baseline:   {b['seconds']:.1f} s for {b['tissue_mm2']:.1f} mm² = "
        f"{b['mm2_per_s']:.2f} mm²/s; {b['blobs']} blobs in {b['tiles']} tiles"
    )
    m = r["rss_mb"]
    print(
        f"ratio (a)/(b) = {r['ratio_detect_over_blob_log']:.2f}; peak RSS {m['after_imports']:.0f} MB "
        f"after imports, {m['peak_after_detect']:.0f} MB after (a), "
        f"{m['peak_after_blob_log']:.0f} MB after (b)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in px (0.5 µm/px)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("SECTION", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        t0 = time.perf_counter()
        made = make_slide(args.make, args.size)
        made["render_s"] = time.perf_counter() - t0
        args.make.with_suffix(".json").write_text(json.dumps(made))
        return
    if args.child:
        name, out = args.child
        Path(out).write_text(json.dumps(SECTIONS[name](args)))
        return

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "planted.tif"
        if "detection" in args.sections:
            # Rendered in its own process: its memory must not count as the detector's.
            cmd = [sys.executable, __file__, "--size", str(args.size), "--make", str(slide)]
            subprocess.run(cmd, check=True)
        for name in args.sections:
            out = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                __file__,
                "--size",
                str(args.size),
                "--workers",
                str(args.workers),
            ]
            proc = subprocess.Popen([*cmd, "--slide", str(slide), "--child", name, str(out)])
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"section {name} failed with status {status}")
            results[name] = json.loads(out.read_text())
            results[name]["child_peak_rss_mb"] = usage.ru_maxrss / 1e3
    if "detection" in results:
        _print_detection(results["detection"])
    if "mapping" in results:
        _print_mapping(results["mapping"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
