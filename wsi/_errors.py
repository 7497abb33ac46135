"""Exceptions raised at the ``wsi`` package boundary.

Every error names the file it is about and says what the user can do. They derive from
built-in types so callers that only know ``ValueError`` / ``OSError`` still catch them.

The library does not know the command line: a fix names the Python parameter (``mpp=0.25``) and
the error carries it as ``param``; the CLI renders its own flag (``--mpp 0.25``) in the message.
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
    param : the parameter the fix is about (``"mpp"``, ``"target_mpp"``), if any.
    """

    def __init__(self, path: str | Path, problem: str, fix: str, *, param: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.param = param
        super().__init__(f"{self.path}: {problem} Fix: {fix}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error intact when it crosses a process boundary (Dask, multiprocessing).
        return (_rebuild_slide_error, (type(self), self.path, self.problem, self.fix, self.param))


def _rebuild_slide_error(
    cls: type[SlideError], path: str, problem: str, fix: str, param: str | None
) -> SlideError:
    return cls(path, problem, fix, param=param)


class ParameterError(ValueError):
    """A parameter's value cannot work; ``param`` names it (the CLI shows its own flag).

    The message writes the parameter as Python does (``spacing_mm=0.2``).
    """

    def __init__(self, message: str, *, param: str) -> None:
        self.param = param
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_parameter_error, (type(self), str(self), self.param))


def _rebuild_parameter_error(cls: type[ParameterError], message: str, param: str) -> ParameterError:
    return cls(message, param=param)


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
