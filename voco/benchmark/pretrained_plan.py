"""The pretraining plan of an encoder (`voco.checkpoints.plan`) as the defaults of its fine-tuning.

The downstream bundle and `voco benchmark run` build the network the encoder was pretrained as (backbone, size, ViT
layout and ``input_standardise``, ResEnc stages ...) and preprocess the task with the pretraining's preset where the
task allows it; a setting given explicitly wins over the plan, and the plan over the bundle's defaults. What then
still differs between the pretraining's preprocessing and the fine-tuning's is said in one sentence each:

    plan = read_plan("runs/voco/encoder.pt")                     # from its provenance, run folder or checkpoint
    network = network_settings(plan, size="tiny")               # {"backbone": "swin", "size": "tiny", ...}
    preset = task_preset("btcv", plan)                           # "ct_abdomen", or "task": the task's own
    task = planned_task("btcv", preset)
    preprocessing_differences(plan, task, preset, network)      # ["pretrained on regions of 64 x 64 x 64 ..."]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from voco.benchmark.own_data import resolve_task
from voco.benchmark.registry import Task
from voco.checkpoints.plan import plan_differences, preset_preprocessing

# What the bundle builds where neither a setting nor a plan says (the size: DEFAULT_SIZES of the backbone).
DEFAULT_NETWORK = {"backbone": "swin", "size": None, "window_size": 7, "vit_layout": "global", "vit_window_size": 3,
                   "vit_position_embedding": "sincos"}
DEFAULT_SIZES = {"swin": "B", "vit": "B", "resenc": "L"}
# The bundle's name of a backbone spec entry, per backbone; the spec's other entries go to `backbone_options`.
SPEC_SETTINGS = {"swin": {"size": "size", "window_size": "window_size"},
                 "vit": {"size": "size", "layout": "vit_layout", "window_size": "vit_window_size",
                         "position_embedding": "vit_position_embedding"},
                 "resenc": {"size": "size"}}
# Spec entries the task decides (its channels, its roi), not the pretraining.
TASK_DECIDES = ("name", "in_channels", "input_size")
TASK_OWN_PREPROCESSING = "task"  # a `preset` that keeps the task's own spacing and intensities


def network_settings(plan: Mapping[str, Any] | None, *, backbone: str | None = None, size: str | int | None = None,
                     default_size: str | int | None = None, backbone_options: Mapping[str, Any] | None = None,
                     **settings: Any) -> dict:
    """The bundle's network settings (``backbone``, ``size``, ``window_size``, ``vit_layout``, ``vit_window_size``,
    ``vit_position_embedding``, ``backbone_options``): each as given where it is not None, else the pretrained
    backbone's (when it is the backbone and size asked for), else `DEFAULT_NETWORK`'s (the size: `default_size`, else
    the backbone's in `DEFAULT_SIZES`).

    Raises:
        ConfigError: a setting that is not one of the bundle's network settings.
    """
    from voco.errors import ConfigError

    unknown = sorted(set(settings) - set(DEFAULT_NETWORK))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} is not a network setting; use {', '.join(DEFAULT_NETWORK)}.")
    spec = dict((plan or {}).get("backbone") or {})
    name = str(backbone or spec.get("name") or DEFAULT_NETWORK["backbone"]).lower()
    # another backbone, or another size of it, is another encoder: it takes nothing of the pretrained one
    same = str(spec.get("name", "")).lower() == name and (
        size is None or str(size).lower() == str(spec.get("size")).lower())
    pretrained = spec if same else {}
    renamed = SPEC_SETTINGS.get(name, {"size": "size"})
    from_plan = {renamed[key]: value for key, value in pretrained.items() if key in renamed}
    defaults = {**DEFAULT_NETWORK, "size": default_size if default_size is not None else DEFAULT_SIZES.get(name, "B")}
    given = {**settings, "size": size}
    chosen = {key: next(value for value in (given.get(key), from_plan.get(key), default) if value is not None)
              for key, default in defaults.items() if key != "backbone"}
    options = {key: value for key, value in pretrained.items() if key not in renamed and key not in TASK_DECIDES}
    return {"backbone": name, **chosen, "backbone_options": {**options, **dict(backbone_options or {})}}


def task_preset(task: str | os.PathLike, plan: Mapping[str, Any] | None, preset: str | None = None) -> str:
    """The preset the task is preprocessed with: `preset` where given; else the pretraining's, where it is one
    preset with a spacing whose intensity kind (HU window or z-score) is the task's own; else
    ``"task"`` (the task's own preprocessing)."""
    if preset is not None:
        return str(preset)
    presets = list((plan or {}).get("presets") or [])
    if len(presets) != 1:
        return TASK_OWN_PREPROCESSING
    pretrained = preset_preprocessing(presets)
    own = resolve_task(task).intensity
    fits = (pretrained["spacing"] is not None and own is not None
            and own.kind == (pretrained["intensity"] or {}).get("kind"))
    return presets[0] if fits else TASK_OWN_PREPROCESSING


def planned_task(task: str | os.PathLike, preset: str | None, *, spacing: Sequence[float] | None = None,
                 roi_size: Sequence[int] | None = None) -> Task:
    """The task preprocessed with `preset` (from `task_preset`; ``"task"`` or None: its own), `spacing` and
    `roi_size` (`voco.benchmark.own_data.resolve_task`)."""
    chosen = None if preset in (None, TASK_OWN_PREPROCESSING) else preset
    return resolve_task(task, preset=chosen, spacing=spacing, roi_size=roi_size)


def preprocessing_differences(plan: Mapping[str, Any] | None, task: Task, preset: str | None,
                              network: Mapping[str, Any], pretrained: Any = None) -> list[str]:
    """Each difference between the pretraining's preprocessing and the fine-tuning's, one sentence each
    (`voco.checkpoints.plan.plan_differences`); none for a network trained from scratch."""
    from voco.benchmark.cells import encoder_name

    if encoder_name(pretrained) == "scratch":
        return []
    named = task.provenance.get("preset") if preset in (None, TASK_OWN_PREPROCESSING) else preset
    intensity = task.intensity
    if intensity is None or intensity.kind not in ("window", "zscore"):
        described = None if intensity is None else {"kind": intensity.kind}
    elif intensity.kind == "window":
        described = {"kind": "window", "window": [intensity.a_min, intensity.a_max],
                     "range": [intensity.b_min, intensity.b_max]}
    else:
        described = {"kind": "zscore"}
    fine_tuning = {"presets": [named] if named else [], "spacing": task.spacing, "intensity": described,
                   "region_size": task.roi_size, "backbone": dict(network.get("backbone_options") or {})}
    return plan_differences(plan, fine_tuning, source=encoder_name(pretrained))
