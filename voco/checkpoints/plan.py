"""The preprocessing plan an encoder was pretrained with, which travels with its weights:

    {"presets": ["ct_abdomen"], "spacing": [1.5, 1.5, 1.5],
     "intensity": {"kind": "window", "window": [-175.0, 250.0], "range": [0.0, 1.0]},
     "region_size": [64, 64, 64], "channels": null,
     "backbone": {"name": "vit", "size": "B", "in_channels": 1, "patch_size": 16, "layout": "window", ...,
                  "input_standardise": [0.5, 0.125]}}

A pretraining run writes it into ``<run>/pretraining.json`` under ``"plan"`` (`voco.engine.prepare_run`), `voco export`
carries it in ``<export>.provenance.json`` (`voco.checkpoints.provenance`), and :func:`read_plan` finds it again from
a run's checkpoint, an exported file or a checkpoint dict (whose ``backbone_spec`` gives the backbone alone). The
backbone is the spec in full: the defaults the spec left out are filled in (:func:`full_backbone_spec`), so
``build_backbone(**plan["backbone"])`` rebuilds the pretrained encoder whatever later versions take as defaults.

:func:`plan_differences` compares a plan with the preprocessing a fine-tuning uses (a plan-shaped dict) and says each
difference in one sentence, e.g. "pretrained on ct_abdomen intensities HU [-175, 250] -> [0, 1], fine-tuning uses HU
[-1000, 500] -> [0, 1] (ct_chest)".
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLAN_KEY = "plan"  # in pretraining.json and in the provenance's "pretraining" facts
# Spec entries that say how the backbone was trained or what else the checkpoint holds, not what the encoder is.
NOT_ARCHITECTURE = ("pretext", "use_checkpoint")
RESENC_BUILD_KEYS = ("n_stages", "features_per_stage", "n_blocks_per_stage", "strides", "kernel_sizes")


# ------------------------------------------------------------------------------------------------- making a plan


def pretraining_plan(facts: Mapping[str, Any], presets: Sequence[str] | None = None) -> dict:
    """The plan of a pretraining run from the facts its bundle records (manifest, dataset_dir, preset, region_size,
    backbone, channels): the presets its regions were made with (the one given, else each scan's own from the
    manifest; or `presets`), the spacing and intensity they imply, the region size and the backbone spec in full."""
    if presets is None:
        presets = [str(facts["preset"])] if facts.get("preset") else manifest_presets(facts["manifest"],
                                                                                     facts.get("dataset_dir"))
    region_size = facts.get("region_size")
    return {"presets": presets, **preset_preprocessing(presets),
            "region_size": None if region_size is None else [int(size) for size in region_size],
            "channels": facts.get("channels"), "backbone": full_backbone_spec(facts.get("backbone") or {})}


def manifest_presets(manifest: str | os.PathLike, dataset_dir: str | os.PathLike | None = None) -> list[str]:
    """The presets the scans of a manifest name (their own, their dataset's or their modality's default)."""
    from voco.data.manifest import load_manifest, to_datalist

    return sorted({str(entry["preset"]) for entry in to_datalist(load_manifest(manifest), dataset_dir=dataset_dir)})


def preset_preprocessing(presets: Sequence[str]) -> dict:
    """``{"spacing", "intensity"}`` of one preset; None for both where there are none or several."""
    from voco.data.presets import get_preset

    if len(presets) != 1:
        return {"spacing": None, "intensity": None}
    preset = get_preset(presets[0])
    intensity: dict[str, Any] = {"kind": preset.intensity}
    if preset.intensity == "window":
        intensity.update(window=[float(value) for value in preset.window], range=[0.0, 1.0])
    return {"spacing": None if preset.spacing is None else [float(value) for value in preset.spacing],
            "intensity": intensity}


def full_backbone_spec(spec: Mapping[str, Any]) -> dict:
    """A backbone spec with the defaults it left out filled in (Swin: its window; ViT: the size's widths, the patch,
    layout, position embedding, ``input_standardise`` ...; ResEnc: the stages of its nnU-Net plan), without what is
    not the encoder (``pretext``, ``use_checkpoint``, a CLIP or MG-3D head's settings)."""
    from voco.networks.vit import ViTEncoder, vit_spec

    given = {key: value for key, value in spec.items()
             if key not in NOT_ARCHITECTURE and not isinstance(value, Mapping)}
    name = str(given.get("name", "swin")).lower()
    size = given.get("size", "B")
    if name == "swin":
        defaults: dict[str, Any] = {"window_size": _swin_window_size()}
    elif name == "vit":
        signature = inspect.signature(ViTEncoder).parameters.values()
        defaults = {parameter.name: parameter.default for parameter in signature
                    if parameter.name not in ("in_channels", "use_checkpoint")}
        defaults.update(vit_spec(size))
        defaults = {key: list(value) if isinstance(value, tuple) else value for key, value in defaults.items()}
    elif name == "resenc":
        from voco.networks.resenc import resenc_architecture

        architecture = resenc_architecture(str(size), **{key: given[key] for key in RESENC_BUILD_KEYS if key in given})
        defaults = {key: architecture[key] for key in RESENC_BUILD_KEYS}
    else:
        defaults = {}
    return {"name": name, "size": size, "in_channels": 1, **defaults, **given}


@functools.lru_cache(maxsize=1)
def _swin_window_size() -> int:
    from monai.networks.nets import SwinUNETR

    return int(inspect.signature(SwinUNETR).parameters["window_size"].default)


# ------------------------------------------------------------------------------------------------ reading a plan


def read_plan(source: str | os.PathLike | Mapping[str, Any] | None) -> dict | None:
    """The plan an encoder was pretrained with, or None where nothing says (scratch, an official checkpoint).

    Looked for, in this order: the provenance beside an exported file, the ``pretraining.json`` of the run folder a
    checkpoint lies in (``<run>/checkpoints/<file>``; runs of an older voco get their plan made from its facts), and
    the ``backbone_spec`` a training checkpoint holds (a plan with the backbone alone).
    """
    from voco.checkpoints.provenance import read_provenance, run_facts

    if source is None or (isinstance(source, str) and source in ("", "scratch")):
        return None
    if isinstance(source, Mapping):
        return _plan_of_checkpoint(source)
    path = Path(source).expanduser()
    provenance = read_provenance(path)
    facts = provenance.get("pretraining") if provenance else None
    if facts is None and path.is_file():
        found = run_facts(path)
        facts = found[0] if found else None
    if isinstance(facts, Mapping):
        return plan_of_facts(facts)
    return _plan_of_file(str(path.resolve()), path.stat().st_mtime_ns) if path.is_file() else None


def plan_of_facts(facts: Mapping[str, Any]) -> dict:
    """The plan in a run's facts, or for facts recorded before plans were, the plan they imply (where the manifest is
    gone, with the presets unknown)."""
    from voco.errors import VocoError

    if isinstance(facts.get(PLAN_KEY), Mapping):
        return dict(facts[PLAN_KEY])
    try:
        return pretraining_plan(facts)
    except (VocoError, OSError, KeyError):  # its manifest is gone: the presets it implied are unknown
        return pretraining_plan(facts, presets=[])


@functools.lru_cache(maxsize=8)
def _plan_of_file(path: str, modified: int) -> dict | None:
    """A checkpoint file's plan, read once while it stays unchanged (the bundle asks several times)."""
    from voco.checkpoints.formats import read_checkpoint

    return _plan_of_checkpoint(read_checkpoint(path))


def _plan_of_checkpoint(checkpoint: Mapping[str, Any]) -> dict | None:
    spec = checkpoint.get("backbone_spec")
    if not isinstance(spec, Mapping):
        return None
    plan = {**_unknown_preprocessing(), "region_size": None, "channels": None, "backbone": full_backbone_spec(spec)}
    if spec.get("pretext"):
        plan["pretext"] = str(spec["pretext"])
    return plan


def _unknown_preprocessing() -> dict:
    return {"presets": [], "spacing": None, "intensity": None}


# -------------------------------------------------------------------------------------------- comparing a plan


def plan_differences(plan: Mapping[str, Any] | None, fine_tuning: Mapping[str, Any], *, source: str = "the encoder"
                     ) -> list[str]:
    """Each difference between the pretraining's preprocessing (`plan`) and the fine-tuning's (a plan-shaped dict:
    ``presets``, ``spacing``, ``intensity``, ``region_size`` as the roi, optionally ``backbone`` with its
    ``input_standardise``), one sentence each; one sentence where `plan` is None or holds no preprocessing."""
    if plan is None:
        return [f"{source} carries no pretraining plan (no provenance or pretraining.json beside it), so its "
                "preprocessing cannot be compared with the fine-tuning's"]
    presets = list(plan.get("presets") or [])
    if not presets:
        return [f"{source} carries its backbone but not its preprocessing (no provenance or pretraining.json beside "
                "it), so that cannot be compared with the fine-tuning's"]
    tuned = list(fine_tuning.get("presets") or [])
    where = f" ({tuned[0]})" if tuned else ""
    label = presets[0] if len(presets) == 1 else f"several presets ({', '.join(presets)})"
    sentences = []
    if len(presets) > 1:
        sentences.append(f"pretrained on {label}, so with no one spacing or intensity window; fine-tuning uses "
                         f"{describe_intensity(fine_tuning.get('intensity'))} at "
                         f"{describe_spacing(fine_tuning.get('spacing'), 'each file')}{where}")
    else:
        if _rounded(plan.get("intensity")) != _rounded(fine_tuning.get("intensity")):
            sentences.append(f"pretrained on {label} intensities {describe_intensity(plan.get('intensity'))}, "
                             f"fine-tuning uses {describe_intensity(fine_tuning.get('intensity'))}{where}")
        if _rounded(plan.get("spacing")) != _rounded(fine_tuning.get("spacing")):
            sentences.append(f"pretrained at {describe_spacing(plan.get('spacing'), 'the region')} ({label}), "
                             f"fine-tuning resamples to {describe_spacing(fine_tuning.get('spacing'), 'each file')}"
                             f"{where}")
    region, roi = plan.get("region_size"), fine_tuning.get("region_size")
    if region and roi and [int(v) for v in region] != [int(v) for v in roi]:
        sentences.append(f"pretrained on regions of {_voxels(region)} voxels, fine-tuning's roi is {_voxels(roi)}")
    pretrained_mapping = (plan.get("backbone") or {}).get("input_standardise")
    tuned_mapping = (fine_tuning.get("backbone") or {}).get("input_standardise", pretrained_mapping)
    if _rounded(pretrained_mapping) != _rounded(tuned_mapping):
        sentences.append(f"pretrained with the encoder's input mapped {describe_standardise(pretrained_mapping)}, "
                         f"fine-tuning maps it {describe_standardise(tuned_mapping)}")
    return sentences


def describe_plan(plan: Mapping[str, Any] | None) -> str:
    """One line: ``ct_abdomen: HU [-175, 250] -> [0, 1] at 1.5 x 1.5 x 1.5 mm, regions 64 x 64 x 64, vit B``."""
    if plan is None:
        return "no pretraining plan"
    presets = ", ".join(plan.get("presets") or []) or "preprocessing unknown"
    parts = [f"{presets}: {describe_intensity(plan.get('intensity'))} at "
             f"{describe_spacing(plan.get('spacing'), 'the region')}"] if plan.get("intensity") else [presets]
    if plan.get("region_size"):
        parts.append(f"regions {_voxels(plan['region_size'])}")
    backbone = plan.get("backbone") or {}
    return ", ".join(parts + [f"{backbone.get('name')} {backbone.get('size')}"])


def describe_intensity(intensity: Mapping[str, Any] | None) -> str:
    if not intensity:
        return "unknown intensities"
    if intensity.get("kind") == "window":
        low, high = intensity["window"]
        out_low, out_high = intensity.get("range", (0.0, 1.0))
        return f"HU [{low:g}, {high:g}] -> [{out_low:g}, {out_high:g}]"
    if intensity.get("kind") == "zscore":
        return "a z-score over the foreground"
    return "the dataset's own intensities"


def describe_spacing(spacing: Sequence[float] | None, resized: str) -> str:
    if spacing is None:
        return f"{resized}'s own spacing" if resized == "each file" else "no fixed spacing (the foreground resized " \
                                                                          "to the region)"
    return " x ".join(f"{value:g}" for value in spacing) + " mm"


def describe_standardise(mapping: Sequence[float] | None) -> str:
    return "as given" if mapping is None else f"to (x - {mapping[0]:g}) / {mapping[1]:g}"


def _voxels(size: Sequence[int]) -> str:
    return " x ".join(str(int(value)) for value in size)


def _rounded(value: Any) -> Any:
    """Comparable values: floats to 6 digits, sequences as lists (JSON gives lists where Python had tuples)."""
    if isinstance(value, Mapping):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return round(float(value), 6) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
