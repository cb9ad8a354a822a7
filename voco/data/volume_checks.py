"""The checks a volume must pass, on its file (`check_volume`, `inspect_volume`: the header, then optionally all
voxels, as sentences) and on a volume already loaded (`assert_valid_volume`: the region pipeline calls it right
after loading, and raises `VolumeError`). One set of checks serves both. A volume is good when it

- is 3-D: ``[X, Y, Z]``, or with one channel / time point (``[X, Y, Z, 1]`` in a file, ``[1, X, Y, Z]`` loaded),
  or with the channels asked for when scans are stacked (`voco.data.channels`);
- is not empty (no zero-size axis);
- has a positive, finite spacing on every axis and an orientation matrix that places every axis;
- has no NaN or infinite voxel;
- holds no more voxels than `max_voxels` (2^30 unless ``VOCO_MAX_VOXELS`` says otherwise), in the file and after
  resampling to the preset's spacing: a header that claims 1100³ voxels is refused before anything is allocated.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from voco.data.volumes import VolumeHeader, load_voxels, one_line, read_header
from voco.errors import VocoError, VolumeError


DEFAULT_MAX_VOXELS = 2 ** 30  # 1024³: a whole-body CT at 0.5 mm holds about a quarter of it


def max_voxels() -> int:
    """The most voxels a volume may hold, in its file or resampled: ``$VOCO_MAX_VOXELS`` or `DEFAULT_MAX_VOXELS`."""
    value = os.environ.get("VOCO_MAX_VOXELS", "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise VolumeError(f"VOCO_MAX_VOXELS={value!r} is not a positive number of voxels; set it to e.g. "
                          f"{DEFAULT_MAX_VOXELS} or unset it.")
    return limit


def size_problems(source: str, shape: Sequence[int], spacing: Sequence[float] | None = None,
                  target_spacing: Sequence[float] | None = None) -> list[str]:
    """A volume too large to read: its header claims more than `max_voxels` voxels, or it would hold more after
    resampling from `spacing` to `target_spacing` (mm). Checked on the header, before any voxel is allocated."""
    limit, count = max_voxels(), math.prod(int(size) for size in shape)
    what = "raise VOCO_MAX_VOXELS if the volume is real, else remove it"
    if count > limit:
        return [f"{source} claims {_shape_text(shape)} voxels ({count:.3g}), more than the {limit:.3g} voco reads "
                f"(VOCO_MAX_VOXELS); {what}."]
    if spacing is not None and target_spacing is not None and len(spacing) >= 3:
        resampled = math.prod(math.ceil(int(size) * float(step) / float(target))
                              for size, step, target in zip(shape[:3], spacing, target_spacing))
        if resampled > limit:
            return [f"{source} would hold {resampled:.3g} voxels once resampled from "
                    f"{', '.join(f'{step:g}' for step in spacing)} mm to "
                    f"{', '.join(f'{target:g}' for target in target_spacing)} mm, more than the {limit:.3g} voco reads "
                    f"(VOCO_MAX_VOXELS); check its spacing, or {what}."]
    return []


def _shape_text(shape: Sequence[int]) -> str:
    return " × ".join(str(int(size)) for size in shape) if len(shape) else "()"


def geometry_problems(source: str, spatial_shape: Sequence[int], channel_shape: Sequence[int],
                      spacing: Sequence[float] | None, shape: Sequence[int] | None = None) -> list[str]:
    """Problems of a volume's layout: not 3-D, several channels / time points, empty, bad spacing.

    Args:
        source: the file (or name) the sentences start with.
        spatial_shape: the spatial axes (3 for a volume; fewer for a 2-D image).
        channel_shape: the non-spatial axes (channels, time points, vector components); all 1 is fine.
        spacing: voxel size per spatial axis in mm; None when unknown (not checked).
        shape: the full shape as the messages show it; spatial then channel axes when not given.
    """
    spatial_shape = [int(size) for size in spatial_shape]
    channel_shape = [int(size) for size in channel_shape]
    full_shape = _shape_text(spatial_shape + channel_shape if shape is None else shape)
    problems = []
    if len(spatial_shape) < 3:
        problems.append(f"{source} is a {len(spatial_shape)}-D image (shape {full_shape}), not a 3-D volume; "
                        f"give a 3-D volume or remove it.")
    channels = math.prod(channel_shape)
    if channels > 1:
        problems.append(f"{source} has {channels} channels or time points (shape {full_shape}); voco reads "
                        f"one-channel 3-D volumes, so split it into one file per channel or time point.")
    if any(size < 0 for size in spatial_shape + channel_shape):
        problems.append(f"{source} claims a negative size (shape {full_shape}); fix its header or remove it.")
    elif 0 in spatial_shape or 0 in channel_shape:
        problems.append(f"{source} is empty (shape {full_shape}); export it again or remove it.")
    if spacing is not None:
        values = [float(size) for size in spacing]
        if any(not math.isfinite(size) or size <= 0 for size in values):
            problems.append(f"{source} has the spacing {', '.join(f'{size:g}' for size in values)} mm, which is not "
                            f"positive and finite on every axis; fix its header (pixdim / spacing) or remove it.")
    return problems


def voxel_problems(source: str, array: Any) -> list[str]:
    """NaN and infinite voxels of a numpy array or torch tensor (on any device; counted there, not copied)."""
    if hasattr(array, "is_floating_point"):  # torch.Tensor, MetaTensor
        if not array.is_floating_point():
            return []
        not_a_number, infinite = int(array.isnan().sum().item()), int(array.isinf().sum().item())
    else:
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            return []  # integer voxels are always finite
        not_a_number, infinite = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if not_a_number or infinite:
        return [f"{source} has {not_a_number} NaN and {infinite} infinite voxels; replace them (e.g. with the "
                f"background value) or remove the volume."]
    return []


def _array_layout(array: Any) -> tuple[list[int], list[int]]:
    """(spatial shape, channel shape) of a loaded, channel-first array.

    A MONAI MetaTensor knows its reader's spatial shape, which tells a channel-first 2-D image [1, X, Y] from a
    3-D volume [X, Y, Z].
    """
    shape = [int(size) for size in array.shape]
    meta = getattr(array, "meta", None)
    spatial_ndim = None
    if isinstance(meta, dict) and meta.get("spatial_shape") is not None:
        spatial_ndim = len(np.atleast_1d(np.asarray(meta["spatial_shape"])))
    if spatial_ndim is None:
        spatial_ndim = min(3, len(shape))
    spatial_ndim = min(spatial_ndim, len(shape))
    return shape[len(shape) - spatial_ndim:], shape[: len(shape) - spatial_ndim]


def assert_valid_volume(array: Any, spacing: Sequence[float] | None, source: str, channels: int = 1) -> None:
    """Raise VolumeError when a loaded volume is not one voco can use (the checks of `check_volume`).

    Args:
        array: numpy array or torch tensor, ``[X, Y, Z]`` or channel-first ``[C, X, Y, Z]`` with C == `channels`.
        spacing: voxel size per spatial axis in mm, or None when unknown.
        source: the file the volume came from, named in the message.
        channels: the channels expected (more than 1 for scans stacked by `voco.data.channels`).
    """
    spatial_shape, channel_shape = _array_layout(array)
    if channels > 1 and math.prod(channel_shape) == channels:
        channel_shape = []  # the stacked channels asked for
    problems = geometry_problems(source, spatial_shape, channel_shape, spacing, shape=tuple(array.shape))
    if not problems:  # counting NaNs of a malformed array would only repeat the first problem
        problems = voxel_problems(source, array)
    if problems:
        raise VolumeError(problems[0])


def header_problems(header: VolumeHeader, read_voxels: bool = False,
                    target_spacing: Sequence[float] | None = None) -> list[str]:
    """The problems of a volume whose header was read; with `read_voxels`, its voxels are read and checked too
    (never those of a volume too large to read, `size_problems`, also once resampled to `target_spacing`)."""
    problems = geometry_problems(header.path, header.spatial_shape, header.channel_shape, header.spacing)
    if not problems and "?" in header.orientation:
        problems.append(f"{header.path} has an orientation matrix (NIfTI sform/qform, or the image direction) that "
                        f"is not finite or leaves an axis without a direction, so its anatomy cannot be placed; fix "
                        f"its header or remove it.")
    problems = problems or size_problems(header.path, header.shape, header.spacing, target_spacing)
    if read_voxels and not problems:
        try:
            voxels = load_voxels(header)
        except VocoError:
            raise
        except Exception as error:  # truncated gzip streams, short files, corrupt DICOM pixel data
            return [f"{header.path} is truncated or corrupt ({one_line(error)}); download or export it again "
                    f"or remove it."]
        problems = voxel_problems(header.path, voxels)
    return problems


def inspect_volume(path: str | os.PathLike, read_voxels: bool = True,
                   series: str | None = None) -> tuple[VolumeHeader | None, list[str]]:
    """(header, problems) of a volume file; the header is None when it could not be read at all."""
    try:
        header = read_header(path, series=series)
    except VolumeError as error:
        return None, [str(error)]
    return header, header_problems(header, read_voxels=read_voxels)


def check_volume(path: str | os.PathLike, read_voxels: bool = True, series: str | None = None) -> list[str]:
    """The problems of one volume file, each a sentence naming the file and what to do; empty when it is good.

    Checks: the file exists, has a supported format and a readable header, is 3-D with one channel, is not empty,
    has a positive finite spacing; with `read_voxels`, also that every voxel can be read (catches truncated
    .nii.gz files) and none is NaN or infinite.
    """
    return inspect_volume(path, read_voxels=read_voxels, series=series)[1]
