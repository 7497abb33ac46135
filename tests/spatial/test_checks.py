"""Numbers the spatial functions refuse, each naming its parameter, before any work is done."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from oncotrace import spatial
from oncotrace.wsi import ParameterError


def _cells(level0_size: tuple[int, int], mpp: float) -> spatial.CellTable:
    x = np.array([10.0, 20.0])
    return spatial.CellTable(
        x=x,
        y=x,
        x_um=x * mpp,
        y_um=x * mpp,
        cls=np.array(["lymphocyte", "other"]),
        area_um2=np.full(2, 30.0),
        hematoxylin_od=np.full(2, 0.5),
        dab_od=np.zeros(2),
        eccentricity=np.full(2, 0.3),
        mpp=(mpp, mpp),
        level0_size=level0_size,
        stain="he",
        positive_class="lymphocyte",
        tissue_area_mm2=1.0,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bin_um", math.nan),
        ("bin_um", math.inf),
        ("bin_um", 0.0),
        ("bin_um", -50.0),
        ("bin_um", 1e308),
        ("min_positive", 0),
        ("mpp", math.nan),
        ("mpp", 0.0),
        ("mpp", 1e-9),
        ("threads", 0),
        ("alpha", math.nan),
        ("alpha", 1.5),
        ("spacing_mm", (0.1, math.inf)),
        ("frame", -1),
        ("n_null", 0),
        ("seed", -1),
    ],
)
def test_each_bad_number_names_its_parameter(name: str, value: object) -> None:
    with pytest.raises(ParameterError) as info:
        spatial.check_parameters(**{name: value})
    assert info.value.param == name
    assert f"{name}=" in str(info.value) and "Fix" in str(info.value)


def test_a_bin_implying_an_unbounded_grid_is_refused_before_any_allocation() -> None:
    # was: MemoryError (np.bincount over the grid) after detection had finished
    cells = _cells((10_000_000, 10_000_000), mpp=0.5)  # a 5 m "slide"
    with pytest.raises(ParameterError) as info:
        spatial.density_map(cells, bin_um=50.0)
    assert info.value.param == "bin_um"
    text = str(info.value)
    assert "100,000 x 100,000 grid" in text  # 5 m / 50 µm per side, by hand
    suggested = float(re.search(r"Fix: pass bin_um=([\d.]+)", text).group(1))  # type: ignore[union-attr]
    smallest = math.sqrt(5e6 * 5e6 / spatial.MAX_GRID_CELLS)  # µm² of the slide / bins allowed
    assert suggested >= smallest
    gh, gw = spatial.check_density_options(suggested, extent_um=(5e6, 5e6))
    assert gh * gw <= spatial.MAX_GRID_CELLS
    # a slide no bin can map is a wrong mpp, and the message says so
    with pytest.raises(ParameterError, match="larger than any glass slide") as info:
        spatial.density_map(_cells((2_000_000, 2_000_000), mpp=50.0), bin_um=50.0)
    assert info.value.param == "mpp"


def test_the_cli_bound_is_the_largest_glass_slide() -> None:
    with pytest.raises(ParameterError, match=r"750,000,000 x 500,000,000 grid") as info:
        spatial.check_density_options(1e-4)  # 75 x 50 mm at 0.1 nm
    assert info.value.param == "bin_um"
    assert spatial.check_density_options(50.0) == (1000, 1500)  # 50 mm / 50 µm, 75 mm / 50 µm


def test_min_positive_beyond_what_a_bin_can_hold_is_refused() -> None:
    cells = _cells((400, 200), mpp=0.5)
    # a 50 µm bin holds at most 2500 / 12 = 208 nuclei of the smallest counted area
    assert spatial.density_map(cells, bin_um=50.0, min_positive=208).min_positive == 208
    with pytest.raises(ParameterError, match="at most 208") as info:
        spatial.density_map(cells, bin_um=50.0, min_positive=209)
    assert info.value.param == "min_positive"


def test_st_validate_refuses_its_null_options_before_counting(shared_data: Path) -> None:
    visium = spatial.read_visium(shared_data / "spatial" / "visium-human-1.0.0")
    xy = np.zeros((1, 2))
    for kwargs, param in (
        ({"n_null": 10**9}, "n_null"),
        ({"n_null": 0}, "n_null"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ParameterError) as info:
            spatial.st_validate(xy, None, visium, fallback="total-counts", **kwargs)  # type: ignore[arg-type]
        assert info.value.param == param


def test_to_ultrasound_and_detection_name_their_bad_numbers() -> None:
    image = np.full((64, 64, 3), 230, np.uint8)
    with pytest.raises(ParameterError) as info:
        spatial.detect_immune_cells(image, mpp=0.5, workers=0)
    assert info.value.param == "workers"
    with pytest.raises(ParameterError) as info:
        spatial.detect_immune_cells(image, mpp=math.nan)
    assert info.value.param == "mpp"
    phantom = spatial.render_ultrasound_phantom((448.0 * 0.5, 448.0 * 0.5), seed=1)
    reg = spatial.fit_landmarks(phantom.landmarks)
    heat = spatial.attention_heatmap(
        np.array([[0, 0], [224, 224]]),
        np.array([0.2, 0.8]),
        tile_size_level0=224,
        level0_size=(448, 448),
        mpp=0.5,
    )
    with pytest.raises(ParameterError) as info:
        spatial.to_ultrasound(heat, reg, phantom.ultrasound, alpha=math.nan)
    assert info.value.param == "alpha"
