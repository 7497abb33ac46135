"""Small shared pieces every stage writes or reads with: atomic writers, source fingerprints,
a read-ahead thread.

* :func:`atomic_write_text` / :func:`atomic_write_json` write a temporary sibling and
  ``os.replace`` it over the target, so a reader sees the old file or the new one, never half.
* :func:`atomic_dir` does the same for a folder (a Zarr store): the caller fills a temporary
  sibling ``.<name>.partial-<pid>-<random>``; it is renamed over the target when the block ends
  normally and removed when it raises.
* :func:`source_fingerprint` is the one identity of an input (a file, or every file of a
  DICOM-WSI folder) that tile stores, imports and scoring results record.
* :func:`read_ahead` prefetches items of an iterator on a background thread with a bounded
  buffer, and stops and joins that thread however the consumer leaves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._inspect import file_fingerprint

T = TypeVar("T")

_PARTIAL = "partial"
_REPLACED = "replaced"


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def source_fingerprint(path: str | Path) -> str:
    """Cheap identity of an input: changes whenever any byte of it may have changed.

    Parameters
    ----------
    path : a file, or a folder (a DICOM-WSI series: every instance counts, since OpenSlide
        reads the sibling files of whichever instance it is given).

    Returns
    -------
    str
        For a file, ``"size=<bytes>;mtime_ns=<ns>"``. For a folder, 32 hex digits of the sha256
        over ``name:size+mtime`` of each file in it (sorted by name; subfolders ignored).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    """
    p = Path(path)
    if p.is_dir():
        parts = [f"{c.name}:{file_fingerprint(c)}" for c in sorted(p.iterdir()) if c.is_file()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    return file_fingerprint(p)


def link_problem(path: str | Path) -> tuple[str, str] | None:
    """``(problem, fix)`` when ``path`` is a symbolic link that cannot be followed, else None.

    A dangling link (its target is gone: an unmounted share, a moved slide) and a loop of links
    both look like "no such file" to ``Path.exists``; saying which, and where it points, is
    what lets a user fix it.
    """
    p = Path(path)
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (
                "it is a symbolic link that leads back to itself (a loop of links).",
                "point the link at the file it stands for (`ln -sfn TARGET LINK`) or remove it.",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return (
                f"it is a symbolic link to {os.readlink(p)!r}, which does not exist.",
                "mount or restore the file it points to, or remove the link.",
            )
        raise
    return None


# --------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and ``os.replace``.

    Returns
    -------
    Path
        ``path``.
    """
    final = Path(path)
    tmp = _sibling(final, "tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf refused) to ``path``, atomically.

    Raises
    ------
    ValueError
        ``obj`` holds NaN or inf (not JSON); nothing is written.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; rename it to ``path`` when complete.

    Parameters
    ----------
    path : the finished folder. An existing one is replaced only once the new one is complete
        (moved aside, the new one renamed in, the old one removed; restored if the rename fails).

    Yields
    ------
    Path
        The temporary folder ``.<name>.partial-<pid>-<random>`` beside ``path`` (not created:
        the caller creates it, e.g. with ``zarr.open_group(tmp, mode="w")``).

    Notes
    -----
    If the block raises, the temporary folder is removed and ``path`` is left as it was. If
    the process dies, the partial folder stays; :func:`remove_stale_partials` clears it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, _PARTIAL)
    old = _sibling(final, _REPLACED)
    try:
        yield tmp
        if not tmp.is_dir():
            raise FileNotFoundError(
                f"{tmp}: the block wrote nothing, so there is nothing to commit to {final}."
                " Fix: create the folder (or Zarr group) at the path the block was given."
            )
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_partials(path: str | Path) -> None:
    """Remove leftovers of :func:`atomic_dir` for ``path`` whose writer process is gone.

    A partial folder of a live process other than this one is kept (it is being written).
    """
    final = Path(path)
    for kind in (_PARTIAL, _REPLACED):
        for tmp in final.parent.glob(f".{final.name}.{kind}-*"):
            pid_text = tmp.name.rsplit("-", 2)[-2] if tmp.name.count("-") >= 2 else ""
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue
            shutil.rmtree(tmp, ignore_errors=True)


_STALE_TMP = re.compile(r"^\..+\.tmp(?:-(\d+)-[0-9a-f]+)?$")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove temporary siblings :func:`atomic_write_text` left in ``folder`` (not recursive).

    They are ``.<name>.tmp-<pid>-<random>`` and are removed when a write fails; a process killed
    mid-write leaves them. Those of a live process are kept (being written); a fixed
    ``.<name>.tmp`` (the name older writers used) always goes. Symbolic links are left alone.
    Returns the files removed.
    """
    here = Path(folder)
    removed: list[Path] = []
    if not here.is_dir():
        return removed
    for p in here.iterdir():
        m = _STALE_TMP.match(p.name)
        if m is None or p.is_symlink() or not p.is_file():
            continue
        if m.group(1) and _pid_alive(int(m.group(1))):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------------------------
# Read-ahead
# --------------------------------------------------------------------------------------------

_ITEM, _ERROR, _END = 0, 1, 2


class ReadAhead(Generic[T]):
    """Iterate ``source`` while a background thread reads up to ``depth`` items ahead.

    Use :func:`read_ahead` to build one, preferably in a ``with`` block. Leaving the block (or
    the loop running to its end, or :meth:`close`) stops the reader after the item it is
    reading and joins it, also when the consumer raises or stops early.

    Attributes
    ----------
    thread : the reader thread (started on the first ``next``).
    """

    def __init__(self, source: Iterable[T], depth: int = 2, *, name: str = "read-ahead") -> None:
        if depth < 1:
            raise ValueError(f"read_ahead: depth must be >= 1, got {depth}.")
        self._source = iter(source)
        self._slots = threading.Semaphore(depth)  # items read but not yet taken
        self._items: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._closed = False
        self.thread = threading.Thread(target=self._produce, name=name, daemon=True)

    def _produce(self) -> None:
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                try:
                    item = next(self._source)
                except StopIteration:
                    self._items.put((_END, None))
                    return
                self._items.put((_ITEM, item))
        except BaseException as exc:  # handed to the consumer, never swallowed
            self._items.put((_ERROR, exc))

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        if self.thread.ident is None:  # first item: start reading
            self.thread.start()
        kind, payload = self._items.get()
        if kind == _ITEM:
            self._slots.release()
            return payload
        self.close()
        if kind == _ERROR:
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stop the reader thread, wait for it, and close ``source`` if it is a generator."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._slots.release()  # wake the reader if it waits for a slot; it then sees the stop
        if self.thread.ident is not None:
            self.thread.join()
        close = getattr(self._source, "close", None)
        if callable(close):  # safe now: the reader thread no longer runs the generator
            close()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_ahead(source: Iterable[T], depth: int = 2, *, name: str = "read-ahead") -> ReadAhead[T]:
    """Prefetch items of ``source`` on a background thread, at most ``depth`` ahead.

    Parameters
    ----------
    source : any iterable; it is advanced on the reader thread only.
    depth : how many items may wait, read but not yet taken (>= 1).
    name : the thread's name (shows in tracebacks and thread dumps).

    Returns
    -------
    ReadAhead
        An iterator and context manager. An exception raised by ``source`` is raised in the
        consumer at that item's position. Use it in a ``with`` block (or call ``close``) so the
        reader stops when the consumer raises or breaks out early::

            with read_ahead(batches(), depth=2) as items:
                for batch in items:
                    ...
    """
    return ReadAhead(source, depth, name=name)


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(columns, rows)`` of a CSV table, as spreadsheets write them.

    A UTF-8 byte-order mark (what Excel's "CSV UTF-8" writes) is accepted and dropped. A file in
    another encoding (UTF-16, Latin-1 with accents) or not a table raises one ``ValueError``
    naming the file and the fix, instead of a decoding error deep in the reader.
    """
    import csv

    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); spreadsheets saving 'Unicode"
            " text' write UTF-16. Fix: save it as 'CSV UTF-8 (comma delimited)'."
        ) from None
    except csv.Error as exc:
        raise ValueError(f"{p}: not a readable CSV table ({exc}). Fix: save it as CSV.") from None
    return columns, rows
