"""Few-shot heads and patient-level few-shot evaluation, checked against hand computations,
scikit-learn, and a planted signal carried by a minority of tiles."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from oncotrace.mil import (
    LinearProbeHead,
    PrototypeHead,
    case_embeddings,
    fewshot_evaluate,
    load_fewshot_head,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _cohort(
    n_per_class: int = 16, n_classes: int = 2, dim: int = 16, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Bags whose class shows only in a fifth of the tiles (shifted in 4 class-specific
    features); features share a positive baseline and each patient its own offset; every
    third patient has two slides."""
    rng = np.random.default_rng(seed)
    bags, labels, groups = [], [], []
    for c in range(n_classes):
        for p in range(n_per_class):
            offset = rng.normal(0, 0.25, dim)
            for _ in range(1 + (p % 3 == 0)):
                n = int(rng.integers(20, 40))
                bag = 1.0 + rng.normal(0, 1, (n, dim)) + offset
                if c > 0:
                    bag[: n // 5, 4 * c : 4 * c + 4] += 4.0
                bags.append(bag)
                labels.append(f"class{c}")
                groups.append(f"p{c}-{p}")
    return bags, np.array(labels), np.array(groups)


# ----------------------------------------------------------------------------- embeddings


def test_case_embeddings_pool_by_hand() -> None:
    bags = [np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([[0.0, -1.0]])]
    np.testing.assert_array_equal(case_embeddings(bags), [[2.0, 4.0], [0.0, -1.0]])
    np.testing.assert_array_equal(
        case_embeddings(bags, pool="mean+max"), [[2.0, 4.0, 3.0, 6.0], [0.0, -1.0, 0.0, -1.0]]
    )


# ----------------------------------------------------------------------------- heads


def test_prototype_probabilities_equal_a_hand_computation() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    y = np.array(["a", "a", "b"])
    head = PrototypeHead(temperature=0.5).fit(x, y)
    # prototypes: a = mean([1,0], [0,1]) = [.5, .5]; b = [-1, 0]. Query [3, 4] -> [.6, .8].
    cos_a = (0.6 * 0.5 + 0.8 * 0.5) / math.sqrt(0.5)
    cos_b = -0.6
    p_a = math.exp(cos_a / 0.5) / (math.exp(cos_a / 0.5) + math.exp(cos_b / 0.5))
    p = head.predict_proba([[3.0, 4.0]])
    np.testing.assert_allclose(p, [[p_a, 1 - p_a]], rtol=1e-12)
    np.testing.assert_array_equal(head.predict([[3.0, 4.0], [-1.0, 0.1]]), ["a", "b"])
    # training embeddings are normalised before averaging: a longer vector counts the same
    scaled = PrototypeHead(temperature=0.5).fit(x * np.array([[10.0], [1.0], [1.0]]), y)
    np.testing.assert_allclose(scaled.predict_proba([[3.0, 4.0]]), p, rtol=1e-12)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probe_matches_sklearn_fitted_directly(n_classes: int) -> None:
    rng = np.random.default_rng(4)
    sizes = [12, 5, 8][:n_classes]  # imbalanced: class weights matter
    x = np.concatenate([rng.normal(c, 1.0, (n, 6)) * (1 + c) for c, n in enumerate(sizes)])
    y = np.repeat([f"t{c}" for c in range(n_classes)], sizes)
    head = LinearProbeHead(C=0.7).fit(x, y)
    ref = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.7, class_weight="balanced", max_iter=1000)
    ).fit(x, y)
    test = rng.normal(0.5, 2.0, (20, 6))
    np.testing.assert_allclose(head.predict_proba(test), ref.predict_proba(test), atol=1e-10)
    np.testing.assert_array_equal(head.predict(test), ref.predict(test))
    np.testing.assert_array_equal(head.classes_, ref.classes_)


@pytest.mark.parametrize("kind", ["prototype", "linear"])
def test_heads_round_trip_exactly(kind: str, tmp_path: Path) -> None:
    bags, y, _ = _cohort(n_per_class=5, n_classes=3)
    x = case_embeddings(bags, pool="mean+max")
    head = (
        PrototypeHead(temperature=0.2, pool="mean+max")
        if kind == "prototype"
        else LinearProbeHead(C=0.3, pool="mean+max")
    ).fit(x, y)
    head.save(tmp_path / "h", metadata={"encoder": "pathomics"})
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["model.json", "model.safetensors"]
    back = load_fewshot_head(tmp_path / "h")
    assert type(back) is type(head) and back.pool == "mean+max"
    settings = ("temperature",) if kind == "prototype" else ("C", "max_iter")
    assert all(getattr(back, a) == getattr(head, a) for a in settings)
    np.testing.assert_array_equal(back.classes_, head.classes_)
    np.testing.assert_array_equal(back.predict_proba(x), head.predict_proba(x))
    np.testing.assert_array_equal(back.predict_proba_bags(bags), head.predict_proba(x))
    meta = json.loads((tmp_path / "h" / "model.json").read_text())
    assert meta["metadata"] == {"encoder": "pathomics"} and meta["kind"] == kind


def test_loading_wrong_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.json"):
        load_fewshot_head(tmp_path)
    x = np.random.default_rng(0).normal(size=(6, 3))
    PrototypeHead().fit(x, [0, 0, 1, 1, 2, 2]).save(tmp_path / "three")
    PrototypeHead().fit(x, [0, 0, 0, 1, 1, 1]).save(tmp_path / "two")
    (tmp_path / "two" / "model.safetensors").replace(tmp_path / "three" / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not fit 3 classes"):
        load_fewshot_head(tmp_path / "three")
    (tmp_path / "three" / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not an OncoTrace few-shot head"):
        load_fewshot_head(tmp_path / "three")


def test_heads_refuse_bad_use() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PrototypeHead().predict_proba(np.ones((1, 3)))
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearProbeHead().predict(np.ones((1, 3)))
    with pytest.raises(ValueError, match="temperature"):
        PrototypeHead(temperature=0.0)
    head = LinearProbeHead().fit(np.eye(4), ["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="fitted on 4"):
        head.predict_proba(np.ones((2, 5)))
    with pytest.raises(ValueError, match="two classes"):
        PrototypeHead().fit(np.eye(3), ["a", "a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        PrototypeHead().fit(np.array([[np.nan, 1.0], [1.0, 1.0]]), ["a", "b"])


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(("method", "repeats"), [("prototype", 20), ("linear", 10)])
def test_accuracy_rises_with_k_on_a_planted_signal(method: str, repeats: int) -> None:
    bags, y, g = _cohort()
    r = fewshot_evaluate(bags, y, g, k_shots=(1, 2, 4, 8), method=method, repeats=repeats)  # type: ignore[arg-type]
    ba = [r.balanced_accuracy[k].mean for k in (1, 2, 4, 8)]
    auc = [r.auc[k].mean for k in (1, 2, 4, 8)]
    assert ba[-1] > ba[0] + 0.08 and auc[-1] > auc[0], (ba, auc)
    assert all(b > a - 0.03 for a, b in itertools.pairwise(ba)), ba
    assert ba[-1] > 0.75
    for k in (1, 2, 4, 8):
        s = r.balanced_accuracy[k]
        assert s.n_repeats == repeats and s.low <= s.mean <= s.high and s.level == 0.95
    assert r.classes == ("class0", "class1") and r.patients_per_class == (16, 16)


def test_shuffled_labels_give_chance_accuracy() -> None:
    bags, _, g = _cohort()
    patients = np.unique(g)
    flip = dict(zip(patients, np.random.default_rng(1).permutation(len(patients)) % 2, strict=True))
    y_null = np.array([f"class{flip[p]}" for p in g])
    r = fewshot_evaluate(bags, y_null, g, k_shots=(8,), repeats=20)
    assert abs(r.balanced_accuracy[8].mean - 0.5) < 0.1


def test_no_draw_ever_splits_a_patient() -> None:
    bags, y, g = _cohort(n_per_class=7, n_classes=3)
    r = fewshot_evaluate(bags, y, g, k_shots=(1, 3, 6), method="prototype", repeats=15, seed=3)
    assert len(r.repeats) == 3 * 15
    for d in r.repeats:
        train_p, test_p = set(g[d.train_idx]), set(g[d.test_idx])
        assert not train_p & test_p
        assert np.array_equal(np.sort(np.concatenate([d.train_idx, d.test_idx])), np.arange(g.size))
        per_class = {c: len({p for p in train_p if p.startswith(f"p{c}-")}) for c in range(3)}
        assert per_class == {0: d.k, 1: d.k, 2: d.k}
    # a k's draws depend only on (seed, k, repeat), not on which other ks were asked for
    alone = fewshot_evaluate(bags, y, g, k_shots=(3,), repeats=15, seed=3)
    mixed = [d for d in r.repeats if d.k == 3]
    assert all(
        np.array_equal(a.train_idx, b.train_idx) for a, b in zip(alone.repeats, mixed, strict=True)
    )
    assert len({tuple(d.train_idx) for d in mixed}) > 10  # the repeats are different draws


@pytest.mark.parametrize(("n_classes", "method"), [(2, "linear"), (3, "prototype")])
def test_recorded_metrics_match_sklearn(n_classes: int, method: str) -> None:
    bags, y, g = _cohort(n_per_class=6, n_classes=n_classes)
    r = fewshot_evaluate(bags, y, g, k_shots=(2,), method=method, repeats=3, pool="mean+max")  # type: ignore[arg-type]
    x = case_embeddings(bags, pool="mean+max")
    for d in r.repeats:
        head = (PrototypeHead() if method == "prototype" else LinearProbeHead()).fit(
            x[d.train_idx], y[d.train_idx]
        )
        p = head.predict_proba(x[d.test_idx])
        yt = y[d.test_idx]
        assert d.balanced_accuracy == pytest.approx(
            balanced_accuracy_score(yt, head.predict(x[d.test_idx]))
        )
        want = (
            roc_auc_score(yt, p[:, 1])
            if n_classes == 2
            else roc_auc_score(yt, p, multi_class="ovr", average="macro", labels=head.classes_)
        )
        assert d.auc == pytest.approx(want)
    mean_ba = np.mean([d.balanced_accuracy for d in r.repeats])
    assert r.balanced_accuracy[2].mean == pytest.approx(mean_ba)
    # precomputed embeddings give the same report as bags
    r2 = fewshot_evaluate(x, y, g, k_shots=(2,), method=method, repeats=3)  # type: ignore[arg-type]
    assert r2.auc[2] == r.auc[2]


def test_bad_inputs_are_clear_errors() -> None:
    bags, y, g = _cohort(n_per_class=5)
    with pytest.raises(ValueError, match=r"class 'class0' has 5.*largest feasible k is 4"):
        fewshot_evaluate(bags, y, g, k_shots=(1, 5))
    one = (g == "p0-0") | (y == "class1")
    with pytest.raises(ValueError, match="collect at least two patients"):
        fewshot_evaluate(
            [b for b, m in zip(bags, one, strict=True) if m], y[one], g[one], k_shots=(1,)
        )
    with pytest.raises(ValueError, match="one entry per case"):
        fewshot_evaluate(bags, y, g[:-1])
    with pytest.raises(ValueError, match="labels"):
        fewshot_evaluate(bags[:-1], y, g, k_shots=(1,))
    with pytest.raises(ValueError, match="different labels"):
        fewshot_evaluate(bags, np.where(np.arange(y.size) == 0, "class1", y), g, k_shots=(1,))
    with pytest.raises(ValueError, match="method"):
        fewshot_evaluate(bags, y, g, method="knn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool"):
        fewshot_evaluate(bags, y, g, pool="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool"):
        fewshot_evaluate(case_embeddings(bags), y, g, pool="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_shots"):
        fewshot_evaluate(bags, y, g, k_shots=(0,))
    with pytest.raises(ValueError, match="repeats"):
        fewshot_evaluate(bags, y, g, repeats=0)
    with pytest.raises(ValueError, match="two classes"):
        fewshot_evaluate(bags, np.full(y.size, "class0"), g, k_shots=(1,))
    with pytest.raises(ValueError, match="same encoder"):
        fewshot_evaluate([*bags[:-1], np.ones((3, 5))], y, g, k_shots=(1,))
    with pytest.raises(ValueError, match="at least one tile"):
        case_embeddings([np.ones((0, 4))])
    with pytest.raises(TypeError, match="list of"):
        case_embeddings(np.ones((3, 4)))
