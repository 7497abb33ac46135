"""wsi — open slides and smears, find tissue or cells, cut micrometre-exact tiles into Zarr."""

from ._errors import (
    CorruptSlideError,
    MppError,
    NoTissueError,
    ResolutionError,
    SlideError,
    UnsupportedSlideError,
)
from ._slide import EXPORTED_PROPERTIES, PLAUSIBLE_MPP, Mpp, Slide, open_slide

__all__ = [
    "EXPORTED_PROPERTIES",
    "PLAUSIBLE_MPP",
    "CorruptSlideError",
    "Mpp",
    "MppError",
    "NoTissueError",
    "ResolutionError",
    "Slide",
    "SlideError",
    "UnsupportedSlideError",
    "open_slide",
]
