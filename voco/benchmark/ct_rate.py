"""The user's copy of CT-RATE: its layout, the voco manifest built from it, and its check.

CT-RATE on disk (the public release, huggingface.co/datasets/ibrahimhamamci/CT-RATE), under the folder given as
``--dataset_dir`` (the repository folder, or its ``dataset/`` folder)::

    dataset/train/<patient>/<study>/<volume>.nii.gz    e.g. train/train_1/train_1_a/train_1_a_1.nii.gz
    dataset/valid/<patient>/<study>/<volume>.nii.gz
    dataset/radiology_text_reports/train_reports.csv, validation_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN (one row per volume)
    dataset/multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
        VolumeName + the 18 abnormality columns of the registry's class names (0/1)

A study is the volumes of one ``<study>`` folder (the reconstructions of one scan, which share one report),
encoded together as HLIP encodes a study (``unit="study"``); ``unit="volume"`` makes every volume its own item,
as CT-CLIP's evaluation does. A copy may hold part of the release: CSV rows without a volume are left out.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from voco.benchmark.registry import Task
from voco.data.manifest_checks import ProblemRows
from voco.data.manifest import FINDINGS_KEY, manifest_from_records, save_manifest, to_datalist
from voco.data.reports import IMAGE_SUFFIXES, attach_reports, image_stem
from voco.data.studies import group_studies
from voco.data.volume_checks import inspect_volume
from voco.errors import ConfigError, ManifestError

# The vision-language tasks voco runs, and what each scores.

# The vision-language tasks voco runs, and what each scores.
TASK_KINDS = {"ct-rate-retrieval": "retrieval", "ct-rate-vocab-cls": "classification"}
MODES = ("zero_shot", "finetune")
UNITS = ("study", "volume")  # a manifest item: the volumes of a study together, or each volume

DATASET_NAME = "CT-RATE"
ID_COLUMN = "VolumeName"
REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")  # the report text CT-CLIP and HLIP train on
# split -> (volume folder, reports CSV, labels CSV), relative to the dataset/ folder.
CT_RATE_FILES = {
    "training": ("train", "radiology_text_reports/train_reports.csv",
                 "multi_abnormality_labels/train_predicted_labels.csv"),
    "validation": ("valid", "radiology_text_reports/validation_reports.csv",
                   "multi_abnormality_labels/valid_predicted_labels.csv"),
}


def task_modes(task: Task) -> tuple[str, ...]:
    """The modes a vision-language task runs in: retrieval is zero-shot only; classification also fine-tunes."""
    return ("zero_shot",) if TASK_KINDS.get(task.id) == "retrieval" else MODES


def require_vision_language(task: Task, mode: str | None = None) -> Task:
    """The task, if it is a vision-language task voco runs (and `mode` one of its modes)."""
    if task.task_type != "vision-language" or task.id not in TASK_KINDS or not task.runnable:
        raise ConfigError(f"task {task.id!r} is not a vision-language task voco runs; this configuration runs "
                          f"{' and '.join(TASK_KINDS)}.")
    if mode is not None and mode not in task_modes(task):
        if task_modes(task) == ("zero_shot",):
            raise ConfigError(f"task {task.id} runs zero-shot only, not in the mode {mode!r}; use "
                              f"configs/vision_language.json without vocab_finetune.json.")
        raise ConfigError(f"task {task.id} runs in the modes {', '.join(task_modes(task))}, not {mode!r}; pass one "
                          f"of those as --mode.")
    return task


def ct_rate_folder(dataset_dir: str | os.PathLike) -> Path:
    """The ``dataset/`` folder of a CT-RATE copy (`dataset_dir` itself when it has no ``dataset/`` inside)."""
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"the CT-RATE folder {root} does not exist; give the folder of your CT-RATE copy (the "
                            f"one holding dataset/valid, dataset/radiology_text_reports, ...).")
    return root / "dataset" if (root / "dataset").is_dir() else root


def split_volumes(folder: Path) -> list[Path]:
    """The volumes ``<patient>/<study>/<volume>`` of a split folder, sorted."""
    return sorted(path for path in folder.glob("*/*/*") if path.is_file()
                  and path.name.lower().endswith(IMAGE_SUFFIXES))


def _split_folder(root: Path, split: str) -> tuple[Path, list[Path]]:
    folder = root / CT_RATE_FILES[split][0]
    volumes = split_volumes(folder) if folder.is_dir() else []
    if not volumes:
        raise ManifestError(f"{folder} holds no CT-RATE volume; put the {split} volumes there as "
                            f"{folder.name}/<patient>/<study>/<volume>.nii.gz (the layout of the release).")
    return folder, volumes


def _table(root: Path, split: str, kind: str) -> Path:
    path = root / CT_RATE_FILES[split][1 if kind == "reports" else 2]
    if not path.is_file():
        raise ManifestError(f"the CT-RATE {split} {kind} table {path} does not exist; copy it from the release "
                            f"({Path(*path.parts[-2:])}).")
    return path


def build_ct_rate_manifest(dataset_dir: str | os.PathLike, *, splits: Sequence[str] = ("validation",),
                           unit: str = "study", finding_names: Sequence[str] = (),
                           output: str | os.PathLike | None = None) -> dict:
    """A voco manifest of a CT-RATE copy: one dataset "CT-RATE" (preset ``ct_rate``), one subject per patient
    folder, one study per study folder (or per volume, ``unit="volume"``) with its report (``Findings_EN`` and
    ``Impressions_EN`` of the reports CSV) and, when `finding_names` are given, its findings (those columns of the
    labels CSV); every scan's ``split`` is its folder's ("training" for train/, "validation" for valid/).

    Args:
        splits: which of "training" and "validation" to read.
        output: also write the manifest here (atomically).

    Raises:
        ManifestError: a missing folder or table, a table without the needed columns, or a study left without a
            report (or without labels, where `finding_names` are given): one sentence naming it.
    """
    if unit not in UNITS:
        raise ConfigError(f"unit={unit!r}; use 'study' (the volumes of a study folder together) or 'volume'.")
    unknown = [split for split in splits if split not in CT_RATE_FILES]
    if unknown or not splits:
        raise ConfigError(f"the CT-RATE splits {list(splits)} are not some of {', '.join(CT_RATE_FILES)}.")
    root = ct_rate_folder(dataset_dir)
    records = []
    for split in splits:
        folder, volumes = _split_folder(root, split)
        for path in volumes:
            patient, study = path.parts[-3], path.parts[-2]
            records.append({"dataset": DATASET_NAME, "subject": patient,
                            "study": image_stem(path.name) if unit == "volume" else study,
                            "scan": {"image": path.relative_to(root).as_posix(), "split": split}})
    manifest = manifest_from_records(records, name=DATASET_NAME, modality="CT", preset="ct_rate",
                                     description=f"CT-RATE {', '.join(splits)} volumes under {root}")
    manifest["dataset_dir"] = root.as_posix()
    for split in splits:
        manifest = attach_reports(manifest, _table(root, split, "reports"), id_column=ID_COLUMN,
                                  report_columns=list(REPORT_COLUMNS), finding_columns=[])
        if finding_names:
            manifest = attach_reports(manifest, _table(root, split, "labels"), id_column=ID_COLUMN,
                                      report_columns=[], finding_columns=list(finding_names))
    studies = [(subject["id"], study) for subject in manifest["datasets"][0]["subjects"]
               for study in subject["studies"]]
    for missing, what, kind in ((lambda study: not study.get("report"), "a report", "reports"),
                                (lambda study: finding_names and not study.get(FINDINGS_KEY), "labels", "labels")):
        lacking = [f"{subject}/{study['id']}" for subject, study in studies if missing(study)]
        if lacking:
            raise ManifestError(f"{len(lacking)} of {len(studies)} CT-RATE studies (e.g. {lacking[0]}) have no "
                                f"{what} in the {kind} tables of {root}; add their rows or remove their volumes.")
    if output is not None:
        save_manifest(manifest, output)
    return manifest


def split_scans(manifest: Mapping[str, Any], split: str, *, training_cases: int | None = None,
                seed: int = 0) -> list[dict]:
    """The scan entries (a MONAI datalist) of one split; `training_cases`: a seeded choice of that many studies."""
    datalist = [entry for entry in to_datalist(manifest) if entry.get("split") == split]
    if not datalist:
        raise ManifestError(f"the CT-RATE manifest has no {split} volumes; add them to the copy.")
    if training_cases is None:
        return datalist
    studies = [study["study_id"] for study in group_studies(datalist)]
    if not 1 <= training_cases <= len(studies):
        raise ConfigError(f"training_cases={training_cases} but the {split} split has {len(studies)} studies; use "
                          f"1..{len(studies)}.")
    kept = set(random.Random(seed).sample(studies, training_cases))
    return [entry for entry in datalist if "/".join((entry["dataset"], entry["subject"], entry["study"])) in kept]


def _table_problems(path: Path, columns: Sequence[str], volumes: Sequence[Path], what: str) -> list[dict]:
    """Problem rows of one CSV table of a split: missing, unreadable, without a column, or without some volumes."""
    def row(problem: str) -> dict:
        return {"entry": what, "path": str(path), "problem": problem}

    if not path.is_file():
        return [row(f"{path} does not exist; copy the {what} table from the CT-RATE release.")]
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            reader = csv.DictReader(stream)
            header = [str(name).strip() for name in reader.fieldnames or []]
            ids = {image_stem(line.get(ID_COLUMN) or "") for line in reader} if ID_COLUMN in header else set()
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return [row(f"{path} is not a readable UTF-8 CSV ({type(error).__name__}); copy it again.")]
    problems = [row(f"{path} has no column {column!r}; give the CT-RATE {what} table (its columns are "
                    f"{', '.join(header[:6])}{', ...' if len(header) > 6 else ''}).")
                for column in columns if column not in header]
    if ID_COLUMN in header:
        without = [volume for volume in volumes if image_stem(volume.name) not in ids]
        if without:
            problems.append(row(f"{len(without)} of {len(volumes)} volumes (e.g. {without[0].name}) have no row in "
                                f"{path.name}; add their rows or remove the volumes."))
    return problems


def check_ct_rate_copy(task: Task, dataset_dir: str | os.PathLike, *, read_voxels: bool = True) -> ProblemRows:
    """Check a CT-RATE copy for a vision-language task: the validation volumes (and training volumes, where a
    train/ folder exists) are readable 3-D volumes (headers; voxels too with `read_voxels`), and the reports table
    (and, for the classification task, the labels table) of each split has the needed columns and a row for every
    volume. Rows ``{"entry", "path", "problem"}``, one sentence each; ``rows.scans`` counts the volumes checked."""
    require_vision_language(task)
    rows = ProblemRows()
    try:
        root = ct_rate_folder(dataset_dir)
    except ManifestError as error:
        rows.append({"entry": "dataset", "path": str(dataset_dir), "problem": str(error)})
        return rows
    splits = ["validation"] + (["training"] if (root / CT_RATE_FILES["training"][0]).is_dir() else [])
    for split in splits:
        try:
            _, volumes = _split_folder(root, split)
        except ManifestError as error:
            rows.append({"entry": split, "path": str(root / CT_RATE_FILES[split][0]), "problem": str(error)})
            continue
        rows.extend(_table_problems(root / CT_RATE_FILES[split][1], (ID_COLUMN, *REPORT_COLUMNS), volumes,
                                    f"{split} reports"))
        if task.class_names:
            rows.extend(_table_problems(root / CT_RATE_FILES[split][2], (ID_COLUMN, *task.class_names), volumes,
                                        f"{split} labels"))
        for volume in volumes:
            _, problems = inspect_volume(volume, read_voxels=read_voxels)
            rows.extend({"entry": f"{split}/{volume.relative_to(root / CT_RATE_FILES[split][0])}", "path": str(volume),
                         "problem": problem} for problem in problems)
            rows.scans += 1
    return rows
