"""A pretrained ResEnc encoder as nnU-Net's pretrained weights: the file that ``nnUNetv2_train DATASET CONFIG FOLD
-p PLANS -pretrained_weights FILE`` loads (`nnunetv2.run.load_pretrained_weights`).

nnU-Net's loader asserts that every tensor of the network it built from the plan, but the segmentation layers, is in
``saved["network_weights"]`` with the same shape. So the file holds the whole network: the network nnU-Net builds
from the plan's configuration (``get_network_from_plans``, nnU-Net's own initialisation for the decoder) with every
encoder tensor replaced by the pretrained one, matched by name and shape::

    {"network_weights": {"encoder.*": pretrained, "decoder.encoder.*": the same tensors (nnU-Net's decoder holds
                         the encoder), "decoder.stages.*", "decoder.transpconvs.*": nnU-Net's initialisation},
     "voco": {"format": "voco-nnunet-weights", "plans", "configuration", "backbone_spec", "pretraining", ...}}

The segmentation layers are left out (nnU-Net never loads them: their size is the task's label count).

Where the plan's architecture differs from the pretrained encoder's (a plan made for another patch size or spacing has
other stages, strides or kernels), the export stops and names the first difference, or, with ``add_configuration``,
writes a copy of the plans (``<plans name>_voco.json`` beside it) with one more configuration that inherits the given
one (its spacing, normalisation and preprocessed data) but has the pretrained encoder's architecture and the patch
size rounded to the encoder's total stride. Where the plan's preprocessing (patch size, spacing, normalisation)
differs from the pretraining's, `preprocessing_differences` says so, one sentence per difference.

Needs the ``nnunet`` extra (``pip install 'voco[nnunet]'``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from voco.checkpoints.formats import encoder_state_dict, read_checkpoint, resenc_encoder_tensors
from voco.checkpoints.plan import RESENC_BUILD_KEYS  # the architecture settings a ResEnc backbone spec may give
from voco.errors import CheckpointError, ConfigError, optional_import
from voco.files import atomic_write, write_json_atomically
from voco.networks.resenc import RESENC_CLASS, resenc_architecture, total_stride

NNUNET_WEIGHTS_FORMAT = "voco-nnunet-weights"
# The settings that decide the encoder's tensors and what they compute, in the order a difference is reported.
ENCODER_SETTINGS = ("n_stages", "features_per_stage", "n_blocks_per_stage", "kernel_sizes", "strides", "conv_op",
                    "conv_bias", "norm_op", "norm_op_kwargs", "nonlin")
_SEGMENTATION_LAYERS = ".seg_layers."  # what nnU-Net's loader skips


@dataclass
class NnunetExport:
    """What `export_nnunet` wrote: the weights file, the plans and configuration to train with, and the
    preprocessing differences between nnU-Net's plan and the pretraining, one sentence each."""

    path: Path
    encoder_tensors: int
    plans: Path
    configuration: str
    differences: list[str] = field(default_factory=list)

    def train_command(self, fold: int | str = 0) -> str:
        plans = json.loads(self.plans.read_text(encoding="utf-8"))
        return (f"nnUNetv2_train {plans['dataset_name']} {self.configuration} {fold} -p {plans['plans_name']} "
                f"-pretrained_weights {self.path}")


def export_nnunet(source: str | os.PathLike, out: str | os.PathLike, plans: str | os.PathLike,
                  configuration: str = "3d_fullres", add_configuration: str | None = None,
                  facts: Mapping[str, Any] | None = None) -> NnunetExport:
    """Write the ResEnc encoder of `source` as nnU-Net pretrained weights for `configuration` of `plans`.

    Args:
        source: a voco training checkpoint of a ResEnc run (or any checkpoint with ``encoder.stem.*``,
            ``encoder.stages.*`` tensors).
        out: the weights file to write (atomically, its SHA-256 beside it).
        plans: an nnU-Net plans file of a ResEnc planner (``nnUNetResEncUNet{M,L,XL}Plans.json`` in
            ``nnUNet_preprocessed/Dataset<ID>_<Name>``).
        configuration: the plan's configuration to fine-tune (``3d_fullres``).
        add_configuration: where the architectures differ, the name of a configuration to add (e.g.
            ``3d_fullres_voco``) to a copy of the plans, with the encoder's architecture.
        facts: the pretraining run's facts (``pretraining.json``: preset, region size, backbone) for the
            preprocessing comparison; the backbone spec is read from the checkpoint, else from them.

    Raises:
        CheckpointError: no ResEnc encoder in `source`, or a tensor that does not fit the network.
        ConfigError: an unreadable plans file, an unknown configuration, a plan that is not a ResEnc U-Net, a
            different architecture or number of input channels.
    """
    get_network_from_plans = optional_import("nnunetv2.utilities.get_network_from_plans",
                                             "Exporting for nnU-Net").get_network_from_plans
    checkpoint = read_checkpoint(source)
    weights, source_format = encoder_state_dict(checkpoint)
    encoder = resenc_encoder_tensors(weights)
    if not encoder:
        raise CheckpointError(f"{source} holds no ResEnc encoder (encoder.stem.*, encoder.stages.*) [{source_format}]; "
                              "export a run pretrained with --backbone '{\"name\": \"resenc\", \"size\": \"L\"}'.")
    spec = _backbone_spec(checkpoint, facts)
    plans_path = Path(plans).expanduser().resolve()
    plan = _read_plans(plans_path)
    settings = _configuration(plan, configuration, plans_path)
    arch = settings.network_arch_init_kwargs
    ours = pretrained_architecture(spec, arch)
    in_channels = _input_channels(encoder, plans_path)

    difference = first_difference(arch, ours)
    if difference is not None and add_configuration is None:
        setting, theirs, mine = difference
        spec_of_plan = plan_backbone_spec(arch)
        raise ConfigError(
            f"{plans_path.name}'s {configuration} has {setting} {theirs} where the pretrained encoder has {mine}; "
            f"export with --add_configuration {configuration}_voco to add a configuration with the encoder's "
            f"architecture (and {configuration}'s preprocessing) to a copy of the plans"
            + (f", or pretrain with the plan's architecture: --backbone '{json.dumps(spec_of_plan)}'." if spec_of_plan
               else "."))
    if add_configuration is not None:
        plans_path = add_voco_configuration(plan, plans_path, configuration, add_configuration, ours)
        plan = _read_plans(plans_path)
        configuration = add_configuration
        settings = _configuration(plan, configuration, plans_path)

    # nnU-Net's initialisation for what is not pretrained, the same for every export of one plan: a fixed seed,
    # without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = get_network_from_plans(
            settings.network_arch_class_name, settings.network_arch_init_kwargs,
            settings.network_arch_init_kwargs_req_import, in_channels, 2, allow_init=True, deep_supervision=True)
    state = network.state_dict()
    _check_tensors(encoder, state, plans_path, configuration)
    # nnU-Net's decoder holds the encoder too (decoder.encoder.* are the same parameters): both names get the weights
    state.update({prefix + name: tensor for name, tensor in encoder.items() for prefix in ("", "decoder.")
                  if prefix + name in state})
    network.load_state_dict(state)
    network_weights = {name: tensor.detach() for name, tensor in network.state_dict().items()
                       if _SEGMENTATION_LAYERS not in name}
    differences = preprocessing_differences(plan, configuration, facts)
    if spec is None:
        differences.append("the checkpoint records no backbone spec, so the encoder's strides (which no tensor "
                           "shows) were taken to be the plan's.")
    out = Path(out)
    with atomic_write(out, checksum=True) as temporary:
        torch.save({"network_weights": network_weights, "voco": {
            "format": NNUNET_WEIGHTS_FORMAT, "plans": str(plans_path), "plans_name": plan.get("plans_name"),
            "configuration": configuration, "source": str(source), "source_format": source_format,
            "backbone_spec": json.loads(json.dumps(spec)), "pretraining": json.loads(json.dumps(facts, default=str)),
            "preprocessing_differences": differences}}, temporary)
    return NnunetExport(out, len(encoder), plans_path, configuration, differences)


# ------------------------------------------------------------------------------------------------ architectures


def pretrained_architecture(spec: Mapping[str, Any] | None, plan_arch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``arch_kwargs`` of the pretrained encoder, from its backbone spec; without one (a foreign checkpoint), the
    plan's own (the tensor shapes are still checked, strides cannot be)."""
    if not spec:
        return _plain(plan_arch)
    if str(spec.get("name", "resenc")).lower() != "resenc":
        raise ConfigError(f"the checkpoint's backbone is {spec.get('name')!r}; nnU-Net's ResEnc U-Net takes a ResEnc "
                          "encoder, pretrain with --backbone '{\"name\": \"resenc\", \"size\": \"L\"}'.")
    settings = {key: spec[key] for key in RESENC_BUILD_KEYS if key in spec}
    return _plain(resenc_architecture(str(spec.get("size", "L")), **settings))


def first_difference(plan_arch: Mapping[str, Any], ours: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """(setting, the plan's value, the encoder's value) of the first encoder setting that differs, or None."""
    plan_arch = _plain(plan_arch)
    for setting in ENCODER_SETTINGS:
        if plan_arch.get(setting) != ours.get(setting):
            return setting, plan_arch.get(setting), ours.get(setting)
    return None


def plan_backbone_spec(plan_arch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The voco backbone spec whose encoder is the plan's (for pretraining with a plan's architecture); None where
    the plan's strides or kernels differ between axes: they are in nnU-Net's axis order (the slice axis first, for a
    transposed plan), voco's regions in RAS order, so no spec gives the same filters along the same anatomy."""
    plan_arch = _plain(plan_arch)
    if any(len(set(per_axis)) > 1 for key in ("strides", "kernel_sizes") for per_axis in plan_arch[key]):
        return None
    spec: dict[str, Any] = {"name": "resenc", "size": "L", "n_stages": plan_arch["n_stages"]}
    default = resenc_architecture("L", n_stages=plan_arch["n_stages"])
    spec.update({key: plan_arch[key] for key in RESENC_BUILD_KEYS if plan_arch[key] != default[key]})
    return spec


def add_voco_configuration(plan: Mapping[str, Any], plans_path: Path, parent: str, name: str,
                           ours: Mapping[str, Any]) -> Path:
    """Write a copy of the plans (``<plans name>_voco.json`` beside them) with configuration `name`: `parent`'s
    spacing, normalisation and preprocessed data (``inherits_from``), the pretrained encoder's architecture (the
    plan's decoder settings, one per stage), the patch size rounded to the encoder's total stride."""
    if name in plan["configurations"] and plan["configurations"][name].get("inherits_from") != parent:
        raise ConfigError(f"{plans_path.name} already has a configuration {name} that does not inherit {parent}; "
                          "give --add_configuration another name.")
    resolved = _configuration(plan, parent, plans_path)
    strides = total_stride(ours)
    patch = [max(stride, round(size / stride) * stride) for size, stride in zip(resolved.patch_size, strides)]
    arch = {**_plain(resolved.network_arch_init_kwargs), **{key: ours[key] for key in ENCODER_SETTINGS},
            "n_conv_per_stage_decoder": _per_stage(resolved.network_arch_init_kwargs["n_conv_per_stage_decoder"],
                                                   ours["n_stages"] - 1)}
    copy = json.loads(json.dumps(plan))
    plans_name = str(copy.get("plans_name", plans_path.stem))
    copy["plans_name"] = plans_name if plans_name.endswith("_voco") else f"{plans_name}_voco"
    copy["configurations"][name] = {
        "inherits_from": parent, "patch_size": patch,
        "architecture": {"network_class_name": resolved.network_arch_class_name, "arch_kwargs": arch,
                         "_kw_requires_import": list(resolved.network_arch_init_kwargs_req_import)},
        "voco": f"the pretrained encoder's architecture; {parent}'s patch size {list(resolved.patch_size)} rounded to "
                f"its total stride {strides}"}
    return write_json_atomically(copy, plans_path.with_name(f"{copy['plans_name']}.json"))


def _per_stage(values: Any, count: int) -> list:
    values = list(values) or [1]
    return (values + [values[-1]] * count)[:count]


def _plain(value: Any) -> Any:
    """Tuples as lists, as in a plans file read from JSON, so that architectures compare equal."""
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------------- the plan


def _read_plans(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"the plans file {path} cannot be read; give the nnUNet*Plans.json that "
                          "nnUNetv2_plan_and_preprocess wrote into nnUNet_preprocessed/Dataset<ID>_<Name>.") from None
    except ValueError as error:
        raise ConfigError(f"the plans file {path} is not JSON ({error}); plan the dataset again.") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("configurations"), dict):
        raise ConfigError(f"{path} has no 'configurations'; give an nnU-Net plans file (nnUNet*Plans.json).")
    return plan


def _configuration(plan: Mapping[str, Any], name: str, plans_path: Path) -> Any:
    """nnU-Net's `ConfigurationManager` of configuration `name` (inheritance resolved), checked to be a ResEnc U-Net."""
    plans_handler = optional_import("nnunetv2.utilities.plans_handling.plans_handler", "Exporting for nnU-Net")
    if name not in plan["configurations"]:
        raise ConfigError(f"{plans_path.name} has no configuration {name!r}; use one of "
                          f"{', '.join(plan['configurations'])} (3d_fullres for 3-D fine-tuning).")
    settings = plans_handler.PlansManager(dict(plan)).get_configuration(name)
    if settings.network_arch_class_name.split(".")[-1] != RESENC_CLASS.split(".")[-1]:
        raise ConfigError(f"{plans_path.name}'s {name} builds a {settings.network_arch_class_name.split('.')[-1]}, "
                          "not nnU-Net's ResidualEncoderUNet; plan with a ResEnc planner: nnUNetv2_plan_and_preprocess "
                          "-d ID -pl nnUNetPlannerResEncL.")
    return settings


def _input_channels(encoder: Mapping[str, torch.Tensor], plans_path: Path) -> int:
    """The encoder's input channels; the dataset's (its dataset.json beside the plans) must be as many."""
    pretrained = int(encoder["encoder.stem.convs.0.conv.weight"].shape[1]) \
        if "encoder.stem.convs.0.conv.weight" in encoder else 1
    dataset_json = plans_path.with_name("dataset.json")
    if dataset_json.is_file():
        channels = json.loads(dataset_json.read_text(encoding="utf-8")).get("channel_names") or {}
        if channels and len(channels) != pretrained:
            raise ConfigError(f"{dataset_json} names {len(channels)} input channels ({', '.join(channels.values())}) "
                              f"but the encoder was pretrained on {pretrained}; pretrain with --backbone "
                              f"'{{\"name\": \"resenc\", \"in_channels\": {len(channels)}, ...}}' on data of as many "
                              f"channels.")
    return pretrained


def _check_tensors(encoder: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], plans_path: Path,
                   configuration: str) -> None:
    """Every encoder tensor of nnU-Net's network is pretrained, with the same shape, and nothing else is left."""
    wanted = {name for name in state if name.startswith("encoder.")}
    for name in sorted(wanted | set(encoder)):
        if name not in encoder:
            problem = "is missing from the pretrained encoder"
        elif name not in state:
            problem = "is not in nnU-Net's network"
        elif encoder[name].shape != state[name].shape:
            problem = (f"has shape {list(encoder[name].shape)} pretrained, {list(state[name].shape)} in nnU-Net's "
                       "network")
        else:
            continue
        raise CheckpointError(f"encoder tensor {name} {problem} (plans {plans_path.name}, {configuration}); the "
                              "checkpoint's backbone spec does not describe its weights, export the run's own "
                              "checkpoint or give --add_configuration.")


def _backbone_spec(checkpoint: Mapping[str, Any], facts: Mapping[str, Any] | None) -> dict[str, Any] | None:
    spec = checkpoint.get("backbone_spec")
    if not isinstance(spec, Mapping) and facts is not None:
        spec = facts.get("backbone")
    return dict(spec) if isinstance(spec, Mapping) else None


# -------------------------------------------------------------------------------------- preprocessing differences


def preprocessing_differences(plan: Mapping[str, Any], configuration: str,
                              facts: Mapping[str, Any] | None) -> list[str]:
    """One sentence per difference between the plan's preprocessing for `configuration` (patch size, spacing,
    normalisation) and the pretraining's (`facts`: the run's pretraining.json), saying what matters."""
    if not facts:
        return ["no pretraining.json beside the checkpoint (a foreign checkpoint or an older voco run): the plan's "
                "patch size, spacing and normalisation cannot be compared with the pretraining's."]
    settings = optional_import("nnunetv2.utilities.plans_handling.plans_handler", "Exporting for nnU-Net") \
        .PlansManager(dict(plan)).get_configuration(configuration)
    sentences = []
    region = [int(size) for size in facts.get("region_size") or []]
    patch = [int(size) for size in settings.patch_size]
    if region and sorted(region) != sorted(patch):
        sentences.append(f"nnU-Net trains {configuration} on {_by(patch)} patches, the encoder was pretrained on "
                         f"{_by(region)} regions: a CNN's weights fit any input size, so this only changes how much "
                         "context a patch holds.")
    presets, pretrained_spacing, intensity = _pretraining_preprocessing(facts)
    if len(presets) != 1 or intensity is None:
        used = f"the presets {', '.join(presets)}" if presets else "no recorded preset"
        return sentences + [f"the pretraining used {used}, so its spacing and intensities cannot be compared with "
                            "nnU-Net's."]
    spacing = [round(float(value), 2) for value in settings.spacing]
    if pretrained_spacing is None:
        sentences.append(f"nnU-Net resamples to {_by(spacing)} mm (its axis order), the encoder was pretrained on "
                         f"foregrounds resized to the region (preset {presets[0]}, no fixed spacing): structures "
                         "appear at another scale than in pretraining.")
    elif any(abs(a - b) > 0.1 * b for a, b in zip(sorted(spacing), sorted(pretrained_spacing))):
        sentences.append(f"nnU-Net resamples to {_by(spacing)} mm (its axis order), the encoder was pretrained at "
                         f"{_by(pretrained_spacing)} mm (preset {presets[0]}): its filters learned structures at that "
                         "scale and transfer best at a close one (nnUNetv2_plan_and_preprocess takes "
                         "-overwrite_target_spacing and -overwrite_plans_name to plan at the pretraining's).")
    statistics = plan.get("foreground_intensity_properties_per_channel", {})
    for channel, scheme in enumerate(settings.normalization_schemes):
        sentence = _normalisation_sentence(channel, scheme, statistics.get(str(channel), {}), intensity, presets[0])
        if sentence:
            sentences.append(sentence)
    return sentences


def _pretraining_preprocessing(facts: Mapping[str, Any]) -> tuple[list[str], list[float] | None, dict | None]:
    """(presets, spacing or None for resized foregrounds, intensity {"kind": "window" | "zscore", "window"}) of a
    pretraining: its recorded plan (``"plan"`` in pretraining.json), else the one preset it names."""
    recorded = facts.get("plan")
    if isinstance(recorded, Mapping):
        return list(recorded.get("presets") or []), recorded.get("spacing"), recorded.get("intensity")
    if not facts.get("preset"):
        return [], None, None
    from voco.data.presets import get_preset

    preset = get_preset(facts["preset"])
    return [preset.name], None if preset.spacing is None else list(preset.spacing), \
        {"kind": preset.intensity, "window": None if preset.window is None else list(preset.window)}


def _normalisation_sentence(channel: int, scheme: str, statistics: Mapping[str, float], intensity: Mapping[str, Any],
                            preset: str) -> str | None:
    """What differs between nnU-Net's normalisation of a channel and the pretraining's. An InstanceNorm'd CNN is nearly
    invariant to an affine intensity map (the first InstanceNorm removes scale and offset), so only clipping counts."""
    affine = "the scale and offset do not matter to an InstanceNorm'd CNN"
    window = intensity.get("window") if intensity.get("kind") == "window" else None
    pretrained = (f"HU [{window[0]:.0f}, {window[1]:.0f}] mapped to [0, 1]" if window
                  else "per-volume z-scores without clipping")
    if scheme == "CTNormalization" and "percentile_00_5" in statistics:
        low, high = statistics["percentile_00_5"], statistics["percentile_99_5"]
        clipped = f"clips channel {channel} to the dataset's foreground HU [{low:.0f}, {high:.0f}] and z-scores it"
        if window is None:
            return (f"nnU-Net {clipped} (CTNormalization), the encoder was pretrained on {pretrained} (preset "
                    f"{preset}): {affine}, the clipping does.")
        if max(abs(low - window[0]), abs(high - window[1])) <= 0.1 * (window[1] - window[0]):
            return None  # the same window: an affine map apart
        return (f"nnU-Net {clipped} (CTNormalization), the encoder was pretrained on {pretrained} (preset {preset}): "
                f"{affine}, the clipping window does ({_window_change(window, (low, high))}).")
    if scheme == "ZScoreNormalization":
        if window is None:
            return None
        return (f"nnU-Net z-scores channel {channel} per image without clipping (ZScoreNormalization, its choice for "
                f"a channel not named CT), the encoder was pretrained on {pretrained} (preset {preset}): {affine}, the "
                "clipping does; name the channel CT in dataset.json if it is CT.")
    return (f"nnU-Net normalises channel {channel} with {scheme}, the encoder was pretrained on {pretrained} (preset "
            f"{preset}): {affine}, any clipping does.")


def _window_change(pretraining: Any, plan: tuple[float, float]) -> str:
    """Which intensities were one value in pretraining and vary now (or the reverse), at each end of the window."""
    changes = []
    for before, now, end in zip(pretraining, plan, ("low", "high")):
        if abs(before - now) <= 0.05 * (pretraining[1] - pretraining[0]):  # a few HU: nothing a network notices
            continue
        widened = (now > before) == (end == "high")  # the window reaches further out at this end now
        changes.append(f"HU {min(before, now):.0f} to {max(before, now):.0f} "
                       + ("were clipped to one value in pretraining and vary now" if widened
                          else "varied in pretraining and are clipped to one value now"))
    return "; ".join(changes) or "the same window"


def _by(values: Any) -> str:
    return " x ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)
