"""Masked image modelling for CNNs: SparK, in 3-D, on nnU-Net's residual encoder (ResEnc).

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling" (ICLR 2023;
keyu-tian/SparK). nnU-Net's self-supervised framework (MIC-DKFZ/nnssl) pretrains its ResEnc-L this way and finds it
the best pretraining for segmentation. specs/pretext.md section 2 has MAE's facts, which SparK carries over.

Why not SimMIM on a CNN: zeroing masked voxels and convolving densely lets every convolution see the mask. Features
near a mask edge mix in zeros, the normalisation statistics count the masked voxels, and a masked region fills up
with values as it passes through the layers; at fine-tuning no voxel is masked, so the encoder meets other
statistics than it learnt on. SparK treats the masked voxels as *absent*, as a sparse CNN on the visible voxels
would.

One step, for a batch of B regions ``[B, C, X, Y, Z]`` already on the device:

1. **Mask.** The region is cut into patches of the encoder's total stride (32^3 voxels for a ResEnc-L) and
   ``round(mask_ratio * L)`` of its L patches are masked (`voco.pretext.mae.random_mask` or ``block_mask``;
   SparK used 0.6). One mask serves every stage: at a stage of stride s a patch is 32/s voxels wide
   (`VisibleVoxels`).
2. **Encode sparsely** (`SparKPretext.sparse_features`). The masked input voxels are set to zero, and while the
   encoder runs, every convolution and pooling is followed by re-masking its output to zero at that layer's
   resolution, and every InstanceNorm normalises with the statistics of the visible voxels only
   (`masked_instance_norm`; SparK's sparse BatchNorm). So each visible voxel's features are those a sparse CNN
   on the visible voxels alone computes: a convolution reads zeros where it would read nothing, and no masked voxel
   ever holds a value. This is done by swapping the forward of the encoder's own Conv3d, pooling and
   InstanceNorm3d layers during the pass (`sparse_layers`): MONAI and dynamic-network-architectures have no sparse
   convolution or masked normalisation, and a sparse-convolution library (spconv, MinkowskiEngine) would add a
   compiled dependency and new layer names that nnU-Net could not load.
3. **Densify and decode** (`SparKDecoder`). At every stage the masked positions are filled with a learned mask
   token (per stage) after a masked InstanceNorm, and a convolution projects to the decoder's width; a light
   UNet-style decoder (MONAI's ``UnetUpBlock``: transposed convolution, concatenated densified skip, two 3^3
   convolutions; ``decoder_dim`` channels at the deepest stage, halving per stage) goes back to the input
   resolution, where a 1^3 convolution predicts the voxels.
4. **Loss.** The MSE on the voxels of the masked patches only, against the input normalised per patch
   (`voco.pretext.mae.normalize_patches`, MAE's ``norm_pix_loss``). Loss, metrics (``metric/reconstruction_psnr``,
   ``metric/mask_ratio``) and the views picture are those of `voco.pretext.mae.MaskedModelling`.

The encoder's parameters are the ResEnc's own (``backbone.encoder.*``, nnU-Net's names): no layer is replaced, so
the pretrained encoder exports and fine-tunes as a plain dense CNN.

>>> from voco.networks import build_backbone
>>> pretext = SparKPretext(build_backbone("resenc", "tiny"), decoder_dim=32, generator=0)
>>> output = pretext(torch.rand(2, 1, 16, 16, 16))
>>> sorted(output), pretext.variant, float(output["metric/mask_ratio"])
(['loss', 'loss/reconstruction', 'metric/mask_ratio', 'metric/reconstruction_psnr'], 'spark', 0.625)
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
from monai.networks.blocks import UnetUpBlock
from torch import nn

from voco.errors import ConfigError, require_choice
from voco.pretext.mae import VARIANTS, MaskedImagePretext, MaskedModelling, is_sparse_cnn, mask_volume, patchify

# The settings of masked_image_pretext (the bundle's) that SparK takes.
SPARK_SETTINGS = ("mask_ratio", "mask_type", "mask_block_size", "normalize_targets", "decoder_dim", "psnr_data_range",
                  "generator")
REMASKED_LAYERS = (nn.Conv3d, nn.AvgPool3d, nn.MaxPool3d)  # mix neighbours: re-masked after each
POINTWISE_LAYERS = (nn.LeakyReLU, nn.ReLU, nn.GELU, nn.Identity, nn.Dropout, nn.Dropout3d)  # keep zeros zero


# --------------------------------------------------------------------------------------------------
# Sparse convolution, emulated
# --------------------------------------------------------------------------------------------------
class VisibleVoxels:
    """The visible voxels of a batch at every resolution the encoder reaches: the patch mask ``[B, d h w]`` (True =
    masked) on its ``grid``, repeated to ``[B, 1, *shape]`` bools for a map of that shape (cached per shape)."""

    def __init__(self, mask: torch.Tensor, grid: Sequence[int]) -> None:
        self.visible_patches, self.grid = ~mask, tuple(int(n) for n in grid)
        self._maps: dict[tuple[int, ...], torch.Tensor] = {}

    def at(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(n) for n in shape)
        if shape not in self._maps:
            if any(n % g for n, g in zip(shape, self.grid)):
                raise ConfigError(f"a map of {shape} voxels does not tile the mask's patch grid {self.grid}.")
            factors = [n // g for n, g in zip(shape, self.grid)]
            self._maps[shape] = mask_volume(self.visible_patches, self.grid, factors)
        return self._maps[shape]


def masked_instance_norm(features: torch.Tensor, visible: torch.Tensor, norm: nn.InstanceNorm3d) -> torch.Tensor:
    """``norm`` (an InstanceNorm3d: per region and channel) with the mean and (biased) variance of the visible voxels
    only, then its affine map; 0 at the masked voxels. ``features [B, C, X, Y, Z]``, ``visible [B, 1, X, Y, Z]``.

    Computed in float32 (as autocast runs ``instance_norm``); equals ``norm`` applied to the visible voxels alone.
    """
    x = features.float()
    weights = visible.to(x.dtype)
    axes = (2, 3, 4)
    count = weights.sum(dim=axes, keepdim=True).clamp(min=1)
    mean = (x * weights).sum(dim=axes, keepdim=True) / count
    centred = (x - mean) * weights
    scale = torch.rsqrt(centred.pow(2).sum(dim=axes, keepdim=True) / count + norm.eps)
    if not norm.affine:
        return centred * scale
    # the affine map folded into the scale: one pass over the map fewer; masked voxels back to 0 after the bias
    normalised = centred * (scale * norm.weight.view(1, -1, 1, 1, 1)) + norm.bias.view(1, -1, 1, 1, 1)
    return torch.where(visible, normalised, 0.0)


def _remasked(forward: Callable[[torch.Tensor], torch.Tensor], visible: VisibleVoxels
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    def sparse_forward(x: torch.Tensor) -> torch.Tensor:
        output = forward(x)
        return torch.where(visible.at(output.shape[2:]), output, 0.0)

    return sparse_forward


def _normalised(norm: nn.InstanceNorm3d, visible: VisibleVoxels) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: masked_instance_norm(x, visible.at(x.shape[2:]), norm)


@contextmanager
def sparse_layers(module: nn.Module, visible: VisibleVoxels) -> Iterator[None]:
    """Within the block, ``module``'s Conv3d and pooling layers re-mask their outputs and its InstanceNorm3d layers
    normalise over the visible voxels (instance attributes shadow the class's ``forward``; removed on exit)."""
    replaced = []
    try:
        for layer in module.modules():
            if isinstance(layer, REMASKED_LAYERS):
                layer.forward = _remasked(layer.forward, visible)
            elif isinstance(layer, nn.InstanceNorm3d):
                layer.forward = _normalised(layer, visible)
            else:
                continue
            replaced.append(layer)
        yield
    finally:
        for layer in replaced:
            del layer.forward


def run_sparse(module: nn.Module, x: torch.Tensor, visible: VisibleVoxels) -> torch.Tensor:
    """``module(x)`` as a sparse CNN on the visible voxels (a function, so that gradient checkpointing recomputes it
    sparsely too)."""
    with sparse_layers(module, visible):
        return module(x)


def check_sparse_layers(encoder: nn.Module) -> None:
    """ConfigError unless every layer of ``encoder`` is one that `sparse_layers` makes sparse or a pointwise one."""
    for name, layer in encoder.named_modules():
        if next(layer.children(), None) is not None or isinstance(layer, REMASKED_LAYERS + POINTWISE_LAYERS):
            continue
        if isinstance(layer, nn.InstanceNorm3d) and not layer.track_running_stats:
            continue
        raise ConfigError(f"SparK runs a CNN sparsely through Conv3d, pooling, InstanceNorm3d (no running statistics) "
                          f"and pointwise layers, and the encoder's {name} is a {type(layer).__name__}; build the "
                          "ResEnc without it.")


# --------------------------------------------------------------------------------------------------
# Densify and decode
# --------------------------------------------------------------------------------------------------
class Densify(nn.Module):
    """SparK's densify step for one stage: the sparse map ``[B, channels, ...]`` normalised over its visible voxels,
    a learned ``mask_token`` at the masked ones, then a ``kernel_size`` convolution to ``width`` channels."""

    def __init__(self, channels: int, width: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=True)
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.projection = nn.Conv3d(channels, width, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        normalised = masked_instance_norm(features, visible, self.norm)
        return self.projection(torch.where(visible, normalised, self.mask_token.to(normalised.dtype)))


class SparKDecoder(nn.Module):
    """The light decoder: every stage's map densified (`Densify`: 1^3 projection at the deepest, 3^3 elsewhere, as
    SparK), then from the deepest up, per stage, a transposed convolution by that stage's stride, the densified map
    of the stage above concatenated and two 3^3 convolutions (MONAI ``UnetUpBlock``, InstanceNorm, LeakyReLU);
    a 1^3 convolution to ``out_channels`` at the input's resolution.

    Args:
        feature_channels: the encoder's channels per stage, shallow to deep.
        strides: the encoder's stride per stage (each an int or three).
        decoder_dim: channels at the deepest stage, halved per stage towards the input (512: 16 at the input of a
            six-stage ResEnc); at least 2^(stages - 1).
        out_channels: the input's channels.

    ``forward(features, visible: VisibleVoxels) -> [B, out_channels, X, Y, Z]``.
    """

    def __init__(self, feature_channels: Sequence[int], strides: Sequence[int | Sequence[int]], decoder_dim: int,
                 out_channels: int) -> None:
        super().__init__()
        stages = len(feature_channels)
        if decoder_dim < 2 ** (stages - 1):
            raise ConfigError(f"decoder_dim is {decoder_dim}; SparK's decoder halves it over {stages} stages, so use "
                              f"at least {2 ** (stages - 1)}.")
        widths = [decoder_dim // 2 ** (stages - 1 - i) for i in range(stages)]
        self.densify = nn.ModuleList(Densify(channels, width, 1 if i == stages - 1 else 3)
                                     for i, (channels, width) in enumerate(zip(feature_channels, widths)))
        self.up = nn.ModuleList(UnetUpBlock(3, widths[i + 1], widths[i], kernel_size=3, stride=1,
                                            upsample_kernel_size=strides[i + 1], norm_name="instance")
                                for i in range(stages - 1))
        first = strides[0]
        # a first stage that strides (nnU-Net's stem never does; some plans' first stage may) needs one more step up
        self.to_input = nn.Identity() if first in (1, [1, 1, 1], (1, 1, 1)) else \
            nn.ConvTranspose3d(widths[0], widths[0], first, stride=first)
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], visible: VisibleVoxels) -> torch.Tensor:
        dense = [densify(f, visible.at(f.shape[2:])) for densify, f in zip(self.densify, features)]
        x = dense[-1]
        for up, skip in zip(reversed(self.up), reversed(dense[:-1])):
            x = up(x, skip)
        return self.head(self.to_input(x))


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class SparKPretext(MaskedModelling):
    """SparK around a ResEnc: ``forward(batch) -> {"loss", "loss/reconstruction", "metric/..."}``.

    Args:
        backbone: a `voco.networks.resenc.ResEncEncoder` (``build_backbone("resenc", size)``).
        mask_ratio: share of the patches (the encoder's total stride) hidden (SparK: 0.6; nnssl: 0.75).
        mask_type, mask_block_size: "random" patches or "block" cubes of patches (`voco.pretext.mae.block_mask`).
        normalize_targets: predict each patch normalised by its own mean and std (MAE's norm_pix_loss; SparK too).
        decoder_dim: the decoder's channels at the deepest stage (`SparKDecoder`).
        psnr_data_range: the intensity range of the inputs for the PSNR (1: CT windowed to [0, 1]).
        generator: a CPU ``torch.Generator`` or an int seed for the masks (None: torch's global RNG).

    The backbone's ``use_checkpoint`` checkpoints each sparse stage. ``torch.compile`` of the backbone
    (`voco.networks.compile_backbone`) does not reach this pass, which runs the stages itself.
    """

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.6, mask_type: str = "random",
                 mask_block_size: int | Sequence[int] = 2, normalize_targets: bool = True, decoder_dim: int = 512,
                 psnr_data_range: float = 1.0, generator: torch.Generator | int | None = None) -> None:
        if not is_sparse_cnn(backbone):
            raise ConfigError(f"SparK runs nnU-Net's residual encoder sparsely and got a {type(backbone).__name__}; "
                              "build the backbone with build_backbone('resenc', size), or use MaskedImagePretext.")
        super().__init__(backbone, mask_ratio, mask_type, mask_block_size, normalize_targets, 0.0, psnr_data_range,
                         generator)
        check_sparse_layers(backbone.encoder)
        self.variant = "spark"
        self.patch_size = tuple(int(s) for s in backbone.spatial_divisor)
        self.decoder = SparKDecoder(backbone.feature_channels, backbone.architecture["strides"], int(decoder_dim),
                                    self.in_channels)

    def patch_grid(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """The mask's patch grid of an input size (patches of the encoder's total stride)."""
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or any(s % p for s, p in zip(size, self.patch_size)):
            raise ConfigError(f"region size {size} is not divisible by the ResEnc's total stride {self.patch_size}, "
                              "SparK's mask patch; set region_size to multiples of it.")
        return tuple(s // p for s, p in zip(size, self.patch_size))  # type: ignore[return-value]

    def sparse_features(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], VisibleVoxels]:
        """Every stage's map of the encoder run sparsely on the visible voxels (0 at masked ones), shallow to deep,
        and the `VisibleVoxels` of ``mask [B, L]`` (True = masked)."""
        self.backbone.check_size(images)
        visible = VisibleVoxels(mask, self.patch_grid(images.shape[2:]))
        x = torch.where(visible.at(images.shape[2:]), images, 0.0)  # masked voxels are absent, not zero-valued
        encoder, features = self.backbone.encoder, []
        if encoder.stem is not None:
            x = self._run(encoder.stem, x, visible)
        for stage in encoder.stages:
            x = self._run(stage, x, visible)
            features.append(x)
        return features, visible

    def _run(self, module: nn.Module, x: torch.Tensor, visible: VisibleVoxels) -> torch.Tensor:
        if self.backbone.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run_sparse, module, x, visible, use_reentrant=False)
        return run_sparse(module, x, visible)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted voxels of every patch, ``[B, L, prod(patch) C]`` (normalised if ``normalize_targets``)."""
        features, visible = self.sparse_features(images, mask)
        return patchify(self.decoder(features, visible), self.patch_size)


def masked_image_pretext(backbone: nn.Module, variant: str = "auto", **settings: Any) -> MaskedModelling:
    """The masked-image-modelling pretext of a backbone, so that a bundle switches method with its backbone spec:
    SparK (`SparKPretext`) for a CNN with ``variant`` "auto", "mae" or "spark" (SparK is MAE
    for convolutional networks); else `MaskedImagePretext` (MAE or SimMIM; "simmim" on a CNN is the dense
    baseline). ``settings``: those of the class built; SparK ignores the transformer decoder's
    (``decoder_depth``, ``decoder_heads``, ``decoder_mlp_ratio``) and SimMIM's (``mask_value``, ``unmasked_weight``)."""
    require_choice("variant", variant, (*VARIANTS, "spark"))
    if variant != "simmim" and is_sparse_cnn(backbone):
        return SparKPretext(backbone, **{name: value for name, value in settings.items() if name in SPARK_SETTINGS})
    if variant == "spark":
        raise ConfigError(f"SparK masks a CNN's convolutions and the {type(backbone).__name__} is not a CNN; use "
                          "variant 'mae', 'simmim' or 'auto'.")
    return MaskedImagePretext(backbone, variant, **settings)
