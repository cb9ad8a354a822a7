"""Read checkpoints safely, find the encoder weights in them, export them.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint downloaded from the internet
can never run code here. The encoder is the SwinUNETR-v2 encoder whose state-dict keys are those of
the released ``VoCo_{B,L,H}_SSL_head.pt`` (145 tensors for feature size 48)::

    swinViT.*                          patch embedding, 4 Swin stages, 4 v2 residual blocks
    encoder1|2|3|4|10.*                SwinUNETR residual blocks on the input and hidden states

The other backbones' encoders keep their own names: the ViT MONAI's ``ViT`` names (``patch_embedding.*``,
``blocks.*``, ``norm.*``), the ResEnc CNN nnU-Net's ``ResidualEncoderUNet`` names (``encoder.stem.*``,
``encoder.stages.*``; `voco.checkpoints.nnunet` writes it as nnU-Net's pretrained weights).

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from voco.errors import CheckpointError, optional_import
from voco.files import atomic_write, checksum_path, verify_checksum

logger = logging.getLogger(__name__)


# A key of the SwinUNETR encoder, possibly under an owner prefix ("backbone.", "student.backbone.", ...):
# the owner is the shortest run of path components before the first encoder component.
_ENCODER_KEY = re.compile(r"^(?P<owner>(?:[^.]+\.)*?)(?P<name>(?:swinViT|encoder(?:1|2|3|4|10))\..+)$")
_DECODER_COMPONENT = re.compile(r"^(?:decoder\d+|out)\.")
# A key of our ViT encoder (MONAI ViT names; position_encoder is the optional Fourier position MLP).
_VIT_KEY = re.compile(r"^(?:patch_embedding\.|blocks\.\d+\.|norm\.|position_encoder\.)")
# A key of the ResEnc encoder (nnU-Net's names; "decoder.encoder.*", the copy in nnU-Net's decoder, is not one).
_RESENC_KEY = re.compile(r"^encoder\.(?:stem|stages)\.")
# MONAI's ViT blocks hold a LayerNorm for cross-attention that UNETR never uses: not part of an encoder to fill.
_UNUSED_MONAI_KEY = re.compile(r"^blocks\.\d+\.norm_cross_attn\.")
# MONAI model_swinvit.pt stores the Swin transformer without the "swinViT." owner.
_SWINVIT_ONLY_KEY = re.compile(r"^(?:patch_embed|layers[1-4])\.")
# Containers that the reference loader and common trainers put a state dict under, in search order.
_CONTAINER_KEYS = ("state_dict", "network_weights", "net", "student", "model")
# Wrappers that add a leading component to every key: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

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
    if verify_checksum(path) is False:
        raise CheckpointError(
            f"Checkpoint {path} does not match the SHA-256 recorded when it was written ({checksum_path(path).name}): "
            "it was damaged since; use an earlier checkpoint, or copy it again from a good source."
        )
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
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
            if "weights only load failed" not in str(error).lower() or (
                    unsafe is None and "unsupported global" not in str(error).lower()):
                # random bytes also fail the weights-only unpickler ("Unsupported operand"): damage, not objects
                raise _corrupt_checkpoint_error(path, error) from error
            found = f" (it contains {unsafe.group(1)})" if unsafe else ""
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects that voco refuses to load{found}; "
                "in a trusted environment re-save only the weights with "
                "torch.save(model.state_dict(), path) and load that file instead."
            ) from error
        except Exception as error:  # noqa: BLE001
            # torch reports truncation and garbage as any error type (EOFError, RuntimeError, KeyError, IndexError,
            # zipfile.BadZipFile ...), depending on where the bytes end.
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


def _encoder_key_form(weights: Mapping[str, Any]) -> Callable[[str], Any]:
    """Which backbone's key form the encoder tensors of `weights` have: Swin, else ResEnc, else ViT."""
    if any(_is_encoder_key(name, "") for name in weights):
        return lambda name: _is_encoder_key(name, "")
    return _RESENC_KEY.match if any(_RESENC_KEY.match(name) for name in weights) else _VIT_KEY.match


def resenc_encoder_tensors(weights: Mapping[str, torch.Tensor]) -> StateDict:
    """The ResEnc encoder tensors of an `encoder_state_dict` (``encoder.stem.*``, ``encoder.stages.*``)."""
    return {name: tensor for name, tensor in weights.items() if _RESENC_KEY.match(name)}


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


# ---------------------------------------------------------------------------------------- exporting


def export_encoder(source: str | os.PathLike | Mapping[str, Any], out_path: str | os.PathLike) -> tuple[Path, int]:
    """Write the encoder alone: a Swin encoder in the official SSL-head format (``swinViT.*``,
    ``encoder1|2|3|4|10.*``), a ViT encoder under MONAI ``ViT`` names (``patch_embedding.*``, ``blocks.*``,
    ``norm.*``), a ResEnc encoder under nnU-Net's names (``encoder.stem.*``, ``encoder.stages.*``).

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
        CheckpointError: the source cannot be read or holds no Swin, ViT or ResEnc encoder tensors.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else "the given checkpoint"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    weights, source_format = encoder_state_dict(checkpoint)
    is_encoder_key = _encoder_key_form(weights)
    # clone(): a view would drag its whole storage (e.g. the full pretext's) into the file.
    encoder = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in weights.items()
               if is_encoder_key(name)}
    if not encoder:
        raise CheckpointError(
            f"Found no encoder tensors (Swin: swinViT.*, encoder1|2|3|4|10.*; ViT: patch_embedding.*, blocks.*; "
            f"ResEnc: encoder.stem.*, encoder.stages.*) in {label} [{source_format}]; export a checkpoint of a "
            f"pretraining run."
        )
    out_path = Path(out_path)
    with atomic_write(out_path, checksum=True) as temporary:
        torch.save(encoder, temporary)
    logger.info("exported %d encoder tensors from %s [%s] to %s", len(encoder), label, source_format, out_path)
    return out_path, len(encoder)
