"""wsi — open slides and smears, find tissue or cells, cut micrometre-exact tiles into Zarr."""

if __name__ != "oncotrace.wsi":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `wsi` stage, importable only as `oncotrace.wsi` "
        f"(got {__name__!r}): write `from oncotrace import wsi` after `pip install -e .`"
    )


from ._errors import (
    CorruptSlideError,
    MppError,
    NoTissueError,
    ParameterError,
    ResolutionError,
    SlideError,
    UnsupportedSlideError,
    UpsamplingWarning,
)
from ._inspect import FileInfo, inspect_file, sniff
from ._io import (
    ReadAhead,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    link_problem,
    read_ahead,
    read_csv_rows,
    remove_stale_partials,
    remove_stale_temp_files,
    source_fingerprint,
)
from ._registry import Registry, RegistryEntry
from ._slide import (
    EXPORTED_PROPERTIES,
    PLAUSIBLE_MPP,
    BackendChoice,
    Mpp,
    Slide,
    check_mpp,
    open_slide,
)
from ._smear import smear_mask
from ._storage import (
    FEATURE_CHUNK_ROWS,
    STORE_FORMAT,
    FeatureAttrs,
    FeatureWriter,
    Store,
    StoreAttrs,
    StoreError,
    TilingConfig,
    fast_codecs,
)
from ._store import (
    TileResult,
    check_slide_id,
    is_complete,
    read_store_attrs,
    slide_id_for,
    store_path,
    tile_slide,
    write_patches,
)
from ._tiling import (
    TileGeometry,
    focus_score,
    read_tile,
    tile_coords,
    tile_geometry,
    tissue_fraction,
)
from ._tissue import Mode, TissueMask, detect_tissue, ink_mask, tissue_mask

__all__ = [
    "EXPORTED_PROPERTIES",
    "FEATURE_CHUNK_ROWS",
    "PLAUSIBLE_MPP",
    "STORE_FORMAT",
    "BackendChoice",
    "CorruptSlideError",
    "FeatureAttrs",
    "FeatureWriter",
    "FileInfo",
    "Mode",
    "Mpp",
    "MppError",
    "NoTissueError",
    "ParameterError",
    "ReadAhead",
    "Registry",
    "RegistryEntry",
    "ResolutionError",
    "Slide",
    "SlideError",
    "Store",
    "StoreAttrs",
    "StoreError",
    "TileGeometry",
    "TileResult",
    "TilingConfig",
    "TissueMask",
    "UnsupportedSlideError",
    "UpsamplingWarning",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "check_mpp",
    "check_slide_id",
    "detect_tissue",
    "fast_codecs",
    "focus_score",
    "ink_mask",
    "inspect_file",
    "is_complete",
    "link_problem",
    "open_slide",
    "read_ahead",
    "read_csv_rows",
    "read_store_attrs",
    "read_tile",
    "remove_stale_partials",
    "remove_stale_temp_files",
    "slide_id_for",
    "smear_mask",
    "sniff",
    "source_fingerprint",
    "store_path",
    "tile_coords",
    "tile_geometry",
    "tile_slide",
    "tissue_fraction",
    "tissue_mask",
    "write_patches",
]
