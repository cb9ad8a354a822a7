"""The online frozen-encoder probe: is the encoder getting better while it pretrains?

A pretext's own loss says how well the encoder solves the pretext, not whether its features are useful. The probe
asks the downstream question cheaply: it freezes the encoder, extracts its multi-scale feature maps of a few
labelled volumes, fits a per-voxel linear classifier on some of them in closed form (ridge regression on one-hot
targets) and scores the segmentation it predicts on the others with Dice. Rising probe Dice means the features
separate the anatomy better; the value at step 0 is the untrained encoder's, so the gain is visible at a glance.

    features   every map of ``backbone.forward_features`` (Swin: five scales, stride 1 to 32; ViT: the patch grid)
    fit        class-balanced voxels of the fitting volumes; each channel standardised; ridge, solved in float64
    predict    the classifier is linear, so it runs on each map at its own resolution (a 1x1x1 convolution) and
               the class scores are upsampled trilinearly and summed: exactly the classifier on upsampled features,
               without ever holding full-resolution features
    score      Dice per foreground class on the held-out volumes (MONAI's `compute_dice`), mean over classes

The default probe set is labelled phantoms written once under ``runs/probe_phantoms`` with a seed no pretraining
set uses; `load_probe_set` reads a user's own labelled manifest or Decathlon JSON instead (``--probe_manifest``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode

from voco.distributed import get_rank, unwrap
from voco.errors import ConfigError

PROBE_SEED = 271828  # phantom seed of the default probe set; pretraining phantom sets use small seeds (0, 1, ...)
DEFAULT_PROBE_VOLUMES = 8  # half to fit the classifier, half to score it


@dataclass
class ProbeSet:
    """Preprocessed labelled volumes ``[1, X, Y, Z]`` of one size, split into fitting and held-out ones."""
    fit_images: list[torch.Tensor]
    fit_labels: list[torch.Tensor]
    test_images: list[torch.Tensor]
    test_labels: list[torch.Tensor]
    class_names: tuple[str, ...]  # foreground classes 1..K

    @property
    def num_classes(self) -> int:  # with the background
        return len(self.class_names) + 1


def default_probe_manifest(directory: str | os.PathLike = "runs/probe_phantoms",
                           n: int = DEFAULT_PROBE_VOLUMES) -> Path:
    """The labelled phantoms of the default probe set (made once, then reused): bodies of a consistent size in
    mm (as phantom-seg's), seed `PROBE_SEED`, so no pretraining phantom is among them."""
    from voco.benchmark import phantom_tasks
    from voco.data.phantoms import ensure_phantoms

    return ensure_phantoms(Path(directory).expanduser().resolve(), n, PROBE_SEED, name="probe_phantoms",
                           field_of_view_range=phantom_tasks.TASK_FIELD_OF_VIEW_RANGE,
                           in_plane_spacing_range=phantom_tasks.TASK_IN_PLANE_SPACING_RANGE,
                           slice_spacing_range=phantom_tasks.TASK_SLICE_SPACING_RANGE)


def _class_names(source: Path, largest_label: int) -> tuple[str, ...]:
    """Foreground class names: a Decathlon JSON's ``labels``, the phantoms' classes, else ``class_<k>``."""
    import json

    from voco.data.phantoms import PHANTOM_CLASSES

    data = json.loads(source.read_text())
    labels = data.get("labels") if isinstance(data, dict) else None
    if isinstance(labels, dict):
        names = {int(key): str(value) for key, value in labels.items() if str(key).isdigit()}
    elif data.get("format") and all(d.get("name", "").endswith("phantoms") for d in data.get("datasets", [])):
        names = {int(key): str(value) for key, value in PHANTOM_CLASSES.items()}
    else:
        names = {}
    return tuple(names.get(index, f"class_{index}") for index in range(1, largest_label + 1))


def load_probe_set(source: str | os.PathLike, size: Sequence[int], preset: str | None = None,
                   max_volumes: int = 16) -> ProbeSet:
    """Read a labelled manifest or Decathlon JSON into a `ProbeSet` of volumes of exactly `size` voxels.

    Each volume goes through the pretraining preset's deterministic transforms (its own preset, or `preset` for
    all), then is centre-cropped or padded to `size`. The first half of the labelled volumes (at most
    `max_volumes` in all) fit the classifier, the rest score it.
    """
    import monai.transforms as mt

    from voco.data.manifest import load_manifest, to_datalist
    from voco.data.regions import preset_transforms

    source = Path(source).expanduser().resolve()
    entries = [entry for entry in to_datalist(load_manifest(source)) if "label" in entry][:max_volumes]
    if len(entries) < 2:
        raise ConfigError(f"the probe set {source} has {len(entries)} volume(s) with a label map; the probe needs "
                          f"at least 2 (one to fit, one to score): give a manifest or Decathlon JSON with labels.")
    size = [int(value) for value in size]
    images, labels = [], []
    for entry in entries:
        steps = preset_transforms(preset or entry["preset"], size, keys=("image",), label_keys=("label",))
        item = mt.Compose([*steps, mt.ResizeWithPadOrCropd(keys=("image", "label"), spatial_size=size)])(
            {"image": entry["image"], "label": entry["label"]})
        images.append(item["image"][:1].float())
        labels.append(item["label"][:1].round().long())
    largest = int(max(label.max() for label in labels))
    if largest < 1:
        raise ConfigError(f"the label maps of the probe set {source} hold only background (0); give labelled "
                          f"volumes with at least one foreground class.")
    half = len(entries) // 2
    return ProbeSet(images[:half], labels[:half], images[half:], labels[half:], _class_names(source, largest))


def encoder_of(pretext: torch.nn.Module) -> torch.nn.Module:
    """The pretext's backbone, unwrapped from DistributedDataParallel and torch.compile."""
    module = unwrap(pretext)
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, torch.nn.Module) or not hasattr(unwrap(backbone), "forward_features"):
        raise ConfigError(f"{type(module).__name__} has no backbone with forward_features; the probe needs one.")
    return unwrap(backbone)


def feature_maps(backbone: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """``[1, X, Y, Z]`` -> the encoder's feature maps ``[C_i, x_i, y_i, z_i]``, float32. An encoder of C > 1
    input channels (pretrained on stacked channels) sees a one-channel probe scan in every channel."""
    channels = int(getattr(backbone, "in_channels", image.shape[0]))
    if image.shape[0] == 1 and channels > 1:
        image = image.expand(channels, *image.shape[1:])
    maps = backbone.forward_features(image[None])
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    return [feature[0].float() for feature in maps]


def _sample_voxels(label: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (into the flattened volume) of up to `per_class` voxels of each class present: class-balanced,
    so that a small organ weighs as much in the fit as the background."""
    flat = label.flatten()
    chosen = []
    for value in flat.unique():
        where = (flat == value).nonzero().flatten()
        chosen.append(where[torch.randperm(len(where), generator=generator)[:per_class]])
    return torch.cat(chosen)


def _features_at(maps: Sequence[torch.Tensor], indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Features ``[N, sum C_i]`` at voxel `indices` of a volume of `size`, each map interpolated trilinearly the
    way `F.interpolate(..., align_corners=False)` upsamples it (so fit and prediction see the same features)."""
    coordinates = torch.stack(torch.unravel_index(indices, tuple(size)), dim=1).float()  # [N, 3] as (x, y, z)
    normalised = (coordinates + 0.5) / torch.tensor(size, dtype=torch.float32) * 2 - 1
    grid = normalised.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample wants (z, y, x) order: last axis first
    sampled = [F.grid_sample(feature[None], grid.to(feature.device), mode="bilinear", padding_mode="border",
                               align_corners=False)
               .view(feature.shape[0], -1).T for feature in maps]
    return torch.cat(sampled, dim=1)


class LinearProbe:
    """A per-voxel linear classifier on standardised multi-scale features, fitted by ridge regression."""

    def __init__(self, num_classes: int, ridge: float = 1e-2, voxels_per_class: int = 512, seed: int = 0) -> None:
        self.num_classes, self.ridge, self.voxels_per_class, self.seed = num_classes, ridge, voxels_per_class, seed
        self.weights: list[torch.Tensor] = []  # per map: [K, C_i], standardisation folded in
        self.bias: torch.Tensor | None = None

    def fit(self, maps_per_volume: Sequence[Sequence[torch.Tensor]], labels: Sequence[torch.Tensor]) -> LinearProbe:
        generator = torch.Generator().manual_seed(self.seed)  # its own: the training's random state is untouched
        features, targets = [], []
        for maps, label in zip(maps_per_volume, labels):
            indices = _sample_voxels(label[0].cpu(), self.voxels_per_class, generator)
            features.append(_features_at(maps, indices.to(maps[0].device), label.shape[1:]).cpu().double())
            targets.append(label[0].flatten()[indices].cpu())
        x, y = torch.cat(features), F.one_hot(torch.cat(targets), self.num_classes).double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # the bias column
        gram = x.T @ x + self.ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        solution = torch.linalg.solve(gram, x.T @ y)  # [F + 1, K]
        scaled = solution[:-1] / std[:, None]
        self.bias = (solution[-1] - mean @ scaled).float()
        widths = [feature.shape[0] for feature in maps_per_volume[0]]
        self.weights = [part.T.float().contiguous() for part in scaled.split(widths)]
        return self

    def predict(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Label map ``[X, Y, Z]``: class scores per map at its own resolution, upsampled and summed."""
        scores = self.bias.to(maps[0].device).view(-1, 1, 1, 1).expand(-1, *size).clone()
        for feature, weight in zip(maps, self.weights):
            coarse = torch.einsum("kc,cxyz->kxyz", weight.to(feature.device), feature)
            scores += F.interpolate(coarse[None], size=tuple(size), mode="trilinear", align_corners=False)[0]
        return scores.argmax(0)


@torch.no_grad()
def probe_dice(backbone: torch.nn.Module, probe_set: ProbeSet, device: torch.device | str = "cpu",
               **probe_options: Any) -> dict[str, float]:
    """Fit the linear probe on the frozen `backbone`'s features and score it: ``{"probe/dice": mean over the
    foreground classes, "probe/dice/<class>": ...}`` (classes absent from every held-out volume are left out)."""
    from monai.metrics import compute_dice

    with eval_mode(backbone):
        fit_maps = [feature_maps(backbone, image.to(device)) for image in probe_set.fit_images]
        probe = LinearProbe(probe_set.num_classes, **probe_options).fit(fit_maps, probe_set.fit_labels)
        del fit_maps
        dice = []
        for image, label in zip(probe_set.test_images, probe_set.test_labels):
            prediction = probe.predict(feature_maps(backbone, image.to(device)), label.shape[1:]).cpu()
            one_hot = [F.one_hot(volume.flatten(), probe_set.num_classes).T.reshape(1, -1, *label.shape[1:])
                       for volume in (prediction, label[0])]
            dice.append(compute_dice(one_hot[0], one_hot[1], include_background=False, ignore_empty=True)[0])
    per_class = torch.stack(dice).nanmean(0)
    results = {f"probe/dice/{name}": float(value)
               for name, value in zip(probe_set.class_names, per_class) if not torch.isnan(value)}
    results["probe/dice"] = float(per_class.nanmean())
    return results


class FrozenProbe:
    """Handler: the probe Dice of the pretext's frozen encoder at step 0 and every `interval` iterations.

    Logged to MLflow as ``probe/dice``, ``probe/dice/<class>`` and, at step 0 of a new run, ``probe/dice_at_init``;
    ``probe/seconds`` and ``probe/time_share`` (of the run's wall time so far) show what it costs. Rank 0 alone
    probes (the unwrapped encoder, no collective call), so torchrun runs need no change; a resumed run goes on at
    the next interval (its step-0 value is already in its MLflow run). The probe set is read once, lazily.
    """

    def __init__(self, interval: int = 500, probe_manifest: str | os.PathLike | None = None,
                 size: Sequence[int] = (64, 64, 64), preset: str | None = None,
                 phantom_dir: str | os.PathLike = "runs/probe_phantoms", **probe_options: Any) -> None:
        self.interval, self.size, self.preset = max(1, int(interval)), [int(s) for s in size], preset
        self.probe_manifest, self.phantom_dir, self.probe_options = probe_manifest, phantom_dir, probe_options
        self.probe_set: ProbeSet | None = None
        self.seconds = 0.0
        self._started_at = time.perf_counter()
        self._unlogged: list[tuple[dict[str, float], int]] = []  # probed before the MLflow run was open (step 0)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        # before the first step of a new run, not at STARTED: a resumed run restores its iteration in a STARTED
        # handler that may come after this one, and its first iteration is then not 1
        engine.add_event_handler(Events.ITERATION_STARTED(once=1), self._at_init)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._log_unlogged)

    def _started(self, engine: Any) -> None:
        self._started_at = time.perf_counter()

    def _at_init(self, engine: Any) -> None:
        self(engine, at_init=True)

    def _log_unlogged(self, engine: Any) -> None:
        from voco.tracking import RunLogger

        if self._unlogged and RunLogger(engine).active:
            for metrics, step in self._unlogged:
                RunLogger(engine).log_metrics(metrics, step=step)
            self._unlogged = []

    def _final(self, engine: Any) -> None:
        if engine.state.iteration % self.interval:
            self(engine)

    def _load(self) -> ProbeSet:
        if self.probe_set is None:
            source = self.probe_manifest or default_probe_manifest(self.phantom_dir)
            self.probe_set = load_probe_set(source, self.size, self.preset)
        return self.probe_set

    def __call__(self, engine: Any, at_init: bool = False) -> dict[str, float]:
        from voco.tracking import RunLogger

        if get_rank() != 0:
            return {}
        step = 0 if at_init else engine.state.iteration
        started = time.perf_counter()
        metrics = probe_dice(encoder_of(engine.network), self._load(), engine.device, **self.probe_options)
        self.seconds += time.perf_counter() - started
        if at_init:
            metrics["probe/dice_at_init"] = metrics["probe/dice"]
        metrics["probe/seconds"] = self.seconds
        metrics["probe/time_share"] = self.seconds / max(time.perf_counter() - self._started_at, 1e-9)
        cost = "untrained encoder" if at_init else f"{metrics['probe/time_share']:.1%} of the run's time so far"
        print(f"probe at step {step}: dice {metrics['probe/dice']:.4f}  ({cost}, "
              f"{time.perf_counter() - started:.1f} s)", flush=True)
        # not into engine.state.metrics: MONAI's MLflow handler would log them again at every iteration
        if RunLogger(engine).active:
            RunLogger(engine).log_metrics(metrics, step=step)
        elif RunLogger(engine).handler is not None:  # the MLflow handler may not have opened the run yet
            self._unlogged.append((metrics, step))
        return metrics
