"""Read checkpoints safely, find the encoder weights in them, load them with a report, export them.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint downloaded from the internet
can never run code here. The encoder is the SwinUNETR-v2 encoder whose state-dict keys are those of
the released ``VoCo_{B,L,H}_SSL_head.pt`` (145 tensors for feature size 48)::

    swinViT.*                          patch embedding, 4 Swin stages, 4 v2 residual blocks
    encoder1|2|3|4|10.*                SwinUNETR residual blocks on the input and hidden states

Formats recognised by :func:`encoder_state_dict` (they may be nested and combined):

- our training checkpoint ``{"pretext": {"backbone.…"}, "optimizer": …, "backbone_spec": …}``
- a raw state dict, the official SSL head, a whole SwinUNETR (``VoComni_*.pt``; its decoder is found by
  :func:`decoder_state_dict` and loaded on request)
- reference training checkpoints ``{"global_step", "state_dict"}`` with ``module.`` (DDP) and
  ``backbone.`` / ``student.`` / ``teacher.`` prefixes (the student is taken)
- containers under ``state_dict`` / ``network_weights`` / ``net`` / ``student`` / ``model``
- MONAI's ``model_swinvit.pt`` (``module.patch_embed…``, ``module.layers1.0…``, ``mlp.fc1``; SSL heads
  dropped) and the ``swin_vit`` spelling of ``swinViT``.

Unlike the reference loader (and MONAI's ``copy_model_state``, which counts but does not name what it
skips), :func:`load_encoder_weights` reports every key that was skipped, and why. Like the reference loader, it
can also keep the decoder tensors of a whole SwinUNETR that fit the downstream network (``decoder=``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voco.errors import CheckpointError, ConfigError, optional_import
from voco.files import atomic_write

__all__ = [
    "LoadReport",
    "decoder_state_dict",
    "encoder_state_dict",
    "export_encoder",
    "find_latest_checkpoint",
    "load_encoder_weights",
    "ranked_checkpoints",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

# A key of the SwinUNETR encoder, possibly under an owner prefix ("backbone.", "student.backbone.", ...):
# the owner is the shortest run of path components before the first encoder component.
_ENCODER_KEY = re.compile(r"^(?P<owner>(?:[^.]+\.)*?)(?P<name>(?:swinViT|encoder(?:1|2|3|4|10))\..+)$")
_DECODER_COMPONENT = re.compile(r"^(?:decoder\d+|out)\.")
# A key of our ViT encoder (MONAI ViT names; position_encoder is the optional Fourier position MLP).
_VIT_KEY = re.compile(r"^(?:patch_embedding\.|blocks\.\d+\.|norm\.|position_encoder\.)")
# MONAI's ViT blocks hold a LayerNorm for cross-attention that UNETR never uses: not part of an encoder to fill.
_UNUSED_MONAI_KEY = re.compile(r"^blocks\.\d+\.norm_cross_attn\.")
# MONAI model_swinvit.pt stores the Swin transformer without the "swinViT." owner.
_SWINVIT_ONLY_KEY = re.compile(r"^(?:patch_embed|layers[1-4])\.")
# Containers that the reference loader and common trainers put a state dict under, in search order.
_CONTAINER_KEYS = ("state_dict", "network_weights", "net", "student", "model")
# Wrappers that add a leading component to every key: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
# Iteration (or epoch) number in ignite/MONAI file names: "checkpoint_iteration=200.pt", "net_200.pt".
_STEP_IN_NAME = re.compile(r"(?:iteration|epoch)=(\d+)|_(\d+)\.[A-Za-z]+$")

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU, never unpickling arbitrary objects.

    ``.safetensors`` files are read with the ``safetensors`` package when it is installed; anything
    else with ``torch.load(map_location="cpu", weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, needs arbitrary unpickling
            (e.g. a whole pickled model or an ``argparse.Namespace``), or does not hold a dict.
        MissingDependencyError: a ``.safetensors`` file is given and ``safetensors`` is not installed.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"Checkpoint {path} {what}; pass the path of a .pt/.pth checkpoint file.")
    if path.suffix == ".safetensors":
        safetensors_torch = optional_import("safetensors.torch", "Reading .safetensors checkpoints")
        try:
            content: Any = safetensors_torch.load_file(str(path), device="cpu")
        except Exception as error:  # the package raises its own error types for every kind of damage
            raise CheckpointError(
                f"Checkpoint {path} is not a readable safetensors file ({_first_line(error)}); "
                "download or copy it again."
            ) from error
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only load failed" not in str(error).lower():
                raise _corrupt_checkpoint_error(path, error) from error
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
            found = f" (it contains {unsafe.group(1)})" if unsafe else ""
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects that voco refuses to load{found}; "
                "in a trusted environment re-save only the weights with "
                "torch.save(model.state_dict(), path) and load that file instead."
            ) from error
        except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
            # torch reports truncation and garbage as any of these, depending on where the bytes end.
            raise _corrupt_checkpoint_error(path, error) from error
    if not isinstance(content, Mapping):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(content).__name__}, not a dict of weights; "
            "save it with torch.save(model.state_dict(), path)."
        )
    return dict(content)


def _corrupt_checkpoint_error(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path} is truncated or not a PyTorch checkpoint ({_first_line(error)}); "
        "download or copy it again."
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].split('. ')[0].rstrip('.')}" if lines else type(error).__name__


# ----------------------------------------------------------------------------- finding the encoder


def encoder_state_dict(checkpoint: Mapping[str, Any]) -> tuple[StateDict, str]:
    """Find the encoder weights in a checkpoint of any supported format (see the module docstring).

    Args:
        checkpoint: the dict returned by :func:`read_checkpoint` (or ``torch.load``).

    Returns:
        ``(state_dict, source_format)``: the encoder tensors under the official SSL-head names
        (``swinViT.*``, ``encoder1|2|3|4|10.*``) — or, for a backbone that is not a SwinUNETR
        encoder, the backbone tensors under their own names — and a description of the format
        that was recognised, e.g. ``"reference training checkpoint ['state_dict']: SwinUNETR
        encoder under 'backbone.', DDP 'module.' prefix stripped, 4 other tensors dropped"``.

    Raises:
        CheckpointError: the checkpoint holds no tensors at all.
    """
    tensors, container_name, notes = _model_tensors(checkpoint)
    owner = _encoder_owner(tensors)
    decoder: StateDict = {}
    if owner is not None:
        encoder = {key[len(owner) :]: value for key, value in tensors.items() if _is_encoder_key(key, owner)}
        decoder = _decoder_of_owner(tensors, owner)
        layout = f"whole SwinUNETR (encoder and {len(decoder)} decoder tensors)" if decoder else "SwinUNETR encoder"
        if owner:
            layout += f" under '{owner}'"
    elif any(_SWINVIT_ONLY_KEY.match(key) for key in tensors):
        encoder = {"swinViT." + key: value for key, value in tensors.items() if _SWINVIT_ONLY_KEY.match(key)}
        layout = "MONAI model_swinvit SSL weights (mapped to 'swinViT.', SSL heads dropped)"
    else:
        # Not a SwinUNETR encoder (e.g. a ViT backbone): take the backbone of a pretext, else everything.
        backbone = {key[len("backbone.") :]: v for key, v in tensors.items() if key.startswith("backbone.")}
        encoder = backbone or tensors
        layout = "state dict without SwinUNETR encoder keys" + (" (backbone.* taken)" if backbone else "")
    encoder = {_rename_swin_mlp(key): value for key, value in encoder.items()}

    dropped = len(tensors) - len(encoder) - len(decoder)  # a decoder is not dropped: see decoder_state_dict
    if dropped:
        notes.append(f"{dropped} other tensors dropped")
    return encoder, f"{container_name}: " + ", ".join([layout, *notes])


def decoder_state_dict(checkpoint: Mapping[str, Any]) -> StateDict:
    """The decoder and output tensors (``decoder1..5.*``, ``out.*``) of a whole-SwinUNETR checkpoint (``VoComni_*``,
    a fine-tuned model), under MONAI's SwinUNETR names; ``{}`` for a checkpoint that holds an encoder alone.

    The checkpoint is unwrapped as in :func:`encoder_state_dict`, and the decoder is the one beside its encoder.
    """
    tensors, _, _ = _model_tensors(checkpoint)
    owner = _encoder_owner(tensors)
    return {} if owner is None else _decoder_of_owner(tensors, owner)


def _decoder_of_owner(tensors: StateDict, owner: str) -> StateDict:
    return {key[len(owner) :]: value for key, value in tensors.items()
            if key.startswith(owner) and _DECODER_COMPONENT.match(key[len(owner) :])}


def _model_tensors(checkpoint: Mapping[str, Any]) -> tuple[StateDict, str, list[str]]:
    """The tensors of a checkpoint with wrappers stripped and ``swin_vit`` renamed, the name of its container
    format, and notes on what was changed."""
    container, container_name = _unwrap_container(checkpoint)
    tensors = {key: value for key, value in container.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"The {container_name} holds no tensors; pass a checkpoint that contains model weights."
        )
    notes: list[str] = []
    if any(key.startswith(_WRAPPER_PREFIXES) for key in tensors):
        notes.append("DDP 'module.' prefix stripped")
    tensors = {_strip_wrappers(key): value for key, value in tensors.items()}
    if any("swin_vit." in key for key in tensors):
        notes.append("'swin_vit' renamed to 'swinViT'")
        tensors = {key.replace("swin_vit.", "swinViT."): value for key, value in tensors.items()}
    return tensors, container_name, notes


def _unwrap_container(checkpoint: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """Descend into the nested dict that holds the weights; return it and a name for the format."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"A checkpoint must be a dict of weights, not a {type(checkpoint).__name__}; "
            "pass the path of a checkpoint file or a state dict."
        )
    if isinstance(checkpoint.get("pretext"), Mapping):
        return checkpoint["pretext"], "voco training checkpoint"
    path: list[str] = []
    current = checkpoint
    while not any(isinstance(value, torch.Tensor) for value in current.values()):
        inner = next((key for key in _CONTAINER_KEYS if isinstance(current.get(key), Mapping)), None)
        if inner is None:
            break
        path.append(inner)
        current = current[inner]
    if "global_step" in checkpoint and path:
        return current, f"reference training checkpoint {path}"
    return current, f"container {path}" if path else "state dict"


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _rename_swin_mlp(key: str) -> str:
    """The Swin MLP is ``mlp.fc1/fc2`` in the original implementation, ``mlp.linear1/linear2`` in MONAI."""
    if key.startswith("swinViT."):
        return key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return key


def _is_encoder_key(key: str, owner: str) -> bool:
    match = _ENCODER_KEY.match(key)
    return match is not None and match["owner"] == owner


def _encoder_owner(keys: Mapping[str, Any] | list[str]) -> str | None:
    """The prefix under which the SwinUNETR encoder lies ("" for the official layout), or None.

    Where several owners hold an encoder (V1's student and teacher networks, a pretext with a
    teacher copy), a teacher is taken only if nothing else is there; then the owner with most keys,
    then the shortest.
    """
    counts: dict[str, int] = {}
    for key in keys:
        match = _ENCODER_KEY.match(key)
        if match:
            counts[match["owner"]] = counts.get(match["owner"], 0) + 1
    if not counts:
        return None
    not_teacher = [owner for owner in counts if "teacher" not in owner]
    candidates = not_teacher or list(counts)
    return min(candidates, key=lambda owner: (-counts[owner], len(owner)))


# ------------------------------------------------------------------------------------------ loading


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
        source: the file (or ``"<dict>"``) the weights came from; source_format: see
            :func:`encoder_state_dict`.
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
        return line

    def table(self) -> str:
        """The summary, hints on likely causes, then every skipped and missing key, one per line."""
        lines = [self.summary()]
        lines += [f"hint: {hint}" for hint in self._hints()]
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
        """The two classic silent mismatches of the reference: input channels and use_v2."""
        hints = []
        for name, ckpt_shape, model_shape in self.skipped_shape:
            if name == "swinViT.patch_embed.proj.weight" and ckpt_shape[1] != model_shape[1]:
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
        return hints


def load_encoder_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    min_loaded_fraction: float = 0.5,
    prefix: str = "",
    decoder: nn.Module | None = None,
    load_decoder: bool | None = None,
) -> LoadReport:
    """Copy encoder weights into ``model`` by name and shape, and report every tensor that did not fit.

    Works for an encoder alone (``SwinEncoder``: keys ``swinViT.*``, ``encoder*``), a whole MONAI
    ``SwinUNETR`` (its decoder is reported as outside the encoder) and a module that holds the
    encoder under a prefix (a pretext: ``backbone.``; found by itself when ``prefix`` is empty).
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
    encoder_targets = {name for name in targets if _is_encoder_key(name, "")}
    if not encoder_targets:  # not a SwinUNETR encoder: every tensor under the prefix is the encoder
        encoder_targets = {name for name in targets if not _UNUSED_MONAI_KEY.match(name)}

    report = LoadReport(
        outside_encoder=[name for name in targets if name not in encoder_targets],
        encoder_key_count=len(encoder_targets),
        source=label,
        source_format=source_format,
    )
    report.loaded, report.skipped_unexpected, report.skipped_shape = _fitting(
        weights, {name: targets[name] for name in encoder_targets}
    )
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


# ---------------------------------------------------------------------------------------- exporting


def export_encoder(source: str | os.PathLike | Mapping[str, Any], out_path: str | os.PathLike) -> tuple[Path, int]:
    """Write the encoder alone: a Swin encoder in the official SSL-head format (``swinViT.*``,
    ``encoder1|2|3|4|10.*``), a ViT encoder under MONAI ``ViT`` names (``patch_embedding.*``, ``blocks.*``,
    ``norm.*``).

    The file is a plain dict of tensors, so it loads with ``weights_only=True`` and by name into
    ``SwinUNETR(use_v2=True)``, or into MONAI ``ViT(..., qkv_bias=True)`` / ``UNETR(..., qkv_bias=True).vit``
    (whose unused ``norm_cross_attn`` tensors are the only ones left out). It is written atomically: a temporary file in the same
    folder is renamed over ``out_path``, so a failed export leaves no file and keeps an old one.

    Args:
        source: a checkpoint path or dict in any format :func:`encoder_state_dict` recognises
            (usually our training checkpoint).
        out_path: the file to write.

    Returns:
        ``(out_path, number of tensors written)``.

    Raises:
        CheckpointError: the source cannot be read or holds neither Swin nor ViT encoder tensors.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else "the given checkpoint"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    weights, source_format = encoder_state_dict(checkpoint)
    # clone(): a view would drag its whole storage (e.g. the full pretext's) into the file.
    is_encoder_key = (lambda name: _is_encoder_key(name, "")) if any(_is_encoder_key(name, "") for name in weights) \
        else _VIT_KEY.match
    encoder = {
        name: tensor.detach().cpu().contiguous().clone()
        for name, tensor in weights.items()
        if is_encoder_key(name)
    }
    if not encoder:
        raise CheckpointError(
            f"Found no encoder tensors (Swin: swinViT.*, encoder1|2|3|4|10.*; ViT: patch_embedding.*, blocks.*) "
            f"in {label} [{source_format}]; export a checkpoint of a pretraining run."
        )
    out_path = Path(out_path)
    with atomic_write(out_path) as temporary:
        torch.save(encoder, temporary)
    logger.info("exported %d encoder tensors from %s [%s] to %s", len(encoder), label, source_format, out_path)
    return out_path, len(encoder)


# -------------------------------------------------------------------------------------- run folders


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run folder (or of its ``checkpoints/``) that reads completely, or None where
    there is none: the one policy of resume, export and the demo.

    Each of :func:`ranked_checkpoints`, newest first, is read in full with `read_checkpoint` (weights only): a file
    can look complete and still be damaged. A damaged newer file is passed over for the previous one, with a
    message naming both. (`voco.engine.latest_checkpoint` is this, decided by rank 0 under torchrun.)

    Raises:
        CheckpointError: the folder holds checkpoints and none of them can be read.
    """
    damaged: list[tuple[Path, CheckpointError]] = []
    for path in ranked_checkpoints(directory):  # [] for a folder that does not exist yet
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            damaged.append((path, error))
            continue
        for bad, error in damaged:
            print(f"checkpoint {bad} cannot be read ({_first_line(error.__cause__ or error)}); taking the previous "
                  f"one, {path}.", flush=True)
        return path
    if damaged:
        raise CheckpointError(f"none of the {len(damaged)} checkpoints in {directory} can be read (the newest: "
                              f"{damaged[0][1]}); move them away to start over, or run with --resume False.")
    return None


def ranked_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a run folder (or of its ``checkpoints/``), newest first; [] for a missing folder.

    Files are ranked by their training iteration: the number in ignite's names
    (``checkpoint_iteration=200.pt``, ``checkpoint_final_iteration=1000.pt``, ``net_200.pt``), else the
    iteration the file itself records (``{"trainer": {"iteration": …}}`` or ``{"global_step": …}``, as in
    a fixed ``checkpoint_final.pt``). Files without either rank below, by modification time. Hidden and
    temporary files are left out.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    # The bundles save under <run folder>/checkpoints: accept the run folder itself too.
    folders = [folder for folder in (directory, directory / "checkpoints") if folder.is_dir()]
    candidates = [
        path
        for folder in folders
        for path in folder.iterdir()
        if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES and not path.name.startswith(".")
    ]

    def rank(path: Path) -> tuple[int, int, float]:
        match = _STEP_IN_NAME.search(path.name)
        step = int(match.group(1) or match.group(2)) if match else stored_step(path)
        return (0, 0, path.stat().st_mtime) if step is None else (1, step, path.stat().st_mtime)

    return sorted(candidates, key=rank, reverse=True)


def stored_step(path: Path) -> int | None:
    """The iteration a training checkpoint records, read with its tensors memory-mapped (not loaded)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a probe only: legacy (unmappable), unsafe or damaged files simply record no step
        return None
    if not isinstance(content, Mapping):
        return None
    trainer = content.get("trainer")
    step = trainer.get("iteration") if isinstance(trainer, Mapping) else content.get("global_step")
    return step if isinstance(step, int) else None
