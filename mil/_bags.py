"""Bags of instance features read lazily from tile stores, and a read-ahead iterator over them.

``ZarrBags`` is a read-only ``Sequence`` of (N_i, D) float32 arrays: item ``i`` is
``features/<name>`` of store ``i``, read when asked for. Shapes and the common dim come from the
arrays' metadata, so a cohort of any size can be checked without reading a feature.
``prefetch_bags`` walks a sequence of bags in a given order and, for lazy sequences, reads the
next bags on a background thread while the caller trains on the current one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from oncotrace.wsi import Store, read_ahead


class ZarrBags(Sequence[np.ndarray]):
    """Feature bags of several tile stores, read on access.

    Parameters
    ----------
    store_paths : the ``<slide_id>.zarr`` stores, one bag each, in this order.
    feature_name : the encoder name: item ``i`` is ``<store_i>/features/<feature_name>``.

    Attributes
    ----------
    paths : tuple of the store paths.
    feature_name : as given.
    shapes : list of ``(N_i, D)`` per store, from the arrays' metadata (no data read).
    dim : D, shared by every store.
    prefetchable : True: :func:`prefetch_bags` reads these bags ahead on a thread.

    Raises
    ------
    ValueError
        When there are no stores, a store lacks ``features/<feature_name>``, the array is not
        2-D, or its dim differs from the first store's. The message names the store and the fix.

    Notes
    -----
    Arrays are opened once, through the zarrs codec pipeline when it is installed (decoding a
    4096-row chunk natively instead of through asyncio tasks). Nothing is cached: each access
    reads the bag from disk, so memory stays at the bags in use whatever the cohort size.
    """

    prefetchable = True

    def __init__(self, store_paths: Iterable[str | Path], feature_name: str) -> None:
        self.paths = tuple(Path(p) for p in store_paths)
        self.feature_name = feature_name
        if not self.paths:
            raise ValueError("ZarrBags needs at least one store.")
        arrays = [
            Store.open(p, require_complete=False).features_array(feature_name) for p in self.paths
        ]
        self._arrays = arrays
        self.shapes: list[tuple[int, int]] = []
        dim = int(arrays[0].shape[1])
        for p, a in zip(self.paths, arrays, strict=True):
            if int(a.shape[1]) != dim:
                raise ValueError(
                    f"{p}: features/{feature_name} has dim {a.shape[1]} but {self.paths[0]} has"
                    f" {dim}; every bag must come from the same encoder. Fix: re-embed or"
                    f" re-import {p} with the encoder of the others, or leave it out."
                )
            self.shapes.append((int(a.shape[0]), int(a.shape[1])))
        self.dim = dim

    def __len__(self) -> int:
        return len(self._arrays)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> ZarrBags: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | ZarrBags:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"bag index {index} out of range for {len(self)} bags")
        return np.asarray(self._arrays[i][...], dtype=np.float32)

    def subset(self, indices: Iterable[int]) -> ZarrBags:
        """The bags at ``indices`` (in that order) as a new ``ZarrBags``; no data is read."""
        idx = [int(i) for i in indices]
        new = ZarrBags.__new__(ZarrBags)
        new.paths = tuple(self.paths[i] for i in idx)
        new.feature_name = self.feature_name
        new._arrays = [self._arrays[i] for i in idx]
        new.shapes = [self.shapes[i] for i in idx]
        new.dim = self.dim
        return new

    def __repr__(self) -> str:
        return f"ZarrBags({len(self)} stores, features/{self.feature_name}, dim {self.dim})"


def prefetch_bags(
    bags: Sequence[Any], order: Iterable[int], depth: int = 2
) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, bags[i])`` for each ``i`` in ``order``, reading ahead when bags are lazy.

    Parameters
    ----------
    bags : any sequence of bags. If it has a true ``prefetchable`` attribute (e.g.
        :class:`ZarrBags`), up to ``depth`` of the next bags are read on a background thread
        while the caller works on the current one; otherwise (in-memory lists) items are yielded
        directly, with no thread.
    order : indices into ``bags``, e.g. ``rng.permutation(len(bags))``.
    depth : how many bags may be read ahead (>= 1).

    Yields
    ------
    (i, bag) : the index and the bag, in ``order``.

    Notes
    -----
    An exception raised while reading a bag is raised in the caller, at the position of that
    bag. Closing the iterator early (``break``, an exception in the caller's loop, ``close()``)
    stops the reader thread after the read it is doing; at most ``depth`` unused bags are read.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    idx = [int(i) for i in order]
    if not getattr(bags, "prefetchable", False):
        for i in idx:
            yield i, bags[i]
        return
    with read_ahead(((i, bags[i]) for i in idx), depth, name="bag-prefetch") as items:
        yield from items
