"""Model-folder files: comparing a checkpoint with the module it is meant for, and the one error
every unloadable model folder raises."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The fix when a model folder's file is damaged or was never written by OncoTrace.
RESAVE_FIX = (
    "copy the model folder again from where `oncotrace train` wrote it (it may have been"
    " damaged or cut short in transit), or re-save it by training again with `oncotrace train`."
)


class ModelFileError(ValueError):
    """A model folder (``model.json``, ``model.safetensors``, ``ood.safetensors``) cannot be
    loaded; the message names the file, what is wrong with it and the fix.

    Attributes
    ----------
    path : the offending file (or folder).
    problem : what is wrong, one sentence.
    fix : what to do about it.
    param : the parameter naming the model folder (``directory``), for the CLI's flag.
    """

    def __init__(
        self, path: str | Path, problem: str, fix: str = RESAVE_FIX, *, param: str = "directory"
    ) -> None:
        self.path = str(path)
        self.problem = problem.rstrip(".")
        self.fix = fix
        self.param = param
        super().__init__(f"{self.path}: {self.problem}. Fix: {fix}")

    def __reduce__(self) -> tuple[object, ...]:
        # intact across process boundaries (Dask workers load models too)
        return (_rebuild, (self.path, self.problem, self.fix, self.param))


def _rebuild(path: str, problem: str, fix: str, param: str) -> ModelFileError:
    return ModelFileError(path, problem, fix, param=param)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or :class:`ModelFileError` naming it.

    Only safetensors is read: a pickle (``torch.save``) in its place is refused, never unpickled.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "missing"
        raise ModelFileError(path, f"{what}; the model's weights should be here")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            raise ModelFileError(path, f"cannot be read ({exc})", "check its permissions") from exc
        with open(path, "rb") as fh:
            first = fh.read(2)
        if first[:1] == b"\x80" or first == b"PK":  # pickle PROTO opcode; torch.save's zip
            kind = "a pickle (torch.save?), not safetensors; OncoTrace never unpickles weights"
        else:
            kind = f"not a complete safetensors file ({exc})"
        raise ModelFileError(path, kind) from exc


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """Describe how ``found`` tensors differ from ``expected`` (both name → tensor), or ``None``.

    Lists missing and unexpected names and shape mismatches (a few examples of each), which is
    what a user needs to see which model a checkpoint really belongs to.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts) or None
