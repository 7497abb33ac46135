"""spatial — attention heatmaps on the tile grid and the files viewers read (ARCHITECTURE.md)."""

from ._heatmap import (
    Heatmap,
    attention_heatmap,
    ngff_transforms,
    normalise_attention,
    read_heatmap,
    render_overlay,
    write_geojson,
    write_ome_zarr,
    write_overlay_png,
)

__all__ = [
    "Heatmap",
    "attention_heatmap",
    "ngff_transforms",
    "normalise_attention",
    "read_heatmap",
    "render_overlay",
    "write_geojson",
    "write_ome_zarr",
    "write_overlay_png",
]
