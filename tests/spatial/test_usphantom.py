"""The phantom ultrasound frame: the specimen sits where the true pose says, and darker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from oncotrace import spatial


def test_phantom_frame_holds_the_specimen_at_its_true_pose(tmp_path: Path) -> None:
    size_um = (1024.0, 768.0)
    ph = spatial.render_ultrasound_phantom(size_um, angle_deg=20, seed=3, path=tmp_path / "f.png")
    us = ph.ultrasound
    assert (tmp_path / "f.png").is_file() and us.source == str((tmp_path / "f.png").absolute())
    # the slide's centre maps inside the frame, onto hypoechoic (dark) pixels
    centre_px = us.mm_to_px(ph.truth(np.array([[512.0, 384.0]])))[0]
    w, h = us.size_px
    assert 0 < centre_px[0] < w and 0 < centre_px[1] < h
    grey = us.image[..., 0].astype(float)
    yy, xx = np.mgrid[:h, :w]
    um = ph.truth.inverse()(us.px_to_mm(np.column_stack([xx.ravel(), yy.ravel()])))
    inside = ((um >= 0) & (um <= size_um)).all(axis=1).reshape(h, w)
    assert grey[inside].mean() < 0.75 * grey[~inside].mean()
    # rotation and scale of the truth: 20 degrees, 1 µm -> 0.001 mm
    lin = ph.truth.matrix[:2, :2] * 1000
    assert np.allclose(
        lin, [[np.cos(np.pi / 9), -np.sin(np.pi / 9)], [np.sin(np.pi / 9), np.cos(np.pi / 9)]]
    )
    # the noisy landmarks fit back to the truth within a few noise sigmas
    reg = spatial.fit_landmarks(ph.landmarks, model="affine")
    pts = np.array([[100.0, 100.0], [900.0, 700.0]])
    assert np.abs(reg.transform(pts) - ph.truth(pts)).max() < 0.04
    assert ph.landmarks.roles.count("holdout") == 2
