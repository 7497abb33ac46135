"""Exceptions raised at the ``wsi`` package boundary.

Every error names the file it is about and says what the user can do. They derive from
built-in types so callers that only know ``ValueError`` / ``OSError`` still catch them.

The library does not know the command line: a fix names the Python parameter (``mpp=0.25``) and
the error carries it as ``param``; the CLI renders its own flag (``--mpp 0.25``) in the message.
"""

from __future__ import annotations

import math
import re
from numbers import Real
from pathlib import Path

#: Said in place of a value read from a file's metadata that is not a plain number. Scanners
#: and converters put patient names and record numbers in any text field (an Aperio ``MPP``, a
#: TIFF tag written as text, an OME attribute), so free text from a file is never quoted.
WITHHELD = "value withheld: file metadata may hold patient data"

# A plain decimal number, as scanners write µm/px, magnifications and tag values.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MAX_NUMBER_CHARS = 24
_MAX_NUMBERS = 4


def metadata_value(value: object) -> str:
    """How a value read from a file's metadata may appear in a message: a number, or withheld.

    A finite number (or a string that is one, or a short tuple of them, such as a TIFF
    rational) is shown; anything else becomes ``"(value withheld: …)"``. Use it for every
    metadata value put in an exception, a warning or a report.
    """
    if isinstance(value, tuple | list) and 0 < len(value) <= _MAX_NUMBERS:
        shown = [_number_text(v) for v in value]
        if all(shown):
            return ", ".join(s for s in shown if s)
    else:
        text = _number_text(value)
        if text:
            return text
    return f"({WITHHELD})"


def _number_text(value: object) -> str | None:
    if isinstance(value, bool):  # a flag is no measurement; True would read as 1
        return None
    if isinstance(value, Real):
        v = float(value)
        if not math.isfinite(v):
            return None
        return str(value) if isinstance(value, int) else f"{v:.6g}"
    if isinstance(value, str):
        text = value.strip()
        if len(text) <= _MAX_NUMBER_CHARS and _NUMBER.fullmatch(text):
            return text if math.isfinite(float(text)) else None
    return None


class MetadataValueError(ValueError):
    """A metadata field does not hold the number it should; the message withholds the value."""


def metadata_float(value: object, field: str) -> float:
    """``value`` (a metadata field named ``field``, e.g. ``"Aperio MPP"``) as a finite float.

    Raises
    ------
    MetadataValueError
        Saying which field is not a number, with the value shown only if it is one (``"inf"``).
    """
    if not isinstance(value, bool):
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, Real) or (isinstance(text, str) and _NUMBER.fullmatch(text)):
            number = float(text)
            if math.isfinite(number):
                return number
    raise MetadataValueError(f"the file's {field} field is not a number {metadata_value(value)}")


def reader_failure(exc: BaseException) -> str:
    """``"ValueError: …"`` for a message about an exception raised inside a reader library.

    Libraries quote the value they reject (``could not convert string to float: 'DOE^JOHN'``),
    and that value comes from the file, so the text is cut at its first quote. A
    :class:`MetadataValueError` is safe as it stands.
    """
    text = str(exc)
    if not isinstance(exc, MetadataValueError):
        quote = min((i for i in (text.find("'"), text.find('"')) if i >= 0), default=-1)
        if quote >= 0:
            text = f"{text[:quote].rstrip()} ({WITHHELD})"
    return f"{type(exc).__name__}: {text.strip()}"


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
    """The target resolution is finer than the slide holds, by more than the allowed upsampling.

    Attributes
    ----------
    finest_mpp : µm/px of the slide's finest level (the mean of x and y).
    target_mpp : the µm/px asked for.
    max_upsample : the bound on ``finest_mpp / target_mpp`` that was exceeded.

    The three are None only for an error built without them (by other code). Callers that
    cannot change the target (a model's fixed tiling) reword the fix from them.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        fix: str,
        *,
        param: str | None = None,
        finest_mpp: float | None = None,
        target_mpp: float | None = None,
        max_upsample: float | None = None,
    ) -> None:
        super().__init__(path, problem, fix, param=param)
        self.finest_mpp = finest_mpp
        self.target_mpp = target_mpp
        self.max_upsample = max_upsample

    @property
    def upsample(self) -> float | None:
        """``finest_mpp / target_mpp``: the upsampling the target would have needed."""
        if self.finest_mpp is None or not self.target_mpp:
            return None
        return self.finest_mpp / self.target_mpp

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_resolution_error,
            (
                type(self),
                self.path,
                self.problem,
                self.fix,
                self.param,
                self.finest_mpp,
                self.target_mpp,
                self.max_upsample,
            ),
        )


def _rebuild_resolution_error(
    cls: type[ResolutionError],
    path: str,
    problem: str,
    fix: str,
    param: str | None,
    finest_mpp: float | None,
    target_mpp: float | None,
    max_upsample: float | None,
) -> ResolutionError:
    return cls(
        path,
        problem,
        fix,
        param=param,
        finest_mpp=finest_mpp,
        target_mpp=target_mpp,
        max_upsample=max_upsample,
    )


class UpsamplingWarning(UserWarning):
    """Tiles were resampled up from a slide coarser than the target (within ``max_upsample``).

    Attributes
    ----------
    path : the slide.
    finest_mpp, target_mpp : µm/px of the slide's finest level and of the tiles.
    max_upsample : the bound it was within.
    factor : ``finest_mpp / target_mpp`` (> 1): the tiles hold no detail finer than
        ``finest_mpp`` although they are cut at ``target_mpp``.
    """

    def __init__(
        self, path: str | Path, finest_mpp: float, target_mpp: float, max_upsample: float
    ) -> None:
        self.path = str(path)
        self.finest_mpp = finest_mpp
        self.target_mpp = target_mpp
        self.max_upsample = max_upsample
        self.factor = finest_mpp / target_mpp
        super().__init__(
            f"{self.path}: upsampled ×{self.factor:.3g}: its finest level is {finest_mpp:.4g}"
            f" µm/px, coarser than the {target_mpp:g} µm/px tiles, which therefore hold no detail"
            f" finer than {finest_mpp:.4g} µm/px (allowed up to ×{max_upsample:g};"
            " max_upsample=1 refuses such slides instead)."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.finest_mpp, self.target_mpp, self.max_upsample))
