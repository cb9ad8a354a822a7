"""Checking a user's copy of a task's dataset: every datalist entry's files exist and read as the task expects.

Decathlon-style datalists are checked entry by entry here; a task type whose data comes in its own layout is
checked by its own module (`LAYOUT_CHECKS`: vision-language -> `voco.benchmark.ct_rate.check_ct_rate_copy`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from voco.benchmark.ct_rate import check_ct_rate_copy
from voco.benchmark.own_data import read_datalist
from voco.benchmark.registry import Task, is_whole, registration_keys
from voco.data.manifest_checks import ProblemRows
from voco.data.manifest import SPLITS
from voco.errors import ManifestError
from voco.data.volume_checks import header_problems, inspect_volume
from voco.data.volumes import VolumeHeader, load_voxels, one_line

# Task types whose datasets come in their own layout, and their checks.
LAYOUT_CHECKS = {"vision-language": check_ct_rate_copy}


def _volume(path: str, read_voxels: bool, channels: int = 1) -> tuple[VolumeHeader | None, list[str]]:
    """(header, problems) of one volume file; a file holding exactly `channels` channels (MSD BraTS) is fine too."""
    header, problems = inspect_volume(path, read_voxels=False)
    if header is None:
        return None, problems
    if channels > 1 and math.prod(header.channel_shape) == channels:
        header = replace(header, shape=header.spatial_shape)  # the channels are expected: check the rest
    return header, header_problems(header, read_voxels=read_voxels)


def _label_value_problems(task: Task, header: VolumeHeader) -> list[str]:
    """Label values a segmentation's label map should not hold: outside 0..num_classes, or the raw values the
    reference remaps (provenance["label_remap"]["mapping"]); none checked for a remap without a mapping."""
    remap = task.provenance.get("label_remap")
    if remap is not None and not remap.get("mapping"):
        return []
    try:
        voxels = np.asarray(load_voxels(header))
    except Exception:  # the volume checks just read these voxels; a failure here was reported there
        return []
    if remap is not None:
        allowed = {0, *(int(value) for value in remap["mapping"])}
        words = f"0 and the raw values {', '.join(map(str, sorted(allowed - {0})))} that the reference remaps"
    else:
        allowed, words = set(range(task.num_classes + 1)), f"0..{task.num_classes}"
        if np.issubdtype(voxels.dtype, np.integer) and voxels.min() >= 0 and voxels.max() <= task.num_classes:
            return []  # the common case, without sorting every voxel
    outside = [value for value in np.unique(voxels).tolist() if value not in allowed]
    if not outside:
        return []
    shown = ", ".join(f"{value:g}" for value in outside[:5]) + (", ..." if len(outside) > 5 else "")
    return [f"{header.path} holds the label values {shown}, outside {words} for the {task.num_classes} classes of "
            f"{task.id}; fix the label map or check that it belongs to this task."]


def _class_label_problem(task: Task, label: Any) -> str | None:
    """Why a classification entry's label is not an index in 0..num_classes-1 (or a 0/1 list of num_classes)."""
    count = task.num_classes
    if is_whole(label):
        return None if 0 <= label < count else f"is {label}, outside 0..{count - 1}"
    if isinstance(label, list):
        if len(label) == count and all(is_whole(value) and value in (0, 1) for value in label):
            return None
        return f"is {label!r}; a multi-label target lists {count} values of 0 or 1"
    return f"is {label!r}; give a class index 0..{count - 1}"


class _EntryCheck:
    """The problem rows of one datalist entry, gathered as its image file(s) and label are checked."""

    def __init__(self, task: Task, root: Path, where: str, read_voxels: bool) -> None:
        self.task, self.root, self.where, self.read_voxels = task, root, where, read_voxels
        self.rows: list[dict] = []

    def report(self, path: Any, problem: str) -> None:
        self.rows.append({"entry": self.where, "path": str(path), "problem": problem})

    def image(self, item: Mapping[str, Any], key: str, channels: int) -> tuple[str | None, tuple[int, ...] | None]:
        """Check the image file(s) under `key` (a list: one file per channel); (first path, spatial shape)."""
        images = item.get(key)
        files = images if isinstance(images, list) else [images]
        if not files or not all(isinstance(file, str) and file for file in files):
            self.report(self.root, f"{self.where} has no '{key}' path (it has {images!r}); give the image file(s).")
            return None, None
        paths = [os.path.normpath(self.root / file) for file in files]  # absolute paths stay as they are
        if isinstance(images, list) and len(paths) != channels:
            self.report(paths[0], f"{self.where} lists {len(paths)} '{key}' files but {self.task.id} takes "
                                  f"{channels} channels; give one file per channel.")
        shapes = []
        for path in paths:
            header, problems = _volume(path, self.read_voxels, channels if len(paths) == 1 else 1)
            for problem in problems:
                self.report(path, problem)
            if header is not None and not problems:
                shapes.append(header.spatial_shape)
        if len(set(shapes)) > 1:
            self.report(paths[0], f"the '{key}' channel files of {self.where} differ in shape "
                                  f"({', '.join(map(str, shapes))}); give co-registered channels.")
        return paths[0], (shapes[0] if shapes else None)

    def label_map(self, item: Mapping[str, Any], key: str, image_shape: tuple[int, ...] | None,
                  check_values: bool) -> None:
        """Check the label map under `key`: a readable volume of its image's shape (and, optionally, values)."""
        label = item[key]
        if not isinstance(label, str) or not label:
            self.report(self.root, f"the '{key}' of {self.where} is {label!r}, not a label map path; fix the datalist.")
            return
        path = os.path.normpath(self.root / label)
        header, problems = _volume(path, self.read_voxels)
        if header is not None and not problems:
            if image_shape is not None and header.spatial_shape != image_shape:
                problems.append(f"{path} has the shape {list(header.spatial_shape)} but its image has "
                                f"{list(image_shape)}; give the label map of this image.")
            elif check_values and self.read_voxels:
                problems += _label_value_problems(self.task, header)
        for problem in problems:
            self.report(path, problem)


def _check_entry(task: Task, root: Path, where: str, item: Any, labelled: bool, read_voxels: bool) -> list[dict]:
    """Problem rows of one datalist entry: its image file(s), its label (file or class) and their shapes.

    `labelled`: the entry is from a list that needs labels ("training", "validation"; not "test").
    """
    check = _EntryCheck(task, root, where, read_voxels)
    if task.task_type == "registration":
        moving_image, fixed_image, moving_label, fixed_label = registration_keys(task)
        if not isinstance(item, dict):
            check.report(root, f"{where} is {item!r}, not an object with '{moving_image}' and '{fixed_image}'; "
                               f"fix the datalist.")
            return check.rows
        for image_key, label_key in ((moving_image, moving_label), (fixed_image, fixed_label)):
            _, shape = check.image(item, image_key, 1)
            if item.get(label_key) is not None:  # labels are optional: unsupervised registration
                check.label_map(item, label_key, shape, check_values=False)  # anatomical ids, not 0..N
        return check.rows

    if isinstance(item, str):  # Decathlon "test" lists are lists of paths
        item = {task.image_key: item}
    if not isinstance(item, dict):
        check.report(root, f"{where} is {item!r}, not an object with an '{task.image_key}'; fix the datalist.")
        return check.rows
    first_path, shape = check.image(item, task.image_key, task.in_channels or 1)
    if first_path is None:
        return check.rows
    label = item.get(task.label_key)
    if task.task_type == "classification":
        problem = _class_label_problem(task, label) if label is not None or labelled else None
        if problem is not None:
            check.report(first_path, f"the '{task.label_key}' of {where} {problem}; fix the datalist.")
    elif label is not None:
        check.label_map(item, task.label_key, shape, check_values=task.task_type == "segmentation")
    elif labelled and task.task_type == "segmentation":
        check.report(first_path, f"{where} has no '{task.label_key}' label map; give one for every training and "
                                 f"validation case.")
    return check.rows


def check_task_dataset(task: Task, dataset_dir: str | os.PathLike, *, read_voxels: bool = True,
                       datalist: str | os.PathLike | None = None) -> list[dict]:
    """Check a user's copy of a task's dataset against what the task expects.

    Reads the Decathlon-style datalist (the registry's `datalist_file`, or `datalist`; relative paths start at
    `dataset_dir`) and checks every entry of its "training", "validation" and "test" lists: the image file(s) exist
    and are readable 3-D volumes (`voco.data.volume_checks.check_volume`'s checks; one file per channel, or one file
    with `in_channels` channels), a label map has its image's shape and, for segmentation with `read_voxels`, only
    values 0..num_classes (or the raw values the reference remaps); a classification entry's label is a class index
    (or a 0/1 list per class); a registration entry has a moving and a fixed image (`registration_keys`), each with
    an optional label map. A vision-language task's copy is checked in its own layout instead
    (`voco.benchmark.ct_rate.check_ct_rate_copy`).

    Returns:
        rows {"entry": "training[3]" | "datalist" | "dataset", "path", "problem"}, empty when all is well; the
        list's `scans` attribute is the number of entries checked (for `voco.data.folder.format_problem_table`).
    """
    own_layout = LAYOUT_CHECKS.get(task.task_type)
    if own_layout is not None:  # a dataset in its own layout (CT-RATE), checked by its module
        return own_layout(task, dataset_dir, read_voxels=read_voxels)
    rows = ProblemRows()
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        rows.append({"entry": "dataset", "path": str(root),
                     "problem": f"{root} is not a folder; give the folder that holds the {task.id} dataset."})
        return rows
    name = datalist if datalist is not None else task.datalist_file
    if name is None:
        rows.append({"entry": "datalist", "path": str(root),
                     "problem": f"{task.id} names no datalist file (see its notes in the task registry); give a "
                                f"Decathlon-style JSON with --datalist FILE."})
        return rows
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    data = None
    if not path.is_file():
        problem = (f"{path} does not exist; put the {task.id} datalist ({Path(name).name}) in {root} or give "
                   f"another with --datalist FILE.")
    else:
        try:
            data = read_datalist(path)
        except ManifestError as error:
            problem = one_line(error)
    if data is None:
        rows.append({"entry": "datalist", "path": str(path), "problem": problem})
        return rows
    for split in SPLITS:
        entries = data.get(split) or []
        if not isinstance(entries, list):
            rows.append({"entry": split, "path": str(path),
                         "problem": f"'{split}' in {path} is not a list of entries; fix the datalist."})
            continue
        for index, item in enumerate(entries):
            rows.extend(_check_entry(task, root, f"{split}[{index}]", item, split != "test", read_voxels))
            rows.scans += 1
    return rows
