"""The trainer that runs any pretext.

A pretext is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., "loss/<part>": ...,
"metric/<name>": ..., "health/<name>": ...}`` and may have ``after_step()`` (teacher updates) (`voco.seeding.Pretext`).
`PretextTrainer` is a MONAI `Trainer` (an ignite Engine), so MONAI's handlers — `LrScheduleHandler`,
`CheckpointSaver`, `CheckpointLoader`, `MLFlowHandler` from ``--tracking mlflow`` — attach to it unchanged.

Why our own step instead of `SupervisedTrainer`: a pretext has no (image, label) pair and no separate loss
function; it makes its own views from the batch and returns a dict of losses and metrics.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents

from voco.distributed import get_rank, is_distributed, unwrap
from voco.engine.random_state import RandomState
from voco.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
# Counters kept in the trainer state, so that checkpoints carry them across a resume (ignite's user keys).
COUNTERS = ("skipped_volumes", "skipped_steps", "bad_steps_in_a_row")
# Exit code of a run stopped after `max_bad_steps` non-finite steps in a row. A run stopped by a signal exits with
# 128 + the signal number (SIGTERM 143, SIGINT 130), as shells report a process that the signal ended.
EXIT_NON_FINITE = 3


def autocast(device: torch.device, precision: str):
    """bf16 autocast on any device (MONAI engines' `amp` is CUDA fp16 only); a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# Loader keys that stay on the host: counts the trainer adds up without a device sync.
HOST_KEYS = ("skipped_volumes", "dropped_scans", "num_scans")


def batch_to_device(batch: Mapping[str, Any], device: torch.device, non_blocking: bool = False) -> dict[str, Any]:
    """The batch for the pretext: its tensors on `device` as plain tensors (regions, studies, scan masks, findings),
    other values (report texts, ids) as they are, host counters left out."""
    return {key: _plain(value).to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items() if key not in HOST_KEYS}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (no metadata to carry through every op, and compiled code needs it)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def scalars(output: Mapping[str, Any]) -> dict[str, float]:
    """Python floats of the scalar entries of a step's output (one host sync; call only when logging)."""
    values = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            values[key] = float(value.detach())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


class _WorkerErrorsInOneLine(logging.Filter):
    """ignite logs the exception that ends an epoch with its message; one re-raised from a DataLoader worker carries
    the worker's whole traceback in its message, so the log shows it as the error's sentence instead (an error that
    is not ours still reaches Python with its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Original Traceback" in message:
            record.msg, record.args = message.split(":", 1)[0] + ": " + message.strip().splitlines()[-1], ()
        return True


class PretextTrainer(Trainer):
    """Runs ``pretext(batch)`` for `max_steps` optimizer steps with bf16, gradient accumulation and clipping.

    Args:
        device: where regions and the model live.
        pretext: the pretext module (its backbone inside).
        optimizer: over ``pretext.parameters()``.
        train_data_loader: yields ``{"image": [B, 1, X, Y, Z], "skipped_volumes": [B]}``.
        max_steps: number of iterations (one optimizer step each, or one per `accumulation_steps`).
        precision: "fp32" or "bf16" (autocast).
        gradient_clip: max global gradient norm, or None.
        accumulation_steps: iterations whose gradients add up before one optimizer step.
        max_bad_steps: optimizer steps in a row with a non-finite loss or gradient norm after which the run stops.
        handlers: MONAI/ignite handlers to attach.

    ``engine.state.output`` is a one-element list holding the step's dict (as after MONAI's decollation),
    so MONAI's ``from_engine(["loss"], first=True)`` — what ``--tracking mlflow`` uses — reads it.

    Numerical faults: at every optimizer step the loss and the global gradient norm are checked; a step where
    either is not finite is skipped (no optimizer step, no teacher update; gradients dropped) and counted in
    ``state.skipped_steps``; `max_bad_steps` in a row stop the run (``state.exit_code`` = `EXIT_NON_FINITE`). The
    check costs one host sync per optimizer step (as ``torch.amp.GradScaler``'s), plus one tiny all-reduce under
    torchrun so that all ranks decide alike — the same all-reduce carries a stop request (see `GracefulStop`).
    Only the loss of the iteration that steps is checked; under accumulation earlier ones show in the gradients.

    ``state.skipped_volumes`` counts the bad volumes the loader passed over; ``random_state`` (a `RandomState`)
    is the checkpoint object that makes a resume exact.
    """

    def __init__(self, device: torch.device | str, pretext: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_data_loader: Iterable, max_steps: int, *, precision: str = "fp32",
                 gradient_clip: float | None = None, accumulation_steps: int = 1, max_bad_steps: int = 20,
                 non_blocking: bool = True, handlers: Sequence | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}.")
        if max_steps < 1 or accumulation_steps < 1 or max_bad_steps < 1:
            raise ConfigError(f"max_steps ({max_steps}), accumulation_steps ({accumulation_steps}) and max_bad_steps "
                              f"({max_bad_steps}) must be >= 1.")
        epoch_length = len(train_data_loader)  # type: ignore[arg-type]
        if epoch_length == 0:
            items = len(getattr(train_data_loader, "dataset", ()))
            batch_size = getattr(train_data_loader, "batch_size", None)
            raise ConfigError(f"the training loader yields no batch: the training split holds {items} volumes "
                              f"(studies for the language-image bundles), fewer than batch_size {batch_size}; "
                              f"lower --batch_size to at most {max(items, 1)} or add volumes.")
        super().__init__(device=torch.device(device), max_epochs=math.ceil(max_steps / epoch_length),
                         data_loader=train_data_loader, epoch_length=epoch_length, non_blocking=non_blocking,
                         handlers=None, decollate=False)
        self.device = self.state.device
        self.network = pretext  # MONAI's property name, so bundle handlers can reference it
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.precision = precision
        self.gradient_clip = gradient_clip
        self.accumulation_steps = accumulation_steps
        self.max_bad_steps = max_bad_steps
        for key in COUNTERS:
            setattr(self.state, key, 0)
        self.state_dict_user_keys.extend(COUNTERS)
        self.state.stop_requested = 0  # a signal number set by GracefulStop; all ranks act on it at the next step
        self.state.stop_reason = None  # why the run stopped early ("SIGTERM", "SIGINT", "non-finite"), if it did
        self.state.exit_code = None
        self.logger.addFilter(_WorkerErrorsInOneLine())
        self.random_state = RandomState(pretext, train_data_loader)
        self.random_state.attach(self)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_at_max_steps)
        if handlers:
            for handler in handlers:
                handler.attach(self)

    def load_state_dict(self, state_dict: Mapping) -> None:
        # a checkpoint written before the counters existed resumes with them at zero
        super().load_state_dict({**{key: 0 for key in COUNTERS}, **state_dict})

    def _stop_at_max_steps(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps:
            engine.terminate()

    def _iteration(self, engine: Engine, batch: Mapping[str, Any]) -> list[dict]:
        pretext = self.network
        pretext.train()
        inputs = batch_to_device(batch, self.device, self.non_blocking)
        with autocast(self.device, self.precision):
            output = pretext(inputs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = output["loss"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (loss / self.accumulation_steps).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.state.iteration % self.accumulation_steps == 0:
            output["gradient_norm"] = self._optimizer_step(engine, loss)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        if "skipped_volumes" in batch:  # a CPU tensor from the loader: no device sync
            engine.state.skipped_volumes += int(batch["skipped_volumes"].sum())
        result = {key: value.detach() if isinstance(value, torch.Tensor) else value for key, value in output.items()}
        result["lr"] = self.optimizer.param_groups[0]["lr"]
        result["volumes"] = inputs["image"].shape[0]  # regions, or studies
        return [result]

    def _optimizer_step(self, engine: Engine, loss: torch.Tensor) -> torch.Tensor:
        """Clip and step unless the loss or the gradient norm is not finite; returns the norm before clipping."""
        pretext, optimizer = self.network, self.optimizer
        parameters = [parameter for parameter in pretext.parameters() if parameter.grad is not None]
        norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in parameters]).to(loss.device)
        if self._agreed_healthy(engine, loss, norm):
            if self.gradient_clip:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.gradient_clip, norm)
            optimizer.step()
            module = unwrap(pretext)
            if hasattr(module, "after_step"):
                module.after_step()
            engine.state.bad_steps_in_a_row = 0
        else:
            self._count_bad_step(engine, loss, norm)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _agreed_healthy(self, engine: Engine, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Whether every rank's loss and gradient norm are finite; also turns a stop request of any rank into a stop
        of all ranks after this step. The one host sync of the step."""
        state = engine.state
        bad = ~(torch.isfinite(loss.detach()).all() & torch.isfinite(norm))
        flags = torch.stack([bad.float(), torch.tensor(float(state.stop_requested), device=bad.device)])
        if is_distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_anywhere, signal_number = flags.tolist()
        if signal_number and state.stop_reason is None and state.iteration < self.max_steps:
            # GracefulStop (which set stop_requested) writes the checkpoint and ends the run after this step
            state.stop_reason, state.exit_code = signal.Signals(int(signal_number)).name, 128 + int(signal_number)
        return not bad_anywhere

    def _count_bad_step(self, engine: Engine, loss: torch.Tensor, norm: torch.Tensor) -> None:
        state = engine.state
        state.skipped_steps += 1
        state.bad_steps_in_a_row += 1
        if get_rank() == 0:
            print(f"step {state.iteration}: the loss ({float(loss.detach()):.4g}) or the gradient norm ({float(norm):.4g}) is "
                  f"not finite; the optimizer step is skipped ({state.bad_steps_in_a_row} in a row, "
                  f"{state.skipped_steps} in all).", flush=True)
        if state.bad_steps_in_a_row >= self.max_bad_steps and state.stop_reason is None:
            state.stop_reason, state.exit_code = "non-finite", EXIT_NON_FINITE
            if get_rank() == 0:
                print(f"stopping at step {state.iteration}: {state.bad_steps_in_a_row} optimizer steps in a row had a "
                      f"non-finite loss or gradient norm, so the weights are those of the last good step; resume "
                      f"with a lower learning_rate, precision fp32 or a gradient_clip (e.g. --learning_rate "
                      f"{self.optimizer.defaults.get('lr', 1e-4) / 2:.3g} --precision fp32 --gradient_clip 1.0).",
                      flush=True)
            engine.terminate()
