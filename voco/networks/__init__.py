"""Backbones (built from a small spec: name, size, input channels), heads and the EMA teacher."""

from __future__ import annotations

from torch import nn

from voco.errors import ConfigError
from voco.networks.heads import VoCoProjector
from voco.networks.swin import BACKBONE_SIZES, SwinEncoder, swin_feature_size
from voco.networks.teacher import EMATeacher, cosine_momentum
from voco.networks.vit import VIT_SIZES, ViTEncoder, vit_spec

BACKBONES = ("swin", "vit", "resenc")


def build_backbone(name: str = "swin", size: str | int = "B", in_channels: int = 1, use_checkpoint: bool = False,
                   **kwargs) -> nn.Module:
    """A backbone from its spec, so that a bundle switches backbones with one key.

    Args:
        name: ``"swin"`` (the SwinUNETR-v2 encoder of VoCo), ``"vit"`` (`ViTEncoder` with an attention layout) or
            ``"resenc"`` (nnU-Net's residual-encoder CNN, `ResEncEncoder`; the ``cnn`` extra).
        size: Swin: ``"tiny"`` (C = 12, for tests), ``"B"`` (48), ``"L"`` (96), ``"H"`` (192), or an int feature
            size. ViT: ``"tiny"`` (96 wide, for tests), ``"S"``, ``"B"``, ``"L"``. ResEnc: ``"tiny"``, ``"M"``, ``"L"``.
        in_channels: input channels.
        use_checkpoint: gradient checkpointing.
        **kwargs: passed to the backbone class (Swin: e.g. ``window_size``; ViT: ``input_size``, ``patch_size``,
            ``layout``, ``window_size``, ``position_embedding`` ...; ResEnc: ``n_stages``, ``strides`` ...).

    >>> build_backbone("swin", "tiny").embedding_dim
    288
    >>> build_backbone("vit", "tiny", input_size=32, patch_size=8).embedding_dim
    96
    """
    if str(name).lower() == "swin":
        return SwinEncoder(in_channels=in_channels, feature_size=swin_feature_size(size),
                           use_checkpoint=use_checkpoint, **kwargs)
    if str(name).lower() == "vit":
        return ViTEncoder(in_channels=in_channels, use_checkpoint=use_checkpoint, **{**vit_spec(size), **kwargs})
    if str(name).lower() == "resenc":
        from voco.networks.resenc import ResEncEncoder  # dynamic-network-architectures is an optional extra

        return ResEncEncoder(in_channels=in_channels, size=str(size), use_checkpoint=use_checkpoint, **kwargs)
    raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}.")


def compile_backbone(backbone: nn.Module, enabled: bool = True, backend: str = "inductor",
                     mode: str | None = None) -> nn.Module:
    """`torch.compile` a backbone in place, where the pretexts spend their time: each transformer block of a ViT
    (the pretexts call its ``embed``/``encode``/``forward_tokens``, not only ``forward``; every block of a layout sees
    the same shapes), the whole module otherwise (the Swin encoder, which VoCo calls as ``backbone(x)``).

    ``nn.Module.compile`` keeps parameter names, so checkpoints, resume and export are unchanged. Inputs must be
    plain tensors (the engine strips MONAI's MetaTensor: compiled code breaks on batched metadata). ``backend``:
    ``"inductor"`` (kernels; GPU) or ``"aot_eager"`` (traces without generating code; for checking on a CPU).
    """
    if not enabled:
        return backbone
    modules = list(backbone.blocks) if isinstance(getattr(backbone, "blocks", None), nn.ModuleList) else [backbone]
    for module in modules:
        module.compile(backend=backend, mode=mode)
    return backbone


__all__ = ["compile_backbone", "BACKBONES", "BACKBONE_SIZES", "VIT_SIZES", "build_backbone", "SwinEncoder", "ViTEncoder", "VoCoProjector",
           "EMATeacher", "cosine_momentum", "swin_feature_size", "vit_spec"]
