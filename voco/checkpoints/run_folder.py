"""The checkpoints of a run folder, newest first, and the one a resume or an export reads."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from voco.checkpoints.formats import _first_line, read_checkpoint
from voco.errors import CheckpointError

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
# Iteration (or epoch) number in ignite/MONAI file names: "checkpoint_iteration=200.pt", "net_200.pt".
_STEP_IN_NAME = re.compile(r"(?:iteration|epoch)=(\d+)|_(\d+)\.[A-Za-z]+$")


def find_latest_checkpoint(directory: str | os.PathLike, *, training_state: bool = False) -> Path | None:
    """The newest checkpoint of a run folder (or of its ``checkpoints/``) that reads completely, or None where
    there is none: the one policy of resume, export and the demo.

    Each of :func:`ranked_checkpoints`, newest first, is read in full with `read_checkpoint` (weights only): a file
    can look complete and still be damaged. A damaged newer file is passed over for the previous one, with a
    message naming both. (`voco.engine.latest_checkpoint` is this, decided by rank 0 under torchrun.)

    Args:
        training_state: take only files that hold a trainer state (``{"trainer": …}``, what a run's checkpoint saver
            writes): resume passes over anything else in the folder, e.g. an exported encoder named
            ``encoder_export_50000.pt``, with a message.

    Raises:
        CheckpointError: the folder holds checkpoints and none of them can be read.
    """
    damaged: list[tuple[Path, CheckpointError]] = []
    foreign: list[Path] = []
    for path in ranked_checkpoints(directory):  # [] for a folder that does not exist yet
        try:
            content = read_checkpoint(path)
        except CheckpointError as error:
            damaged.append((path, error))
            continue
        if training_state and not isinstance(content.get("trainer"), Mapping):
            foreign.append(path)
            continue
        for bad, error in damaged:
            print(f"checkpoint {bad} cannot be read ({_first_line(error.__cause__ or error)}); taking the previous "
                  f"one, {path}.", flush=True)
        _tell_foreign(foreign)
        return path
    _tell_foreign(foreign)
    if damaged:
        raise CheckpointError(f"none of the {len(damaged)} checkpoints in {directory} can be read (the newest: "
                              f"{damaged[0][1]}); move them away to start over, or run with --resume False.")
    return None


def _tell_foreign(paths: list[Path]) -> None:
    if paths:
        names = ", ".join(path.name for path in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        print(f"resume passes over {names} in {paths[0].parent}: no trainer state in it, so no checkpoint saver of a "
              "run wrote it.", flush=True)


def ranked_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a run folder (or of its ``checkpoints/``), newest first; [] for a missing folder.

    Files are ranked by their training iteration: the number in ignite's names
    (``checkpoint_iteration=200.pt``, ``checkpoint_final_iteration=1000.pt``, ``net_200.pt``), else the
    iteration the file itself records (``{"trainer": {"iteration": …}}`` or ``{"global_step": …}``, as in
    a fixed ``checkpoint_final.pt``). Files without either rank below, by modification time. Hidden and
    temporary files are left out.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    # The bundles save under <run folder>/checkpoints: accept the run folder itself too.
    folders = [folder for folder in (directory, directory / "checkpoints") if folder.is_dir()]
    candidates = [
        path
        for folder in folders
        for path in folder.iterdir()
        if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES and not path.name.startswith(".")
    ]

    def rank(path: Path) -> tuple[int, int, float]:
        match = _STEP_IN_NAME.search(path.name)
        step = int(match.group(1) or match.group(2)) if match else stored_step(path)
        return (0, 0, path.stat().st_mtime) if step is None else (1, step, path.stat().st_mtime)

    return sorted(candidates, key=rank, reverse=True)


def stored_step(path: Path) -> int | None:
    """The iteration a training checkpoint records, read with its tensors memory-mapped (not loaded)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a probe only: legacy (unmappable), unsafe or damaged files simply record no step
        return None
    if not isinstance(content, Mapping):
        return None
    trainer = content.get("trainer")
    step = trainer.get("iteration") if isinstance(trainer, Mapping) else content.get("global_step")
    return step if isinstance(step, int) else None
