"""spatial — heatmaps, immune-cell maps, ultrasound registration and spatial-transcriptomics
validation, and the files viewers read (ARCHITECTURE.md)."""

if __name__ != "oncotrace.spatial":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `spatial` stage, importable only as `oncotrace.spatial` "
        f"(got {__name__!r}): write `from oncotrace import spatial` after `pip install -e .`"
    )


from ._cellphantom import ImmuneCluster, PlantedCells, render_cells, write_phantom_slide
from ._heatmap import (
    Colormap,
    Heatmap,
    attention_heatmap,
    ngff_transforms,
    normalise_attention,
    read_heatmap,
    render_overlay,
    value_range,
    write_geojson,
    write_ome_zarr,
    write_overlay_png,
)
from ._immune import (
    CELL_DETECTORS,
    CellTable,
    DensityMaps,
    GeometryKind,
    ImmuneConfig,
    Stain,
    create_cell_detector,
    density_map,
    detect_immune_cells,
    list_cell_detectors,
    load_til_grid,
    register_cell_detector,
    summary_dict,
    write_immune_outputs,
)
from ._landmarks import (
    LandmarkError,
    Landmarks,
    Registration,
    fit_landmarks,
    landmarks_from_arrays,
    load_landmarks,
)
from ._landmarks import (
    Model as RegistrationModel,
)
from ._spatialstats import (
    NullName,
    association_test,
    bivariate_association,
    block_permutation_null,
    hex_lattice_weights,
    knn_weights,
    moran_test,
    morans_i,
    toroidal_null,
)
from ._transforms import (
    SLIDE_PX,
    SLIDE_UM,
    US_MM,
    US_PX,
    Affine,
    Sequence,
    ThinPlateSpline,
    Transform,
    transform_from_dict,
)
from ._ultrasound import (
    MappedHeatmap,
    Ultrasound,
    UltrasoundError,
    landmarks_overlay_png,
    read_ultrasound,
    to_ultrasound,
)
from ._usphantom import UltrasoundPhantom, render_ultrasound_phantom
from ._visium import (
    DEFAULT_IMMUNE_GENES,
    Fallback,
    Visium,
    VisiumError,
    count_cells_per_spot,
    immune_gene_score,
    read_visium,
    st_validate,
    visium_image_scale,
    write_st_report,
)
from ._visium import (
    ImageName as VisiumImage,
)

__all__ = [
    "CELL_DETECTORS",
    "DEFAULT_IMMUNE_GENES",
    "SLIDE_PX",
    "SLIDE_UM",
    "US_MM",
    "US_PX",
    "Affine",
    "CellTable",
    "Colormap",
    "DensityMaps",
    "Fallback",
    "GeometryKind",
    "Heatmap",
    "ImmuneCluster",
    "ImmuneConfig",
    "LandmarkError",
    "Landmarks",
    "MappedHeatmap",
    "NullName",
    "PlantedCells",
    "Registration",
    "RegistrationModel",
    "Sequence",
    "Stain",
    "ThinPlateSpline",
    "Transform",
    "Ultrasound",
    "UltrasoundError",
    "UltrasoundPhantom",
    "Visium",
    "VisiumError",
    "VisiumImage",
    "association_test",
    "attention_heatmap",
    "bivariate_association",
    "block_permutation_null",
    "count_cells_per_spot",
    "create_cell_detector",
    "density_map",
    "detect_immune_cells",
    "fit_landmarks",
    "hex_lattice_weights",
    "immune_gene_score",
    "knn_weights",
    "landmarks_from_arrays",
    "landmarks_overlay_png",
    "list_cell_detectors",
    "load_landmarks",
    "load_til_grid",
    "moran_test",
    "morans_i",
    "ngff_transforms",
    "normalise_attention",
    "read_heatmap",
    "read_ultrasound",
    "read_visium",
    "register_cell_detector",
    "render_cells",
    "render_overlay",
    "render_ultrasound_phantom",
    "st_validate",
    "summary_dict",
    "to_ultrasound",
    "toroidal_null",
    "transform_from_dict",
    "value_range",
    "visium_image_scale",
    "write_geojson",
    "write_immune_outputs",
    "write_ome_zarr",
    "write_overlay_png",
    "write_phantom_slide",
    "write_st_report",
]
