"""The trainer that runs any pretext, and the handlers every pretraining bundle attaches.

A pretext is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., "loss/<part>": ...,
"metric/<name>": ...}`` and may have ``after_step()`` (teacher updates). `PretextTrainer` is a MONAI
`Trainer` (an ignite Engine), so MONAI's handlers — `LrScheduleHandler`, `CheckpointSaver`,
`CheckpointLoader`, `MLFlowHandler` from ``--tracking mlflow`` — attach to it unchanged.

Why our own step instead of `SupervisedTrainer`: a pretext has no (image, label) pair and no separate loss
function; it makes its own views from the batch and returns a dict of losses and metrics.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents

from voco.errors import ConfigError
from voco.tracking import RunLogger

logger = logging.getLogger("voco.engine")

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on any device (MONAI engines' `amp` is CUDA fp16 only); a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def scalars(output: Mapping[str, Any]) -> dict[str, float]:
    """Python floats of the scalar entries of a step's output (one host sync; call only when logging)."""
    values = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            values[key] = float(value.detach())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


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
        handlers: MONAI/ignite handlers to attach.

    ``engine.state.output`` is a one-element list holding the step's dict (as after MONAI's decollation),
    so MONAI's ``from_engine(["loss"], first=True)`` — what ``--tracking mlflow`` uses — reads it.
    """

    def __init__(self, device: torch.device | str, pretext: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_data_loader: Iterable, max_steps: int, *, precision: str = "fp32",
                 gradient_clip: float | None = None, accumulation_steps: int = 1, non_blocking: bool = True,
                 handlers: Sequence | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}.")
        if max_steps < 1 or accumulation_steps < 1:
            raise ConfigError(f"max_steps ({max_steps}) and accumulation_steps ({accumulation_steps}) must be >= 1.")
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
        self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_at_max_steps)
        if handlers:
            for handler in handlers:
                handler.attach(self)

    def _stop_at_max_steps(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps:
            engine.terminate()

    def _iteration(self, engine: Engine, batch: Mapping[str, Any]) -> list[dict]:
        pretext, optimizer = self.network, self.optimizer
        pretext.train()
        images = batch["image"].to(self.device, non_blocking=self.non_blocking)
        with autocast(self.device, self.precision):
            output = pretext({"image": images})
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = output["loss"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (loss / self.accumulation_steps).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.state.iteration % self.accumulation_steps == 0:
            if self.gradient_clip:
                output["gradient_norm"] = torch.nn.utils.clip_grad_norm_(pretext.parameters(), self.gradient_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module = getattr(pretext, "module", pretext)  # the pretext itself under DistributedDataParallel
            if hasattr(module, "after_step"):
                module.after_step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        result = {key: value.detach() if isinstance(value, torch.Tensor) else value for key, value in output.items()}
        result["lr"] = optimizer.param_groups[0]["lr"]
        result["volumes"] = images.shape[0]
        result["skipped_volumes"] = batch["skipped_volumes"].sum() if "skipped_volumes" in batch else 0
        return [result]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on weight matrices and kernels, none on biases, norms and learned
    tokens (1-D parameters or names ending in ``_token``), as MAE and the slides' recipe do."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            learned_token = name.rsplit(".", 1)[-1].endswith(("token", "mask_value"))
            (no_decay if parameter.ndim <= 1 or learned_token else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepLogger:
    """Every `interval` iterations: print progress and log the step's losses, metrics, lr and throughput.

    Metric names follow DESIGN.md: ``loss``, ``loss/<part>``, ``metric/<name>``, ``lr``, ``teacher_momentum``,
    ``throughput/volumes_per_s`` and ``data/skipped_volumes`` (cumulative). Values are read from the device
    only on logging iterations. MONAI's `StatsHandler` prints only the loss; this prints the parts too.
    """

    def __init__(self, interval: int = 10, stream=None) -> None:
        self.interval = max(1, int(interval))
        self.stream = stream or sys.stdout
        self.skipped_volumes = 0.0
        self._pending_skipped: list = []
        self._volumes = 0
        self._clock = time.perf_counter()
        self.run: RunLogger | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self.run = RunLogger(engine)
        self._clock, self._volumes = time.perf_counter(), 0

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output[0]
        self._volumes += int(output.get("volumes", 0))
        self._pending_skipped.append(output.get("skipped_volumes", 0))
        iteration = engine.state.iteration
        last = iteration >= getattr(engine, "max_steps", engine.state.epoch_length * engine.state.max_epochs)
        if iteration % self.interval and not last:
            return
        values = {key: value for key, value in scalars(output).items() if key not in ("volumes", "skipped_volumes")}
        self.skipped_volumes += sum(float(s) for s in self._pending_skipped)
        self._pending_skipped.clear()
        elapsed = time.perf_counter() - self._clock
        values["throughput/volumes_per_s"] = self._volumes / max(elapsed, 1e-9)
        values["data/skipped_volumes"] = self.skipped_volumes
        self._clock, self._volumes = time.perf_counter(), 0
        total = getattr(engine, "max_steps", None) or engine.state.epoch_length * engine.state.max_epochs
        parts = "  ".join(f"{key} {value:.4g}" for key, value in values.items())
        print(f"step {iteration}/{total}  {parts}", file=self.stream, flush=True)
        if self.run is not None:
            self.run.log_metrics(values, step=iteration)


class PretextValidation:
    """Every `interval` iterations (and at the end): the pretext's losses and metrics on held-out volumes.

    No labels are needed: the pretext's own metrics (e.g. VoCo's position accuracy) measure it. Results are
    printed, stored in ``engine.state.metrics`` as ``val/<name>`` and logged to MLflow at the iteration.
    Under torchrun every rank validates the same volumes (in step, as DistributedDataParallel needs); rank 0 logs.
    """

    def __init__(self, data_loader: Iterable, interval: int = 100, max_batches: int | None = None,
                 seed: int = 0) -> None:
        self.data_loader, self.interval, self.max_batches, self.seed = data_loader, max(1, int(interval)), max_batches, seed

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
        cpu_state = torch.random.get_rng_state()  # validation views must not shift the training random stream
        torch.manual_seed(self.seed)
        pretext.eval()
        try:
            for index, batch in enumerate(self.data_loader):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                images = batch["image"].to(engine.device, non_blocking=True)
                with autocast(engine.device, getattr(engine, "precision", "fp32")):
                    output = pretext({"image": images})
                for key, value in scalars(output).items():
                    sums[key] = sums.get(key, 0.0) + value
                batches += 1
        finally:
            pretext.train()
            torch.random.set_rng_state(cpu_state)
        if batches == 0:
            print(f"validation at step {engine.state.iteration}: no complete batch of held-out volumes; add "
                  f"volumes or raise validation_fraction.", flush=True)
            return {}
        metrics = {f"val/{key}": value / batches for key, value in sums.items() if key.startswith(("loss", "metric/"))}
        engine.state.metrics.update(metrics)
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
        batch = next(iter(self.data_loader))
        path = Path(self.output_dir) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        pretext.eval()
        try:
            views = pretext.views({"image": batch["image"].to(engine.device)})
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

    def __init__(self, backbone: Mapping[str, Any], pretext: str) -> None:
        self.spec = dict(backbone, pretext=pretext)

    def state_dict(self) -> dict:
        return dict(self.spec)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # the config decides the model; nothing to restore
        pass


def latest_checkpoint(directory: str | Path) -> str | None:
    """Path of the newest readable checkpoint in `directory` (for resume), or None."""
    from voco.checkpoints import find_latest_checkpoint

    found = find_latest_checkpoint(Path(directory))  # None for a folder that does not exist yet
    return None if found is None else str(found)


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
