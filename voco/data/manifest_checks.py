"""Check a manifest's every entry and summarise it: `voco manifest check FILE` and `voco manifest stats FILE`."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from voco.data.folder import PROGRESS_MINIMUM
from voco.data.manifest import DEFAULT_PRESETS, load_manifest, normalize_modality, to_datalist
from voco.data.volume_checks import inspect_volume
from voco.data.volumes import read_header
from voco.errors import VolumeError
from voco.progress import Progress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Checking


class ProblemRows(list):
    """The rows of `check_manifest`, which also remember how many scans were checked (`scans`)."""

    scans: int = 0


def _facts_differ(recorded: Sequence[float], actual: Sequence[float], tolerance: float = 1e-3) -> bool:
    return len(recorded) != len(actual) or any(
        not math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance) for a, b in zip(recorded, actual))


def check_manifest(path: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None,
                   read_voxels: bool = True) -> list[dict]:
    """Check every scan (and label) of a manifest with `check_volume`.

    Beyond the volume checks, a label whose shape differs from its image's, and header facts recorded in the
    manifest (shape, spacing) that no longer match the file, are problems too.

    Returns:
        rows ``{"entry": "dataset/subject/study/scan_index", "path": ..., "problem": ...}``, empty when all is
        well; the list's ``scans`` attribute is the number of scans checked.

    Raises:
        ManifestError: the manifest itself cannot be read or does not follow the schema.
    """
    datalist = to_datalist(load_manifest(path), dataset_dir=dataset_dir)
    rows = ProblemRows()
    rows.scans = len(datalist)
    with Progress(len(datalist), f"scans checked of {path}", minimum=PROGRESS_MINIMUM) as progress:
        for entry in datalist:
            where = f"{entry['dataset']}/{entry['subject']}/{entry['study']}/{entry['scan_index']}"
            header, problems = inspect_volume(entry["image"], read_voxels=read_voxels, series=entry.get("series"))
            if header is not None and not problems:
                for fact, actual in (("shape", header.spatial_shape), ("spacing", header.spacing)):
                    if fact in entry and _facts_differ(entry[fact], actual):
                        problems.append(f"{entry['image']} has the {fact} {list(actual)} but the manifest records "
                                        f"{entry[fact]}; rebuild the manifest with `voco manifest build`.")
            rows.extend({"entry": where, "path": entry["image"], "problem": problem} for problem in problems)
            if "label" in entry:
                label_header, label_problems = inspect_volume(entry["label"], read_voxels=read_voxels)
                if header is not None and label_header is not None and not label_problems \
                        and label_header.spatial_shape != header.spatial_shape:
                    label_problems.append(f"{entry['label']} has the shape {list(label_header.spatial_shape)} but its "
                                          f"image has {list(header.spatial_shape)}; give the label of this image.")
                rows.extend({"entry": where, "path": entry["label"], "problem": problem} for problem in label_problems)
            progress.update()
    return rows


def format_problem_table(rows: Sequence[Mapping[str, str]], scans: int | None = None) -> str:
    """A plain-text table of `check_manifest` rows (entry, path, problem); "no problems in N scans" when empty.

    `scans` defaults to the count that `check_manifest`'s rows carry.
    """
    scans = getattr(rows, "scans", None) if scans is None else scans
    if not rows:
        return f"no problems in {scans} scans" if scans is not None else "no problems"
    columns = ("entry", "path", "problem")
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns[:2]}
    lines = ["  ".join([column.ljust(widths.get(column, 0)) for column in columns]).rstrip(),
             "  ".join("-" * widths.get(column, len(column)) for column in columns)]
    lines += ["  ".join([str(row["entry"]).ljust(widths["entry"]), str(row["path"]).ljust(widths["path"]),
                         str(row["problem"])]) for row in rows]
    entries = len({row["entry"] for row in rows})
    lines.append(f"{len(rows)} problems in {entries} of {scans} scans" if scans is not None
                 else f"{len(rows)} problems in {entries} scans")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Summary


def _extremes(scans: list[tuple[str, Sequence[float]]], words: tuple[str, str], unit: str) -> str:
    """The smallest and largest scan by the product of a 3-vector (voxel count, voxel volume), each with its own
    three values and name, and the median per axis between them: extremes a real scan has, not per-axis minima
    that come from different scans. E.g. ``smallest 16 × 16 × 4 (a.nii.gz)   median per axis ...``."""
    def text(row: Sequence[float]) -> str:
        return " × ".join(f"{float(value):g}" for value in row) + (f" {unit}" if unit else "")

    if all(list(values) == list(scans[0][1]) for _, values in scans):
        return f"all {text(scans[0][1])}"
    products = [float(np.prod(values)) for _, values in scans]
    low, high = scans[int(np.argmin(products))], scans[int(np.argmax(products))]
    median = np.median(np.asarray([values for _, values in scans], dtype=float), axis=0)
    return (f"{words[0]} {text(low[1])} ({low[0]})   median per axis {text(median)}   "
            f"{words[1]} {text(high[1])} ({high[0]})")


def _scan_name(entry: Mapping[str, Any]) -> str:
    name = Path(entry["image"]).name
    return f"{name} series {entry['series']}" if entry.get("series") else name


def manifest_stats(path: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None) -> str:
    """A plain-text summary of a manifest, per dataset: counts of subjects / studies / scans / labels / reports,
    modality, preset, the smallest / largest scan and the per-axis median of shape and of spacing (from the recorded header facts,
    or read from the file headers where the manifest does not record them)."""
    manifest = load_manifest(path)
    datalist = to_datalist(manifest, dataset_dir=dataset_dir)
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for entry in datalist:
        by_dataset[entry["dataset"]].append(entry)
    totals: Counter = Counter()
    blocks = []
    for dataset in manifest["datasets"]:
        entries = by_dataset[dataset["name"]]
        counts = {
            "subjects": len(dataset["subjects"]),
            "studies": sum(len(subject["studies"]) for subject in dataset["subjects"]),
            "scans": len(entries),
            "labels": sum("label" in entry for entry in entries),
            "reports": sum("report" in study for subject in dataset["subjects"] for study in subject["studies"]),
        }
        totals.update(counts)
        shapes, spacings, orientations, unreadable = [], [], Counter(), 0
        for entry in entries:
            shape, spacing, orientation = entry.get("shape"), entry.get("spacing"), entry.get("orientation")
            if shape is None or spacing is None:
                try:
                    header = read_header(entry["image"], series=entry.get("series"))
                except VolumeError:
                    unreadable += 1
                    continue
                shape, spacing = header.spatial_shape, header.spacing
                orientation = orientation or header.orientation
            if len(shape) == 3 and len(spacing) == 3:
                shapes.append((_scan_name(entry), shape))
                spacings.append((_scan_name(entry), spacing))
            if orientation:
                orientations[orientation] += 1
        modality = normalize_modality(dataset["modality"], dataset["name"])
        lines = [f"dataset {dataset['name']}: modality {modality}, "
                 f"preset {dataset.get('preset', DEFAULT_PRESETS[modality])}",
                 "  " + ", ".join(f"{what} {count}" for what, count in counts.items())]
        scan_modalities = Counter(entry["modality"] for entry in entries)
        if len(scan_modalities) > 1:
            lines.append("  scan modalities: " + ", ".join(f"{name} {count}" for name, count in scan_modalities.items()))
        if shapes:
            lines.append("  shape (voxels)  " + _extremes(shapes, ("smallest", "largest"), ""))
            lines.append("  spacing         " + _extremes(spacings, ("finest", "coarsest"), "mm"))
        if orientations:
            lines.append("  orientation     " + ", ".join(f"{code} {count}" for code, count in orientations.most_common()))
        if unreadable:
            lines.append(f"  {unreadable} scans have no recorded header facts and could not be read "
                         f"(run `voco manifest check`)")
        blocks.append("\n".join(lines))
    title = (f"manifest {manifest.get('name', Path(path).stem)} ({manifest['_path']}): "
             f"datasets {len(manifest['datasets'])}, " + ", ".join(f"{what} {totals[what]}" for what in
                                                                 ("subjects", "studies", "scans", "labels", "reports")))
    return "\n\n".join([title] + blocks)
