"""Phantom cohorts: small slides whose class lives only in planted regions, with the truth on disk.

A cohort is a folder::

    slides/<slide_id>.tif     JPEG-tiled pyramidal TIFF (levels ×1, ×4, ×16), mpp in its tags
    masks/<slide_id>.png      where the class-carrying morphology was planted (0/255), at
                              ``mask_downsample`` (level-0 px per mask px)
    labels.csv                slide_id, patient_id, site, label, age, sex
    cohort.json               everything above, the generator's arguments and per-slide truth

Every slide is H&E-like tissue (:func:`wsi.synthetic.he_texture`) on glass. Inside a few regions
(``region_fraction`` of the tissue area) the class morphology replaces it:

``gland``     rings of small, regular nuclei around pale lumens (benign-looking glands)
``sheet``     sheets of large, dark, crowded, pleomorphic nuclei
``spindle``   elongated nuclei aligned in streams

Everything a slide-level shortcut could use is drawn independently of the class: tissue
fraction and region fraction are stratified so every class gets the same spread, sites are
dealt out evenly within each class, and the mpp, size, background texture and JPEG settings
are shared. The class can only be read from the tiles inside the planted regions.

``mode="smear"`` draws cytology-style cell clusters on glass (Pap-like colours) instead of
tissue; a subset of the clusters carries the class morphology.

Nothing here is imported by the pipeline; it exists for tests, benchmarks and the demo.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from oncotrace import __version__
from oncotrace.wsi.synthetic import BACKGROUND, he_texture, write_pyramid_tiff
from PIL import Image
from scipy import ndimage

Mode = Literal["tissue", "smear"]
Morphology = Literal["gland", "sheet", "spindle"]

COHORT_FORMAT = 1
MASK_DOWNSAMPLE = 4
#: Which morphology each class gets, by class name; unknown names take :data:`_MORPH_ORDER`.
DEFAULT_MORPHOLOGY: dict[str, Morphology] = {
    "benign": "gland",
    "normal": "gland",
    "malignant": "sheet",
    "carcinoma": "sheet",
    "sarcoma": "spindle",
    "mesenchymal": "spindle",
}
_MORPH_ORDER: tuple[Morphology, ...] = ("gland", "sheet", "spindle")
_TISSUE_FRACTION = (0.30, 0.55)  # of the slide area
_SMEAR_FRACTION = (0.15, 0.30)
_BORDER_PX = 48  # level-0 px of glass kept round the slide edge

# RGB colours. "H&E" for tissue, "pap" for smears.
_PALETTES: dict[str, dict[str, tuple[float, float, float]]] = {
    "he": {
        "cytoplasm": (208, 142, 188),
        "stroma": (226, 152, 196),
        "epithelium": (224, 166, 204),
        "lumen": (246, 236, 242),
        "nucleus": (112, 62, 150),
        "dark_nucleus": (62, 28, 102),
        "spindle_nucleus": (92, 46, 134),
    },
    "pap": {
        "glass": (236, 240, 243),
        "cytoplasm": (178, 208, 204),
        "stroma": (190, 214, 208),
        "epithelium": (200, 220, 214),
        "lumen": (234, 238, 240),
        "nucleus": (104, 96, 150),
        "dark_nucleus": (48, 40, 98),
        "spindle_nucleus": (80, 70, 130),
    },
}


@dataclass(frozen=True)
class Cohort:
    """A generated cohort on disk; one entry per slide in every per-slide tuple.

    Attributes
    ----------
    root : the cohort folder (holds ``cohort.json``).
    slide_ids, slide_paths, patient_ids, sites : per slide.
    labels : (S,) int64 ndarray, index into ``class_names``: the recorded label (labels.csv).
    planted_labels : (S,) int64 ndarray, the class whose morphology was planted; differs from
        ``labels`` for the patients ``label_noise`` relabelled.
    class_names : class of each label index.
    morphologies : planted morphology of each class.
    labels_csv : ``root / "labels.csv"``.
    mpp : level-0 µm/px of every slide.
    size_px : level-0 ``(width, height)`` of every slide.
    mask_downsample : level-0 px per region-mask px.
    mode : ``"tissue"`` or ``"smear"``.
    """

    root: Path
    slide_ids: tuple[str, ...]
    slide_paths: tuple[Path, ...]
    patient_ids: tuple[str, ...]
    sites: tuple[str, ...]
    labels: np.ndarray
    planted_labels: np.ndarray
    class_names: tuple[str, ...]
    morphologies: tuple[str, ...]
    labels_csv: Path
    mpp: float
    size_px: tuple[int, int]
    mask_downsample: int
    mode: Mode

    def __len__(self) -> int:
        return len(self.slide_ids)

    @classmethod
    def load(cls, root: str | Path) -> Cohort:
        """Read a cohort written by :func:`make_cohort` from its ``cohort.json``."""
        root = Path(root)
        meta_path = root / "cohort.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found; point Cohort.load at a folder written by make_cohort."
            )
        meta = json.loads(meta_path.read_text())
        slides = meta["slides"]
        return cls(
            root=root,
            slide_ids=tuple(s["slide_id"] for s in slides),
            slide_paths=tuple(root / s["path"] for s in slides),
            patient_ids=tuple(s["patient_id"] for s in slides),
            sites=tuple(s["site"] for s in slides),
            labels=np.asarray([s["label_index"] for s in slides], np.int64),
            planted_labels=np.asarray(
                [s.get("planted_label_index", s["label_index"]) for s in slides], np.int64
            ),
            class_names=tuple(meta["classes"]),
            morphologies=tuple(meta["morphologies"]),
            labels_csv=root / "labels.csv",
            mpp=float(meta["mpp"]),
            size_px=(int(meta["size_px"][0]), int(meta["size_px"][1])),
            mask_downsample=int(meta["mask_downsample"]),
            mode=meta["mode"],
        )

    def _index(self, slide_id: str) -> int:
        try:
            return self.slide_ids.index(slide_id)
        except ValueError:
            raise KeyError(
                f"slide {slide_id!r} is not in the cohort at {self.root}; "
                f"known ids look like {self.slide_ids[:3]}."
            ) from None

    def label_of(self, slide_id: str) -> str:
        """Class name of one slide."""
        return self.class_names[int(self.labels[self._index(slide_id)])]

    def region_mask(self, slide_id: str) -> tuple[np.ndarray, int]:
        """Where the class morphology was planted.

        Returns
        -------
        mask : (ceil(H / ds), ceil(W / ds)) bool ndarray; pixel ``(r, c)`` covers level-0
            ``x in [c * ds, (c + 1) * ds)``, ``y in [r * ds, (r + 1) * ds)``.
        downsample : ``ds``, level-0 px per mask px.
        """
        self._index(slide_id)
        path = self.root / "masks" / f"{slide_id}.png"
        return np.asarray(Image.open(path)) > 127, self.mask_downsample

    def tile_in_region(
        self,
        slide_id: str,
        coords: np.ndarray,
        tile_size_level0: int,
        *,
        min_fraction: float = 0.5,
    ) -> np.ndarray:
        """Which tiles lie (at least ``min_fraction`` of their area) inside the planted region.

        Parameters
        ----------
        coords : (N, 2) int64 ndarray of level-0 ``(x, y)`` tile top-left corners.
        tile_size_level0 : tile side in level-0 px (``tile_px * target_mpp / mpp``).

        Returns
        -------
        (N,) bool ndarray.
        """
        return self.region_fraction_of_tiles(slide_id, coords, tile_size_level0) >= min_fraction

    def region_fraction_of_tiles(
        self, slide_id: str, coords: np.ndarray, tile_size_level0: int
    ) -> np.ndarray:
        """(N,) float64 fraction of each tile's area inside the planted region."""
        mask, ds = self.region_mask(slide_id)
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        if tile_size_level0 <= 0:
            raise ValueError(f"tile_size_level0 must be positive, got {tile_size_level0}.")
        sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
        sat[1:, 1:] = mask.cumsum(0).cumsum(1)
        gh, gw = mask.shape
        x0 = np.clip(np.rint(coords[:, 0] / ds).astype(np.int64), 0, gw)
        y0 = np.clip(np.rint(coords[:, 1] / ds).astype(np.int64), 0, gh)
        x1 = np.clip(np.rint((coords[:, 0] + tile_size_level0) / ds).astype(np.int64), 0, gw)
        y1 = np.clip(np.rint((coords[:, 1] + tile_size_level0) / ds).astype(np.int64), 0, gh)
        inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        return inside / (tile_size_level0 / ds) ** 2


def make_cohort(
    out_dir: str | Path,
    *,
    n_cases: int = 40,
    classes: Sequence[str] = ("benign", "malignant"),
    slides_per_patient: tuple[int, int] = (1, 2),
    sites: Sequence[str] = ("A", "B", "C"),
    size_px: tuple[int, int] = (3072, 2048),
    mpp: float = 0.5,
    region_fraction: tuple[float, float] = (0.12, 0.25),
    seed: int = 0,
    mode: Mode = "tissue",
    morphologies: Sequence[Morphology] | None = None,
    workers: int = 2,
    label_noise: float = 0.0,
) -> Cohort:
    """Write a phantom cohort of pyramidal TIFF slides with planted, class-specific regions.

    Parameters
    ----------
    out_dir : folder to write (created; existing files of the same names are overwritten).
    n_cases : patients, dealt evenly over ``classes``.
    classes : class names; label index ``i`` is ``classes[i]``.
    slides_per_patient : inclusive ``(min, max)`` slides per patient; all share its label.
    sites : sites, dealt evenly within each class so site does not predict class.
    size_px : level-0 ``(width, height)`` of every slide.
    mpp : level-0 µm/px of every slide; planted sizes are in µm.
    region_fraction : ``(min, max)`` fraction of the tissue area carrying the class morphology,
        spread the same way in every class.
    seed : RNG seed; the same arguments write byte-identical files.
    mode : ``"tissue"`` (H&E sections) or ``"smear"`` (cytology-style cell clusters).
    morphologies : morphology per class; default from :data:`DEFAULT_MORPHOLOGY` by name,
        else ``gland, sheet, spindle`` in order.
    workers : slides rendered in parallel worker processes (1: in this process).
    label_noise : fraction of patients (rounded) whose recorded label is another class than the
        morphology planted in their slides (the next class in ``classes``), as diagnostic
        disagreement makes real labels imperfect; the planted class is kept in
        ``cohort.json`` and :attr:`Cohort.planted_labels`.

    Returns
    -------
    Cohort
    """
    classes, sites = tuple(classes), tuple(sites)
    _check_cohort_args(classes, n_cases, sites, slides_per_patient, region_fraction, mode, size_px)
    morphs = _resolve_morphologies(classes, morphologies)
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)

    # a third stream for the relabelling: the first two (and so the slides) do not change
    design_seed, slides_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(design_seed)
    rows = _design_patients(rng, n_cases, classes, sites, slides_per_patient)
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must lie in [0, 0.5), got {label_noise}.")
    _relabel(np.random.default_rng(noise_seed), rows, classes, round(label_noise * n_cases))
    labels = np.asarray([r["planted_label_index"] for r in rows], np.int64)
    tf_range = _TISSUE_FRACTION if mode == "tissue" else _SMEAR_FRACTION
    tissue_fracs = _stratified(rng, labels, tf_range)
    region_fracs = _stratified(rng, labels, region_fraction)
    slide_seeds = slides_seed.spawn(len(rows))
    jobs = [
        _Job(
            out,
            str(row["slide_id"]),
            (size_px[0], size_px[1]),
            mpp,
            morphs[int(row["planted_label_index"])],  # type: ignore[call-overload]
            slide_seeds[i],
            mode,
            float(tissue_fracs[i]),
            float(region_fracs[i]),
        )
        for i, row in enumerate(rows)
    ]
    _render_all(jobs, workers)

    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, ["slide_id", "patient_id", "site", "label", "age", "sex"], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "format": COHORT_FORMAT,
        "generator": "oncotrace.mil.phantom.make_cohort",
        "version": __version__,
        "mode": mode,
        "mpp": mpp,
        "size_px": list(size_px),
        "classes": list(classes),
        "morphologies": list(morphs),
        "tasks": ["label"],
        "covariates": ["age", "sex"],
        "mask_downsample": MASK_DOWNSAMPLE,
        "mask_dir": "masks",
        "mask_meaning": "255 where the class morphology was planted; pixel (r, c) covers"
        " level-0 x in [c*ds, (c+1)*ds), y in [r*ds, (r+1)*ds)",
        "arguments": {
            "n_cases": n_cases,
            "slides_per_patient": list(slides_per_patient),
            "sites": list(sites),
            "region_fraction": list(region_fraction),
            "label_noise": label_noise,
            "seed": seed,
        },
        "slides": [
            {
                **{
                    k: r[k]
                    for k in (
                        "slide_id",
                        "patient_id",
                        "site",
                        "label",
                        "label_index",
                        "planted_label",
                        "planted_label_index",
                    )
                },
                "path": f"slides/{r['slide_id']}.tif",
                "mask": f"masks/{r['slide_id']}.png",
                "tissue_fraction_planted": round(float(tissue_fracs[i]), 4),
                "region_fraction_planted": round(float(region_fracs[i]), 4),
            }
            for i, r in enumerate(rows)
        ],
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=1))
    return Cohort.load(out)


def _check_cohort_args(
    classes: tuple[str, ...],
    n_cases: int,
    sites: tuple[str, ...],
    slides_per_patient: tuple[int, int],
    region_fraction: tuple[float, float],
    mode: str,
    size_px: tuple[int, int],
) -> None:
    """Refuse arguments :func:`make_cohort` cannot honour (ValueError naming the argument)."""
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be ≥ 2 distinct names, got {classes}.")
    if n_cases < len(classes):
        raise ValueError(f"n_cases={n_cases} is fewer than the {len(classes)} classes.")
    if not sites:
        raise ValueError("sites must name at least one site, e.g. sites=('A',).")
    lo_s, hi_s = slides_per_patient
    if not 1 <= lo_s <= hi_s:
        raise ValueError(
            f"slides_per_patient must be (min, max) with 1 ≤ min ≤ max, got {slides_per_patient}."
        )
    lo_r, hi_r = region_fraction
    if not 0.0 < lo_r <= hi_r < 1.0:
        raise ValueError(
            f"region_fraction must be (min, max) inside (0, 1), got {region_fraction}."
        )
    if mode not in ("tissue", "smear"):
        raise ValueError(f"mode must be 'tissue' or 'smear', got {mode!r}.")
    if min(size_px) < 512:
        raise ValueError(f"size_px={size_px} is too small; use at least 512 × 512.")


def _design_patients(
    rng: np.random.Generator,
    n_cases: int,
    classes: tuple[str, ...],
    sites: tuple[str, ...],
    slides_per_patient: tuple[int, int],
) -> list[dict[str, object]]:
    """One row per slide: patients' classes dealt round-robin then shuffled, sites dealt evenly
    within each class (so site does not predict class), ages, sexes, slides per patient."""
    patient_label = rng.permutation(np.arange(n_cases) % len(classes))
    patient_site = np.empty(n_cases, np.int64)
    for c in range(len(classes)):
        idx = np.flatnonzero(patient_label == c)
        patient_site[idx] = rng.permutation(np.resize(rng.permutation(len(sites)), idx.size))
    ages = np.clip(np.rint(rng.normal(63, 11, n_cases)), 25, 95).astype(int)
    sexes = rng.choice(["F", "M"], n_cases)
    n_slides = rng.integers(slides_per_patient[0], slides_per_patient[1] + 1, n_cases)
    rows: list[dict[str, object]] = []
    for p in range(n_cases):
        for j in range(int(n_slides[p])):
            rows.append(
                {
                    "slide_id": f"P{p:03d}_S{j + 1}",
                    "patient_id": f"P{p:03d}",
                    "site": sites[patient_site[p]],
                    "label_index": int(patient_label[p]),
                    "label": classes[patient_label[p]],
                    "age": int(ages[p]),
                    "sex": str(sexes[p]),
                }
            )
    return rows


def _relabel(
    rng: np.random.Generator, rows: list[dict[str, object]], classes: tuple[str, ...], k: int
) -> None:
    """Record ``planted_label*`` on every row, then give ``k`` random patients the next class's
    label (all their slides alike)."""
    for r in rows:
        r["planted_label_index"] = r["label_index"]
        r["planted_label"] = r["label"]
    patients = sorted({str(r["patient_id"]) for r in rows})
    flipped = set(rng.choice(patients, size=k, replace=False).tolist()) if k else set()
    for r in rows:
        if r["patient_id"] in flipped:
            j = (int(r["label_index"]) + 1) % len(classes)  # type: ignore[call-overload]
            r["label_index"], r["label"] = j, classes[j]


def _render_all(jobs: Sequence[_Job], workers: int) -> None:
    """Render every slide, in ``workers`` processes when there is more than one."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: safe when the caller already runs threads (fork is not), cheap to start.
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            list(pool.map(_render_job, jobs))
    else:
        for job in jobs:
            _render_job(job)


@dataclass(frozen=True)
class _Job:
    out: Path
    slide_id: str
    size: tuple[int, int]
    mpp: float
    morphology: Morphology
    seed: np.random.SeedSequence
    mode: Mode
    tissue_fraction: float
    region_fraction: float


def _render_job(job: _Job) -> None:
    img, region = _render_slide(
        job.size,
        job.mpp,
        job.morphology,
        np.random.default_rng(job.seed),
        mode=job.mode,
        tissue_fraction=job.tissue_fraction,
        region_fraction=job.region_fraction,
    )
    write_pyramid_tiff(
        job.out / "slides" / f"{job.slide_id}.tif",
        img,
        mpp=job.mpp,
        levels=3,
        factor=4,
        compression="jpeg",
        description="OncoTrace phantom slide",
    )
    Image.fromarray(region.astype(np.uint8) * 255).save(job.out / "masks" / f"{job.slide_id}.png")


def _resolve_morphologies(
    classes: tuple[str, ...], morphologies: Sequence[Morphology] | None
) -> tuple[Morphology, ...]:
    if morphologies is not None:
        morphs = tuple(morphologies)
        if len(morphs) != len(classes) or any(m not in _MORPH_ORDER for m in morphs):
            raise ValueError(
                f"morphologies must give one of {_MORPH_ORDER} per class ({len(classes)}),"
                f" got {morphs}."
            )
    else:
        free = [m for m in _MORPH_ORDER if m not in {DEFAULT_MORPHOLOGY.get(c) for c in classes}]
        morphs = tuple(
            DEFAULT_MORPHOLOGY[c] if c in DEFAULT_MORPHOLOGY else free.pop(0) if free else "sheet"
            for c in classes
        )
    if len(set(morphs)) != len(morphs):
        raise ValueError(
            f"classes {classes} would share morphologies {morphs}; at most 3 classes are"
            " distinguishable — pass morphologies=... with one distinct morphology per class."
        )
    return morphs


def _stratified(
    rng: np.random.Generator, labels: np.ndarray, bounds: tuple[float, float]
) -> np.ndarray:
    """One value per slide in ``bounds``, evenly stratified within each class."""
    lo, hi = bounds
    out = np.empty(labels.size)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        q = (rng.permutation(idx.size) + rng.uniform(0, 1, idx.size)) / idx.size
        out[idx] = lo + (hi - lo) * q
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance noise smooth on the scale ``sigma``; drawn coarse and zoomed up (fast)."""
    f = max(1, int(sigma // 4))
    coarse = (-(-shape[0] // f), -(-shape[1] // f))
    n = ndimage.gaussian_filter(rng.normal(size=coarse), sigma / f, mode="wrap")
    if f > 1:
        n = ndimage.zoom(n, f, order=1)[: shape[0], : shape[1]]
    return n / (n.std() + 1e-9)


def _ellipse_field(
    shape: tuple[int, int],
    centres: np.ndarray,
    axes: np.ndarray,
    angles: np.ndarray,
) -> np.ndarray:
    """max over ellipses of ``1 - r²`` (r = normalised elliptical radius) on a grid."""
    gy, gx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    field = np.full(shape, -np.inf, np.float32)
    for (cy, cx), (a, b), t in zip(centres, axes, angles, strict=True):
        dx, dy = gx - cx, gy - cy
        u = (dx * math.cos(t) + dy * math.sin(t)) / a
        v = (-dx * math.sin(t) + dy * math.cos(t)) / b
        np.maximum(field, 1.0 - (u * u + v * v), out=field)
    return field


def _threshold_to_fraction(field: np.ndarray, allowed: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of ``allowed`` cells where ``field`` is highest."""
    vals = field[allowed]
    k = max(1, round(fraction * vals.size))
    thr = np.partition(vals, vals.size - k)[vals.size - k]
    return allowed & (field >= thr)


def _tissue_grid(
    rng: np.random.Generator, shape: tuple[int, int], fraction: float, border: int
) -> np.ndarray:
    """Tissue mask on the mask grid: 1–3 wobbly ellipses, exactly ``fraction`` of the slide."""
    gh, gw = shape
    k = int(rng.integers(1, 4))
    centres = np.column_stack(
        [rng.uniform(0.3, 0.7, k) * gh, (np.arange(k) + rng.uniform(0.3, 0.7, k)) / k * gw]
    )
    scale = math.sqrt(fraction * gh * gw / (k * math.pi)) * 1.3
    axes = np.column_stack([scale * rng.uniform(0.9, 1.4, k), scale * rng.uniform(0.6, 1.0, k)])
    field = _ellipse_field(shape, centres, axes, rng.uniform(0, math.pi, k))
    field += 0.35 * _smooth_noise(rng, shape, max(2.0, min(shape) / 25)).astype(np.float32)
    allowed = np.zeros(shape, bool)
    allowed[border:-border, border:-border] = True
    return _threshold_to_fraction(field, allowed, fraction)


def _smear_grid(
    rng: np.random.Generator,
    shape: tuple[int, int],
    fraction: float,
    border: int,
    ds: int,
    mpp: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell clusters on the mask grid: a labelled image of round blobs covering ``fraction``."""
    gh, gw = shape
    r_px = rng.uniform(50, 130, 400) / mpp / ds  # cluster radii, mask px
    labels = np.zeros(shape, np.int32)
    gy, gx = np.ogrid[0:gh, 0:gw]
    target = fraction * gh * gw
    for n, r in enumerate(r_px, start=1):
        cy = rng.uniform(border + r, gh - border - r)
        cx = rng.uniform(border + r, gw - border - r)
        a, b, t = r * rng.uniform(1.0, 1.5), r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
        dx, dy = gx - cx, gy - cy
        inside = ((dx * math.cos(t) + dy * math.sin(t)) / a) ** 2 + (
            (-dx * math.sin(t) + dy * math.cos(t)) / b
        ) ** 2 <= 1
        inside &= labels == 0
        labels[inside] = n
        if (labels > 0).sum() >= target:
            break
    return labels > 0, labels


def _region_grid(
    rng: np.random.Generator, tissue: np.ndarray, fraction: float, ds: int, mpp: float
) -> np.ndarray:
    """1–3 wobbly blobs inside ``tissue`` covering exactly ``fraction`` of it."""
    k = int(rng.integers(1, 4))
    inner = ndimage.distance_transform_edt(tissue)
    area = fraction * tissue.sum() / k
    r = math.sqrt(area / math.pi)
    # Blob centres well inside the tissue, so the region is not a rim.
    ok = np.flatnonzero(inner.ravel() >= min(0.8 * r, 0.5 * inner.max()))
    pick = rng.choice(ok, k, replace=ok.size < k)
    centres = np.column_stack(np.unravel_index(pick, tissue.shape)).astype(np.float64)
    ratio = rng.uniform(0.6, 1.0, k)
    axes = np.column_stack([r / np.sqrt(ratio), r * np.sqrt(ratio)])
    field = _ellipse_field(tissue.shape, centres, axes, rng.uniform(0, math.pi, k))
    field += 0.25 * _smooth_noise(rng, tissue.shape, max(2.0, 40 / mpp / ds)).astype(np.float32)
    return _threshold_to_fraction(field, tissue, fraction)


def _upsample(grid: np.ndarray, ds: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(grid, ds, 0), ds, 1)[: shape[0], : shape[1]]


def _stamp(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of N filled ellipses: ``(py, px, owner)`` flat arrays, clipped to ``shape``."""
    if cy.size == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    rad = math.ceil(float(np.max(a))) + 1
    yy, xx = np.mgrid[-rad : rad + 1, -rad : rad + 1]
    dy, dx = yy.ravel().astype(np.float32), xx.ravel().astype(np.float32)
    c, s = np.cos(theta)[:, None].astype(np.float32), np.sin(theta)[:, None].astype(np.float32)
    fy = (cy - np.floor(cy))[:, None].astype(np.float32)
    fx = (cx - np.floor(cx))[:, None].astype(np.float32)
    ddx, ddy = dx[None, :] - fx, dy[None, :] - fy
    u = (ddx * c + ddy * s) / a[:, None].astype(np.float32)
    v = (-ddx * s + ddy * c) / b[:, None].astype(np.float32)
    owner, k = np.nonzero(u * u + v * v <= 1.0)
    py = np.floor(cy).astype(np.int64)[owner] + yy.ravel()[k]
    px = np.floor(cx).astype(np.int64)[owner] + xx.ravel()[k]
    ok = (py >= 0) & (py < shape[0]) & (px >= 0) & (px < shape[1])
    return py[ok], px[ok], owner[ok]


def _sample_in(
    rng: np.random.Generator, region: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniformly random (y, x) sub-pixel positions inside ``region``."""
    flat = np.flatnonzero(region.ravel())
    pick = rng.choice(flat, n)
    y, x = np.unravel_index(pick, region.shape)
    return y + rng.uniform(0, 1, n), x + rng.uniform(0, 1, n)


def _fill(
    img: np.ndarray,
    region: np.ndarray,
    colour: tuple[float, float, float],
    rng: np.random.Generator,
) -> None:
    n = int(region.sum())
    noise = rng.normal(0, 6, (n, 1)).astype(np.float32)
    img[region] = np.clip(np.asarray(colour, np.float32) + noise, 0, 255).astype(np.uint8)


def _paint_nuclei(
    img: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    colour: tuple[float, float, float],
    jitter: float,
) -> None:
    """Paint ellipses in ``colour`` (± per-nucleus ``jitter``) where ``region`` is set."""
    py, px, owner = _stamp(region.shape, cy, cx, a, b, theta)
    keep = region[py, px]
    py, px, owner = py[keep], px[keep], owner[keep]
    tone = rng.normal(0, jitter, (cy.size, 1)).astype(np.float32)
    pix = (
        np.asarray(colour, np.float32)
        + tone[owner]
        + rng.normal(0, 5, (py.size, 1)).astype(np.float32)
    )
    img[py, px] = np.clip(pix, 0, 255).astype(np.uint8)


def _draw_sheet(
    img: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    mpp: float,
    pal: dict[str, tuple[float, float, float]],
) -> None:
    """Sheets of large (r 5–7.5 µm), dark, crowded, pleomorphic nuclei."""
    _fill(img, region, pal["cytoplasm"], rng)
    r = rng.uniform(5.0, 7.5, 1) / mpp
    mean_area = math.pi * float(r[0]) ** 2 * 0.85
    n = int(0.75 * region.sum() / mean_area)
    cy, cx = _sample_in(rng, region, n)
    a = rng.uniform(5.0, 7.5, n) / mpp
    b = a * rng.uniform(0.65, 1.0, n)
    _paint_nuclei(
        img, region, rng, cy, cx, a, b, rng.uniform(0, math.pi, n), pal["dark_nucleus"], 10
    )


def _draw_gland(
    img: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    mpp: float,
    pal: dict[str, tuple[float, float, float]],
) -> None:
    """Glands: pale lumens ringed by epithelium with small (r 2–2.6 µm) regular nuclei."""
    _fill(img, region, pal["stroma"], rng)
    R_um = rng.uniform(16, 26, 1)[0]
    n = max(1, int(0.45 * region.sum() / (math.pi * (R_um / mpp) ** 2)))
    cy, cx = _sample_in(rng, region, n)
    R = rng.uniform(16, 26, n) / mpp
    zero = np.zeros(n)
    py, px, owner = _stamp(region.shape, cy, cx, R, R, zero)
    keep = region[py, px]
    py, px, owner = py[keep], px[keep], owner[keep]
    d = np.hypot(py + 0.5 - cy[owner], px + 0.5 - cx[owner]) / R[owner]
    epi = d > 0.55
    noise = rng.normal(0, 5, (py.size, 1)).astype(np.float32)
    col = (
        np.where(
            epi[:, None],
            np.asarray(pal["epithelium"], np.float32),
            np.asarray(pal["lumen"], np.float32),
        )
        + noise
    )
    img[py, px] = np.clip(col, 0, 255).astype(np.uint8)
    # Small nuclei evenly spaced round each ring, ~6.5 µm apart.
    per = np.maximum(6, np.rint(2 * math.pi * 0.78 * R * mpp / 6.5)).astype(np.int64)
    g = np.repeat(np.arange(n), per)
    k = np.arange(g.size) - np.repeat(np.cumsum(per) - per, per)
    ang = 2 * math.pi * k / per[g] + rng.uniform(0, 2 * math.pi, n)[g]
    ny = cy[g] + 0.78 * R[g] * np.sin(ang)
    nx = cx[g] + 0.78 * R[g] * np.cos(ang)
    m = g.size
    na = rng.uniform(2.0, 2.6, m) / mpp
    nb = na * rng.uniform(0.8, 1.0, m)
    _paint_nuclei(img, region, rng, ny, nx, na, nb, ang, pal["nucleus"], 5)


def _draw_spindle(
    img: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    mpp: float,
    pal: dict[str, tuple[float, float, float]],
) -> None:
    """Streams of spindle nuclei (7–10 × 1.2–1.8 µm half-axes) following a smooth flow field."""
    _fill(img, region, pal["stroma"], rng)
    n = int(0.40 * region.sum() / (math.pi * 8.5 * 1.5 / mpp**2))
    cy, cx = _sample_in(rng, region, n)
    wave = 300 / mpp
    p = rng.uniform(0, 2 * math.pi, 3)
    theta = (
        p[0]
        + 0.7 * np.sin(2 * math.pi * cx / wave + p[1])
        + 0.7 * np.cos(2 * math.pi * cy / wave + p[2])
    )
    theta += rng.normal(0, 0.12, n)
    a = rng.uniform(7, 10, n) / mpp
    b = rng.uniform(1.2, 1.8, n) / mpp
    _paint_nuclei(img, region, rng, cy, cx, a, b, theta, pal["spindle_nucleus"], 8)


_DRAWERS: dict[str, Callable[..., None]] = {
    "gland": _draw_gland,
    "sheet": _draw_sheet,
    "spindle": _draw_spindle,
}


def _smear_texture(shape: tuple[int, int], rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Pap-like cohesive cells: pale blue-green cytoplasm, round nuclei of ~3.5 µm radius."""
    pal = _PALETTES["pap"]
    h, w = shape
    img = np.empty((h, w, 3), np.float32)
    img[...] = pal["cytoplasm"]
    img += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    n = max(1, int(h * w * mpp**2 / 300))
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    r = np.full(n, 3.5 / mpp)
    py, px, _ = _stamp(shape, cy, cx, r, r, np.zeros(n))
    img[py, px] = pal["nucleus"]
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_slide(
    size: tuple[int, int],
    mpp: float,
    morphology: Morphology,
    rng: np.random.Generator,
    *,
    mode: Mode,
    tissue_fraction: float,
    region_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB image and the region mask on the mask grid."""
    w, h = size
    ds = MASK_DOWNSAMPLE
    grid = (-(-h // ds), -(-w // ds))
    border = max(1, _BORDER_PX // ds)
    if mode == "tissue":
        tissue_g = _tissue_grid(rng, grid, tissue_fraction, border)
        region_g = _region_grid(rng, tissue_g, region_fraction, ds, mpp)
        glass: tuple[float, ...] = BACKGROUND
        pal = _PALETTES["he"]
    else:
        tissue_g, clusters = _smear_grid(rng, grid, tissue_fraction, border, ds, mpp)
        # Whole clusters carry the class, in random order until the fraction is reached.
        ids = rng.permutation(np.arange(1, clusters.max() + 1))
        sizes = np.bincount(clusters.ravel())[ids]
        n_take = int(np.searchsorted(np.cumsum(sizes), region_fraction * tissue_g.sum()) + 1)
        region_g = np.isin(clusters, ids[:n_take])
        glass = _PALETTES["pap"]["glass"]
        pal = _PALETTES["pap"]
    img = np.empty((h, w, 3), np.uint8)
    img[...] = np.asarray(glass, np.uint8)
    img += rng.integers(0, 3, (h, w, 1), dtype=np.uint8)
    # Tissue texture only inside the tissue's bounding box: saves time on large glass margins.
    ys, xs = np.nonzero(tissue_g)
    gy0, gy1, gx0, gx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    y0, y1, x0, x1 = gy0 * ds, min(h, gy1 * ds), gx0 * ds, min(w, gx1 * ds)
    box = (slice(y0, y1), slice(x0, x1))
    tissue_box = _upsample(tissue_g[gy0:gy1, gx0:gx1], ds, (y1 - y0, x1 - x0))
    region_box = _upsample(region_g[gy0:gy1, gx0:gx1], ds, (y1 - y0, x1 - x0))
    sub = img[box]
    if mode == "tissue":
        tex = he_texture((y1 - y0, x1 - x0), rng, mpp=mpp)
    else:
        tex = _smear_texture((y1 - y0, x1 - x0), rng, mpp)
    np.copyto(sub, tex, where=tissue_box[..., None])
    _DRAWERS[morphology](sub, region_box, rng, mpp, pal)
    return img, region_g
