"""The handlers every pretraining bundle attaches beside MONAI's: step logging with the collapse warning,
validation of the pretext on held-out volumes, and the picture of its views. (The frozen-encoder probe is
`voco.probe.FrozenProbe`.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.handlers import MLFlowHandler
from monai.networks.utils import eval_mode

from voco.distributed import get_rank, unwrap
from voco.engine.random_state import unchanged_random_state
from voco.engine.trainer import autocast, batch_to_device, scalars
from voco.health import collapse_warning
from voco.progress import Progress, format_duration
from voco.tracking import RunLogger, attached_mlflow_handlers


class DefaultMLFlowHandler(MLFlowHandler):
    """MONAI's `MLFlowHandler`, in every bundle's handler lists, so that every run is tracked (the embedded store
    ``runs/mlflow.db`` by default; ``--mlflow False`` turns it off) without ``--tracking mlflow``.

    Why our own: MONAI adds its handler only when the command line asks (``--tracking mlflow``), and then beside
    this one; so this one stands back (logs nothing, opens no run) when another `MLFlowHandler` is attached to the
    same engine, and one job stays one MLflow run either way."""

    stands_back = True  # `voco.tracking.attached_mlflow_handler` prefers any other
    deferred = False

    def start(self, engine: Engine) -> None:
        self.deferred = any(handler is not self for handler in attached_mlflow_handlers(engine))
        if not self.deferred:
            super().start(engine)

    def iteration_completed(self, engine: Engine) -> None:
        if not self.deferred:
            super().iteration_completed(engine)

    def epoch_completed(self, engine: Engine) -> None:
        if not self.deferred:
            super().epoch_completed(engine)

    def complete(self) -> None:
        if not self.deferred:
            super().complete()

    def close(self) -> None:
        if not self.deferred:
            super().close()


def total_steps(engine: Engine) -> int:
    """The steps the run goes to: the trainer's `max_steps`, else epochs times their length."""
    return getattr(engine, "max_steps", None) or engine.state.epoch_length * engine.state.max_epochs


class StepLogger:
    """Every `interval` iterations: print progress and log the step's losses, metrics, lr and throughput (rank 0
    under torchrun).

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
    prints only the loss; this prints the parts too. On a terminal a bar (`voco.progress.Progress`) shows the steps
    between the lines; in a log file there are only the lines.
    """

    def __init__(self, interval: int = 10, stream=None, collapse_patience: int = 3,
                 collapse_warmup: float = 0.1) -> None:
        self.interval = max(1, int(interval))
        self.stream = stream or sys.stdout
        self.collapse_patience, self.collapse_warmup = max(1, int(collapse_patience)), float(collapse_warmup)
        self._bar: Progress | None = None
        self._terminal = False
        self._volumes = 0
        self._clock = time.perf_counter()
        self._collapsed_in_a_row, self._warned_of_collapse = 0, False
        self.run: RunLogger | None = None

    def attach(self, engine: Engine) -> None:
        if get_rank() != 0:  # under torchrun rank 0 speaks for all
            return
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.draw_bar)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.clear_bar)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.clear_bar)

    def draw_bar(self, engine: Engine) -> None:
        """On a terminal, a bar of the steps done while the next one runs; taken off the line before anything is
        printed (this handler's ITERATION_COMPLETED comes first), so cluster logs and lines stay clean."""
        if not self._terminal:
            return
        done = engine.state.iteration - 1
        if self._bar is None:  # made at the first step, after a resumed run has restored its iteration
            self._bar = Progress(total_steps(engine), "steps", stream=self.stream, start=done)
        elif done > self._bar.start:
            self._bar.update(done)

    def clear_bar(self, engine: Engine | None = None) -> None:
        if self._bar is not None:
            self._bar.clear()

    def started(self, engine: Engine) -> None:
        isatty = getattr(self.stream, "isatty", None)
        self._terminal, self._bar = bool(isatty and isatty()), None
        self.run = RunLogger(engine)
        self._clock, self._volumes = time.perf_counter(), 0
        self._step_clock, self._last_step = self._clock, engine.state.iteration  # a resumed run starts past 0
        self._collapsed_in_a_row, self._warned_of_collapse = 0, False

    def iteration_completed(self, engine: Engine) -> None:
        self.clear_bar()
        output = engine.state.output[0]
        self._volumes += int(output.get("volumes", 0))
        iteration = engine.state.iteration
        total = total_steps(engine)
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
        print(f"step {iteration}/{total}  {self.pace(iteration, total)}  {parts}", file=self.stream, flush=True)
        if iteration > self.collapse_warmup * total:
            self.watch_collapse(values, iteration)
        if self.run is not None:
            self.run.log_metrics(values, step=iteration)

    def pace(self, iteration: int, total: int) -> str:
        """``(4.0%, 2.31 steps/s, ETA 6m58s)``: progress, the rate since the last progress line and the time left
        to `total` at that rate (what a week-long run's log needs to be read at a glance)."""
        now = time.perf_counter()
        rate = (iteration - self._last_step) / max(now - self._step_clock, 1e-9)
        self._step_clock, self._last_step = now, iteration
        left = format_duration((total - iteration) / rate) if rate > 0 else "unknown"
        return f"({100 * iteration / max(total, 1):.1f}%, {rate:.3g} steps/s, ETA {left})"

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
            with eval_mode(pretext):
                smallest = getattr(unwrap(pretext), "min_batch_size", 1)
                for index, batch in enumerate(self.data_loader):
                    if self.max_batches is not None and index >= self.max_batches:
                        break
                    if _batch_length(batch) < smallest:  # a last batch too small for the pretext (one CLIP study)
                        continue
                    with autocast(engine.device, getattr(engine, "precision", "fp32")):
                        output = pretext(batch_to_device(batch, engine.device, non_blocking=True))
                    for key, value in scalars(output).items():
                        sums[key] = sums.get(key, 0.0) + value
                    batches += 1
        if batches == 0:
            if get_rank() == 0:
                print(f"validation at step {engine.state.iteration}: no complete batch of held-out volumes; add "
                      f"volumes or raise validation_fraction.", flush=True)
            return {}
        metrics = {f"val/{key}": value / batches for key, value in sums.items() if key.startswith(("loss", "metric/"))}
        if self.evaluate is not None and get_rank() == 0:
            with unchanged_random_state(pretext, self.data_loader):
                evaluated = self.evaluate(unwrap(pretext), self.data_loader, device=engine.device)
            metrics.update({f"val/{key}": float(value) for key, value in evaluated.items()})
        engine.state.metrics.update(metrics)
        if get_rank() == 0:
            print(f"validation at step {engine.state.iteration}: " +
                  "  ".join(f"{key} {value:.4g}" for key, value in metrics.items()), flush=True)
        RunLogger(engine).log_metrics(metrics, step=engine.state.iteration)
        return metrics


def _batch_length(batch: Any) -> int:
    """How many items a batch holds: the first dimension of its first tensor."""
    tensors = [value for value in (batch.values() if isinstance(batch, Mapping) else batch)
               if isinstance(value, torch.Tensor)]
    return int(tensors[0].shape[0]) if tensors else 0


class ViewsPicture:
    """At the end of training, draw the pretext's views of one batch and log the picture(s) as MLflow artifacts
    (rank 0 under torchrun)."""

    def __init__(self, data_loader: Iterable, output_dir: str, draw: Callable | None = None,
                 file_name: str = "views.png") -> None:
        self.data_loader, self.output_dir, self.draw, self.file_name = data_loader, output_dir, draw, file_name

    def attach(self, engine: Engine) -> None:
        if get_rank() == 0:  # one picture per run, drawn by rank 0
            engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> Path | None:
        pretext = unwrap(engine.network)
        if not hasattr(pretext, "views"):
            return None
        path = Path(self.output_dir) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        # the final checkpoint is written after this: a longer resumed run must not see the picture's draws
        with unchanged_random_state(pretext, self.data_loader):
            batch = next(iter(self.data_loader))
            with eval_mode(pretext):
                views = pretext.views(batch_to_device(batch, engine.device))
        draw = self.draw or getattr(pretext, "save_views_picture")
        written = draw(views, path)  # one path, or several (one per task of the cyclic pretext)
        paths = written if isinstance(written, (list, tuple)) else [path]
        run = RunLogger(engine)
        for picture in paths:
            run.log_artifact(picture, "views")
            print(f"views of one region: {picture}", flush=True)
        return paths[0] if paths else None
