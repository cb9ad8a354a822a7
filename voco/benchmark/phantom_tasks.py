"""The synthetic downstream tasks "phantom-seg", "phantom-cls" and "phantom-reg": phantoms plus the datalist
their task names.

The tasks read the same phantom set (`voco.data.phantoms`): phantom-seg segments its organs (label maps in
`PHANTOM_CLASSES` order), phantom-cls tells whether a phantom has a lesion (its "lesion" attribute), phantom-reg
registers phantom 0 (the atlas) onto each other phantom, as IXI registers its atlas onto subjects. They let the
downstream benchmark run end to end on a CPU, from a clean checkout, in about a minute:

    dataset_dir = prepare_phantom_task("phantom-seg", "runs/phantom_tasks")
    rows = check_task_dataset(get_task("phantom-seg"), dataset_dir)   # [] when all is well
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from voco.benchmark.registry import Task, get_task, registration_keys
from voco.data.manifest import load_manifest, to_datalist
from voco.data.phantoms import ensure_phantoms
from voco.errors import ConfigError
from voco.files import write_json_atomically


# mm along left-right, posterior-anterior, inferior-superior: one body size within +-7 %, whatever the drawn spacing.
# A few labelled cases cannot teach a network anatomy that is stretched up to 4x per axis from case to case (what
# grids drawn in voxels give); with this, a scratch SwinUNETR learns phantom-seg in minutes on a CPU.
TASK_FIELD_OF_VIEW_RANGE = ((84.0, 96.0), (84.0, 96.0), (54.0, 66.0))
# The body is about a quarter of a patient's size, so thin-slice CT of it has proportionally finer voxels: with the
# pretraining sets' 5 mm slices a phantom kidney spans two slices (measured: kidneys and spleen stay at Dice 0).
TASK_IN_PLANE_SPACING_RANGE = (1.0, 1.6)
TASK_SLICE_SPACING_RANGE = (1.0, 2.0)


# Named class groups whose mean Dice the downstream bundle logs (metric/dice/<group>): the five large abdominal organs
# of phantom-seg, the measure issue 14 sets the CPU recipe's bar on.
CLASS_GROUPS = {"phantom-seg": {"large_organs": ("liver", "spleen", "kidney_left", "kidney_right", "stomach")}}


def class_groups(task_id: str) -> dict[str, tuple[str, ...]]:
    """The named class groups of a task (empty for tasks without any)."""
    return dict(CLASS_GROUPS.get(task_id, {}))


def _validation_indices(labels: list[int] | None, count: int, n_validation: int) -> list[int]:
    """Which phantoms go to validation: the last `n_validation`, or for classes an equal share of each class
    (taken from the end of each class's list), topped up from the other class where one is short."""
    if labels is None:
        return list(range(count - n_validation, count))
    by_class = {value: [i for i in range(count) if labels[i] == value] for value in (0, 1)}
    wanted = {0: n_validation // 2, 1: n_validation - n_validation // 2}
    for value in (0, 1):  # a class short of its share gives the rest to the other
        other = 1 - value
        shortfall = max(0, wanted[value] - len(by_class[value]))
        wanted[value] -= shortfall
        wanted[other] += shortfall
    return sorted(index for value in (0, 1) for index in by_class[value][len(by_class[value]) - wanted[value]:])


def _atlas_pairs(task: Task, entries: list[dict]) -> list[dict]:
    """Registration pairs: phantom 0 (the atlas) as the moving image of every other phantom, labels included."""
    moving_image, fixed_image, moving_label, fixed_label = registration_keys(task)
    atlas = entries[0]
    return [{moving_image: atlas[task.image_key], fixed_image: entry[task.image_key],
             moving_label: atlas[task.label_key], fixed_label: entry[task.label_key]} for entry in entries[1:]]


def prepare_phantom_task(task_id: str, dataset_dir: str | os.PathLike, *, n: int = 12, n_validation: int = 4,
                         seed: int = 0, **phantom_options: Any) -> Path:
    """Make (or reuse) `n` phantoms in `dataset_dir` and write the task's Decathlon-style datalist there.

    Args:
        task_id: "phantom-seg", "phantom-cls" or "phantom-reg" (a registry task with provenance
            {"synthetic": true}).
        dataset_dir: the folder for the phantoms and the datalist; a folder holding other files is refused.
        n: number of phantoms.
        n_validation: how many of them the "validation" list gets (the rest are "training"); for phantom-cls
            half of them have a lesion where the set allows; for phantom-reg, the pairs whose fixed phantom is
            one of the last `n_validation` (phantom 0, the atlas, is the moving image of every pair).
        seed: the phantom seed (`voco.data.phantoms.ensure_phantoms`).
        phantom_options: further options of `voco.data.phantoms.synthesize`, e.g. a small `shape_range` in tests.
            Without a `shape_range`, the bodies have a consistent size in mm (`TASK_FIELD_OF_VIEW_RANGE`) while
            the spacing varies within thin-slice ranges (`TASK_*_SPACING_RANGE`), as patients on scanners do.

    Returns:
        `dataset_dir`, holding the task's datalist file (`Task.datalist_file`) with paths relative to it:
        phantom-seg entries {"image", "label": label map}, phantom-cls entries {"image", "label": 0 or 1},
        phantom-reg entries {"moving_image", "fixed_image", "moving_label", "fixed_label"} (`registration_keys`).
    """
    task: Task = get_task(task_id)
    if not task.provenance.get("synthetic"):
        raise ConfigError(f"{task.id} is not a synthetic phantom task; give phantom-seg, phantom-cls or "
                          f"phantom-reg.")
    if not (all(isinstance(value, int) and not isinstance(value, bool) for value in (n, n_validation))
            and 1 <= n_validation < n):
        raise ConfigError(f"n_validation is {n_validation!r} for n={n!r} phantoms; give whole numbers with "
                          f"1 <= n_validation < n, so that both training and validation get phantoms.")
    if task.task_type == "registration" and n - n_validation < 2:
        raise ConfigError(f"phantom-reg with n={n} and n_validation={n_validation} leaves no training pair "
                          f"(phantom 0 is the atlas of every pair); give n >= n_validation + 2.")
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    if "shape_range" not in phantom_options:
        phantom_options.setdefault("field_of_view_range", TASK_FIELD_OF_VIEW_RANGE)
        phantom_options.setdefault("in_plane_spacing_range", TASK_IN_PLANE_SPACING_RANGE)
        phantom_options.setdefault("slice_spacing_range", TASK_SLICE_SPACING_RANGE)
    manifest = load_manifest(ensure_phantoms(dataset_dir, n, seed, **phantom_options))
    scans = to_datalist(manifest, dataset_dir)
    classify = task.task_type == "classification"
    labels = [int(bool(scan["attributes"]["lesion"])) for scan in scans] if classify else None
    entries = []
    for index, scan in enumerate(scans):
        entry = {task.image_key: os.path.relpath(scan["image"], dataset_dir)}
        entry[task.label_key] = labels[index] if classify else os.path.relpath(scan["label"], dataset_dir)
        entries.append(entry)
    validation = set(_validation_indices(labels, len(entries), n_validation))
    if task.task_type == "registration":
        entries, validation = _atlas_pairs(task, entries), {index - 1 for index in validation}
    class_names = task.class_names if classify else ("background", *task.class_names)
    write_json_atomically({
        "name": task.id,
        "description": f"{task.dataset}: {n} phantoms, seed {seed}",
        "labels": {str(index): name for index, name in enumerate(class_names)},
        "numTraining": len(entries) - len(validation),
        "training": [entry for index, entry in enumerate(entries) if index not in validation],
        "validation": [entry for index, entry in enumerate(entries) if index in validation],
    }, dataset_dir / task.datalist_file)
    return dataset_dir
