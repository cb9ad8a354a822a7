"""The seed's round trip between the training loop and the data: the one contract exact resume rests on.

The trainer's sampler asks for items as ``dataset[(index, seed)]`` with ``seed = item_seed(run seed, epoch,
index)``; a `SeededDataset` seeds its random transforms from that seed before making the item, so an item's random
region depends on the run's seed, the epoch and the item alone, not on which loader worker makes it or on what that
worker made before. Checkpoints capture the generators of the dataset's random transforms
(`random_transform_generators`) and those of the pretext (`pretext_generators`), so a resumed run continues
exactly. The engine depends on this module only; the data side implements `SeededDataset` without naming the engine.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class SeededDataset(Protocol):
    """A dataset whose items can be asked for with a seed: ``dataset[(index, seed)]``, or ``dataset[index]``
    without one (then its transforms draw from their own generators)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int | tuple[int, int]) -> Any: ...

    def seed_random_transforms(self, seed: int) -> None:
        """Seed every random transform of the dataset (each from its own stream of `seed`)."""


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random transforms for item `index` of `epoch`: one number per (seed, epoch, item), so an item
    is the same whichever worker process makes it and whether or not the run was resumed."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def random_transform_generators(root: Any) -> list[np.random.RandomState]:
    """The NumPy generators (``R``) of the MONAI random transforms inside a dataset, in a fixed order.

    Walks attributes, lists and tuples as MONAI's `set_rnd` does, but into every randomizable object (a Compose
    and each of its transforms hold their own generator)."""
    found: dict[int, np.random.RandomState] = {}
    seen: set[int] = set()

    def visit(node: Any) -> None:
        if id(node) in seen or isinstance(node, (torch.Tensor, np.ndarray, str, bytes, int, float, type)):
            return
        seen.add(id(node))
        if isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
            return
        if not hasattr(node, "__dict__"):
            return
        generator = getattr(node, "R", None)
        if isinstance(generator, np.random.RandomState):
            found.setdefault(id(generator), generator)
        for key, value in vars(node).items():
            if not key.startswith("__"):
                visit(value)

    visit(root)
    return list(found.values())


def pretext_generators(pretext: torch.nn.Module) -> list[tuple[str, torch.Generator]]:
    """The generators a pretext draws its views from: the ``generator`` attribute (a `torch.Generator`) of any of its
    modules, by module name (the tasks of the cyclic pretext each hold one)."""
    return [(name, module.generator) for name, module in pretext.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)]
