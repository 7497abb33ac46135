"""ZarrBags reads what was written, knows shapes without reading; prefetch order/errors/close."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from oncotrace.mil import ZarrBags, prefetch_bags


def _store(path: Path, feats: np.ndarray | None, name: str = "enc") -> Path:
    g = zarr.open_group(path, mode="w", zarr_format=3)
    g.create_array("coords", data=np.zeros((0 if feats is None else len(feats), 2), np.int64))
    if feats is not None:
        g.require_group("features").create_array(name, data=feats, chunks=(7, feats.shape[1]))
    return path


def _stores(tmp_path: Path, sizes: Sequence[int], dim: int = 5) -> tuple[list[Path], list[Any]]:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, dim)).astype(np.float32) for n in sizes]
    paths = [_store(tmp_path / f"s{i}.zarr", a) for i, a in enumerate(arrays)]
    return paths, arrays


def test_items_equal_the_written_arrays_in_order(tmp_path: Path) -> None:
    paths, arrays = _stores(tmp_path, [3, 17, 1, 8])
    bags = ZarrBags(paths, "enc")
    assert len(bags) == 4
    for i, a in enumerate(arrays):
        got = bags[i]
        assert got.dtype == np.float32 and got.shape == a.shape
        np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(bags[-1], arrays[-1])
    sub = bags.subset([3, 0])
    np.testing.assert_array_equal(sub[0], arrays[3])
    np.testing.assert_array_equal(bags[1:3][1], arrays[2])
    with pytest.raises(IndexError):
        bags[4]


def test_float16_features_come_back_as_float32(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float16).reshape(4, 3) / 8
    bags = ZarrBags([_store(tmp_path / "h.zarr", a)], "enc")
    assert bags[0].dtype == np.float32
    np.testing.assert_array_equal(bags[0], a.astype(np.float32))


def test_shapes_and_dim_need_no_feature_data(tmp_path: Path) -> None:
    paths, _ = _stores(tmp_path, [9, 4], dim=6)
    for p in paths:  # drop every chunk: only the metadata is left
        shutil.rmtree(p / "features" / "enc" / "c")
    bags = ZarrBags(paths, "enc")
    assert bags.shapes == [(9, 6), (4, 6)]
    assert bags.dim == 6
    assert bags.subset([1]).shapes == [(4, 6)]


def test_missing_array_names_the_store_and_the_fix(tmp_path: Path) -> None:
    paths, _ = _stores(tmp_path, [3])
    bare = _store(tmp_path / "bare.zarr", None)
    with pytest.raises(ValueError, match=r"bare\.zarr.*features/enc.*oncotrace embed"):
        ZarrBags([paths[0], bare], "enc")
    with pytest.raises(ValueError, match=r"nowhere\.zarr: not a Zarr store"):
        ZarrBags([tmp_path / "nowhere.zarr"], "enc")


def test_dim_mismatch_names_the_store(tmp_path: Path) -> None:
    a = _store(tmp_path / "a.zarr", np.zeros((2, 4), np.float32))
    b = _store(tmp_path / "b.zarr", np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"b\.zarr: features/enc has dim 5 but .*a\.zarr has 4"):
        ZarrBags([a, b], "enc")


def test_prefetch_yields_in_the_given_order(tmp_path: Path) -> None:
    paths, arrays = _stores(tmp_path, [2, 3, 4, 5, 6])
    order = [3, 0, 4, 1, 2, 0]
    got = list(prefetch_bags(ZarrBags(paths, "enc"), np.array(order), depth=2))
    assert [i for i, _ in got] == order
    for i, bag in got:
        np.testing.assert_array_equal(bag, arrays[i])


class _Lazy(Sequence[Any]):
    """A prefetchable sequence that records which thread read what, and can fail or block."""

    prefetchable = True

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.read: list[int] = []
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        if i == self.fail_at:
            raise OSError(f"disk error in bag {i}")
        self.read.append(i)
        return np.full((1, 1), i, np.float32)


def test_plain_lists_are_yielded_without_a_thread() -> None:
    before = threading.active_count()
    bags = [np.full((1, 1), i) for i in range(4)]
    it = prefetch_bags(bags, [2, 1])
    assert next(it)[0] == 2
    assert threading.active_count() == before
    assert [i for i, _ in it] == [1]


def test_lazy_bags_are_read_on_another_thread() -> None:
    bags = _Lazy(5)
    assert [int(b[0, 0]) for _, b in prefetch_bags(bags, range(5))] == [0, 1, 2, 3, 4]
    assert bags.threads == {"bag-prefetch"}


def test_reader_exception_surfaces_in_the_caller_at_that_bag() -> None:
    bags = _Lazy(6, fail_at=3)
    seen = []
    with pytest.raises(OSError, match="disk error in bag 3"):
        for i, _ in prefetch_bags(bags, range(6)):
            seen.append(i)
    assert seen == [0, 1, 2]
    assert not [t for t in threading.enumerate() if t.name == "bag-prefetch"]


def test_early_close_stops_the_reader_after_at_most_depth_more_bags() -> None:
    bags = _Lazy(1000)
    it = prefetch_bags(bags, range(1000), depth=3)
    assert next(it)[0] == 0
    time.sleep(0.05)  # let the reader fill its slots (it cannot go further)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "bag-prefetch"]
    # bag 0 (taken) + up to 3 read ahead, never the whole sequence
    assert bags.read == list(range(len(bags.read)))
    assert 1 <= len(bags.read) <= 4


def test_break_in_a_for_loop_also_stops_the_reader() -> None:
    bags = _Lazy(1000)
    for i, _ in prefetch_bags(bags, range(1000), depth=2):
        if i == 5:
            break
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name == "bag-prefetch"]:
        assert time.monotonic() < deadline, "reader thread still running after break"
        time.sleep(0.01)
    assert len(bags.read) <= 6 + 2


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        list(prefetch_bags([np.zeros((1, 1))], [0], depth=0))
