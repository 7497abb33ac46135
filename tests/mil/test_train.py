"""Training and evaluation: planted signals are learnt, noise is not, bad inputs are refused."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from oncotrace import mil
from oncotrace.mil import (
    CohortData,
    binary_metrics,
    cross_validate,
    fit,
    load_cohort,
    load_model,
    predict,
    save_model,
)
from sklearn.metrics import roc_auc_score

D = 16
TASKS = {"label": ("neg", "pos")}
SMALL = {"hidden": 32, "attn_dim": 16, "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Bags of a few dozen instances: thread start-up costs more than it saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bags(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Noise bags; positives hold 2-5 instances shifted along the first 4 features."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rng.shuffle(y)
    bags, planted = [], []
    for label in y:
        m = int(rng.integers(15, 40))
        bag = rng.normal(size=(m, D)).astype(np.float32)
        where = np.zeros(m, bool)
        if label:
            where[rng.choice(m, int(rng.integers(2, 6)), replace=False)] = True
            bag[where, :4] += 3.0
        bags.append(bag)
        planted.append(where)
    return bags, y.astype(np.int64), planted


def test_fit_learns_planted_signal() -> None:
    bags, y, _ = _bags(60, seed=0)
    vb, vy, _ = _bags(20, seed=1)
    tb, ty, planted = _bags(40, seed=2)
    model, hist = fit(
        bags,
        {"label": y},
        tasks=TASKS,
        in_dim=D,
        epochs=15,
        lr=1e-3,
        val=(vb, {"label": vy}),
        patience=4,
        head_options=SMALL,
    )
    assert hist["epochs_run"] <= 25 and len(hist["val_loss"]) == hist["epochs_run"]
    assert hist["val_loss"][hist["best_epoch"]] == min(hist["val_loss"])
    proba, attention = predict(model, tb)
    assert proba["label"].shape == (40, 2)
    np.testing.assert_allclose(proba["label"].sum(1), 1.0, rtol=1e-6)
    assert roc_auc_score(ty, proba["label"][:, 1]) >= 0.95
    # The most attended instance of a positive bag is a planted one.
    top_hit = [planted[i][np.argmax(attention[i]["label"])] for i in np.flatnonzero(ty)]
    assert np.mean(top_hit) >= 0.8


def test_shuffled_labels_give_chance_auc() -> None:
    bags, y, _ = _bags(60, seed=3)
    tb, ty, _ = _bags(60, seed=4)
    # Shuffled so that exactly half of each true class is labelled positive: the labels carry
    # no information about the planted signal (a plain permutation keeps a chance correlation
    # that a strong signal turns into a high AUC).
    rng = np.random.default_rng(0)
    shuffled = np.zeros_like(y)
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        shuffled[idx[: idx.size // 2]] = 1
    model, _ = fit(
        bags,
        {"label": shuffled},
        tasks=TASKS,
        in_dim=D,
        epochs=10,
        lr=1e-3,
        head_options=SMALL,
    )
    proba, _ = predict(model, tb)
    auc = binary_metrics(ty, proba["label"][:, 1], n_boot=300).metrics["auc"]
    assert auc.low <= 0.5 <= auc.high


def test_fit_is_reproducible_and_checks_labels() -> None:
    bags, y, _ = _bags(10, seed=5)
    kw = dict(tasks=TASKS, in_dim=D, epochs=2, head_options=SMALL, max_instances=8)
    m1, _ = fit(bags, {"label": y}, **kw)  # type: ignore[arg-type]
    m2, _ = fit(bags, {"label": y}, **kw)  # type: ignore[arg-type]
    p1, _ = predict(m1, bags)
    p2, _ = predict(m2, bags)
    np.testing.assert_array_equal(p1["label"], p2["label"])
    with pytest.raises(ValueError, match=r"must lie in -1\.\.1"):
        fit(bags, {"label": y + 1}, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected"):
        fit([b[:, :3] for b in bags], {"label": y}, **kw)  # type: ignore[arg-type]


def _cohort_data(n: int, seed: int, covariates: bool = False) -> CohortData:
    bags, y, _ = _bags(n, seed)
    rng = np.random.default_rng(seed)
    k = 2 if covariates else 0
    # Two slides per patient, both of the patient's class (n divisible by 4).
    patients = np.empty(n, dtype=object)
    patients[np.argsort(y, kind="stable")] = [f"P{j // 2}" for j in range(n)]
    return CohortData(
        slide_ids=np.array([f"S{i}" for i in range(n)]),
        patient_ids=patients.astype(str),
        sites=np.array(["AB"[int(p[1:]) % 2] for p in patients]),
        bags=bags,
        coords=[np.zeros((len(b), 2), np.int64) for b in bags],
        tile_size_level0=np.full(n, 224, np.int64),
        labels={"label": y},
        class_names={"label": TASKS["label"]},
        covariates=rng.normal(size=(n, k)).astype(np.float32) if covariates else None,
        covariate_names=("age", "sex")[:k],
        covariate_mean=np.full(k, 60.0),
        covariate_std=np.full(k, 10.0),
        encoder="toy",
        in_dim=D,
    )


def test_cross_validate_out_of_fold() -> None:
    data = _cohort_data(40, seed=6)
    ev = cross_validate(data, k=4, epochs=15, lr=1e-3, n_boot=200, head_options=SMALL)
    assert np.array_equal(ev.case_idx, np.arange(40))
    assert set(ev.fold.tolist()) == {0, 1, 2, 3}
    for f in range(4):  # each patient tested in exactly one fold
        assert not set(data.patient_ids[ev.fold == f]) & set(data.patient_ids[ev.fold != f])
    m = ev.metrics["label"]
    assert m.n_groups == 20 and m.metrics["auc"].estimate >= 0.95
    ev_site = cross_validate(
        data, split="site", epochs=2, val_fraction=0, n_boot=50, head_options=SMALL
    )
    assert set(ev_site.fold.tolist()) == {0, 1}


def test_save_load_round_trip(tmp_path: Path) -> None:
    data = _cohort_data(12, seed=7, covariates=True)
    model, hist = fit(
        data.bags,
        data.labels,
        tasks=data.class_names,
        in_dim=D,
        covariates=data.covariates,
        epochs=2,
        head_options=SMALL,
    )
    p1, a1 = predict(model, data.bags, data.covariates)
    save_model(tmp_path / "m", model, {"epochs": 2, "history": hist}, {"auc": 0.5}, data=data)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"model.json", "model.safetensors", "ood.safetensors"}
    loaded, card = load_model(tmp_path / "m")
    p2, a2 = predict(loaded, data.bags, data.covariates)
    np.testing.assert_array_equal(p1["label"], p2["label"])
    np.testing.assert_array_equal(a1[3]["label"], a2[3]["label"])
    on_disk = json.loads((tmp_path / "m" / "model.json").read_text())
    assert on_disk == card.to_dict()
    assert on_disk["tasks"] == {"label": ["neg", "pos"]}
    assert on_disk["encoder"] == {"name": "toy", "dim": D}
    assert on_disk["covariates"]["names"] == ["age", "sex"]
    assert on_disk["covariates"]["mean"] == [60.0, 60.0]
    assert on_disk["training"]["epochs"] == 2 and on_disk["metrics"] == {"auc": 0.5}
    assert on_disk["config"]["covariates"] == 2
    assert on_disk["format_version"] == mil.ModelCard.read(tmp_path / "m").format_version == 3
    assert card.tasks == {"label": ("neg", "pos")}
    assert card.encoder == mil.ModelEncoder("toy", D)
    assert card.covariates.names == ("age", "sex") and card.covariates.mean == (60.0, 60.0)
    assert card.training["epochs"] == 2 and card.metrics == {"auc": 0.5}


# ---------------------------------------------------------------------------- load_cohort

ENC, ENC_DIM = "pathomics", 89


def _store(root: Path, sid: str, feats: np.ndarray, encoder: str = ENC, name: str = ENC) -> None:
    g = zarr.open_group(root / f"{sid}.zarr", mode="w")
    g.attrs["oncotrace"] = {"complete": True, "tile_size_level0": [224.0, 224.0]}
    g.create_array("coords", data=np.arange(2 * len(feats), dtype=np.int64).reshape(-1, 2))
    arr = g.require_group("features").create_array(name, data=feats)
    arr.attrs.update({"complete": True, "encoder": {"name": encoder, "dim": feats.shape[1]}})


def _write(tmp: Path, rows: list[dict[str, str]], feats: dict[str, np.ndarray] | None = None):
    stores = tmp / "stores"
    rng = np.random.default_rng(0)
    for r in rows:
        f = (feats or {}).get(r["slide_id"])
        _store(
            stores, r["slide_id"], rng.normal(size=(5, ENC_DIM)).astype("f4") if f is None else f
        )
    path = tmp / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return stores, path


def _rows(n: int = 6) -> list[dict[str, str]]:
    return [
        {
            "slide_id": f"S{i}",
            "patient_id": f"P{i}",
            "site": "AB"[i % 2],
            "label": ["benign", "malignant"][i % 2],
            "age": str(50 + 3 * i),
            "sex": "MF"[i % 3 == 0],
        }
        for i in range(n)
    ]


def test_load_cohort_reads_and_standardises(tmp_path: Path) -> None:
    stores, csv_path = _write(tmp_path, _rows())
    d = load_cohort(stores, csv_path, ENC, ["label"], ["age", "sex"])
    assert len(d) == 6 and d.in_dim == ENC_DIM and d.bags[0].shape == (5, ENC_DIM)
    assert d.class_names == {"label": ("benign", "malignant")}
    assert d.labels["label"].tolist() == [0, 1, 0, 1, 0, 1]
    assert d.tile_size_level0.tolist() == [224] * 6
    assert d.covariates is not None
    ages = 50 + 3 * np.arange(6)
    assert d.covariate_mean[0] == pytest.approx(ages.mean())
    np.testing.assert_allclose(d.covariates[:, 0], (ages - ages.mean()) / ages.std(), rtol=1e-5)
    sex = np.array([1.0 if i % 3 == 0 else 0.0 for i in range(6)])  # F = 1
    np.testing.assert_allclose(
        d.covariates[:, 1] * d.covariate_std[1] + d.covariate_mean[1], sex, atol=1e-6
    )


def test_load_cohort_errors(tmp_path: Path) -> None:
    rows = _rows()
    stores, csv_path = _write(tmp_path / "a", rows)
    (stores / "S2.zarr" / "zarr.json").unlink()
    import shutil

    shutil.rmtree(stores / "S2.zarr")
    with pytest.raises(FileNotFoundError, match=r"\['S2'\].*tile and embed"):
        load_cohort(stores, csv_path, ENC)

    one = [dict(r, label="benign") for r in rows]
    stores, csv_path = _write(tmp_path / "b", one)
    with pytest.raises(ValueError, match="task 'label' has 1 class"):
        load_cohort(stores, csv_path, ENC)

    nan = np.ones((5, ENC_DIM), "f4")
    nan[3, 7] = np.nan
    stores, csv_path = _write(tmp_path / "c", rows, {"S1": nan})
    with pytest.raises(ValueError, match=r"S1\.zarr: NaN/inf.*rows \[3\]"):
        load_cohort(stores, csv_path, ENC)

    stores, csv_path = _write(tmp_path / "d", rows, {"S0": np.ones((5, 32), "f4")})
    with pytest.raises(ValueError, match=r"shape \(5, 32\).*dim 89"):
        load_cohort(stores, csv_path, ENC)

    stores, csv_path = _write(tmp_path / "e", rows)
    _store(stores, "S4", np.ones((5, ENC_DIM), "f4"), encoder="uni")
    with pytest.raises(ValueError, match="written by encoder 'uni'"):
        load_cohort(stores, csv_path, ENC)

    stores, csv_path = _write(tmp_path / "f", rows)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['bmi'\]"):
        load_cohort(stores, csv_path, ENC, ["label"], ["bmi"])
    with pytest.raises(ValueError, match="covariate 'site' is not numeric"):
        load_cohort(stores, csv_path, ENC, ["label"], ["site"])


@pytest.mark.parametrize("missing", ["", "NA", "nan", "NaN", "N/A", "n/a", "null", "#N/A", " NA "])
def test_a_missing_label_is_ignored_for_its_task_only(tmp_path: Path, missing: str) -> None:
    rows = _rows()
    for i, r in enumerate(rows):
        r["grade"] = ("g1", "g2")[i % 2]
    rows[2]["label"] = missing
    rows[5]["grade"] = missing
    stores, csv_path = _write(tmp_path, rows)
    d = load_cohort(stores, csv_path, ENC, ["label", "grade"])
    # no extra class; -1 exactly where the cell was missing, the case kept for the other task
    assert d.class_names == {"label": ("benign", "malignant"), "grade": ("g1", "g2")}
    assert d.labels["label"].tolist() == [0, 1, -1, 1, 0, 1]
    assert d.labels["grade"].tolist() == [0, 1, 0, 1, 0, -1]
    assert len(d) == 6


def test_a_row_shorter_than_the_header_has_a_missing_label(tmp_path: Path) -> None:
    rows = [
        {k: v for k, v in r.items() if k in ("slide_id", "patient_id", "label")} for r in _rows()
    ]
    stores, csv_path = _write(tmp_path, rows)
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0]  # S0 without its label cell
    csv_path.write_text("\n".join(lines) + "\n")
    d = load_cohort(stores, csv_path, ENC, ["label"])
    assert d.labels["label"].tolist() == [-1, 1, 0, 1, 0, 1]


def test_one_class_in_two_letter_cases_is_refused_naming_both(tmp_path: Path) -> None:
    rows = _rows()
    rows[4]["label"] = "Benign"  # the others say benign
    stores, csv_path = _write(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_cohort(stores, csv_path, ENC, ["label"])
    text = str(err.value)
    assert str(csv_path) in text and "'label'" in text
    assert "'Benign'" in text and "'benign'" in text and "Fix:" in text


@pytest.mark.parametrize("column", ["slide_id", "patient_id"])
def test_a_labels_file_without_an_id_column_names_it(tmp_path: Path, column: str) -> None:
    stores, csv_path = _write(tmp_path, _rows())
    renamed = "Slide ID" if column == "slide_id" else "patient"
    lines = csv_path.read_text().splitlines()
    lines[0] = lines[0].replace(column, renamed)
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_cohort(stores, csv_path, ENC, ["label"], ["age"])
    text = str(err.value)
    assert str(csv_path) in text and f"no {column!r} column" in text and renamed in text
    assert "covariate" not in text  # the fix is the header, not the covariate names


@pytest.mark.parametrize(("cell", "expect"), [("inf", "'inf'"), ("-Infinity", "'-Infinity'")])
def test_a_non_finite_covariate_names_the_file_column_and_row(
    tmp_path: Path, cell: str, expect: str
) -> None:
    rows = _rows()
    rows[3]["age"] = cell
    stores, csv_path = _write(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_cohort(stores, csv_path, ENC, ["label"], ["age"])
    text = str(err.value)
    assert str(csv_path) in text and "covariate 'age'" in text and expect in text
    assert "data row 4 (line 5)" in text and "Fix:" in text and "model" not in text


@pytest.mark.parametrize("cell", ["", "NA", "NaN", "n/a"])
def test_a_missing_covariate_is_refused_not_read_as_nan(tmp_path: Path, cell: str) -> None:
    rows = _rows()
    rows[1]["age"] = cell
    stores, csv_path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=r"covariate 'age' is missing .* data row 2") as err:
        load_cohort(stores, csv_path, ENC, ["label"], ["age"])
    assert str(csv_path) in str(err.value) and "impute" in str(err.value)


@pytest.mark.parametrize("split", ["kfold", "holdout"])
def test_training_runs_with_missing_labels(tmp_path: Path, split: str) -> None:
    # 18 slides of 17 patients: S1 (label missing) is P3's second slide, S5 (NA) a patient with
    # no label at all -- one unlabelled patient, fewer than the 3 folds. Was: the split made
    # '-1' a class ("class(es) {'-1': 1} have fewer patients than the 3 folds") or refused P3
    # ("different labels ('1' and '-1')").
    rows = _rows(18)
    for i, r in enumerate(rows):
        r["grade"] = "low" if i % 3 else "high"
    rows[1].update(label="", patient_id="P3")
    rows[5]["label"] = "NA"
    stores, csv_path = _write(tmp_path, rows)
    config = mil.TrainConfig(
        tasks=("label", "grade"), split=split, folds=3, epochs=1, n_boot=10, head="mean"
    )
    result = mil.train_model(stores, csv_path, config)
    assert result.card.tasks == {"label": ("benign", "malignant"), "grade": ("high", "low")}
    ev = result.evaluation
    if split == "kfold":  # every slide is evaluated, the unlabelled ones for 'grade'
        assert sorted(ev.case_idx.tolist()) == list(range(18))
    fold_of = dict(zip(ev.case_idx.tolist(), ev.fold.tolist(), strict=True))
    assert fold_of.get(1) == fold_of.get(3)  # P3's two slides are tested together (or neither)
    assert np.isfinite(ev.proba["grade"]).all()


def test_load_cohort_custom_features_no_site_column_and_model_classes(tmp_path: Path) -> None:
    # Features imported under a name no encoder is registered as: the stores set the dim.
    rows = [{k: v for k, v in r.items() if k != "site"} for r in _rows()]
    _, csv_path = _write(tmp_path, rows)
    custom = tmp_path / "custom"
    rng = np.random.default_rng(1)
    for r in rows:
        _store(custom, r["slide_id"], rng.normal(size=(4, 12)).astype("f4"), "conch", "conch")
    d = load_cohort(custom, csv_path, "conch")
    assert d.in_dim == 12 and d.bags[0].shape == (4, 12)
    assert d.sites.tolist() == [""] * 6  # no site column: allowed, but no site split
    with pytest.raises(ValueError, match="site split needs at least two sites"):
        cross_validate(d, split="site", epochs=1)
    _store(custom, "S3", np.ones((4, 10), "f4"), "conch", "conch")
    with pytest.raises(ValueError, match=r"S3\.zarr: features/conch have shape \(4, 10\)"):
        load_cohort(custom, csv_path, "conch")

    # An external cohort of one class, indexed in the model's class order.
    one = [dict(r, label="malignant") for r in rows]
    stores, csv_path = _write(tmp_path / "one", one)
    model_classes = {"label": ("benign", "malignant")}
    d = load_cohort(stores, csv_path, ENC, class_names=model_classes)
    assert d.class_names == model_classes and d.labels["label"].tolist() == [1] * 6
    other = [dict(r, label="lymphoma") for r in rows]
    stores, csv_path = _write(tmp_path / "other", other)
    with pytest.raises(ValueError, match=r"\['lymphoma'\] the model does not know"):
        load_cohort(stores, csv_path, ENC, class_names=model_classes)


# ---------------------------------------------------------------------------- end to end


def test_phantom_end_to_end(tmp_path: Path) -> None:
    """The issue's acceptance run: >= 40 phantom patients, default pathomics encoder, grouped CV.

    Three classes, each carried only by its planted morphology (glands, sheets, spindle cells),
    as in an origin task: every slide has evidence for its class, so attention is scored on all.
    """
    from oncotrace import wsi
    from oncotrace.mil import embed
    from oncotrace.mil.phantom import make_cohort

    t0 = time.perf_counter()
    classes = ("benign", "malignant", "sarcoma")
    cohort = make_cohort(tmp_path / "c", n_cases=42, classes=classes, size_px=(3072, 2048), seed=1)
    for path in cohort.slide_paths:
        embed(wsi.tile_slide(path, tmp_path / "stores").store, ENC)
    t_data = time.perf_counter() - t0
    data = load_cohort(tmp_path / "stores", cohort.labels_csv, ENC, ["label"], ["age", "sex"])
    assert len(np.unique(data.patient_ids)) == 42
    kw: dict = {"k": 4, "epochs": 30, "lr": 1e-3, "n_boot": 200}
    kw["head_options"] = {"hidden": 64, "attn_dim": 32}
    ev = cross_validate(data, **kw)
    auc = ev.metrics["label"].metrics["auc_macro"].estimate
    inside: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for j, i in enumerate(ev.case_idx):
        att = ev.attention[j]["label"]
        sid, xy, ts = str(data.slide_ids[i]), data.coords[i], int(data.tile_size_level0[i])
        top = np.argsort(-att)[: max(1, int(np.ceil(0.1 * len(att))))]
        label = data.class_names["label"][data.labels["label"][i]]
        inside[label].append(cohort.tile_in_region(sid, xy, ts)[top])
    in_region = float(np.concatenate([a for v in inside.values() for a in v]).mean())
    per_class = {c: round(float(np.concatenate(v).mean()), 2) for c, v in inside.items()}

    # Shuffled labels (by patient, so patients stay whole): the AUC's 95 % CI must hold 0.5.
    rng = np.random.default_rng(7)
    patients = np.unique(data.patient_ids)
    new_label = dict(zip(patients, rng.permutation(np.arange(patients.size) % 3), strict=True))
    shuffled = replace(
        data, labels={"label": np.array([new_label[p] for p in data.patient_ids], np.int64)}
    )
    null = cross_validate(shuffled, **kw).metrics["label"].metrics["auc_macro"]
    print(
        f"phantom: {len(data)} slides of 42 patients, data {t_data:.1f}s, total "
        f"{time.perf_counter() - t0:.1f}s; macro AUC {auc:.3f}; top-10% attention tiles >= 50% "
        f"inside the planted region {in_region:.2f} {per_class}; shuffled labels macro AUC "
        f"{null.estimate:.3f} [{null.low:.3f}, {null.high:.3f}]"
    )
    assert auc >= 0.95
    assert in_region >= 0.8
    assert null.low <= 0.5 <= null.high


def _multimodal(n: int, seed: int) -> tuple[list[dict[str, np.ndarray | None]], np.ndarray]:
    """Slides (D=16) carry no signal; ultrasound frames (D=8) carry it in 1-3 frames of positives.

    One case in four has no ultrasound: the head must still give a prediction from the slide.
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    cases: list[dict[str, np.ndarray | None]] = []
    for i, label in enumerate(y):
        slide = rng.normal(size=(int(rng.integers(20, 40)), D)).astype(np.float32)
        frames = rng.normal(size=(int(rng.integers(6, 12)), 8)).astype(np.float32)
        if label:
            frames[rng.choice(len(frames), int(rng.integers(1, 4)), replace=False), :3] += 3.0
        cases.append({"slide": slide, "ultrasound": None if i % 4 == 3 else frames})
    return cases, y


def test_multimodal_bags_fuse_the_modality_that_carries_the_signal() -> None:
    dims = {"slide": D, "ultrasound": 8}
    train, y = _multimodal(80, seed=0)
    test, ty = _multimodal(40, seed=1)
    model, _ = fit(
        train, {"label": y}, tasks=TASKS, in_dim=dims, epochs=10, lr=2e-3, head_options=SMALL
    )
    proba, attention = predict(model, test)
    with_us = np.array([c["ultrasound"] is not None for c in test])
    assert roc_auc_score(ty[with_us], proba["label"][with_us, 1]) >= 0.9
    # Without the informative modality the model has nothing to go on: near chance.
    assert set(attention[0]["label"]) == {"slide", "ultrasound"}
    assert set(attention[3]["label"]) == {"slide"}  # absent modality, absent attention
    for case, att in zip(test, attention, strict=True):
        for m, a in att["label"].items():
            assert a.shape == (len(case[m]),) and abs(float(a.sum()) - 1) < 1e-5
    # Refusals: a single-bag case for a multi-modal head, and an unknown modality.
    with pytest.raises(TypeError, match="multi-modal"):
        fit([np.zeros((3, D), np.float32)], {"label": np.array([0])}, tasks=TASKS, in_dim=dims)
    with pytest.raises(ValueError, match="unknown modalities"):
        fit(
            [{"mri": np.zeros((3, 4), np.float32)}],
            {"label": np.array([0])},
            tasks=TASKS,
            in_dim=dims,
        )


def test_instance_features_are_standardised_with_training_stats(tmp_path: Path) -> None:
    # Pathomics-like scales: the signal lives in a feature of scale 1e-2, next to features of
    # scale 1e3 and a constant one.
    bags, y, _ = _bags(60, seed=3)
    scale = np.array([1e-2] * 4 + [1e3] * (D - 5) + [0.0], np.float32)
    offset = np.array([0.5] * 4 + [2e3] * (D - 5) + [7.0], np.float32)
    bags = [b * scale + offset for b in bags]
    model, _ = fit(
        bags, {"label": y}, tasks=TASKS, in_dim=D, epochs=12, lr=1e-3, head_options=SMALL
    )
    inst = np.concatenate(bags).astype(np.float64)
    norm = model.input_norm["bag"]
    np.testing.assert_allclose(norm.mean.numpy(), inst.mean(0), rtol=1e-5)
    std = inst.std(0)
    np.testing.assert_allclose(norm.scale.numpy()[:-1], 1 / std[:-1], rtol=1e-4)
    assert norm.scale.numpy()[-1] == 0  # constant in training: ignored, not divided by 0
    tb, ty, _ = _bags(40, seed=4)
    proba, _ = predict(model, [b * scale + offset for b in tb])
    assert roc_auc_score(ty, proba["label"][:, 1]) >= 0.9
    # The statistics travel with the saved weights.
    save_model(tmp_path / "m", model)
    again, _ = load_model(tmp_path / "m")
    np.testing.assert_array_equal(again.input_norm["bag"].scale.numpy(), norm.scale.numpy())
