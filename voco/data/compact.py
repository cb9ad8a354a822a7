"""How the caches store a preprocessed volume: compact dtypes and optional compression, read back to float32.

Windowed CT as uint16 steps of 1/65535 (error at most 7.6e-6 of the [0, 1] range), z-scored MRI as float16
(relative error at most 2^-11), optionally zlib-compressed, or, asked for, windowed CT as uint8 (lossy, a quarter of
float32). The random-region step crops the compact volume and only then converts the region to float32
(`ExpandIntensityd`). benchmarks/README.md has the measured footprint and read cost.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch
from monai import transforms as mt
from monai.data import MetaTensor

from voco.data.presets import Preset, get_preset
from voco.errors import ConfigError

# auto: the preset's compact dtype (`Preset.cache_dtype`); uint8: windowed presets only, lossy (see CompactIntensityd)
CACHE_DTYPES = ("auto", "float32", "uint8")
CACHE_COMPRESSIONS = ("none", "zlib")
# A [0, 1] intensity x is stored as round(x * steps) in an unsigned integer.
UNIT_STEPS = {"uint16": 65535, "uint8": 255}
FLOAT16_MAX = 65504.0


class CompactIntensityd(mt.MapTransform):
    """Store float32 intensities compactly (the last step before a cache); `ExpandIntensityd` reads them back.

    Every dtype gives a tensor that owns just its voxels: the preset's output can be a view into the whole volume
    before the foreground crop, and torch.save (and a memory cache) would keep that whole storage.

    - ``dtype="float32"``: the values unchanged (the reference's cache).
    - ``dtype="uint16"`` for intensities in [0, 1] (windowed CT): ``round(x * 65535)``, computed in float64. What
      comes back differs from x by at most 0.5 / 65535 = 7.6e-6 (0.003 HU of a 425 HU window; a bf16 input
      already rounds by up to 2e-3) plus float32 rounding (2^-25). Values outside [0, 1] are clipped.
    - ``dtype="float16"`` for anything else (z-scored MRI): relative error at most 2^-11 (half a float16 step;
      below 2^-14 the absolute error is at most 2^-25); values beyond +-65504 are clipped.
    - ``dtype="uint8"`` (only when asked for, [0, 1] intensities): ``round(x * 255)``, an error of up to
      0.5 / 255 = 2e-3 (0.8 HU of a 425 HU window, 2.9 HU of a 1500 HU one): as coarse as bf16's own rounding
      of values in [0.5, 1), so it is a visible change for float32 training. A quarter of float32, no codec.
    - ``compress=True`` also zlib-compresses the values (level 1: the fastest) into a uint8 tensor, with the
      shape under ``"<key>_shape"``; `UnpackCompactd` undoes it.

    Ours: MONAI's CastToTyped truncates (an error of up to a whole step) and nothing in MONAI compresses.
    """

    def __init__(self, keys: Sequence[str], dtype: str, compress: bool = False) -> None:
        super().__init__(keys)
        if dtype not in ("uint16", "uint8", "float16", "float32"):
            raise ConfigError(f"cache dtype {dtype!r}; use uint16 or uint8 (intensities in [0, 1]), float16 or "
                              f"float32.")
        self.dtype, self.compress = dtype, compress

    def __call__(self, data: Mapping) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            image = torch.as_tensor(data[key])
            if self.dtype in UNIT_STEPS:
                steps = UNIT_STEPS[self.dtype]
                compact = torch.round(image.double().clamp(0.0, 1.0) * steps).to(getattr(torch, self.dtype))
            elif self.dtype == "float16":
                compact = image.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).half()
            else:
                compact = image.float().clone()
            if self.compress:
                packed = zlib.compress(compact.contiguous().numpy().tobytes(), 1)
                data[f"{key}_shape"] = torch.tensor(compact.shape)
                compact = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            data[key] = compact
        return data


class UnpackCompactd(mt.MapTransform, mt.RandomizableTrait):
    """Decompress what `CompactIntensityd(compress=True)` stored -> the compact tensor (uint16 or float16).

    It is not random: the trait only marks where MONAI's caches stop, so that they hold the compressed bytes and
    every read unpacks them (the caches store everything before the first random transform)."""

    def __init__(self, keys: Sequence[str], dtype: str) -> None:
        super().__init__(keys)
        self.dtype = getattr(torch, dtype)

    def __call__(self, data: Mapping) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            shape = [int(size) for size in data.pop(f"{key}_shape")]
            values = bytearray(zlib.decompress(torch.as_tensor(data[key]).numpy()))
            data[key] = torch.frombuffer(values, dtype=self.dtype).view(shape)
        return data


class ExpandIntensityd(mt.MapTransform):
    """Compact intensities (`CompactIntensityd`) back to float32: uint16 (uint8) steps of 1/65535 (1/255) ->
    [0, 1], float16 -> float32; float32 passes through. Placed after the random region: only the region is
    converted."""

    def __call__(self, data: Mapping) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            if image.dtype == torch.float32:
                continue
            # On the plain tensor (MONAI's metadata handling doubles the cost), in one pass: an integer tensor
            # divided by an int is float32, correctly rounded (error at most 2^-25).
            values = image.as_tensor() if isinstance(image, MetaTensor) else image
            steps = UNIT_STEPS.get(str(image.dtype).removeprefix("torch."))
            values = values / steps if steps is not None else values.to(torch.float32)
            data[key] = MetaTensor(values, meta=image.meta) if isinstance(image, MetaTensor) else values
        return data


def stored_dtype(preset: str | Preset, cache_dtype: str = "auto") -> str:
    """The dtype a cache holds for `preset`: its compact one (`Preset.cache_dtype`) for "auto", else the one asked."""
    if cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"cache_dtype={cache_dtype!r}; use one of {', '.join(CACHE_DTYPES)}.")
    preset = get_preset(preset)
    if cache_dtype == "uint8" and preset.intensity != "window":
        raise ConfigError(f"cache_dtype='uint8' needs intensities in [0, 1], but preset {preset.name} z-scores them; "
                          f"use cache_dtype='auto' (float16) for it.")
    return preset.cache_dtype if cache_dtype == "auto" else cache_dtype


def compact_transforms(dtype: str, compression: str = "none", keys: Sequence[str] = ("image",)
                       ) -> list[mt.Transform]:
    """What turns the preset's float32 output into what a cache stores (`CompactIntensityd`)."""
    if compression not in CACHE_COMPRESSIONS:
        raise ConfigError(f"cache_compression={compression!r}; use one of {', '.join(CACHE_COMPRESSIONS)}.")
    if dtype == "float32" and compression != "none":
        raise ConfigError("cache_compression applies to the compact cache only; use cache_dtype='auto' with it.")
    return [CompactIntensityd(keys=list(keys), dtype=dtype, compress=compression == "zlib")]
