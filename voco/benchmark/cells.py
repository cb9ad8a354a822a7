"""A cell of the benchmark grid and its MLflow run name: a task fine-tuned (or evaluated) from one encoder source
in one mode with one seed. Plain data, no MONAI: the grid is planned and finished runs are found without it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENCODER_MODES = ("finetune", "frozen", "linear_probe")  # what a pretrained encoder can be used as


def encoder_name(pretrained: str | None) -> str:
    """A short name for an encoder source, used in run names: "scratch" or the checkpoint's file stem."""
    if pretrained in (None, "", "scratch"):
        return "scratch"
    return Path(str(pretrained)).name.split(".")[0]


def default_mode(pretrained: str | None) -> str:
    """The fine-tuning mode a cell takes when none is given: "scratch" without a checkpoint, else "finetune"."""
    return "scratch" if encoder_name(pretrained) == "scratch" else "finetune"


def run_name(task: str, pretrained: str | None, mode: str, backbone: str, size: str | int, seed: int,
             training_cases: int | None = None) -> str:
    """The MLflow run name of one benchmark cell, e.g. ``btcv-VoCo_B_SSL_head-finetune-swin_B-seed0``.

    `voco benchmark run` finds finished cells by this name, so it must be a function of the cell alone."""
    encoder = encoder_name(pretrained)
    parts = [task] + ([] if encoder == mode else [encoder]) + [mode, f"{backbone}_{size}"]
    if training_cases is not None:
        parts.append(f"{training_cases}cases")
    return "-".join(parts + [f"seed{seed}"])


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a task fine-tuned from one encoder source in one mode with one seed.

    Attributes:
        task: registry task id, e.g. "btcv"; for a user's own dataset the task name derived from it.
        pretrained: a checkpoint path, or "scratch".
        mode: "scratch" (with pretrained "scratch"), or "finetune" | "frozen" | "linear_probe"; a vision-language
            task: "zero_shot" or "finetune" (vocabulary fine-tuning) of a CLIP checkpoint.
        seed: the bundle's seed (also the seed of the few-label training case choice).
        backbone / size: the network spec, e.g. "swin" / "B".
        training_cases: keep only this many training cases (None: all).
        source: the dataset file of a user's own task (`voco.benchmark.own_data`), None for a registry task.
    """

    task: str
    pretrained: str
    mode: str
    seed: int
    backbone: str = "swin"
    size: str = "B"
    training_cases: int | None = None
    source: str | None = None

    @property
    def run_name(self) -> str:
        """The MLflow run name the bundle gives this cell (how finished cells are found)."""
        return run_name(self.task, self.pretrained, self.mode, self.backbone, self.size, self.seed,
                        self.training_cases)

    def settings(self) -> dict:
        """The bundle settings of this cell (overrides of configs/train.json)."""
        return {"task": self.source or self.task, "pretrained": self.pretrained, "mode": self.mode, "backbone": self.backbone,
                "size": self.size, "seed": self.seed, "training_cases": self.training_cases}
