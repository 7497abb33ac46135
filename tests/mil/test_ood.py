"""Out-of-domain statistics: distances against scikit-learn, calibrated flag rates, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from oncotrace import mil

D = 12


def _bags(n: int, rng: np.random.Generator, shift: float = 0.0) -> list[np.ndarray]:
    """Cases whose tile embeddings scatter around a case mean drawn from one Gaussian."""
    scales = np.linspace(0.5, 20.0, D)  # dims of very different spread, as pathomics has
    out = []
    for _ in range(n):
        mean = rng.normal(size=D) * scales + shift * scales
        out.append(mean + rng.normal(scale=0.1, size=(int(rng.integers(5, 40)), D)) * scales)
    return out


def test_distance_is_t2_plus_normalised_residual_computed_by_svd() -> None:
    """The check's distance recomputed with numpy's SVD: Hotelling T² in the leading K principal
    components of the standardised case means, plus the squared reconstruction error over its
    training mean."""
    rng = np.random.default_rng(0)
    train, new = _bags(40, rng), _bags(7, rng)
    stats = mil.OODStats.fit(train)
    x = np.stack([b.mean(0) for b in train])
    center, scale = x.mean(0), x.std(0)
    z = (x - center) / scale
    k = 40 // 5
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    axes, var = vt[:k], sv[:k] ** 2 / (len(z) - 1)
    q_train = np.mean(np.sum((z - z @ axes.T @ axes) ** 2, axis=1))
    y = (np.stack([b.mean(0) for b in new]) - center) / scale
    t2 = np.sum((y @ axes.T) ** 2 / var, axis=1)
    q = np.sum((y - y @ axes.T @ axes) ** 2, axis=1) / q_train
    np.testing.assert_allclose(stats.distance(new), np.sqrt(t2 + q), rtol=1e-6)
    assert stats.components.shape == (k, D)


def test_the_threshold_flags_about_one_minus_q_of_new_in_domain_cases_and_every_shifted_one() -> (
    None
):
    rng = np.random.default_rng(1)
    stats = mil.OODStats.fit(_bags(300, rng), quantile=0.9)
    # the threshold is the conformal rank of the held-out distances
    rank = int(np.ceil(301 * 0.9))
    assert stats.threshold == np.sort(stats.heldout)[rank - 1] and stats.n_train == 300
    fresh = stats.distance(_bags(2000, rng))
    rate = float(np.mean(fresh > stats.threshold))
    assert 0.05 <= rate <= 0.16, rate  # ~0.10; in-sample distances would give far fewer
    shifted = stats.distance(_bags(50, rng, shift=4.0))
    assert (shifted > stats.threshold).all()
    assert all(stats.check(b).flagged for b in _bags(5, rng, shift=4.0))


def test_few_cases_cap_the_threshold_at_the_largest_held_out_distance() -> None:
    stats = mil.OODStats.fit(_bags(8, np.random.default_rng(2)), quantile=0.99)
    assert stats.threshold == stats.heldout.max()
    with pytest.raises(ValueError, match="at least 5"):
        mil.OODStats.fit(_bags(4, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="12-dim"):
        stats.distance([np.zeros((3, 5))])


def _saved_model(tmp_path: Path) -> Path:
    bags = _training_bags()
    labels = {"label": np.array([0, 1] * 6)}
    model, _ = mil.fit(bags, labels, tasks={"label": ("a", "b")}, in_dim=D, epochs=1)

    data = mil.CohortData(
        slide_ids=np.array([f"s{i}" for i in range(12)]),
        patient_ids=np.array([f"p{i}" for i in range(12)]),
        sites=np.array(["A"] * 12),
        bags=bags,
        coords=[np.zeros((len(b), 2), np.int64) for b in bags],
        tile_size_level0=np.full(12, 448, np.int64),
        labels=labels,
        class_names={"label": ("a", "b")},
        covariates=None,
        covariate_names=(),
        covariate_mean=np.zeros(0),
        covariate_std=np.zeros(0),
        encoder="toy",
        in_dim=D,
    )
    return mil.save_model(tmp_path / "model", model, data=data)


def test_a_saved_model_carries_its_statistics_and_a_damaged_file_says_how_to_recover(
    tmp_path: Path,
) -> None:
    directory = _saved_model(tmp_path)
    _, card = mil.load_model(directory)
    # the statistics read back are those of the training bags, refitted here
    groups = [f"p{i}" for i in range(12)]  # save_model folds by patient
    assert card.ood is not None and card.ood == mil.OODStats.fit(_training_bags(), groups=groups)
    record = json.loads((directory / "model.json").read_text())["ood"]
    assert record["file"] == "ood.safetensors" and record["n_train"] == 12
    assert record["threshold"] == card.ood.threshold

    # a changed statistics file is refused, naming the file and the fix
    (directory / "ood.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="sha256 differs") as info:
        mil.load_model(directory)
    assert "ood.safetensors" in str(info.value) and "Fix:" in str(info.value)
    (directory / "ood.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        mil.load_model(directory)
    # following the fix: without the 'ood' section the model loads, with no check
    meta = json.loads((directory / "model.json").read_text())
    del meta["ood"]
    (directory / "model.json").write_text(json.dumps(meta))
    assert mil.load_model(directory)[1].ood is None


def _training_bags() -> list[np.ndarray]:
    return [b.astype(np.float32) for b in _bags(12, np.random.default_rng(3))]


def test_groups_keep_a_patients_sibling_slides_out_of_the_fit_that_judges_them() -> None:
    """Two near-identical slides per patient: without groups a held-out slide's sibling sits in
    the fit and its distance looks small; with groups the held-out distances are those of new
    patients (compared against distances of freshly drawn patients)."""
    rng = np.random.default_rng(4)
    patients = _bags(15, rng)
    bags = [b + rng.normal(scale=1e-3, size=b.shape) for b in patients for _ in range(2)]
    groups = [i // 2 for i in range(len(bags))]
    leaky = mil.OODStats.fit(bags, quantile=0.9)
    grouped = mil.OODStats.fit(bags, quantile=0.9, groups=groups)
    fresh = grouped.distance(_bags(400, rng))
    assert np.median(leaky.heldout) < 0.9 * np.median(fresh)  # optimistic
    assert abs(np.median(grouped.heldout) - np.median(fresh)) < 0.15 * np.median(fresh)
