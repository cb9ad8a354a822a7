"""The vision-language rows of the downstream benchmark: a study-report model (`voco.pretext.clip.CLIPPretext`, from
a ``clip_pretrain`` checkpoint) on the user's copy of CT-RATE.

- ``ct-rate-retrieval`` (mode ``zero_shot``): every validation study and its report are embedded; Recall@K of the
  matching study among all studies for each report (report -> study) and the other way round (study -> report),
  K in `RETRIEVAL_KS` (the registry's 5, 10, 50, 100; a K above the number of studies is skipped).
- ``ct-rate-vocab-cls``, mode ``zero_shot``: the 18 CT-RATE abnormalities from prompt pairs ("No X." / "X.", the
  templates of `voco.pretext.zero_shot`), softmax over each pair; ROC AUC, balanced accuracy and precision (at
  p >= 0.5) per abnormality over the studies whose label is known, and their means.
- ``ct-rate-vocab-cls``, mode ``finetune``: CT-CLIP's vocabulary fine-tuning (VocabFine). The image side and both
  projections (the text encoder too with ``train_text_encoder``) learn, per abnormality, the softmax over the
  ("No X.", "X.") prompt embeddings with cross-entropy against its label (unknown labels left out); lr 1e-5,
  weight decay 0.1, 10 epochs (the registry's notes). Every epoch the same pair-softmax scores the validation
  studies (the zero-shot metrics of the fine-tuned model under ``metric/vocab_finetune/...``).

The bundle composes these parts (bundles/downstream_benchmark/configs/vision_language.json, and
vocab_finetune.json on top of it): a MONAI `Evaluator` whose iteration embeds a batch of studies
(`StudyReportEmbedding`) and whose key metric (`CLIPTaskMetrics`, an ignite Metric) scores the embeddings with
the functions of `voco.pretext.zero_shot`; VocabFine trains `VocabularyFineTuning` with voco's `PretextTrainer`;
`VisionLanguageRecord` leaves what `voco benchmark report` reads in MLflow. `voco benchmark run` plans the cells
(`plan_cells`) and picks the config files (`CONFIG_FILES`).

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
import functools
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.networks.utils import eval_mode
from torch import nn

from voco.benchmark.finetune import BenchmarkRecord
from voco.benchmark.registry import Task
from voco.benchmark.runs import Cell
from voco.data.folder import ProblemRows
from voco.data.manifest import FINDINGS_KEY, manifest_from_records, save_manifest, to_datalist
from voco.data.studies import IMAGE_SUFFIXES, attach_reports, group_studies, image_stem
from voco.data.volumes import inspect_volume
from voco.errors import ConfigError, ManifestError
from voco.pretext.clip import CLIPPretext, batch_reports, check_clip_checkpoint, study_images
from voco.pretext.zero_shot import (DEFAULT_PROMPT_TEMPLATES, balanced_accuracy, finding_phrase, prompt_pairs,
                                    recall_at_k, roc_auc, zero_shot_probabilities)
from voco.tracking import RunLogger

logger = logging.getLogger(__name__)

# The vision-language tasks voco runs, and what each scores.
TASK_KINDS = {"ct-rate-retrieval": "retrieval", "ct-rate-vocab-cls": "classification"}
MODES = ("zero_shot", "finetune")
# The downstream bundle's config files of each mode, added after train.json.
CONFIG_FILES = {"zero_shot": ("vision_language.json",), "finetune": ("vision_language.json", "vocab_finetune.json")}
# Recall@K of the registry (the reference's report_to_volume.py: K = 50 active, 5/10/50/100 in a comment).
RETRIEVAL_KS = (5, 10, 50, 100)
RETRIEVAL_KEY_K = 50
# VocabFine's vocabulary: one (negative, positive) sentence pair per abnormality.
VOCABULARY_TEMPLATES = (("No {finding}.", "{finding}."),)
UNITS = ("study", "volume")
DEFAULT_MAX_SCANS = 4  # a CT-RATE study holds one to a few reconstructions

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
# The summary metrics: the rows of `voco benchmark report` (the per-abnormality values stay in MLflow).
SUMMARY_METRIC = re.compile(r"metric/\w+/(mean_\w+|\w+_recall_at_\d+)")


# ---------------------------------------------------------------------------------------------------------------
# Tasks, checkpoints and grid cells


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


def read_clip_checkpoint(path: str | os.PathLike | None) -> dict[str, Any]:
    """A ``clip_pretrain`` checkpoint read with weights only, checked to hold a CLIP model."""
    from voco.checkpoints import read_checkpoint

    if path in (None, "", "scratch"):
        raise ConfigError("the vision-language tasks evaluate a CLIP model, not scratch; give --pretrained with a "
                          "checkpoint of bundles/clip_pretrain (runs/<run>/checkpoints/checkpoint_final.pt).")
    checkpoint = read_checkpoint(Path(path).expanduser())
    check_clip_checkpoint(checkpoint, f"the checkpoint {path}")
    return checkpoint


def check_backbone(spec: Mapping[str, Any], backbone: str, size: Any) -> None:
    """Refuse a --backbone / --size that is not the checkpoint's: the run's name and tags would say otherwise."""
    if (str(backbone), str(size)) != (str(spec["name"]), str(spec["size"])):
        raise ConfigError(f"the CLIP checkpoint holds a {spec['name']} {spec['size']} encoder, but --backbone "
                          f"{backbone} --size {size} was given; leave both out (they come from the checkpoint).")


def checkpoint_spec(spec: Mapping[str, Any]):
    """What a fine-tuned model's checkpoint stores beside its weights, so `read_clip_checkpoint` reads it again."""
    from voco.engine import RunInfo

    backbone = {key: value for key, value in spec.items() if key not in ("pretext", "clip")}
    return RunInfo(backbone, "clip", clip=dict(spec["clip"]))


def default_scan_size(spec: Mapping[str, Any], task: Task) -> list[int]:
    """Each scan's size: the ViT's input size from the checkpoint, else the task's roi (96^3, a Swin's input)."""
    return [int(size) for size in (spec.get("input_size") or task.roi_size)]


def default_max_scans(spec: Mapping[str, Any]) -> int:
    """Scans per study: the checkpoint's max_scans (a ViT's scan-index table) up to `DEFAULT_MAX_SCANS`."""
    return min(int(spec.get("max_scans", DEFAULT_MAX_SCANS)), DEFAULT_MAX_SCANS)


@functools.lru_cache(maxsize=16)
def _checkpoint_backbone(path: str, modified_ns: int) -> tuple[str, str]:
    spec = read_clip_checkpoint(path)["backbone_spec"]
    return str(spec["name"]), str(spec["size"])


def checkpoint_backbone(path: str | os.PathLike) -> tuple[str, str]:
    """(backbone name, size) of a CLIP checkpoint; each file is read once while it stays unchanged (a grid asks for
    every checkpoint once per vision-language task)."""
    resolved = Path(path).expanduser().resolve()
    return _checkpoint_backbone(str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else -1)


def plan_cells(task: Task, sources: Sequence[str], *, modes: Sequence[str] | None, seeds: Sequence[int],
               training_cases: int | None = None) -> list[Cell]:
    """The grid cells of a vision-language task (`voco.benchmark.runs.plan_grid` calls this).

    Each CLIP checkpoint of `sources` is evaluated in the task's modes among `modes` (all of the task's modes where
    none of `modes` is one of them, or `modes` is None); "scratch" is no CLIP model and gets no cell. A zero-shot
    cell is deterministic, so it runs with the first seed only (and all training cases). Backbone and size come
    from the checkpoint, so the run name says what was evaluated.
    """
    checkpoints = [source for source in sources if source != "scratch"]
    if not checkpoints:
        raise ConfigError(f"the vision-language task {task.id} evaluates a CLIP model, not scratch; give --pretrained "
                          f"with a checkpoint of bundles/clip_pretrain (runs/<run>/checkpoints/checkpoint_final.pt).")
    wanted = [mode for mode in (modes or ()) if mode in task_modes(task)] or list(task_modes(task))
    cells = []
    for source in checkpoints:
        backbone, size = checkpoint_backbone(source)
        for mode in wanted:
            for seed in (seeds[:1] if mode == "zero_shot" else seeds):
                cells.append(Cell(task.id, source, mode, seed, backbone, size,
                                  None if mode == "zero_shot" else training_cases))
    return cells


# ---------------------------------------------------------------------------------------------------------------
# The user's copy of CT-RATE


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


# ---------------------------------------------------------------------------------------------------------------
# Scoring embeddings


def precision(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Precision per finding ``[F]`` at p >= threshold (MONAI's confusion-matrix metric) from ``probabilities
    [N, F]`` and 0/1 ``labels [N, F]`` (NaN: unknown, left out); NaN where no study is called positive.

    >>> precision(torch.tensor([[0.9], [0.8], [0.1]]), torch.tensor([[1.0], [0.0], [1.0]]))
    tensor([0.5000])
    """
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    values = []
    for finding in range(labels.shape[1]):
        known = ~torch.isnan(labels[:, finding])
        called = (probabilities[known, finding:finding + 1] >= threshold).float()
        confusion = get_confusion_matrix(called, labels[known, finding:finding + 1]).sum(dim=0)  # [1, 4]
        values.append(compute_confusion_matrix_metric("precision", confusion))
    return torch.cat(values) if values else torch.zeros(0)


def retrieval_metrics(study_embeddings: torch.Tensor, report_embeddings: torch.Tensor,
                      ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """``metric/retrieval/report_to_study_recall_at_<k>`` and ``.../study_to_report_recall_at_<k>`` (`recall_at_k`:
    row i of both is one study and its report; a K above the number of studies is skipped)."""
    metrics = {}
    for direction, (queries, candidates) in {"report_to_study": (report_embeddings, study_embeddings),
                                             "study_to_report": (study_embeddings, report_embeddings)}.items():
        for k, recall in recall_at_k(queries, candidates, ks).items():
            metrics[f"metric/retrieval/{direction}_recall_at_{k}"] = recall
    return metrics


def classification_metrics(pretext: CLIPPretext, study_embeddings: torch.Tensor, labels: torch.Tensor,
                           finding_names: Sequence[str], templates: Sequence[Sequence[str]],
                           family: str = "zero_shot") -> dict[str, float]:
    """Each abnormality's probability from its prompt pairs (`zero_shot_probabilities`), scored against ``labels
    [N, F]``: ``metric/<family>/<name>/{auc, balanced_accuracy, precision}`` and ``metric/<family>/mean_auc``,
    ``mean_balanced_accuracy``, ``mean_precision`` (NaN values skipped)."""
    device = next(pretext.parameters()).device
    with eval_mode(pretext):
        probabilities = zero_shot_probabilities(pretext, study_embeddings.to(device),
                                                [finding_phrase(name) for name in finding_names], templates).cpu()
    scores = {"auc": roc_auc(probabilities, labels), "balanced_accuracy": balanced_accuracy(probabilities, labels),
              "precision": precision(probabilities, labels)}
    metrics = {f"metric/{family}/{name}/{score}": float(values[index])
               for index, name in enumerate(finding_names) for score, values in scores.items()}
    metrics.update({f"metric/{family}/mean_{score}": float(values.nanmean()) for score, values in scores.items()})
    return metrics


class StudyReportEmbedding:
    """The `iteration_update` of a MONAI `Evaluator`: one batch of studies -> ``{"study": [B, E], "report": [B, E],
    "findings": [B, F], "study_id": B ids}`` (CPU), encoded in evaluation mode without gradients; prints progress
    every `progress_every` batches (a CT-RATE validation pass is long)."""

    def __init__(self, pretext: CLIPPretext, progress_every: int = 50) -> None:
        self.pretext, self.progress_every = pretext, max(1, int(progress_every))

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        images, scan_mask = study_images(batch)
        device = engine.state.device
        with eval_mode(self.pretext):
            studies = self.pretext.encode_studies(images.to(device), None if scan_mask is None else
                                                  scan_mask.to(device))
            reports = self.pretext.encode_reports(batch_reports(batch, images.shape[0]))
        if engine.state.iteration % self.progress_every == 0:
            print(f"embedded {engine.state.iteration}/{engine.state.epoch_length} batches of studies", flush=True)
        return {"study": studies.float().cpu(), "report": reports.float().cpu(),
                "findings": torch.as_tensor(batch["findings"], dtype=torch.float32).cpu(),
                "study_id": [str(study_id) for study_id in batch["study_id"]]}


class CLIPTaskMetrics(Metric):
    """The metrics of one vision-language task over an evaluation pass, as an ignite Metric: `update` collects the
    embeddings of `StudyReportEmbedding`, `compute` returns the dict of `retrieval_metrics` or
    `classification_metrics`, which ignite puts into ``engine.state.metrics`` (one entry each). A study that the
    loader gave twice (`SkipBadVolumes` puts the next study in place of one none of whose scans loads) counts once.

    Args:
        pretext: the CLIP model (prompt embeddings and logit scale for classification).
        kind: "retrieval" or "classification".
        key: the entry the engine compares across evaluations (the key metric); NaN, with a warning, where it
            cannot be computed (fewer studies than its K after bad ones were left out).
        finding_names, templates, family: as `classification_metrics`.
        ks: as `retrieval_metrics`.
    """

    required_output_keys = ("study", "report", "findings", "study_id")

    def __init__(self, pretext: CLIPPretext, kind: str, key: str, *, finding_names: Sequence[str] = (),
                 templates: Sequence[Sequence[str]] = DEFAULT_PROMPT_TEMPLATES, ks: Sequence[int] = RETRIEVAL_KS,
                 family: str = "zero_shot") -> None:
        self.pretext, self.kind, self.key = pretext, kind, key
        self.finding_names, self.templates = list(finding_names), [tuple(pair) for pair in templates]
        self.ks, self.family = [int(k) for k in ks], family
        super().__init__(skip_unrolling=True, metrics_result_mode="flatten")

    def reset(self) -> None:
        self._studies: list[torch.Tensor] = []
        self._reports: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ids: list[str] = []

    def update(self, output: Sequence[Any]) -> None:
        studies, reports, labels, ids = output
        self._studies.append(studies)
        self._reports.append(reports)
        self._labels.append(labels)
        self._ids.extend(ids)

    def compute(self) -> dict[str, float]:
        if not self._ids:
            raise ConfigError("the vision-language evaluation saw no study; check the validation split of the copy.")
        first = list({study_id: index for index, study_id in reversed(list(enumerate(self._ids)))}.values())
        keep = torch.tensor(sorted(first))
        if len(keep) < len(self._ids):
            logger.warning("%d studies were given twice (in place of studies that failed to load) and count once",
                           len(self._ids) - len(keep))
        studies, reports = torch.cat(self._studies)[keep], torch.cat(self._reports)[keep]
        if self.kind == "retrieval":
            metrics = retrieval_metrics(studies, reports, self.ks)
        else:
            metrics = classification_metrics(self.pretext, studies, torch.cat(self._labels)[keep],
                                              self.finding_names, self.templates, self.family)
        if self.key not in metrics:
            logger.warning("%s cannot be computed on %d studies; it is NaN", self.key, len(keep))
            metrics[self.key] = float("nan")
        return metrics


def retrieval_key_k(ks: Sequence[int], num_studies: int) -> int:
    """The K of the retrieval key metric: the registry's 50 where there are that many studies, else the largest K
    of `ks` that fits."""
    fitting = [int(k) for k in ks if int(k) <= num_studies]
    if not fitting:
        raise ConfigError(f"the validation split has {num_studies} studies, fewer than every K of Recall@K "
                          f"({', '.join(map(str, ks))}); add studies or give retrieval_ks with a smaller K.")
    return RETRIEVAL_KEY_K if RETRIEVAL_KEY_K in fitting else max(fitting)


def key_metric(task: Task, pretext: CLIPPretext, *, num_studies: int, family: str = "zero_shot",
               templates: Sequence[Sequence[str]] = DEFAULT_PROMPT_TEMPLATES,
               ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, CLIPTaskMetrics]:
    """The evaluator's ``key_val_metric``: report -> study Recall@K (`retrieval_key_k`) for retrieval, the mean AUC
    over abnormalities for classification; the metric object computes the task's other metrics alongside."""
    kind = TASK_KINDS[require_vision_language(task).id]
    if kind == "retrieval":
        name = f"metric/retrieval/report_to_study_recall_at_{retrieval_key_k(ks, num_studies)}"
    else:
        name = f"metric/{family}/mean_auc"
    return {name: CLIPTaskMetrics(pretext, kind, name, finding_names=task.class_names, templates=templates, ks=ks,
                                  family=family)}


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary fine-tuning (CT-CLIP's VocabFine)


def prompt_pair_logits(pretext: CLIPPretext, study_embeddings: torch.Tensor, phrases: Sequence[str],
                       templates: Sequence[Sequence[str]]) -> torch.Tensor:
    """The logits ``[N, F, 2]`` (negative, positive) of each study for each finding phrase, with gradients.

    The same prompt ensembling and logit scale as `voco.pretext.zero_shot.zero_shot_probabilities` (softmax of
    these logits, last index, is its probability); written out because that function returns probabilities
    without gradients, and VocabFine trains through the prompt embeddings.
    """
    prompts = [prompt_pairs(phrase, templates) for phrase in phrases]
    texts = [text for negatives, positives in prompts for text in negatives + positives]
    embeddings = pretext.encode_reports(texts).view(len(phrases), 2, len(templates), -1)  # [F, neg|pos, T, E]
    classes = F.normalize(embeddings.mean(dim=2), dim=-1).to(study_embeddings)
    return pretext.current_logit_scale().to(study_embeddings) * torch.einsum("ne,fce->nfc", study_embeddings, classes)


class VocabularyFineTuning(nn.Module):
    """CT-CLIP's vocabulary fine-tuning as a pretext for `voco.engine.PretextTrainer`: ``forward(batch) ->
    {"loss", "metric/train_accuracy"}``.

    Per finding, the softmax over its (negative, positive) prompt embeddings (`prompt_pair_logits`) is trained
    with cross-entropy against the study's 0/1 label; NaN labels are left out (a batch without any known label
    gives a zero loss). The image side (backbone, CLS token), both projections and the logit scale learn; the
    text encoder only with `train_text_encoder` (then as the checkpoint built it: a small encoder entirely, a
    BERT-family one its LayerNorms).

    Args:
        pretext: the CLIP model (trained in place).
        finding_names: the F names of the columns of ``batch["findings"]`` (phrases by `finding_phrase`).
        templates: (negative, positive) sentence pairs with ``{finding}``; default VocabFine's one pair.
        train_text_encoder: let the text encoder learn too.
    """

    def __init__(self, pretext: CLIPPretext, finding_names: Sequence[str],
                 templates: Sequence[Sequence[str]] = VOCABULARY_TEMPLATES, train_text_encoder: bool = False) -> None:
        super().__init__()
        if not finding_names:
            raise ConfigError("vocabulary fine-tuning needs the finding names of the labels; use a classification "
                              "task such as ct-rate-vocab-cls.")
        self.pretext = pretext
        self.phrases = [finding_phrase(name) for name in finding_names]
        self.templates = [tuple(pair) for pair in templates]
        prompt_pairs(self.phrases[0], self.templates)  # refuse bad templates before training
        if not train_text_encoder:
            self.pretext.text_encoder.requires_grad_(False)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images, scan_mask = study_images(batch)
        logits = prompt_pair_logits(self.pretext, self.pretext.encode_studies(images, scan_mask), self.phrases,
                                    self.templates)
        labels = torch.as_tensor(batch["findings"]).to(logits.device, torch.float32)
        if labels.shape != logits.shape[:2]:
            raise ConfigError(f"batch['findings'] has shape {tuple(labels.shape)} but there are {len(self.phrases)} "
                              f"findings for {logits.shape[0]} studies; give the loader the task's class names.")
        known = ~torch.isnan(labels)
        if not bool(known.any()):
            return {"loss": logits.sum() * 0.0, "metric/train_accuracy": torch.tensor(float("nan"))}
        targets = labels[known].long()
        loss = F.cross_entropy(logits[known].float(), targets)
        accuracy = (logits[known].argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "metric/train_accuracy": accuracy.detach()}

    def after_step(self) -> None:
        self.pretext.after_step()  # the logit scale's clamp


# ---------------------------------------------------------------------------------------------------------------
# What the benchmark report reads


def _write_json_atomically(content: Any, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=1, default=str)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class VisionLanguageRecord(BenchmarkRecord):
    """`BenchmarkRecord` (``best/<key metric>``, the ``voco.*`` tags, result.json), plus the summary metrics of the
    best evaluation (`SUMMARY_METRIC`: the means over abnormalities, every Recall@K) as ``best/<name>``, listed in
    the tag ``voco.report_metrics`` (one row each in `voco benchmark report`) and under "metrics" in result.json;
    result.json and the CT-RATE manifest are logged as artifacts (folder ``vision_language``).

    Attach it to the trainer (VocabFine), or to the evaluator itself for a zero-shot run, with ``end_run=True``:
    the evaluator's MLflow handler does not close its run, so this ends it as FINISHED.
    """

    def __init__(self, evaluator: Engine, output_dir: str | Path, settings: Mapping[str, Any],
                 manifest_path: str | Path | None = None, end_run: bool = False) -> None:
        super().__init__(evaluator, output_dir, settings)
        self.manifest_path, self.end_run = manifest_path, bool(end_run)
        self.best_values: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._evaluated)
        super().attach(engine)

    def _evaluated(self, evaluator: Engine) -> None:
        """Print the summary of an evaluation (MONAI's StatsHandler would print every abnormality's three values)
        and keep it where the evaluator, which compared the key metric just before, found a new best."""
        values = {name: float(value) for name, value in evaluator.state.metrics.items()
                  if SUMMARY_METRIC.fullmatch(name)}
        print(f"evaluation {evaluator.state.epoch}: " + "  ".join(f"{name.split('/')[-1]} {value:.4f}"
                                                              for name, value in values.items()), flush=True)
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            self.best_values = values

    def __call__(self, engine: Engine) -> dict:
        result = super().__call__(engine)
        run = RunLogger(engine)
        run.log_metrics({f"best/{name}": value for name, value in self.best_values.items()
                         if name != result["key_metric"]}, step=engine.state.epoch)
        run.set_tags({"voco.report_metrics": ",".join(self.best_values)})
        result["metrics"] = dict(self.best_values)
        path = self.output_dir / "result.json"
        _write_json_atomically(result, path)
        for artifact in (path, self.manifest_path):
            if artifact is not None and Path(artifact).is_file():
                run.log_artifact(artifact, "vision_language")
        summary = "  ".join(f"{name.split('/')[-1]} {value:.4f}" for name, value in self.best_values.items())
        print(f"{result.get('task')} ({result.get('mode')}), best evaluation {result['best_epoch']}: {summary}",
              flush=True)
        if self.end_run:
            run.end("FINISHED")
        return result


__all__ = ["TASK_KINDS", "MODES", "CONFIG_FILES", "RETRIEVAL_KS", "VOCABULARY_TEMPLATES", "UNITS", "CT_RATE_FILES",
           "task_modes", "require_vision_language", "read_clip_checkpoint", "check_backbone", "checkpoint_spec",
           "checkpoint_backbone",
           "default_scan_size", "default_max_scans", "plan_cells", "ct_rate_folder", "build_ct_rate_manifest",
           "split_scans", "check_ct_rate_copy", "precision", "retrieval_metrics", "classification_metrics",
           "StudyReportEmbedding", "CLIPTaskMetrics", "retrieval_key_k", "key_metric", "prompt_pair_logits",
           "VocabularyFineTuning", "VisionLanguageRecord"]
