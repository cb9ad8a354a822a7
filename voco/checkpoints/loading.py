"""Load encoder weights into a model by name and shape, and report what happened to every tensor.

Unlike the reference loader (and MONAI's ``copy_model_state``, which counts but does not name what it skips),
:func:`load_encoder_weights` reports every key that was skipped, and why. Like the reference loader, it can also
keep the decoder tensors of a whole SwinUNETR that fit the downstream network (``decoder=``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from voco.checkpoints.formats import (
    _RESENC_KEY,
    _UNUSED_MONAI_KEY,
    StateDict,
    _encoder_owner,
    _is_encoder_key,
    decoder_state_dict,
    encoder_state_dict,
    read_checkpoint,
)
from voco.errors import CheckpointError, ConfigError, require_choice

logger = logging.getLogger(__name__)

# The first convolution, whose kernel's second axis is the input channels.
_INPUT_LAYERS = ("swinViT.patch_embed.proj.weight", "encoder.stem.convs.0.conv.weight",
                 "patch_embedding.patch_embeddings.weight")


@dataclass
class LoadReport:
    """What happened to every tensor when encoder weights were loaded into a model.

    Key names are the model's own names relative to the encoder (e.g. ``swinViT.patch_embed.proj.weight``).

    Attributes:
        loaded: tensors copied (name and shape matched).
        skipped_unexpected: checkpoint tensors with a name the model does not have.
        skipped_shape: ``(name, checkpoint shape, model shape)`` of tensors skipped for their shape.
        missing: model tensors the checkpoint lacks (they keep their initial values), including
            those in ``outside_encoder``.
        outside_encoder: model tensors that are not part of the encoder (a SwinUNETR's decoder and
            output); expected to stay at their initial values and not counted in ``loaded_fraction``.
        encoder_key_count: number of encoder tensors of the model.
        decoder_loaded: decoder tensors of a whole-SwinUNETR checkpoint copied into the model's decoder (name and
            shape matched; only when a decoder was given).
        decoder_skipped: ``(name, why)`` of that checkpoint's other decoder tensors (another shape, not in the
            model, or ``load_decoder`` off).
        adapted_channels: ``(name, checkpoint channels, model channels, rule)`` of input layers whose one-channel
            kernel was spread over the model's input channels (`adapt_input_channels`); they count as loaded.
        source: the file (or ``"<dict>"``) the weights came from; source_format: see
            :func:`encoder_state_dict`.
        plan_differences: how the fine-tuning's preprocessing differs from the pretraining's, one sentence each
            (`voco.checkpoints.plan.plan_differences`; filled by the caller that knows the fine-tuning).
    """

    loaded: list[str] = field(default_factory=list)
    skipped_unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    outside_encoder: list[str] = field(default_factory=list)
    encoder_key_count: int = 0
    decoder_loaded: list[str] = field(default_factory=list)
    decoder_skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = "<dict>"
    source_format: str = ""
    adapted_channels: list[tuple[str, int, int, str]] = field(default_factory=list)
    plan_differences: list[str] = field(default_factory=list)

    @property
    def missing_encoder(self) -> list[str]:
        """Encoder tensors the checkpoint lacks: these count against ``loaded_fraction``."""
        outside = set(self.outside_encoder)
        return [name for name in self.missing if name not in outside]

    @property
    def loaded_fraction(self) -> float:
        """Fraction of the model's encoder tensors that were loaded, in [0, 1]."""
        return len(self.loaded) / self.encoder_key_count if self.encoder_key_count else 0.0

    def summary(self) -> str:
        """One line: how much loaded (encoder, and decoder if any), from what, and how many tensors were skipped or
        missing."""
        line = (
            f"loaded {len(self.loaded)}/{self.encoder_key_count} encoder tensors "
            f"({100 * self.loaded_fraction:.1f}%) from {self.source} [{self.source_format}]; "
            f"skipped {len(self.skipped_unexpected)} not in the model and "
            f"{len(self.skipped_shape)} with another shape; "
            f"{len(self.missing_encoder)} encoder tensors missing"
        )
        if self.outside_encoder:
            line += f", {len(self.outside_encoder)} tensors outside the encoder keep their initial values"
        if self.decoder_loaded or self.decoder_skipped:
            line += f"; decoder: loaded {len(self.decoder_loaded)} tensors, skipped {len(self.decoder_skipped)}"
        for name, before, after, rule in self.adapted_channels:
            line += f"; input channels {before} -> {after} by {rule!r} ({name})"
        return line

    def table(self) -> str:
        """The summary, hints on likely causes, then every skipped and missing key, one per line."""
        lines = [self.summary()]
        lines += [f"hint: {hint}" for hint in self._hints()]
        lines += [f"pretraining plan: {sentence}" for sentence in self.plan_differences]
        if self.skipped_shape:
            lines.append("skipped, shape differs (checkpoint -> model):")
            lines += [f"  {name}  {tuple(ckpt)} -> {tuple(model)}" for name, ckpt, model in self.skipped_shape]
        if self.skipped_unexpected:
            lines.append("skipped, not in the model:")
            lines += [f"  {name}" for name in self.skipped_unexpected]
        if self.missing_encoder:
            lines.append("missing encoder tensors (keep their initial values):")
            lines += [f"  {name}" for name in self.missing_encoder]
        if self.outside_encoder:
            lines.append("outside the encoder (keep their initial values, as expected):")
            lines += [f"  {name}" for name in self.outside_encoder]
        if self.decoder_skipped:
            lines.append("decoder tensors skipped (the model's keep their initial values):")
            lines += [f"  {name}  {why}" for name, why in self.decoder_skipped]
        return "\n".join(lines)

    def _hints(self) -> list[str]:
        """The two classic silent mismatches of the reference (input channels and use_v2) and a ResEnc of other
        stages."""
        hints = []
        for name, ckpt_shape, model_shape in self.skipped_shape:
            if name in _INPUT_LAYERS and ckpt_shape[1] != model_shape[1]:
                hints.append(f"the checkpoint has {ckpt_shape[1]} input channels and the model {model_shape[1]}")
            if name == "swinViT.patch_embed.proj.weight" and ckpt_shape[0] != model_shape[0]:
                hints.append(f"the checkpoint has feature size {ckpt_shape[0]} and the model {model_shape[0]}")
            if name.endswith("position_embeddings"):
                hints.append("the position table has another grid (the input size differs from pretraining); the model "
                             "keeps its own table (for the frozen sin-cos default, the same function of position)")
        if any(re.match(r"swinViT\.layers[1-4]c\.", name) for name in self.missing_encoder):
            hints.append("the checkpoint has no v2 residual blocks (layers*c): it was trained with use_v2=False")
        if any(re.match(r"swinViT\.layers[1-4]c\.", name) for name in self.skipped_unexpected):
            hints.append("the checkpoint has v2 residual blocks (layers*c): build the model with use_v2=True")
        other_stages = [shape[0] for shape in self.skipped_shape] + self.skipped_unexpected + self.missing_encoder
        if any(_RESENC_KEY.match(name) for name in other_stages):
            hints.append("the checkpoint's ResEnc has other stages (n_stages, features_per_stage, n_blocks_per_stage, "
                         "strides): build the network with the backbone spec of its pretraining plan")
        return hints


def load_encoder_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    min_loaded_fraction: float = 0.5,
    prefix: str = "",
    decoder: nn.Module | None = None,
    load_decoder: bool | None = None,
    channel_adaptation: str = "mean",
) -> LoadReport:
    """Copy encoder weights into ``model`` by name and shape, and report every tensor that did not fit.

    Works for an encoder alone (``SwinEncoder``: keys ``swinViT.*``, ``encoder*``; ``ResEncEncoder``:
    ``encoder.stem.*``, ``encoder.stages.*``; ``ViTEncoder``), a whole MONAI ``SwinUNETR`` or nnU-Net
    ``ResidualEncoderUNet`` (its decoder is reported as outside the encoder) and a module that holds the
    encoder under a prefix (a pretext: ``backbone.``; found by itself when ``prefix`` is empty). The
    checkpoint may be our training checkpoint (``{"pretext": {"backbone.encoder.stem...": ...}}``), an export or
    any format :func:`encoder_state_dict` recognises.
    With ``decoder``, the decoder tensors of a whole-SwinUNETR checkpoint (:func:`decoder_state_dict`) that fit it
    by name and shape are copied too, as the reference loader does.

    Args:
        model: the module to load into; only tensors whose name and shape match are changed.
        source: a checkpoint path or an already loaded checkpoint dict, in any format that
            :func:`encoder_state_dict` recognises.
        min_loaded_fraction: refuse the checkpoint (and leave the model untouched) when less than
            this fraction of the model's encoder tensors would load.
        prefix: where the encoder lies inside ``model``, e.g. ``"backbone."``.
        decoder: a module whose state-dict names are a SwinUNETR's ``decoder1..5.*`` and ``out.*`` (see
            `voco.benchmark.networks.decoder_of`), or None (the encoder alone).
        load_decoder: with ``decoder``: None (default) copies its fitting tensors when the checkpoint has any;
            True also refuses a checkpoint with none that fit; False copies none (they are reported as skipped).
        channel_adaptation: how a one-channel checkpoint's input layer serves a model of several input channels
            (`CHANNEL_RULES`: "mean" by default; "none" skips that layer), named in the report.

    Returns:
        The :class:`LoadReport`; its summary is also logged (at WARNING when anything was skipped).

    Raises:
        CheckpointError: the source cannot be read, too little of it fits the model, or ``load_decoder`` is True
            and no decoder tensor of it fits ``decoder``.
        ConfigError: ``prefix`` names no tensor of the model; ``load_decoder`` is True without a ``decoder``.
    """
    if load_decoder and decoder is None:
        raise ConfigError("load_decoder=True needs the module to load the decoder into; pass decoder=, "
                          "or leave load_decoder at None.")
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<dict>"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    weights, source_format = encoder_state_dict(checkpoint)

    model_state = model.state_dict()
    if prefix and not any(key.startswith(prefix) for key in model_state):
        raise ConfigError(
            f"The prefix '{prefix}' matches no tensor of the {type(model).__name__}; pass '' or the name "
            "of the submodule that holds the encoder followed by a dot."
        )
    if not prefix:  # find the encoder: a SwinUNETR encoder anywhere, else a pretext's backbone
        owner = _encoder_owner(list(model_state))
        has_backbone = any(key.startswith("backbone.") for key in model_state)
        prefix = owner if owner is not None else ("backbone." if has_backbone else "")
    targets = {key[len(prefix) :]: value for key, value in model_state.items() if key.startswith(prefix)}
    # a SwinUNETR encoder, else nnU-Net's ResEnc encoder (a whole U-Net's decoder, which holds the encoder a second
    # time as decoder.encoder.*, is outside it)
    encoder_targets = ({name for name in targets if _is_encoder_key(name, "")}
                       or {name for name in targets if _RESENC_KEY.match(name)})
    if not encoder_targets:  # neither a SwinUNETR nor a ResEnc encoder: every tensor under the prefix is the encoder
        encoder_targets = {name for name in targets if not _UNUSED_MONAI_KEY.match(name)}

    report = LoadReport(
        outside_encoder=[name for name in targets if name not in encoder_targets],
        encoder_key_count=len(encoder_targets),
        source=label,
        source_format=source_format,
    )
    encoder_tensors = {name: targets[name] for name in encoder_targets}
    weights, report.adapted_channels = adapt_input_channels(weights, encoder_tensors, channel_adaptation)
    report.loaded, report.skipped_unexpected, report.skipped_shape = _fitting(weights, encoder_tensors)
    report.missing = [name for name in targets if name not in weights]
    decoder_weights = decoder_state_dict(checkpoint) if decoder is not None else {}
    if load_decoder is False:
        report.decoder_skipped = [(name, "load_decoder is off") for name in decoder_weights]
    elif decoder_weights:
        report.decoder_loaded, unexpected, other_shape = _fitting(decoder_weights, decoder.state_dict())
        report.decoder_skipped = [(name, "not in the model") for name in unexpected] + [
            (name, f"shape {ckpt} in the checkpoint, {own} in the model") for name, ckpt, own in other_shape]

    if report.loaded_fraction < min_loaded_fraction:
        raise CheckpointError(
            f"Refused to load {label} because too little of it fits the model ({report.summary()}); "
            "check that it was trained for this backbone (feature_size, in_channels, use_v2) "
            "or lower min_loaded_fraction."
        )
    if load_decoder and not report.decoder_loaded:
        found = (f"none of its {len(decoder_weights)} decoder tensors fits the network's decoder" if decoder_weights
                 else "it holds no decoder (an encoder alone)")
        raise CheckpointError(
            f"Refused to load {label}: load_decoder is on, but {found}; pass a whole-SwinUNETR checkpoint "
            "(e.g. VoComni) of this feature size, or leave load_decoder at None."
        )
    to_load = [weights[name] for name in report.loaded] + [decoder_weights[name] for name in report.decoder_loaded]
    non_finite = [name for name, tensor in zip(report.loaded + report.decoder_loaded, to_load)
                  if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())]
    if non_finite:
        raise CheckpointError(
            f"Refused to load {label}: {len(non_finite)} tensors hold NaN or infinite values (e.g. "
            f"{', '.join(non_finite[:3])}); the run that wrote it diverged, so take an earlier checkpoint of it."
        )
    # strict=False: the missing and skipped tensors are named in the report instead.
    model.load_state_dict({prefix + name: weights[name] for name in report.loaded}, strict=False)
    if report.decoder_loaded:
        decoder.load_state_dict({name: decoder_weights[name] for name in report.decoder_loaded}, strict=False)
    clean = not (report.skipped_unexpected or report.skipped_shape or report.missing_encoder)
    logger.log(logging.INFO if clean else logging.WARNING, "encoder weights: %s", report.summary())
    logger.debug("%s", report.table())
    return report


# How a one-channel input kernel becomes a kernel of C channels (fine-tuning a CT encoder on multi-sequence MRI):
#   mean:   the kernel on every channel, divided by C: the layer answers the channels' mean as it answered the one
#           channel it was trained on (identical channels give exactly the pretrained response);
#   repeat: the kernel on every channel: it answers their sum (C times the response to identical channels);
#   first:  the kernel on channel 0, zeros elsewhere: the other channels start unheard and are learnt.
CHANNEL_RULES = ("mean", "repeat", "first", "none")


def adapt_input_channels(weights: StateDict, targets: Mapping[str, torch.Tensor], rule: str = "mean"
                         ) -> tuple[StateDict, list[tuple[str, int, int, str]]]:
    """`weights` with every one-input-channel convolution kernel whose model tensor takes C > 1 channels (the
    input layer: same output channels and kernel size) spread over the C channels by `rule` (`CHANNEL_RULES`;
    "none" changes nothing, so the tensor is skipped for its shape). Returns (weights, what was adapted)."""
    require_choice("channel adaptation rule", rule, CHANNEL_RULES)
    adapted, changed = dict(weights), []
    for name, tensor in weights.items():
        target = targets.get(name)
        if (rule == "none" or target is None or tensor.ndim < 3 or tensor.shape[1] != 1 or target.shape[1] <= 1
                or tensor.shape[0] != target.shape[0] or tensor.shape[2:] != target.shape[2:]):
            continue
        channels = target.shape[1]
        if rule == "first":
            spread = torch.zeros_like(tensor).repeat(1, channels, *([1] * (tensor.ndim - 2)))
            spread[:, :1] = tensor
        else:
            spread = tensor.repeat(1, channels, *([1] * (tensor.ndim - 2)))
            spread = spread / channels if rule == "mean" else spread
        adapted[name] = spread
        changed.append((name, 1, channels, rule))
    return adapted, changed


def _fitting(weights: StateDict, targets: Mapping[str, torch.Tensor]
             ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Which ``weights`` fit ``targets``: the names that match in name and shape, the names ``targets`` lacks, and
    ``(name, checkpoint shape, model shape)`` of the rest."""
    fit, unexpected, other_shape = [], [], []
    for name, tensor in weights.items():
        if name not in targets:
            unexpected.append(name)
        elif tensor.shape != targets[name].shape:
            other_shape.append((name, tuple(tensor.shape), tuple(targets[name].shape)))
        else:
            fit.append(name)
    return fit, unexpected, other_shape
