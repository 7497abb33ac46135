"""Exceptions raised at the ``wsi`` package boundary.

Every error names the file it is about and says what the user can do. They derive from
built-in types so callers that only know ``ValueError`` / ``OSError`` still catch them.
"""

from __future__ import annotations

from pathlib import Path


class SlideError(ValueError):
    """Base class: a slide (or smear image) cannot be used as given.

    Parameters
    ----------
    path : path of the offending file.
    problem : what is wrong, one sentence.
    fix : what the user should do about it.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem} Fix: {fix}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Keeps the error intact when it crosses a process boundary (Dask, multiprocessing).
        return (type(self), (self.path, self.problem, self.fix))


class UnsupportedSlideError(SlideError):
    """No backend recognises the file (wrong format, empty, text renamed as a slide)."""


class CorruptSlideError(SlideError):
    """A backend recognises the format but the data cannot be decoded (truncated, malformed)."""


class MppError(SlideError):
    """The physical pixel size is missing or implausible; the user must pass ``mpp=``."""


class NoTissueError(SlideError):
    """Tissue/cell detection found nothing worth tiling."""


class ResolutionError(SlideError):
    """The requested target resolution is finer than anything the slide holds."""
