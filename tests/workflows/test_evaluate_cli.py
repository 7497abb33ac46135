"""`oncotrace train` then `oncotrace evaluate` on stores with planted feature signals."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from oncotrace.workflows.cli import app
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

ENC, DIM = "pathomics", 89
GRADES = ("g1", "g2", "g3")


def _store(root: Path, sid: str, feats: np.ndarray, encoder: str = ENC) -> None:
    g = zarr.open_group(root / f"{sid}.zarr", mode="w")
    g.attrs["oncotrace"] = {"complete": True, "tile_size_level0": [224.0, 224.0]}
    g.create_array("coords", data=np.arange(2 * len(feats), dtype=np.int64).reshape(-1, 2))
    arr = g.require_group("features").create_array(encoder, data=feats)
    arr.attrs.update({"complete": True, "encoder": {"name": encoder, "dim": feats.shape[1]}})


def _cohort(root: Path, n_patients: int, seed: int, prefix: str) -> tuple[Path, Path]:
    """Stores + labels.csv. Malignant bags carry a few tiles shifted along features 0-3; the
    grade shifts features 4-7 of every tile by the grade index. Every third patient has two
    slides."""
    rng = np.random.default_rng(seed)
    stores = root / "stores"
    rows = []
    for p in range(n_patients):
        label = ("benign", "malignant")[p % 2]
        grade = (p // 2) % 3
        for s in range(2 if p % 3 == 0 else 1):
            sid = f"{prefix}{p:02d}_{s}"
            m = int(rng.integers(8, 16))
            bag = rng.normal(size=(m, DIM)).astype(np.float32)
            if label == "malignant":
                bag[rng.choice(m, 3, replace=False), :4] += 3.0
            bag[:, 4:8] += 1.5 * grade
            _store(stores, sid, bag)
            rows.append(
                {
                    "slide_id": sid,
                    "patient_id": f"{prefix}P{p:02d}",
                    "site": "AB"[p % 2 if p % 4 < 2 else 1 - p % 2],
                    "label": label,
                    "grade": GRADES[grade],
                    "age": str(40 + (7 * p) % 35),
                    "sex": "MF"[p % 3 == 1],
                }
            )
    labels = root / "labels.csv"
    _write_csv(labels, rows)
    return stores, labels


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    text = res.output + (repr(res.exception) if res.exception else "")
    return res.exit_code, " ".join(text.split())  # undo rich's line wrapping


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Bags of a dozen tiles: torch's thread start-up costs more than it saves.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    train_stores, train_labels = _cohort(root / "train", 24, seed=0, prefix="T")
    test_stores, test_labels = _cohort(root / "test", 24, seed=1, prefix="V")
    model = root / "model"
    code, out = _invoke(
        "train",
        "--stores",
        str(train_stores),
        "--labels",
        str(train_labels),
        "--out",
        str(model),
        "--task",
        "label",
        "--task",
        "grade",
        "--covariates",
        "age,sex",
        "--folds",
        "3",
        "--epochs",
        "12",
        "--lr",
        "2e-3",
        "--n-boot",
        "50",
    )
    assert code == 0, out
    return {"model": model, "stores": test_stores, "labels": test_labels, "root": root}


def test_train_stores_calibration(trained: dict[str, Path]) -> None:
    meta = json.loads((trained["model"] / "model.json").read_text())
    cal = meta["calibration"]
    assert "validation" in cal["source"] and set(cal["tasks"]) == {"label", "grade"}
    assert cal["tasks"]["label"]["threshold_rule"] == "youden"
    assert cal["tasks"]["grade"]["conformal"]["level"] == 0.9
    assert meta["training"]["trained_at"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images = 0

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img" and (dict(attrs).get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1


def test_evaluate_end_to_end(trained: dict[str, Path], tmp_path: Path) -> None:
    labels = _read_csv(trained["labels"])
    truth = {r["slide_id"]: r["label"] for r in labels}
    # Reader A calls every slide (right on 3/4), with a probability of malignancy; reader B
    # calls a few slides, always right.
    rng = np.random.default_rng(7)
    readers = []
    for i, r in enumerate(labels):
        call = r["label"] if i % 4 else ("benign" if r["label"] == "malignant" else "malignant")
        score = float(np.clip((call == "malignant") * 0.6 + rng.uniform(0, 0.4), 0, 1))
        readers.append({"slide_id": r["slide_id"], "reader": "A", "task": "label",
                        "call": call, "score": f"{score:.3f}"})  # fmt: skip
    for r in labels[:6]:
        readers.append({"slide_id": r["slide_id"], "reader": "B", "task": "grade",
                        "call": r["grade"], "score": ""})  # fmt: skip
    readers_csv = tmp_path / "readers.csv"
    _write_csv(readers_csv, readers)
    out = tmp_path / "report"
    code, text = _invoke(
        "evaluate",
        "--model",
        str(trained["model"]),
        "--stores",
        str(trained["stores"]),
        "--labels",
        str(trained["labels"]),
        "--out",
        str(out),
        "--readers",
        str(readers_csv),
        "--n-boot",
        "200",
    )
    assert code == 0, text
    for task in ("label", "grade"):
        for kind in ("roc", "reliability", "confusion"):
            assert (out / f"{kind}_{task}.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    preds = _read_csv(out / "predictions.csv")
    assert len(preds) == 2 * len(labels)
    assert list(preds[0])[:6] == [
        "slide_id",
        "patient_id",
        "site",
        "task",
        "true_class",
        "predicted_class",
    ]  # the layout `score` writes too
    # held-out cases of the training distribution: their OOD distances are recorded, and
    # flagged about as rarely as the calibrated 99 % threshold allows
    flags = [r["ood"] for r in preds]
    assert set(flags) <= {"True", "False"} and flags.count("True") <= len(flags) // 4
    assert "out of domain" in (out / "report.html").read_text()

    # Binary task: AUC and accuracy recomputed from predictions.csv with scikit-learn.
    lab = [r for r in preds if r["task"] == "label"]
    y = np.array([r["true_class"] == "malignant" for r in lab], dtype=int)
    p_mal = np.array([float(r["p_malignant"]) for r in lab])
    m = metrics["tasks"]["label"]["metrics"]
    assert m["auc"]["estimate"] == pytest.approx(roc_auc_score(y, p_mal), abs=1e-5)
    assert m["auc"]["estimate"] >= 0.8  # the planted signal is learnt
    called = np.array([r["predicted_class"] == "malignant" for r in lab], dtype=int)
    thr = metrics["tasks"]["label"]["threshold"]
    np.testing.assert_array_equal(called, (p_mal >= thr - 1e-6).astype(int))
    assert m["accuracy"]["estimate"] == pytest.approx(accuracy_score(y, called))
    assert m["auc"]["low"] <= m["auc"]["estimate"] <= m["auc"]["high"]
    # A model whose raw and calibrated probabilities rank the cases alike.
    p_raw = np.array([float(r["uncalibrated_p_malignant"]) for r in lab])
    assert roc_auc_score(y, p_raw) == pytest.approx(roc_auc_score(y, p_mal), abs=1e-6)

    # Multi-class task: macro one-vs-rest AUC and conformal coverage from the file.
    gr = [r for r in preds if r["task"] == "grade"]
    yg = np.array([GRADES.index(r["true_class"]) for r in gr])
    pg = np.array([[float(r[f"p_{g}"]) for g in GRADES] for r in gr])
    mg = metrics["tasks"]["grade"]
    assert mg["metrics"]["auc_macro"]["estimate"] == pytest.approx(
        roc_auc_score(yg, pg / pg.sum(1, keepdims=True), multi_class="ovr"), abs=1e-4
    )
    covered = np.mean([r["true_class"] in r["conformal_set"].split("|") for r in gr])
    assert mg["conformal"]["coverage"]["estimate"] == pytest.approx(covered)
    sizes = [len([c for c in r["conformal_set"].split("|") if c]) for r in gr]
    assert mg["conformal"]["mean_set_size"] == pytest.approx(np.mean(sizes))

    # Reader A (slides, binary, scores): McNemar and DeLong recomputed independently.
    row = next(r for r in metrics["readers"] if r["reader"] == "A")
    calls = {r["slide_id"]: r["call"] for r in readers if r["reader"] == "A"}
    model_ok = np.array([r["predicted_class"] == r["true_class"] for r in lab])
    reader_ok = np.array([calls[r["slide_id"]] == truth[r["slide_id"]] for r in lab])
    b, c = int(np.sum(model_ok & ~reader_ok)), int(np.sum(~model_ok & reader_ok))
    assert (row["model_only_correct"], row["reader_only_correct"]) == (b, c)
    assert row["reader_accuracy"] == pytest.approx(reader_ok.mean())
    if b + c and row["mcnemar_method"] == "exact":
        assert row["mcnemar_p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    r_scores = {r["slide_id"]: float(r["score"]) for r in readers if r["reader"] == "A"}
    assert row["reader_auc"] == pytest.approx(
        roc_auc_score(y, [r_scores[r["slide_id"]] for r in lab])
    )
    row_b = next(r for r in metrics["readers"] if r["reader"] == "B")
    assert row_b["n"] == 6 and row_b["reader_accuracy"] == 1.0 and row_b["reader_auc"] is None

    page = _Page()
    page.feed((out / "report.html").read_text())
    words = " ".join(page.text)
    assert page.images == 6
    assert f"{m['auc']['estimate']:.3f}" in words
    assert "Comparison with readers" in words and "Prediction sets" in words
    assert "patients were evaluated" in words  # 24 patients: the few-patients caveat


def _small(root: Path, feats: dict[str, np.ndarray], encoder: str = ENC) -> tuple[Path, Path]:
    """Four good slides, with some replaced by ``feats``, stored under ``encoder``."""
    rng = np.random.default_rng(0)
    stores, rows = root / "stores", []
    for i in range(4):
        sid = f"S{i}"
        _store(stores, sid, feats.get(sid, rng.normal(size=(6, DIM)).astype("f4")), encoder)
        rows.append({"slide_id": sid, "patient_id": f"P{i}", "site": "A",
                     "label": ("benign", "malignant")[i % 2], "grade": GRADES[i % 3],
                     "age": "50", "sex": "F"})  # fmt: skip
    _write_csv(root / "labels.csv", rows)
    return stores, root / "labels.csv"


def _evaluate(trained: dict[str, Path], stores: Path, labels: Path, out: Path, *extra: str):
    return _invoke(
        "evaluate",
        "--model",
        str(trained["model"]),
        "--stores",
        str(stores),
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--n-boot",
        "20",
        *extra,
    )


def test_refuses_wrong_dim_nan_and_other_encoder(trained: dict[str, Path], tmp_path: Path) -> None:
    stores, labels = _small(tmp_path / "dim", {"S2": np.ones((6, 32), "f4")})
    code, text = _evaluate(trained, stores, labels, tmp_path / "o1")
    assert code == 2 and "S2.zarr" in text and "(6, 32)" in text and "re-embed" in text

    nan = np.ones((6, DIM), "f4")
    nan[2, 5] = np.nan
    stores, labels = _small(tmp_path / "nan", {"S1": nan})
    code, text = _evaluate(trained, stores, labels, tmp_path / "o2")
    assert code == 2 and "S1.zarr" in text and "NaN" in text

    stores, labels = _small(tmp_path / "enc", {}, encoder="uni")
    code, text = _evaluate(trained, stores, labels, tmp_path / "o3")
    assert code == 2 and "['uni']" in text and "'pathomics'" in text and "oncotrace embed" in text
    assert not (tmp_path / "o3").exists()


def test_refuses_unknown_slides_and_classes(trained: dict[str, Path], tmp_path: Path) -> None:
    stores, labels = _small(tmp_path / "a", {})
    rows = _read_csv(labels)
    _write_csv(labels, [*rows, {**rows[0], "slide_id": "NOT_A_SLIDE"}])
    code, text = _evaluate(trained, stores, labels, tmp_path / "o1")
    assert code == 2 and "NOT_A_SLIDE" in text and "labels.csv" in text

    _write_csv(labels, [*rows[:3], {**rows[3], "label": "atypical"}])
    code, text = _evaluate(trained, stores, labels, tmp_path / "o2")
    assert code == 2 and "'atypical'" in text and "does not know" in text


def test_refuses_bad_readers(trained: dict[str, Path], tmp_path: Path) -> None:
    stores, labels = _small(tmp_path / "a", {})
    readers = tmp_path / "readers.csv"
    good = {"slide_id": "S0", "reader": "A", "task": "label", "call": "benign", "score": ""}
    for bad, expect in (
        ({**good, "slide_id": "S9"}, "['S9']"),
        ({**good, "call": "cancer"}, "call 'cancer'"),
        ({**good, "task": "stage"}, "unknown task 'stage'"),
        ({**good, "score": "7"}, "score '7'"),
    ):
        _write_csv(readers, [good | {"slide_id": "S1"}, bad])
        code, text = _evaluate(trained, stores, labels, tmp_path / "o", "--readers", str(readers))
        assert code == 2 and "readers.csv" in text and expect in text, text
    shutil.rmtree(tmp_path / "a")


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x80\x04K\x01."), "model.safetensors"),
        (
            lambda d: (d / "model.safetensors").write_bytes(
                (d / "model.safetensors").read_bytes()[:99]
            ),
            "model.safetensors",
        ),
        (lambda d: (d / "model.json").write_text("[1, 2, 3]"), "model.json"),
        (lambda d: (d / "model.json").write_text("{"), "model.json"),
    ],
)
def test_a_damaged_model_folder_is_one_usage_error_up_front(
    trained: dict[str, Path], tmp_path: Path, damage, file: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    damage(model)
    code, text = _invoke(
        "evaluate", "--model", str(model), "--stores", str(tmp_path / "no-stores"),
        "--labels", str(tmp_path / "no-labels.csv"), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    # the model is refused before the (missing) stores and labels are looked at
    assert code == 2 and text.startswith(f"error: {model / file}: "), text
    assert "Fix: " in text and "copy" in text and "oncotrace train" in text
    assert "Traceback" not in text and "SafetensorError" not in text
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# Features imported under a name no registered encoder has
# --------------------------------------------------------------------------------------------

IMPORTED, IMPORTED_DIM = "lab-features-v3", 24


def _h5_cohort(root: Path, n_patients: int, seed: int, prefix: str) -> tuple[Path, Path]:
    """TRIDENT-layout .h5 files (planted signal in features 0-3 of malignant bags) + labels."""
    import h5py

    rng = np.random.default_rng(seed)
    src = root / "h5"
    src.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        label = ("benign", "malignant")[p % 2]
        m = int(rng.integers(8, 14))
        feats = rng.normal(size=(m, IMPORTED_DIM)).astype(np.float32)
        if label == "malignant":
            feats[rng.choice(m, 3, replace=False), :4] += 3.0
        sid = f"{prefix}{p:02d}"
        with h5py.File(src / f"{sid}.h5", "w") as f:
            f["features"] = feats
            c = f.create_dataset("coords", data=np.stack([np.arange(m) * 512, np.zeros(m)], 1))
            c.attrs.update({"patch_size": 256, "patch_size_level0": 512})
        rows.append({"slide_id": sid, "patient_id": f"{prefix}P{p:02d}", "label": label})
    _write_csv(root / "labels.csv", rows)
    return src, root / "labels.csv"


def test_model_on_imported_features_of_any_name(tmp_path: Path) -> None:
    from oncotrace import mil
    from sklearn.metrics import roc_auc_score

    stores = {}
    for part, n, seed in (("train", 18, 0), ("test", 12, 1)):
        src, labels = _h5_cohort(tmp_path / part, n, seed, part[:2].upper())
        out = tmp_path / part / "stores"
        code, text = _invoke(
            "import-features", str(src), "--out", str(out), "--name", IMPORTED, "--mpp", "0.5"
        )
        assert code == 0, text
        stores[part] = (out, labels)
    model = tmp_path / "model"
    code, text = _invoke(
        "train", "--stores", str(stores["train"][0]), "--labels", str(stores["train"][1]),
        "--out", str(model), "--encoder", IMPORTED, "--folds", "3", "--epochs", "12",
        "--lr", "2e-3", "--n-boot", "20",
    )  # fmt: skip
    assert code == 0, text
    head, card = mil.load_model(model)
    assert card.encoder == mil.ModelEncoder(IMPORTED, IMPORTED_DIM)

    report = tmp_path / "report"
    code, text = _invoke(
        "evaluate", "--model", str(model), "--stores", str(stores["test"][0]),
        "--labels", str(stores["test"][1]), "--out", str(report), "--n-boot", "50",
    )  # fmt: skip
    assert code == 0, text
    preds = _read_csv(report / "predictions.csv")
    assert len(preds) == 12
    # raw probabilities are the model applied to the .h5 features themselves
    import h5py

    for r in preds:
        with h5py.File(tmp_path / "test" / "h5" / f"{r['slide_id']}.h5", "r") as f:
            feats = np.asarray(f["features"])
        proba, _ = mil.predict(head, [feats])
        assert float(r["uncalibrated_p_malignant"]) == pytest.approx(proba["label"][0, 1], abs=1e-5)
    y = np.array([r["true_class"] == "malignant" for r in preds], dtype=int)
    p = np.array([float(r["p_malignant"]) for r in preds])
    auc = json.loads((report / "metrics.json").read_text())["tasks"]["label"]["metrics"]["auc"]
    assert auc["estimate"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert auc["estimate"] >= 0.8  # the planted signal transfers

    # Scoring slides needs an encoder that computes these features: a clear refusal.
    code, text = _invoke(
        "score", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "s")
    )
    assert code == 2 and repr(IMPORTED) in text and "no registered encoder" in text
