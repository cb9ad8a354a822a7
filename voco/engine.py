"""The trainer that runs any pretext, and the handlers every pretraining bundle attaches.

A pretext is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., "loss/<part>": ...,
"metric/<name>": ..., "health/<name>": ...}`` and may have ``after_step()`` (teacher updates). `PretextTrainer` is a
MONAI `Trainer` (an ignite Engine), so MONAI's handlers — `LrScheduleHandler`, `CheckpointSaver`,
`CheckpointLoader`, `MLFlowHandler` from ``--tracking mlflow`` — attach to it unchanged.

Why our own step instead of `SupervisedTrainer`: a pretext has no (image, label) pair and no separate loss
function; it makes its own views from the batch and returns a dict of losses and metrics.

Reliability (issue #6): `RandomState` puts every random generator into the checkpoint, so a resumed run continues
exactly; `AtomicCheckpointSaver` writes checkpoints atomically and `latest_checkpoint` passes over damaged ones;
`GracefulStop` turns SIGTERM/SIGINT into a checkpoint and a documented exit code; the trainer skips and counts
optimizer steps with a non-finite loss or gradient norm and stops after `max_bad_steps` of them in a row.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver

from voco.data.regions import item_seed, random_transform_generators
from voco.errors import CheckpointError, ConfigError, VolumeError, error_sentence
from voco.health import collapse_warning
from voco.tracking import RunLogger

logger = logging.getLogger("voco.engine")

PRECISIONS = ("fp32", "bf16")
# Counters kept in the trainer state, so that checkpoints carry them across a resume (ignite's user keys).
COUNTERS = ("skipped_volumes", "skipped_steps", "bad_steps_in_a_row")
# Exit code of a run stopped after `max_bad_steps` non-finite steps in a row. A run stopped by a signal exits with
# 128 + the signal number (SIGTERM 143, SIGINT 130), as shells report a process that the signal ended.
EXIT_NON_FINITE = 3
# What ignite's atomic write names its temporary file (`tempfile.NamedTemporaryFile` in the checkpoint folder).
TEMPORARY_NAME = re.compile(r"tmp[a-z0-9_]{8}")
# Exit code of a run stopped by a bad volume under the strict policy (``bad_volumes="stop"``).
EXIT_BAD_DATA = 4


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _from_every_rank(value: Any) -> list:
    """Every rank's `value`, indexed by rank (one element outside torchrun); all ranks must call it together."""
    if not _distributed():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _pack_numpy_state(state: tuple) -> dict:
    """A NumPy generator state (``get_state()``) as plain data and a tensor: checkpoints load with weights_only."""
    _, keys, position, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _unpack_numpy_state(state: Mapping) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return ("MT19937", keys, state["position"], state["has_gauss"], state["gauss"])


class _EpochOrder(torch.utils.data.Sampler):
    """Stands in for a batch sampler's index sampler: the same indices, with three differences that make the data
    order resumable. An epoch draws its order from the loader's generator once: torch's `RandomSampler` draws
    another permutation when its exhausted iterator is advanced, which ignite does at the next epoch's start and a
    resumed run would not. The first epoch after a resume leaves out its first `skip` indices (the batches trained
    on before the stop), so they are never loaded. And where the dataset seeds its random transforms per item
    (`voco.data.regions.SkipBadVolumes`), each index goes out as ``(index, item_seed(seed, epoch, index))``: the
    random region of an item is then fixed by the run's seed, the epoch and the item, in any worker process (and
    the epoch's shuffle by the seed and the epoch)."""

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int | None = None) -> None:
        self.sampler, self.skip, self.seed, self.epoch = sampler, 0, seed, 0

    def __len__(self) -> int:
        return len(self.sampler)  # the whole epoch: ignite counts the resumed epoch from the saved iteration

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        seed, epoch = self.seed, self.epoch
        shuffle_generator = getattr(self.sampler, "generator", None)
        if seed is not None and isinstance(shuffle_generator, torch.Generator):
            # The shuffle from (seed, epoch) too: how often the loader drew from the same generator before (a base
            # seed per iterator, or once with persistent workers) must not change the order.
            shuffle_generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        indices = itertools.islice(iter(self.sampler), skip, len(self.sampler))
        if seed is None:
            return indices
        return ((index, item_seed(seed, epoch, index)) for index in indices)


class RandomState:
    """Every random generator a training run draws from, as a checkpoint object (``state_dict`` /
    ``load_state_dict``), so that a run resumed at iteration k continues exactly as the uninterrupted run.

    Held: Python's `random`, NumPy's global generator, torch's CPU and CUDA generators, the ``generator`` of every
    module of the pretext (the tasks of the cyclic pretext too), the NumPy generators of the training dataset's
    random transforms (of this process), the DataLoader's ``generator`` and the position in the epoch. Under
    torchrun every rank's states go into rank 0's checkpoint. The random regions themselves do not depend on any
    generator's history: each item's transforms are seeded from (seed, epoch, index) (see `_EpochOrder`), so the
    resume is exact with any number of DataLoader workers.

    Resume inside an epoch: ignite restarts the data iterator at the epoch's first batch while counting iterations
    from the saved one; so the loader's generator is set back to its state at the start of the interrupted epoch
    (the same shuffle) and the batches already trained on are dropped from the sampler without being loaded (the
    loader's batch sampler gets an `_EpochOrder` in front of its index sampler for this).
    Why our own: ignite's `DeterministicEngine` reseeds every epoch and rebuilds the DataLoader, and neither ignite
    nor MONAI saves random states in checkpoints.
    """

    def __init__(self, pretext: torch.nn.Module, data_loader: Iterable) -> None:
        self.pretext, self.data_loader = pretext, data_loader
        self.engine: Engine | None = None
        self._epoch_start_generator: torch.Tensor | None = None
        self._resumed = False
        self._order: _EpochOrder | None = None

    def attach(self, engine: Engine) -> None:
        """Follow the epochs of the engine that trains on `data_loader` (and take over its order, see above)."""
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        batch_sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(batch_sampler, torch.utils.data.BatchSampler):
            if not isinstance(batch_sampler.sampler, _EpochOrder):
                dataset = getattr(self.data_loader, "dataset", None)
                generator = self._loader_generator()
                seed = None if not hasattr(dataset, "seed_random_transforms") else (
                    generator.initial_seed() if generator is not None else 0)
                batch_sampler.sampler = _EpochOrder(batch_sampler.sampler, seed)
            self._order = batch_sampler.sampler
        else:
            logger.warning("the training loader has no batch sampler: a run resumed inside an epoch starts that "
                           "epoch again from its first batch")

    def _loader_generator(self) -> torch.Generator | None:
        return getattr(self.data_loader, "generator", None)

    def _pretext_generators(self) -> list[tuple[str, torch.Generator]]:
        pretext = getattr(self.pretext, "module", self.pretext)  # the pretext itself under DistributedDataParallel
        return [(name, module.generator) for name, module in pretext.named_modules()
                if isinstance(getattr(module, "generator", None), torch.Generator)]

    def _transform_generators(self) -> list[np.random.RandomState]:
        return random_transform_generators(getattr(self.data_loader, "dataset", None))

    def capture(self) -> dict:
        """The current state of every generator of this process."""
        generator = self._loader_generator()
        return {
            "python": random.getstate(),
            "numpy": _pack_numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "pretext": {name: module_generator.get_state() for name, module_generator in self._pretext_generators()},
            "transforms": [_pack_numpy_state(transform.get_state()) for transform in self._transform_generators()],
            "data_loader": None if generator is None else generator.get_state(),
        }

    def restore(self, state: Mapping) -> None:
        """Set every generator of this process to `state` (from `capture`); tensors may come on any device."""
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_unpack_numpy_state(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])
        for name, module_generator in self._pretext_generators():
            if name in state["pretext"]:
                module_generator.set_state(state["pretext"][name].cpu())
        transforms = self._transform_generators()
        if len(transforms) == len(state["transforms"]):
            for transform, transform_state in zip(transforms, state["transforms"]):
                transform.set_state(_unpack_numpy_state(transform_state))
        else:
            logger.warning("the training data has %d random transforms and the checkpoint %d: their random state "
                           "starts afresh", len(transforms), len(state["transforms"]))
        generator = self._loader_generator()
        if generator is not None and state["data_loader"] is not None:
            generator.set_state(state["data_loader"].cpu())

    def state_dict(self) -> dict:
        state = self.capture()
        engine = self.engine
        position = engine.state.iteration % engine.state.epoch_length if engine is not None else 0
        if position and self._epoch_start_generator is not None:
            state["data_loader"] = self._epoch_start_generator  # the interrupted epoch's shuffle is made again
        state["batches_into_epoch"] = position
        return {"ranks": _from_every_rank(state)}

    def load_state_dict(self, state: Mapping) -> None:
        ranks, rank = state["ranks"], _rank()
        if rank >= len(ranks):
            logger.warning("the checkpoint holds the random state of %d ranks; rank %d starts from its seed",
                           len(ranks), rank)
            return
        self.restore(ranks[rank])
        self._resumed = True

    def _epoch_started(self, engine: Engine) -> None:
        if self._order is not None:
            self._order.epoch = engine.state.epoch  # ignite makes the epoch's data iterator after this event
        if self._resumed:
            self._resumed = False
            self._skip_batches(engine.state.iteration % engine.state.epoch_length)
        generator = self._loader_generator()
        self._epoch_start_generator = None if generator is None else generator.get_state()

    def _skip_batches(self, count: int) -> None:
        if self._order is not None:
            self._order.skip = count * self.data_loader.batch_sampler.batch_size


@contextlib.contextmanager
def unchanged_random_state(pretext: torch.nn.Module, data_loader: Iterable) -> Iterator[None]:
    """Run a block (validation, a picture of the views) without moving any generator that training draws from
    (nor those of `data_loader`'s transforms: the block sees the same random regions each time)."""
    keeper = RandomState(pretext, data_loader)
    state = keeper.capture()
    try:
        yield
    finally:
        keeper.restore(state)


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
            raise ConfigError("the training loader yields no batch: fewer volumes than batch_size; lower batch_size "
                              "or add volumes.")
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
            module = getattr(pretext, "module", pretext)  # the pretext itself under DistributedDataParallel
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
        if _distributed():
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
        if _rank() == 0:
            print(f"step {state.iteration}: the loss ({float(loss.detach()):.4g}) or the gradient norm ({float(norm):.4g}) is "
                  f"not finite; the optimizer step is skipped ({state.bad_steps_in_a_row} in a row, "
                  f"{state.skipped_steps} in all).", flush=True)
        if state.bad_steps_in_a_row >= self.max_bad_steps and state.stop_reason is None:
            state.stop_reason, state.exit_code = "non-finite", EXIT_NON_FINITE
            if _rank() == 0:
                print(f"stopping at step {state.iteration}: {state.bad_steps_in_a_row} optimizer steps in a row had a "
                      f"non-finite loss or gradient norm, so the weights are those of the last good step; resume "
                      f"with a lower learning_rate, precision fp32 or a gradient_clip (e.g. --learning_rate "
                      f"{self.optimizer.defaults.get('lr', 1e-4) / 2:.3g} --precision fp32 --gradient_clip 1.0).",
                      flush=True)
            engine.terminate()


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on weight matrices and kernels, none on biases, norms and learned
    tokens (1-D parameters, and parameters named ``*token`` or ``*mask_value``), as MAE and the slides' recipe do."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            learned_token = name.rsplit(".", 1)[-1].endswith(("token", "mask_value"))
            (no_decay if parameter.ndim <= 1 or learned_token else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepLogger:
    """Every `interval` iterations: print progress and log the step's losses, metrics, lr and throughput.

    Metric names follow DESIGN.md: ``loss``, ``loss/<part>``, ``metric/<name>``, ``lr``, ``gradient_norm``,
    ``teacher_momentum``, ``throughput/volumes_per_s``, and the cumulative counts of the trainer state
    ``data/skipped_volumes`` (bad volumes passed over) and ``numerics/skipped_steps`` (optimizer steps skipped for
    a non-finite loss or gradient norm). Pretexts with embeddings add the collapse signals of
    `voco.health.embedding_health`: ``health/embedding_std`` (about 1 / sqrt(D) when healthy, 0 at collapse),
    ``health/top_component_share`` (share of the batch's variance in its first principal component) and
    ``health/collapsed`` (1 when either crosses its threshold); the cyclic pretext logs ``health/<task>/<name>``.
    When some ``collapsed`` flag is 1 on `collapse_patience` logged steps in a row after the first `collapse_warmup`
    share of the run, one sentence says so and what to try, once per run (an untrained encoder maps different
    inputs to nearly one vector, and the learning-rate warm-up keeps it there for a while: the start is not judged).
    Values are read from the device only on logging iterations (and at an early stop). MONAI's `StatsHandler`
    prints only the loss; this prints the parts too.
    """

    def __init__(self, interval: int = 10, stream=None, collapse_patience: int = 3,
                 collapse_warmup: float = 0.1) -> None:
        self.interval = max(1, int(interval))
        self.stream = stream or sys.stdout
        self.collapse_patience, self.collapse_warmup = max(1, int(collapse_patience)), float(collapse_warmup)
        self._volumes = 0
        self._clock = time.perf_counter()
        self._collapsed_in_a_row, self._warned_of_collapse = 0, False
        self.run: RunLogger | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self.run = RunLogger(engine)
        self._clock, self._volumes = time.perf_counter(), 0
        self._collapsed_in_a_row, self._warned_of_collapse = 0, False

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output[0]
        self._volumes += int(output.get("volumes", 0))
        iteration = engine.state.iteration
        total = getattr(engine, "max_steps", None) or engine.state.epoch_length * engine.state.max_epochs
        last = iteration >= total or getattr(engine.state, "stop_reason", None) is not None
        if iteration % self.interval and not last:
            return
        values = {key: value for key, value in scalars(output).items() if key != "volumes"}
        elapsed = time.perf_counter() - self._clock
        values["throughput/volumes_per_s"] = self._volumes / max(elapsed, 1e-9)
        values["data/skipped_volumes"] = float(getattr(engine.state, "skipped_volumes", 0))
        values["numerics/skipped_steps"] = float(getattr(engine.state, "skipped_steps", 0))
        self._clock, self._volumes = time.perf_counter(), 0
        parts = "  ".join(f"{key} {value:.4g}" for key, value in values.items())
        print(f"step {iteration}/{total}  {parts}", file=self.stream, flush=True)
        if iteration > self.collapse_warmup * total:
            self.watch_collapse(values, iteration)
        if self.run is not None:
            self.run.log_metrics(values, step=iteration)

    def watch_collapse(self, values: Mapping[str, float], step: int) -> None:
        """Count the logged steps in a row whose embeddings look collapsed; warn once at `collapse_patience`."""
        warning = collapse_warning(values, step)
        self._collapsed_in_a_row = self._collapsed_in_a_row + 1 if warning else 0
        if self._collapsed_in_a_row >= self.collapse_patience and not self._warned_of_collapse:
            self._warned_of_collapse = True
            print(warning, file=self.stream, flush=True)


class PretextValidation:
    """Every `interval` iterations (and at the end): the pretext's losses and metrics on held-out volumes.

    No labels are needed: the pretext's own metrics (e.g. VoCo's position accuracy) measure it. Results are
    printed, stored in ``engine.state.metrics`` as ``val/<name>`` and logged to MLflow at the iteration.
    Every validation sees the same random regions and views (so values compare across steps, resumes and ranks)
    and leaves the training's random generators where they were.
    Under torchrun every rank validates the same volumes (in step, as DistributedDataParallel needs); rank 0 prints
    and logs.

    ``evaluate`` (optional): ``evaluate(pretext, data_loader, device=...) -> {"metric/...": value}`` over the whole
    held-out set, run by rank 0 on the unwrapped pretext after the batches (e.g. CLIP's zero-shot classification and
    retrieval, `voco.pretext.zero_shot.evaluate_zero_shot`); its metrics are logged as ``val/<name>`` too.
    """

    def __init__(self, data_loader: Iterable, interval: int = 100, max_batches: int | None = None,
                 seed: int = 0, evaluate: Callable[..., Mapping[str, float]] | None = None) -> None:
        self.data_loader, self.interval, self.max_batches, self.seed = data_loader, max(1, int(interval)), max_batches, seed
        self.evaluate = evaluate

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Engine) -> None:
        if engine.state.iteration % self.interval:
            self(engine)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> dict[str, float]:
        pretext = engine.network
        sums: dict[str, float] = {}
        batches = 0
        with unchanged_random_state(pretext, self.data_loader):
            # the same seed on every rank (training seeds seed + rank): all ranks cut the same regions and views
            torch.manual_seed(self.seed)
            set_rnd(getattr(self.data_loader, "dataset", None), self.seed)
            pretext.eval()
            try:
                for index, batch in enumerate(self.data_loader):
                    if self.max_batches is not None and index >= self.max_batches:
                        break
                    with autocast(engine.device, getattr(engine, "precision", "fp32")):
                        output = pretext(batch_to_device(batch, engine.device, non_blocking=True))
                    for key, value in scalars(output).items():
                        sums[key] = sums.get(key, 0.0) + value
                    batches += 1
            finally:
                pretext.train()
        if batches == 0:
            if _rank() == 0:
                print(f"validation at step {engine.state.iteration}: no complete batch of held-out volumes; add "
                      f"volumes or raise validation_fraction.", flush=True)
            return {}
        metrics = {f"val/{key}": value / batches for key, value in sums.items() if key.startswith(("loss", "metric/"))}
        if self.evaluate is not None and _rank() == 0:
            with unchanged_random_state(pretext, self.data_loader):
                evaluated = self.evaluate(getattr(pretext, "module", pretext), self.data_loader, device=engine.device)
            metrics.update({f"val/{key}": float(value) for key, value in evaluated.items()})
        engine.state.metrics.update(metrics)
        if _rank() == 0:
            print(f"validation at step {engine.state.iteration}: " +
                  "  ".join(f"{key} {value:.4g}" for key, value in metrics.items()), flush=True)
        RunLogger(engine).log_metrics(metrics, step=engine.state.iteration)
        return metrics


class ViewsPicture:
    """At the end of training, draw the pretext's views of one batch and log the picture(s) as MLflow artifacts."""

    def __init__(self, data_loader: Iterable, output_dir: str, draw: Callable | None = None,
                 file_name: str = "views.png") -> None:
        self.data_loader, self.output_dir, self.draw, self.file_name = data_loader, output_dir, draw, file_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> Path | None:
        pretext = getattr(engine.network, "module", engine.network)  # unwrap DistributedDataParallel
        if not hasattr(pretext, "views"):
            return None
        path = Path(self.output_dir) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        # the final checkpoint is written after this: a longer resumed run must not see the picture's draws
        with unchanged_random_state(pretext, self.data_loader):
            batch = next(iter(self.data_loader))
            pretext.eval()
            try:
                views = pretext.views(batch_to_device(batch, engine.device))
            finally:
                pretext.train()
        draw = self.draw or getattr(pretext, "save_views_picture")
        written = draw(views, path)  # one path, or several (one per task of the cyclic pretext)
        paths = written if isinstance(written, (list, tuple)) else [path]
        run = RunLogger(engine)
        for picture in paths:
            run.log_artifact(picture, "views")
            print(f"views of one region: {picture}", flush=True)
        return paths[0] if paths else None


class RunInfo:
    """What a checkpoint needs to rebuild the encoder: the backbone spec and the pretext's name, saved beside the
    weights as plain data (CheckpointSaver takes objects with a state_dict)."""

    def __init__(self, backbone: Mapping[str, Any], pretext: str, **extra: Any) -> None:
        self.spec = dict(backbone, pretext=pretext, **extra)  # extra: e.g. the CLIP heads and text encoder

    def state_dict(self) -> dict:
        return dict(self.spec)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # the config decides the model; nothing to restore
        pass


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's `CheckpointSaver` that writes every file atomically and can save on request.

    Why: MONAI builds ignite's `DiskSaver` with ``atomic=False``, so a kill during a write leaves a truncated
    newest checkpoint; here ignite's own atomic mode is switched back on (a temporary file in the same folder,
    renamed when complete). Interval checkpoints that an earlier run of the folder left join the rotation, so a
    resumed run still keeps only the newest `n_saved`; the temporary file of a write that a kill cut short is
    deleted. Arguments are those of MONAI's `CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # the DiskSaver option MONAI turns off
        self._adopted_earlier = False

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, VolumeError):  # the strict data policy: `GracefulStop` writes the checkpoint and stops
            return
        super().exception_raised(engine, e)

    def interval_completed(self, engine: Engine) -> None:
        self._adopt_earlier_checkpoints(engine)
        super().interval_completed(engine)

    def _adopt_earlier_checkpoints(self, engine: Engine) -> None:
        """Register the interval files of earlier runs (ignite's `Checkpoint` only knows the files it wrote)."""
        checkpoint = self._interval_checkpoint
        if self._adopted_earlier or checkpoint is None or checkpoint.n_saved is None:
            return
        self._adopted_earlier = True
        for leftover in Path(self.save_dir).glob("tmp*"):  # half-written by a run killed during a write
            if TEMPORARY_NAME.fullmatch(leftover.name) and leftover.is_file():
                leftover.unlink(missing_ok=True)
        prefix = f"{checkpoint.filename_prefix}_" if checkpoint.filename_prefix else ""
        name = next(iter(checkpoint.to_save)) if len(checkpoint.to_save) == 1 else "checkpoint"  # as ignite names
        pattern = re.compile(rf"{re.escape(prefix + name)}_{checkpoint.score_name}=(\d+)\.pt")
        current = engine.state.epoch if self.epoch_level else engine.state.iteration
        earlier = sorted((int(match.group(1)), path.name) for path in Path(self.save_dir).glob("*.pt")
                         if (match := pattern.fullmatch(path.name)) and int(match.group(1)) < current)
        checkpoint.load_state_dict({"_saved": earlier[-checkpoint.n_saved:]})

    def save_now(self, engine: Engine) -> Path | None:
        """Write a checkpoint of the current state now, unless this iteration's exists; returns its path.

        An interval checkpoint (named by its iteration, so resume takes it as the newest), or the final one where
        the saver has no iteration interval."""
        checkpoint = self._interval_checkpoint
        if checkpoint is not None and not self.epoch_level:
            self._adopt_earlier_checkpoints(engine)
            saved = checkpoint.state_dict()["_saved"]
            if not saved or saved[-1][0] != engine.state.iteration:
                checkpoint(engine)
        elif self._final_checkpoint is not None:
            self._delete_previous_final_ckpt()
            checkpoint = self._final_checkpoint
            checkpoint(engine)
        else:
            return None
        return Path(checkpoint.last_checkpoint)


def latest_checkpoint(directory: str | Path) -> str | None:
    """Path of the newest checkpoint in `directory` that reads completely (for resume), or None where there is none.

    Each candidate, newest first, is read in full with `read_checkpoint` (weights only): a file can look complete
    and still be damaged. A damaged newer file is passed over for the previous one, with a message naming both.
    Under torchrun rank 0 reads and tells the other ranks, so all load the same file.

    Raises:
        CheckpointError: the folder holds checkpoints and none of them can be read.
    """
    found, problem = _newest_readable_checkpoint(directory) if _rank() == 0 else (None, None)
    found, problem = broadcast_object((found, problem))
    if problem is not None:
        raise CheckpointError(problem)
    return found


def _newest_readable_checkpoint(directory: str | Path) -> tuple[str | None, str | None]:
    """(the path to resume from or None, or the error message where no checkpoint of the folder reads)."""
    from voco.checkpoints import ranked_checkpoints, read_checkpoint

    damaged: list[tuple[Path, CheckpointError]] = []
    for path in ranked_checkpoints(directory):  # [] for a folder that does not exist yet
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            damaged.append((path, error))
            continue
        for bad, error in damaged:
            reason = str(error.__cause__ or error).strip().splitlines()[0]
            print(f"checkpoint {bad} cannot be read ({reason}); resuming from the previous one, {path}.", flush=True)
        return str(path), None
    if damaged:
        return None, (f"none of the {len(damaged)} checkpoints in {directory} can be read (the newest: "
                      f"{damaged[0][1]}); move them away to start over, or run with --resume False.")
    return None, None


class GracefulStop:
    """Ends a run that is asked to stop cleanly: SIGTERM (a cluster's preemption), SIGINT (Ctrl-C), the trainer's
    numerical stop (`PretextTrainer.max_bad_steps`), or a bad volume under the strict policy (a `VolumeError` from
    the loader, also from inside a worker process: exit code `EXIT_BAD_DATA`, the run FAILED, no traceback).

    On the first SIGTERM/SIGINT the current step finishes; then a checkpoint of the state after that step is
    written (the newest, so resume takes it), the MLflow run is closed as KILLED (FAILED for a numerical stop), the
    engine ends without its COMPLETED handlers (no final validation or picture), and `exit_if_stopped` exits with
    128 + the signal number (143 for SIGTERM, 130 for SIGINT) or `EXIT_NON_FINITE`. A second signal ends the
    process at once (killed by that signal); the same signal again within `repeat_window_s` counts as the first,
    since process managers such as torchrun forward to their workers a signal the workers already got.

    Under torchrun every rank installs the handlers; the trainer's per-step all-reduce makes all ranks stop after
    the same step; rank 0 writes the checkpoint and the other ranks wait for it before exiting.
    Why our own: neither ignite nor MONAI handles signals (ignite's `Engine.terminate` is what stops the loop).

    Args:
        checkpoint_saver: the run's `AtomicCheckpointSaver` (None: stop without a checkpoint).
        repeat_window_s: seconds in which the same signal again is not a second request.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_saver: AtomicCheckpointSaver | None = None, repeat_window_s: float = 2.0) -> None:
        self.checkpoint_saver, self.repeat_window_s = checkpoint_saver, repeat_window_s
        self.engine: Engine | None = None
        self._first: tuple[int, float] | None = None
        self._previous: dict[int, Any] = {}

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_asked)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._stop_on_bad_data)
        engine.add_event_handler(Events.TERMINATE, self._restore_handlers)
        engine.add_event_handler(Events.COMPLETED, self._restore_handlers)

    def _started(self, engine: Engine) -> None:
        self._first = None
        RunLogger(engine).mark_running()  # a resumed run continues the MLflow run that a stop closed
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training runs outside the main thread: SIGTERM/SIGINT end it without a checkpoint")
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self, engine: Engine) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only set a flag, and write with os.write (print could
        # re-enter a print the signal interrupted).
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._first is None:
            self._first = (signum, now)
            self.engine.state.stop_requested = signum
            os.write(2, f"\nreceived {name}: stopping after this step with a checkpoint; send it again to stop "
                        f"at once.\n".encode())
        elif signum != self._first[0] or now - self._first[1] > self.repeat_window_s:
            os.write(2, f"\nreceived {name} while stopping: stopping at once, without a checkpoint.\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _stop_on_bad_data(self, engine: Engine, error: BaseException) -> None:
        """A bad volume under the strict policy: the same clean stop (checkpoint of the last step, run FAILED, a
        one-line message, `EXIT_BAD_DATA`); any other exception goes on as it came (ignite would swallow it)."""
        if not isinstance(error, VolumeError) or getattr(engine.state, "stop_reason", None) is not None:
            raise error
        print(f"stopping: {error_sentence(error)}", flush=True)
        engine.state.stop_reason, engine.state.exit_code = "bad volume", EXIT_BAD_DATA
        self._stop_if_asked(engine)

    def _stop_if_asked(self, engine: Engine) -> None:
        state = engine.state
        if getattr(state, "stop_reason", None) is None:
            return
        path = self.checkpoint_saver.save_now(engine) if self.checkpoint_saver is not None and state.iteration \
            else None
        if _distributed() and state.stop_reason != "bad volume":  # a bad volume stops only the rank that read it
            dist.barrier()  # torchrun ends every rank at the first exit: rank 0 must have written the checkpoint
        RunLogger(engine).end("KILLED" if state.stop_reason in ("SIGTERM", "SIGINT") else "FAILED")
        if _rank() == 0:
            where = f"the checkpoint {path}" if path is not None else "no checkpoint (no saver given)"
            print(f"stopped after step {state.iteration} ({state.stop_reason}) with {where}; run the same command "
                  f"to resume (exit code {state.exit_code}).", flush=True)
        engine.terminate(skip_completed=True)


def exit_if_stopped(trainer: Engine) -> None:
    """End the process with the exit code of an early stop (see `GracefulStop`); nothing after a complete run.
    The bundles call it last in ``finalize``."""
    code = getattr(trainer.state, "exit_code", None)
    if code:
        raise SystemExit(code)


def required_setting(name: str, what: str) -> None:
    """Config value for a setting the user must give: evaluating it stops the run with what to pass."""
    raise ConfigError(f"the bundle needs --{name}: {what}.")


def prepare_run(output_dir: str | Path, tracking_uri: str, experiment_name: str) -> Path:
    """Create the run folder; where the store is our embedded SQLite file, create the experiment with its
    artifacts beside the store (MLflow would otherwise put them in ./mlruns of whatever folder this runs in)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if tracking_uri.startswith("sqlite:///") and (not distributed or dist.get_rank() == 0):  # one writer: SQLite
        from voco.tracking import prepare_experiment

        try:
            prepare_experiment(tracking_uri, experiment_name)
        except ImportError:  # mlflow missing: only tracking needs it, and tracking reports that itself
            pass
    if distributed:
        dist.barrier()  # the other ranks wait until the store and experiment exist
    return folder


def distributed_model(model: torch.nn.Module, device: torch.device,
                      find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the pretext (gloo on CPU, NCCL on GPUs).

    ``find_unused_parameters=True`` where a step leaves some parameters out (the cyclic multi-task pretext runs
    one task's heads per step)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. a run name with a timestamp, so all ranks write to one run folder)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
