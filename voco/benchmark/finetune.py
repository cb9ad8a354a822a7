"""Fine-tuning and evaluation of one downstream task with MONAI engines: the parts the bundle composes.

The bundle (bundles/downstream_benchmark) builds a MONAI `SupervisedTrainer` and `SupervisedEvaluator` from a
registry `Task`; this module supplies what depends on the task type: the datalists, the inferer, the
post-processing and metrics, and two handlers (per-class metrics as scalars, a picture of a validation case).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai import transforms as mt
from monai.handlers import MeanDice, ROCAUC, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer

from voco.benchmark.own_data import read_datalist
from voco.benchmark.registry import Task
from voco.errors import ConfigError, ManifestError, VocoError
from voco.tracking import RunLogger

FINETUNE_TYPES = ("segmentation", "classification")


def task_datalists(task: Task, dataset_dir: str | Path, *, datalist: str | None = None,
                   training_cases: int | None = None, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, validation) entries of the task's Decathlon-style datalist with absolute paths.

    Args:
        datalist: another JSON instead of the registry's file (relative to `dataset_dir`).
        training_cases: keep only this many training cases (a seeded choice): the few-label setting.
    """
    root = Path(dataset_dir).expanduser().resolve()
    name = datalist or task.datalist_file
    if name is None:
        raise ConfigError(f"task {task.id!r} names no datalist file; pass --datalist with a Decathlon-style JSON.")
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; check the dataset with `voco benchmark check {task.id} "
                            f"{root}`.")
    data = read_datalist(path)

    def absolute(entry: Mapping[str, Any]) -> dict:
        return {key: str(root / value) if isinstance(value, str) and key != "id" else value
                for key, value in entry.items()}

    training = [absolute(entry) for entry in data.get("training", [])]
    validation = [absolute(entry) for entry in data.get("validation", [])]
    if not training:
        raise ManifestError(f"{path} has no 'training' entries; add the labelled cases to fine-tune on.")
    if not validation:  # hold out a fifth of the cases, seeded, where the datalist has no validation list
        if len(training) < 2:
            raise ManifestError(f"{path} has {len(training)} training case and no 'validation' list, so none can be "
                                f"held out to validate on; add cases or a 'validation' list.")
        random.Random(seed).shuffle(training)
        count = max(1, len(training) // 5)
        training, validation = training[count:], training[:count]
    if training_cases is not None:
        if not 1 <= training_cases <= len(training):
            raise ConfigError(f"training_cases={training_cases} but {path} has {len(training)} training cases; "
                              f"use 1..{len(training)}.")
        training = random.Random(seed).sample(training, training_cases)
    return training, validation


def require_finetune_type(task: Task, task_types: Sequence[str] = FINETUNE_TYPES) -> Task:
    """The task, if it is runnable and of one of `task_types` (registration.json passes ("registration",))."""
    task_types = tuple(task_types)
    if not task.runnable or task.task_type not in task_types:
        reason = "is marked not runnable (see its notes)" if not task.runnable else f"is a {task.task_type} task"
        hint = ("; registration tasks run with the bundle's registration.json override"
                if task.runnable and task.task_type == "registration" else "")
        raise ConfigError(f"task {task.id!r} {reason}; this configuration runs {' and '.join(task_types)} "
                          f"tasks{hint}.")
    return task


# The run folder's record of the settings it was trained with (resolved values): MONAI's --args_file for
# evaluate.json and inference.json, and what `voco benchmark evaluate / infer RUN` read.
TRAINED_SETTINGS_FILE = "settings.json"
# Settings that shape the network or its inputs: evaluating with another value than the training's cannot work.
MODEL_SETTINGS = ("task", "preset", "spacing", "roi_size", "backbone", "size", "window_size", "vit_layout",
                  "vit_window_size", "vit_position_embedding", "backbone_options")


def record_trained_settings(output_dir: str | Path, settings: Mapping[str, Any]) -> Path | None:
    """Write `settings` (the bundle's ``trained_settings``: task, data, network and run folder, resolved) as
    ``<run folder>/settings.json`` so that the run alone rebuilds its network, transforms and data (rank 0 only)."""
    from voco.distributed import get_rank
    from voco.files import write_json_atomically

    if get_rank() != 0:
        return None
    return write_json_atomically(json.loads(json.dumps(dict(settings), default=str)),
                                 Path(output_dir) / TRAINED_SETTINGS_FILE)


def read_trained_settings(run: str | Path) -> tuple[dict, Path]:
    """(recorded settings, run folder) of a trained run given as its folder, its ``checkpoints/model.pt`` or its
    ``settings.json``; ``output_dir`` is set to the folder where it is now (a run folder may have been moved).

    Raises:
        ConfigError: naming the path and what to give."""
    path = Path(run).expanduser().resolve()
    folder = {TRAINED_SETTINGS_FILE: path.parent, "model.pt": path.parent.parent}.get(path.name, path)
    recorded = folder / TRAINED_SETTINGS_FILE
    if not recorded.is_file():
        raise ConfigError(f"{path} is not a trained run of the downstream bundle ({recorded} is missing); give "
                          f"runs/benchmark/<run name>, the folder a fine-tuning run wrote (runs trained before "
                          f"voco recorded settings.json need the training's overrides instead).")
    try:
        settings = json.loads(recorded.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{recorded} cannot be read ({error}); it is written by the fine-tuning run, so run "
                          f"the training again or give the training's overrides instead.") from None
    return {**settings, "output_dir": str(folder)}, folder


def require_trained_model(model_path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """The `model.pt` that evaluate.json and inference.json read, checked before any volume is cached: the run
    folder is found from the settings, so a command without the training's settings looks in another folder; with
    `settings` (the bundle's ``trained_settings``), those that shape the network must be the training's.

    Raises:
        ConfigError: naming the file (or the settings that differ) and what to give, with the trained runs that
            are there.
    """
    path = Path(model_path)
    if not path.is_file():
        runs = path.parent.parent.parent  # runs/benchmark/<run name>/checkpoints/model.pt
        trained = sorted(model.parent.parent.name for model in runs.glob("*/checkpoints/model.pt"))[:3]
        there = f" ({runs} holds the trained runs {', '.join(trained)})" if trained else ""
        raise ConfigError(f"there is no trained model {path}{there}; evaluate and inference find the run from the "
                          f"settings: give --args_file runs/benchmark/<run name>/{TRAINED_SETTINGS_FILE} (or run "
                          f"`voco benchmark evaluate runs/benchmark/<run name>`).")
    recorded_file = path.parent.parent / TRAINED_SETTINGS_FILE
    if settings is not None and recorded_file.is_file():
        recorded, _ = read_trained_settings(recorded_file)
        given = json.loads(json.dumps(dict(settings), default=str))
        differ = [name for name in MODEL_SETTINGS if name in recorded and recorded[name] != given.get(name)]
        if differ:
            trained_with = ", ".join(f"{name} {recorded[name]!r}" for name in differ)
            given_now = ", ".join(f"{name} {given.get(name)!r}" for name in differ)
            raise ConfigError(f"{path} was trained with {trained_with}, but this command gives {given_now}; drop "
                              f"those overrides (--args_file {recorded_file} gives the training's settings).")
    return path


def warmup_steps(total_steps: int) -> int:
    """The fine-tuning warm-up: a twentieth of the steps, at least one."""
    return max(1, int(total_steps) // 20)


def validation_batch_size(task: Task, batch_size: int) -> int:
    """Whole volumes one at a time for segmentation (sliding-window inference), the training batch otherwise."""
    return 1 if task.task_type == "segmentation" else int(batch_size)


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: those a frozen mode or a linear probe did not freeze."""
    return [parameter for parameter in network.parameters() if parameter.requires_grad]


def inferer(task: Task, sw_batch_size: int = 4, overlap: float = 0.5):
    """Sliding windows of the task's roi for segmentation (whole volumes at validation), one pass otherwise."""
    if task.task_type == "segmentation":
        return SlidingWindowInferer(roi_size=tuple(task.roi_size), sw_batch_size=sw_batch_size, overlap=overlap)
    return SimpleInferer()


def postprocessing(task: Task) -> mt.Compose:
    """Predictions and labels as the metrics want them (one-hot for Dice; probabilities for AUC)."""
    if task.task_type == "segmentation":
        return mt.Compose([mt.AsDiscreted(keys=["pred", "label"], argmax=[True, False],
                                          to_onehot=[task.out_channels, task.out_channels])])
    if task.out_channels == 1:
        return mt.Compose([mt.Activationsd(keys="pred", sigmoid=True)])
    return mt.Compose([mt.Activationsd(keys="pred", softmax=True),
                       mt.AsDiscreted(keys="label", to_onehot=task.out_channels)])


def key_metric(task: Task) -> dict:
    """The task's main metric under our name: ``metric/dice`` (mean foreground Dice) or ``metric/auc``."""
    if task.task_type == "segmentation":
        return {"metric/dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))}
    return {"metric/auc": ROCAUC(output_transform=from_engine(["pred", "label"]))}


def additional_metrics(task: Task) -> dict:
    """Per-class Dice (a vector that `PerClassMetrics` turns into scalars) or accuracy."""
    if task.task_type == "segmentation":
        return {"metric/dice_per_class": MeanDice(include_background=False, reduction="mean_batch",
                                                  output_transform=from_engine(["pred", "label"]))}
    return {"metric/accuracy": _accuracy(task)}


def _accuracy(task: Task):
    from ignite.metrics import Accuracy

    def decided(output):
        predictions, labels = from_engine(["pred", "label"])(output)
        predictions, labels = torch.stack(list(predictions)), torch.stack(list(labels))
        if task.out_channels == 1:
            return (predictions > 0.5).long().view(-1), labels.long().view(-1)
        return predictions.argmax(1), labels.argmax(1)

    return Accuracy(output_transform=decided)


class PerClassMetrics:
    """Turn a per-class metric vector into ``<name>/<class name>`` scalars (MLflow logs scalars only), plus the
    mean over each named group of classes (``groups``, e.g. {"large_organs": ("liver", "spleen", ...)})."""

    def __init__(self, class_names: Sequence[str], name: str = "metric/dice_per_class",
                 prefix: str = "metric/dice", groups: Mapping[str, Sequence[str]] | None = None) -> None:
        self.class_names, self.name, self.prefix = list(class_names), name, prefix
        self.groups = {group: list(members) for group, members in (groups or {}).items()}
        unknown = sorted({member for members in self.groups.values() for member in members} - set(self.class_names))
        if unknown:
            raise ConfigError(f"class groups name {', '.join(unknown)}, which the task does not have; use its "
                              f"class names ({', '.join(self.class_names)}).")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        values = engine.state.metrics.pop(self.name, None)
        if values is None:
            return
        values = torch.as_tensor(values).flatten().tolist()
        by_class = dict(zip(self.class_names, values))
        for class_name, value in by_class.items():
            engine.state.metrics[f"{self.prefix}/{class_name}"] = float(value)
        for group, members in self.groups.items():
            engine.state.metrics[f"{self.prefix}/{group}"] = float(torch.tensor(
                [by_class[member] for member in members]).nanmean())


def inference_images(task: Task, datalist_split: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The images inference predicts by default: those of the held-out cases of ``(training, validation)``."""
    return [entry[task.image_key] for entry in datalist_split[1]]


def inference_datalist(task: Task, images: Sequence[str]) -> list[dict]:
    """Image paths as the entries the task's inference transforms read."""
    return [{task.image_key: image} for image in images]


class ValidationPicture:
    """After a validation that gives the best key metric so far (and after the first): the most labelled axial
    slice of one case — image, ground truth, prediction — in radiological convention with orientation letters,
    as a PNG artifact. The picture of a run is thus its best epoch's, not its last's."""

    def __init__(self, output_dir: str | Path, task: Task, file_name: str = "validation_case.png") -> None:
        self.output_dir, self.task, self.file_name = Path(output_dir), task, file_name
        self.drawn_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> Path | None:
        if self.task.task_type != "segmentation" or not engine.state.output:
            return None
        # MONAI's evaluator updates best_metric_epoch before the handlers run (a plain engine has none: draw)
        best_epoch = getattr(engine.state, "best_metric_epoch", engine.state.epoch)
        if self.drawn_epoch is not None and best_epoch != engine.state.epoch:
            return None
        from voco.pretext.views import new_figure, save_figure, show_axial

        case = engine.state.output[0]
        image = torch.as_tensor(case["image"])[0].float().cpu()
        label = torch.as_tensor(case["label"]).argmax(0).cpu()
        prediction = torch.as_tensor(case["pred"]).argmax(0).cpu()
        z = int(label.sum(dim=(0, 1)).argmax()) if label.any() else image.shape[-1] // 2  # the most labelled slice
        figure, axes = new_figure(9.0, 3.4, 1, 3)
        for axis, (title, overlay) in zip(axes[0], [("image", None), ("ground truth", label),
                                                    ("prediction", prediction)]):
            show_axial(axis, image[:, :, z], letters=True, cmap="gray")
            if overlay is not None:
                masked = torch.where(overlay[:, :, z] > 0, overlay[:, :, z].float(), torch.tensor(float("nan")))
                show_axial(axis, masked, cmap="tab20", alpha=0.5, vmin=0, vmax=max(self.task.out_channels, 2))
            axis.set_title(title)
        score = engine.state.metrics.get("metric/dice")
        figure.suptitle(f"{self.task.id}, epoch {engine.state.epoch} (best so far), axial slice {z}" +
                        ("" if score is None or math.isnan(score) else f", mean Dice {score:.3f}"))
        path = save_figure(figure, self.output_dir / self.file_name, dpi=90)
        self.drawn_epoch = engine.state.epoch
        RunLogger(engine).log_artifact(path, "validation")
        return path


class BenchmarkRecord:
    """At the end of fine-tuning: the best validation value of the key metric as ``best/<key metric>`` and the
    cell's settings as ``voco.*`` tags in the MLflow run (what `voco benchmark report` reads), and the same as
    ``result.json`` in the run folder."""

    def __init__(self, evaluator: Engine, output_dir: str | Path, settings: Mapping[str, Any]) -> None:
        self.evaluator, self.output_dir, self.settings = evaluator, Path(output_dir), dict(settings)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> dict:
        key = getattr(self.evaluator.state, "key_metric_name", None) or next(iter(self.evaluator.state.metrics), "")
        best = getattr(self.evaluator.state, "best_metric", float("nan"))
        result = {"key_metric": key, "best": float(best), "best_epoch": int(getattr(self.evaluator.state,
                                                                                   "best_metric_epoch", -1)),
                  **{k: v for k, v in self.settings.items()}}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        run = RunLogger(engine)
        run.log_metrics({f"best/{key}": float(best)}, step=engine.state.epoch)
        run.set_tags({f"voco.{k}": v for k, v in self.settings.items()} | {"voco.key_metric": key})
        return result


class NonFiniteLossGuard:
    """Skip the optimizer step of a fine-tuning iteration whose loss is NaN or infinite, count it
    (``state.skipped_steps``), and stop the run after `max_bad_steps` of them in a row, as the pretraining engine does.

    Why: MONAI's `SupervisedTrainer` steps on any loss, so one NaN makes every weight NaN and the cell would record
    Dice 0 as a finished result. The gradients are dropped between the backward pass and the optimizer step
    (MONAI's ``BACKWARD_COMPLETED`` event), so the optimizer leaves every weight as it was. The stop is an error: the
    run does not complete, so `BenchmarkRecord` records nothing and `voco benchmark run` reports the cell as failed.
    """

    def __init__(self, max_bad_steps: int = 20) -> None:
        if int(max_bad_steps) < 1:
            raise ConfigError(f"max_bad_steps must be at least 1, got {max_bad_steps}; pass e.g. --max_bad_steps 20.")
        self.max_bad_steps, self.in_a_row = int(max_bad_steps), 0

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.state.skipped_steps = 0
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.utils import CommonKeys

        output = engine.state.output  # MONAI's step: {"loss": ...}; ours (registration) sets state.step_loss
        loss = output[CommonKeys.LOSS] if isinstance(output, Mapping) else getattr(engine.state, "step_loss", None)
        if loss is None:
            raise ConfigError("NonFiniteLossGuard found no loss at BACKWARD_COMPLETED; the iteration must put it in "
                              "engine.state.output['loss'] or engine.state.step_loss.")
        if bool(torch.isfinite(loss.detach()).all()):
            self.in_a_row = 0
            return
        engine.optimizer.zero_grad(set_to_none=True)  # a parameter without a gradient is not stepped
        engine.state.skipped_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"fine-tuning stopped at step {engine.state.iteration}: the loss was NaN or infinite in "
                f"{self.in_a_row} steps in a row; lower --learning_rate, or check the pretrained encoder and the "
                "labels (the cell is not recorded as finished).")


class NonFiniteLossError(VocoError, ArithmeticError):
    """Fine-tuning's loss stayed NaN or infinite (`NonFiniteLossGuard`)."""
