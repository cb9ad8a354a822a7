"""Checkpoints of a run: what they hold beside the weights, the atomic saver, and which one a resume reads.

`AtomicCheckpointSaver` writes checkpoints atomically; `latest_checkpoint` passes over damaged ones (the one
policy, `voco.checkpoints.find_latest_checkpoint`, agreed by all ranks); `ResumeLoader` restores one and says in
one sentence which settings differ when it does not fit the configured model.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from voco.distributed import broadcast_object, get_rank
from voco.checkpoints import find_latest_checkpoint, read_checkpoint
from voco.errors import CheckpointError, VolumeError
from voco.files import TEMPORARY_FILE, atomic_write, remove_with_checksum

# What ignite's atomic write names its temporary file (`tempfile.NamedTemporaryFile` in the checkpoint folder), and
# what `voco.files.atomic_write` names its own: both are left over by a kill during a write.
TEMPORARY_NAME = re.compile(r"tmp[a-z0-9_]{8}|" + TEMPORARY_FILE.pattern)


def _synced_save(saver: DiskSaver, checkpoint: Mapping, path: Path, func: Callable) -> None:
    """What an ignite `DiskSaver` writes, through `voco.files.atomic_write`: a temporary file in the folder, renamed
    when complete, with the file and the folder flushed to disk (ignite's atomic mode does not fsync, so a node crash
    could leave an empty checkpoint under its final name)."""
    with atomic_write(path, checksum=True) as temporary:
        func(checkpoint, temporary, **saver.kwargs)


def _remove(saver: DiskSaver, filename: str) -> None:
    """What an ignite `DiskSaver` removes when it rotates checkpoints, with the checksum recorded beside it."""
    remove_with_checksum(Path(saver.dirname) / filename)


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
    newest checkpoint; here every file is written through `_synced_save` (a temporary file in the same folder, renamed
    when complete, flushed to disk). Interval checkpoints that an earlier run of the folder left join the rotation,
    so a resumed run still keeps only the newest `n_saved`; the temporary file of a write that a kill cut short is
    deleted. Nothing is written on an exception when nothing was trained since the run started (a failed resume
    must not replace the trained checkpoint with the untrained state). Arguments are those of MONAI's `CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:  # MONAI's DiskSaver (atomic=False) keeps its naming, writes through ours
                checkpoint.save_handler._save_func = functools.partial(_synced_save, checkpoint.save_handler)
                checkpoint.save_handler.remove = functools.partial(_remove, checkpoint.save_handler)
        self._adopted_earlier = False

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self._steps_this_process = 0
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count_step)

    def _count_step(self, engine: Engine) -> None:
        self._steps_this_process += 1

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, VolumeError):  # the strict data policy: `GracefulStop` writes the checkpoint and stops
            return
        if not self._steps_this_process:
            # Nothing was trained in this process: the state may come from a failed load (another model setting),
            # and writing it would replace the trained checkpoint with untrained weights.
            self.logger.info("no checkpoint written on the exception: nothing was trained since the run started")
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
        for leftover in Path(self.save_dir).iterdir():  # half-written by a run killed during a write
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


def resume_checkpoint(directory: str | Path, resume: bool = True) -> str | None:
    """What the bundles' ``resume_from`` is: `latest_checkpoint` of the folder, or None with `resume` off."""
    return latest_checkpoint(directory) if resume else None


def latest_checkpoint(directory: str | Path) -> str | None:
    """Path of the newest checkpoint in `directory` that reads completely (for resume), or None where there is none:
    `voco.checkpoints.find_latest_checkpoint` of the files holding a trainer state, decided by rank 0 and told to the
    other ranks under torchrun, so all load the same file.

    Raises:
        CheckpointError: the folder holds checkpoints and none of them can be read.
    """
    found, problem = None, None
    if get_rank() == 0:
        try:
            found = find_latest_checkpoint(directory, training_state=True)
        except CheckpointError as error:
            problem = str(error)
    found, problem = broadcast_object((None if found is None else str(found), problem))
    if problem is not None:
        raise CheckpointError(problem)
    return found


class ResumeLoader(CheckpointLoader):
    """MONAI's `CheckpointLoader` for resuming a run from `checkpoint_objects`: the ``backbone_spec`` entry is not
    restored (the config decides the model) but compared, and a checkpoint that does not fit the configured model
    ends in one sentence naming the settings and tensors that differ and what to do.

    Why: MONAI's loader fails with PyTorch's page-long ``size mismatch`` listing, which names no setting.
    """

    def __init__(self, load_path: str, load_dict: Mapping[str, Any], **kwargs: Any) -> None:
        self.configured_spec = load_dict["backbone_spec"].state_dict() if "backbone_spec" in load_dict else {}
        super().__init__(load_path, {name: value for name, value in load_dict.items() if name != "backbone_spec"},
                         **kwargs)

    def __call__(self, engine: Engine) -> None:
        schedules = {name: schedule_settings(value) for name, value in self.load_dict.items()
                     if isinstance(value, LambdaLR)}
        try:
            super().__call__(engine)
        except RuntimeError as error:  # load_state_dict: missing, unexpected or differently shaped tensors
            raise CheckpointError(self._mismatch(error)) from error
        for name, configured in schedules.items():
            rebuild_schedule(self.load_dict[name], configured, self.logger)

    def _mismatch(self, error: RuntimeError) -> str:
        stored = read_checkpoint(self.load_path)
        spec = stored.get("backbone_spec") if isinstance(stored.get("backbone_spec"), Mapping) else {}
        settings = [f"{name} {spec.get(name)!r} there, {self.configured_spec.get(name)!r} here"
                    for name in sorted(set(spec) | set(self.configured_spec))
                    if spec.get(name) != self.configured_spec.get(name)]
        tensors = []
        for name, module in self.load_dict.items():
            if isinstance(module, nn.Module) and isinstance(stored.get(name), Mapping):
                tensors += _differing_tensors(stored[name], module.state_dict())
        differences = settings + tensors[:3] + ([f"{len(tensors) - 3} more tensors"] if len(tensors) > 3 else [])
        found = "; ".join(differences) if differences else str(error).strip().splitlines()[0]
        return (f"checkpoint {self.load_path} was written by a run with other model settings ({found}): resume it "
                "with its original settings, or start a new run with another --run_name.")


# What a learning-rate scheduler's state holds besides its settings: where it is, not where it goes.
SCHEDULE_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                               "base_lrs", "lr_lambdas", "verbose"})


def schedule_settings(scheduler: LambdaLR) -> dict:
    """The configured settings of a schedule (for `WarmupCosineSchedule`: warmup_steps, t_total, cycles ...)."""
    return {key: value for key, value in scheduler.state_dict().items() if key not in SCHEDULE_PROGRESS}


def rebuild_schedule(scheduler: LambdaLR, configured: Mapping[str, Any], logger: Any) -> None:
    """After a resume, put back the configured schedule where the checkpoint's differs (a run extended with a higher
    --max_steps): the learning rate follows the new length from the restored step on, rather than the old cosine,
    which would climb back up from its end."""
    stored = schedule_settings(scheduler)
    changed = {key: (stored.get(key), value) for key, value in configured.items() if stored.get(key) != value}
    if not changed:
        return  # the exact resume: nothing to do
    scheduler.__dict__.update(configured)
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
    logger.info("learning-rate schedule rebuilt for the configured settings at step %d (%s)", scheduler.last_epoch,
                ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))


def _differing_tensors(stored: Mapping[str, Any], own: Mapping[str, Any]) -> list[str]:
    """``name shape there, shape here`` for tensors of another shape, and the names only one side has."""
    differing = [f"{name} {tuple(stored[name].shape)} there, {tuple(own[name].shape)} here"
                 for name in own if name in stored and tuple(stored[name].shape) != tuple(own[name].shape)]
    differing += [f"{name} only there" for name in stored if name not in own]
    differing += [f"{name} only here" for name in own if name not in stored]
    return differing
