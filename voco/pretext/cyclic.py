"""Cyclic multi-task pretraining: several pretexts on one shared backbone, one task per optimizer step.

The mammography slides' recipe (specs/pretext.md section 5): tasks are cycled deterministically — optimizer
step t runs task t mod n — with one shared backbone and one optimizer (AdamW over the backbone and every
task's heads). Cycling rather than summing the losses keeps each step as cheap as one task's and needs no
loss weights; every task still moves the shared encoder every n steps.

    backbone = build_backbone("vit", "B", layout="window")
    pretext = CyclicPretext({"mae": MaskedImagePretext(backbone, variant="simmim"),
                             "contrastive": ContrastivePretext(backbone),
                             "query_box": QueryBoxPretext(backbone)})

Logging: each task's losses, metrics and health signals are renamed under its own prefix — ``loss/<task>``,
``loss/<task>/<part>``, ``metric/<task>/<name>``, ``health/<task>/<name>`` — and every step's output carries the
most recent values of every task that has run, so a log taken at any step shows all tasks, whatever the logging
interval. ``loss`` is the loss of the task that ran. Validation (``eval()`` mode) runs every task on the same batch
and reports all of them; its ``loss`` is their sum.

The step counter is a buffer, so a resumed run continues the cycle where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from voco.errors import ConfigError


def task_prefixed(name: str, output: Mapping[str, Any]) -> dict[str, Any]:
    """A task's output under its prefix: ``loss`` -> ``loss/<name>``, ``loss/x`` -> ``loss/<name>/x``,
    ``metric/x`` -> ``metric/<name>/x``, ``health/x`` -> ``health/<name>/x``, anything else ``x`` -> ``<name>/x``."""
    renamed = {}
    for key, value in output.items():
        kind, _, part = key.partition("/")
        if kind in ("loss", "metric", "health"):
            renamed[f"{kind}/{name}" + (f"/{part}" if part else "")] = value
        else:
            renamed[f"{name}/{key}"] = value
    return renamed


class CyclicPretext(nn.Module):
    """Runs the task ``t mod n`` at optimizer step t; all tasks in validation.

    Args:
        tasks: name -> pretext module; every pretext holds the same ``backbone`` object. Entries that are None
            (tasks switched off in a bundle config) are left out.
        order: the names of the tasks to cycle, in cycle order (default: all of ``tasks`` in their order).

    Attributes:
        backbone: the shared backbone, registered here too so that checkpoints and ``voco export`` find it under
            ``backbone.`` as for a single pretext.
        step: optimizer steps taken (a buffer: saved and resumed with the weights).
    """

    def __init__(self, tasks: Mapping[str, nn.Module | None], order: Sequence[str] | None = None) -> None:
        super().__init__()
        available = {name: task for name, task in tasks.items() if task is not None}
        order = list(available) if order is None else [str(name) for name in order]
        unknown = [name for name in order if name not in available]
        if unknown:
            raise ConfigError(f"the cyclic pretext has no task {', '.join(map(repr, unknown))}; name tasks from "
                              f"{', '.join(tasks)} (tasks left out of task_names are not built).")
        tasks = {name: available[name] for name in order}
        if not tasks:
            raise ConfigError("the cyclic pretext got no task; give at least one (e.g. task_names ['mae']).")
        backbones = {id(getattr(task, "backbone", None)) for task in tasks.values()}
        if len(backbones) != 1 or None in [getattr(task, "backbone", None) for task in tasks.values()]:
            raise ConfigError(f"the tasks {', '.join(tasks)} must share one backbone object; build each pretext with "
                              "the same backbone (in a bundle: the same @network_def).")
        self.tasks = nn.ModuleDict(tasks)
        self.backbone = next(iter(tasks.values())).backbone
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._latest: dict[str, dict[str, Any]] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.keys())

    def current_task(self) -> str:
        """The name of the task the next training step runs: task ``step mod n``."""
        return self.task_names[int(self.step) % len(self.tasks)]

    def forward(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        if not self.training:
            return self.validate(batch)
        name = self.current_task()
        output = self.tasks[name](batch)
        prefixed = task_prefixed(name, output)
        self._latest[name] = {key: value.detach() if isinstance(value, torch.Tensor) else value
                              for key, value in prefixed.items()}
        merged: dict[str, Any] = {}
        for latest in self._latest.values():  # the most recent values of every task that has run
            merged.update(latest)
        merged.update(prefixed)  # this step's, with the loss still attached to the graph
        merged["loss"] = output["loss"]
        merged["task"] = self.task_names.index(name)
        return merged

    def validate(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        """Every task on the same batch: all prefixed outputs, and ``loss`` = the sum of the task losses."""
        merged: dict[str, Any] = {}
        total = 0.0
        for name, task in self.tasks.items():
            output = task(batch)
            merged.update(task_prefixed(name, output))
            total = total + output["loss"]
        merged["loss"] = total
        return merged

    def after_step(self) -> None:
        """After the optimizer step: the task that ran updates its teachers, then the cycle moves on."""
        task = self.tasks[self.current_task()]
        if hasattr(task, "after_step"):
            task.after_step()
        self.step += 1

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, tuple[Callable, Any]]:
        """Each task's views of the batch, with the function of its module that draws them."""
        views = {}
        for name, task in self.tasks.items():
            draw = getattr(sys.modules[type(task).__module__], "save_views_picture", None)
            if hasattr(task, "views") and draw is not None:
                views[name] = (draw, task.views(batch))
        return views


def save_views_picture(views: Mapping[str, tuple[Callable, Any]], path: str | Path) -> list[Path]:
    """One picture per task beside ``path``: ``views.png`` -> ``views_<task>.png``; returns their paths."""
    path = Path(path)
    return [draw(task_views, path.with_name(f"{path.stem}_{name}{path.suffix}"))
            for name, (draw, task_views) in views.items()]
