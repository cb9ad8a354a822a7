"""Per-task MONAI pipelines, built from a registry `Task` (its roi, spacing, intensity and keys).

The segmentation pipeline follows the MONAI SwinUNETR BTCV recipe that the VoCo downstream code uses::

    LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd (bilinear / nearest)
    -> ScaleIntensityRanged (CT window) or NormalizeIntensityd (MRI z-score) -> CropForegroundd -> SpatialPadd(roi)
    train: RandCropByLabelClassesd(roi, every class equally; or RandCropByPosNegLabeld pos 1, neg 1 as the
           recipe has it) -> RandFlipd x3, RandRotate90d, RandScale/ShiftIntensityd
    validation: the whole volume (the evaluator runs sliding-window inference over it)

Classification fits the whole volume to the roi (resize, or centre crop/pad) and turns the class into the tensor
the loss takes. Registration loads moving and fixed images (and their labels when the datalist has them) on one
grid of roi size and concatenates the images into the 2-channel network input.

    transform = task_transforms(task, train=True)
    items = transform({"image": "ct.nii.gz", "label": "ct_seg.nii.gz"})  # a list of num_samples crops
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt

from voco.benchmark.registry import Intensity, Task, registration_keys
from voco.data.regions import CheckVolumed
from voco.data.volume_checks import assert_valid_volume
from voco.errors import ConfigError, ManifestError

__all__ = ["CLASSIFICATION_FITS", "CROP_SAMPLINGS", "ClassLabeld", "inference_transforms", "registration_keys", "task_transforms"]

CLASSIFICATION_FITS = ("resize", "crop")
# "classes": crops centred on each class present equally often (a kidney as often as the liver); "pos_neg": half on
# foreground, half on background, as the BTCV recipe. With a few labelled cases, "pos_neg" centres most crops on
# the liver and the body wall, and the small organs are still at Dice ~0 after 300 steps (issue 14's measurements).
CROP_SAMPLINGS = ("classes", "pos_neg")
INTENSITY_KINDS = ("window", "zscore", "none")
# Augmentation probabilities of the MONAI SwinUNETR BTCV recipe.
FLIP_PROBABILITY = 0.1
ROTATE90_PROBABILITY = 0.1
INTENSITY_PROBABILITY = 0.1
# Orientationd's axis labels given explicitly, so MONAI does not warn about its default labels changing.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def task_transforms(task: Task, *, train: bool, num_samples: int = 2, classification_fit: str = "resize",
                    crop_sampling: str = "classes") -> mt.Compose:
    """The MONAI pipeline of one task, for training (random crops and augmentations) or validation.

    Args:
        task: the registry entry; its ``roi_size``, ``spacing``, ``intensity``, ``image_key`` and ``label_key``
            are used.
        train: training pipeline (segmentation: ``num_samples`` random roi crops per volume, centred as
            ``crop_sampling`` says, then augmentations) or validation (the whole volume).
        num_samples: crops per volume in training segmentation; the pipeline then returns a list of items.
        crop_sampling: where training segmentation crops are centred, one of `CROP_SAMPLINGS`.
        classification_fit: how a classification volume is fitted to the roi: ``"resize"`` (trilinear, the whole
            volume is seen) or ``"crop"`` (centre crop / pad at the native resolution).

    Returns:
        A ``Compose`` taking a datalist entry (paths) to tensors:

        - segmentation: ``image [C, X, Y, Z]`` float, ``label [1, X, Y, Z]`` (class indices, as float); training
          items are exactly ``roi_size``, validation volumes at least ``roi_size`` and keep their metadata (the
          evaluator may invert or save predictions).
        - classification: ``image [C, *roi]`` and ``label`` float ``[1]`` (one sigmoid output) or a long scalar.
        - registration: ``image [2, *roi]`` (moving, fixed), the two images alone under the
          :func:`registration_keys` and the labels where given.

    Raises:
        ConfigError: a task type without a fine-tuning pipeline, no roi_size, an unknown intensity kind or fit.
    """
    if task.roi_size is None:  # registry entries marked runnable=False may lack it
        raise ConfigError(f"task {task.id!r} has no roi_size in the registry; complete its entry or pick a "
                          "runnable task.")
    if task.task_type == "segmentation":
        steps = _segmentation_steps(task, train, num_samples, crop_sampling)
    elif task.task_type == "classification":
        steps = _classification_steps(task, train, classification_fit)
    elif task.task_type == "registration":
        steps = _registration_steps(task, train)
    else:
        raise ConfigError(f"task {task.id!r} is a {task.task_type} task, which has no fine-tuning pipeline; "
                          f"pick a segmentation, classification or registration task.")
    return mt.Compose(steps)


def inference_transforms(task: Task) -> mt.Compose:
    """Unlabelled volumes for prediction: read, orient, resample, scale, crop to the body and pad to the roi.

    Every step is invertible, so MONAI's `Invertd` maps a prediction back onto the file's own grid.
    """
    if task.roi_size is None:
        raise ConfigError(f"task {task.id!r} has no roi_size in the registry; complete its entry first.")
    image = task.image_key
    return mt.Compose(_read_steps(task, [image], []) + _intensity_and_foreground_steps(task, [image], [image])
                      + [mt.SpatialPadd(keys=[image], spatial_size=task.roi_size)])


# --------------------------------------------------------------------------------------------------- task types


def _segmentation_steps(task: Task, train: bool, num_samples: int, crop_sampling: str) -> list[mt.Transform]:
    if crop_sampling not in CROP_SAMPLINGS:
        raise ConfigError(f"crop_sampling={crop_sampling!r}; use one of {', '.join(CROP_SAMPLINGS)}.")
    image, label = task.image_key, task.label_key
    keys = [image, label]
    steps = (_read_steps(task, [image], [label]) + _label_remap_steps(task, label)
             + _intensity_and_foreground_steps(task, [image], keys))
    steps.append(mt.SpatialPadd(keys=keys, spatial_size=task.roi_size))
    if not train:
        return steps
    if crop_sampling == "classes":
        steps.append(mt.RandCropByLabelClassesd(
            keys=keys, label_key=label, spatial_size=task.roi_size, num_classes=task.out_channels,
            num_samples=num_samples, image_key=image, image_threshold=_background_level(task), warn=False))
    else:
        steps.append(mt.RandCropByPosNegLabeld(
            keys=keys, label_key=label, spatial_size=task.roi_size, pos=1, neg=1, num_samples=num_samples,
            image_key=image, image_threshold=_background_level(task)))
    steps += _augmentation_steps(keys, [image], task.roi_size)
    steps.append(mt.EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return steps


def _classification_steps(task: Task, train: bool, fit: str) -> list[mt.Transform]:
    if fit not in CLASSIFICATION_FITS:
        raise ConfigError(f"classification_fit={fit!r}; use one of {', '.join(CLASSIFICATION_FITS)}.")
    image = task.image_key
    steps = _read_steps(task, [image], []) + _intensity_and_foreground_steps(task, [image], [image])
    if fit == "resize":
        steps.append(mt.Resized(keys=image, spatial_size=task.roi_size, mode="trilinear"))
    else:
        steps.append(mt.ResizeWithPadOrCropd(keys=image, spatial_size=task.roi_size))
    if train:
        steps += _augmentation_steps([image], [image], task.roi_size)
    steps += [ClassLabeld(keys=task.label_key, num_outputs=task.out_channels),
              mt.EnsureTyped(keys=image, dtype=torch.float32, track_meta=False)]
    return steps


def _registration_steps(task: Task, train: bool) -> list[mt.Transform]:
    moving_image, fixed_image, moving_label, fixed_label = registration_keys(task)
    images, labels = [moving_image, fixed_image], [moving_label, fixed_label]
    keys = images + labels
    # Labels are optional (unsupervised registration); moving and fixed share one grid: no foreground crop,
    # which would cut each image differently, but a centred crop/pad to the roi.
    steps = _read_steps(task, images, labels, optional_labels=True)
    steps += _intensity_steps(task.intensity, images)
    steps.append(mt.ResizeWithPadOrCropd(keys=keys, spatial_size=task.roi_size, allow_missing_keys=True))
    if train:  # one flip of the whole pair (RandFlipd draws once per call for all keys)
        steps += [mt.RandFlipd(keys=keys, prob=FLIP_PROBABILITY, spatial_axis=axis, allow_missing_keys=True)
                  for axis in range(3)]
    steps.append(mt.ConcatItemsd(keys=images, name=task.image_key, dim=0))
    if train:
        steps.append(mt.EnsureTyped(keys=[task.image_key, *keys], dtype=torch.float32, track_meta=False,
                                    allow_missing_keys=True))
    return steps


# ------------------------------------------------------------------------------------------------ shared steps


def _read_steps(task: Task, image_keys: list[str], label_keys: list[str], optional_labels: bool = False
                ) -> list[mt.Transform]:
    """Read, channel first, check, orient to RAS and resample (bilinear images, nearest labels)."""
    keys = image_keys + label_keys
    steps: list[mt.Transform] = [
        mt.LoadImaged(keys=keys, allow_missing_keys=optional_labels),
        mt.EnsureChannelFirstd(keys=keys, allow_missing_keys=optional_labels),
    ]
    if task.task_type == "registration" or task.in_channels == 1:  # the check is for single-channel volumes
        steps.append(CheckVolumed(keys=image_keys, check=assert_valid_volume))
    steps.append(mt.Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=optional_labels))
    if task.spacing is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
        steps.append(mt.Spacingd(keys=keys, pixdim=task.spacing, mode=modes, allow_missing_keys=optional_labels))
    return steps


def _zero_above(label: torch.Tensor, highest: int) -> torch.Tensor:
    return torch.where(label > highest, torch.zeros_like(label), label)


def _binarize(label: torch.Tensor) -> torch.Tensor:
    return (label > 0).to(label.dtype)


def _label_remap_steps(task: Task, label_key: str) -> list[mt.Transform]:
    """The reference's own label conversions (registry provenance "label_remap"): a value mapping (MM-WHS codes,
    BraTS 1/2/4), "zero_above" N (PANORAMA), or "binarize" (LNDb nodules)."""
    remap = task.provenance.get("label_remap")
    if not remap:
        return []
    if remap.get("mapping"):
        raw = [int(value) for value in remap["mapping"]]
        return [mt.MapLabelValued(keys=label_key, orig_labels=raw, target_labels=[remap["mapping"][str(value)]
                                                                                 for value in raw])]
    if remap.get("zero_above") is not None:  # functools.partial, not a lambda: DataLoader workers pickle it
        return [mt.Lambdad(keys=label_key, func=functools.partial(_zero_above, highest=int(remap["zero_above"])))]
    if remap.get("binarize"):
        return [mt.Lambdad(keys=label_key, func=_binarize)]
    raise ConfigError(f"task {task.id!r} has a label_remap without a mapping, zero_above or binarize rule; "
                      f"complete its registry entry.")


def _intensity_steps(intensity: Intensity | None, image_keys: list[str]) -> list[mt.Transform]:
    if intensity is None or intensity.kind == "none":  # the dataset's own preprocessing scaled the volumes
        return []
    if intensity.kind == "window":
        if intensity.a_min is None or intensity.a_max is None:
            raise ConfigError("a 'window' intensity needs a_min and a_max (the HU window); set both in the task.")
        return [mt.ScaleIntensityRanged(keys=image_keys, a_min=intensity.a_min, a_max=intensity.a_max,
                                        b_min=intensity.b_min, b_max=intensity.b_max, clip=intensity.clip)]
    if intensity.kind == "zscore":
        return [mt.NormalizeIntensityd(keys=image_keys, nonzero=intensity.nonzero,
                                       channel_wise=intensity.channel_wise)]
    raise ConfigError(f"intensity kind {intensity.kind!r} is unknown; use one of {', '.join(INTENSITY_KINDS)}.")


def _intensity_and_foreground_steps(task: Task, image_keys: list[str], keys: list[str]) -> list[mt.Transform]:
    """Scale intensities and crop to the body; MRI is cropped before its z-score (background stays 0)."""
    # "background < x", picklable for DataLoader workers (a lambda is not).
    foreground = mt.CropForegroundd(keys=keys, source_key=image_keys[0], allow_smaller=True,
                                    select_fn=functools.partial(operator.lt, _background_level(task)))
    intensity = _intensity_steps(task.intensity, image_keys)
    zscore = task.intensity is not None and task.intensity.kind == "zscore"
    return [foreground, *intensity] if zscore else [*intensity, foreground]


def _background_level(task: Task) -> float:
    """The intensity of air / background after scaling: the window's lower bound, else 0."""
    window = task.intensity is not None and task.intensity.kind == "window"
    return float(task.intensity.b_min) if window else 0.0


def _augmentation_steps(keys: list[str], image_keys: list[str], roi_size: Sequence[int]) -> list[mt.Transform]:
    steps: list[mt.Transform] = [mt.RandFlipd(keys=keys, prob=FLIP_PROBABILITY, spatial_axis=axis)
                                 for axis in range(3)]
    if roi_size[0] == roi_size[1]:  # a quarter turn in the (x, y) plane keeps the crop's shape only when square
        steps.append(mt.RandRotate90d(keys=keys, prob=ROTATE90_PROBABILITY, max_k=3))
    steps += [mt.RandScaleIntensityd(keys=image_keys, factors=0.1, prob=INTENSITY_PROBABILITY),
              mt.RandShiftIntensityd(keys=image_keys, offsets=0.1, prob=INTENSITY_PROBABILITY)]
    return steps


class ClassLabeld(mt.MapTransform):
    """A datalist entry's class as the tensor its loss takes: float ``[1]`` for one sigmoid output, else a long scalar.

    Written here because MONAI's EnsureTyped keeps a Python number 0-dimensional, which a one-output
    BCEWithLogitsLoss cannot pair with logits ``[N, 1]``, and checks nothing.

    Args:
        keys: the label key(s).
        num_outputs: the network's outputs: 1 (binary, labels 0 / 1) or the number of classes (labels 0 .. n-1).
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, num_outputs: int) -> None:
        super().__init__(keys)
        self.num_outputs = num_outputs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        data = dict(data)
        classes = 2 if self.num_outputs == 1 else self.num_outputs
        for key in self.key_iterator(data):
            value = torch.as_tensor(data[key]).reshape(-1)
            is_index = value.numel() == 1 and float(value) == int(value) and 0 <= int(value) < classes
            if not is_index:
                raise ManifestError(f"classification label {data[key]!r} under {key!r} is not a class index in "
                                    f"0..{classes - 1}; fix that datalist entry.")
            data[key] = value.float() if self.num_outputs == 1 else value.long().reshape(())
        return data
