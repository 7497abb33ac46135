"""Generators of small fluorescence / multichannel TIFFs that are not brightfield slides.

A multiplex immunofluorescence scan holds one grey plane per channel (DAPI, then one per
marker), not RGB. Each ``write_*`` function writes one seeded file of a few hundred kilobytes
and returns the channel names it recorded (empty when the file records none), so a test can
compare an error message with what was planted.

* :func:`write_qptiff` — PerkinElmer / Akoya QPTIFF layout: one page per channel at full
  resolution, each with a ``<PerkinElmer-QPI-ImageDescription>`` XML naming its channel, then the
  same channels at half resolution; Software ``PerkinElmer-QPI``. ``rgb=True`` writes the
  brightfield variant of the format (one RGB page per level), which must still open.
* :func:`write_ome_channels` — an OME-TIFF with a ``C`` axis and OME ``Channel Name`` s.
* :func:`write_plain_pages` — several same-sized 1-sample pages and no metadata at all.
* :func:`write_multisample` — one page of several minisblack samples per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

SEED = 20250111
#: (fluorophore name, biomarker or None) of the planted channels, as a Vectra 3 scan lists them
QPI_CHANNELS: tuple[tuple[str, str | None], ...] = (
    ("DAPI", None),
    ("Opal 520", "CD8"),
    ("Opal 690", "PanCK"),
    ("Autofluorescence", None),
)
MPP = 0.5  # µm/px of level 0 in every generated file


def fluorescence_planes(
    n_channels: int, shape: tuple[int, int] = (256, 320), dtype: type = np.uint16
) -> np.ndarray:
    """(C, H, W) grey planes: dark background with bright, channel-specific round cells."""
    rng = np.random.default_rng(SEED)
    h, w = shape
    top = 4000 if np.dtype(dtype) == np.uint16 else 200
    planes = rng.integers(0, top // 40, (n_channels, h, w)).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for c in range(n_channels):
        for cy, cx in zip(rng.uniform(10, h - 10, 25), rng.uniform(10, w - 10, 25), strict=True):
            planes[c][(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = top
    return planes.astype(dtype)


def _qpi_description(name: str, biomarker: str | None, image_type: str, rgb: bool) -> str:
    marker = f"<Biomarker>{biomarker}</Biomarker>\r\n" if biomarker else ""
    channel = "" if rgb else f"<Name>{name}</Name>\r\n<Color>255,255,255</Color>\r\n{marker}"
    return (
        '<?xml version="1.0" encoding="utf-8"?>\r\n'
        "<PerkinElmer-QPI-ImageDescription>\r\n"
        "<DescriptionVersion>2</DescriptionVersion>\r\n"
        "<AcquisitionSoftware>Vectra</AcquisitionSoftware>\r\n"
        f"<ImageType>{image_type}</ImageType>\r\n"
        "<IsUnmixedComponent>True</IsUnmixedComponent>\r\n"
        f"{channel}"
        "<Objective>20x</Objective>\r\n"
        "</PerkinElmer-QPI-ImageDescription>"
    )


def _resolution(level_mpp: float) -> dict[str, object]:
    return {"resolution": (1e4 / level_mpp, 1e4 / level_mpp), "resolutionunit": "CENTIMETER"}


def write_qptiff(
    path: Path,
    channels: Sequence[tuple[str, str | None]] = QPI_CHANNELS,
    *,
    dtype: type = np.uint16,
    rgb: bool = False,
) -> list[str]:
    """A QPTIFF-like file; returns the names (``"CD8 (Opal 520)"`` style) it planted."""
    if rgb:
        from oncotrace.wsi.synthetic import he_texture

        full = he_texture((256, 320), np.random.default_rng(SEED), mpp=MPP)
        levels = [full[None], full[None, ::2, ::2]]
    else:
        planes = fluorescence_planes(len(channels), dtype=dtype)
        levels = [planes, planes[:, ::2, ::2]]
    with tifffile.TiffWriter(path) as tw:
        for level, stack in enumerate(levels):
            kind = "FullResolution" if level == 0 else "ReducedResolution"
            for i, plane in enumerate(stack):
                name, marker = channels[i] if not rgb else ("", None)
                tw.write(
                    np.ascontiguousarray(plane),
                    photometric="rgb" if rgb else "minisblack",
                    tile=(128, 128),
                    compression="zlib",
                    subfiletype=1 if level else 0,
                    software="PerkinElmer-QPI",
                    description=_qpi_description(name, marker, kind, rgb),
                    metadata=None,
                    **_resolution(MPP * 2**level),  # type: ignore[arg-type]
                )
    if rgb:
        return []
    return [f"{m} ({n})" if m else n for n, m in channels]


def write_ome_channels(
    path: Path, names: Sequence[str] = ("DAPI", "CD8", "CD20"), *, dtype: type = np.uint16
) -> list[str]:
    """A tiled OME-TIFF, axes ``CYX``, whose OME-XML names each channel."""
    planes = fluorescence_planes(len(names), dtype=dtype)
    tifffile.imwrite(
        path,
        planes,
        ome=True,
        photometric="minisblack",
        tile=(128, 128),
        metadata={
            "axes": "CYX",
            "Channel": {"Name": list(names)},
            "PhysicalSizeX": MPP,
            "PhysicalSizeY": MPP,
        },
    )
    return list(names)


def write_plain_pages(path: Path, n_channels: int = 5, *, dtype: type = np.uint8) -> list[str]:
    """Several 1-sample pages of one size and no description: channels known only by count."""
    planes = fluorescence_planes(n_channels, dtype=dtype)
    with tifffile.TiffWriter(path) as tw:
        for plane in planes:
            tw.write(plane, photometric="minisblack", metadata=None, **_resolution(MPP))  # type: ignore[arg-type]
    return []


def write_multisample(path: Path, n_channels: int = 6, *, dtype: type = np.uint16) -> list[str]:
    """One page holding ``n_channels`` minisblack samples per pixel (planar), unnamed."""
    planes = fluorescence_planes(n_channels, dtype=dtype)
    tifffile.imwrite(
        path,
        planes,
        photometric="minisblack",
        planarconfig="separate",
        metadata=None,
        **_resolution(MPP),  # type: ignore[arg-type]
    )
    return []
