"""Read an ``oncotrace score`` results folder for the viewer, serving nothing outside it.

The index is a whitelist: slide ids are the names of the folders under ``RESULTS_DIR/slides``
that hold a ``result.json`` or ``error.json``, overlays and ultrasound files are found by a scan,
and every request is answered by a dictionary lookup in what the scan found, never by joining a
request string onto a path. Each file the scan keeps must resolve (symlinks followed) to a path
inside ``RESULTS_DIR``. The slide and ultrasound files the results *reference* may live anywhere;
they are only ever read through :func:`wsi.open_slide` / :func:`spatial.read_ultrasound`.

Layout read (``workflows/_score.py``, ``oncotrace immune``, ``oncotrace map-us``)::

    RESULTS_DIR/slides/<slide_id>/result.json | error.json
    RESULTS_DIR/slides/<slide_id>/attention.ome.zarr            overlay "attention"
    RESULTS_DIR/slides/<slide_id>/immune/density.ome.zarr       overlay "immune-density"
    RESULTS_DIR/slides/<slide_id>/<sub>/<name>.ome.zarr         overlay "<sub>-<name>"
    RESULTS_DIR/slides/<slide_id>/ultrasound/registration.json  + <name>.ome.zarr on the frame
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from oncotrace.spatial import Heatmap

#: Seconds between two cheap mtime checks of the results folder.
RESCAN_INTERVAL_S = 1.0
#: Sub-folders of a slide folder that hold other things than slide-grid heatmaps.
_NOT_SLIDE_OVERLAYS = frozenset({"ultrasound"})
_ULTRASOUND = "ultrasound"
_REGISTRATION = "registration.json"
_ZARR_SUFFIX = ".ome.zarr"

T = TypeVar("T")


class NotFoundError(LookupError):
    """A request for something the results folder does not hold (the server answers 404)."""


# --------------------------------------------------------------------------------------------
# What the scan finds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayFile:
    """A slide-grid heatmap store found under a slide folder.

    Attributes
    ----------
    name : URL-safe id (``"attention"``, ``"immune-density"``, ...).
    path : the ``.ome.zarr`` folder, resolved, inside the results folder.
    label : display name (the store's ``oncotrace.name`` attr, else ``name``).
    unit : the values' unit (``oncotrace.value_unit``), or None.
    """

    name: str
    path: Path
    label: str
    unit: str | None


@dataclass(frozen=True, eq=False)
class Case:
    """One slide of the results folder.

    Attributes
    ----------
    slide_id : the folder name under ``slides/`` (exact).
    folder : that folder, resolved.
    status : ``"done"`` (result.json) or ``"error"`` (error.json only).
    tasks : task -> ``{"label", "probabilities": {class: p}, "top_k": [[class, p], ...]}``.
    error : ``{"stage", "type", "message"}`` or None.
    source : the slide file the result references (may be outside the results folder), or None.
    overlays : name -> slide-grid heatmap store, display order.
    ultrasound : the ``ultrasound/`` folder with a registration.json, or None.
    ood : ``{"distance", "threshold", "flagged"}`` of the out-of-domain check, or None when
        the model records no training statistics.
    """

    slide_id: str
    folder: Path
    status: Literal["done", "error"]
    tasks: dict[str, Any]
    error: dict[str, str] | None
    source: Path | None
    overlays: dict[str, OverlayFile] = field(default_factory=dict)
    ultrasound: Path | None = None
    ood: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The ``/api/cases`` entry (no file paths)."""
        return {
            "slide_id": self.slide_id,
            "status": self.status,
            "tasks": self.tasks,
            "error": self.error,
            "overlays": list(self.overlays),
            "has_ultrasound": self.ultrasound is not None,
            "ood": self.ood,
        }


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks followed) resolves to ``root`` or below; False if missing."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # missing, permission, symlink loop
        return False


def tree_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` and every file and folder under it resolve inside ``root``.

    A Zarr store whose chunk files are symlinks to elsewhere would otherwise let a results
    folder smuggle outside bytes into an overlay.
    """
    if not inside(path, root):
        return False
    for top, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            p = Path(top) / name
            if p.is_symlink() and not inside(p, root):
                return False
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file (a FIFO or device would block the server), else None."""
    try:
        if not path.is_file():
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _tasks_of(result: dict[str, Any]) -> dict[str, Any]:
    """result.json ``tasks`` (classes + proba lists) -> probabilities by class and scored top-k."""
    out: dict[str, Any] = {}
    tasks = result.get("tasks")
    if not isinstance(tasks, dict):
        return out
    for task, t in tasks.items():
        if not isinstance(t, dict):
            continue
        classes = [str(c) for c in t.get("classes") or []]
        proba = [float(p) for p in t.get("proba") or []]
        probs = dict(zip(classes, proba, strict=False))
        top = [str(c) for c in t.get("top_k") or []]
        out[str(task)] = {
            "label": None if t.get("label") is None else str(t["label"]),
            "probabilities": probs,
            "top_k": [[c, probs.get(c)] for c in top],
        }
    return out


def _error_of(doc: dict[str, Any]) -> dict[str, str]:
    return {
        "stage": str(doc.get("stage", "unknown")),
        "type": str(doc.get("error_type", "Error")),
        "message": str(doc.get("message", "")),
    }


def referenced_path(text: Any, root: Path, from_results: Any = None) -> Path | None:
    """A file path recorded in a results file: absolute as is while it exists, else
    ``from_results`` (the same file relative to the results folder, recorded beside it) when
    the results were moved together with their inputs; a relative ``text`` is tried against the
    working directory, then the results folder's parent, then the results folder."""
    if not isinstance(text, str) or not text or "\x00" in text:
        return None
    p = Path(text)
    if isinstance(from_results, str) and from_results and "\x00" not in from_results:
        moved = root / from_results
        if not p.exists() and moved.exists():
            return moved
    if p.is_absolute():
        return p
    for base in (Path.cwd(), root.parent, root):
        if (base / p).exists():
            return base / p
    return p


def _zarr_attrs(store: Path) -> dict[str, Any] | None:
    """The ``oncotrace`` attrs of a Zarr v3 group (its ``zarr.json``), or None."""
    meta = _read_json(store / "zarr.json")
    if meta is None:
        return None
    attrs = meta.get("attributes")
    onco = attrs.get("oncotrace") if isinstance(attrs, dict) else None
    return onco if isinstance(onco, dict) else None


def _overlay_name(rel: Path) -> str:
    """``attention.ome.zarr`` -> ``attention``; ``immune/density.ome.zarr`` -> ``immune-density``."""
    parts = [*rel.parts[:-1], rel.name.removesuffix(_ZARR_SUFFIX)]
    return "-".join(parts)


def _scan_overlays(folder: Path, root: Path) -> dict[str, OverlayFile]:
    found: list[tuple[Path, Path]] = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith("."):  # atomic writers' temporaries
            continue
        if sub.name.endswith(_ZARR_SUFFIX):
            found.append((Path(sub.name), sub))
        elif sub.is_dir() and sub.name not in _NOT_SLIDE_OVERLAYS and inside(sub, root):
            for store in sorted(sub.glob(f"*{_ZARR_SUFFIX}")):
                if not store.name.startswith("."):
                    found.append((Path(sub.name, store.name), store))
    overlays: dict[str, OverlayFile] = {}
    for rel, store in found:
        if not store.is_dir() or not tree_inside(store, root):
            continue
        attrs = _zarr_attrs(store)
        if attrs is None or "origin_level0_xy" not in attrs:
            continue  # not an OncoTrace slide-grid heatmap (e.g. another tool's OME-Zarr)
        name = _overlay_name(rel)
        unit = attrs.get("value_unit")
        overlays[name] = OverlayFile(
            name=name,
            path=store.resolve(),
            label=str(attrs.get("name") or name),
            unit=None if unit is None else str(unit),
        )
    order = {"attention": 0, "immune-density": 1}
    return dict(sorted(overlays.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


def _scan_case(folder: Path, root: Path) -> Case | None:
    result = _read_json(folder / "result.json") if inside(folder / "result.json", root) else None
    error = _read_json(folder / "error.json") if inside(folder / "error.json", root) else None
    if result is None and error is None:
        return None
    us = folder / _ULTRASOUND
    has_us = (us / _REGISTRATION).is_file() and inside(us / _REGISTRATION, root)
    doc: dict[str, Any] = result if result is not None else (error or {})
    return Case(
        slide_id=folder.name,
        folder=folder.resolve(),
        status="done" if result is not None else "error",
        tasks=_tasks_of(result) if result is not None else {},
        error=None if result is not None or error is None else _error_of(error),
        source=referenced_path(doc.get("path"), root, doc.get("path_from_results")),
        overlays=_scan_overlays(folder, root),
        ultrasound=us.resolve() if has_us else None,
        ood=_ood_of(result),
    )


def _ood_of(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The result's out-of-domain check, checked for shape (None when absent or malformed)."""
    ood = (result or {}).get("ood")
    if not isinstance(ood, dict):
        return None
    try:
        distance, threshold = float(ood["distance"]), float(ood["threshold"])
    except (KeyError, TypeError, ValueError):
        return None
    return {"distance": distance, "threshold": threshold, "flagged": distance > threshold}


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


class ResultsIndex:
    """The whitelist of cases in a results folder, rescanned when its folders change.

    Parameters
    ----------
    root : an ``oncotrace score`` output folder (with ``slides/``).
    rescan_interval_s : at most one mtime check per this many seconds.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder or has no ``slides/`` sub-folder.
    """

    def __init__(self, root: str | Path, *, rescan_interval_s: float = RESCAN_INTERVAL_S) -> None:
        given = Path(root)
        if not given.is_dir():
            raise FileNotFoundError(
                f"{given} is not a folder; pass the --out folder of `oncotrace score`."
            )
        self.root = given.resolve()
        if not (self.root / "slides").is_dir():
            raise FileNotFoundError(
                f"{given} has no slides/ folder, so it is not an `oncotrace score` output; pass "
                "the folder given to `oncotrace score --out` (with the demo: <demo>/scores)."
            )
        self._interval = rescan_interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._signature: tuple[tuple[str, int], ...] = ()
        self._cases: dict[str, Case] = {}
        self._refresh(force=True)

    def _folders(self) -> Iterator[Path]:
        slides = self.root / "slides"
        for entry in sorted(slides.iterdir()):
            # A symlinked slide folder pointing elsewhere is not part of these results.
            if entry.name.startswith(".") or not entry.is_dir() or not inside(entry, self.root):
                continue
            yield entry

    def _current_signature(self) -> tuple[tuple[str, int], ...]:
        """mtimes of slides/, each slide folder and their sub-folders: atomic renames of
        result files and new output folders all change one of them."""
        sig: list[tuple[str, int]] = []
        slides = self.root / "slides"
        sig.append((str(slides), slides.stat().st_mtime_ns))
        for folder in self._folders():
            try:
                sig.append((str(folder), folder.stat().st_mtime_ns))
                for sub in folder.iterdir():
                    if sub.is_dir() and not sub.name.endswith(_ZARR_SUFFIX):
                        sig.append((str(sub), sub.stat().st_mtime_ns))
            except OSError:  # removed while we looked; the next check sees it gone
                continue
        return tuple(sig)

    def _refresh(self, *, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self._interval:
                return
            self._checked = now
            sig = self._current_signature()
            if sig == self._signature and not force:
                return
            cases: dict[str, Case] = {}
            for folder in self._folders():
                try:
                    case = _scan_case(folder, self.root)
                except OSError:
                    continue
                if case is not None:
                    cases[case.slide_id] = case
            self._cases = cases
            self._signature = sig

    @property
    def due(self) -> bool:
        """Whether the next lookup will check the folder (so it may touch the disk)."""
        return time.monotonic() - self._checked >= self._interval

    def cases(self) -> dict[str, Case]:
        """slide id -> :class:`Case`, current to within ``rescan_interval_s``."""
        self._refresh()
        return self._cases

    def case(self, slide_id: str) -> Case:
        """The case of ``slide_id``; :class:`NotFoundError` for any id the scan did not find."""
        case = self.cases().get(slide_id)
        if case is None:
            raise NotFoundError(f"no slide {slide_id!r} in {self.root}")
        return case

    def overlay(self, slide_id: str, name: str) -> OverlayFile:
        ov = self.case(slide_id).overlays.get(name)
        if ov is None:
            raise NotFoundError(f"slide {slide_id!r} has no overlay {name!r}")
        return ov


# --------------------------------------------------------------------------------------------
# Loading what was found (cached by file identity)
# --------------------------------------------------------------------------------------------


class SmallCache:
    """A thread-safe LRU of at most ``max_items`` computed values keyed by file identity."""

    def __init__(self, max_items: int = 64) -> None:
        self._max = max_items
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[no-any-return,unused-ignore]
        value = make()  # outside the lock: two threads may build it once each, harmlessly
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return value


def file_key(path: Path) -> tuple[str, int, int]:
    """Identity of a file or folder version: atomic replacement changes inode or mtime."""
    st = path.stat()
    return str(path), st.st_ino, st.st_mtime_ns


def load_heatmap(overlay: OverlayFile, root: Path) -> Heatmap:
    """Read a slide-grid overlay store with :func:`spatial.read_heatmap` after checking that
    nothing in it points outside ``root``."""
    from oncotrace.spatial import read_heatmap

    if not tree_inside(overlay.path, root):
        raise NotFoundError(f"{overlay.path} links outside the results folder")
    try:
        return read_heatmap(overlay.path)
    except (FileNotFoundError, ValueError) as exc:
        raise NotFoundError(str(exc)) from exc


@dataclass(frozen=True, eq=False)
class MappedOverlay:
    """A heatmap resampled onto the ultrasound frame (``oncotrace map-us``).

    Attributes
    ----------
    name : the layer name (file stem).
    grid : (H, W) float32 ndarray on the frame's pixel grid, NaN outside the slide.
    vmin, vmax : the colour range map-us used (the slide heatmap's range).
    unit : the values' unit or None.
    """

    name: str
    grid: NDArray[np.float32]
    vmin: float
    vmax: float
    unit: str | None


@dataclass(frozen=True)
class UltrasoundFiles:
    """What an ``ultrasound/`` folder holds: its registration and the mapped stores by name."""

    folder: Path
    registration: dict[str, Any]
    stores: dict[str, Path]


def ultrasound_files(case: Case, root: Path) -> UltrasoundFiles:
    """Read ``registration.json`` and find the mapped ``*.ome.zarr`` stores beside it."""
    if case.ultrasound is None:
        raise NotFoundError(f"slide {case.slide_id!r} has no ultrasound/registration.json")
    reg = _read_json(case.ultrasound / _REGISTRATION)
    if reg is None or not isinstance(reg.get("ultrasound"), dict):
        raise NotFoundError(
            f"{case.ultrasound / _REGISTRATION} is not a registration written by `oncotrace "
            "map-us` (no 'ultrasound' block); run map-us again"
        )
    stores: dict[str, Path] = {}
    for store in sorted(case.ultrasound.glob(f"*{_ZARR_SUFFIX}")):
        if store.name.startswith(".") or not store.is_dir() or not tree_inside(store, root):
            continue
        attrs = _zarr_attrs(store)
        if attrs is None or attrs.get("kind") != "heatmap on ultrasound":
            continue
        stores[store.name.removesuffix(_ZARR_SUFFIX)] = store.resolve()
    return UltrasoundFiles(folder=case.ultrasound, registration=reg, stores=stores)


def load_mapped(name: str, store: Path, root: Path) -> MappedOverlay:
    """Read the full-resolution level of a mapped store and its colour range."""
    import zarr

    if not tree_inside(store, root):
        raise NotFoundError(f"{store} links outside the results folder")
    attrs = _zarr_attrs(store) or {}
    try:
        group = zarr.open_group(store, mode="r")
        level0 = group.get("s0")
        if not isinstance(level0, zarr.Array):
            raise NotFoundError(f"{store}: no level s0; run map-us again")
        grid = np.asarray(level0[...], dtype=np.float32)
    except NotFoundError:
        raise
    except Exception as exc:  # zarr raises several types for a damaged store
        raise NotFoundError(f"{store}: cannot read the mapped heatmap ({exc})") from exc
    finite = grid[np.isfinite(grid)]
    vr = attrs.get("value_range")
    if isinstance(vr, list) and len(vr) == 2 and all(isinstance(v, int | float) for v in vr):
        lo, hi = float(vr[0]), float(vr[1])
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
    if not hi > lo:
        hi = lo + 1.0
    unit = attrs.get("value_unit")
    return MappedOverlay(
        name=name, grid=grid, vmin=lo, vmax=hi, unit=None if unit is None else str(unit)
    )
