"""OncoTrace — computational pathology and the radiology studies around it.

The stages are subpackages, imported one way (``wsi ← mil ← spatial ← workflows``)::

    from oncotrace import wsi, mil, spatial, workflows

This module is the package root only: it holds the version and imports no stage, so
``import oncotrace`` stays cheap. (Its file lives in ``wsi/_root/`` because the repository keeps
one top-level folder per stage; ``pyproject.toml`` maps ``oncotrace`` here.)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__: str = _version("oncotrace")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: The stage subpackages, in import order (a stage may import only those before it).
STAGES: tuple[str, ...] = ("wsi", "mil", "spatial", "workflows")

__all__ = ["STAGES", "__version__"]
