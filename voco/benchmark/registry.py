"""The downstream task registry: one `Task` per entry of data_manifests/downstream/tasks.json.

The `Task` fields below are the interface the pipelines, networks and the bundle use; loading and validating
the JSON file lives in this module too.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from voco.data.manifest import MODALITY_ALIASES, require_format
from voco.errors import ConfigError, ManifestError

TASK_TYPES = ("segmentation", "classification", "registration", "vision-language")


@dataclass(frozen=True)
class Intensity:
    """How a task scales intensities: a HU window to [b_min, b_max] ("window") or a z-score ("zscore")."""

    kind: str  # "window" | "zscore" | "none" (already scaled by the dataset's own preprocessing)
    a_min: float | None = None
    a_max: float | None = None
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    nonzero: bool = True  # z-score over the foreground only
    channel_wise: bool = True


@dataclass(frozen=True)
class Task:
    """One downstream task.

    Attributes:
        id: registry key, e.g. "btcv", "msd-task09-spleen", "phantom-seg".
        dataset: the dataset's full name.
        task_type: one of TASK_TYPES.
        modality: "CT", "MR", "PET/CT", ...
        body_region: free text ("abdomen", "chest", ...).
        class_names: foreground class names in label order (label value i + 1 is class_names[i]) for segmentation;
            the class names in index order for classification; anatomical labels for registration.
        in_channels: image channels the network takes (2 for registration: moving + fixed).
        out_channels: network outputs (segmentation: len(class_names) + 1 with background; classification:
            number of classes, or 1 for binary with a sigmoid; registration: 3, the displacement field).
        roi_size: training crop / sliding-window size (x, y, z) in voxels.
        spacing: target spacing in mm, or None to keep the file's spacing.
        intensity: see `Intensity`.
        metrics: metric names, e.g. ["Dice"], ["AUC", "ACC"], ["Dice", "non_positive_jacobian"].
        datalist_file: the Decathlon-style JSON expected inside the user's dataset folder, e.g. "dataset_0.json".
        image_key / label_key: keys of the datalist entries.
        runnable: False where the reference facts are incomplete (the reason is in `notes`).
        reference_results: {"source", "metric", "values": {method: number}} from the reference, where known.
        provenance: flags and sources of the reference facts (which README lists the task, inferred fields, ...).
        notes: free-text remarks.
    """

    id: str
    dataset: str
    task_type: str
    modality: str
    body_region: str | None
    class_names: tuple[str, ...]
    in_channels: int | None  # None (and runnable=False) where the reference facts are incomplete
    out_channels: int | None
    roi_size: tuple[int, int, int] | None
    spacing: tuple[float, float, float] | None
    intensity: Intensity | None
    metrics: tuple[str, ...]
    datalist_file: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    runnable: bool = True
    reference_results: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating data_manifests/downstream/tasks.json
#
# Schema (version 1)::
#
#     {"format": "voco-task-registry", "version": 1, "source": "...",
#      "tasks": [{"id": "btcv", "dataset": "...", "task_type": "segmentation", "modality": "CT",
#                 "body_region": "abdomen", "class_names": ["spleen", ...], "in_channels": 1, "out_channels": 14,
#                 "roi_size": [96, 96, 96], "spacing": [1.5, 1.5, 1.5],
#                 "intensity": {"kind": "window", "a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0,
#                               "clip": true} | {"kind": "zscore", "nonzero": true, "channel_wise": true}
#                              | {"kind": "none"},
#                 "metrics": ["Dice"],
#                 "datalist": {"file": "dataset_0.json", "image_key": "image", "label_key": "label"},
#                 "split": {"method": "...", "n_train": 24, "n_val": 6, "n_test_listed": 20},
#                 "reference_results": {"source": "...", "metric": "Dice (%)", "values": {"VoCo-B": 86.64}} | null,
#                 "runnable": true, "provenance": {...}, "notes": ["..."]}]}
#
# Facts the reference does not give (roi, channels, intensity, datalist) are null, allowed only when runnable is
# false. The split facts reach the Task as provenance["split"]. provenance["label_remap"] = {"rule", "source",
# "mapping"?} records labels the reference remaps (raw value -> class): the raw files hold values beyond
# 0..num_classes. provenance["voco_choices"] lists the fields voco filled in where the reference gives none.

REGISTRY_FORMAT = "voco-task-registry"
REGISTRY_VERSION = 1
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "data_manifests" / "downstream" / "tasks.json"
MODALITIES = ("CT", "MR", "PET/CT")
_NONE = type(None)
# key -> (accepted JSON types, what the value must be, in words)
ENTRY_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "text"),
    "dataset": ((str,), "text"),
    "task_type": ((str,), f"one of {', '.join(TASK_TYPES)}"),
    "modality": ((str,), f"one of {', '.join(MODALITIES)}"),
    "body_region": ((str, _NONE), "text or null"),
    "class_names": ((list,), "a list of class names"),
    "in_channels": ((int, _NONE), "a whole number of at least 1, or null"),
    "out_channels": ((int, _NONE), "a whole number of at least 1, or null"),
    "roi_size": ((list, _NONE), "a list of three positive whole numbers, or null"),
    "spacing": ((list, _NONE), "a list of three positive numbers in mm, or null"),
    "intensity": ((dict, _NONE), "an object with kind 'window', 'zscore' or 'none', or null"),
    "metrics": ((list,), "a list of metric names"),
    "datalist": ((dict,), "an object {file, image_key, label_key}"),
    "split": ((dict,), "an object {method, n_train, n_val, n_test_listed}"),
    "reference_results": ((dict, _NONE), "an object {source, metric, values} or null"),
    "runnable": ((bool,), "true or false"),
    "provenance": ((dict,), "an object"),
    "notes": ((list,), "a list of texts"),
}
INTENSITY_FIELDS = {
    "window": {"kind": ((str,), "'window'"), "a_min": ((int, float), "a number"), "a_max": ((int, float), "a number"),
               "b_min": ((int, float), "a number"), "b_max": ((int, float), "a number"),
               "clip": ((bool,), "true or false")},
    "zscore": {"kind": ((str,), "'zscore'"), "nonzero": ((bool,), "true or false"),
               "channel_wise": ((bool,), "true or false")},
    "none": {"kind": ((str,), "'none'")},  # volumes already scaled as the task needs (registration .pkl exports)
}
DATALIST_FIELDS = {"file": ((str, _NONE), "a file name or null"), "image_key": ((str,), "text"),
                   "label_key": ((str,), "text")}
SPLIT_FIELDS = {"method": ((str, _NONE), "text or null"), "n_train": ((int, _NONE), "a whole number or null"),
                "n_val": ((int, _NONE), "a whole number or null"),
                "n_test_listed": ((int, _NONE), "a whole number or null")}
RESULTS_FIELDS = {"source": ((str,), "text"), "metric": ((str,), "text"),
                  "values": ((dict,), "an object {method: number}")}
# What a runnable task cannot do without.
RUNNABLE_NEEDS = ("in_channels", "out_channels", "roi_size", "intensity")
LOWER_IS_BETTER = ("HD95", "SDlogJ", "non_positive_jacobian")


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int in Python; true is not a count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Entry:
    """One registry entry being checked: `fail` raises a ManifestError that names the entry and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str, remedy: str = "fix the entry in the task registry") -> None:
        raise ManifestError(f"{self.where} field '{key}' {problem}; {remedy}.")

    def check_fields(self, fields: Mapping[str, tuple[tuple[type, ...], str]], mapping: Any, prefix: str = "") -> None:
        """Every key of `fields` present with an accepted type, and no other key."""
        for key, (kinds, words) in fields.items():
            if key not in mapping:
                self.fail(prefix + key, f"is missing (it must be {words})")
            value = mapping[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                self.fail(prefix + key, f"must be {words}, not {value!r}")
        unknown = sorted(set(mapping) - set(fields))
        if unknown:
            self.fail(prefix + unknown[0], f"is not part of the schema (known fields: {', '.join(fields)})")


def _intensity(checker: _Entry, value: dict | None) -> Intensity | None:
    if value is None:
        return None
    kind = value.get("kind")
    if kind not in INTENSITY_FIELDS:
        checker.fail("intensity.kind", f"is {kind!r}, not one of {', '.join(INTENSITY_FIELDS)}")
    checker.check_fields(INTENSITY_FIELDS[kind], value, prefix="intensity.")
    if kind == "none":
        return Intensity(kind="none")
    if kind == "zscore":
        return Intensity(kind="zscore", nonzero=value["nonzero"], channel_wise=value["channel_wise"])
    if not value["a_min"] < value["a_max"]:
        checker.fail("intensity", f"has a_min {value['a_min']} not below a_max {value['a_max']}")
    return Intensity(kind="window", a_min=float(value["a_min"]), a_max=float(value["a_max"]),
                     b_min=float(value["b_min"]), b_max=float(value["b_max"]), clip=value["clip"])


def _channels_agree(checker: _Entry, entry: dict) -> None:
    """out_channels must match the classes: segmentation adds background, binary classification may use one logit."""
    task_type, classes, in_channels, out_channels = (entry["task_type"], len(entry["class_names"]),
                                                     entry["in_channels"], entry["out_channels"])
    if out_channels is None:
        return
    if task_type == "segmentation" and classes and out_channels != classes + 1:
        checker.fail("out_channels", f"is {out_channels} but a segmentation of {classes} classes needs "
                                     f"{classes + 1} (the classes plus background)")
    one_logit = classes == 2 and out_channels == 1
    if task_type == "classification" and classes and out_channels != classes and not one_logit:
        checker.fail("out_channels", f"is {out_channels} but a classification into {classes} classes needs "
                                     f"{classes} (or 1 for two classes with a sigmoid)")
    if task_type == "registration" and (out_channels != 3 or in_channels not in (None, 2)):
        checker.fail("out_channels", f"is {out_channels} with in_channels {in_channels}, but registration takes 2 "
                                     f"channels (moving, fixed) and predicts a 3-channel displacement field")


def _task_from_entry(entry: Any, where: str) -> Task:
    """Validate one registry entry and build its Task; ManifestError names the entry and field of a problem."""
    checker = _Entry(where)
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} must be a JSON object, not {type(entry).__name__}; fix the task registry.")
    checker.check_fields(ENTRY_FIELDS, entry)
    if entry["task_type"] not in TASK_TYPES:
        checker.fail("task_type", f"is the unknown task type {entry['task_type']!r}",
                     f"use one of {', '.join(TASK_TYPES)}")
    if entry["modality"] not in MODALITIES:
        checker.fail("modality", f"is {entry['modality']!r}, not one of {', '.join(MODALITIES)}")
    for key in ("class_names", "metrics", "notes"):
        if not all(isinstance(item, str) and item for item in entry[key]):
            checker.fail(key, "must hold non-empty texts only")
    for key in ("in_channels", "out_channels"):
        if entry[key] is not None and entry[key] < 1:
            checker.fail(key, f"is {entry[key]}", "give a whole number of at least 1")
    for key, check, words in (("roi_size", lambda v: is_whole(v) and v > 0, "positive whole numbers"),
                              ("spacing", lambda v: _is_number(v) and v > 0, "positive numbers")):
        if entry[key] is not None and (len(entry[key]) != 3 or not all(map(check, entry[key]))):
            checker.fail(key, f"is {entry[key]!r}", f"give three {words} (x, y, z)")
    intensity = _intensity(checker, entry["intensity"])
    checker.check_fields(DATALIST_FIELDS, entry["datalist"], prefix="datalist.")
    checker.check_fields(SPLIT_FIELDS, entry["split"], prefix="split.")
    results = entry["reference_results"]
    if results is not None:
        checker.check_fields(RESULTS_FIELDS, results, prefix="reference_results.")
        for method, number in results["values"].items():
            if not _is_number(number):
                checker.fail(f"reference_results.values.{method}", f"must be a number, not {number!r}")
    if entry["runnable"]:
        # a vision-language task reads its dataset's own layout (CT-RATE: folders and CSV tables, no datalist) and
        # predicts no channels; retrieval has no classes
        vision_language = entry["task_type"] == "vision-language"
        needs = [key for key in RUNNABLE_NEEDS if not (vision_language and key == "out_channels")]
        missing = [key for key in needs if entry[key] is None]
        missing += [key for key in ("class_names", "metrics") if not entry[key]
                    and not (vision_language and key == "class_names")]
        missing += ["datalist.file"] if entry["datalist"]["file"] is None and not vision_language else []
        if missing:
            checker.fail(missing[0], "is not given but the task is runnable",
                         "give it, or set runnable to false and say why in notes")
    _channels_agree(checker, entry)
    return Task(
        id=entry["id"], dataset=entry["dataset"], task_type=entry["task_type"], modality=entry["modality"],
        body_region=entry["body_region"], class_names=tuple(entry["class_names"]),
        in_channels=entry["in_channels"], out_channels=entry["out_channels"],
        roi_size=tuple(entry["roi_size"]) if entry["roi_size"] is not None else None,
        spacing=tuple(float(size) for size in entry["spacing"]) if entry["spacing"] is not None else None,
        intensity=intensity, metrics=tuple(entry["metrics"]), datalist_file=entry["datalist"]["file"],
        image_key=entry["datalist"]["image_key"], label_key=entry["datalist"]["label_key"],
        runnable=entry["runnable"], reference_results=results,
        provenance={**entry["provenance"], "split": dict(entry["split"])},  # Task has no split field of its own
        notes=tuple(entry["notes"]))


def validate_registry(registry: Any, source: str = "task registry") -> dict[str, Task]:
    """Check a task registry's structure and every entry; returns the tasks by id, in file order.

    Raises:
        ManifestError: naming the entry (index and id) and the field of the first problem.
    """
    require_format(registry, REGISTRY_FORMAT, REGISTRY_VERSION, source, "task registry",
                   "a registry such as data_manifests/downstream/tasks.json")
    entries = registry.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{source} has no 'tasks' list; add one entry per downstream task.")
    tasks: dict[str, Task] = {}
    for index, entry in enumerate(entries):
        task_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"{source}: tasks[{index}]" + (f" ({task_id})" if isinstance(task_id, str) else "")
        if isinstance(task_id, str) and task_id in tasks:
            raise ManifestError(f"{where} repeats the task id {task_id!r}; give each task its own id.")
        if isinstance(task_id, str) and not task_id.strip():
            raise ManifestError(f"{where} has an empty 'id'; give the task an id.")
        task = _task_from_entry(entry, where)
        tasks[task.id] = task
    return tasks


def load_registry(path: str | os.PathLike | None = None) -> dict[str, Task]:
    """Read and validate the downstream task registry; without `path`, data_manifests/downstream/tasks.json.

    Returns:
        {task id: Task}, in the order of the file.
    """
    path = Path(path).expanduser().resolve() if path is not None else DEFAULT_REGISTRY
    if not path.is_file():
        raise ManifestError(f"task registry {path} does not exist; check the path (the registry ships in "
                            f"data_manifests/downstream/tasks.json).")
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"task registry {path} is not valid JSON ({error}); fix the file.") from error
    return validate_registry(registry, source=str(path))


def get_task(task_id: str, registry: Mapping[str, Task] | None = None) -> Task:
    """The task with this id (case does not matter); ConfigError with the closest ids for an unknown one."""
    registry = load_registry() if registry is None else registry
    if task_id in registry:
        return registry[task_id]
    by_lower = {known.lower(): known for known in registry}
    wanted = str(task_id).lower()
    if wanted in by_lower:
        return registry[by_lower[wanted]]
    close = [by_lower[match] for match in difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.5)]
    hint = f"did you mean {' or '.join(repr(match) for match in close)}? " if close else ""
    raise ConfigError(f"there is no downstream task {task_id!r}; {hint}`voco benchmark list` shows all "
                      f"{len(registry)} tasks.")


# ---------------------------------------------------------------------------------------------------------------
# Listing


def reference_number(task: Task, method: str | None = None) -> float | None:
    """A number the reference reports for `task`: that of `method` (case-insensitive), else the best one.

    "Best" is the highest value (the lowest for distance-like metrics such as HD95). None when the reference reports
    no results for the task, or none for `method`.
    """
    results = task.reference_results
    if not results or not results.get("values"):
        return None
    values = results["values"]
    if method is not None:
        matches = [number for name, number in values.items() if name.lower() == method.lower()]
        return float(matches[0]) if matches else None
    lower_is_better = any(results.get("metric", "").startswith(name) for name in LOWER_IS_BETTER)
    return float(min(values.values()) if lower_is_better else max(values.values()))


def _modality_key(modality: str) -> str:
    return MODALITY_ALIASES.get(modality.upper(), modality.upper())  # "MRI" and "mr" both mean MR


def task_rows(task_type: str | None = None, modality: str | None = None,
              registry: Mapping[str, Task] | None = None) -> list[dict]:
    """One summary row per task, optionally only those of a task type and / or a modality ("MRI" means "MR").

    Rows: {"id", "type", "modality", "classes", "roi", "spacing", "metric", "reference", "runnable"}, with roi and
    spacing as lists (None when not given) and reference the best number the reference reports (or None).
    """
    registry = load_registry() if registry is None else registry
    if task_type is not None and task_type not in TASK_TYPES:
        raise ConfigError(f"the task type {task_type!r} is unknown; use one of {', '.join(TASK_TYPES)}.")
    rows = []
    for task in registry.values():
        if task_type is not None and task.task_type != task_type:
            continue
        if modality is not None and _modality_key(task.modality) != _modality_key(modality):
            continue
        rows.append({"id": task.id, "type": task.task_type, "modality": task.modality, "classes": task.num_classes,
                     "roi": list(task.roi_size) if task.roi_size is not None else None,
                     "spacing": list(task.spacing) if task.spacing is not None else None,
                     "metric": ", ".join(task.metrics), "reference": reference_number(task),
                     "runnable": task.runnable})
    return rows


def _sizes(values: Sequence[float] | None, missing: str) -> str:
    return "×".join(f"{value:g}" for value in values) if values is not None else missing


def format_task_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The plain-text table that `voco benchmark list` prints, with a count line at the end."""
    if not rows:
        return "no tasks match"
    header = ("id", "type", "modality", "classes", "roi", "spacing", "metric", "reference", "runnable")
    cells = [[str(row["id"]), str(row["type"]), str(row["modality"]), str(row["classes"]),
              _sizes(row["roi"], "-"), _sizes(row["spacing"], "native"), row["metric"] or "-",
              f"{row['reference']:g}" if row["reference"] is not None else "-",
              "yes" if row["runnable"] else "no"] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths)).rstrip()

    runnable = sum(1 for row in rows if row["runnable"])
    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, cells),
                      f"{len(rows)} tasks, {runnable} runnable"])


def registration_keys(task: Task) -> tuple[str, str, str, str]:
    """Datalist keys of a registration pair: moving image, fixed image, moving label, fixed label.

    They are the task's image and label keys with a ``moving_`` / ``fixed_`` prefix, e.g. ``moving_image``.
    """
    return (f"moving_{task.image_key}", f"fixed_{task.image_key}",
            f"moving_{task.label_key}", f"fixed_{task.label_key}")
