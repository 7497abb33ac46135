"""Landmarks and fit_landmarks against known transforms, planted noise and planted mistakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from oncotrace.spatial import (
    LandmarkError,
    Registration,
    fit_landmarks,
    landmarks_from_arrays,
    load_landmarks,
)

MPP = (0.5, 0.5)  # µm per slide pixel
SPACING = (0.1, 0.1)  # mm per ultrasound pixel


def true_affine(rng: np.random.Generator) -> np.ndarray:
    """Slide µm -> ultrasound mm: rotation, 0.8-1.2 mm/mm scale, translation inside the image."""
    angle = rng.uniform(-0.5, 0.5)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = np.eye(3)
    m[:2, :2] = rot @ np.diag(rng.uniform(0.8, 1.2, 2)) * 1e-3
    m[:2, 2] = rng.uniform(5, 10, 2)
    return m


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ m[:2, :2].T + m[:2, 2]


def bent(p_um: np.ndarray) -> np.ndarray:
    """A smooth bend: 1 mm/mm plus y += 1.5 mm * sin(x / 4 mm)."""
    out = p_um * 1e-3 + 5.0
    out[:, 1] += 1.5 * np.sin(p_um[:, 0] / 4000.0)
    return out


def grid_points(rng: np.random.Generator, jitter: float = 800.0) -> np.ndarray:
    """20 fit points on a jittered 5 x 4 grid over 20 x 15 mm of slide."""
    xs, ys = np.meshgrid(np.linspace(0, 20_000, 5), np.linspace(0, 15_000, 4))
    return np.c_[xs.ravel(), ys.ravel()] + 1000 + rng.uniform(-jitter, jitter, (20, 2))


def write_json(path: Path, points: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"points": points}))
    return path


def basic_points() -> list[dict[str, Any]]:
    """Four points: p1..p3 in px, p4 in physical units; truth: 1 mm/mm and +2 mm."""
    pts_um = np.array([[1000.0, 1000.0], [9000.0, 2000.0], [3000.0, 8000.0], [7000.0, 7000.0]])
    pts_mm = pts_um / 1000 + 2.0
    out: list[dict[str, Any]] = []
    for k, (p, q) in enumerate(zip(pts_um, pts_mm, strict=True)):
        if k < 3:
            out.append(
                {
                    "id": f"p{k + 1}",
                    "pathology_px": (p / MPP).tolist(),
                    "ultrasound_px": (q / SPACING).tolist(),
                }
            )
        else:
            out.append(
                {
                    "id": f"p{k + 1}",
                    "pathology_um": p.tolist(),
                    "ultrasound_mm": q.tolist(),
                    "role": "fit",
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_json_and_csv_loaders_agree_and_convert_units(tmp_path: Path) -> None:
    points = basic_points()
    lm = load_landmarks(
        write_json(tmp_path / "l.json", points), slide_mpp=MPP, us_spacing_mm=SPACING
    )
    expected_um = np.array([[1000.0, 1000.0], [9000.0, 2000.0], [3000.0, 8000.0], [7000.0, 7000.0]])
    np.testing.assert_allclose(lm.pathology_um, expected_um)
    np.testing.assert_allclose(lm.ultrasound_mm, expected_um / 1000 + 2)
    assert lm.ids == ("p1", "p2", "p3", "p4")
    assert lm.roles == ("fit",) * 4
    assert lm.source.endswith("l.json")

    header = (
        "id,pathology_px_x,pathology_px_y,pathology_um_x,pathology_um_y,"
        "ultrasound_px_x,ultrasound_px_y,ultrasound_mm_x,ultrasound_mm_y,role"
    )
    rows = [header]
    for p in points:
        cells = [p["id"]]
        for key in ("pathology_px", "pathology_um", "ultrasound_px", "ultrasound_mm"):
            cells += [str(v) for v in p[key]] if key in p else ["", ""]
        cells.append(p.get("role", ""))
        rows.append(",".join(cells))
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    from_csv = load_landmarks(csv_path, slide_mpp=MPP, us_spacing_mm=SPACING)
    np.testing.assert_allclose(from_csv.pathology_um, lm.pathology_um)
    np.testing.assert_allclose(from_csv.ultrasound_mm, lm.ultrasound_mm)
    assert from_csv.ids == lm.ids and from_csv.roles == lm.roles


def test_px_with_mpp_and_um_give_the_same_transform() -> None:
    rng = np.random.default_rng(11)
    p_um = grid_points(rng)
    q_mm = bent(p_um)
    mpp, spacing = (0.25, 0.3), (0.08, 0.12)
    physical = landmarks_from_arrays(pathology_um=p_um, ultrasound_mm=q_mm)
    pixels = landmarks_from_arrays(
        pathology_px=p_um / mpp,
        ultrasound_px=q_mm / spacing,
        slide_mpp=mpp,
        us_spacing_mm=spacing,
    )
    probe = rng.uniform(2000, 18_000, (200, 2))
    for model in ("affine", "tps"):
        a = fit_landmarks(physical, model=model)
        b = fit_landmarks(pixels, model=model)
        np.testing.assert_allclose(b.transform(probe), a.transform(probe), rtol=0, atol=1e-9)
    # The pixel chain slide_px -> us_px of the registration agrees with the physical one.
    reg = fit_landmarks(pixels, model="tps")
    chain = reg.pixel_transform(mpp, spacing)
    np.testing.assert_allclose(chain(probe / mpp), reg.transform(probe) / spacing, atol=1e-9)


def _mutate(points: list[dict[str, Any]], k: int, **changes: Any) -> list[dict[str, Any]]:
    out = [dict(p) for p in points]
    for key, value in changes.items():
        if value is None:
            out[k].pop(key, None)
        else:
            out[k][key] = value
    return out


BAD_FILES: dict[str, tuple[list[dict[str, Any]], dict[str, Any], str]] = {
    "nan": (_mutate(basic_points(), 3, pathology_um=[float("nan"), 1.0]), {}, "not finite"),
    "inf": (_mutate(basic_points(), 3, ultrasound_mm=[1.0, float("inf")]), {}, "not finite"),
    "duplicate id": (_mutate(basic_points(), 1, id="p1"), {}, "appears twice"),
    "empty id": (_mutate(basic_points(), 1, id=""), {}, "id"),
    "duplicate position": (
        _mutate(basic_points(), 3, pathology_um=[1000.0, 1000.0]),
        {},
        "same pathology position",
    ),
    "unknown role": (_mutate(basic_points(), 0, role="test"), {}, "'fit' or 'holdout'"),
    "missing ultrasound": (_mutate(basic_points(), 3, ultrasound_mm=None), {}, "no ultrasound"),
    "ultrasound in µm": (
        _mutate(basic_points(), 3, ultrasound_mm=None, ultrasound_um=[9000.0, 9000.0]),
        {},
        "ultrasound_mm",
    ),
    "px and um disagree": (
        _mutate(basic_points(), 0, pathology_um=[1500.0, 1000.0]),
        {},
        "disagree",
    ),
    "pair of three": (_mutate(basic_points(), 3, pathology_um=[1.0, 2.0, 3.0]), {}, "two numbers"),
    "outside slide": (_mutate(basic_points(), 0, pathology_px=[30_000.0, 2000.0]), {}, "outside"),
    "outside ultrasound": (
        _mutate(basic_points(), 3, ultrasound_mm=[-5.0, 9.0]),
        {},
        "outside",
    ),
    "missing mpp": (basic_points(), {"slide_mpp": None}, "slide_mpp="),
    "missing spacing": (basic_points(), {"us_spacing_mm": None}, "us_spacing_mm="),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_every_bad_file_is_rejected_with_file_and_point(tmp_path: Path, case: str) -> None:
    points, overrides, message = BAD_FILES[case]
    path = write_json(tmp_path / "bad.json", points)
    kwargs: dict[str, Any] = {
        "slide_mpp": MPP,
        "us_spacing_mm": SPACING,
        "slide_size_px": (20_000, 20_000),
        "us_size_px": (200, 200),
    }
    kwargs.update(overrides)
    with pytest.raises(LandmarkError, match=message) as info:
        load_landmarks(path, **kwargs)
    assert "bad.json" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("pathology_um", [1e308, 2000.0], "pathology_um [1e+308, 2000.0]"),
        ("pathology_um", [1e200, 2000.0], "pathology_um [1e+200, 2000.0]"),
        ("pathology_px", [1e308, 400.0], "pathology_px [1e+308, 400.0]"),  # overflows × mpp
        ("ultrasound_mm", [3.0, -2e6], "ultrasound_mm [3.0, -2000000.0]"),  # µm typed as mm
        ("ultrasound_px", [40.0, 1e308], "ultrasound_px [40.0, 1e+308]"),
    ],
)
def test_an_absurd_coordinate_is_refused_naming_the_point(
    tmp_path: Path, field: str, value: list[float], named: str
) -> None:
    # was: a point at 1e308 µm made every pair of the *other* points "the same position"
    points = _mutate(basic_points(), 2, **{field: value})
    if field.endswith("_px"):  # only the pixel position, so nothing disagrees with it
        points[2].pop(field.replace("_px", "_um" if "pathology" in field else "_mm"), None)
    path = write_json(tmp_path / "huge.json", points)
    for kwargs in ({}, {"slide_size_px": (20_000, 20_000), "us_size_px": (200, 200)}):
        with pytest.raises(LandmarkError) as info:
            load_landmarks(path, slide_mpp=MPP, us_spacing_mm=SPACING, **kwargs)
        text = str(info.value)
        assert "huge.json" in text and "'p3'" in text and named in text, text
        assert "same" not in text and "Fix" in text


def test_an_absurd_csv_coordinate_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text(
        "id,pathology_um_x,pathology_um_y,ultrasound_mm_x,ultrasound_mm_y\n"
        "a,100,100,1,1\nb,9000,200,9,1.2\nc,300,8000,1.3,8\nd,1e308,50,5,5\n"
    )
    with pytest.raises(LandmarkError, match=r"l\.csv: point 'd' \(line 5\): pathology_um"):
        load_landmarks(path)


def test_landmarks_built_directly_are_bounded_too() -> None:
    from oncotrace.spatial import Landmarks

    good = landmarks_from_arrays(
        pathology_um=[[0, 0], [1000, 0], [0, 1000]], ultrasound_mm=[[0, 0], [1, 0], [0, 1]]
    )
    doc = good.to_dict()
    doc["points"][1]["ultrasound_mm"] = [1e308, 0.0]
    with pytest.raises(LandmarkError, match=r"point 'p2' \(#2\): ultrasound_mm \[1e\+308"):
        Landmarks.from_dict(doc)


def test_duplicates_are_still_found_among_points_a_metre_apart() -> None:
    # the duplicate tolerance is relative to the spread: the largest spread allowed keeps it
    # far below a pixel, so two distinct points 1 µm apart are not "the same"
    far = [[-999_000.0, 0.0], [999_000.0, 5.0], [0.0, 900_000.0]]
    us = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert (
        len(landmarks_from_arrays(pathology_um=[*far, [1.0, 1.0]], ultrasound_mm=[*us, [2, 2]]))
        == 4
    )
    with pytest.raises(LandmarkError, match="'p1' and 'p4' have the same pathology position"):
        landmarks_from_arrays(pathology_um=[*far, far[0]], ultrasound_mm=[*us, [2, 2]])


def test_malformed_files_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(LandmarkError, match="not valid JSON"):
        load_landmarks(bad)
    bad.write_text('[{"id": "p1"}]')
    with pytest.raises(LandmarkError, match="points"):
        load_landmarks(bad)
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("id,pathology_x,pathology_y\np1,1,2\n")
    with pytest.raises(LandmarkError, match="header"):
        load_landmarks(csv_path)
    csv_path.write_text(
        "id,pathology_um_x,pathology_um_y,ultrasound_mm_x,ultrasound_mm_y\np1,1,x,1,1\n"
    )
    with pytest.raises(LandmarkError, match="line 2"):
        load_landmarks(csv_path)
    txt = tmp_path / "l.txt"
    txt.write_text("x")
    with pytest.raises(LandmarkError, match=r"\.json or \.csv"):
        load_landmarks(txt)


# --------------------------------------------------------------------------------------------
# Fitting: planted truths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_affine_is_recovered(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = true_affine(rng)
    p = rng.uniform(0, 20_000, (4 + seed, 2))
    reg = fit_landmarks(landmarks_from_arrays(pathology_um=p, ultrasound_mm=apply(truth, p)))
    assert reg.model == "affine"
    matrix = np.asarray(reg.transform.to_dict()["matrix"])
    np.testing.assert_allclose(matrix, truth, rtol=0, atol=1e-6 * np.abs(truth).max())
    assert reg.report["rmse_fit_mm"] < 1e-9
    assert reg.report["reflection"] is False
    expected_scale = np.sqrt(abs(np.linalg.det(truth[:2, :2]))) * 1000
    assert reg.report["scale_mm_per_mm"] == pytest.approx(expected_scale, rel=1e-9)


def test_holdout_tre_matches_the_noise_it_was_given() -> None:
    """Noise sigma per axis on the ultrasound positions only; affine fit on 10 points.

    For a held-out point with design row x_p = (x, y, 1), the fitted position's error per axis
    has variance sigma^2 h_p with h_p = x_p^T (X^T X)^-1 x_p, and its own observed position
    adds sigma^2, independently; so E|TRE|^2 = 2 sigma^2 (1 + h_p). The test compares the mean
    squared TRE over 20 seeds x 20 held-out points (400 chi-square(2) draws: ~5 % standard
    error) with the mean of that expectation.
    """
    sigma = 0.2  # mm
    observed, expected = [], []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        truth = true_affine(rng)
        p_fit = rng.uniform(0, 20_000, (10, 2))
        p_hold = rng.uniform(0, 20_000, (20, 2))
        p = np.r_[p_fit, p_hold]
        q = apply(truth, p) + rng.normal(0, sigma, p.shape)
        lm = landmarks_from_arrays(
            pathology_um=p, ultrasound_mm=q, roles=["fit"] * 10 + ["holdout"] * 20
        )
        reg = fit_landmarks(lm, model="affine")
        per_point = reg.report["holdout_tre_mm"]["per_point"]
        observed += [per_point[f"p{k + 11}"] ** 2 for k in range(20)]
        design = np.c_[p_fit, np.ones(10)]
        inv = np.linalg.inv(design.T @ design)
        x_hold = np.c_[p_hold, np.ones(20)]
        leverage = np.einsum("ij,jk,ik->i", x_hold, inv, x_hold)
        expected += list(2 * sigma**2 * (1 + leverage))
    ratio = np.mean(observed) / np.mean(expected)
    assert 0.8 < ratio < 1.25, ratio


def test_spline_beats_affine_on_a_smooth_bend_without_noise() -> None:
    rng = np.random.default_rng(21)
    p_fit = grid_points(rng)
    p_hold = rng.uniform(2500, 19_500, (40, 2))  # inside the fit points' hull
    p = np.r_[p_fit, p_hold]
    lm = landmarks_from_arrays(
        pathology_um=p, ultrasound_mm=bent(p), roles=["fit"] * 20 + ["holdout"] * 40
    )
    auto = fit_landmarks(lm)
    affine = fit_landmarks(lm, model="affine")
    assert auto.model == "tps"
    assert auto.report["min_jacobian_det"] > 0
    tps_tre = auto.report["holdout_tre_mm"]["mean"]
    affine_tre = affine.report["holdout_tre_mm"]["mean"]
    assert tps_tre < 0.4 * affine_tre, (tps_tre, affine_tre)
    assert auto.report["loo_tre_mm"]["tps"] < auto.report["loo_tre_mm"]["affine"]


def test_regularised_spline_is_no_worse_than_affine_under_noise() -> None:
    """Affine truth + 0.3 mm noise: the LOO-chosen smoothing must not overfit the noise."""
    tps_tre, affine_tre = [], []
    for seed in range(8):
        rng = np.random.default_rng(300 + seed)
        truth = true_affine(rng)
        p = np.r_[grid_points(rng), rng.uniform(2500, 19_500, (30, 2))]
        q = apply(truth, p) + rng.normal(0, 0.3, p.shape)
        lm = landmarks_from_arrays(
            pathology_um=p, ultrasound_mm=q, roles=["fit"] * 20 + ["holdout"] * 30
        )
        tps_tre.append(fit_landmarks(lm, model="tps").report["holdout_tre_mm"]["mean"])
        affine_tre.append(fit_landmarks(lm, model="affine").report["holdout_tre_mm"]["mean"])
    assert np.mean(tps_tre) <= 1.05 * np.mean(affine_tre), (np.mean(tps_tre), np.mean(affine_tre))


def test_holdout_points_do_not_enter_the_fit() -> None:
    rng = np.random.default_rng(5)
    truth = true_affine(rng)
    p = rng.uniform(0, 20_000, (8, 2))
    q = apply(truth, p)
    q[7] += [3.0, -4.0]  # a 5 mm mistake on the held-out point
    lm = landmarks_from_arrays(pathology_um=p, ultrasound_mm=q, roles=["fit"] * 7 + ["holdout"])
    reg = fit_landmarks(lm, bin_um=500.0)
    np.testing.assert_allclose(reg.transform(p[:7]), q[:7], atol=1e-9)
    assert reg.report["holdout_tre_mm"]["per_point"]["p8"] == pytest.approx(5.0, abs=1e-9)
    bin_mm = 0.5 * reg.report["scale_mm_per_mm"]
    assert reg.report["tre_over_bin"]["holdout_max"] == pytest.approx(5.0 / bin_mm, rel=1e-9)
    assert reg.report["n_fit"] == 7 and reg.report["n_holdout"] == 1


def folding_landmarks() -> Any:
    """A 3 x 3 grid (2 mm pitch) whose centre is pulled past its right-hand neighbour."""
    xs, ys = np.meshgrid([0.0, 2000.0, 4000.0], [0.0, 2000.0, 4000.0])
    p = np.c_[xs.ravel(), ys.ravel()] + 1000
    q = p / 1000
    q[4, 0] += 3.0  # centre now lies 1 mm beyond its right neighbour: the map must fold
    return landmarks_from_arrays(pathology_um=p, ultrasound_mm=q)


def test_a_folding_spline_is_refused_or_avoided() -> None:
    lm = folding_landmarks()
    with pytest.raises(LandmarkError, match="folds"):
        fit_landmarks(lm, model="tps", smoothing=0.0)
    reg = fit_landmarks(lm)
    assert reg.report["min_jacobian_det"] > 0
    interpolating = [c for c in reg.report["candidates"] if c["smoothing"] == 0.0]
    assert interpolating[0]["folds"] is True
    assert interpolating[0]["min_jacobian_det"] < 0


def test_auto_warns_when_the_best_spline_folds() -> None:
    """A planted map that really folds (x += 5.2 mm sin(x / 4 mm), dx'/dx < 0 in places): the
    interpolating spline has the lowest LOO TRE but must not be used, and the report says so."""
    xs, ys = np.meshgrid(np.linspace(0, 20_000, 8), np.linspace(0, 20_000, 6))
    p = np.c_[xs.ravel(), ys.ravel()]
    q = p / 1000
    q[:, 0] += 5.2 * np.sin(p[:, 0] / 4000)
    with pytest.warns(UserWarning, match="folds"):
        reg = fit_landmarks(landmarks_from_arrays(pathology_um=p, ultrasound_mm=q))
    assert reg.report["min_jacobian_det"] > 0
    assert reg.smoothing != 0.0
    assert "folds" in reg.report["warnings"][0]


# --------------------------------------------------------------------------------------------
# Fitting: rejections
# --------------------------------------------------------------------------------------------


def _rejection_case(name: str) -> tuple[Any, dict[str, Any], str]:
    rng = np.random.default_rng(7)
    truth = true_affine(rng)
    p = rng.uniform(0, 20_000, (8, 2))
    q = apply(truth, p)
    roles = ["fit"] * 8
    kwargs: dict[str, Any] = {}
    if name == "two pairs":
        roles = ["fit", "fit"] + ["holdout"] * 6
        match = "needs at least 3"
    elif name == "five pairs for tps":
        roles = ["fit"] * 5 + ["holdout"] * 3
        kwargs = {"model": "tps"}
        match = "needs at least 6"
    elif name == "collinear slide":
        p = np.c_[np.linspace(0, 20_000, 8), np.linspace(0, 10_000, 8) + rng.normal(0, 1e-3, 8)]
        q = apply(truth, p) + rng.normal(0, 0.01, p.shape)
        match = "collinear"
    elif name == "reflection":
        q = apply(truth, p * [1, -1])
        match = "mirror"
    elif name == "ultrasound in cm":
        # (in µm, 1000x, the positions lie beyond 1 m and are refused on reading)
        q = q / 10
        match = "ultrasound_mm is not in cm"
    elif name == "slide in pixels of a 0.25 mpp scan given as µm":
        p = p * 4
        q = apply(truth, p / 4)
        p = p / 16  # i.e. px / 4 read as µm -> 16x too small
        match = "slide_mpp="
    elif name == "smoothing with affine":
        kwargs = {"model": "affine", "smoothing": 1.0}
        match = "smoothing"
    else:  # pragma: no cover
        raise AssertionError(name)
    lm = landmarks_from_arrays(pathology_um=p, ultrasound_mm=q, roles=roles)
    return lm, kwargs, match


@pytest.mark.parametrize(
    "name",
    [
        "two pairs",
        "five pairs for tps",
        "collinear slide",
        "reflection",
        "ultrasound in cm",
        "slide in pixels of a 0.25 mpp scan given as µm",
        "smoothing with affine",
    ],
)
def test_fit_rejections(name: str) -> None:
    lm, kwargs, match = _rejection_case(name)
    with pytest.raises(ValueError, match=match):
        fit_landmarks(lm, **kwargs)


def test_reflection_is_accepted_when_allowed() -> None:
    lm, _, _ = _rejection_case("reflection")
    reg = fit_landmarks(lm, allow_reflection=True)
    assert reg.report["reflection"] is True
    np.testing.assert_allclose(reg.transform(lm.pathology_um), lm.ultrasound_mm, atol=1e-9)


# --------------------------------------------------------------------------------------------
# registration.json
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["affine", "tps"])
def test_registration_round_trip_gives_identical_mapping(tmp_path: Path, model: str) -> None:
    rng = np.random.default_rng(31)
    p = np.r_[grid_points(rng), rng.uniform(2500, 19_500, (5, 2))]
    lm = landmarks_from_arrays(
        pathology_um=p, ultrasound_mm=bent(p), roles=["fit"] * 20 + ["holdout"] * 5
    )
    reg = fit_landmarks(lm, model=model, bin_um=256.0)  # type: ignore[arg-type]
    path = reg.write_json(tmp_path / "registration.json")
    assert [f.name for f in tmp_path.iterdir()] == ["registration.json"]  # no temporary left
    back = Registration.read_json(path)
    probe = rng.uniform(2000, 20_000, (300, 2))
    np.testing.assert_array_equal(back.transform(probe), reg.transform(probe))
    y = reg.transform(probe)
    np.testing.assert_array_equal(back.transform.inverse()(y), reg.transform.inverse()(y))
    assert back.model == reg.model and back.smoothing == reg.smoothing
    assert back.report == json.loads(json.dumps(reg.report))
    assert back.landmarks.ids == lm.ids and back.landmarks.roles == lm.roles
    np.testing.assert_array_equal(back.landmarks.pathology_um, lm.pathology_um)
    doc = json.loads(path.read_text())
    assert (doc["source"], doc["target"]) == ("slide_um", "us_mm")
    with pytest.raises(ValueError, match="registration"):
        Registration.from_dict({"format": "something else"})
