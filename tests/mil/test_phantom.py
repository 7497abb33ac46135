"""Phantom cohorts: checked against the written files, not against the generator's own numbers."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import zarr
from oncotrace import wsi
from oncotrace.mil.phantom import Cohort, make_cohort
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

N_CASES = 20
SIZE = (2048, 1536)
DARK = 100  # mean RGB below this: a dark (hyperchromatic) nucleus pixel; ordinary nuclei ≈ 107


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return make_cohort(tmp_path_factory.mktemp("phantom"), n_cases=N_CASES, size_px=SIZE, seed=3)


def _rows(c: Cohort) -> list[dict[str, str]]:
    with open(c.labels_csv, newline="") as f:
        return list(csv.DictReader(f))


def _read_level(path: Path, level: int) -> np.ndarray:
    with wsi.open_slide(path) as s:
        w, h = s.level_dimensions[level]
        return s.read_region((0, 0), level, (w, h))


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Not glass, by colour alone: glass is near-grey and bright."""
    f = rgb.astype(np.int16)
    return (f.max(-1) - f.min(-1) > 25) | (f.mean(-1) < 200)


def test_labels_csv_schema_and_counts(cohort: Cohort) -> None:
    rows = _rows(cohort)
    assert list(rows[0]) == ["slide_id", "patient_id", "site", "label", "age", "sex"]
    assert len(rows) == len(cohort)
    assert len({r["slide_id"] for r in rows}) == len(rows)
    patients = {r["patient_id"]: r["label"] for r in rows}
    assert len(patients) == N_CASES
    assert Counter(patients.values()) == {"benign": N_CASES // 2, "malignant": N_CASES // 2}
    per_patient = Counter(r["patient_id"] for r in rows)
    assert set(per_patient.values()) == {1, 2}
    for r in rows:
        assert (cohort.root / "slides" / f"{r['slide_id']}.tif").is_file()
        assert (cohort.root / "masks" / f"{r['slide_id']}.png").is_file()
        assert 18 <= int(r["age"]) <= 100 and r["sex"] in {"F", "M"}
    meta = json.loads((cohort.root / "cohort.json").read_text())
    assert meta["mask_downsample"] == cohort.mask_downsample
    assert meta["mpp"] == 0.5 and meta["size_px"] == list(SIZE)


def test_slides_of_a_patient_share_everything_patient_level(cohort: Cohort) -> None:
    by_patient: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for r in _rows(cohort):
        by_patient[r["patient_id"]].add((r["label"], r["site"], r["age"], r["sex"]))
        assert r["slide_id"].startswith(r["patient_id"])
    assert all(len(v) == 1 for v in by_patient.values())
    assert sum(1 for r in _rows(cohort) if r["slide_id"].endswith("_S2")) >= 3


def test_site_is_not_confounded_with_class(cohort: Cohort) -> None:
    patients = {r["patient_id"]: (r["site"], r["label"]) for r in _rows(cohort)}
    table = Counter(patients.values())
    for site in ("A", "B", "C"):
        n_mal, n_ben = table[(site, "malignant")], table[(site, "benign")]
        assert n_mal + n_ben >= 6
        assert abs(n_mal / (n_mal + n_ben) - 0.5) <= 0.15, (site, n_mal, n_ben)


def test_region_masks_align_with_planted_pixels(cohort: Cohort) -> None:
    ds = cohort.mask_downsample
    checked = Counter[str]()
    for sid in cohort.slide_ids:
        cls = cohort.label_of(sid)
        if checked[cls] == 2:
            continue
        checked[cls] += 1
        with wsi.open_slide(cohort.slide_paths[cohort.slide_ids.index(sid)]) as s:
            assert s.mpp.x == pytest.approx(0.5, rel=1e-3)
            w, h = s.dimensions
            rgb = s.read_region((0, 0), 0, (w, h))
        mask, mds = cohort.region_mask(sid)
        assert mds == ds and mask.shape == (-(-h // ds), -(-w // ds))
        region = np.repeat(np.repeat(mask, ds, 0), ds, 1)[:h, :w]
        outside = _tissue(rgb) & ~region
        dark = rgb.mean(-1) < DARK
        light = rgb.min(-1) > 225
        assert 0.02 < region.mean() < 0.2
        if cls == "malignant":  # sheets of dark nuclei
            assert dark[region].mean() > 0.3 > 0.05 > dark[outside].mean()
        else:  # glands: pale lumens, small nuclei no darker than the background's
            assert light[region].mean() > 0.08 > 0.02 > light[outside].mean()
            assert dark[region].mean() < 0.05
        # One mask pixel off in every direction would still agree; 30 mask pixels must not.
        shifted = np.roll(region, 30 * ds, axis=1)
        measure = dark if cls == "malignant" else light
        assert measure[shifted & outside].mean() < 0.5 * measure[region].mean()
    assert checked == {"benign": 2, "malignant": 2}


def test_tiling_and_tile_in_region(cohort: Cohort, tmp_path: Path) -> None:
    sid = next(s for s in cohort.slide_ids if cohort.label_of(s) == "malignant")
    res = wsi.tile_slide(
        cohort.slide_paths[cohort.slide_ids.index(sid)], tmp_path, wsi.TilingConfig()
    )
    group = zarr.open_group(res.store, mode="r")
    patches = np.asarray(group["patches"])
    coords = np.asarray(group["coords"])
    assert res.n_tiles == len(coords) >= 15
    inside = cohort.tile_in_region(sid, coords, 224)
    assert inside.shape == (len(coords),) and inside.dtype == bool
    assert 0.05 <= inside.mean() <= 0.4
    dark = (patches.mean(-1) < DARK).mean((1, 2))
    assert dark[inside].min() > 0.2 and np.median(dark[~inside]) < 0.05
    # Far off the slide nothing is in the region.
    assert not cohort.tile_in_region(sid, np.array([[10**6, 10**6]]), 224).any()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in {".tif", ".png", ".csv"}
        }

    a = digest(make_cohort(tmp_path / "a", n_cases=3, size_px=(1024, 768), seed=7, workers=1).root)
    b = digest(make_cohort(tmp_path / "b", n_cases=3, size_px=(1024, 768), seed=7, workers=2).root)
    c = digest(make_cohort(tmp_path / "c", n_cases=3, size_px=(1024, 768), seed=8, workers=1).root)
    assert a == b  # also independent of the number of worker processes
    assert a != c


def _slide_features(path: Path) -> tuple[np.ndarray, float]:
    """Per-slide statistics of 224-px tiles (seen on the ×4 level), and the ×16 tissue fraction."""
    rgb = _read_level(path, 1)
    t = 224 // 4
    h, w = (rgb.shape[0] // t) * t, (rgb.shape[1] // t) * t
    tiles = rgb[:h, :w].reshape(h // t, t, w // t, t, 3).swapaxes(1, 2).reshape(-1, t, t, 3)
    keep = _tissue(tiles).mean((1, 2)) > 0.5
    tiles = tiles[keep]
    dark = (tiles.mean(-1) < DARK).mean((1, 2))
    light = (tiles.min(-1) > 225).mean((1, 2))
    feats = np.array([np.quantile(dark, 0.9), dark.mean(), np.quantile(light, 0.9)])
    return feats, float(_tissue(_read_level(path, 2)).mean())


def test_class_is_in_the_tiles_not_in_slide_level_tissue(cohort: Cohort) -> None:
    feats, tissue = zip(*(_slide_features(p) for p in cohort.slide_paths), strict=True)
    x = np.asarray(feats)
    y = cohort.labels
    groups = np.asarray(cohort.patient_ids)
    prob = cross_val_predict(
        LogisticRegression(C=10.0, max_iter=1000),
        (x - x.mean(0)) / x.std(0),
        y,
        groups=groups,
        cv=GroupKFold(4),
        method="predict_proba",
    )[:, 1]
    assert roc_auc_score(y, prob) >= 0.95
    assert abs(roc_auc_score(y, np.asarray(tissue)) - 0.5) <= 0.2


def test_three_class_smear_cohort(tmp_path: Path) -> None:
    c = make_cohort(
        tmp_path,
        n_cases=6,
        classes=("benign", "malignant", "sarcoma"),
        size_px=(1536, 1024),
        mode="smear",
        seed=1,
    )
    assert c.mode == "smear" and c.morphologies == ("gland", "sheet", "spindle")
    assert Counter(c.label_of(s) for s in c.slide_ids).keys() == {"benign", "malignant", "sarcoma"}
    for sid, path in zip(c.slide_ids, c.slide_paths, strict=True):
        rgb = _read_level(path, 1)
        mask, ds = c.region_mask(sid)
        assert ds == 4 and mask.shape == rgb.shape[:2]
        cells = np.abs(rgb.astype(np.int16) - (236, 240, 243)).max(-1) > 15
        assert 0.08 < cells.mean() < 0.45
        assert cells[mask].mean() > 0.5  # the planted region is on cells, not on glass


def test_bad_arguments_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classes"):
        make_cohort(tmp_path, classes=("a",))
    with pytest.raises(ValueError, match="region_fraction"):
        make_cohort(tmp_path, region_fraction=(0.5, 1.2))
    with pytest.raises(ValueError, match="morphologies"):
        make_cohort(tmp_path, classes=("a", "b", "c", "d"))
    c = make_cohort(tmp_path, n_cases=2, size_px=(768, 768), workers=1)
    with pytest.raises(KeyError, match="not in the cohort"):
        c.region_mask("nope")


def test_label_noise_relabels_whole_patients_and_keeps_what_was_planted(tmp_path: Path) -> None:
    from oncotrace.mil.phantom import make_cohort

    noisy = make_cohort(
        tmp_path / "noisy", n_cases=8, size_px=(768, 512), seed=1, workers=1, label_noise=0.25
    )
    clean = make_cohort(tmp_path / "clean", n_cases=8, size_px=(768, 512), seed=1, workers=1)
    assert (clean.labels == clean.planted_labels).all()
    # the slides are the same images; only two patients' (0.25 x 8) recorded labels changed
    np.testing.assert_array_equal(noisy.planted_labels, clean.labels)
    flipped = {
        p
        for p, a, b in zip(noisy.patient_ids, noisy.labels, noisy.planted_labels, strict=True)
        if a != b
    }
    assert len(flipped) == 2
    for p, a, b in zip(noisy.patient_ids, noisy.labels, noisy.planted_labels, strict=True):
        assert (a != b) == (p in flipped)  # every slide of a relabelled patient, none other
    with open(noisy.labels_csv, newline="") as fh:
        recorded = {r["slide_id"]: r["label"] for r in csv.DictReader(fh)}
    assert [recorded[s] for s in noisy.slide_ids] == [noisy.class_names[k] for k in noisy.labels]
    for a, b in zip(noisy.slide_paths, clean.slide_paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
