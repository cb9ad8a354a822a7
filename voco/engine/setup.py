"""What a bundle calls before training: required settings and the run folder (locked) with its MLflow experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.distributed as dist

from voco.allocation import keep_freed_memory
from voco.bundles import check_command_line
from voco.distributed import get_rank, is_distributed
from voco.errors import ConfigError
from voco.run_lock import lock_run_folder


def required_setting(name: str, what: str) -> None:
    """Config value for a setting the user must give: evaluating it stops the run with what to pass."""
    raise ConfigError(f"the bundle needs --{name}: {what}.")


def prepare_run(output_dir: str | Path, tracking_uri: str, experiment_name: str, lock: bool = True,
                facts: Mapping[str, Any] | None = None) -> Path:
    """Check the command line's overrides (`voco.bundles.check_command_line`: a mistyped one stops the run, naming
    the setting meant), create the run folder and, with `lock`, take its lock (`voco.run_lock`; rank 0 under
    torchrun): a second process with the same run name stops in one sentence. Where the store is our embedded SQLite file, create the
    experiment with its artifacts beside the store (MLflow would otherwise put them in ./mlruns of whatever folder
    this runs in). The bundles release the lock in ``finalize`` (`voco.engine.release_run`). A pretraining bundle
    passes its `facts` (manifest, dataset_dir, preset, region size, backbone): they are written to
    ``<run folder>/pretraining.json`` with the preprocessing plan they imply (``"plan"``: presets, spacing, intensity
    window, region size, the backbone spec in full; `voco.checkpoints.plan`), what `voco export` carries beside the
    encoder (`voco.checkpoints.provenance`). The training process keeps freed memory for its next step
    (`voco.allocation`: no page fault per page of every batch-sized tensor)."""
    check_command_line()  # before anything is written: a mistyped override stops the run with the setting meant
    keep_freed_memory()
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if lock and get_rank() == 0:
        lock_run_folder(folder)
    if facts is not None and get_rank() == 0:
        from voco.checkpoints.plan import PLAN_KEY, pretraining_plan
        from voco.checkpoints.provenance import RUN_FACTS_FILE
        from voco.files import write_json_atomically

        recorded = json.loads(json.dumps(dict(facts), default=str))
        recorded[PLAN_KEY] = pretraining_plan(recorded)  # what fine-tuning defaults to (`voco.checkpoints.plan`)
        write_json_atomically(json.loads(json.dumps(recorded, default=str)), folder / RUN_FACTS_FILE)
    if tracking_uri.startswith("sqlite:///") and get_rank() == 0:  # one writer: SQLite
        from voco.tracking import prepare_experiment

        try:
            prepare_experiment(tracking_uri, experiment_name)
        except ImportError:  # mlflow missing: only tracking needs it, and tracking reports that itself
            pass
    if is_distributed():
        dist.barrier()  # the other ranks wait until the store and experiment exist
    return folder


# What the pretraining bundles compute from their settings, named here so that configs only compose.


def warmup_steps(requested: int, max_steps: int) -> int:
    """The learning-rate warm-up: as requested, but at most a tenth of the run (at least one step), so a short
    run (a smoke test, a resumed run with fewer steps) still reaches its learning rate."""
    return min(int(requested), max(int(max_steps) // 10, 1))


def enabled(handlers: Sequence[Any]) -> list:
    """The handlers that are switched on (a config item with ``_disabled_`` true resolves to None)."""
    return [handler for handler in handlers if handler is not None]


def validation_datalist(split: Sequence[Sequence[Mapping]], batch_size: int) -> list:
    """The held-out entries of ``(training, validation)``; without any, the first batch of training entries, so the
    validation and picture handlers still have data (their numbers then say nothing about held-out volumes)."""
    training, validation = split
    return list(validation) or list(training)[:batch_size]
