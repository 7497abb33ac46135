"""Generated slides with known content, for tests, benchmarks and the demo.

A generated slide is a tiled pyramidal TIFF (successive IFDs, reduced levels marked with
NewSubfileType=1, resolution tags in centimetres) that cuCIM, OpenSlide and tifffile all read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

BACKGROUND = (244, 243, 245)


@dataclass(frozen=True)
class PlantedSlide:
    """Where the tissue of a generated slide is.

    Attributes
    ----------
    path : the TIFF written.
    mpp : level-0 µm/px.
    size : level-0 (width, height).
    squares : (K, 4) int64 ndarray of level-0 ``(x, y, w, h)`` tissue squares.
    """

    path: Path
    mpp: float
    size: tuple[int, int]
    squares: np.ndarray


def he_texture(shape: tuple[int, int], rng: np.random.Generator, *, mpp: float = 0.5) -> np.ndarray:
    """H&E-like RGB texture: eosin-pink stroma with hematoxylin-purple nuclei of ~7 µm."""
    h, w = shape
    base = np.empty((h, w, 3), np.float32)
    base[...] = (232, 160, 200)
    base += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    n_nuclei = max(1, int(h * w * (mpp**2) / 400))  # ~1 nucleus per 20×20 µm
    ys = rng.integers(0, h, n_nuclei)
    xs = rng.integers(0, w, n_nuclei)
    r = max(1.0, 3.5 / mpp)
    yy, xx = np.mgrid[-int(r) - 1 : int(r) + 2, -int(r) - 1 : int(r) + 2]
    disk = (yy**2 + xx**2) <= r * r
    dy, dx = yy[disk], xx[disk]
    py = np.clip(ys[:, None] + dy[None, :], 0, h - 1).ravel()
    px = np.clip(xs[:, None] + dx[None, :], 0, w - 1).ravel()
    base[py, px] = (110, 60, 150)
    return np.clip(base, 0, 255).astype(np.uint8)


def _pyramid(img: np.ndarray, levels: int, factor: int) -> list[np.ndarray]:
    out = [img]
    for _ in range(1, levels):
        prev = out[-1]
        w, h = prev.shape[1] // factor, prev.shape[0] // factor
        if min(w, h) < 16:
            break
        out.append(np.asarray(Image.fromarray(prev).resize((w, h), Image.Resampling.BOX)))
    return out


def write_pyramid_tiff(
    path: str | Path,
    level0: np.ndarray,
    *,
    mpp: float | None,
    levels: int = 3,
    factor: int = 4,
    tile: int = 256,
    compression: Literal["jpeg", "zlib", "none"] = "zlib",
    description: str | None = None,
) -> Path:
    """Write ``level0`` (H, W, 3) uint8 as a tiled pyramidal TIFF; ``mpp=None`` writes no unit."""
    path = Path(path)
    comp = None if compression == "none" else compression
    comp_args = {"level": 90} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, img in enumerate(_pyramid(level0, levels, factor)):
            kwargs: dict[str, object] = {}
            if mpp is not None:
                level_mpp = mpp * level0.shape[1] / img.shape[1]
                kwargs["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
                kwargs["resolutionunit"] = "CENTIMETER"
            else:
                kwargs["resolutionunit"] = "NONE"
            tw.write(
                img,
                photometric="rgb",
                tile=(tile, tile),
                compression=comp,
                compressionargs=comp_args or None,
                subfiletype=1 if i else 0,
                description=description if i == 0 else None,
                metadata=None,
                **kwargs,  # type: ignore[arg-type]
            )
    return path


def make_tissue_squares(
    path: str | Path,
    *,
    size: tuple[int, int] = (4096, 3072),
    mpp: float = 0.25,
    squares: list[tuple[int, int, int, int]] | None = None,
    seed: int = 0,
    levels: int = 3,
    compression: Literal["jpeg", "zlib", "none"] = "zlib",
) -> PlantedSlide:
    """A slide with H&E-textured squares at known level-0 ``(x, y, w, h)`` on glass."""
    rng = np.random.default_rng(seed)
    w, h = size
    if squares is None:
        squares = [(448, 448, 896, 896), (2240, 896, 1344, 896), (896, 2016, 896, 448)]
    img = np.empty((h, w, 3), np.uint8)
    img[...] = BACKGROUND
    img += rng.integers(0, 3, (h, w, 1), dtype=np.uint8)
    for x, y, sw, sh in squares:
        img[y : y + sh, x : x + sw] = he_texture((sh, sw), rng, mpp=mpp)
    write_pyramid_tiff(path, img, mpp=mpp, levels=levels, compression=compression)
    return PlantedSlide(Path(path), mpp, (w, h), np.asarray(squares, np.int64).reshape(-1, 4))
