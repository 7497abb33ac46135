"""Transforms: checked against known maps, scipy's own spline and finite differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
from oncotrace.spatial import (
    Affine,
    Sequence,
    ThinPlateSpline,
    Transform,
    slide_px_to_um,
    slide_px_to_um_transform,
    transform_from_dict,
    us_px_to_mm,
    us_px_to_mm_transform,
)
from scipy.interpolate import RBFInterpolator


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """Rotation, anisotropic scale ~1e-3 (µm -> mm), shear and translation in mm."""
    angle = rng.uniform(-np.pi, np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lin = rot @ np.array(
        [[rng.uniform(0.7, 1.4), rng.uniform(-0.2, 0.2)], [0, rng.uniform(0.7, 1.4)]]
    )
    m = np.eye(3)
    m[:2, :2] = lin * 1e-3
    m[:2, 2] = rng.uniform(-20, 20, 2)
    return m


def bent(points_um: np.ndarray) -> np.ndarray:
    """A smooth non-affine map µm -> mm: scale 1e-3 plus y += 1.5 mm * sin(x / 4 mm)."""
    out = points_um * 1e-3
    out[:, 1] += 1.5 * np.sin(points_um[:, 0] / 4000.0)
    return out


def finite_difference_jacobian(t: Transform, pts: np.ndarray, h: float) -> np.ndarray:
    cols = [(t(pts + h * e) - t(pts - h * e)) / (2 * h) for e in np.eye(2)]
    return np.stack(cols, axis=2)


def landmark_grid() -> np.ndarray:
    xs, ys = np.meshgrid(np.linspace(0, 20_000, 5), np.linspace(0, 15_000, 4))
    rng = np.random.default_rng(3)
    return np.c_[xs.ravel(), ys.ravel()] + rng.uniform(-800, 800, (20, 2))


@pytest.mark.parametrize("n", [4, 7, 25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_fit_recovers_random_affine(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = random_affine(rng)
    src = rng.uniform(0, 30_000, (n, 2))
    dst = src @ truth[:2, :2].T + truth[:2, 2]
    fitted = Affine.fit(src, dst, source="slide_um", target="us_mm")
    np.testing.assert_allclose(fitted.matrix, truth, rtol=0, atol=1e-6 * np.abs(truth).max())
    probe = rng.uniform(-10_000, 40_000, (50, 2))
    np.testing.assert_allclose(fitted(probe), probe @ truth[:2, :2].T + truth[:2, 2], atol=1e-9)


def test_affine_fit_rejects_collinear_points() -> None:
    src = np.c_[np.arange(5.0), 2 * np.arange(5.0)]
    with pytest.raises(ValueError, match="non-collinear"):
        Affine.fit(src, src, source="a", target="b")


def test_affine_inverse_jacobian_and_single_point() -> None:
    m = random_affine(np.random.default_rng(5))
    a = Affine(m, "slide_um", "us_mm")
    pts = np.random.default_rng(6).uniform(0, 10_000, (30, 2))
    inv = a.inverse()
    assert (inv.source, inv.target) == ("us_mm", "slide_um")
    np.testing.assert_allclose(inv(a(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(a(inv(a(pts))), a(pts), atol=1e-12)
    np.testing.assert_allclose(a.jacobian(pts), np.broadcast_to(m[:2, :2], (30, 2, 2)))
    single = a(pts[0])
    assert single.shape == (2,)
    np.testing.assert_allclose(single, m[:2, :2] @ pts[0] + m[:2, 2])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        a(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="last row"):
        Affine(np.ones((3, 3)), "a", "b")
    with pytest.raises(ValueError, match="singular"):
        Affine(np.diag([1.0, 0.0, 1.0]), "a", "b").inverse()


def test_unit_conversions_are_plain_scales() -> None:
    pts = np.array([[10.0, 20.0], [0.0, 3.0]])
    np.testing.assert_allclose(slide_px_to_um(pts, (0.5, 0.25)), [[5.0, 5.0], [0.0, 0.75]])
    np.testing.assert_allclose(us_px_to_mm(pts, 0.1), [[1.0, 2.0], [0.0, 0.3]])
    t = slide_px_to_um_transform(0.5)
    assert (t.source, t.target) == ("slide_px", "slide_um")
    u = us_px_to_mm_transform((0.2, 0.3))
    assert (u.source, u.target) == ("us_px", "us_mm")
    with pytest.raises(ValueError, match="mpp"):
        slide_px_to_um_transform(-1.0)


@pytest.mark.parametrize("smoothing", [0.0, 1e6, 1e9])
def test_spline_equals_scipy_rbf_and_interpolates(smoothing: float) -> None:
    src = landmark_grid()
    dst = bent(src)
    tps = ThinPlateSpline(src, dst, smoothing, "slide_um", "us_mm")
    probe = np.random.default_rng(4).uniform(-5000, 25_000, (2000, 2))
    reference = RBFInterpolator(
        src, dst, kernel="thin_plate_spline", degree=1, smoothing=smoothing
    )(probe)
    np.testing.assert_allclose(tps(probe), reference, rtol=0, atol=1e-10)
    if smoothing == 0.0:
        np.testing.assert_allclose(tps(src), dst, atol=1e-10)
    # A spline's Jacobian must match central differences of its own values.
    h = 1.0  # µm; the map changes on a 4 mm scale
    np.testing.assert_allclose(
        tps.jacobian(probe[:200]), finite_difference_jacobian(tps, probe[:200], h), atol=1e-9
    )


def test_spline_evaluates_at_landmarks_exactly() -> None:
    src = landmark_grid()
    tps = ThinPlateSpline(src, bent(src), 0.0, "slide_um", "us_mm")
    jac = tps.jacobian(src)  # gradient of r^2 log r at r = 0 must be finite (it is 0)
    assert np.all(np.isfinite(jac))


@pytest.mark.parametrize("smoothing", [0.0, 1e7])
def test_spline_inverse_round_trip_within_hull(smoothing: float) -> None:
    src = landmark_grid()
    tps = ThinPlateSpline(src, bent(src), smoothing, "slide_um", "us_mm")
    inv = tps.inverse()
    assert (inv.source, inv.target) == ("us_mm", "slide_um")
    assert inv.inverse() is tps
    rng = np.random.default_rng(8)
    x = rng.uniform([1000, 1000], [19_000, 14_000], (5000, 2))  # inside the landmark hull
    y = tps(x)
    back = inv(y)
    spread_mm = 20.0
    np.testing.assert_allclose(tps(back), y, rtol=0, atol=1e-6 * spread_mm)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-3)  # µm: the map is one-to-one here
    # The inverse's Jacobian is the matrix inverse of the forward one.
    np.testing.assert_allclose(
        inv.jacobian(y[:50]) @ tps.jacobian(x[:50]),
        np.broadcast_to(np.eye(2), (50, 2, 2)),
        atol=1e-6,
    )


def test_sequence_chains_and_inverts() -> None:
    src = landmark_grid()
    tps = ThinPlateSpline(src, bent(src), 0.0, "slide_um", "us_mm")
    chain = Sequence(
        [slide_px_to_um_transform(0.5), tps, us_px_to_mm_transform((0.1, 0.12)).inverse()]
    )
    assert (chain.source, chain.target) == ("slide_px", "us_px")
    px = np.random.default_rng(9).uniform([2000, 2000], [38_000, 28_000], (300, 2))
    expected = tps(px * 0.5) / [0.1, 0.12]
    np.testing.assert_allclose(chain(px), expected, atol=1e-6)
    inv = chain.inverse()
    assert (inv.source, inv.target) == ("us_px", "slide_px")
    np.testing.assert_allclose(chain(inv(chain(px))), chain(px), atol=1e-6)
    np.testing.assert_allclose(inv(chain(px)), px, atol=1e-3)
    np.testing.assert_allclose(
        chain.jacobian(px[:40]), finite_difference_jacobian(chain, px[:40], 1.0), atol=1e-7
    )
    with pytest.raises(ValueError, match="cannot chain"):
        Sequence([tps, slide_px_to_um_transform(0.5)])
    nested = Sequence([Sequence([slide_px_to_um_transform(0.5)]), tps])
    assert len(nested.transforms) == 2


def test_to_dict_round_trip_gives_identical_mapping() -> None:
    src = landmark_grid()
    tps = ThinPlateSpline(src, bent(src), 1e6, "slide_um", "us_mm")
    transforms = [
        Affine(random_affine(np.random.default_rng(1)), "slide_um", "us_mm"),
        tps,
        tps.inverse(),
        Sequence([slide_px_to_um_transform(0.25), tps]),
    ]
    probe_um = np.random.default_rng(2).uniform(1000, 14_000, (100, 2))
    for t in transforms:
        text = json.dumps(t.to_dict(), allow_nan=False)
        back = transform_from_dict(json.loads(text))
        assert type(back) is type(t)
        assert (back.source, back.target) == (t.source, t.target)
        probe = bent(probe_um) if t.source == "us_mm" else probe_um
        np.testing.assert_array_equal(back(probe), t(probe))
    with pytest.raises(ValueError, match="unknown transform type"):
        transform_from_dict({"type": "projective", "source": "a", "target": "b"})
    with pytest.raises(ValueError, match="missing the field"):
        transform_from_dict({"type": "affine", "source": "a", "target": "b"})
