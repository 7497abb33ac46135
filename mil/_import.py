"""Import patch features computed by other pipelines (CLAM, TRIDENT ``.h5``) into tile stores.

Both tools write one HDF5 file per slide with a ``features`` (N, D) dataset and a ``coords``
(N, 2) dataset of level-0 ``(x, y)`` top-left corners, row-aligned:

* **TRIDENT** puts the patching geometry on ``coords``: ``patch_size`` (at the target
  magnification), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``name``.
* **CLAM** (``create_patches_fp.py``) puts ``patch_size`` (at ``patch_level``), ``patch_level``,
  ``downsample`` (of that level, ``(dx, dy)``), ``level_dim``, ``downsampled_level_dim`` and
  ``name`` on ``coords`` of its *patch* files; its feature files (``extract_features_fp.py``)
  usually carry no attrs at all, so their geometry must be given (``tile_px``, ``mpp``).

Each file becomes (or joins) ``<out>/<slide_id>.zarr``: ``coords`` and ``features/<name>``
with attrs like :func:`mil.embed` writes, marked as imported with the source file's path,
size+mtime fingerprint and sha256. No patches are written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from oncotrace import __version__
from oncotrace.wsi import (
    STORE_FORMAT,
    FeatureAttrs,
    Store,
    StoreAttrs,
    remove_stale_partials,
    source_fingerprint,
    store_path,
)

from ._embed import FEATURE_CHUNK

H5Format = Literal["trident", "clam", "plain"]
Action = Literal["created", "added", "replaced", "skipped"]

#: How many level-0 px a tile may differ between the file and ``tile_px`` (rounding).
_TILE_TOLERANCE_PX = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class FeatureImportError(ValueError):
    """A feature file cannot be imported as it is; the message names the file and the fix.

    ``param`` is the parameter of :func:`import_features` to change, when one is at fault.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_import_error, (str(self), self.param))


def _rebuild_import_error(message: str, param: str | None) -> FeatureImportError:
    return FeatureImportError(message, param=param)


@dataclass(frozen=True)
class H5Features:
    """The validated content of one feature ``.h5`` file.

    Attributes
    ----------
    path : the file.
    format : ``"trident"``, ``"clam"`` or ``"plain"`` (no geometry attrs).
    features : (N, D) float32 ndarray, all finite.
    coords : (N, 2) int64 ndarray, level-0 ``(x, y)`` top-left corners.
    tile_size_level0 : (tx, ty) tile side in level-0 px.
    tile_size_source : ``"file"`` or ``"override"`` (``tile_px`` given).
    mpp : level-0 µm/px.
    mpp_source : ``"override"`` (given) or ``"magnification"`` (10 / level-0 objective power,
        the usual 20x = 0.5 µm/px convention; approximate).
    tile_px : tile side in px at the resolution the encoder saw, when the file says.
    target_mpp : µm/px of that resolution, when known.
    level0_size : (width, height) of level 0, when the file says.
    source_dtype : dtype of the features in the file.
    attrs : JSON-safe copy of the file's geometry attrs.
    """

    path: Path
    format: H5Format
    features: np.ndarray
    coords: np.ndarray
    tile_size_level0: tuple[int, int]
    tile_size_source: str
    mpp: float
    mpp_source: str
    tile_px: int | None
    target_mpp: float | None
    level0_size: list[int] | None
    source_dtype: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportResult:
    """Outcome of :func:`import_features` for one file."""

    slide_id: str
    store: Path
    n_tiles: int
    dim: int
    format: str
    action: Action
    seconds: float

    @property
    def skipped(self) -> bool:
        return self.action == "skipped"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def _number(v: Any) -> float | None:
    try:
        x = float(np.asarray(v, dtype=np.float64).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return x if np.isfinite(x) else None


def _pair(v: Any) -> tuple[float, float] | None:
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if a.size == 1:
        a = np.repeat(a, 2)
    if a.size < 2 or not np.isfinite(a[:2]).all() or (a[:2] <= 0).any():
        return None
    return float(a[0]), float(a[1])


#: Geometry attrs that are sizes, magnifications or downsamples: positive wherever they appear.
_POSITIVE_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "downsample",
    "custom_downsample",
    "level_dim",
    "downsampled_level_dim",
    "level0_width",
    "level0_height",
)


def _check_geometry_attrs(attrs: dict[str, Any], path: Path) -> None:
    """Refuse a geometry attr that is present but not a positive number (``patch_level``: a
    level >= 0): it would give a negative or zero tile, or be mistaken for a missing one."""
    fix = (
        "Fix: re-export the file with the tool that cut the tiles, or correct the attr"
        " (h5py: f['coords'].attrs[...] = value)."
    )
    for key in (*_POSITIVE_ATTRS, "patch_level"):
        if key not in attrs:
            continue
        try:
            values = np.asarray(attrs[key], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            values = np.array([np.nan])
        if key == "patch_level":
            ok = values.size == 1 and np.isfinite(values).all() and values[0] >= 0
            ok = ok and float(values[0]).is_integer()
            want = "a pyramid level (an integer >= 0)"
        else:
            ok = values.size > 0 and bool(np.isfinite(values).all() and (values > 0).all())
            want = "a positive number"
        if not ok:
            raise FeatureImportError(
                f"{path}: attr {key!r} is {_shown(attrs[key])}, not {want}. {fix}"
            )


def _shown(v: Any) -> str:
    """An attr value as written, NaN included (for a message)."""
    if isinstance(v, np.ndarray | np.generic):
        v = v.tolist()
    return repr(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)


def _check_coords(coords: np.ndarray, path: Path) -> None:
    """Refuse level-0 corners that cannot be tile positions: negative, or all the same."""
    neg = np.flatnonzero((coords < 0).any(axis=1))
    if neg.size:
        raise FeatureImportError(
            f"{path}: 'coords' has negative level-0 (x, y) in {neg.size} row(s) (e.g. row"
            f" {int(neg[0])}: {coords[neg[0]].tolist()}); tile corners lie on the slide, at"
            " x, y >= 0. Fix: export level-0 top-left corners (not centres relative to"
            " something, not another level's pixels)."
        )
    if len(coords) > 1 and (coords == coords[0]).all():
        raise FeatureImportError(
            f"{path}: 'coords' holds the same (x, y) {coords[0].tolist()} in all"
            f" {len(coords)} rows, so the tiles have no positions. Fix: export the tiles'"
            " level-0 coordinates with the features (a placeholder array was saved)."
        )


def _geometry_from_attrs(
    attrs: dict[str, Any],
) -> tuple[H5Format, tuple[int, int] | None, int | None, float | None, float | None, Any]:
    """``(format, tile_size_level0, tile_px, level-0 magnification, downsample x, level0 size)``."""
    if "patch_size_level0" in attrs or "target_magnification" in attrs:
        ps0 = _number(attrs.get("patch_size_level0"))
        ps = _number(attrs.get("patch_size"))
        mag0 = _number(attrs.get("level0_magnification"))
        tmag = _number(attrs.get("target_magnification"))
        if ps0 is None and ps and mag0 and tmag and mag0 > 0 and tmag > 0:
            ps0 = ps * mag0 / tmag
        size = None
        if "level0_width" in attrs and "level0_height" in attrs:
            size = [attrs["level0_width"], attrs["level0_height"]]
        ts = (round(ps0), round(ps0)) if ps0 and ps0 > 0 else None
        ds = (ps0 / ps) if ps0 and ps else None
        return "trident", ts, int(ps) if ps else None, mag0 if mag0 and mag0 > 0 else None, ds, size
    if "patch_level" in attrs and "patch_size" in attrs:
        size_at_level = _number(attrs.get("patch_size"))
        level = _number(attrs.get("patch_level"))
        dxy = _pair(attrs["downsample"]) if "downsample" in attrs else None
        if dxy is None and level == 0:
            dxy = (1.0, 1.0)
        tiles = (
            (round(size_at_level * dxy[0]), round(size_at_level * dxy[1]))
            if size_at_level and dxy
            else None
        )
        dims = attrs.get("level_dim") if level == 0 else None
        return (
            "clam",
            tiles,
            int(size_at_level) if size_at_level else None,
            None,
            dxy[0] if dxy else None,
            dims,
        )
    return "plain", None, None, None, None, None


def read_h5_features(
    path: str | Path, *, tile_px: int | None = None, mpp: float | None = None
) -> H5Features:
    """Read and validate a CLAM- or TRIDENT-style feature file.

    Parameters
    ----------
    path : the ``.h5`` file (``features`` (N, D) and ``coords`` (N, 2) datasets).
    tile_px : tile side in **level-0** pixels, for files that do not record it; must agree
        (±1 px) with the file when it does.
    mpp : level-0 µm/px; overrides the value derived from TRIDENT's level-0 magnification and
        is required for files without one (CLAM).

    Returns
    -------
    H5Features

    Raises
    ------
    FeatureImportError
        Unreadable file, missing or misshapen datasets, length mismatch, NaN/inf features,
        non-integral coordinates, or geometry neither in the file nor given.
    """
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureImportError(
            f"{path}: not a readable HDF5 file ({exc}). Fix: pass the .h5 feature files written"
            " by CLAM (h5_files/) or TRIDENT (features_<encoder>/)."
        ) from exc
    with fh:
        names = sorted(fh.keys())
        missing = [k for k in ("features", "coords") if not isinstance(fh.get(k), h5py.Dataset)]
        if missing:
            hint = (
                " It looks like a patch-coordinates file (CLAM patches/, TRIDENT *_patches.h5);"
                " pass the features file of the same slide instead."
                if missing == ["features"]
                else ""
            )
            raise FeatureImportError(
                f"{path}: no {' and no '.join(repr(m) for m in missing)} dataset (datasets in"
                f" the file: {names or 'none'}).{hint} Fix: import .h5 files with 'features'"
                " (N, D) and 'coords' (N, 2) datasets."
            )
        fds, cds = fh["features"], fh["coords"]
        if fds.ndim != 2:
            raise FeatureImportError(
                f"{path}: 'features' has shape {fds.shape}; expected (N, D), one row per tile."
                " Fix: save one 2-D array per slide (squeeze a leading batch axis of 1, or"
                " flatten per-tile token grids with the tool that wrote them)."
            )
        if cds.ndim != 2 or cds.shape[1] != 2:
            raise FeatureImportError(
                f"{path}: 'coords' has shape {cds.shape}; expected (N, 2) level-0 (x, y)."
                " Fix: export the tile coordinates with the features."
            )
        if fds.shape[0] != cds.shape[0]:
            raise FeatureImportError(
                f"{path}: {fds.shape[0]} feature rows but {cds.shape[0]} coordinates; they must"
                " be row-aligned. Fix: re-export the file (an interrupted extraction appends"
                " only part of the rows)."
            )
        if fds.shape[0] == 0:
            raise FeatureImportError(f"{path}: no tiles (0 rows). Fix: leave the slide out.")
        if fds.dtype.kind not in "fiu":
            raise FeatureImportError(
                f"{path}: 'features' has dtype {fds.dtype}; expected floating point numbers."
            )
        if cds.dtype.kind not in "fiu":
            raise FeatureImportError(f"{path}: 'coords' has dtype {cds.dtype}; expected integers.")
        attrs = {**dict(fh.attrs), **dict(fds.attrs), **dict(cds.attrs)}
        source_dtype = str(fds.dtype)
        with np.errstate(over="ignore"):
            feats = np.asarray(fds[...], dtype=np.float32)
        raw_coords = np.asarray(cds[...])

    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FeatureImportError(
            f"{path}: NaN/inf in the features of {rows.size} of {len(feats)} tile(s) (e.g. rows"
            f" {rows[:5].tolist()}; values beyond float32 range count as inf). Fix: re-extract"
            " them (fp16/bf16 overflow is the usual cause: try fp32)."
        )
    coords = np.rint(raw_coords).astype(np.int64)
    if raw_coords.dtype.kind == "f" and not np.array_equal(coords, raw_coords):
        raise FeatureImportError(
            f"{path}: 'coords' are not whole level-0 pixels (e.g. {raw_coords[0].tolist()})."
            " Fix: export integer level-0 (x, y) top-left corners."
        )

    _check_coords(coords, path)
    _check_geometry_attrs(attrs, path)
    fmt, ts, ps, mag0, ds_x, size = _geometry_from_attrs(attrs)
    ts_source = "file"
    if tile_px is not None:
        if tile_px <= 0:
            raise FeatureImportError(f"tile_px={tile_px} must be positive.", param="tile_px")
        if ts is not None and max(abs(ts[0] - tile_px), abs(ts[1] - tile_px)) > _TILE_TOLERANCE_PX:
            raise FeatureImportError(
                f"{path}: the file's attrs give tiles of {ts[0]}x{ts[1]} level-0 px but"
                f" tile_px={tile_px}. Fix: drop tile_px= (the file knows), or check that"
                " you passed the level-0 size (patch size x level downsample).",
                param="tile_px",
            )
        if ts is None:
            ts, ts_source = (tile_px, tile_px), "override"
    mpp_source = "override"
    if mpp is not None:
        if not 0.01 <= mpp <= 100:
            raise FeatureImportError(f"mpp={mpp} is not a level-0 µm/px in 0.01..100.", param="mpp")
        level0_mpp: float | None = float(mpp)
    elif mag0:
        level0_mpp, mpp_source = 10.0 / mag0, "magnification"
    else:
        level0_mpp = None
    need = []
    if ts is None:
        need.append("tile_px= (tile side in level-0 pixels)")
    if level0_mpp is None:
        need.append("mpp= (level-0 µm/px)")
    if need or ts is None or level0_mpp is None:
        what = {
            "plain": "no geometry attrs (a CLAM features file keeps none)",
            "clam": "CLAM attrs without a usable patch_size/downsample or mpp",
            "trident": "TRIDENT attrs without patch_size_level0 or level0_magnification",
        }[fmt]
        raise FeatureImportError(
            f"{path}: the tile geometry is not in the file ({what}). Fix: pass"
            f" {' and '.join(need)}, as used when the tiles were cut.",
            param="tile_px" if ts is None else "mpp",
        )
    target_mpp = level0_mpp * ds_x if ds_x else None
    geometry_keys = (
        "patch_size",
        "patch_size_level0",
        "patch_level",
        "downsample",
        "custom_downsample",
        "level_dim",
        "downsampled_level_dim",
        "level0_magnification",
        "target_magnification",
        "overlap",
        "name",
        "level0_width",
        "level0_height",
    )
    return H5Features(
        path=path,
        format=fmt,
        features=feats,
        coords=coords,
        tile_size_level0=(int(ts[0]), int(ts[1])),
        tile_size_source=ts_source,
        mpp=level0_mpp,
        mpp_source=mpp_source,
        tile_px=ps,
        target_mpp=target_mpp,
        level0_size=[int(x) for x in np.asarray(size).reshape(-1)[:2]]
        if size is not None
        else None,
        source_dtype=source_dtype,
        attrs={k: _jsonable(attrs[k]) for k in geometry_keys if k in attrs},
    )


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _encoder_attrs(name: str, dim: int, path: Path) -> dict[str, Any]:
    from ._encoders import ENCODERS, encoder_config

    if name not in ENCODERS:
        return {"name": name, "dim": dim, "registered": False}
    cfg = encoder_config(name)
    if cfg.dim != dim:
        raise FeatureImportError(
            f"{path}: features have dim {dim} but the registered encoder {name!r} has dim"
            f" {cfg.dim}. Fix: pass as name= the encoder that made them (mil.list_encoders()),"
            " or a name that is not registered.",
            param="name",
        )
    return cfg.to_dict()


def _feature_attrs(h5: H5Features, name: str, fp: str, sha: str) -> FeatureAttrs:
    return FeatureAttrs(
        encoder=_encoder_attrs(name, h5.features.shape[1], h5.path),
        weights_fingerprint=None,
        imported={
            "format": h5.format,
            "source_path": str(h5.path.resolve()),
            "source_fingerprint": fp,
            "source_sha256": sha,
            "source_dtype": h5.source_dtype,
        },
    )


def _store_attrs(h5: H5Features, sid: str, fp: str, sha: str) -> StoreAttrs:
    tx, ty = h5.tile_size_level0
    return StoreAttrs(
        format_version=STORE_FORMAT,
        complete=True,
        package_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        slide_id=sid,
        source_path=str(h5.path.resolve()),
        source_fingerprint=fp,
        source_sha256=sha,
        backend="import",
        has_patches=False,
        level0_size=None if h5.level0_size is None else (h5.level0_size[0], h5.level0_size[1]),
        mpp=(h5.mpp, h5.mpp),
        mpp_source=h5.mpp_source,
        mode=None,
        target_mpp=h5.target_mpp,
        tile_px=h5.tile_px,
        tile_size_level0=(tx, ty),
        tile_size_source=h5.tile_size_source,
        n_tiles=len(h5.coords),
        import_info={"format": h5.format, "h5_attrs": h5.attrs},
    )


def _write_features(
    store: Store, name: str, h5: H5Features, attrs: FeatureAttrs, t0: float
) -> None:
    """``features/<name>`` through the store's one feature writer (as :func:`mil.embed`)."""
    n, dim = h5.features.shape
    with store.write_features(
        name, n, dim, attrs=attrs, chunk_rows=FEATURE_CHUNK, started=t0
    ) as out:
        out.append(h5.features)


def _write_store(
    h5: H5Features, out_dir: Path, sid: str, name: str, fp: str, sha: str, t0: float
) -> Path:
    """A new store under a temporary name, renamed over ``<sid>.zarr`` when complete."""
    final = store_path(out_dir, sid)
    with Store.create(final) as store:
        store.write_coords(h5.coords)
        _write_features(store, name, h5, _feature_attrs(h5, name, fp, sha), t0)
        store.write_attrs(_store_attrs(h5, sid, fp, sha))
    return final


def _add_features(h5: H5Features, store: Store, name: str, fp: str, sha: str, t0: float) -> None:
    """Write ``features/<name>`` into an existing store whose coords equal the file's."""
    _write_features(store, name, h5, _feature_attrs(h5, name, fp, sha), t0)


def _source_of(attrs: FeatureAttrs) -> str:
    if attrs.imported is not None:
        return f"imported from {attrs.imported.get('source_path')}"
    return f"embedded by `oncotrace embed` ({attrs.encoder_name})"


def import_features(
    h5_path: str | Path,
    out_dir: str | Path,
    name: str,
    *,
    tile_px: int | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    slide_id: str | None = None,
) -> ImportResult:
    """Turn one CLAM/TRIDENT feature file into ``<out_dir>/<slide_id>.zarr`` (or add to it).

    Parameters
    ----------
    h5_path : the feature file; its stem is the slide id unless ``slide_id`` is given.
    out_dir : folder of stores; created if missing.
    name : encoder name; the features go to ``features/<name>``. A registered encoder name
        must match the features' dim.
    tile_px, mpp : tile side in level-0 px and level-0 µm/px for files that do not record them
        (see :func:`read_h5_features`).
    overwrite : replace ``features/<name>`` that came from another source, or rebuild an
        imported store whose tiles differ from the file's.
    slide_id : store name.

    Returns
    -------
    ImportResult
        ``action`` is ``"created"`` (new store), ``"added"`` (features joined an existing store
        with the same coords), ``"replaced"`` (with ``overwrite``) or ``"skipped"`` (the store
        already holds these features from the same file: same size+mtime, or same sha256).

    Raises
    ------
    FeatureImportError
        Everything :func:`read_h5_features` refuses; a store of that slide holding
        ``features/<name>`` from another source (without ``overwrite``); a store whose tiles
        differ from the file's (features must be row-aligned with ``coords``).

    Notes
    -----
    A new store is written under a temporary name and renamed when complete; features added to
    an existing store likewise, so an interrupted import never looks finished.
    """
    t0 = time.perf_counter()
    h5_path = Path(h5_path)
    if not _NAME.match(name):
        raise FeatureImportError(
            f"name={name!r} is not a usable array name. Fix: letters, digits and . _ + -,"
            " e.g. uni, uni_v1, conch_v15.",
            param="name",
        )
    sid = slide_id or h5_path.stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = store_path(out, sid)
    remove_stale_partials(target)
    if not h5_path.is_file():
        raise FeatureImportError(f"{h5_path}: no such file.")
    fp = source_fingerprint(h5_path)
    here = str(h5_path.resolve())

    def result(action: Action, n: int, dim: int, fmt: str) -> ImportResult:
        return ImportResult(sid, target, n, dim, fmt, action, time.perf_counter() - t0)

    done: FeatureAttrs | None = None
    old_coords: np.ndarray | None = None
    store: Store | None = None
    if target.exists():
        store = Store.find(target, mode="r+")
        if store is None:
            raise FeatureImportError(
                f"{target} exists but is not a finished OncoTrace store. Fix: remove it, or"
                " import into another out_dir= folder.",
                param="out_dir",
            )
        done = store.feature_attrs(name)
        old_coords = store.coords() if "coords" in store.group else None
        imp = (done.imported if done is not None else None) or {}
        if (
            done is not None
            and done.complete
            and imp.get("source_path") == here
            and imp.get("source_fingerprint") == fp
        ):
            return result("skipped", int(done.n_tiles or 0), int(done.dim or 0), "")

    h5 = read_h5_features(h5_path, tile_px=tile_px, mpp=mpp)
    n, dim = h5.features.shape
    _encoder_attrs(name, dim, h5_path)  # refuse a dim that contradicts a registered name early
    sha = file_sha256(h5_path)
    if store is None:
        _write_store(h5, out, sid, name, fp, sha, t0)
        return result("created", n, dim, h5.format)

    same_tiles = old_coords is not None and np.array_equal(old_coords, h5.coords)
    if done is not None and done.complete:
        imp = done.imported or {}
        if imp.get("source_sha256") == sha and same_tiles:
            return result("skipped", n, dim, h5.format)  # same bytes, moved or touched
        if not overwrite:
            raise FeatureImportError(
                f"{h5_path}: {target} already holds features/{name} {_source_of(done)}, a"
                " different source. Fix: pass overwrite=True to replace them, or import under"
                " another name= or out_dir=.",
                param="overwrite",
            )
    if same_tiles:
        _add_features(h5, store, name, fp, sha, t0)
        return result("replaced" if done is not None else "added", n, dim, h5.format)
    imported_store = store.attrs.backend == "import"
    n_old = 0 if old_coords is None else len(old_coords)
    if imported_store and overwrite:
        _write_store(h5, out, sid, name, fp, sha, t0)
        return result("replaced", n, dim, h5.format)
    fix = (
        "pass overwrite=True to rebuild the imported store from this file (its other feature"
        " sets are dropped), or import into another out_dir= folder."
        if imported_store
        else "import into another out_dir= folder; this store holds tiles cut by `oncotrace tile`"
        " and features must be row-aligned with its coords."
    )
    raise FeatureImportError(
        f"{h5_path}: {target} holds {n_old} tiles at other coordinates than the file's {n}."
        f" Fix: {fix}"
    )
