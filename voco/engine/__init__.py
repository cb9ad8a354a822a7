"""The training loop of every pretraining bundle, in small modules:

- `trainer`: `PretextTrainer` (one optimizer step per iteration, bf16, accumulation, clipping, non-finite steps
  skipped and counted) and the batch helpers;
- `random_state`: exact resume — every generator in the checkpoint, the data order from (seed, epoch, item) through
  the `voco.seeding` contract;
- `handlers`: step logging with the collapse warning, validation of the pretext, the picture of its views (the
  frozen-encoder probe is `voco.probe.FrozenProbe`);
- `checkpointing`: what a checkpoint holds beside the weights, the atomic saver, the checkpoint a resume reads and
  its loader;
- `stopping`: SIGTERM/SIGINT, the numerical stop and a bad volume end a run with a checkpoint and an exit code;
- `optimizers`: parameter groups with and without weight decay;
- `setup`: the run folder (locked, `voco.run_lock`) and MLflow experiment, required settings.

Distributed helpers (rank, broadcast, the DistributedDataParallel wrapper) are `voco.distributed`. The bundles
name everything as ``voco.engine.<name>``: this package re-exports it.
"""

from voco.distributed import broadcast_object, distributed_model
from voco.engine.checkpointing import (TEMPORARY_NAME, AtomicCheckpointSaver, ResumeLoader, RunInfo,
                                       latest_checkpoint, resume_checkpoint)
from voco.engine.handlers import DefaultMLFlowHandler, PretextValidation, StepLogger, ViewsPicture
from voco.engine.optimizers import decay_groups
from voco.engine.random_state import RandomState, unchanged_random_state
from voco.engine.setup import enabled, prepare_run, required_setting, validation_datalist, warmup_steps
from voco.engine.stopping import EXIT_BAD_DATA, GracefulStop, exit_if_stopped
from voco.run_lock import release_run_folder as release_run
from voco.engine.trainer import (COUNTERS, EXIT_NON_FINITE, HOST_KEYS, PRECISIONS, PretextTrainer, autocast,
                                 batch_to_device, scalars)

__all__ = ["AtomicCheckpointSaver", "COUNTERS", "DefaultMLFlowHandler", "EXIT_BAD_DATA", "EXIT_NON_FINITE", "GracefulStop", "HOST_KEYS",
           "PRECISIONS", "PretextTrainer", "PretextValidation", "RandomState", "ResumeLoader", "RunInfo",
           "StepLogger", "TEMPORARY_NAME", "ViewsPicture", "autocast", "batch_to_device", "broadcast_object",
           "decay_groups", "distributed_model", "enabled", "exit_if_stopped", "latest_checkpoint", "prepare_run",
           "release_run", "required_setting", "resume_checkpoint", "scalars", "unchanged_random_state",
           "validation_datalist", "warmup_steps"]
