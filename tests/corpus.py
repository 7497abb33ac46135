"""The hostile-input corpus, run through the command line as a user would, with the outcome counted.

    python -m tests.corpus [--out DIR] [--only SUBSTRING] [--json FILE]

Every case is generated here (seeded; nothing is shipped) in a folder of its own, then one
``oncotrace`` command runs on it in a child process, as a user's shell would run it. Each outcome
is one of:

* ``clean``     — a refused input: exit 1 or 2, a line starting ``error:`` or ``failed:`` that
  names the input, no traceback; an accepted input: exit 0 and the expected output is there.
* ``unclear``   — refused without naming the input (the user cannot tell what to fix).
* ``traceback`` — a Python traceback reached the console, or the command hung (timeout).
* ``silent``    — exit 0 with no error or warning although the input is bad, or a good input
  refused.
* ``lost``      — the good input given alongside the bad one was not finished.

The run prints one line per case and the counts; ``--json`` also writes them. Issue 12's audit
tried 167 inputs; this corpus is larger. The unit tests check each fix on its own; this runner
is what the resolving note's counts come from (and a quick way to re-audit after a change).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent / "oncotrace"
TIMEOUT_S = 240


@dataclass
class Case:
    """One hostile (or deliberately odd but valid) input and the command that meets it."""

    name: str
    group: str
    #: builds the input in the given folder; returns the command's arguments after `oncotrace`
    build: Callable[[Path], list[str]]
    #: "refuse": the input is bad; "accept": valid though odd (e.g. a CSV with a BOM)
    expect: str = "refuse"
    #: text a refusal must contain besides the error line (defaults to the input's file name)
    names: str | None = None
    #: for "accept": does the expected output exist? For batches: was the good input finished?
    done: Callable[[Path], bool] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    case: str
    group: str
    verdict: str
    exit_code: int | None
    seconds: float
    line: str


# --------------------------------------------------------------------------------------------
# shared good inputs, made once per run
# --------------------------------------------------------------------------------------------


class Kit:
    """Good slides, stores, a labels file and a trained model the cases start from."""

    def __init__(self, root: Path) -> None:
        from oncotrace import mil, wsi
        from oncotrace.mil.phantom import make_cohort
        from oncotrace.wsi.synthetic import make_tissue_squares

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.good = root / "good.tif"
        make_tissue_squares(
            self.good,
            size=(2048, 1536),
            mpp=0.5,
            levels=2,
            seed=1,
            squares=[(200, 200, 800, 600), (1100, 700, 700, 600)],
        )
        # 16 cases (8 per class): 2-fold training with inner validation still works
        # when a case's label is missing
        self.cohort = make_cohort(root / "cohort", n_cases=16, size_px=(1536, 1024), seed=5)
        self.stores = root / "stores"
        for path in self.cohort.slide_paths:
            mil.embed(wsi.tile_slide(path, self.stores).store, "pathomics")
        self.labels = Path(self.cohort.labels_csv)
        data = mil.load_cohort(self.stores, self.labels, "pathomics", ["label"])
        model, _ = mil.fit(
            data.bags, data.labels, tasks=data.class_names, in_dim=data.in_dim, epochs=2, lr=1e-3
        )
        self.model = mil.save_model(root / "model", model, data=data)
        self.slides = root / "slides"
        self.slides.mkdir(exist_ok=True)
        for p in self.cohort.slide_paths[:2]:
            shutil.copy2(p, self.slides / p.name)

    def slide_folder(self, where: Path, bad: Path | None = None) -> Path:
        """A folder with the good slide (and ``bad`` moved in beside it)."""
        folder = where / "in"
        folder.mkdir(exist_ok=True)
        shutil.copy2(self.good, folder / "good.tif")
        if bad is not None and bad.parent != folder:
            shutil.move(str(bad), folder / bad.name)
        return folder

    def model_copy(self, where: Path) -> Path:
        dst = where / "model"
        shutil.copytree(self.model, dst)
        return dst

    def labels_rows(self) -> list[dict[str, str]]:
        with open(self.labels, newline="") as fh:
            return list(csv.DictReader(fh))


def _good_store_done(out: Path) -> bool:
    from oncotrace.wsi import Store

    store = out / "good.zarr"
    found = Store.find(store) if store.is_dir() else None
    return found is not None and (found.attrs.n_tiles or 0) > 0


def _write_csv(path: Path, rows: list[dict[str, str]], *, encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


def slide_file_cases(kit: Kit, shared: Path | None) -> list[Case]:
    """Every bad slide of tests/wsi/badinput.py through `info` and through `tile` beside a good
    slide (the good one must still be tiled)."""
    from tests.wsi import badinput

    makers = [*badinput.GENERATORS, *badinput.CRASHERS]
    cases: list[Case] = []
    for make in makers:
        tag = make.__name__.removeprefix("make_")

        def info(where: Path, make: Callable[[Path], badinput.BadInput] = make) -> list[str]:
            return ["info", str(make(where).path)]

        def tile(where: Path, make: Callable[[Path], badinput.BadInput] = make) -> list[str]:
            bad = make(where).path
            folder = kit.slide_folder(where, bad)
            return ["tile", str(folder), "--out", str(where / "out")]

        probe = make(Path(tempfile.mkdtemp(prefix="corpus-probe-")))
        # `info` reads headers (allow-listed properties), not every tile: damage found only
        # when the tiles are decoded is refused by `tile` (the case after this one)
        headers_fine = probe.stage == "read"
        cases.append(Case(f"info {tag}", "slide files", info,
                          expect="accept" if headers_fine else "refuse"))  # fmt: skip
        # a sub-folder with no slide-like files in it is not an input (a "notes" folder)
        not_an_input = probe.path.is_dir() and not any(
            c.suffix.lower() in (".dcm", ".svs", ".tif", ".tiff") for c in probe.path.iterdir()
        )
        shutil.rmtree(probe.path.parent, ignore_errors=True)
        cases.append(
            Case(
                f"tile {tag} + a good slide",
                "slide files",
                tile,
                expect="accept" if not_an_input else "refuse",
                done=lambda out: _good_store_done(out / "out"),
            )
        )
    if shared is not None and (shared / badinput.SVS_SOURCE).is_file():
        svs = shared / badinput.SVS_SOURCE

        def trunc(where: Path) -> list[str]:
            return ["info", str(badinput.make_truncated_svs(where, svs).path)]

        cases.append(Case("info truncated real svs", "slide files", trunc))
    if shared is not None and (shared / badinput.MALFORMED_DICOM).is_file():

        def dcm(where: Path) -> list[str]:
            return ["info", str(shared / badinput.MALFORMED_DICOM)]

        cases.append(Case("info malformed real DICOM SM", "slide files", dcm))
    return cases


def _slide_variants(kit: Kit) -> list[Case]:
    """Hand-made slide files beyond badinput's generators."""
    import tifffile

    def write(name: str, fn: Callable[[Path], None]) -> Callable[[Path], list[str]]:
        def build(where: Path) -> list[str]:
            p = where / name
            fn(p)
            folder = kit.slide_folder(where, p)
            return ["tile", str(folder), "--out", str(where / "out")]

        return build

    def zero_bytes(p: Path) -> None:
        p.write_bytes(b"")

    def random_bytes(p: Path) -> None:
        p.write_bytes(np.random.default_rng(0).bytes(4096))

    def html(p: Path) -> None:
        p.write_text("<html><body>404 Not Found</body></html>")

    def tiny(p: Path) -> None:
        tifffile.imwrite(p, np.zeros((1, 1, 3), np.uint8), photometric="rgb")

    def all_white(p: Path) -> None:
        tifffile.imwrite(p, np.full((2048, 2048, 3), 255, np.uint8), tile=(256, 256),
                         photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")  # fmt: skip

    def all_black(p: Path) -> None:
        tifffile.imwrite(p, np.zeros((2048, 2048, 3), np.uint8), tile=(256, 256),
                         photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")  # fmt: skip

    def grey16(p: Path) -> None:
        tifffile.imwrite(p, np.zeros((512, 512), np.uint16), tile=(256, 256))

    def four_channels(p: Path) -> None:
        tifffile.imwrite(p, np.zeros((512, 512, 5), np.uint8), tile=(256, 256),
                         planarconfig="contig")  # fmt: skip

    def gzip_named_tif(p: Path) -> None:
        import gzip

        p.write_bytes(gzip.compress(kit.good.read_bytes()[:20000]))

    def zip_named_svs(p: Path) -> None:
        import zipfile

        with zipfile.ZipFile(p, "w") as z:
            z.writestr("slide.svs", b"x" * 100)

    def half_header(p: Path) -> None:
        p.write_bytes(kit.good.read_bytes()[:6])

    def png_as_tif(p: Path) -> None:
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 100, 150)).save(p, format="PNG")

    def jpeg_as_svs(p: Path) -> None:
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 100, 150)).save(p, format="JPEG")

    makers = {
        "empty.tif": zero_bytes, "random.svs": random_bytes, "page.ndpi": html,
        "one-pixel.tif": tiny, "white.tif": all_white, "black.tif": all_black,
        "grey16.tif": grey16, "five-channel.tif": four_channels, "gzip.tif": gzip_named_tif,
        "zip.svs": zip_named_svs, "six-bytes.tif": half_header, "png-named.tif": png_as_tif,
        "jpeg-named.svs": jpeg_as_svs,
    }  # fmt: skip
    return [
        Case(
            f"tile {name} + a good slide",
            "slide files",
            write(name, fn),
            done=lambda out: _good_store_done(out / "out"),
        )
        for name, fn in makers.items()
    ]


def tiling_number_cases(kit: Kit) -> list[Case]:
    """Bad numbers for `tile`: refused up front (exit 2) naming the flag."""
    bad = [
        ("--mpp-target", "inf"), ("--mpp-target", "nan"), ("--mpp-target", "0"),
        ("--mpp-target", "-1"), ("--mpp-target", "1e9"), ("--tile-px", "0"),
        ("--tile-px", "-5"), ("--tile-px", "100000"), ("--stride-px", "0"),
        ("--stride-px", "-1"), ("--min-tissue", "-0.1"), ("--min-tissue", "1.5"),
        ("--min-tissue", "nan"), ("--min-focus", "nan"), ("--min-focus", "-1"),
        ("--mpp", "nan"), ("--mpp", "0"), ("--mpp", "-1"), ("--mpp", "inf"),
        ("--threads", "0"), ("--threads", "-2"), ("--max-upsample", "0.5"),
        ("--max-upsample", "nan"), ("--mode", "biopsy"), ("--tile-px", "abc"),
    ]  # fmt: skip
    cases = []
    for flag, value in bad:

        def build(where: Path, flag: str = flag, value: str = value) -> list[str]:
            return ["tile", str(kit.good), "--out", str(where / "out"), flag, value]

        cases.append(Case(f"tile {flag} {value}", "numbers", build, names=flag))
    return cases


def discovery_cases(kit: Kit) -> list[Case]:
    """What folder mode and named paths meet on real disks."""

    def broken_link(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        (folder / "gone.svs").symlink_to(where / "nowhere.svs")
        return ["tile", str(folder), "--out", str(where / "out")]

    def loop_in_folder(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        (folder / "a.svs").symlink_to(folder / "b.svs")
        (folder / "b.svs").symlink_to(folder / "a.svs")
        return ["tile", str(folder), "--out", str(where / "out")]

    def loop_on_cli(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        (where / "loop.svs").symlink_to(where / "loop.svs")
        return ["tile", str(where / "loop.svs"), str(folder / "good.tif"), "--out",
                str(where / "out")]  # fmt: skip

    def dir_named_svs(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        (folder / "case7.svs").mkdir()
        (folder / "case7.svs" / "notes.txt").write_text("scanned twice")
        return ["tile", str(folder), "--out", str(where / "out")]

    def nested(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        (folder / "batch2").mkdir()
        shutil.copy2(kit.good, folder / "batch2" / "second.tif")
        return ["tile", str(folder), "--out", str(where / "out")]

    def missing_path(where: Path) -> list[str]:
        return ["tile", str(where / "no-such.svs"), str(kit.good), "--out", str(where / "out")]

    def empty_folder(where: Path) -> list[str]:
        (where / "empty").mkdir()
        return ["tile", str(where / "empty"), "--out", str(where / "out")]

    def no_suffix(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        shutil.copy2(kit.good, folder / "slide_without_suffix")
        return ["tile", str(folder), "--out", str(where / "out")]

    def same_stem_two_folders(where: Path) -> list[str]:
        a, b = where / "a", where / "b"
        a.mkdir()
        b.mkdir()
        shutil.copy2(kit.good, a / "good.tif")
        shutil.copy2(kit.good, b / "good.tif")
        return ["tile", str(a), str(b), "--out", str(where / "out")]

    def out_is_a_file(where: Path) -> list[str]:
        (where / "out").write_text("not a folder")
        return ["tile", str(kit.good), "--out", str(where / "out")]

    def bad_stem(where: Path) -> list[str]:
        folder = kit.slide_folder(where)
        shutil.copy2(kit.good, folder / "tab\there.tif")
        return ["tile", str(folder), "--out", str(where / "out")]

    def embed_broken_link(where: Path) -> list[str]:
        stores = where / "stores"
        shutil.copytree(kit.stores, stores)
        (stores / "gone.zarr").symlink_to(where / "nowhere.zarr")
        return ["embed", str(stores)]

    def import_h5_link(where: Path) -> list[str]:
        (where / "h5").mkdir()
        _good_h5(where / "h5" / "good.h5")
        (where / "h5" / "gone.h5").symlink_to(where / "nowhere.h5")
        return ["import-features", str(where / "h5"), "--out", str(where / "out"), "--name",
                "uni"]  # fmt: skip

    def import_h5_dir(where: Path) -> list[str]:
        (where / "h5").mkdir()
        _good_h5(where / "h5" / "good.h5")
        (where / "h5" / "sub.h5").mkdir()
        return ["import-features", str(where / "h5"), "--out", str(where / "out"), "--name",
                "uni"]  # fmt: skip

    done = lambda where: _good_store_done(where / "out")  # noqa: E731
    return [
        Case("tile folder: broken symlink", "discovery", broken_link, names="gone.svs", done=done),
        Case("tile folder: symlink loop", "discovery", loop_in_folder, names="a.svs", done=done),
        Case("tile: symlink loop named", "discovery", loop_on_cli, names="loop.svs", done=done),
        Case(
            "tile folder: dir named .svs", "discovery", dir_named_svs, names="case7.svs", done=done
        ),
        Case("tile folder: nested folder", "discovery", nested, names="batch2", done=done),
        Case("tile: missing path", "discovery", missing_path, names="no-such.svs", done=done),
        Case("tile: empty folder", "discovery", empty_folder, names="empty"),
        Case(  # a TIFF that lost its suffix is taken by its bytes, and tiled
            "tile folder: file without suffix",
            "discovery",
            no_suffix,
            expect="accept",
            done=lambda w: done(w) and (w / "out" / "slide_without_suffix.zarr").is_dir(),
        ),
        Case("tile: one stem in two folders", "discovery", same_stem_two_folders, names="good.tif"),
        Case("tile: --out is a file", "discovery", out_is_a_file, names="out"),
        Case("tile folder: tab in file name", "discovery", bad_stem, names="here.tif", done=done),
        Case("embed folder: broken symlink", "discovery", embed_broken_link, names="gone.zarr"),
        Case("import folder: broken .h5 link", "discovery", import_h5_link, names="gone.h5"),
        Case("import folder: dir named .h5", "discovery", import_h5_dir, names="sub.h5"),
    ]


def _good_h5(path: Path, *, n: int = 16, coords: np.ndarray | None = None,
             patch_size: int = 224, feats: np.ndarray | None = None) -> Path:  # fmt: skip
    import h5py

    rng = np.random.default_rng(3)
    if coords is None:
        coords = np.stack(np.meshgrid(np.arange(4) * 448, np.arange(n // 4) * 448), -1)
        coords = coords.reshape(-1, 2)
    with h5py.File(path, "w") as fh:
        fh["features"] = rng.normal(size=(len(coords), 32)).astype(np.float32) if feats is None \
            else feats  # fmt: skip
        d = fh.create_dataset("coords", data=np.asarray(coords, np.int64))
        d.attrs["patch_size"] = patch_size
        d.attrs["patch_size_level0"] = 2 * patch_size
        d.attrs["level0_magnification"] = 40
        d.attrs["target_magnification"] = 20
    return path


def import_cases(kit: Kit) -> list[Case]:
    import h5py

    def one(fn: Callable[[Path], Path], *extra: str) -> Callable[[Path], list[str]]:
        def build(where: Path) -> list[str]:
            return ["import-features", str(fn(where)), "--out", str(where / "out"), "--name",
                    "uni", *extra]  # fmt: skip

        return build

    def neg_patch(w: Path) -> Path:
        return _good_h5(w / "neg_patch.h5", patch_size=-224)

    def zero_patch(w: Path) -> Path:
        return _good_h5(w / "zero_patch.h5", patch_size=0)

    def neg_coords(w: Path) -> Path:
        return _good_h5(w / "neg_coords.h5", coords=-np.arange(32).reshape(16, 2) * 448)

    def same_coords(w: Path) -> Path:
        return _good_h5(w / "same_coords.h5", coords=np.zeros((16, 2)))

    def nan_feats(w: Path) -> Path:
        f = np.full((16, 32), np.nan, np.float32)
        return _good_h5(w / "nan_feats.h5", feats=f)

    def row_mismatch(w: Path) -> Path:
        return _good_h5(w / "rows.h5", feats=np.zeros((5, 32), np.float32))

    def no_features(w: Path) -> Path:
        p = w / "nofeat.h5"
        with h5py.File(p, "w") as fh:
            fh["coords"] = np.zeros((4, 2))
        return p

    def empty_h5(w: Path) -> Path:
        p = w / "empty.h5"
        with h5py.File(p, "w"):
            pass
        return p

    def text_h5(w: Path) -> Path:
        p = w / "text.h5"
        p.write_text("features,coords\n1,2\n")
        return p

    def zero_rows(w: Path) -> Path:
        return _good_h5(w / "zero_rows.h5", coords=np.zeros((0, 2)),
                        feats=np.zeros((0, 32), np.float32))  # fmt: skip

    def three_d(w: Path) -> Path:
        return _good_h5(w / "three_d.h5", feats=np.zeros((16, 4, 8), np.float32))

    def inf_feats(w: Path) -> Path:
        f = np.zeros((16, 32), np.float32)
        f[3, 4] = np.inf
        return _good_h5(w / "inf_feats.h5", feats=f)

    spec = [("negative patch_size", neg_patch), ("zero patch_size", zero_patch),
            ("negative coords", neg_coords), ("identical coords", same_coords),
            ("NaN features", nan_feats), ("rows differ", row_mismatch),
            ("no features dataset", no_features), ("empty HDF5", empty_h5),
            ("text named .h5", text_h5), ("zero rows", zero_rows), ("3-D features", three_d),
            ("inf feature", inf_feats)]  # fmt: skip
    cases = [Case(f"import-features {n}", "import", one(fn)) for n, fn in spec]
    cases.append(
        Case(
            "import-features --mpp nan",
            "import",
            one(lambda w: _good_h5(w / "g.h5"), "--mpp", "nan"),
            names="--mpp",
        )
    )
    cases.append(
        Case(
            "import-features --tile-px -1",
            "import",
            one(lambda w: _good_h5(w / "g.h5"), "--tile-px", "-1"),
            names="--tile-px",
        )
    )
    return cases


def label_cases(kit: Kit) -> list[Case]:
    """`train` on odd labels files; the stores are good."""

    def train(rows_fn: Callable[[list[dict[str, str]]], list[dict[str, str]]],
              encoding: str = "utf-8", extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:  # fmt: skip
        def build(where: Path) -> list[str]:
            rows = rows_fn([dict(r) for r in kit.labels_rows()])
            labels = _write_csv(where / "labels.csv", rows, encoding=encoding)
            # the kit's 16 cases hold 8 per class: 2 folds, unless the case picks its split
            split = () if {"--folds", "--split", "--test-site"} & set(extra) else ("--folds", "2")
            return ["train", "--stores", str(kit.stores), "--labels", str(labels), "--out",
                    str(where / "model"), "--epochs", "2", "--n-boot", "20", *split,
                    *extra]  # fmt: skip

        return build

    def set_first(value: str) -> Callable[[list[dict[str, str]]], list[dict[str, str]]]:
        def fn(rows: list[dict[str, str]]) -> list[dict[str, str]]:
            rows[0]["label"] = value
            return rows

        return fn

    def variant(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        rows[0]["label"] = rows[0]["label"].capitalize()
        return rows

    def drop(col: str) -> Callable[[list[dict[str, str]]], list[dict[str, str]]]:
        return lambda rows: [{k: v for k, v in r.items() if k != col} for r in rows]

    def one_class(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        for r in rows:
            r["label"] = "benign"
        return rows

    def dup(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [*rows, dict(rows[0], label="malignant" if rows[0]["label"] == "benign"
                                  else "benign")]  # fmt: skip

    def unknown_slide(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [*rows, dict(rows[0], slide_id="NOT_A_STORE")]

    def inf_cov(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        rows[0]["age"] = "inf"
        return rows

    def text_cov(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        rows[0]["age"] = "sixty"
        return rows

    keep = lambda rows: rows  # noqa: E731
    model_done = lambda where: (where / "model" / "model.json").is_file()  # noqa: E731
    return [
        Case(
            "train: empty label cell",
            "labels",
            train(set_first("")),
            expect="accept",
            done=model_done,
        ),
        Case("train: NA label", "labels", train(set_first("NA")), expect="accept", done=model_done),
        Case(
            "train: NaN label", "labels", train(set_first("NaN")), expect="accept", done=model_done
        ),
        Case("train: case-variant class", "labels", train(variant), names="labels.csv"),
        Case("train: no label column", "labels", train(drop("label")), names="labels.csv"),
        Case("train: no slide_id column", "labels", train(drop("slide_id")), names="labels.csv"),
        Case(
            "train: no patient_id column", "labels", train(drop("patient_id")), names="labels.csv"
        ),
        Case("train: one class only", "labels", train(one_class), names="label"),
        Case("train: a slide listed twice, two labels", "labels", train(dup), names="labels.csv"),
        Case(
            "train: label for a missing store", "labels", train(unknown_slide), names="NOT_A_STORE"
        ),
        Case(
            "train: inf covariate",
            "labels",
            train(inf_cov, extra=("--covariates", "age")),
            names="age",
        ),
        Case(
            "train: text covariate",
            "labels",
            train(text_cov, extra=("--covariates", "age")),
            names="age",
        ),
        Case(
            "train: missing covariate column",
            "labels",
            train(keep, extra=("--covariates", "bmi")),
            names="bmi",
        ),
        Case(
            "train: UTF-8 BOM (Excel)",
            "labels",
            train(keep, encoding="utf-8-sig"),
            expect="accept",
            done=model_done,
        ),
        Case("train: UTF-16 labels", "labels", train(keep, encoding="utf-16"), names="labels.csv"),
        Case("train: --folds 1", "labels", train(keep, extra=("--folds", "1")), names="--folds"),
        Case("train: --epochs 0", "labels", train(keep, extra=("--epochs", "0")), names="--epochs"),
        Case("train: --lr nan", "labels", train(keep, extra=("--lr", "nan")), names="--lr"),
        Case(
            "train: --split 7:0", "labels", train(keep, extra=("--split", "7:0")), names="--split"
        ),
        Case(
            "train: unknown task", "labels", train(keep, extra=("--task", "grade")), names="grade"
        ),
    ]


def model_cases(kit: Kit) -> list[Case]:
    """Damaged model folders through `evaluate` and `score` (refused once, up front)."""

    def spoil(how: str) -> Callable[[Path], Path]:
        def fn(where: Path) -> Path:
            model = kit.model_copy(where)
            w, card = model / "model.safetensors", model / "model.json"
            if how == "truncated weights":
                w.write_bytes(w.read_bytes()[:100])
            elif how == "pickle as weights":
                w.write_bytes(pickle.dumps({"w": [1.0]}))
            elif how == "no weights":
                w.unlink()
            elif how == "card is a list":
                card.write_text("[1, 2, 3]")
            elif how == "card invalid JSON":
                card.write_text('{"format": 3,')
            elif how == "no card":
                card.unlink()
            elif how == "string temperature":
                data = json.loads(card.read_text())
                for cal in (data.get("calibration") or {}).values():
                    if isinstance(cal, dict):
                        cal["temperature"] = "warm"
                data.setdefault("calibration", {"label": {"temperature": "warm"}})
                card.write_text(json.dumps(data))
            elif how == "empty folder":
                shutil.rmtree(model)
                model.mkdir()
            elif how == "unknown encoder":
                data = json.loads(card.read_text())
                data["encoder"]["name"] = "no-such-encoder"
                card.write_text(json.dumps(data))
            return model

        return fn

    hows = ["truncated weights", "pickle as weights", "no weights", "card is a list",
            "card invalid JSON", "no card", "string temperature", "empty folder",
            "unknown encoder"]  # fmt: skip
    cases = []
    for how in hows:

        def ev(where: Path, how: str = how) -> list[str]:
            m = spoil(how)(where)
            return ["evaluate", "--model", str(m), "--stores", str(kit.stores), "--labels",
                    str(kit.labels), "--out", str(where / "report"), "--n-boot", "20"]  # fmt: skip

        def sc(where: Path, how: str = how) -> list[str]:
            m = spoil(how)(where)
            return ["score", str(kit.slides), "--model", str(m), "--out", str(where / "res"),
                    "--workers", "1", "--no-heatmaps"]  # fmt: skip

        cases.append(Case(f"evaluate: {how}", "models", ev, names="model"))
        cases.append(Case(f"score: {how}", "models", sc, names="model"))
    return cases


def score_cases(kit: Kit) -> list[Case]:
    """`score` inputs and options."""

    def manifest(rows: list[dict[str, str]], encoding: str = "utf-8") -> Callable[[Path], list[str]]:  # fmt: skip
        def build(where: Path) -> list[str]:
            m = _write_csv(where / "manifest.csv", rows, encoding=encoding)
            return ["score", str(m), "--model", str(kit.model), "--out", str(where / "res"),
                    "--workers", "1", "--no-heatmaps"]  # fmt: skip

        return build

    good = sorted(kit.slides.iterdir())
    ids = ["../../../victim", "/tmp/abs-victim", ".", "..", "a/b", ".hidden", "x\\y", "tab\tid",
           "", "z" * 300]  # fmt: skip
    cases = [
        Case(
            f"score manifest slide_id {sid[:20]!r}",
            "score",
            manifest([{"path": str(good[0]), "slide_id": sid}]),
            names="manifest.csv",
            # an empty cell: the column is optional, and the file's stem names the slide
            expect="accept" if sid == "" else "refuse",
            done=(lambda w: (w / "res" / "slides" / good[0].stem / "result.json").is_file())
            if sid == ""
            else None,
        )
        for sid in ids
    ]
    cases += [
        Case(
            "score manifest: no path column",
            "score",
            manifest([{"file": str(good[0])}]),
            names="manifest.csv",
        ),
        Case(
            "score manifest: missing slide",
            "score",
            manifest([{"path": str(kit.root / "gone.svs")}, {"path": str(good[0])}]),
            names="gone.svs",
            done=lambda w: (w / "res" / "slides" / good[0].stem / "result.json").is_file(),
        ),
        Case(
            "score manifest: UTF-8 BOM",
            "score",
            manifest([{"path": str(good[0])}], encoding="utf-8-sig"),
            expect="accept",
            done=lambda w: (w / "res" / "predictions.csv").is_file(),
        ),
        Case(
            "score manifest: UTF-16",
            "score",
            manifest([{"path": str(good[0])}], encoding="utf-16"),
            names="manifest.csv",
        ),
    ]

    def opt(*extra: str) -> Callable[[Path], list[str]]:
        def build(where: Path) -> list[str]:
            return ["score", str(kit.slides), "--model", str(kit.model), "--out",
                    str(where / "res"), "--no-heatmaps", *extra]  # fmt: skip

        return build

    for extra, names in [
        (("--workers", "0"), "--workers"), (("--threads", "0"), "--threads"),
        (("--workers", "1", "--scheduler", "tcp://127.0.0.1:1"), "--scheduler"),
        (("--scheduler", "tcp://127.0.0.1:1"), "127.0.0.1:1"),
        (("--dashboard", "not-an-address"), "--dashboard"),
        (("--mpp-target", "nan"), "--mpp-target"), (("--tile-px", "-1"), "--tile-px"),
        (("--mpp", "0"), "--mpp"),
    ]:  # fmt: skip
        cases.append(Case(f"score {' '.join(extra)}", "score", opt(*extra), names=names))

    def fifo(where: Path) -> list[str]:
        res = where / "res"
        (res / "slides" / good[0].stem).mkdir(parents=True)
        os.mkfifo(res / "slides" / good[0].stem / "result.json")
        return ["score", str(kit.slides), "--model", str(kit.model), "--out", str(res),
                "--workers", "1", "--no-heatmaps"]  # fmt: skip

    cases.append(Case("score: result.json is a FIFO", "score", fifo, expect="accept",
                      done=lambda w: (w / "res" / "predictions.csv").is_file()))  # fmt: skip
    return cases


def store_cases(kit: Kit) -> list[Case]:
    """Damaged tile stores through `embed` and `score`'s reuse."""

    def damaged(how: str) -> Callable[[Path], Path]:
        def fn(where: Path) -> Path:
            stores = where / "stores"
            shutil.copytree(kit.stores, stores)
            one = sorted(stores.glob("*.zarr"))[0]
            if how == "missing shard":
                shards = sorted(p for p in (one / "patches").rglob("*") if p.is_file()
                                and p.name != "zarr.json")  # fmt: skip
                shards[0].unlink()
            elif how == "garbage zarr.json":
                (one / "zarr.json").write_text("{not json")
            elif how == "empty store folder":
                shutil.rmtree(one)
                one.mkdir()
            elif how == "features deleted":
                shutil.rmtree(one / "features", ignore_errors=True)
            return stores

        return fn

    cases = []
    for how in ["missing shard", "garbage zarr.json", "empty store folder"]:

        def emb(where: Path, how: str = how) -> list[str]:
            s = damaged(how)(where)
            return ["embed", str(s), "--encoder", "pathomics"]

        cases.append(Case(f"embed: {how}", "stores", emb, names=".zarr"))

    def ev(where: Path) -> list[str]:
        s = damaged("features deleted")(where)
        return ["evaluate", "--model", str(kit.model), "--stores", str(s), "--labels",
                str(kit.labels), "--out", str(where / "report"), "--n-boot", "20"]  # fmt: skip

    cases.append(Case("evaluate: a store without features", "stores", ev, names=".zarr"))
    return cases


def spatial_cases(kit: Kit) -> list[Case]:
    """`immune` numbers and inputs (the ultrasound/Visium validators have their own tests)."""
    cases = []
    for flag, value in [("--bin-um", "1e-4"), ("--bin-um", "0"), ("--bin-um", "nan"),
                        ("--bin-um", "-50"), ("--bin-um", "inf"), ("--min-positive", "-1"),
                        ("--mpp", "nan"), ("--threads", "0"), ("--region", "0,0,-5,5"),
                        ("--region", "a,b,c,d"), ("--region", "99999,99999,10,10")]:  # fmt: skip

        def build(where: Path, flag: str = flag, value: str = value) -> list[str]:
            return ["immune", str(kit.good), "--out", str(where / "out"), flag, value]

        cases.append(Case(f"immune {flag} {value}", "spatial", build, names=flag))

    def white(where: Path) -> list[str]:
        import tifffile

        p = where / "white.tif"
        tifffile.imwrite(p, np.full((1024, 1024, 3), 255, np.uint8), tile=(256, 256),
                         photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")  # fmt: skip
        return ["immune", str(p), str(kit.good), "--out", str(where / "out")]

    cases.append(Case("immune: a blank slide + a good one", "spatial", white, names="white.tif"))
    return cases


def disk_cases(kit: Kit) -> list[Case]:
    """A full output disk (a small tmpfs; needs the right to mount, else skipped)."""

    def full(size: str, command: str) -> Callable[[Path], list[str]]:
        def build(where: Path) -> list[str]:
            disk = where / "disk"
            disk.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                           check=True, capture_output=True)  # fmt: skip
            if command == "score":
                return ["score", str(kit.slides), "--model", str(kit.model), "--out",
                        str(disk / "res"), "--workers", "1", "--no-heatmaps"]  # fmt: skip
            return ["tile", str(kit.slides), "--out", str(disk / "out")]

        return build

    return [
        Case(f"{cmd}: disk full ({size})", "disk", full(size, cmd), names="no space left")
        for cmd in ("score", "tile")
        for size in ("600k", "8k")
    ]


def store_folder_cases(kit: Kit) -> list[Case]:
    """`score` and `embed` on a folder of stores holding one bad entry: it is one row, and the
    other stores are still scored (the score cases reuse the kit's stores: nothing is tiled)."""

    def spoil(how: str, stores: Path) -> str:
        one = sorted(stores.glob("*.zarr"))[0]
        if how == "broken link":
            (stores / "gone.zarr").symlink_to(stores.parent / "nowhere.zarr")
            return "gone.zarr"
        if how == "unfinished store":
            (stores / "half.zarr").mkdir()
            return "half.zarr"
        if how == "sub-folder of stores":
            shutil.copytree(one, stores / "batch2" / "deeper.zarr")
            return "batch2"
        shard = next(p for p in sorted(one.joinpath("patches", "c").rglob("*")) if p.is_file())
        if how == "missing shard":
            shard.unlink()
        elif how == "old store, missing shard":  # written before manifests
            (one / "oncotrace-manifest.json").unlink()
            shard.unlink()
        elif how == "garbage zarr.json":
            (one / "zarr.json").write_text("{not json")
        return one.name

    def scored_rest(where: Path, bad: str) -> bool:
        with open(where / "res" / "predictions.csv", newline="") as fh:
            ids = {r["slide_id"] for r in csv.DictReader(fh)}
        want = {p.name.removesuffix(".zarr") for p in kit.stores.glob("*.zarr")}
        return want - {bad.removesuffix(".zarr")} <= ids

    cases = []
    for how in ["broken link", "unfinished store", "sub-folder of stores", "missing shard",
                "old store, missing shard", "garbage zarr.json"]:  # fmt: skip
        named: dict[str, str] = {}

        def sc(where: Path, how: str = how, named: dict[str, str] = named) -> list[str]:
            stores = where / "stores"
            shutil.copytree(kit.stores, stores, symlinks=True)
            named["bad"] = spoil(how, stores)
            return ["score", str(stores), "--model", str(kit.model), "--out", str(where / "res"),
                    "--workers", "1", "--no-heatmaps"]  # fmt: skip

        def em(where: Path, how: str = how) -> list[str]:
            stores = where / "stores"
            shutil.copytree(kit.stores, stores, symlinks=True)
            spoil(how, stores)
            return ["embed", str(stores), "--encoder", "pathomics"]

        bad_name = {"broken link": "gone.zarr", "unfinished store": "half.zarr",
                    "sub-folder of stores": "batch2"}.get(how, sorted(
                        p.name for p in kit.stores.glob("*.zarr"))[0])  # fmt: skip
        cases.append(Case(f"score stores folder: {how}", "store folders", sc, names=bad_name,
                          done=lambda w, b=bad_name: scored_rest(w, b)))  # fmt: skip
        if how not in ("missing shard", "garbage zarr.json"):  # those are in store_cases
            cases.append(Case(f"embed stores folder: {how}", "store folders", em, names=bad_name))
    return cases


def out_and_address_cases(kit: Kit) -> list[Case]:
    """`--out` that cannot be a folder, and dashboard addresses that cannot work."""

    def blocked(command: Callable[[Path], list[str]], inside: bool) -> Callable[[Path], list[str]]:
        def build(where: Path) -> list[str]:
            (where / "results").write_text("a file, not a folder")
            out = where / "results" / "sub" if inside else where / "results"
            return [*command(where), "--out", str(out)]

        return build

    def h5(where: Path) -> list[str]:
        return ["import-features", str(_good_h5(where / "g.h5")), "--name", "uni"]

    commands: dict[str, Callable[[Path], list[str]]] = {
        "tile": lambda w: ["tile", str(kit.good)],
        "score": lambda w: ["score", str(kit.slides), "--model", str(kit.model), "--workers", "1"],
        "immune": lambda w: ["immune", str(kit.good)],
        "import-features": h5,
        "train": lambda w: ["train", "--stores", str(kit.stores), "--labels", str(kit.labels)],
        "evaluate": lambda w: [
            "evaluate",
            "--stores",
            str(kit.stores),
            "--labels",
            str(kit.labels),
            "--model",
            str(kit.model),
        ],
    }
    cases = [
        Case(
            f"{name}: --out {'inside ' if inside else ''}a file",
            "out and address",
            blocked(cmd, inside),
            names="results",
        )
        for name, cmd in commands.items()
        for inside in (False, True)
    ]
    for address in ("no-such-host.invalid:8787", ":99999", "127.0.0.1:http"):

        def dash(where: Path, address: str = address) -> list[str]:
            return ["score", str(kit.slides), "--model", str(kit.model), "--out",
                    str(where / "res"), "--workers", "1", "--dashboard", address]  # fmt: skip

        cases.append(Case(f"score --dashboard {address}", "out and address", dash,
                          names="--dashboard"))  # fmt: skip
    return cases


def all_cases(kit: Kit, shared: Path | None) -> list[Case]:
    return [
        *slide_file_cases(kit, shared), *_slide_variants(kit), *tiling_number_cases(kit),
        *discovery_cases(kit), *import_cases(kit), *label_cases(kit), *model_cases(kit),
        *score_cases(kit), *store_cases(kit), *spatial_cases(kit), *disk_cases(kit),
        *store_folder_cases(kit), *out_and_address_cases(kit),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# running and judging
# --------------------------------------------------------------------------------------------

_TRACEBACK = ("Traceback (most recent call last)", "╭─────", "Error in batched write")


def judge(case: Case, where: Path, code: int | None, text: str, timed_out: bool) -> str:
    if timed_out or any(t in text for t in _TRACEBACK):
        return "traceback"
    if case.expect == "accept":
        ok = code == 0 and (case.done is None or case.done(where))
        return "clean" if ok else "silent"
    if case.done is not None and not case.done(where):
        return "lost"
    said = [ln for ln in text.splitlines() if ln.startswith(("error:", "failed:", "warning:"))]
    if code == 0 and not said:
        return "silent"
    if code == 0 and not any(ln.startswith(("error:", "failed:")) for ln in said):
        return "clean" if case.names and case.names in " ".join(text.split()) else "silent"
    joined = " ".join(" ".join(text.split()).split())
    return "clean" if (case.names or "") in joined else "unclear"


def run_case(case: Case, root: Path) -> Outcome:
    where = root / "".join(c if c.isalnum() else "_" for c in case.name)[:80]
    if where.exists():
        shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        args = case.build(where)
    except subprocess.CalledProcessError:
        return Outcome(case.name, case.group, "skipped", None, 0.0, "could not set up (mount?)")
    if case.names is None:
        case.names = Path(args[1]).name if len(args) > 1 else None
    env = {**os.environ, "COLUMNS": "400", **case.extra_env}
    timed_out = False
    try:
        proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env,
                              timeout=TIMEOUT_S, cwd=where)  # fmt: skip
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, timed_out = None, True
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
    verdict = judge(case, where, code, text, timed_out)
    first = next(
        (ln for ln in text.splitlines() if ln.startswith(("error:", "failed:", "warning:"))),
        text.strip().splitlines()[-1] if text.strip() else "",
    )
    for disk in where.glob("disk"):
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)
    return Outcome(case.name, case.group, verdict, code, time.perf_counter() - t0, first[:300])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/oncotrace-corpus"))
    ap.add_argument("--only", default=None, help="run cases whose name contains this")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    shared = shared if (shared / "MANIFEST.md").is_file() else None
    kit = Kit(args.out / "kit")
    cases = [c for c in all_cases(kit, shared) if args.only is None or args.only in c.name]
    outcomes = []
    for case in cases:
        o = run_case(case, args.out / "cases")
        outcomes.append(o)
        print(f"{o.verdict:9s} {o.exit_code!s:>4} {o.seconds:6.1f}s  {o.group:11s} {o.case}"
              f"  | {o.line}", flush=True)  # fmt: skip
    counts = Counter(o.verdict for o in outcomes)
    tried = sum(v for k, v in counts.items() if k != "skipped")
    summary = {"tried": tried, **{k: counts.get(k, 0) for k in
               ("clean", "unclear", "traceback", "silent", "lost", "skipped")}}  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary,
                                         "cases": [o.__dict__ for o in outcomes]}, indent=1))  # fmt: skip
    return 0 if tried == counts.get("clean", 0) else 1


if __name__ == "__main__":
    sys.exit(main())
