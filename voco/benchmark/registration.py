"""Registration tasks (IXI, OASIS, phantom-reg) in the downstream bundle's MONAI engines.

MONAI's `SupervisedTrainer` and `SupervisedEvaluator` compute ``loss(network(image), label)`` and
``metric(pred, label)``; a registration network returns ``(warped moving image, displacement field)`` and is judged
against the fixed image and the warped labels, so the two engines get our iteration functions instead
(their ``iteration_update``), and the evaluator gets per-case means as ignite metrics:

    trainer = SupervisedTrainer(..., loss_function=RegistrationLoss(...), iteration_update=registration_train_step)
    evaluator = SupervisedEvaluator(..., iteration_update=evaluation_step(task),
                                    key_val_metric=key_metric(task), additional_metrics=additional_metrics(task))

``evaluator.state.metrics`` then holds ``metric/dice`` (the key metric: mean Dice of the warped moving labels
against the fixed labels), ``metric/dice/<class>`` and ``metric/non_positive_jacobian`` (share of folding voxels),
so the bundle's best-metric bookkeeping, `CheckpointSaver(save_key_metric=True)`, `BenchmarkRecord` and MLflow's
validator handler work as for segmentation. The bundle's ``configs/registration.json`` composes them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode

from voco.benchmark.metrics import non_positive_jacobian_fraction, registration_metrics
from voco.benchmark.registry import Task
from voco.errors import ConfigError

__all__ = ["CaseMean", "additional_metrics", "evaluation_step", "key_metric", "registration_eval_step",
           "registration_train_step"]

IMAGE_KEY = "image"  # moving and fixed images as channels (voco.benchmark.transforms.task_transforms)
MOVING_LABEL_KEY, FIXED_LABEL_KEY = "moving_label", "fixed_label"  # registration_keys of a task with label "label"


def _tensor(value: Any, engine: Engine) -> torch.Tensor | None:
    """A batch entry as a plain tensor on the engine's device (None stays None)."""
    if value is None:
        return None
    value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return value.to(engine.state.device, non_blocking=getattr(engine, "non_blocking", False))


def _pair(engine: Engine, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    if not isinstance(batch, Mapping) or IMAGE_KEY not in batch:
        raise ConfigError(f"a registration batch needs {IMAGE_KEY!r} (moving and fixed images as channels); "
                          f"use voco.benchmark.transforms.task_transforms of a registration task.")
    image = _tensor(batch[IMAGE_KEY], engine).float()
    moving_label, fixed_label = (_tensor(batch.get(key), engine) for key in (MOVING_LABEL_KEY, FIXED_LABEL_KEY))
    fixed = image[:, image.shape[1] // 2:]
    return image, fixed, moving_label, fixed_label


def registration_train_step(engine: Engine, batch: Mapping[str, Any]) -> list[dict[str, float]]:
    """One optimisation step of a registration network: an ``iteration_update`` for MONAI's `SupervisedTrainer`.

    The trainer's ``network`` maps ``image [B, 2m, X, Y, Z]`` (moving, fixed) to ``(warped [B, m, ...],
    ddf [B, 3, ...])`` and its ``loss_function`` is a `RegistrationLoss`; labels (``moving_label``,
    ``fixed_label``) are passed to it where the batch has them. Fires MONAI's FORWARD, LOSS, BACKWARD and MODEL
    completed events as the trainer's own iteration does.

    Returns:
        ``[{"loss": float, "loss/<part>": float, ...}]``: one record, so that
        ``monai.handlers.from_engine(["loss"], first=True)`` reads the loss.
    """
    image, fixed, moving_label, fixed_label = _pair(engine, batch)
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))
    # Our record becomes engine.state.output when this returns; until then the output is None, so that MONAI's
    # decollation at MODEL_COMPLETED (meant for its {image, label, pred} dicts) leaves it alone.
    engine.state.output = None
    amp = bool(getattr(engine, "amp", False))
    with torch.autocast(device_type=image.device.type, enabled=amp):
        warped, ddf = engine.network(image)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        parts = engine.loss_function.components(warped, fixed, ddf, moving_label, fixed_label)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
    engine.state.step_loss = parts["loss"]  # what `finetune.NonFiniteLossGuard` checks at BACKWARD_COMPLETED
    scaler = getattr(engine, "scaler", None)
    if amp and scaler is not None:
        scaler.scale(parts["loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        scaler.step(engine.optimizer)
        scaler.update()
    else:
        parts["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return [{name: float(value.detach()) for name, value in parts.items()}]


def registration_eval_step(engine: Engine, batch: Mapping[str, Any], *,
                           class_names: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Register the batch's pairs without gradients and measure each: an ``iteration_update`` for MONAI's
    `SupervisedEvaluator` (bind `class_names` with :func:`evaluation_step`).

    Returns:
        One record per pair: ``{"dice", "dice/<class>", "non_positive_jacobian"}``
        (:func:`voco.benchmark.metrics.registration_metrics`); without labels only ``non_positive_jacobian``
        (the Dice entries are NaN then, and :class:`CaseMean` skips NaN).
    """
    image, _, moving_label, fixed_label = _pair(engine, batch)
    engine.state.output = None  # as in registration_train_step: MONAI's decollation must not touch our records
    with eval_mode(engine.network):
        _, ddf = engine.network(image)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        records = []
        for index in range(ddf.shape[0]):
            field = ddf[index: index + 1].float()
            if moving_label is None or fixed_label is None:
                records.append({"dice": math.nan, "non_positive_jacobian":
                                float(non_positive_jacobian_fraction(field).mean())})
                continue
            num_classes = (len(class_names) + 1 if class_names is not None
                           else int(max(moving_label.max(), fixed_label.max())) + 1)
            records.append(registration_metrics(field, moving_label[index: index + 1],
                                                fixed_label[index: index + 1], max(num_classes, 2), class_names))
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return records


def evaluation_step(task: Task) -> Callable[[Engine, Mapping[str, Any]], list[dict[str, float]]]:
    """:func:`registration_eval_step` with the task's anatomical label names (for ``dice/<class>``)."""
    return functools.partial(registration_eval_step, class_names=tuple(task.class_names))


class CaseMean(Metric):
    """The mean of one entry of the per-case records an iteration returns, over an epoch (NaN entries skipped).

    ``CaseMean("dice")`` attached as ``"metric/dice"`` puts the mean Dice of the validation pairs into
    ``engine.state.metrics["metric/dice"]``; NaN where no case had a value. Summed across processes under DDP.
    """

    def __init__(self, key: str, output_transform: Callable = lambda output: output,
                 device: str | torch.device = "cpu") -> None:
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Mapping[str, float]] | Mapping[str, float]) -> None:
        for case in [output] if isinstance(output, Mapping) else output:
            value = float(case.get(self.key, math.nan))
            if not math.isnan(value):
                self._sum += value
                self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if int(self._count) else math.nan


def key_metric(task: Task) -> dict[str, Metric]:
    """``{"metric/dice": mean Dice of the warped moving labels}``: the evaluator's key metric."""
    return {"metric/dice": CaseMean("dice")}


def additional_metrics(task: Task) -> dict[str, Metric]:
    """``metric/non_positive_jacobian`` and ``metric/dice/<class>`` for every anatomical label of the task."""
    return {"metric/non_positive_jacobian": CaseMean("non_positive_jacobian"),
            **{f"metric/dice/{name}": CaseMean(f"dice/{name}") for name in task.class_names}}
