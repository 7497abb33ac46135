"""One self-describing Zarr v3 store per slide, committed atomically.

Layout of ``<out>/<slide_id>.zarr``::

    patches         (N, H, W, 3) uint8   chunks (1, H, W, 3) inside shards (64, H, W, 3)
    coords          (N, 2) int64         level-0 (x, y) of each tile's top-left corner (tiles
                                         of the last column / row may overhang the slide: their
                                         pixels beyond it are white; attrs ``edges="padded"``)
    tissue_fraction (N,) float32         mask coverage of each tile
    focus           (N,) float32         variance of the Laplacian (blur score; opt-in)
    focal_plane     (N,) int16           chosen Z plane (only for multi-plane files)
    mask            (h, w) bool          tissue / cell mask on the overview grid
    thumbnail       (h, w, 3) uint8      the overview the mask was computed on

A store is written through :meth:`Store.create` under ``.<slide_id>.zarr.partial-<pid>-<rand>``
and renamed when complete, so anything named ``<slide_id>.zarr`` is finished. Its attrs are a
:class:`StoreAttrs` (``_storage.py`` owns their on-disk form).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from oncotrace import __version__
from zarr.codecs import BloscCodec

from ._errors import NoTissueError, ParameterError
from ._io import remove_stale_partials
from ._slide import BackendChoice, Slide, open_slide, resize_rgb
from ._storage import STORE_FORMAT, Store, StoreAttrs, TilingConfig, fast_codecs
from ._tiling import (
    EDGES,
    MIN_TISSUE,
    TileGeometry,
    _geometry,
    focus_score,
    read_sharpest,
    tile_coords,
    tissue_fraction,
)
from ._tissue import TissueMask, detect_tissue

SHARD_TILES = 64


def slide_id_for(path: str | Path) -> str:
    """The store name for a slide: its file stem, or the folder name of a DICOM-WSI folder."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


#: Longest slide id (file systems take 255 bytes per name; ``.zarr`` and partial suffixes).
MAX_SLIDE_ID = 200


def check_slide_id(slide_id: str, where: str = "slide id") -> str:
    """``slide_id`` when it is a plain name usable as one folder or file name; raises otherwise.

    Ids name stores and result folders, so they are never paths: no ``/`` or ``\\``, not
    ``.``/``..`` or hidden (a leading dot, which the atomic writers' temporaries use), no control
    characters, not empty, at most :data:`MAX_SLIDE_ID` characters.

    Raises
    ------
    ParameterError
        Naming ``where`` (e.g. ``manifest.csv line 3``), the id and the fix; ``param`` is
        ``"slide_id"``.
    """
    sid = str(slide_id)
    problem = None
    if not sid.strip():
        problem = "is empty"
    elif "/" in sid or "\\" in sid or Path(sid).is_absolute():
        problem = "contains a path separator"
    elif sid.startswith("."):
        problem = "starts with a dot (., .. and hidden names are not slide ids)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in sid):
        problem = "contains control characters"
    elif len(sid) > MAX_SLIDE_ID:
        problem = f"is longer than {MAX_SLIDE_ID} characters"
    if problem is not None:
        raise ParameterError(
            f"{where}: slide id {sid!r} {problem}; ids name result folders and stores, so they"
            " must be plain names. Fix: use letters, digits, '-', '_' and inner dots"
            " (e.g. 'TCGA-AB-1234_S1').",
            param="slide_id",
        )
    return sid


def store_path(out_dir: str | Path, slide_id: str) -> Path:
    """``<out_dir>/<slide_id>.zarr``; ``slide_id`` must pass :func:`check_slide_id`."""
    return Path(out_dir) / f"{check_slide_id(slide_id)}.zarr"


def read_store_attrs(path: str | Path) -> dict[str, Any] | None:
    """The store's attrs in their JSON form, or ``None`` if ``path`` is not a finished store.

    For tools that want the raw dict; code reads :attr:`Store.attrs` (typed) instead.
    """
    store = Store.find(path)
    return None if store is None else store.attrs.to_dict()


def is_complete(path: str | Path, *, fingerprint: str, config: TilingConfig) -> bool:
    """True if ``path`` is a finished store of the same source and tiling config.

    A store cut before edge tiles were (``StoreAttrs.edges`` unset) is not: it lacks the tiles
    of the right and bottom edges that the same config now cuts. Nor is a damaged one
    (:meth:`Store.damage`: a shard or array file lost or cut short since it was committed).
    """
    store = Store.find(path)
    return (
        store is not None
        and store.damage() is None
        and _up_to_date(store.attrs, fingerprint, config)
    )


def _up_to_date(attrs: StoreAttrs, fingerprint: str, config: TilingConfig) -> bool:
    return (
        attrs.source_fingerprint == fingerprint and attrs.tiling == config and attrs.edges == EDGES
    )


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def write_patches(
    slide: Slide,
    coords: np.ndarray,
    out_dir: str | Path,
    *,
    config: TilingConfig | None = None,
    mask: TissueMask | None = None,
    slide_id: str | None = None,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Read the tiles at ``coords`` and write them, atomically, into ``<out_dir>/<slide_id>.zarr``.

    Parameters
    ----------
    slide : the opened slide.
    coords : (N, 2) int64 ndarray, level-0 top-left corners (from :func:`tile_coords`, which
        warns if the slide is upsampled; this function only records the factor in the attrs).
    out_dir : folder of stores; created if missing.
    config : resolution, tile size and filters (default :class:`TilingConfig`).
    mask : the tissue mask (stored with its thumbnail, and used for per-tile coverage).
    slide_id : store name; default the slide's file stem.
    workers : reader threads. Readers release the GIL; each thread handles one shard of
        64 tiles at a time, so peak memory is a few shards whatever the slide size.
    progress : called with the number of tiles finished after each shard.

    Returns
    -------
    Path of the finished store.
    """
    cfg = config or TilingConfig()
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    sid = slide_id or slide_id_for(slide.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = store_path(out, sid)
    remove_stale_partials(final)
    # No UpsamplingWarning here: tile_coords gave it for these coords; the attrs record the factor.
    geom = _geometry(
        slide,
        target_mpp=cfg.target_mpp,
        tile_px=cfg.tile_px,
        stride_px=cfg.stride_px,
        max_upsample=cfg.max_upsample,
    )
    with Store.create(final) as store:
        with fast_codecs(), _gc_frozen():
            kept = _write_arrays(slide, coords, store, geom, cfg, mask, workers, progress)
        store.write_attrs(_attrs(slide, sid, geom, cfg, mask, kept))
    return final


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that already exist.

    The tile loop allocates many short-lived objects, so the collector runs constantly, and each
    run walks everything imported (numpy, scipy, skimage, zarr): 25 % of the tiling CPU on a 50k
    slide. Freezing moves today's objects out of its sight; new garbage is still collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_arrays(
    slide: Slide,
    coords: np.ndarray,
    store: Store,
    geom: TileGeometry,
    cfg: TilingConfig,
    mask: TissueMask | None,
    workers: int,
    progress: Callable[[int], None] | None,
) -> int:
    n, tp = len(coords), cfg.tile_px
    group = store.group
    # LZ4 level 1, no shuffle: tissue tiles compress only ~1.08-1.15x with any lossless codec,
    # so the codec is chosen for speed (0.12 ms/tile, faster than writing raw bytes; level 5
    # costs 0.45 ms for 1.09x); it still squeezes glass and background-heavy edge tiles.
    blosc = BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")
    patches = group.create_array(
        "patches",
        shape=(n, tp, tp, 3),
        dtype="uint8",
        chunks=(1, tp, tp, 3),
        shards=(SHARD_TILES, tp, tp, 3),
        compressors=blosc,
        dimension_names=("tile", "y", "x", "c"),
    )
    multi_z = slide.n_focal_planes > 1
    want_focus = cfg.focus or cfg.min_focus is not None or multi_z
    focus = np.full(n, np.nan, np.float32)
    plane = np.zeros(n, np.int16)

    def write_batch(start: int, batch: np.ndarray) -> int:
        if want_focus and not multi_z:
            for j in range(len(batch)):
                focus[start + j] = focus_score(batch[j])
        patches[start : start + len(batch)] = batch  # whole shards: no read-modify-write
        return len(batch)

    # One writer thread: Zarr encoding overlaps with decoding of the next shards.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-write") as writer:
        pending: deque[Future[int]] = deque()

        def drain(keep: int) -> None:
            while len(pending) > keep:
                done = pending.popleft().result()
                if progress:
                    progress(done)

        for start, batch in _tile_batches(slide, coords, geom, workers, multi_z, focus, plane):
            pending.append(writer.submit(write_batch, start, batch))
            drain(keep=2)  # bound memory: two shards waiting to be written
        drain(keep=0)

    frac = (
        tissue_fraction(mask, coords, geom.size_level0)
        if mask is not None
        else np.ones(n, np.float32)
    )
    keep = np.ones(n, bool)
    if cfg.min_focus is not None:
        keep = focus >= cfg.min_focus
    if not keep.all():
        _compact(group, patches, keep)
    kept = int(keep.sum())
    store.write_coords(coords[keep])
    group.create_array("tissue_fraction", data=frac[keep], dimension_names=("tile",))
    if want_focus:
        group.create_array("focus", data=focus[keep], dimension_names=("tile",))
    if multi_z:
        group.create_array("focal_plane", data=plane[keep], dimension_names=("tile",))
    if mask is not None:
        m = group.create_array("mask", data=mask.mask.astype(bool), dimension_names=("y", "x"))
        m.attrs.update({"downsample": mask.downsample, "mpp": mask.mpp})
        t = group.create_array("thumbnail", data=mask.thumbnail, dimension_names=("y", "x", "c"))
        t.attrs.update({"downsample": mask.downsample, "mpp": mask.mpp})
    return kept


def _tile_batches(
    slide: Slide,
    coords: np.ndarray,
    geom: TileGeometry,
    workers: int,
    multi_z: bool,
    focus: np.ndarray,
    plane: np.ndarray,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, (n, tile_px, tile_px, 3))`` shard-sized batches of finished tiles."""
    tp = geom.tile_px
    if multi_z:  # every plane of every tile: per-tile reads in threads

        def sharpest(bounds: tuple[int, int]) -> np.ndarray:
            out = np.empty((bounds[1] - bounds[0], tp, tp, 3), np.uint8)
            for i in range(*bounds):
                xy = (int(coords[i, 0]), int(coords[i, 1]))
                out[i - bounds[0]], focus[i], plane[i] = read_sharpest(slide, xy, geom)
            return out

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            bounds = list(_batches(len(coords), SHARD_TILES))
            for b, batch in zip(bounds, pool.map(sharpest, bounds), strict=True):
                yield b[0], batch
        return
    start = 0
    for regions in slide.iter_regions(
        coords, geom.read_level, geom.read_size, batch_size=SHARD_TILES, workers=workers
    ):
        if regions.shape[1:3] != (tp, tp):
            regions = np.stack([resize_rgb(r, (tp, tp)) for r in regions])
        yield start, regions
        start += len(regions)


def _compact(group: zarr.Group, patches: zarr.Array, keep: np.ndarray) -> None:
    """Drop rejected tiles (blur filter) by rewriting the patch array shard by shard."""
    idx = np.flatnonzero(keep)
    tp = patches.shape[1]
    new = group.create_array(
        "patches_kept",
        shape=(len(idx), tp, tp, 3),
        dtype="uint8",
        chunks=(1, tp, tp, 3),
        shards=(SHARD_TILES, tp, tp, 3),
        compressors=patches.compressors,
        dimension_names=("tile", "y", "x", "c"),
    )
    for start, stop in _batches(len(idx), SHARD_TILES):
        new[start:stop] = patches.get_orthogonal_selection((idx[start:stop],))
    root = (
        Path(str(group.store_path.store.root)) if hasattr(group.store_path.store, "root") else None
    )
    if root is None:  # pragma: no cover - only local stores are written here
        raise RuntimeError("tile stores must be on a local filesystem")
    shutil.rmtree(root / "patches")
    os.replace(root / "patches_kept", root / "patches")


def _attrs(
    slide: Slide, sid: str, geom: TileGeometry, cfg: TilingConfig, mask: TissueMask | None, n: int
) -> StoreAttrs:
    mx, my = slide.mpp_xy
    assert slide.mpp is not None  # mpp_xy raised otherwise
    return StoreAttrs(
        format_version=STORE_FORMAT,
        complete=True,
        package_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        slide_id=sid,
        source_path=str(slide.path.resolve()),
        source_fingerprint=slide.fingerprint,
        backend=slide.backend,
        level0_size=(slide.dimensions[0], slide.dimensions[1]),
        mpp=(mx, my),
        mpp_source=slide.mpp.source,
        mpp_detail=slide.mpp.detail,
        mode=cfg.mode,
        tiling=cfg,
        target_mpp=cfg.target_mpp,
        tile_px=cfg.tile_px,
        tile_size_level0=(geom.size_level0[0], geom.size_level0[1]),
        stride_level0=(geom.stride_level0[0], geom.stride_level0[1]),
        read_level=geom.read_level,
        read_size=(geom.read_size[0], geom.read_size[1]),
        upsample=geom.upsample,
        edges=EDGES,
        n_tiles=n,
        tissue_qc=dict(mask.qc) if mask is not None else {},
        mask_mpp=mask.mpp if mask is not None else None,
        slide_properties=slide.exported_properties(),
    )


@dataclass(frozen=True)
class TileResult:
    """Outcome of :func:`tile_slide` for one slide."""

    slide_id: str
    store: Path
    n_tiles: int
    skipped: bool
    seconds: float
    #: ``finest µm/px / target µm/px`` the tiles were resampled up by (1.0: not upsampled)
    upsample: float = 1.0


def tile_slide(
    path: str | Path,
    out_dir: str | Path,
    config: TilingConfig | None = None,
    *,
    mpp: float | None = None,
    backend: BackendChoice = "auto",
    workers: int = 2,
    slide_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> TileResult:
    """Open, detect, tile and store one slide; skip it if an identical store is complete.

    Raises the ``wsi`` errors of each stage (open, detect, tile) unchanged, and warns
    (:class:`UpsamplingWarning`) when the slide is upsampled to the target.
    """
    import time

    t0 = time.perf_counter()
    cfg = config or TilingConfig()
    sid = slide_id or slide_id_for(path)
    target = store_path(out_dir, sid)
    with open_slide(path, backend=backend, mpp=mpp) as slide:
        done = Store.find(target)
        intact = done is not None and done.damage() is None  # a lost shard: cut it again
        if done is not None and intact and _up_to_date(done.attrs, slide.fingerprint, cfg):
            n_done = done.attrs.n_tiles or 0
            up = done.attrs.upsample or 1.0
            return TileResult(sid, target, n_done, True, time.perf_counter() - t0, up)
        mask = detect_tissue(slide, mode=cfg.mode)
        coords = tile_coords(
            slide,
            mask,
            target_mpp=cfg.target_mpp,
            tile_px=cfg.tile_px,
            stride_px=cfg.stride_px,
            min_tissue=cfg.min_tissue,
            max_upsample=cfg.max_upsample,
        )
        if len(coords) == 0:
            raise NoTissueError(
                slide.path,
                f"tissue was found but no {cfg.tile_px}-px tile at {cfg.target_mpp} µm/px is"
                f" covered ≥ {cfg.min_tissue or MIN_TISSUE[cfg.mode]:.0%} by it.",
                "lower min_tissue= or tile_px=, or check the mask in the thumbnail.",
                param="min_tissue",
            )
        if on_total:
            on_total(len(coords))
        store = write_patches(
            slide,
            coords,
            out_dir,
            config=cfg,
            mask=mask,
            slide_id=sid,
            workers=workers,
            progress=progress,
        )
    written = Store.open(store).attrs
    n_written = len(coords) if written.n_tiles is None else written.n_tiles
    return TileResult(
        sid, store, n_written, False, time.perf_counter() - t0, written.upsample or 1.0
    )
