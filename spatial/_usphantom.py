"""A phantom B-mode ultrasound frame and landmark pairs from a known slide → ultrasound transform.

Used by ``oncotrace demo`` (no real ultrasound ships with the package) and by tests that need
a frame whose geometry is known exactly. The frame is fully developed speckle (Rayleigh
amplitude, log-compressed) with a hypoechoic lesion where the specimen sits; the landmark pairs
are the slide's landmark points pushed through a known rotation + translation, plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ._landmarks import Landmarks, landmarks_from_arrays
from ._transforms import Affine
from ._ultrasound import Ultrasound


@dataclass(frozen=True, eq=False)
class UltrasoundPhantom:
    """A rendered phantom frame, the true transform and landmark pairs.

    Attributes
    ----------
    ultrasound : the frame with its spacing (``spacing_source == "override"``).
    truth : the true ``slide_um`` → ``us_mm`` transform.
    landmarks : pairs with noise; the last ``n_holdout`` have role ``holdout``.
    """

    ultrasound: Ultrasound
    truth: Affine
    landmarks: Landmarks


def render_ultrasound_phantom(
    slide_size_um: tuple[float, float],
    *,
    spacing_mm: float = 0.01,
    margin_mm: float = 0.6,
    angle_deg: float = 12.0,
    n_fit: int = 6,
    n_holdout: int = 2,
    noise_mm: float = 0.01,
    seed: int = 0,
    path: str | Path | None = None,
) -> UltrasoundPhantom:
    """Render a frame that holds the specimen, rotated by ``angle_deg``, with a margin around it.

    Parameters
    ----------
    slide_size_um : (width, height) of the slide in micrometres (level-0 size × mpp).
    spacing_mm : frame pixel spacing (square pixels). The default 0.01 mm/px is a
        high-frequency probe's scale, so a millimetre-sized phantom slide spans ~100 pixels.
    margin_mm : frame margin around the rotated specimen.
    angle_deg, noise_mm : rotation of the specimen in the frame; landmark noise (per axis, on
        the ultrasound side, as a sonographer's clicks would have).
    n_fit, n_holdout : landmark pairs fitted / held out.
    seed : random seed (speckle, landmark positions, noise).
    path : if given, the frame is saved there as PNG and recorded as the ultrasound's source.

    Returns
    -------
    UltrasoundPhantom
    """
    if n_fit < 3:
        raise ValueError(f"n_fit must be at least 3 for an affine fit, got {n_fit}.")
    rng = np.random.default_rng(seed)
    w_mm, h_mm = slide_size_um[0] / 1000.0, slide_size_um[1] / 1000.0
    th = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    corners = np.array([[0, 0], [w_mm, 0], [0, h_mm], [w_mm, h_mm]]) @ rot.T
    offset = margin_mm - corners.min(axis=0)
    extent = corners.max(axis=0) - corners.min(axis=0) + 2 * margin_mm
    width, height = (int(np.ceil(e / spacing_mm)) for e in extent)
    linear = rot / 1000.0  # µm → mm
    truth = Affine(
        np.array(
            [
                [linear[0, 0], linear[0, 1], offset[0]],
                [linear[1, 0], linear[1, 1], offset[1]],
                [0.0, 0.0, 1.0],
            ]
        ),
        source="slide_um",
        target="us_mm",
    )
    image = _speckle_frame(width, height, spacing_mm, truth, slide_size_um, rng)
    n = n_fit + n_holdout
    # spread the points: a jittered grid over the inner 80 % of the slide
    side = int(np.ceil(np.sqrt(n)))
    gx, gy = np.meshgrid(np.linspace(0.1, 0.9, side), np.linspace(0.1, 0.9, side))
    cells = np.column_stack([gx.ravel(), gy.ravel()])[rng.permutation(side * side)[:n]]
    p_um = (cells + rng.uniform(-0.04, 0.04, cells.shape)) * np.asarray(slide_size_um)
    us_mm = truth(p_um) + rng.normal(0.0, noise_mm, p_um.shape)
    source = "<phantom>"
    if path is not None:
        Image.fromarray(image).save(path)
        source = str(Path(path).absolute())  # resolves from any working directory
    ultrasound = Ultrasound(
        image=image,
        spacing_mm=(spacing_mm, spacing_mm),
        spacing_source="override",
        region=None,
        frame=0,
        n_frames=1,
        source=source,
    )
    landmarks = landmarks_from_arrays(
        pathology_um=p_um,
        ultrasound_mm=us_mm,
        ids=[f"p{i + 1}" for i in range(n)],
        roles=["fit"] * n_fit + ["holdout"] * n_holdout,
        us_size_px=(width, height),
        us_spacing_mm=spacing_mm,
    )
    return UltrasoundPhantom(ultrasound=ultrasound, truth=truth, landmarks=landmarks)


def _speckle_frame(
    width: int,
    height: int,
    spacing_mm: float,
    truth: Affine,
    slide_size_um: tuple[float, float],
    rng: np.random.Generator,
) -> NDArray[np.uint8]:
    from scipy import ndimage

    # Rayleigh speckle: |complex Gaussian| smoothed to a resolution cell of ~2 px
    field = rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))
    amp = np.abs(
        ndimage.gaussian_filter(field.real, 1.2) + 1j * ndimage.gaussian_filter(field.imag, 1.2)
    )
    # the specimen is hypoechoic: darker inside its outline in the frame
    yy, xx = np.mgrid[:height, :width]
    pts_mm = np.column_stack([xx.ravel() * spacing_mm, yy.ravel() * spacing_mm])
    um = truth.inverse()(pts_mm)
    inside = (
        (um[:, 0] >= 0)
        & (um[:, 0] <= slide_size_um[0])
        & (um[:, 1] >= 0)
        & (um[:, 1] <= slide_size_um[1])
    ).reshape(height, width)
    gain = np.where(ndimage.gaussian_filter(inside.astype(float), 3) > 0.5, 0.25, 1.0)
    depth = np.linspace(1.0, 0.6, height)[:, None]  # attenuation with depth
    db = 20 * np.log10(amp * gain * depth + 1e-6)
    grey = np.clip((db - db.max() + 45) / 45, 0, 1) * 255
    rgb: NDArray[np.uint8] = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return rgb
