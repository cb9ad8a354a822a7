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

The user's copy of CT-RATE (its layout, manifest and checks) is `voco.benchmark.ct_rate`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.networks.utils import eval_mode
from torch import nn

from voco.benchmark.cells import Cell
from voco.benchmark.ct_rate import TASK_KINDS, require_vision_language, task_modes
from voco.benchmark.finetune import BenchmarkRecord
from voco.benchmark.registry import Task
from voco.errors import ConfigError
from voco.files import write_json_atomically
from voco.pretext.clip import CLIPPretext, batch_reports, check_clip_checkpoint, study_images
from voco.pretext.zero_shot import (DEFAULT_PROMPT_TEMPLATES, balanced_accuracy, finding_phrase, prompt_pairs,
                                    recall_at_k, roc_auc, zero_shot_probabilities)
from voco.tracking import RunLogger

logger = logging.getLogger(__name__)

# The downstream bundle's config files of each mode, added after train.json.
CONFIG_FILES = {"zero_shot": ("vision_language.json",), "finetune": ("vision_language.json", "vocab_finetune.json")}
# Recall@K of the registry (the reference's report_to_volume.py: K = 50 active, 5/10/50/100 in a comment).
RETRIEVAL_KS = (5, 10, 50, 100)
RETRIEVAL_KEY_K = 50
# VocabFine's vocabulary: one (negative, positive) sentence pair per abnormality.
VOCABULARY_TEMPLATES = (("No {finding}.", "{finding}."),)
DEFAULT_MAX_SCANS = 4  # a CT-RATE study holds one to a few reconstructions

# The summary metrics: the rows of `voco benchmark report` (the per-abnormality values stay in MLflow).
SUMMARY_METRIC = re.compile(r"metric/\w+/(mean_\w+|\w+_recall_at_\d+)")


# ---------------------------------------------------------------------------------------------------------------
# Tasks, checkpoints and grid cells


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


def task_findings(task: Task) -> list[str] | None:
    """The findings a study's report is scored on: the task's class names (None for a retrieval-only task)."""
    return list(task.class_names) or None


def epochs_trained(mode: str, max_epochs: int) -> int:
    """A zero-shot row trains nothing: 0 epochs in its record, whatever `max_epochs` says."""
    return 0 if mode == "zero_shot" else int(max_epochs)


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
        write_json_atomically(result, path, default=str)
        for artifact in (path, self.manifest_path):
            if artifact is not None and Path(artifact).is_file():
                run.log_artifact(artifact, "vision_language")
        summary = "  ".join(f"{name.split('/')[-1]} {value:.4f}" for name, value in self.best_values.items())
        print(f"{result.get('task')} ({result.get('mode')}), best evaluation {result['best_epoch']}: {summary}",
              flush=True)
        if self.end_run:
            run.end("FINISHED")
        return result


__all__ = ["CONFIG_FILES", "RETRIEVAL_KS", "VOCABULARY_TEMPLATES", "read_clip_checkpoint", "check_backbone", "checkpoint_spec",
           "checkpoint_backbone",
           "default_scan_size", "default_max_scans", "plan_cells", "precision", "retrieval_metrics", "classification_metrics",
           "StudyReportEmbedding", "CLIPTaskMetrics", "retrieval_key_k", "key_metric", "prompt_pair_logits",
           "VocabularyFineTuning", "VisionLanguageRecord"]
