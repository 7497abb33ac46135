"""The numbers the spatial stage accepts, checked once, where they enter.

Every numeric option of the spatial functions (and of the commands built on them) has its range
here, in :data:`BOUNDS`; :func:`check_parameters` refuses a value outside it with a
:class:`wsi.ParameterError` whose ``param`` names the parameter, so the CLI can print its flag
and refuse a bad option before it reads any input. :func:`check_density_options` adds what
depends on two numbers: the size of the density grid a bin side implies, and whether a bin of
that side can hold ``min_positive`` cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from oncotrace.wsi import PLAUSIBLE_MPP, ParameterError

#: Most cells in one density grid (float32 maps of 200 MB each, a few of them at once).
MAX_GRID_CELLS = 50_000_000
#: The largest glass slide (a whole-mount 75 x 50 mm slide): the grid a bin side implies before
#: any slide is read.
LARGEST_SLIDE_UM = (75_000.0, 50_000.0)
#: Density bins larger than this (1 cm) average over more than a biopsy: not a map any more.
MAX_BIN_UM = 10_000.0
#: Smallest nucleus a density bin counts (``ImmuneConfig.min_area_um2``'s default): a bin of side
#: ``b`` holds at most ``b**2 / MIN_NUCLEUS_AREA_UM2`` cells.
MIN_NUCLEUS_AREA_UM2 = 12.0
#: Most draws of a spatial null: p-values to 1e-4, and (draws x spots) int64 indices stay under
#: ~0.5 GB for the 4,992 spots of a Visium capture area.
MAX_NULL_DRAWS = 9_999
VISIUM_MAX_SPOTS = 4_992
#: Thread pools beyond this only wait on one another (and each thread holds a tile).
MAX_THREADS = 256
#: Plausible ultrasound pixel spacings (mm/px); outside this a unit mix-up is far likelier.
MIN_SPACING_MM = 0.005
MAX_SPACING_MM = 5.0


@dataclass(frozen=True)
class Bound:
    """A number's accepted range, what it is, and a value that works."""

    low: float
    high: float
    what: str
    example: str
    integer: bool = False
    low_open: bool = False

    def text(self) -> str:
        lo = f"{'>' if self.low_open else '≥'} {self.low:g}"
        hi = "" if self.high == math.inf else f" and ≤ {self.high:g}"
        kind = "a whole number" if self.integer else "a finite number"
        return f"{kind} {lo}{hi}"


_MPP = Bound(*PLAUSIBLE_MPP, "level-0 µm per pixel", "0.25 (40x) or 0.5 (20x)")
#: parameter name -> its range (CLI flags: ``workflows._flags.FLAGS``)
BOUNDS: dict[str, Bound] = {
    "mpp": _MPP,
    "slide_mpp": _MPP,
    "bin_um": Bound(0.0, MAX_BIN_UM, "density-bin side in µm", "50", low_open=True),
    "min_positive": Bound(
        1, math.inf, "number of positive cells that makes a bin TIL-positive", "2", True
    ),
    "min_coverage": Bound(0.0, 1.0, "tissue fraction of a bin", "0.5"),
    "threads": Bound(1, MAX_THREADS, "number of threads", "2", integer=True),
    "workers": Bound(1, MAX_THREADS, "number of threads", "2", integer=True),
    "alpha": Bound(0.0, 1.0, "overlay opacity", "0.5"),
    "spacing_mm": Bound(MIN_SPACING_MM, MAX_SPACING_MM, "ultrasound mm per pixel", "0.1"),
    "frame": Bound(0, math.inf, "frame index", "0", integer=True),
    "region": Bound(0, math.inf, "ultrasound region index", "0", integer=True),
    "n_null": Bound(1, MAX_NULL_DRAWS, "number of null draws", "999", integer=True),
    "seed": Bound(0, math.inf, "random seed", "0", integer=True),
}


def _is_number(value: object, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value == int(value)
        )
    return isinstance(value, int | float) and math.isfinite(value)


def check_parameters(**values: Any) -> None:
    """Refuse any value outside its range in :data:`BOUNDS` (``None`` means "not given").

    A sequence (``spacing_mm=(0.1, 0.2)``, ``mpp=(0.25, 0.25)``) is checked element by element.

    Raises
    ------
    wsi.ParameterError (a ValueError) whose ``param`` is the first bad parameter; the message
        names the value, the range and a value that works.
    """
    for name, value in values.items():
        if value is None:
            continue
        bound = BOUNDS[name]
        items = list(value) if isinstance(value, list | tuple) else [value]
        for v in items:
            ok = _is_number(v, bound.integer)
            if ok:
                ok = (v > bound.low if bound.low_open else v >= bound.low) and v <= bound.high
            if not ok:
                raise ParameterError(
                    f"{name}={value!r}: the {bound.what} must be {bound.text()}. Fix: pass such"
                    f" a value, e.g. {name}={bound.example}.",
                    param=name,
                )


def check_density_options(
    bin_um: float,
    min_positive: int = 2,
    *,
    extent_um: tuple[float, float] = LARGEST_SLIDE_UM,
    min_coverage: float = 0.5,
) -> tuple[int, int]:
    """Check a density grid's options; returns its ``(height, width)`` in bins.

    Parameters
    ----------
    bin_um, min_positive, min_coverage : as :func:`density_map` takes them.
    extent_um : (width, height) of the slide in µm; by default the largest glass slide, which
        bounds the grid before any slide is read.

    Raises
    ------
    wsi.ParameterError naming ``bin_um`` when the grid would exceed :data:`MAX_GRID_CELLS` (with
        the smallest bin that fits), or ``min_positive`` when no bin of ``bin_um`` can hold that
        many cells; as :func:`check_parameters` for a value out of range.
    """
    check_parameters(bin_um=bin_um, min_positive=min_positive, min_coverage=min_coverage)
    w_um, h_um = extent_um
    gw, gh = math.ceil(w_um / bin_um), math.ceil(h_um / bin_um)
    if gw * gh > MAX_GRID_CELLS:
        smallest = math.sqrt(w_um * h_um / MAX_GRID_CELLS)
        if smallest > MAX_BIN_UM:
            raise ParameterError(
                f"the slide measures {w_um / 1000:g} x {h_um / 1000:g} mm at its mpp, larger than"
                f" any glass slide: no density bin up to {MAX_BIN_UM:g} µm keeps its grid under "
                f"{MAX_GRID_CELLS:,} bins. Fix: check mpp= (level-0 µm per pixel, e.g. 0.25 at "
                "40x).",
                param="mpp",
            )
        works = max(50.0, math.ceil(smallest))
        raise ParameterError(
            f"bin_um={bin_um:g} cuts a {w_um / 1000:g} x {h_um / 1000:g} mm slide into a "
            f"{gw:,} x {gh:,} grid ({float(gw) * gh:.3g} bins, over {MAX_GRID_CELLS:,}). Fix: "
            f"pass bin_um={works:g} (Saltz TIL maps: 50; at least {smallest:.3g} µm fits).",
            param="bin_um",
        )
    capacity = math.floor(bin_um**2 / MIN_NUCLEUS_AREA_UM2)
    if min_positive > max(capacity, 1):
        raise ParameterError(
            f"min_positive={min_positive} cannot be reached: a {bin_um:g} µm bin holds at most "
            f"{capacity} nuclei of {MIN_NUCLEUS_AREA_UM2:g} µm², so no bin would be TIL-positive."
            f" Fix: pass min_positive={min(2, max(capacity, 1))} (Saltz: 2) or at most "
            f"{max(capacity, 1)}, or a larger bin_um=.",
            param="min_positive",
        )
    return gh, gw


def check_null_options(n_null: int, seed: int, *, n_spots: int = VISIUM_MAX_SPOTS) -> None:
    """Check a spatial null's draws and seed (see :func:`st_validate`).

    Raises
    ------
    wsi.ParameterError naming ``n_null`` (with the memory it implies) or ``seed``.
    """
    try:
        check_parameters(n_null=n_null)
    except ParameterError as exc:
        if _is_number(n_null, True) and n_null > MAX_NULL_DRAWS:
            size = float(n_null) * n_spots * 8
            raise ParameterError(
                f"n_null={n_null} draws of the null over {n_spots:,} spots hold "
                f"{size / 1e9:.3g} GB of indices (at most {MAX_NULL_DRAWS:,} draws: p-values to "
                f"{1 / (MAX_NULL_DRAWS + 1):g}). Fix: pass n_null=999.",
                param="n_null",
            ) from exc
        raise
    check_parameters(seed=seed)
