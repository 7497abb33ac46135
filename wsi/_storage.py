"""The one owner of a per-slide Zarr v3 store: :class:`Store` and its typed :class:`StoreAttrs`.

Every stage creates, opens and reads stores through :class:`Store`; the attrs dict on disk
(``attrs["oncotrace"]``) is read and written only here, through :meth:`StoreAttrs.from_dict` and
:meth:`StoreAttrs.to_dict`. Feature arrays ``features/<name>`` (N, D), embedded or imported, are
written by one writer (:meth:`Store.write_features`), so they share codecs and chunking.

Format versions (attrs key ``format``):

* **1** — the layout since the first release (tiled stores, then imported ones).
* absent — a store whose attrs lack the key (written by hand or by another tool with the same
  keys). It opens as version 1: the keys are the same; nothing is rewritten on disk.
* newer than :data:`STORE_FORMAT` — refused with a message to upgrade OncoTrace.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np
import zarr

from ._errors import ParameterError
from ._io import atomic_dir, atomic_write_text
from ._tiling import MAX_UPSAMPLE, check_max_upsample
from ._tissue import Mode

#: Version of the store layout and attrs written by this package.
STORE_FORMAT = 1
_ATTRS_KEY = "oncotrace"
_FORMAT_KEY = "format"
_FEATURES = "features"
#: Rows per feature chunk (embedded and imported alike); a chunk is written once, whole.
FEATURE_CHUNK_ROWS = 4096


class StoreError(ValueError):
    """A path is not a usable OncoTrace store; the message names it and the fix."""


#: File in a store listing every file committed with it and its size (see :meth:`Store.damage`).
MANIFEST = "oncotrace-manifest.json"


def _write_manifest(root: Path) -> None:
    """List every file under ``root`` but the group's own ``zarr.json`` (its attrs change) and
    ``features/`` (replaced by later embeds and imports, each array marked complete itself)."""
    rels = (p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file())
    files = {
        rel: (root / rel).stat().st_size
        for rel in rels
        if rel != "zarr.json" and not rel.startswith(f"{_FEATURES}/")
    }
    atomic_write_text(root / MANIFEST, json.dumps({"files": files}))


@contextmanager
def fast_codecs() -> Iterator[None]:
    """Use the zarrs (Rust) codec pipeline for arrays opened or created inside the block.

    zarr-python encodes each 1-tile inner chunk of a shard through asyncio tasks, which costs
    more than decoding the tile did; zarrs does the whole shard natively. Scoped, so importing
    OncoTrace never changes a user's own zarr configuration.
    """
    try:
        import zarrs  # noqa: F401
    except ImportError:  # pragma: no cover - zarrs is a dependency; keep working without it
        yield
        return
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        yield


@dataclass(frozen=True)
class TilingConfig:
    """Everything that decides which pixels end up in a store (written into its attrs).

    ``max_upsample`` bounds ``finest_mpp / target_mpp`` (≥ 1; 1 refuses any slide coarser than
    the target): see :func:`tile_geometry`. Configs and stores written before it existed read
    with the default, the bound a slide of theirs met.
    """

    target_mpp: float = 0.5
    tile_px: int = 224
    stride_px: int | None = None
    min_tissue: float | None = None  # None: by mode (0.25 tissue, 0.05 smear)
    mode: Mode = "tissue"
    min_focus: float | None = None
    focus: bool = False
    max_upsample: float = MAX_UPSAMPLE

    def __post_init__(self) -> None:
        # a float always, so that 1 and 1.0 give equal configs (and equal stores to skip)
        object.__setattr__(self, "max_upsample", check_max_upsample(self.max_upsample))
        # numbers are checked once, here, at the boundary: inf/nan/0 would otherwise fail per
        # slide deep in the tiler (OverflowError, NaN to int) or give empty "complete" stores
        _check_number("target_mpp", self.target_mpp, low=0.0, low_open=True, high=1000.0)
        _check_int("tile_px", self.tile_px, low=8, high=16384)
        if self.stride_px is not None:
            _check_int("stride_px", self.stride_px, low=1, high=16384)
        if self.min_tissue is not None:
            _check_number("min_tissue", self.min_tissue, low=0.0, high=1.0)
        if self.min_focus is not None:
            _check_number("min_focus", self.min_focus, low=0.0, high=math.inf)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into store attrs and model cards; inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | Path = "tiling") -> TilingConfig:
        """Read the JSON form; keys left out take the defaults.

        Raises
        ------
        ValueError
            Not a mapping, or an unknown key (the message names ``source``); a
            :class:`ParameterError` for an invalid ``max_upsample``.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: tiling {d!r} is not a mapping of TilingConfig fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown tiling key(s) {unknown}; TilingConfig has {sorted(known)}."
                " Fix: remove them, or read the file with the OncoTrace that wrote it."
            )
        return cls(**dict(d))


def _check_number(
    name: str, value: object, *, low: float, high: float, low_open: bool = False
) -> None:
    """``value`` is a finite real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    ok = False
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low:g}" + (
            "" if high == math.inf else f" and ≤ {high:g}"
        )
        raise ParameterError(
            f"{name}= must be a finite number {bound}, got {value!r}. Fix: pass such a value.",
            param=name,
        )


def _check_int(name: str, value: object, *, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ParameterError(
            f"{name}= must be a whole number from {low} to {high}, got {value!r}. Fix: pass such"
            " a value.",
            param=name,
        )


def _pair(v: Any) -> tuple[Any, Any] | None:
    """A JSON pair (or a bare number, as some hand-made stores hold) as a 2-tuple."""
    if v is None:
        return None
    if isinstance(v, int | float):
        return (v, v)
    seq = list(v)
    if len(seq) != 2:
        raise ValueError(f"expected a pair of numbers, got {v!r}")
    return (seq[0], seq[1])


def _list(v: tuple[Any, ...] | None) -> list[Any] | None:
    return None if v is None else list(v)


@dataclass(frozen=True)
class StoreAttrs:
    """What a store says about itself (``attrs["oncotrace"]``), typed.

    Attributes
    ----------
    format_version : layout version (on disk under ``format``); :data:`STORE_FORMAT` once read.
    complete : the store was committed (a store without it is not finished).
    package_version, created : who wrote it and when (ISO 8601, UTC).
    slide_id : the store's name.
    source_path : absolute path of the input (slide file, first DICOM instance, ``.h5``).
    source_fingerprint : :func:`source_fingerprint` of the input when it was written.
    backend : the reader (``cucim``, ``openslide``, …) or ``"import"``.
    level0_size : (width, height) of level 0 in px, when known.
    mpp : (x, y) level-0 µm/px; ``mpp_source`` says where it came from (``file``,
        ``override``, ``magnification``), ``mpp_detail`` how (tiled stores).
    mode : ``"tissue"`` or ``"smear"`` (None for imported stores).
    target_mpp, tile_px : µm/px and side in px of the tiles as the encoder sees them.
    tile_size_level0 : (tx, ty) tile side in level-0 px.
    n_tiles : N, rows of ``coords``.
    tiling : the :class:`TilingConfig` (tiled stores). The tiler's geometry keys
        (``mpp_detail``, ``stride_level0``, ``read_level``, ``read_size``, ``upsample``,
        ``edges``, ``tissue_qc``, ``mask_mpp``, ``slide_properties``) are written whenever it
        is set.
    stride_level0 : (sx, sy) step between tiles in level-0 px.
    read_level, read_size : pyramid level read and the region size read there, (w, h) px.
    upsample : ``finest µm/px / target_mpp`` the tiles were resampled up by, 1.0 when they were
        not (None: a store from before it was recorded, or imported).
    edges : how the partial tiles at the right and bottom edges were cut: ``"padded"`` (tiled,
        white beyond the slide). None: a store from before it was recorded, whose tiler left
        that strip untiled; ``tile_slide`` cuts such a store again.
    tissue_qc : mask QC numbers; ``mask_mpp`` µm/px of the mask grid.
    slide_properties : the allow-listed file properties (no PHI).
    source_sha256 : sha256 of the input (imported stores).
    has_patches : False when the store holds features but no ``patches`` (imported).
    tile_size_source : ``"file"`` or ``"override"`` (imported stores).
    import_info : what the import read (``{"format", "h5_attrs"}``; key ``import`` on disk).
    extra : keys this version does not know, kept so that a rewrite loses nothing.
    """

    format_version: int = STORE_FORMAT
    complete: bool = False
    package_version: str | None = None
    created: str | None = None
    slide_id: str | None = None
    source_path: str | None = None
    source_fingerprint: str | None = None
    backend: str | None = None
    level0_size: tuple[int, int] | None = None
    mpp: tuple[float, float] | None = None
    mpp_source: str | None = None
    mode: str | None = None
    target_mpp: float | None = None
    tile_px: int | None = None
    tile_size_level0: tuple[float, float] | None = None
    n_tiles: int | None = None
    tiling: TilingConfig | None = None
    mpp_detail: str | None = None
    stride_level0: tuple[float, float] | None = None
    read_level: int | None = None
    read_size: tuple[int, int] | None = None
    upsample: float | None = None
    edges: str | None = None
    tissue_qc: Mapping[str, Any] = field(default_factory=dict)
    mask_mpp: float | None = None
    slide_properties: Mapping[str, Any] = field(default_factory=dict)
    source_sha256: str | None = None
    has_patches: bool = True
    tile_size_source: str | None = None
    import_info: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    # keys written by every writer, in this order, null when unknown
    _CORE: ClassVar[tuple[str, ...]] = (
        "complete",
        "package_version",
        "created",
        "slide_id",
        "source_path",
        "source_fingerprint",
        "backend",
        "level0_size",
        "mpp",
        "mpp_source",
        "mode",
        "target_mpp",
        "tile_px",
        "tile_size_level0",
        "n_tiles",
    )
    _TILED: ClassVar[tuple[str, ...]] = (
        "mpp_detail",
        "tiling",
        "stride_level0",
        "read_level",
        "read_size",
        "upsample",
        "edges",
        "tissue_qc",
        "mask_mpp",
        "slide_properties",
    )
    _IMPORTED: ClassVar[tuple[str, ...]] = (
        "source_sha256",
        "has_patches",
        "tile_size_source",
        "import_info",
    )
    _PAIRS: ClassVar[tuple[str, ...]] = (
        "level0_size",
        "mpp",
        "tile_size_level0",
        "stride_level0",
        "read_size",
    )
    _DISK_NAME: ClassVar[dict[str, str]] = {"format_version": _FORMAT_KEY, "import_info": "import"}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written under ``attrs["oncotrace"]`` (the same keys as ever)."""
        names = [*self._CORE]
        if self.tiling is not None:
            names += self._TILED
        if self.import_info is not None:
            names += self._IMPORTED
        elif not self.has_patches:
            names.append("has_patches")
        out: dict[str, Any] = {_FORMAT_KEY: self.format_version}
        for name in names:
            value = getattr(self, name)
            if name in self._PAIRS:
                value = _list(value)
            elif name == "tiling":
                value = value.to_dict()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[self._DISK_NAME.get(name, name)] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreAttrs:
        """Read the JSON form, migrating older formats in memory.

        Raises
        ------
        ValueError
            A format newer than this package reads, or a value of the wrong shape (the
            message names the key).
        """
        version = d.get(_FORMAT_KEY)
        if version is None:
            version = 1  # before the key: the same keys as format 1
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"attrs key 'format' is {version!r}, not a positive integer")
        if version > STORE_FORMAT:
            raise ValueError(
                f"store format {version} is newer than this OncoTrace ({_version()}) reads"
                f" (up to {STORE_FORMAT}). Fix: upgrade OncoTrace (`pip install -U oncotrace`)"
            )
        disk_to_field = {v: k for k, v in cls._DISK_NAME.items()}
        known = {f.name for f in fields(cls)} - {"extra", "format_version"}
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key == _FORMAT_KEY:
                continue
            name = disk_to_field.get(key, key)
            if name not in known or name.startswith("_"):
                extra[key] = value
                continue
            try:
                if name in cls._PAIRS:
                    value = _pair(value)
                elif name == "tiling" and value is not None:
                    value = TilingConfig.from_dict(value, source="attrs")
                elif name in ("tissue_qc", "slide_properties"):
                    value = dict(value or {})
                elif name == "import_info" and value is not None:
                    value = dict(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"attrs key {key!r} = {value!r} cannot be read ({exc})") from exc
            kw[name] = value
        return cls(format_version=STORE_FORMAT, extra=extra, **kw)

    def replace(self, **changes: Any) -> StoreAttrs:
        """A copy with ``changes`` applied (field names as in this class)."""
        return replace(self, **changes)


def _version() -> str:
    from oncotrace import __version__

    return __version__


@dataclass(frozen=True)
class FeatureAttrs:
    """What ``features/<name>`` says about itself (the array's attrs), typed.

    Attributes
    ----------
    complete : written in full and committed.
    encoder : the encoder config (``EncoderConfig.to_dict()``; at least ``name``).
    weights_fingerprint : identity of the weights (None for imported features).
    dim : D. n_tiles : N. dtype : on-disk dtype. seconds : time it took.
    imported : provenance of imported features (format, source path, fingerprint, sha256,
        source dtype), or None for embedded ones.
    extra : keys this version does not know.
    """

    encoder: Mapping[str, Any] = field(default_factory=dict)
    dim: int | None = None
    n_tiles: int | None = None
    dtype: str = "float32"
    weights_fingerprint: str | None = None
    complete: bool = False
    seconds: float | None = None
    imported: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def encoder_name(self) -> str | None:
        name = self.encoder.get("name") if isinstance(self.encoder, Mapping) else self.encoder
        return None if name is None else str(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "complete": self.complete,
            "encoder": dict(self.encoder),
            "weights_fingerprint": self.weights_fingerprint,
            "dim": self.dim,
            "n_tiles": self.n_tiles,
            "dtype": self.dtype,
            "seconds": self.seconds,
        }
        if self.imported is not None:
            out["imported"] = dict(self.imported)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureAttrs:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        if "encoder" in kw and not isinstance(kw["encoder"], Mapping):
            kw["encoder"] = {"name": kw["encoder"]}  # some tools store the bare name
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})


class FeatureWriter:
    """Fills ``features/<name>`` row block by row block; see :meth:`Store.write_features`.

    Rows are buffered until a whole chunk is full, so each chunk is encoded and written once.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        n: int,
        dim: int,
        dtype: str,
        chunk_rows: int,
        attrs: FeatureAttrs,
        started: float | None = None,
    ) -> None:
        self._store, self.name, self.n, self.dim, self.dtype = store, name, n, dim, dtype
        self._attrs = attrs
        self._chunk = max(1, min(n, chunk_rows))
        self._tmp = f".{name}.partial-{os.getpid()}"
        self._array: zarr.Array | None = None
        self._buffer = np.empty((self._chunk, dim), dtype)
        self._flushed = 0
        self.n_written = 0
        self._t0 = time.perf_counter() if started is None else started

    def __enter__(self) -> FeatureWriter:
        root = self._store._local_root() / _FEATURES
        shutil.rmtree(root / self._tmp, ignore_errors=True)
        with fast_codecs():
            group = self._store.group.require_group(_FEATURES)
            self._array = group.create_array(
                self._tmp,
                shape=(self.n, self.dim),
                dtype=self.dtype,
                chunks=(self._chunk, self.dim),
                # Uncompressed: zstd saves ~8 % on float32 features but its decode cost halved
                # training throughput from Zarr in bench/train.py (0.47 vs 0.93 of in-memory).
                compressors=None,
                dimension_names=("tile", "feature"),
            )
        return self

    def append(self, rows: np.ndarray) -> None:
        """Add the next ``(k, D)`` rows (row ``n_written`` onwards)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"{self._store.path}: features/{self.name} rows have shape {rows.shape};"
                f" expected (k, {self.dim})."
            )
        if self.n_written + len(rows) > self.n:
            raise ValueError(
                f"{self._store.path}: features/{self.name} holds {self.n} rows; got"
                f" {self.n_written + len(rows)}."
            )
        assert self._array is not None, "use FeatureWriter in a with block"
        start, stop = self.n_written, self.n_written + len(rows)
        while start < stop:
            take = min(stop - start, self._flushed + self._chunk - start)
            at = start - self._flushed
            self._buffer[at : at + take] = rows[:take].astype(self.dtype, copy=False)
            rows = rows[take:]
            start += take
            if start - self._flushed == self._chunk or start == self.n:
                self._array[self._flushed : start] = self._buffer[: start - self._flushed]
                self._flushed = start
        self.n_written = stop

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        root = self._store._local_root() / _FEATURES
        if exc_type is None and self.n_written != self.n:
            shutil.rmtree(root / self._tmp, ignore_errors=True)
            raise ValueError(
                f"{self._store.path}: features/{self.name} got {self.n_written} of {self.n}"
                " rows; nothing was committed."
            )
        if exc_type is not None:
            shutil.rmtree(root / self._tmp, ignore_errors=True)
            return
        assert self._array is not None
        attrs = replace(
            self._attrs,
            complete=True,
            dim=self.dim,
            n_tiles=self.n,
            dtype=self.dtype,
            seconds=self._attrs.seconds
            if self._attrs.seconds is not None
            else round(time.perf_counter() - self._t0, 3),
        )
        self._array.attrs.update(attrs.to_dict())
        if (root / self.name).exists():
            shutil.rmtree(root / self.name)
        os.replace(root / self._tmp, root / self.name)


class Store:
    """A per-slide (later per-case) Zarr v3 store: ``coords``, ``patches``, ``features/<name>``.

    Open one with :meth:`open` (or :meth:`find`, which returns None for anything unfinished);
    write a new one with :meth:`create`. See the module docstring for the format versions.

    Attributes
    ----------
    path : the store folder (``<slide_id>.zarr``).
    attrs : :class:`StoreAttrs`.
    format_on_disk : the ``format`` key as found (None: absent, migrated in memory).
    """

    def __init__(
        self,
        path: Path,
        attrs: StoreAttrs,
        *,
        mode: Literal["r", "r+"] = "r",
        format_on_disk: int | None = STORE_FORMAT,
    ) -> None:
        self.path = path
        self.attrs = attrs
        self.format_on_disk = format_on_disk
        self._mode: Literal["r", "r+"] = mode
        self._group: zarr.Group | None = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, slide_id={self.attrs.slide_id!r})"

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        mode: Literal["r", "r+"] = "r",
        require_complete: bool = True,
    ) -> Store:
        """Open an existing store.

        Parameters
        ----------
        path : the ``<slide_id>.zarr`` folder.
        mode : ``"r"``, or ``"r+"`` to add features or update attrs.
        require_complete : refuse a store without the completion mark (interrupted, or not
            written by OncoTrace). With False, missing attrs read as ``StoreAttrs()``.

        Raises
        ------
        StoreError
            Not a Zarr group; unfinished (with ``require_complete``); attrs of a newer format
            or unreadable. The message names the store and the fix.
        """
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise StoreError(
                f"{p}: not a Zarr store. Fix: tile (`oncotrace tile`) or import"
                " (`oncotrace import-features`) the slide, or check the path."
            )
        try:
            group = zarr.open_group(p, mode="r")
        except (OSError, ValueError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                f"{p}: not a readable Zarr v3 group ({exc}). Fix: tile it again."
            ) from exc
        raw = dict(group.attrs).get(_ATTRS_KEY)
        if not isinstance(raw, Mapping):
            raw = None
        if require_complete and (raw is None or not raw.get("complete")):
            raise StoreError(
                f"{p}: not a finished OncoTrace store (no completion mark; an interrupted"
                " write leaves none). Fix: run `oncotrace tile` (or `import-features`) again."
            )
        try:
            attrs = StoreAttrs() if raw is None else StoreAttrs.from_dict(raw)
        except ValueError as exc:
            raise StoreError(
                f"{p}: {exc}. Fix: re-tile the slide with this version, or upgrade OncoTrace."
            ) from exc
        found = None if raw is None else raw.get(_FORMAT_KEY)
        on_disk = found if isinstance(found, int) else None
        return cls(p, attrs, mode=mode, format_on_disk=on_disk)

    @classmethod
    def find(cls, path: str | Path, *, mode: Literal["r", "r+"] = "r") -> Store | None:
        """The finished store at ``path``, or None if there is none (missing, unfinished).

        Raises
        ------
        StoreError
            A finished store whose attrs this version cannot read (e.g. a newer format).
        """
        p = Path(path)
        if not (p / "zarr.json").is_file():
            return None
        try:
            group = zarr.open_group(p, mode="r")
        except (OSError, ValueError, zarr.errors.GroupNotFoundError):
            return None
        raw = dict(group.attrs).get(_ATTRS_KEY)
        if not isinstance(raw, Mapping) or not raw.get("complete"):
            return None
        return cls.open(p, mode=mode)

    @classmethod
    @contextmanager
    def create(cls, path: str | Path) -> Iterator[Store]:
        """Write a new store atomically (a temporary sibling, renamed to ``path`` at the end).

        Yields
        ------
        Store
            A writable store at the temporary path (an empty group). Fill it, then call
            :meth:`write_attrs` with ``complete=True`` attrs; when the block ends the folder is
            renamed over ``path`` (an existing store is replaced only then) and the handle's
            ``path`` follows. If the block raises, or never wrote complete attrs, nothing is
            left behind and ``path`` is as it was.
        """
        final = Path(path)
        with atomic_dir(final) as tmp:
            zarr.open_group(tmp, mode="w", zarr_format=3)
            store = cls(tmp, StoreAttrs(), mode="r+")
            yield store
            if not store.attrs.complete:
                raise StoreError(
                    f"{final}: the writer finished without complete attrs, so the store was not"
                    " committed. Fix: call Store.write_attrs(StoreAttrs(..., complete=True))."
                )
            store._group = None  # the group object names the temporary path
            _write_manifest(tmp)
        store.path = final

    def damage(self) -> str | None:
        """What is missing or cut short in the store, against the manifest written at commit.

        Every file the writer committed (shards, chunks, array metadata) is listed with its size
        in ``oncotrace-manifest.json``; Zarr reads a missing shard as zeros without complaint,
        so a store that lost one (a partial copy, a sync tool, a full disk during a move) would
        otherwise look complete. None when nothing is missing. A store written before manifests
        is checked for one ``patches`` shard per 64 tiles. Arrays added later (``features/<name>``) carry
        their own completion mark.
        """
        try:
            listed = json.loads((self.path / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            return self._missing_patch_shards()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"its manifest {MANIFEST} cannot be read ({exc})"
        for rel, size in listed.items():
            f = self.path / rel
            if not f.is_file():
                return f"{rel} is missing ({len(listed)} files were committed)"
            if f.stat().st_size != size:
                return f"{rel} holds {f.stat().st_size} bytes, {size} were committed"
        return None

    def _missing_patch_shards(self) -> str | None:
        """For a store written before manifests: whether ``patches`` has a shard file for each
        block of 64 tiles (the tiler writes every one; none of its tiles is all zeros)."""
        meta = self.path / "patches" / "zarr.json"
        if not meta.is_file():
            return None
        try:
            doc = json.loads(meta.read_text())
            n = int(doc["shape"][0])
            per = int(doc["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # not the tiler's layout: nothing known to check against
        expected = -(-n // per) if per > 0 else 0
        rest = ("0",) * (len(doc["shape"]) - 1)  # one shard across the other axes
        shard = self.path.joinpath("patches", "c")
        found = sum(1 for i in range(expected) if shard.joinpath(str(i), *rest).is_file())
        if found < expected:
            return f"patches has {found} of its {expected} shard files (no manifest to list them)"
        return None

    def check_intact(self) -> None:
        """Raise :class:`StoreError` naming the store, what is damaged and the fix, if it is."""
        problem = self.damage()
        if problem is not None:
            raise StoreError(
                f"{self.path}: the store is damaged: {problem}; reading it would give blank"
                " tiles. Fix: rerun `oncotrace tile` on the slide (a damaged store is cut"
                " again), or `oncotrace import-features` for imported ones."
            )

    # -- the group --------------------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        """The zarr group (for the store's own writers; readers use the methods below)."""
        if self._group is None:
            self._group = zarr.open_group(self.path, mode=self._mode)
        return self._group

    def _local_root(self) -> Path:
        return self.path

    def write_attrs(self, attrs: StoreAttrs) -> None:
        """Replace the store's attrs (written at once, as one JSON value)."""
        self.group.attrs[_ATTRS_KEY] = attrs.to_dict()
        self.attrs = attrs

    def update_attrs(self, **changes: Any) -> StoreAttrs:
        """Change some attrs fields (names as in :class:`StoreAttrs`) and write them."""
        self.write_attrs(self.attrs.replace(**changes))
        return self.attrs

    # -- arrays -----------------------------------------------------------------------------
    def _array(self, name: str, fix: str) -> zarr.Array:
        try:
            arr = self.group[name]
        except KeyError:
            arr = None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self.path}: no {name!r} array. Fix: {fix}")
        return arr

    def coords(self) -> np.ndarray:
        """``(N, 2) int64`` level-0 ``(x, y)`` top-left corners, row-aligned with the features."""
        return np.asarray(self._array("coords", "tile the slide again.")[...], np.int64)

    def write_coords(self, coords: np.ndarray) -> None:
        """Write ``coords`` (N, 2) int64 as one chunk."""
        xy = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
        self.group.create_array(
            "coords", data=xy, chunks=(max(1, len(xy)), 2), dimension_names=("tile", "xy")
        )

    def patches(self) -> zarr.Array:
        """The ``(N, H, W, 3) uint8`` patch array, opened through the fast codec pipeline.

        Raises
        ------
        StoreError
            The store holds no patches (its features were imported).
        """
        if not self.attrs.has_patches:
            raise StoreError(
                f"{self.path}: its features were imported (`oncotrace import-features`); it"
                " holds no patches to embed. Fix: train on the imported features by name, or"
                " tile the slide with `oncotrace tile` to embed it with another encoder."
            )
        self.check_intact()
        with fast_codecs():  # zarrs reads the patch shards ~4x cheaper than zarr-python
            return zarr.open_array(self.path / "patches", mode="r")

    def thumbnail(self) -> tuple[np.ndarray, float]:
        """``(thumbnail (h, w, 3) uint8, its downsample from level 0)``."""
        arr = self._array("thumbnail", "tile the slide again (imported stores have none).")
        return np.asarray(arr[...]), float(arr.attrs["downsample"])  # type: ignore[arg-type]

    # -- features ---------------------------------------------------------------------------
    def feature_names(self) -> list[str]:
        """Names of the committed ``features/<name>`` arrays, sorted."""
        feats = self.group.get(_FEATURES)
        if not isinstance(feats, zarr.Group):
            return []
        return sorted(
            k for k, v in feats.members() if isinstance(v, zarr.Array) and not k.startswith(".")
        )

    def features_array(self, name: str) -> zarr.Array:
        """``features/<name>`` (N, D), opened through the fast codec pipeline; no data read.

        Raises
        ------
        StoreError
            No such array, or it is not 2-D; the message lists the features present.
        """
        where = f"{_FEATURES}/{name}"
        with fast_codecs():
            try:
                arr = self.group[where]
            except KeyError:
                arr = None
        if not isinstance(arr, zarr.Array):
            have = self.feature_names()
            raise StoreError(
                f"{self.path}: no {where} array (features present: {have or 'none'}). Fix: run"
                f" `oncotrace embed {self.path} --encoder {name}` or import them with"
                f" `oncotrace import-features ... --name {name}`."
            )
        if arr.ndim != 2:
            raise StoreError(
                f"{self.path}: {where} has shape {arr.shape}; expected (N, D). Fix: re-embed or"
                " re-import the features."
            )
        return arr

    def feature_attrs(self, name: str) -> FeatureAttrs | None:
        """The attrs of ``features/<name>``, or None if the store has no such array."""
        feats = self.group.get(_FEATURES)
        arr = feats.get(name) if isinstance(feats, zarr.Group) else None
        return FeatureAttrs.from_dict(dict(arr.attrs)) if isinstance(arr, zarr.Array) else None

    def read_features(self, name: str) -> np.ndarray:
        """``features/<name>`` as an ``(N, D) float32`` ndarray."""
        return np.asarray(self.features_array(name)[...], np.float32)

    def write_features(
        self,
        name: str,
        n_rows: int,
        dim: int,
        *,
        attrs: FeatureAttrs,
        dtype: str = "float32",
        chunk_rows: int = FEATURE_CHUNK_ROWS,
        started: float | None = None,
    ) -> FeatureWriter:
        """A writer for ``features/<name>`` (n_rows, dim), committed when its block ends.

        Use it as ``with store.write_features(...) as w: w.append(rows)``. It fills a temporary
        array ``features/.<name>.partial-<pid>`` and renames it over ``features/<name>`` once
        every row is written; if the block raises, the temporary array is removed and an
        existing ``features/<name>`` stays as it was. Every feature array, embedded or
        imported, is written here: chunks of ``(min(N, chunk_rows), D)`` rows, uncompressed.

        Parameters
        ----------
        name : the encoder name.
        n_rows, dim : N (must equal the store's tile count) and D.
        attrs : encoder config, weights fingerprint, import provenance; ``complete``, ``dim``,
            ``n_tiles``, ``dtype`` and ``seconds`` (if None) are filled in at commit.
        dtype : on-disk dtype (``"float32"`` or ``"float16"``).
        chunk_rows : rows per chunk.
        started : ``time.perf_counter()`` when the work began (for ``seconds``); default now.
        """
        if self._mode != "r+":
            raise StoreError(
                f"{self.path}: opened read-only. Fix: Store.open(path, mode='r+') to write."
            )
        return FeatureWriter(self, name, n_rows, dim, dtype, chunk_rows, attrs, started)
