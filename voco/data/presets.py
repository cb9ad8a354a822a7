"""Named preprocessing presets: the deterministic part of the region pipeline, as MONAI dictionary transforms.

Each preset turns a file into a channel-first float32 volume in RAS orientation at a fixed spacing with
intensities scaled to about [0, 1] (CT) or z-scored (MRI), cropped to the body and padded to at least the region
size. Everything a preset does is deterministic, so its output is what the region pipeline caches.
This module is only the registry (cheap to import); `voco.data.regions.preset_transforms` builds the transforms.

    preset        spacing (mm)        intensity                    cached as   reference group (specs/voco.md §1)
    ct_abdomen    1.5 x 1.5 x 1.5     HU [-175, 250] -> [0, 1]     uint16      V2 abdomen
    ct_chest      1.25 x 1.25 x 5     HU [-1000, 500] -> [0, 1]    uint16      V2 chest
    ct_resize     none: whole         HU [-175, 250] -> [0, 1]     uint16      V2 head/neck and others (V1 for all)
                  foreground resized
                  to the region size
    mr_zscore     1.5 x 1.5 x 1.5     z-score over the foreground  float16     (no HU window for MRI)
    ct_rate       none: whole         HU [-1000, 200] -> [0, 1]    uint16      CT-RATE rows of the downstream benchmark
                  foreground resized                                           (the reference's window; voco's [0, 1])
                  to the region size

"cached as" is the compact dtype of the disk and memory caches (`cache_dtype="auto"`, see
`voco.data.compact.CompactIntensityd` for the error bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from voco.errors import require_choice


@dataclass(frozen=True)
class Preset:
    """What one preset does. `spacing=None` means the foreground is resized to the region size instead."""

    name: str
    description: str
    spacing: tuple[float, float, float] | None
    intensity: str  # "window": clip a HU window to [0, 1]; "zscore": normalise over the foreground
    window: tuple[float, float] | None = None
    foreground_threshold: float = 0.0  # after intensity scaling (window) or on raw values (zscore)

    @property
    def cache_dtype(self) -> str:
        """The compact dtype its output is cached in: windowed intensities lie in [0, 1] by construction (uint16
        steps of 1/65535); z-scores are unbounded (float16)."""
        return "uint16" if self.intensity == "window" else "float16"


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("ct_abdomen", "CT abdomen: 1.5 mm isotropic, HU [-175, 250] to [0, 1]", (1.5, 1.5, 1.5), "window",
               (-175.0, 250.0)),
        Preset("ct_chest", "CT chest: 1.25 x 1.25 x 5 mm, HU [-1000, 500] to [0, 1]", (1.25, 1.25, 5.0), "window",
               (-1000.0, 500.0)),
        Preset("ct_resize", "CT head/neck and others: HU [-175, 250] to [0, 1], foreground resized to the region",
               None, "window", (-175.0, 250.0)),
        Preset("mr_zscore", "MRI: 1.5 mm isotropic, z-score over the foreground, no HU window", (1.5, 1.5, 1.5),
               "zscore"),
        # The CT-CLIP rows of the VoCo benchmark window HU [-1000, 200] and resize the volume to the network's input;
        # the reference scales to [-1, 1], voco to [0, 1] like every preset (what voco encoders are pretrained on).
        Preset("ct_rate", "CT-RATE chest: HU [-1000, 200] to [0, 1], foreground resized to the region", None,
               "window", (-1000.0, 200.0)),
    )
}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    require_choice("preset", name, PRESETS)
    return PRESETS[name]
