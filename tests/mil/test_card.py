"""The model card: one reader and writer of model.json; older files load; bad ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from oncotrace import mil, wsi

TASKS = {"label": ("neg", "pos")}
SMALL = {"hidden": 16, "attn_dim": 8, "dropout": 0.0}
D = 12


def _head() -> mil.MILHead:
    torch.manual_seed(0)
    return mil.create_head("abmil", D, TASKS, covariates=2, **SMALL).eval()


def _legacy_json(head: mil.MILHead) -> dict:
    """model.json as OncoTrace wrote it before the card (save_head, then save_model's sections)."""
    return {
        "format": "oncotrace.mil.head",
        "format_version": 1,
        "oncotrace_version": "0.4.0",
        "torch_version": "2.5.0",
        "weights": "model.safetensors",
        "config": head.config.to_dict(),
        "tasks": {"label": ["neg", "pos"]},
        "encoder": {"name": "pathomics", "dim": D},
        "covariates": {
            "names": ["age", "sex"],
            "mean": [61.5, 0.25],
            "std": [9.0, 0.5],
            "encoding": {"sex": {"M": 0, "F": 1}},
        },
        "training": {"split": "kfold", "folds": 3, "seed": 0, "trained_at": "2024-01-01"},
        "metrics": {"label": {"metrics": {"auc": {"estimate": 0.9, "low": 0.8, "high": 1.0}}}},
        "calibration": {"version": 1, "source": "validation", "level": 0.9, "tasks": {}},
        "tiling": {"target_mpp": 0.5, "tile_px": 224, "mode": "tissue"},
    }


def _write_legacy(tmp_path: Path, drop: tuple[str, ...] = ()) -> tuple[Path, mil.MILHead]:
    head = _head()
    mil.save_head(head, tmp_path)  # the weights
    meta = {k: v for k, v in _legacy_json(head).items() if k not in drop}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    return tmp_path, head


@pytest.mark.parametrize("drop", [(), ("format_version",)])
def test_a_model_json_written_before_the_card_loads(tmp_path: Path, drop: tuple[str, ...]) -> None:
    directory, head = _write_legacy(tmp_path, drop)
    loaded, card = mil.load_model(directory)
    assert card.format_version == 1
    assert card.tasks == {"label": ("neg", "pos")}
    assert card.encoder == mil.ModelEncoder("pathomics", D)
    assert card.covariates.names == ("age", "sex")
    # standardisation as written: (x - mean) / std, by hand
    np.testing.assert_allclose(
        card.covariates.standardise([70.0, 1.0]), [[(70 - 61.5) / 9, (1 - 0.25) / 0.5]], rtol=1e-6
    )
    # the tiling as written, typed; keys the old file left out take TilingConfig's defaults
    assert card.tiling == wsi.TilingConfig(target_mpp=0.5, tile_px=224, mode="tissue")
    assert card.calibration is not None and card.calibration["source"] == "validation"
    assert card.training["folds"] == 3 and card.train_config is None
    assert card.metrics["label"]["metrics"]["auc"]["estimate"] == 0.9
    assert card.oncotrace_version == "0.4.0"
    bag = torch.randn(5, D)
    with torch.no_grad():
        assert torch.equal(
            head(bag, torch.ones(2)).logits["label"], loaded(bag, torch.ones(2)).logits["label"]
        )
    # Rewritten, the file is the current format with the same sections.
    card.write(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "model.json").read_text())
    assert again["format_version"] == mil.ModelCard.read(tmp_path / "again").format_version == 3
    legacy = _legacy_json(head)
    for key in ("config", "tasks", "encoder", "covariates", "training", "metrics"):
        assert again[key] == legacy[key], key
    assert again["tiling"] == {**wsi.TilingConfig().to_dict(), **legacy["tiling"]}


def test_a_card_with_an_unknown_tiling_key_names_the_file(tmp_path: Path) -> None:
    directory, _ = _write_legacy(tmp_path, ())
    data = json.loads((directory / "model.json").read_text())
    data["tiling"]["tile_size"] = 256  # not a TilingConfig field
    (directory / "model.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.json.*unknown tiling key.*tile_size"):
        mil.ModelCard.read(directory)


def test_a_head_saved_alone_has_a_card_without_encoder(tmp_path: Path) -> None:
    head = _head()
    mil.save_head(head, tmp_path)
    card = mil.ModelCard.read(tmp_path)
    assert card.head == head.config and card.encoder is None and card.covariates.names == ()
    mil.save_model(tmp_path / "m", head, encoder=mil.ModelEncoder("pathomics", D))
    assert mil.load_model(tmp_path / "m")[1].encoder == mil.ModelEncoder("pathomics", D)


def test_round_trip_with_a_train_config(tmp_path: Path) -> None:
    config = mil.TrainConfig(encoder="uni", tasks=("label",), covariates=("age",), folds=3)
    card = mil.ModelCard(
        head=_head().config, encoder=mil.ModelEncoder("uni", D), train_config=config
    )
    card.write(tmp_path)
    on_disk = json.loads((tmp_path / "model.json").read_text())
    assert on_disk["train_config"]["folds"] == 3 and on_disk["train_config"]["tasks"] == ["label"]
    back = mil.ModelCard.read(tmp_path)
    assert back.train_config == config and back == card


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda m: m.update(colour="red"), r"unknown section\(s\) \['colour'\]"),
        (lambda m: m.pop("config"), "no 'config' section"),
        (lambda m: m.update(format_version=99), "format_version 99 is newer.*upgrade"),
        (lambda m: m.update(format="something-else"), "not an OncoTrace MIL head"),
        (lambda m: m["encoder"].update(dim=D + 1), f"{D}-dim.*dim {D + 1}.*inconsistent"),
        (lambda m: m["covariates"].update(mean=[1.0]), "malformed 'encoder' or 'covariates'"),
        (lambda m: m["tasks"].update(label=["a", "b"]), "disagree with the head config"),
        (lambda m: m.update(train_config={"folds": 3, "speed": 1}), r"train_config.*\['speed'\]"),
    ],
)
def test_bad_cards_name_the_file_and_the_problem(tmp_path: Path, edit, expect: str) -> None:
    head = _head()
    mil.save_head(head, tmp_path)
    meta = _legacy_json(head)
    edit(meta)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=expect) as err:
        mil.ModelCard.read(tmp_path)
    assert str(tmp_path / "model.json") in str(err.value)


def test_missing_card_is_a_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(mil.ModelFileError, match=r"model\.json: not found") as err:
        mil.ModelCard.read(tmp_path)
    assert err.value.path == str(tmp_path / "model.json")
    with pytest.raises(mil.ModelFileError, match="does not exist"):
        mil.load_model(tmp_path / "no-such-folder")


# --------------------------------------------------------------------------------------------
# Hostile model folders: every way a folder cannot load is one ModelFileError naming the file
# --------------------------------------------------------------------------------------------


def _calibrated(directory: Path) -> Path:
    """A saved head with an encoder and a calibration record, as `oncotrace train` writes."""
    cal = {
        "version": 1,
        "source": "validation",
        "level": 0.9,
        "tasks": {
            "label": {
                "class_names": ["neg", "pos"],
                "temperature": 1.5,
                "threshold": 0.4,
                "conformal": {"method": "lac", "level": 0.9, "qhat": 0.7, "scores": [0.1, 0.7]},
            }
        },
    }
    enc = mil.ModelEncoder("pathomics", D)
    return mil.save_model(directory, _head(), encoder=enc, calibration=cal)


def _edit_card(edit):
    def apply(directory: Path) -> None:
        meta = json.loads((directory / "model.json").read_text())
        edit(meta)
        (directory / "model.json").write_text(json.dumps(meta))

    return apply


class _Sentinel:
    """Unpickling this touches ``path``: proof that nothing was unpickled if it stays absent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _truncate(directory: Path) -> None:
    w = directory / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _pickle_in_place(directory: Path) -> None:
    import pickle

    (directory / "model.safetensors").write_bytes(
        pickle.dumps({"w": _Sentinel(directory / "UNPICKLED")})
    )


def _torch_save_in_place(directory: Path) -> None:
    torch.save({"w": torch.zeros(3)}, directory / "model.safetensors")


def _other_head(directory: Path) -> None:
    torch.manual_seed(1)
    other = mil.create_head("abmil", D + 3, TASKS, covariates=2, **SMALL)
    mil.save_head(other, directory / "other")
    (directory / "other" / "model.safetensors").replace(directory / "model.safetensors")


def _nan_weights(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(str(directory / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    ("damage", "file", "expect"),
    [
        (_truncate, "model.safetensors", "not a complete safetensors file"),
        (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors", "safetensors"),
        (_pickle_in_place, "model.safetensors", "a pickle"),
        (_torch_save_in_place, "model.safetensors", "a pickle"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing"),
        (_other_head, "model.safetensors", "does not match the head"),
        (_nan_weights, "model.safetensors", "NaN/inf in the weights"),
        (lambda d: (d / "model.json").write_text("[1, 2, 3]"), "model.json", "a JSON list"),
        (lambda d: (d / "model.json").write_text('{"format": '), "model.json", "not valid"),
        (lambda d: (d / "model.json").write_bytes(b"\xff\xfe{}"), "model.json", "UTF-8"),
        (_edit_card(lambda m: m.update(format_version="3")), "model.json", "format_version"),
        (_edit_card(lambda m: m.update(config=[1, 2, 3])), "model.json", "head 'config'"),
        (_edit_card(lambda m: m.update(tasks=[1, 2, 3])), "model.json", "'tasks'"),
        (_edit_card(lambda m: m.update(covariates=[1, 2, 3])), "model.json", "covariates"),
        (_edit_card(lambda m: m.update(encoder=[1, 2, 3])), "model.json", "encoder"),
        (_edit_card(lambda m: m.update(metrics=[1, 2, 3])), "model.json", "'metrics'"),
        (_edit_card(lambda m: m.update(calibration=[1, 2, 3])), "model.json", "'calibration'"),
        (_edit_card(lambda m: m.update(tiling=[1, 2, 3])), "model.json", "tiling"),
        (
            _edit_card(lambda m: m["calibration"]["tasks"]["label"].update(temperature="hot")),
            "model.json",
            "temperature 'hot'",
        ),
        (
            _edit_card(lambda m: m["calibration"]["tasks"]["label"].update(temperature="1.5")),
            "model.json",
            "temperature '1.5'",
        ),
        (
            _edit_card(lambda m: m["calibration"]["tasks"]["label"].update(threshold=7)),
            "model.json",
            "threshold 7",
        ),
        (
            _edit_card(lambda m: m["calibration"]["tasks"]["label"].update(class_names=["x"])),
            "model.json",
            "classes",
        ),
        (
            _edit_card(lambda m: m["calibration"]["tasks"].update(stage={})),
            "model.json",
            "task 'stage'",
        ),
        (
            _edit_card(lambda m: m["covariates"].update(names=["age"], mean=[50.0], std=[0.0])),
            "model.json",
            "stds above 0",
        ),
    ],
)
def test_a_damaged_model_folder_is_one_error_naming_the_file(
    tmp_path: Path, damage, file: str, expect: str
) -> None:
    directory = _calibrated(tmp_path / "m")
    mil.load_model(directory)  # loads before the damage
    damage(directory)
    with pytest.raises(mil.ModelFileError) as err:
        mil.load_model(directory)
    assert expect in str(err.value), str(err.value)
    assert err.value.path == str(directory / file)
    assert str(err.value).startswith(f"{directory / file}: ")
    assert "Fix: " in str(err.value) and err.value.fix in str(err.value)
    assert not (directory / "UNPICKLED").exists()
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working


def test_model_file_error_survives_pickling() -> None:
    import pickle

    err = mil.ModelFileError("/m/model.json", "broken", "copy it again")
    back = pickle.loads(pickle.dumps(err))  # a Dask worker's error reaches the client intact
    assert (back.path, back.problem, back.fix, str(back)) == (
        err.path,
        err.problem,
        err.fix,
        "/m/model.json: broken. Fix: copy it again",
    )


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"folds": 1}, "folds"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"conformal_level": 1.0}, "conformal_level"),
        ({"test_fraction": 1.5, "split": "holdout"}, "test_fraction"),
        ({"test_sites": ("A",), "split": "kfold"}, "test_sites"),
        ({"split": "random"}, "split"),
        ({"tasks": ()}, "tasks"),
        ({"tasks": "label"}, "tasks"),
        ({"n_boot": 0}, "n_boot"),
    ],
)
def test_train_config_errors_name_the_parameter(kw: dict, param: str) -> None:
    with pytest.raises(mil.TrainConfigError, match=f"^{param}=") as err:
        mil.TrainConfig(**kw)
    assert err.value.param == param
    assert "--" not in str(err.value)  # the library knows no command-line flags


def test_train_config_round_trip() -> None:
    config = mil.TrainConfig(split="holdout", test_sites=("B", "C"), epochs=3, seed=4)
    assert mil.TrainConfig.from_dict(config.to_dict()) == config
    assert config.test_sites == ("B", "C")
    assert config.provenance()["test_fraction"] is None  # sites held out, not a fraction


def test_a_fewshot_head_folder_is_refused_with_the_loader_to_use(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, D))
    head = mil.PrototypeHead().fit(emb, np.array(["a", "b"] * 4))
    head.save(tmp_path / "fs")
    with pytest.raises(ValueError, match=r"model\.json.*few-shot head.*load_fewshot_head"):
        mil.ModelCard.read(tmp_path / "fs")
    assert mil.load_fewshot_head(tmp_path / "fs").kind == head.kind
