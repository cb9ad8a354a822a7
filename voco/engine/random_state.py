"""Exact resume: every random generator a run draws from goes into the checkpoint, and the data order is a
function of the run's seed, the epoch and the item (see `voco.seeding`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events

from voco.distributed import from_every_rank, get_rank, unwrap
from voco.seeding import SeededDataset, item_seed, pretext_generators, random_transform_generators

logger = logging.getLogger("voco.engine")


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
    (a `voco.seeding.SeededDataset`), each index goes out as ``(index, item_seed(seed, epoch, index))``: the
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
                seed = None if not isinstance(dataset, SeededDataset) else (
                    generator.initial_seed() if generator is not None else 0)
                batch_sampler.sampler = _EpochOrder(batch_sampler.sampler, seed)
            self._order = batch_sampler.sampler
        else:
            logger.warning("the training loader has no batch sampler: a run resumed inside an epoch starts that "
                           "epoch again from its first batch")

    def _loader_generator(self) -> torch.Generator | None:
        return getattr(self.data_loader, "generator", None)

    def _pretext_generators(self) -> list[tuple[str, torch.Generator]]:
        return pretext_generators(unwrap(self.pretext))

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
        return {"ranks": from_every_rank(state)}

    def load_state_dict(self, state: Mapping) -> None:
        ranks, rank = state["ranks"], get_rank()
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
