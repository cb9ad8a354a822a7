"""Any labelled dataset as a downstream task: a Decathlon / MSD-style ``dataset.json`` (or a voco manifest whose
scans have label maps) read into a `Task`, so that `voco benchmark check / run` and the downstream bundle fine-tune
on a user's own labels exactly as on a registry task::

    task = resolve_task("my_data/dataset.json")     # or a registry id: resolve_task("btcv")
    task.id, task.class_names, task.in_channels     # "my-liver", ("liver", "tumour"), 1

What is derived from the file, and how to change it:

- the task's name: the dataset's ``name`` (or its folder's), lower case with dashes; a name that is a registry task's
  gets ``-own`` so that its runs never mix with (or are compared to) the registry task's;
- the classes: ``labels`` ({"0": "background", "1": "liver"}, MSD; or nnU-Net v2's {"background": 0, "liver": 1});
- the task type: a training entry's ``label`` that is a file is a segmentation, a number a classification;
- the channels and the preprocessing: ``modality`` (MSD) or ``channel_names`` (nnU-Net v2), one name per channel.
  As in nnU-Net, channels named CT get the CT preset (HU window), any other channel a z-score (preset
  ``mr_zscore``); ``preset``, ``spacing`` and ``roi_size`` override (`voco.data.presets` names the presets).

Such a task has no published number: `voco benchmark report` says so, and never sets a registry task's beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from voco.benchmark.registry import Intensity, Task, get_task, is_whole, load_registry
from voco.data.manifest import is_decathlon, load_manifest, to_datalist
from voco.data.presets import get_preset
from voco.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

DEFAULT_FILE = "dataset.json"  # what a folder given as a task is read from (the MSD / nnU-Net name)
DEFAULT_ROI_SIZE = (96, 96, 96)  # the VoCo benchmark's crop for its CT and MR segmentation tasks
CT_CHANNEL = "CT"  # nnU-Net's rule: a channel named CT is windowed, any other is z-scored
SOURCE_KEY = "own_dataset"  # Task.provenance key of the dataset file an own task was read from


def is_dataset_path(spec: Any) -> bool:
    """True where a task is given as a file or folder (a dataset.json, a manifest) rather than a registry id: a
    ``.json`` name, a path with a folder in it, or a folder holding a dataset.json."""
    text = str(spec)
    return (text.lower().endswith(".json") or os.sep in text or "/" in text
            or (Path(text).expanduser() / DEFAULT_FILE).is_file())


def dataset_file(spec: str | os.PathLike) -> Path:
    """The JSON file behind a task given as a path: the file itself, or ``dataset.json`` in a folder.

    Raises:
        ConfigError: naming the path and what to give, where there is no such file."""
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        path = path / DEFAULT_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give the path of your dataset.json (a Decathlon-style JSON with "
                          f"'labels' and 'training'), its folder, or a registry task id (voco benchmark list).")
    return path


def read_datalist(path: str | os.PathLike) -> dict:
    """A Decathlon-style datalist from a Decathlon JSON (as it is) or from a voco manifest (one entry
    {"image", "label"} per scan with a label map, in the list of the scan's split, "training" by default; the
    manifest's top-level ``labels`` and ``name`` kept).

    Raises:
        ManifestError: naming the file, where it is neither or cannot be read.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ManifestError(f"{path} cannot be read as JSON ({type(error).__name__}: {error}); fix or replace "
                            f"the datalist.") from None
    if is_decathlon(data):
        return data
    if not (isinstance(data, dict) and "format" in data):
        raise ManifestError(f"{path} is not a Decathlon-style datalist (an object with 'training' / 'validation' "
                            f"lists) nor a voco manifest; give one such as dataset.json.")
    manifest = load_manifest(path)
    converted: dict[str, Any] = {key: data[key] for key in ("name", "description", "labels") if key in data}
    modalities = list(dict.fromkeys(dataset["modality"] for dataset in manifest["datasets"]))
    converted["modality"] = {"0": modalities[0]} if len(modalities) == 1 else None
    for scan in to_datalist(manifest):
        if "label" in scan:
            converted.setdefault(scan.get("split") or "training", []).append(
                {"image": scan["image"], "label": scan["label"]})
    if len(modalities) > 1:
        raise ManifestError(f"{path} mixes the modalities {', '.join(modalities)}; fine-tune on one modality "
                            f"at a time (a manifest per modality).")
    if not converted.get("training") and not converted.get("validation"):
        raise ManifestError(f"{path} lists no scan with a 'label' map; add the label map of each labelled scan "
                            f"(\"label\": \"labels/case_001.nii.gz\").")
    return converted


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _label_names(labels: Any, path: Path) -> dict[int, str]:
    """{value: name} from MSD's {"0": "background"} or nnU-Net v2's {"background": 0}."""
    if not isinstance(labels, dict) or not labels:
        return {}
    by_value: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().isdigit() and isinstance(value, str):
            by_value[int(key)] = value
        elif is_whole(value):
            by_value[value] = str(key)
        else:  # nnU-Net's region-based labels ({"whole tumour": [1, 2, 3]}) name overlapping regions, not classes
            raise ManifestError(f"{path} has the label {key!r}: {value!r}; give 'labels' as {{\"0\": \"background\", "
                                f"\"1\": \"<class>\"}} with one whole number per class.")
    return by_value


def _channels(data: Mapping[str, Any], path: Path) -> list[str]:
    """The channel names in order, from ``modality`` (MSD) or ``channel_names`` (nnU-Net v2); ["CT"] if neither."""
    declared = data.get("modality") or data.get("channel_names")
    if declared is None:
        logger.warning("%s names no 'modality' (or 'channel_names'); treating it as one CT channel. Give "
                       "\"modality\": {\"0\": \"MR\"} (or --preset mr_zscore) for MR.", path)
        return [CT_CHANNEL]
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, dict) and declared and all(str(key).isdigit() for key in declared):
        return [str(declared[key]) for key in sorted(declared, key=int)]
    raise ManifestError(f"{path} has the modality {declared!r}; give one name per channel, e.g. "
                        f"{{\"0\": \"CT\"}} or {{\"0\": \"FLAIR\", \"1\": \"T1w\"}}.")


def _first_label(data: Mapping[str, Any], path: Path) -> Any:
    for split in ("training", "validation"):
        for entry in data.get(split) or []:
            if isinstance(entry, dict) and entry.get("label") is not None:
                return entry["label"]
    raise ManifestError(f"{path} has no labelled entry in 'training' or 'validation'; give each case a 'label' "
                        f"(a label map file, or a class number).")


def _sizes(value: Any, name: str, whole: bool) -> tuple | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    fits = len(values) == 3 and all(isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0
                                    and (not whole or float(item).is_integer()) for item in values)
    if not fits:
        kind = "whole numbers" if whole else "numbers (mm)"
        raise ConfigError(f"--{name} {value!r} cannot be used; give three positive {kind} (x, y, z), e.g. "
                          f"{[96, 96, 96] if whole else [1.5, 1.5, 1.5]}.")
    return tuple(int(item) for item in values) if whole else tuple(float(item) for item in values)


def preprocessing(preset: str) -> tuple[tuple[float, float, float] | None, Intensity]:
    """(spacing, intensity) of a task preprocessed as the pretraining preset `preset` preprocesses regions."""
    chosen = get_preset(preset)
    if chosen.intensity == "window":
        low, high = chosen.window
        return chosen.spacing, Intensity(kind="window", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return chosen.spacing, Intensity(kind="zscore", nonzero=True, channel_wise=True)


def task_from_dataset(spec: str | os.PathLike, *, preset: str | None = None,
                      spacing: Sequence[float] | None = None, roi_size: Sequence[int] | None = None) -> Task:
    """The `Task` of a user's labelled dataset (see the module's docstring for what is derived and how).

    Its `datalist_file` is the absolute path of the JSON, its provenance records it (``own_dataset``) and the
    preset; it has no reference results.

    Raises:
        ConfigError / ManifestError: naming the file and the field that cannot be used, and what to give.
    """
    path = dataset_file(spec)
    data = read_datalist(path)
    names = _label_names(data.get("labels"), path)
    label = _first_label(data, path)
    if isinstance(label, str):
        task_type = "segmentation"
        if not names:
            raise ManifestError(f"{path} has label maps but no 'labels'; add \"labels\": {{\"0\": \"background\", "
                                f"\"1\": \"<first class>\", ...}} naming each value of the label maps.")
        if sorted(names) != list(range(len(names))) or len(names) < 2:
            raise ManifestError(f"{path} has the label values {sorted(names)}; a segmentation's 'labels' name the "
                                f"values 0 (background), 1, 2, ... without gaps.")
        class_names = tuple(names[value] for value in range(1, len(names)))
    elif is_whole(label) or (isinstance(label, list) and label and all(is_whole(item) for item in label)):
        task_type = "classification"
        if not names:
            values = sorted({entry["label"] for split in ("training", "validation")
                             for entry in data.get(split) or [] if is_whole(entry.get("label"))})
            names = {value: f"class_{value}" for value in range(max(values, default=1) + 1)}
        class_names = tuple(names.get(value, f"class_{value}") for value in range(max(names) + 1))
        if len(class_names) < 2:
            raise ManifestError(f"{path} names one class; a classification needs at least two (\"labels\": "
                                f"{{\"0\": \"negative\", \"1\": \"positive\"}}).")
    else:
        raise ManifestError(f"{path} has the label {label!r} in its first labelled entry; give a label map file "
                            f"(segmentation) or a class number (classification).")
    channels = _channels(data, path)
    modality = "CT" if all(channel.upper() == CT_CHANNEL for channel in channels) else "MR"
    preset = preset or ("ct_abdomen" if modality == "CT" else "mr_zscore")
    preset_spacing, intensity = preprocessing(preset)
    name = _slug(str(data.get("name") or "")) or _slug(path.parent.name) or "own-task"
    registry = load_registry()
    if name in {known.lower() for known in registry}:
        logger.warning("%s is named %r like a registry task; its runs are named %s-own so that they are never "
                       "compared with that task's published numbers.", path, name, name)
        name = f"{name}-own"
    binary = task_type == "classification" and len(class_names) == 2
    return Task(
        id=name, dataset=str(data.get("description") or data.get("name") or path.parent.name), task_type=task_type,
        modality=modality, body_region=None, class_names=class_names, in_channels=len(channels),
        out_channels=(len(class_names) + 1 if task_type == "segmentation" else 1 if binary else len(class_names)),
        roi_size=_sizes(roi_size, "roi_size", whole=True) or DEFAULT_ROI_SIZE,
        spacing=_sizes(spacing, "spacing", whole=False) or preset_spacing, intensity=intensity,
        metrics=("Dice",) if task_type == "segmentation" else ("AUC", "ACC"), datalist_file=str(path),
        reference_results=None, provenance={SOURCE_KEY: str(path), "preset": preset, "channels": channels},
        notes=("your own labelled data: no published number",))


def resolve_task(spec: str | os.PathLike, *, preset: str | None = None, spacing: Sequence[float] | None = None,
                 roi_size: Sequence[int] | None = None) -> Task:
    """A registry task by id (`get_task`), or a user's dataset given as a path (`task_from_dataset`); `preset`,
    `spacing` and `roi_size` (None: the task's own) change how either is preprocessed."""
    if is_dataset_path(spec):
        return task_from_dataset(spec, preset=preset, spacing=spacing, roi_size=roi_size)
    task = get_task(str(spec))
    changes: dict[str, Any] = {}
    if preset is not None:
        changes["spacing"], changes["intensity"] = preprocessing(preset)
    if spacing is not None:
        changes["spacing"] = _sizes(spacing, "spacing", whole=False)
    if roi_size is not None:
        changes["roi_size"] = _sizes(roi_size, "roi_size", whole=True)
    return replace(task, **changes) if changes else task


def own_dataset(task: Task) -> str:
    """The dataset file an own task was read from; "" for a registry task (the value of the tag
    ``voco.task_source`` by which `voco benchmark report` tells them apart)."""
    return str(task.provenance.get(SOURCE_KEY, ""))


def default_dataset_dir(spec: str | os.PathLike) -> str:
    """The bundle's default ``dataset_dir``: the folder of a dataset given as a path; a registry task needs it.

    Raises:
        ConfigError: for a registry id, saying what to pass."""
    if is_dataset_path(spec):
        return str(dataset_file(spec).parent)
    raise ConfigError(f"the bundle needs --dataset_dir: the folder that holds the {spec} dataset and its datalist "
                      f"JSON (`voco benchmark check {spec} DIR` verifies it).")



def datalist_fingerprint(task: Task, dataset_dir: str | os.PathLike | None, datalist: str | None = None) -> str:
    """The SHA-256 of the datalist a run reads (`datalist`, else the task's own file; relative to `dataset_dir`),
    recorded with the run so that a result names the exact split it came from; "" where there is none."""
    from voco.files import sha256_of

    name = datalist or task.datalist_file
    if not name or dataset_dir is None:
        return ""
    path = Path(name) if Path(name).is_absolute() else Path(dataset_dir) / name
    return sha256_of(path) if path.is_file() else ""
