"""Phantom studies: one body seen by several series (other spacings, windows and sizes), with a report and
findings (language-image pretraining)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from voco.data.phantoms.anatomy import (DEFAULT_IN_PLANE_SPACING_RANGE, DEFAULT_NOISE_RANGE, DEFAULT_ORIENTATIONS,
                                         DEFAULT_SLICE_SPACING_RANGE, LESION_ORGANS, Phantom, _check_orientation,
                                         _check_range, make_phantom)
from voco.data.phantoms.reports import phantom_report
from voco.errors import ConfigError


# ---------------------------------------------------------------------------------------------------------------
# Phantom studies: one body seen by several series


@dataclass(frozen=True)
class PhantomSeries:
    """How one series of a phantom study is acquired and read.

    Attributes:
        name: the series name (the scan's "series" in the manifest).
        preset: the preset the scan is read with (`voco.data.presets`); "wide_window" is read with ct_chest's
            wide HU window [-1000, 500] instead of the abdominal one.
        voxel_scale: voxel size relative to the study's base voxel. The field of view stays the study's, so the
            voxel counts change inversely (thin slices: twice the slices).
        noise_scale: noise relative to the base series (thin slices are noisier, thick ones smoother).
    """

    name: str
    preset: str
    voxel_scale: tuple[float, float, float]
    noise_scale: float = 1.0


PHANTOM_SERIES: tuple[PhantomSeries, ...] = (
    PhantomSeries("axial", "ct_abdomen", (1.0, 1.0, 1.0)),  # every study has it, as its first scan
    PhantomSeries("thin_slice", "ct_abdomen", (1.0, 1.0, 0.5), 1.4),
    PhantomSeries("thick_slice", "ct_abdomen", (1.0, 1.0, 2.0), 0.7),
    PhantomSeries("coarse_in_plane", "ct_abdomen", (1.5, 1.5, 1.0), 0.8),
    PhantomSeries("wide_window", "ct_chest", (1.25, 1.25, 1.0)),
)
# Study-level findings of phantom studies, the names their manifests use.
STUDY_FINDINGS = ("liver_lesion", "kidney_lesion", "splenomegaly")
DEFAULT_STUDY_SHAPE_RANGE = ((40, 56), (40, 56), (20, 28))  # voxels of the base series: small, for CPU smoke runs
MAX_STUDY_SCANS = 4
# With these each finding is positive in about 40-55 % of studies (liver lesion 0.7 x 0.79, kidney lesion
# 0.7 x 0.61, splenomegaly 0.4), so zero-shot accuracy on either class is measurable.
STUDY_LESION_PROBABILITY = 0.7
STUDY_ENLARGED_SPLEEN_PROBABILITY = 0.4
# Bumped whenever what a seed gives as a study changes (with PHANTOM_VERSION, it decides if a set is reused).
PHANTOM_STUDY_VERSION = 2


@dataclass
class PhantomStudy:
    """One synthetic CT study: the same body seen by 1-4 series, with one report and study-level findings.

    Attributes:
        scans: one `Phantom` per series, each on its own grid and in its own orientation.
        series: the series of each scan (`PHANTOM_SERIES`), "axial" first.
        report: the study's report, derived from what its scans show (wordings vary, see `phantom_report`).
        findings: ``{name: bool}`` for `STUDY_FINDINGS`.
    """

    scans: list[Phantom]
    series: list[PhantomSeries]
    report: str
    findings: dict[str, bool]


def study_findings(lesion_counts: dict[str, int], enlarged_spleen: bool) -> dict[str, bool]:
    """The study-level findings of `STUDY_FINDINGS` from lesion counts per organ and the spleen."""
    return {"liver_lesion": lesion_counts.get("liver", 0) > 0,
            "kidney_lesion": lesion_counts.get("kidney_left", 0) + lesion_counts.get("kidney_right", 0) > 0,
            "splenomegaly": bool(enlarged_spleen)}


def make_phantom_study(
    seed: int | Sequence[int],
    num_scans: int | None = None,
    *,
    shape_range: Sequence[Sequence[int]] = DEFAULT_STUDY_SHAPE_RANGE,
    in_plane_spacing_range: Sequence[float] = DEFAULT_IN_PLANE_SPACING_RANGE,
    slice_spacing_range: Sequence[float] = DEFAULT_SLICE_SPACING_RANGE,
    orientations: Sequence[str] = DEFAULT_ORIENTATIONS,
    lesion_probability: float = STUDY_LESION_PROBABILITY,
    enlarged_spleen_probability: float = STUDY_ENLARGED_SPLEEN_PROBABILITY,
    noise_range: Sequence[float] = DEFAULT_NOISE_RANGE,
) -> PhantomStudy:
    """Make one phantom study, deterministically for `seed`: one body (``make_phantom(seed)``'s anatomy) seen by
    `num_scans` series of `PHANTOM_SERIES` (drawn from 1-4 when None): the "axial" base series on a grid drawn
    from `shape_range` and the spacing ranges, and others with thinner or thicker slices, coarser in-plane voxels
    or the wide window, over the same field of view, each stored in its own orientation.

    The report and findings describe what the study shows: a lesion counts when at least one scan shows it (a
    lesion smaller than a voxel can vanish on a coarse grid).

        study = make_phantom_study(3)
        [scan.shape for scan in study.scans], study.findings  # e.g. [(44, 51, 23), (44, 51, 46)], {...}
    """
    if num_scans is not None and (isinstance(num_scans, bool) or not isinstance(num_scans, int)
                                  or not 1 <= num_scans <= len(PHANTOM_SERIES)):
        raise ConfigError(f"num_scans is {num_scans!r}; give a whole number from 1 to {len(PHANTOM_SERIES)} "
                          f"(or None for 1-{MAX_STUDY_SCANS} drawn per study).")
    if len(shape_range) != 3:
        raise ConfigError(f"shape_range is {shape_range!r}; give three [low, high] pairs, one per axis.")
    codes = [_check_orientation(code) for code in orientations]
    if not codes:
        raise ConfigError("orientations is empty; give at least one axis code such as 'RAS'.")
    # Streams 0-3 of the seed are make_phantom's (geometry, orientation, anatomy, noise); the study draws from 4.
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])
    drawn_count = int(rng.integers(1, MAX_STUDY_SCANS + 1))  # drawn always: fixing num_scans keeps the rest
    count = num_scans if num_scans is not None else drawn_count
    series = [PHANTOM_SERIES[0]] + [PHANTOM_SERIES[1 + int(k)] for k in rng.permutation(len(PHANTOM_SERIES) - 1)]
    series = series[:count]
    base_shape = np.asarray([int(rng.integers(int(low), int(high) + 1)) for low, high in
                             (_check_range(f"shape_range[{axis}]", shape_range[axis], 8) for axis in range(3))])
    in_plane = rng.uniform(*_check_range("in_plane_spacing_range", in_plane_spacing_range, 0.01))
    base_spacing = np.asarray([in_plane, in_plane,
                               rng.uniform(*_check_range("slice_spacing_range", slice_spacing_range, 0.01))])
    noise = rng.uniform(*_check_range("noise_range", noise_range, 0.0))
    field_of_view = base_shape * base_spacing  # mm: every series covers the same body

    scans = []
    for kind in series:
        spacing = base_spacing * np.asarray(kind.voxel_scale)
        shape = np.maximum(8, np.rint(field_of_view / spacing)).astype(int)
        scans.append(make_phantom(seed, shape=shape.tolist(), spacing=spacing.tolist(),
                                  orientation=codes[int(rng.integers(len(codes)))],
                                  lesion_probability=lesion_probability,
                                  enlarged_spleen_probability=enlarged_spleen_probability,
                                  noise_range=(noise * kind.noise_scale,) * 2))
    lesion_counts = {organ: max(scan.lesion_counts[organ] for scan in scans) for organ in LESION_ORGANS}
    enlarged_spleen = bool(scans[0].attributes["enlarged_spleen"])  # drawn with the anatomy: the same on any grid
    return PhantomStudy(scans=scans, series=series, report=phantom_report(lesion_counts, enlarged_spleen, rng),
                        findings=study_findings(lesion_counts, enlarged_spleen))
