"""nnU-Net's residual-encoder CNN (ResEnc) as a voco backbone, built by `dynamic-network-architectures`, the package
nnU-Net builds its networks with, so that our parameters carry nnU-Net's names (``encoder.stem.*``,
``encoder.stages.*``) and an exported encoder loads into nnU-Net's ``ResidualEncoderUNet`` key for key.

Sizes follow nnU-Net's ResEnc planners (``nnUNetPlannerResEnc{M,L}``): 3-D stages of 32 * 2^i features capped at 320,
residual blocks ``(1, 3, 4, 6, 6, 6)``, 3^3 kernels, stride 1 then 2 per stage, InstanceNorm (affine) and LeakyReLU.
M and L are the same encoder: nnU-Net's presets differ in their GPU-memory target (8 vs 24 GB), which sets the patch
size (and, for small patches, fewer stages), not the network; give ``n_stages``/``strides`` to match a plan whose
patch or spacing needs other ones. ``"tiny"`` (4 stages, 8-64 features, one block each) is for tests.

Needs the ``cnn`` extra (``pip install 'voco[cnn]'``: dynamic-network-architectures).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from voco.errors import ConfigError
from voco.networks.vit import as_triple

RESENC_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"features_per_stage": [8, 16, 32, 64], "n_blocks_per_stage": [1, 1, 1, 1]},
    "M": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]},
    "L": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]},
}
# The layers of every ResEnc plan: nnU-Net's plans name them by import path (``arch_kwargs_req_import``).
RESENC_LAYERS = {"conv_op": "torch.nn.modules.conv.Conv3d", "conv_bias": True,
                 "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                 "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
RESENC_IMPORTS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def resenc_architecture(size: str = "L", n_stages: int | None = None, features_per_stage: Sequence[int] | None = None,
                        n_blocks_per_stage: Sequence[int] | None = None,
                        strides: Sequence[int | Sequence[int]] | None = None,
                        kernel_sizes: Sequence[int | Sequence[int]] | None = None) -> dict[str, Any]:
    """The ``arch_kwargs`` of an nnU-Net plan (3d_fullres, ``ResidualEncoderUNet``) for a ResEnc size, layers named
    by import path as in a plans file; ``n_stages`` trims or extends the size's stages (features capped at 320)."""
    if size not in RESENC_SIZES:
        raise ConfigError(f"unknown ResEnc size {size!r}; use one of {', '.join(RESENC_SIZES)}.")
    preset = RESENC_SIZES[size]
    features = list(features_per_stage or preset["features_per_stage"])
    blocks = list(n_blocks_per_stage or preset["n_blocks_per_stage"])
    n_stages = int(n_stages or len(features))
    if features_per_stage is None:
        features = [min(features[0] * 2 ** i, max(features)) for i in range(n_stages)]
    if n_blocks_per_stage is None:
        blocks = (blocks + [blocks[-1]] * n_stages)[:n_stages]
    # lists, as a plans file holds them (an export compares them with nnU-Net's plan)
    strides = [list(as_triple(s, "strides")) for s in (strides or [1] + [2] * (n_stages - 1))]
    kernel_sizes = [list(as_triple(k, "kernel_sizes")) for k in (kernel_sizes or [3] * n_stages)]
    for name, value in (("features_per_stage", features), ("n_blocks_per_stage", blocks), ("strides", strides),
                        ("kernel_sizes", kernel_sizes)):
        if len(value) != n_stages:
            raise ConfigError(f"the ResEnc has {n_stages} stages but {name} has {len(value)} entries; give one per "
                              "stage.")
    return {"n_stages": n_stages, "features_per_stage": features, "kernel_sizes": kernel_sizes, "strides": strides,
            "n_blocks_per_stage": blocks, "n_conv_per_stage_decoder": [1] * (n_stages - 1), **RESENC_LAYERS}


def layers_of(architecture: dict[str, Any]) -> dict[str, Any]:
    """A plan's ``arch_kwargs`` with the layers named by import path resolved to classes."""
    import pydoc

    resolved = dict(architecture)
    for key in RESENC_IMPORTS:
        if resolved.get(key) is not None:
            resolved[key] = pydoc.locate(resolved[key])
    return resolved


def import_dna():
    try:
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    except ImportError as error:
        raise ConfigError("the resenc backbone needs nnU-Net's network package: pip install 'voco[cnn]' "
                          "(dynamic-network-architectures).") from error
    return ResidualEncoder, InitWeights_He


class ResEncEncoder(nn.Module):
    """nnU-Net's residual encoder, a `FeaturePyramid` (voco.networks.interfaces): every stage's output map, shallow to
    deep, and a pooled embedding (the global average of the deepest map, ``embedding_dim`` = its channels).

    Args:
        in_channels: input channels.
        size: ``"tiny"``, ``"M"`` or ``"L"`` (see the module docstring).
        use_checkpoint: gradient checkpointing of each stage (less memory, more compute).
        **architecture: ``n_stages``, ``features_per_stage``, ``n_blocks_per_stage``, ``strides``, ``kernel_sizes``
            to match an nnU-Net plan (`resenc_architecture`).

    Initialised as nnU-Net initialises its networks (He normal, a = 0.01, zero biases).

    >>> encoder = ResEncEncoder(size="tiny")
    >>> [tuple(f.shape) for f in encoder.forward_features(torch.zeros(1, 1, 16, 16, 16))]
    [(1, 8, 16, 16, 16), (1, 16, 8, 8, 8), (1, 32, 4, 4, 4), (1, 64, 2, 2, 2)]
    """

    def __init__(self, in_channels: int = 1, size: str = "L", use_checkpoint: bool = False, **architecture) -> None:
        super().__init__()
        ResidualEncoder, InitWeights_He = import_dna()
        self.architecture = resenc_architecture(size, **architecture)
        layers = layers_of(self.architecture)
        self.encoder = ResidualEncoder(
            in_channels, layers["n_stages"], layers["features_per_stage"], layers["conv_op"], layers["kernel_sizes"],
            layers["strides"], layers["n_blocks_per_stage"], layers["conv_bias"], layers["norm_op"],
            layers["norm_op_kwargs"], layers["dropout_op"], layers["dropout_op_kwargs"], layers["nonlin"],
            layers["nonlin_kwargs"], return_skips=True)
        self.encoder.apply(InitWeights_He(1e-2))
        self.in_channels = in_channels
        self.use_checkpoint = use_checkpoint
        self.feature_channels = tuple(self.architecture["features_per_stage"])
        strides = torch.tensor(self.architecture["strides"]).cumprod(0).tolist()
        # one int per stage where the stride is the same along every axis (the interface's form), else per axis
        self.feature_strides = tuple(s[0] if len(set(s)) == 1 else tuple(s) for s in strides)
        self.spatial_divisor = tuple(total_stride(self.architecture))
        self.embedding_dim = self.feature_channels[-1]

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, C, X, Y, Z]`` -> each stage's map ``[B, feature_channels[i], X / feature_strides[i], ...]``."""
        self.check_size(images)
        x = self.encoder.stem(images)
        features = []
        for stage in self.encoder.stages:
            x = self._run(stage, x)
            features.append(x)
        return features

    def deepest_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.deepest_features(images).mean(dim=(2, 3, 4))

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def check_size(self, images: torch.Tensor) -> None:
        if images.ndim != 5 or images.shape[1] != self.in_channels:
            raise ConfigError(f"the ResEnc takes [B, {self.in_channels}, X, Y, Z], got {tuple(images.shape)}.")
        if any(n % d for n, d in zip(images.shape[2:], self.spatial_divisor)):
            raise ConfigError(f"the input size {tuple(images.shape[2:])} is not divisible by the ResEnc's total "
                              f"stride {self.spatial_divisor}; use sizes divisible by it.")


def total_stride(architecture: dict[str, Any]) -> list[int]:
    """The product of a plan's strides per axis: what its patch size must be divisible by."""
    return [math.prod(axis) for axis in zip(*architecture["strides"])]
