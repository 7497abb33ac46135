"""``oncotrace immune``, ``map-us`` and ``st-validate``: the spatial stage from the command line.

Each command maps onto library functions in :mod:`spatial`; bad input is one plain error on
stderr and exit code 2 (never a traceback), and outputs are written atomically.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ._batch import check_out_dir, input_problem
from ._failures import DISK_FULL, finish, is_disk_full, usage_error
from ._flags import (
    Fallback,
    GeometryKind,
    NullName,
    RegistrationModel,
    Stain,
    VisiumImage,
    cli_message,
)

if TYPE_CHECKING:
    from oncotrace.spatial import CellTable, MappedHeatmap, Registration, Visium

#: Above this level-0 µm/px nuclei (5–10 µm) span too few pixels to be counted.
COARSE_MPP = 2.0

#: Errors a user can fix from the message alone.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

#: ``--out``, the output folder every spatial command writes into.
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def _parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise typer.BadParameter(
            "--region takes x,y,w,h in level-0 pixels, e.g. 1000,2000,4096,4096"
        )
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError as exc:
        raise typer.BadParameter(f"--region {text!r}: four integers x,y,w,h") from exc
    if w <= 0 or h <= 0:
        raise typer.BadParameter(f"--region {text!r}: width and height must be positive")
    if x < 0 or y < 0:
        raise typer.BadParameter(
            f"--region {text!r}: x and y are level-0 pixels from the slide's top-left corner,"
            " so 0 or more"
        )
    return x, y, w, h


def _spacing(values: list[float] | None) -> float | tuple[float, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    if len(values) == 2:
        return float(values[0]), float(values[1])
    raise typer.BadParameter("--spacing-mm takes one value (square pixels) or two (x then y)")


def load_heatmap_input(path: Path, *, mpp: float | None) -> tuple[Any, str]:
    """A heatmap to map: an OncoTrace ``.ome.zarr`` or a u24 TIL prediction grid (text).

    Returns the :class:`spatial.Heatmap` and a layer name for the outputs.
    """
    from oncotrace.spatial import load_til_grid, read_heatmap

    if path.is_dir():
        heat = read_heatmap(path)
        name = path.name.removesuffix(".ome.zarr").removesuffix(".zarr") or "heatmap"
        return heat, name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such heatmap")
    if mpp is None:
        raise ValueError(
            f"{path}: a TIL prediction grid has no physical scale; pass --heatmap-mpp with the "
            "level-0 µm/px of the slide it was predicted on (e.g. 0.25 for a 40x TCGA slide)"
        )
    til = load_til_grid(path, mpp=mpp)
    return til.primary, "lymphocyte_probability"


def register(app: typer.Typer, console: Console) -> None:
    """Add ``immune``, ``map-us`` and ``st-validate`` to ``app``."""
    _register_immune(app, console)
    _register_map_us(app, console)
    _register_st_validate(app, console)


def _register_immune(app: typer.Typer, console: Console) -> None:
    @app.command()
    def immune(
        slides: Annotated[
            list[Path],
            typer.Argument(help="Slide files, DICOM-WSI folders, images, or folders of them."),
        ],
        out: OutOpt,
        stain: Annotated[
            Stain, typer.Option("--stain", help="he (lymphocytes) or ihc-dab (DAB+ cells).")
        ] = "he",
        mpp: Annotated[
            float | None, typer.Option("--mpp", help="Override the slides' level-0 µm/px.")
        ] = None,
        bin_um: Annotated[
            float, typer.Option("--bin-um", help="Density-map bin side in µm (TIL maps: 50).")
        ] = 50.0,
        min_positive: Annotated[
            int,
            typer.Option(
                "--min-positive", help="Positive cells for a TIL-positive bin (Saltz: 2)."
            ),
        ] = 2,
        region: Annotated[
            str | None, typer.Option("--region", help="x,y,w,h in level-0 px (default: all).")
        ] = None,
        tissue: Annotated[
            bool,
            typer.Option("--tissue/--no-tissue", help="Analyse only detected tissue."),
        ] = True,
        threads: Annotated[int, typer.Option("--threads", help="Threads over tiles.")] = 2,
        geometry: Annotated[
            GeometryKind, typer.Option("--geometry", help="GeoJSON cells as polygon or point.")
        ] = "polygon",
    ) -> None:
        """Detect immune cells, map their density, and write QuPath/OME-Zarr/CSV outputs.

        One slide writes into --out; several (or a folder) write --out/<slide_id>/ each, with
        errors.csv for the ones that failed.
        """
        from oncotrace.spatial import check_density_options, check_parameters

        from ._batch import find_slides, write_errors_csv

        try:  # every number checked once, before any slide is read
            check_parameters(mpp=mpp, threads=threads)
            check_density_options(bin_um, min_positive)
            check_out_dir(out)
        except ValueError as exc:
            raise usage_error(exc) from exc
        box = _parse_region(region)
        paths = find_slides(slides)
        if not paths:
            typer.echo(f"error: no slides found in {', '.join(map(str, slides))}.", err=True)
            raise typer.Exit(2)
        single = len(slides) == 1 and paths == [slides[0]]
        options: dict[str, Any] = {
            "stain": stain,
            "mpp": mpp,
            "region": box,
            "tissue": tissue,
            "threads": threads,
            "bin_um": bin_um,
            "min_positive": min_positive,
            "geometry": geometry,
        }
        if single:
            t0 = time.perf_counter()
            try:
                positive_class, summary_path = _run_immune(paths[0], out, **options)
            except _USER_ERRORS as exc:
                raise usage_error(exc) from exc
            console.print(_immune_line(positive_class, summary_path, time.perf_counter() - t0))
            return
        errors = _immune_batch(console, paths, out, options)
        write_errors_csv(out / "errors.csv", errors)
        console.print(f"{len(paths) - len(errors)} slide(s) analysed, {len(errors)} failed → {out}")
        finish(errors, errors_csv=out / "errors.csv")


def _immune_batch(
    console: Console, paths: list[Path], out: Path, options: dict[str, Any]
) -> list[dict[str, str]]:
    """Each slide into ``out/<slide_id>/``; a failure is one errors.csv row and the rest go on."""
    from oncotrace.wsi import SlideError, slide_id_for

    errors: list[dict[str, str]] = []
    used: dict[str, Path] = {}
    for path in paths:
        sid = slide_id_for(path)
        if sid in used:
            errors.append(
                {
                    "slide": str(path),
                    "stage": "open",
                    "error_type": "DuplicateSlideId",
                    "message": f"{path}: slide id {sid!r} is already used by {used[sid]}."
                    " Fix: rename one of the files; outputs are named by file stem.",
                }
            )
            continue
        problem = input_problem(path)  # a broken link, a folder named like a slide: as tile says
        if problem is not None:
            errors.append(
                {"slide": str(path), "stage": "open", "error_type": problem[0],
                 "message": problem[1]}
            )  # fmt: skip
            continue
        used[sid] = path
        t0 = time.perf_counter()
        try:
            positive_class, summary_path = _run_immune(path, out / sid, **options)
        except (*_USER_ERRORS, SlideError, OSError, RuntimeError) as exc:
            errors.append(
                {
                    "slide": str(path),
                    "stage": "immune",
                    "error_type": DISK_FULL if is_disk_full(exc) else type(exc).__name__,
                    "message": cli_message(exc),
                }
            )
            continue
        line = _immune_line(positive_class, summary_path, time.perf_counter() - t0)
        console.print(f"{sid}: {line}")
    return errors


def _immune_line(positive_class: str, summary_path: Path, seconds: float) -> str:
    summary = json.loads(summary_path.read_text())
    return (
        f"{summary['n_cells']} cells, {summary['n_positive']} {positive_class} "
        f"({summary['positive_percent']:.1f} %), {summary['cells_per_mm2']:.0f} cells/mm² over "
        f"{summary['tissue_area_mm2']:.2f} mm² of tissue in {seconds:.1f} s → "
        f"{summary_path.parent}"
    )


def _run_immune(
    slide: Path,
    out: Path,
    *,
    stain: Stain,
    mpp: float | None,
    region: tuple[int, int, int, int] | None,
    tissue: bool,
    threads: int,
    bin_um: float,
    min_positive: int,
    geometry: GeometryKind,
) -> tuple[str, Path]:
    """Detect, map and write; returns the positive class's name and the ``summary.json`` path."""
    from oncotrace.spatial import density_map, detect_immune_cells, write_immune_outputs

    cells = detect_immune_cells(
        slide,
        stain=stain,
        mpp=mpp,
        region=region,
        tissue=tissue,
        workers=threads,
    )
    density = density_map(cells, bin_um=bin_um, min_positive=min_positive)
    paths = write_immune_outputs(out, cells, density, geometry=geometry)
    return cells.positive_class, paths["summary.json"]


def _register_map_us(app: typer.Typer, console: Console) -> None:
    @app.command("map-us")
    def map_us(
        heatmap: Annotated[
            Path,
            typer.Option(
                "--heatmap",
                help="attention.ome.zarr / density.ome.zarr, or a u24 TIL grid (with --heatmap-mpp).",
            ),
        ],
        ultrasound: Annotated[
            Path, typer.Option("--ultrasound", help="Ultrasound DICOM (or PNG/JPEG).")
        ],
        landmarks: Annotated[
            Path, typer.Option("--landmarks", help="landmarks.json or .csv (see README).")
        ],
        out: OutOpt,
        frame: Annotated[
            int | None, typer.Option("--frame", help="Frame of a multi-frame (cine) file.")
        ] = None,
        region: Annotated[
            int | None,
            typer.Option("--region", help="SequenceOfUltrasoundRegions index, if several."),
        ] = None,
        spacing_mm: Annotated[
            list[float] | None,
            typer.Option(
                "--spacing-mm",
                help="Ultrasound mm/px (required for PNG/JPEG and uncalibrated DICOM).",
            ),
        ] = None,
        heatmap_mpp: Annotated[
            float | None,
            typer.Option("--heatmap-mpp", help="Level-0 µm/px for a TIL grid heatmap."),
        ] = None,
        model: Annotated[
            RegistrationModel,
            typer.Option("--model", help="auto (by leave-one-out TRE), affine or tps."),
        ] = "auto",
        allow_reflection: Annotated[
            bool,
            typer.Option("--allow-reflection", help="Accept a mirrored pathology orientation."),
        ] = False,
        name: Annotated[
            str | None, typer.Option("--name", help="Layer name [default: from the heatmap].")
        ] = None,
        alpha: Annotated[float, typer.Option("--alpha", help="Overlay opacity.")] = 0.5,
    ) -> None:
        """Register the slide to the ultrasound by landmarks and resample a heatmap onto it."""
        from oncotrace.spatial import check_parameters

        spacing = _spacing(spacing_mm)
        try:  # every number checked once, before any file is read
            check_parameters(
                frame=frame,
                region=region,
                spacing_mm=spacing,
                slide_mpp=heatmap_mpp,
                alpha=alpha,
            )
            check_out_dir(out)
        except ValueError as exc:
            raise usage_error(exc) from exc
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reg, mapped = _run_map_us(
                    heatmap,
                    ultrasound,
                    landmarks,
                    out,
                    frame=frame,
                    region=region,
                    spacing=spacing,
                    heatmap_mpp=heatmap_mpp,
                    model=model,
                    allow_reflection=allow_reflection,
                    name=name,
                    alpha=alpha,
                )
            except _USER_ERRORS as exc:
                raise usage_error(exc) from exc
        console.print(_map_us_summary(reg, mapped, out, time.perf_counter() - t0))
        for warning in dict.fromkeys(
            [str(w.message) for w in caught] + list(reg.report.get("warnings") or [])
        ):
            console.print(f"[yellow]warning:[/yellow] {warning}")


def _run_map_us(
    heatmap: Path,
    ultrasound: Path,
    landmarks: Path,
    out: Path,
    *,
    frame: int | None,
    region: int | None,
    spacing: float | tuple[float, float] | None,
    heatmap_mpp: float | None,
    model: RegistrationModel,
    allow_reflection: bool,
    name: str | None,
    alpha: float,
) -> tuple[Registration, MappedHeatmap]:
    """Load the heatmap, ultrasound and landmarks, fit the registration and write the mapping."""
    from oncotrace.spatial import fit_landmarks, load_landmarks, read_ultrasound, to_ultrasound

    heat, default_name = load_heatmap_input(heatmap, mpp=heatmap_mpp)
    us = read_ultrasound(ultrasound, frame=frame, region=region, spacing_mm=spacing)
    marks = load_landmarks(
        landmarks,
        slide_mpp=heat.mpp,
        us_spacing_mm=us.spacing_mm,
        slide_size_px=heat.level0_size,
        us_size_px=us.size_px,
    )
    bin_um = float(min(heat.cell_size_um))
    reg = fit_landmarks(
        marks,
        model=model,
        allow_reflection=allow_reflection,
        bin_um=bin_um,
    )
    if heat.value_unit is None:
        warnings.warn(
            f"{heatmap} records no unit for its values, so the outputs show bare numbers; write"
            " it with one (spatial.write_ome_zarr(..., unit=...)) to have them labelled.",
            UserWarning,
            stacklevel=2,
        )
    mapped = to_ultrasound(
        heat, reg, us, out, name=name or default_name, alpha=alpha, unit=heat.value_unit
    )
    return reg, mapped


def _map_us_summary(reg: Registration, mapped: MappedHeatmap, out: Path, seconds: float) -> str:
    """The one-line result of ``map-us``: the fit, its accuracy and the written grid."""
    rep = reg.report
    hold = rep.get("holdout_tre_mm") or {}
    hold_txt = (
        f", hold-out TRE {hold['mean']:.2f} mm (n={rep['n_holdout']})"
        if hold.get("mean") is not None
        else ""
    )
    loo = rep["chosen"]["loo_tre_mm"]
    unit = f", values in {mapped.unit}" if mapped.unit is not None else ""
    return (
        f"{reg.model} fit on {rep['n_fit']} landmarks: leave-one-out TRE {loo:.2f} mm"
        f"{hold_txt}; scale {rep['scale_mm_per_mm']:.2f} mm/mm → {out} "
        f"({mapped.grid.shape[1]}×{mapped.grid.shape[0]} px{unit}, {seconds:.1f} s)"
    )


def _register_st_validate(app: typer.Typer, console: Console) -> None:
    @app.command("st-validate")
    def st_validate_cmd(
        slide: Annotated[
            Path,
            typer.Option(
                "--slide", help="The H&E image Space Ranger was given (or its hires/lowres PNG)."
            ),
        ],
        visium: Annotated[
            Path, typer.Option("--visium", help="Space Ranger outs/ folder (spatial/ + .h5).")
        ],
        out: OutOpt,
        image: Annotated[
            VisiumImage,
            typer.Option(
                "--image", help="Which Space Ranger image --slide is: fullres, hires, lowres."
            ),
        ] = "fullres",
        stain: Annotated[Stain, typer.Option("--stain", help="he or ihc-dab.")] = "he",
        mpp: Annotated[
            float | None,
            typer.Option(
                "--mpp", help="Slide µm/px [default: from the file, else from the 55 µm spots]."
            ),
        ] = None,
        cells_csv: Annotated[
            Path | None,
            typer.Option("--cells", help="cells.csv from `oncotrace immune` instead of detecting."),
        ] = None,
        genes: Annotated[
            str | None,
            typer.Option("--genes", help="Comma-separated immune genes (symbols or Ensembl ids)."),
        ] = None,
        fallback: Annotated[
            Fallback | None,
            typer.Option(
                "--fallback",
                help="total-counts: score spots by log1p(total counts) when no immune gene is present.",
            ),
        ] = None,
        null: Annotated[
            NullName,
            typer.Option("--null", help="Spatial null: toroidal shifts or block permutation."),
        ] = "toroidal",
        n_null: Annotated[int, typer.Option("--n-null", help="Null draws.")] = 999,
        seed: Annotated[int, typer.Option("--seed")] = 0,
    ) -> None:
        """Detected immune cells per Visium spot vs an immune gene score, with spatial nulls."""
        from oncotrace.spatial import check_null_options, check_parameters

        try:  # every number checked once, before the slide is read or cells detected
            check_parameters(mpp=mpp)
            check_out_dir(out)
            check_null_options(n_null, seed)
        except ValueError as exc:
            raise usage_error(exc) from exc
        gene_list = _gene_list(genes)
        t0 = time.perf_counter()
        try:
            report, paths, n_cells = _run_st_validate(
                slide,
                visium,
                out,
                image=image,
                stain=stain,
                mpp=mpp,
                cells_csv=cells_csv,
                genes=gene_list,
                fallback=fallback,
                null=null,
                n_null=n_null,
                seed=seed,
            )
        except _USER_ERRORS as exc:
            raise usage_error(exc) from exc
        rho = report.get("spearman", {})
        console.print(
            f"{report['n_spots']} spots, {n_cells} cells: Spearman ρ = "
            f"{_fmt(rho.get('rho'))} (naive p {_fmt(rho.get('p_naive'))}, {null} p "
            f"{_fmt(rho.get('p_spatial'))}) in {time.perf_counter() - t0:.1f} s → "
            f"{paths['json']}"
        )
        for warning in report.get("warnings") or []:
            console.print(f"[yellow]warning:[/yellow] {warning}")


def _gene_list(genes: str | None) -> tuple[str, ...]:
    """``--genes`` as a tuple of names, or the default immune panel when it is not given."""
    from oncotrace.spatial import DEFAULT_IMMUNE_GENES

    if genes:
        return tuple(g.strip() for g in genes.split(",") if g.strip())
    return DEFAULT_IMMUNE_GENES


def _run_st_validate(
    slide: Path,
    visium: Path,
    out: Path,
    *,
    image: VisiumImage,
    stain: Stain,
    mpp: float | None,
    cells_csv: Path | None,
    genes: tuple[str, ...],
    fallback: Fallback | None,
    null: NullName,
    n_null: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Read, detect (or load) cells, test them against the gene score and write the report.

    Returns the report, the written paths and the number of cells.
    """
    import numpy as np
    from oncotrace.spatial import (
        immune_gene_score,
        read_visium,
        st_validate,
        visium_image_scale,
        write_st_report,
    )

    vis = read_visium(visium)
    scale = visium_image_scale(vis, image)
    # fail on the genes before spending minutes on detection
    immune_gene_score(vis, genes, fallback=fallback)
    cells = _st_cells(slide, vis, scale, stain=stain, mpp=mpp, cells_csv=cells_csv)
    xy = np.column_stack([cells.x, cells.y])
    report = st_validate(
        xy,
        cells.positive,
        vis,
        slide_to_fullres=scale,
        slide_size_level0=cells.level0_size,
        genes=genes,
        fallback=fallback,
        n_null=n_null,
        null=null,
        seed=seed,
    )
    report["warnings"] = _coarse_warnings(cells) + list(report.get("warnings") or [])
    report["slide"] = str(slide)
    report["image"] = image
    paths = write_st_report(report, out)
    return report, paths, len(cells)


def _st_cells(
    slide: Path,
    vis: Visium,
    scale: float,
    *,
    stain: Stain,
    mpp: float | None,
    cells_csv: Path | None,
) -> CellTable:
    """The cells to count per spot: ``--cells`` if given, else detected on ``slide``."""
    from oncotrace.spatial import CellTable, detect_immune_cells
    from oncotrace.wsi import MppError

    if cells_csv is not None:
        return CellTable.from_csv(cells_csv)
    try:
        return detect_immune_cells(slide, stain=stain, mpp=mpp)
    except MppError:
        if mpp is not None:
            raise
        # the 55 µm spots fix the image's scale when the file carries none (PNGs);
        # open_slide raises this before any detection work
        spot_mpp = vis.mpp_fullres * scale
        return detect_immune_cells(slide, stain=stain, mpp=spot_mpp)


def _coarse_warnings(cells: CellTable) -> list[str]:
    """A warning when the slide is too coarse for its cell counts to mean anything."""
    if max(cells.mpp) > COARSE_MPP:
        return [
            f"the slide is {max(cells.mpp):.2f} µm/px: nuclei are not resolved above "
            f"{COARSE_MPP:g} µm/px, so its cell counts are not a measurement; run on the "
            "full-resolution image Space Ranger was given (--image fullres)"
        ]
    return []


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)
