"""Masked image modelling: hide most of a region and learn to paint it back (MAE and SimMIM, in 3-D).

He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022; facebookresearch/mae
``models_mae.py``, which this file follows) and Xie et al., "SimMIM: a Simple Framework for Masked Image
Modeling" (CVPR 2022; what the slides' code does). specs/pretext.md section 2 has the facts.

One step, for a batch of B regions ``[B, C, X, Y, Z]`` already on the device:

1. **Mask.** The region is cut into patches (the ViT's patch, e.g. 16^3 or 16 x 16 x 8; 32^3 for the Swin
   encoder, its deepest stride) and exactly ``round(mask_ratio * L)`` of the L patches of every region are
   masked (`masked_count`): ``mask_type="random"`` draws them uniformly (`random_mask`), ``"block"`` in
   cubes of ``mask_block_size`` patches per axis (`block_mask`). Equal counts give equal-length sequences.
2. **Encode and predict** (``variant``):
   - ``"mae"``: only the visible patch tokens go through the backbone (``encode_sequence``; every block must
     attend globally: ``backbone.can_drop_tokens``). A light decoder (`voco.networks.vit.Block`s of width
     ``decoder_dim``) gets them back in place, a learned *mask token* at every masked position and a frozen
     sin-cos position embedding, and predicts the ``prod(patch_size) * C`` voxels of every patch.
   - ``"simmim"``: every token is encoded. ViT: the embedding of a masked patch is replaced by a learned mask
     token (plus its position); any attention layout works. Swin: the masked voxels of the input are set to 0
     (or a learned value); the stride-32 feature map goes through a 1x1x1 conv to ``32^3 * C`` values per
     position, which a 3-D pixel shuffle (`unpatchify`) turns back into voxels.
   - ``"auto"`` (default): "mae" where the backbone can drop tokens, else "simmim".
3. **Loss** on the masked patches only: MSE (mae) or L1 (simmim; ``unmasked_weight`` > 0 adds the visible
   voxels with that weight). ``normalize_targets=True`` predicts every patch normalised by its own mean and
   standard deviation (MAE's ``norm_pix_loss``, with its unbiased variance and eps = 1e-6).

``metric/reconstruction_psnr`` = 10 log10(data_range^2 / MSE) over the masked voxels of each region, in the
intensity space of the input, averaged over the regions. Normalised predictions are mapped back with the true
mean and std of each patch (the model does not predict them; MAE's figures do the same), so with
``normalize_targets`` the PSNR measures the structure inside patches: compare it between runs of one setting.
data_range = 1 because the presets window CT to [0, 1] (``psnr_data_range`` for other inputs, e.g. z-scored
MRI); MSE is floored at 1e-10, so a perfect prediction reads 100 dB, not infinity.
``metric/mask_ratio`` is the realised share of masked patches.

A CNN (nnU-Net's ResEnc) cannot drop tokens, and a dense SimMIM lets its convolutions see the mask: masked image
modelling on it is SparK (`voco.pretext.spark`, which reuses this file's masks, targets, loss and views);
`voco.pretext.spark.masked_image_pretext` picks the method from the backbone.

>>> from voco.networks import build_backbone
>>> backbone = build_backbone("vit", "tiny", input_size=32, patch_size=8)
>>> pretext = MaskedImagePretext(backbone, decoder_dim=48, decoder_depth=1, decoder_heads=4, generator=0)
>>> output = pretext(torch.rand(2, 1, 32, 32, 32))
>>> sorted(output), pretext.variant, float(output["metric/mask_ratio"])
(['loss', 'loss/reconstruction', 'metric/mask_ratio', 'metric/reconstruction_psnr'], 'mae', 0.75)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from einops import rearrange
from torch import nn
from monai.networks.utils import eval_mode

from voco.errors import ConfigError, require_choice
from voco.networks.interfaces import FeaturePyramid, TokenSequence, require
from voco.networks.vit import Block, as_triple, sincos_position_embedding
from voco.pretext.views import as_generator, new_figure, regions, save_figure, show_axial

VARIANTS = ("auto", "mae", "simmim")
MASK_TYPES = ("random", "block")
MASK_VALUES = ("zero", "learned")
NORMALIZE_EPS = 1e-6  # MAE's norm_pix_loss: (x - mean) / (var + 1e-6) ** 0.5
MIN_MSE = 1e-10  # the PSNR of a perfect prediction: 10 log10(1 / 1e-10) = 100 dB for data_range 1


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Images ``[B, C, X, Y, Z]`` -> patches ``[B, L, p1 p2 p3 C]``.

    Patches are in the ViT's token order (raster over the grid ``(X/p1, Y/p2, Z/p3)``, last axis fastest);
    the values of one patch are ordered (p1, p2, p3, C), as MAE's ``patchify`` does in 2-D.
    """
    p1, p2, p3 = as_triple(patch_size, "patch_size")
    if images.ndim != 5 or any(s % p for s, p in zip(images.shape[2:], (p1, p2, p3))):
        raise ConfigError(f"images {tuple(images.shape)} cannot be cut into patches of {(p1, p2, p3)}; give "
                          "[B, C, X, Y, Z] with sizes divisible by the patch.")
    return rearrange(images, "b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)", p1=p1, p2=p2, p3=p3)


def unpatchify(patches: torch.Tensor, grid: Sequence[int], patch_size: int | Sequence[int],
               channels: int = 1) -> torch.Tensor:
    """The inverse of `patchify` (a 3-D pixel shuffle): ``[B, L, p1 p2 p3 C]`` -> ``[B, C, X, Y, Z]``."""
    p1, p2, p3 = as_triple(patch_size, "patch_size")
    d, h, w = (int(n) for n in grid)
    return rearrange(patches, "b (d h w) (p1 p2 p3 c) -> b c (d p1) (h p2) (w p3)", d=d, h=h, w=w, p1=p1, p2=p2,
                     p3=p3, c=channels)


def mask_volume(mask: torch.Tensor, grid: Sequence[int], patch_size: int | Sequence[int]) -> torch.Tensor:
    """A patch mask ``[B, L]`` as a voxel mask ``[B, 1, X, Y, Z]`` (every voxel of a masked patch is True)."""
    p1, p2, p3 = as_triple(patch_size, "patch_size")
    volume = mask.view(mask.shape[0], 1, *grid)
    return volume.repeat_interleave(p1, 2).repeat_interleave(p2, 3).repeat_interleave(p3, 4)


# --------------------------------------------------------------------------------------------------
# Masks: [B, L] bools, True = masked, the same count in every region
# --------------------------------------------------------------------------------------------------
def masked_count(num_patches: int, mask_ratio: float) -> int:
    """``round(mask_ratio * L)`` (halves up), kept within 1 .. L - 1 so that something is hidden and
    something stays visible."""
    if not 0.0 < mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio is {mask_ratio}; use a fraction between 0 and 1 (MAE: 0.75).")
    if num_patches < 2:
        raise ConfigError(f"a region of {num_patches} patch cannot be masked; use a larger region or a smaller patch.")
    return min(max(math.floor(mask_ratio * num_patches + 0.5), 1), num_patches - 1)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` lowest scores of every row of ``[B, L]`` (ties: the earlier token first)."""
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                             .expand_as(order).contiguous())
    return ranks < count


def random_mask(batch_size: int, grid: Sequence[int], mask_ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Exactly `masked_count` patches of every region masked, uniformly at random: ``[B, d h w]`` bools.

    The random numbers come from the CPU ``generator`` (reproducible whatever the device); the sort runs on
    ``device``.
    """
    num_patches = math.prod(grid)
    count = masked_count(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator).to(device)
    return _lowest(noise, count)


def block_lattice(batch_size: int, grid: Sequence[int], block_size: int | Sequence[int] = 2,
                  generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Each patch's cube on a lattice of cubes of ``block_size`` patches per axis, shifted by a random offset per
    region (so cubes start anywhere; those at the border are clipped) -> (cube index ``[B, d h w]``, cube count)."""
    block = as_triple(block_size, "mask_block_size")
    offsets = torch.stack([torch.randint(0, b, (batch_size,), generator=generator) for b in block], dim=1).to(device)
    blocks_per_axis = [(n + b - 2) // b + 1 for n, b in zip(grid, block)]  # cubes a shifted lattice needs
    index = [(torch.arange(n, device=device)[None] + offsets[:, axis, None]) // block[axis]  # [B, n]
             for axis, n in enumerate(grid)]
    cubes = (index[0][:, :, None, None] * blocks_per_axis[1] + index[1][:, None, :, None]) * blocks_per_axis[2] \
        + index[2][:, None, None, :]
    return cubes.reshape(batch_size, math.prod(grid)), math.prod(blocks_per_axis)


def block_mask(batch_size: int, grid: Sequence[int], mask_ratio: float, block_size: int | Sequence[int] = 2,
               generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Exactly `masked_count` patches of every region masked in cubes of ``block_size`` patches per axis.

    Each region's grid is tiled by the cubes of `block_lattice`, and cubes are masked whole in a random order
    until the count is reached: the last cube is masked in part (its first patches in raster order), so that every
    region has the same count. Everything after the draw of the offsets and the cube order (CPU ``generator``)
    runs on ``device``. Returns ``[B, d h w]`` bools.
    """
    cubes, cube_count = block_lattice(batch_size, grid, block_size, generator, device)
    cube_order = torch.rand(batch_size, cube_count, generator=generator).to(device)
    count = masked_count(math.prod(grid), mask_ratio)
    return _lowest(cube_order.gather(1, cubes), count)  # a cube's patches share its score: masked together


# --------------------------------------------------------------------------------------------------
# Targets, losses and the metric
# --------------------------------------------------------------------------------------------------
def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-patch normalised targets: ``(patches - mean) / std`` with std = sqrt(unbiased var + 1e-6).

    Returns ``(targets, mean, std)``, mean and std ``[B, L, 1]`` (to map predictions back: ``p * std + mean``).
    """
    # Two passes (mean, then the centred sum of squares) instead of `var`: its Welford kernel is ~6x slower on the CPU.
    mean = patches.mean(dim=-1, keepdim=True)
    centred = patches - mean
    variance = torch.linalg.vecdot(centred, centred).unsqueeze(-1) / (patches.shape[-1] - 1)
    std = (variance + NORMALIZE_EPS).sqrt()
    return centred.div_(std), mean, std


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor, unmasked_weight: float = 0.0) -> torch.Tensor:
    """Mean of per-patch values ``[B, L]`` over the masked patches of the batch (visible ones weighted by
    ``unmasked_weight``)."""
    weights = mask.to(per_patch.dtype) + unmasked_weight * (~mask).to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


def reconstruction_psnr(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                        data_range: float = 1.0) -> torch.Tensor:
    """PSNR = 10 log10(data_range^2 / MSE) of each region over its masked voxels, averaged over the regions.

    ``predictions``, ``targets``: patches ``[B, L, P]`` in intensity space; ``mask [B, L]``. The MSE is
    floored at 1e-10 (a perfect prediction gives 100 dB for data_range 1, not infinity).
    """
    per_patch = (predictions.float() - targets.float()).pow(2).mean(dim=-1)
    masked = mask.to(per_patch.dtype)
    mse = (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=MIN_MSE))).mean()


# --------------------------------------------------------------------------------------------------
# The pretexts
# --------------------------------------------------------------------------------------------------
class MaskedModelling(nn.Module):
    """What every masked-image-modelling pretext shares: the masks, the targets, the loss and metrics of a step
    (`forward`) and the views picture (`views`). A subclass sets ``variant`` and ``patch_size`` (the mask's patch
    in voxels) and implements ``patch_grid(spatial_size)`` and ``predict(images, mask) -> [B, L, prod(patch) C]``
    (`MaskedImagePretext` here; `voco.pretext.spark.SparKPretext` for CNNs). The loss is the MSE on the masked
    patches, or the L1 for "simmim" (with ``unmasked_weight`` on the visible ones)."""

    variant: str
    patch_size: tuple[int, int, int]

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, mask_type: str = "random",
                 mask_block_size: int | Sequence[int] = 2, normalize_targets: bool = False,
                 unmasked_weight: float = 0.0, psnr_data_range: float = 1.0,
                 generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        require_choice("mask_type", mask_type, MASK_TYPES)
        masked_count(2, mask_ratio)  # checks the ratio
        if unmasked_weight < 0:
            raise ConfigError(f"unmasked_weight is {unmasked_weight}; use 0 (masked voxels only) or more.")
        self.backbone = backbone
        self.mask_ratio, self.mask_type = float(mask_ratio), mask_type
        self.mask_block_size = as_triple(mask_block_size, "mask_block_size")
        self.normalize_targets, self.unmasked_weight = bool(normalize_targets), float(unmasked_weight)
        self.psnr_data_range = float(psnr_data_range)
        self.generator = as_generator(generator)
        self.in_channels = int(backbone.in_channels)

    def make_mask(self, batch_size: int, grid: Sequence[int], device: torch.device | str | None = None
                  ) -> torch.Tensor:
        """The masks of a batch: ``[B, d h w]`` bools, True = masked (see `random_mask`, `block_mask`)."""
        if self.mask_type == "block":
            return block_mask(batch_size, grid, self.mask_ratio, self.mask_block_size, self.generator, device)
        return random_mask(batch_size, grid, self.mask_ratio, self.generator, device)

    def targets(self, images: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(patches, targets, mean, std)`` of regions in float32: targets are the patches themselves, or their
        per-patch normalisation (then mean and std map a prediction back to intensities)."""
        patches = patchify(images.float(), self.patch_size)
        if not self.normalize_targets:
            return patches, patches, None, None
        targets, mean, std = normalize_patches(patches)
        return patches, targets, mean, std

    def forward(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"image": [B, C, X, Y, Z]}`` (or the tensor) -> scalar loss and metrics (tensors)."""
        images = regions(batch, "masked image modelling")
        grid = self.patch_grid(images.shape[2:])
        mask = self.make_mask(images.shape[0], grid, images.device)
        predictions = self.predict(images, mask).float()  # float32 loss under bf16 autocast
        patches, targets, mean, std = self.targets(images)
        if self.variant == "simmim":
            loss = masked_mean((predictions - targets).abs().mean(dim=-1), mask, self.unmasked_weight)
        else:
            loss = masked_mean((predictions - targets).pow(2).mean(dim=-1), mask)
        with torch.no_grad():
            intensities = predictions if mean is None else predictions * std + mean
            psnr = reconstruction_psnr(intensities, patches, mask, self.psnr_data_range)
        return {
            "loss": loss,
            "loss/reconstruction": loss.detach(),
            "metric/reconstruction_psnr": psnr,
            "metric/mask_ratio": mask.float().mean(),
        }

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        """What the model sees and paints for the first region of a batch (CPU tensors, for `save_views_picture`).

        Runs in evaluation mode (restored afterwards). Keys, middle z slices ``[X, Y]`` of the first channel:
        ``input_slice``; ``masked_slice`` (masked voxels 0) with ``mask_slice`` (bools); ``reconstruction_slice``
        (visible patches from the input, masked ones from the prediction, as in the MAE paper's figures);
        ``prediction_slice`` (the prediction everywhere); and ``psnr`` (dB, masked patches) and ``mask_ratio``.
        """
        images = regions(batch, "masked image modelling")[:1]
        with eval_mode(self):
            grid = self.patch_grid(images.shape[2:])
            mask = self.make_mask(1, grid, images.device)
            predictions = self.predict(images, mask).float()
        patches, _, mean, std = self.targets(images)
        intensities = predictions if mean is None else predictions * std + mean
        prediction = unpatchify(intensities, grid, self.patch_size, self.in_channels)
        voxels = mask_volume(mask, grid, self.patch_size)
        image = images.float()
        reconstruction = torch.where(voxels, prediction, image)
        middle = images.shape[-1] // 2

        def middle_slice(volume: torch.Tensor) -> torch.Tensor:
            return volume[0, 0, :, :, middle].cpu()

        return {
            "input_slice": middle_slice(image),
            "masked_slice": middle_slice(torch.where(voxels, 0.0, image)),
            "mask_slice": middle_slice(voxels),
            "reconstruction_slice": middle_slice(reconstruction),
            "prediction_slice": middle_slice(prediction),
            "psnr": float(reconstruction_psnr(intensities, patches, mask, self.psnr_data_range)),
            "mask_ratio": float(mask.float().mean()),
            "variant": self.variant,
        }


class MaskedImagePretext(MaskedModelling):
    """MAE or SimMIM around a backbone: ``forward(batch) -> {"loss", "loss/reconstruction", "metric/..."}``.

    Args:
        backbone: a `voco.networks.ViTEncoder` (any attention layout; "mae" needs a global one) or a
            `voco.networks.SwinEncoder` ("simmim" only).
        variant: "mae", "simmim" or "auto" ("mae" when ``backbone.can_drop_tokens``, else "simmim").
        mask_ratio: share of the patches hidden (0.75; SimMIM used 0.6).
        mask_type: "random" (per patch) or "block" (cubes of ``mask_block_size`` patches per axis).
        mask_block_size: cube side in patches, one int or three.
        normalize_targets: predict each patch normalised by its own mean and std (MAE's norm_pix_loss).
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: the MAE decoder (512, 4, 16, 4 for a
            ViT-B; the MAE paper's ViT-L used depth 8).
        mask_value: SimMIM on the Swin encoder: masked voxels set to "zero" or to a "learned" value per channel.
        unmasked_weight: SimMIM: weight of the visible voxels in the L1 loss (0: masked voxels only).
        psnr_data_range: the intensity range of the inputs for the PSNR (1: CT windowed to [0, 1]).
        generator: a CPU ``torch.Generator`` or an int seed for the masks (None: torch's global RNG).
    """

    def __init__(self, backbone: nn.Module, variant: str = "auto", mask_ratio: float = 0.75,
                 mask_type: str = "random", mask_block_size: int | Sequence[int] = 2, normalize_targets: bool = False,
                 decoder_dim: int = 512, decoder_depth: int = 4, decoder_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, mask_value: str = "zero", unmasked_weight: float = 0.0,
                 psnr_data_range: float = 1.0, generator: torch.Generator | int | None = None) -> None:
        require_choice("variant", variant, VARIANTS)
        require_choice("mask_value", mask_value, MASK_VALUES)
        super().__init__(backbone, mask_ratio, mask_type, mask_block_size, normalize_targets, unmasked_weight,
                         psnr_data_range, generator)

        # A ViT (tokens, patch size, position table) or a convolutional-map encoder (the Swin: stride 32 last).
        if require(backbone, (TokenSequence, FeaturePyramid), "masked image modelling") is TokenSequence:
            self.backbone_kind, self.patch_size = "vit", tuple(backbone.patch_size)
        else:
            self.backbone_kind, self.patch_size = "feature_map", (int(backbone.feature_strides[-1]),) * 3
        can_drop_tokens = self.backbone_kind == "vit" and bool(backbone.can_drop_tokens)
        if variant != "simmim" and is_sparse_cnn(backbone):
            raise ConfigError(f"masked image modelling on the {type(backbone).__name__} CNN is SparK: build it with "
                              "voco.pretext.spark.masked_image_pretext or SparKPretext (variant 'simmim' runs the "
                              "dense SimMIM, whose masked voxels leak through the convolutions).")
        if variant == "auto":
            variant = "mae" if can_drop_tokens else "simmim"
        if variant == "mae" and not can_drop_tokens:
            layout = getattr(backbone, "layout", type(backbone).__name__)
            raise ConfigError(f"MAE encodes only the visible tokens, which the {layout} backbone cannot do (its "
                              "attention groups tokens by position); use variant 'simmim', or a ViT with layout "
                              "'global'.")
        self.variant = variant
        patch_values = math.prod(self.patch_size) * self.in_channels

        if variant == "mae":
            width = backbone.embedding_dim
            self.decoder_embed = nn.Linear(width, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, decoder_mlp_ratio)
                                                for _ in range(decoder_depth))
            self.decoder_norm = nn.LayerNorm(decoder_dim)
            self.decoder_pred = nn.Linear(decoder_dim, patch_values)
            # Frozen sin-cos table of the backbone's grid, not saved (it follows from the grid); other grids are
            # computed when met.
            self.decoder_dim = decoder_dim
            self.register_buffer("decoder_position_embedding",
                                 sincos_position_embedding(backbone.token_grid(backbone.input_size), decoder_dim),
                                 persistent=False)
            self._decoder_grid = tuple(backbone.token_grid(backbone.input_size))
            for module in [self.decoder_embed, *self.decoder_blocks.modules(), self.decoder_norm, self.decoder_pred]:
                self._init_decoder_weights(module)  # MAE's init, for our layers only (not the backbone's)
            nn.init.normal_(self.mask_token, std=0.02)
        elif self.backbone_kind == "vit":
            width = backbone.embedding_dim
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.prediction_head = nn.Linear(width, patch_values)
        else:  # SimMIM on the Swin encoder: voxels are masked, the stride-32 map predicts 32^3 C values
            self.mask_value = nn.Parameter(torch.zeros(1, self.in_channels, 1, 1, 1)) if mask_value == "learned" \
                else None
            self.prediction_head = nn.Conv3d(backbone.feature_channels[-1], patch_values, kernel_size=1)

    @staticmethod
    def _init_decoder_weights(module: nn.Module) -> None:
        """MAE's initialisation: xavier-uniform linear layers with zero bias, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- masks
    def patch_grid(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """The patch grid of an input size (ConfigError when the patch does not divide it)."""
        if self.backbone_kind == "vit":
            return tuple(self.backbone.token_grid(spatial_size))  # type: ignore[return-value]
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or any(s % p for s, p in zip(size, self.patch_size)):
            raise ConfigError(f"region size {size} is not divisible by the Swin encoder's stride {self.patch_size[0]}; "
                              "set region_size to multiples of 32.")
        return tuple(s // p for s, p in zip(size, self.patch_size))  # type: ignore[return-value]

    # ---------------------------------------------------------------- predictions
    def _decoder_positions(self, grid: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        table = self.decoder_position_embedding if grid == self._decoder_grid else \
            sincos_position_embedding(grid, self.decoder_dim).to(like.device)
        return table.to(like.dtype)[None]

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted voxels of every patch, ``[B, L, prod(patch) C]`` (normalised if ``normalize_targets``).

        ``mask [B, L]`` comes from `make_mask`: True = masked, the pretext's count in every region."""
        grid = self.patch_grid(images.shape[2:])
        batch_size = images.shape[0]
        if self.variant == "mae":
            tokens = self.backbone.embed(images).flatten(1, 4)  # [B, L, C], position embedding added
            # Indices of the visible tokens in raster order (equal counts: a regular batch). A gather, not boolean
            # indexing, so that the GPU does not wait for the host.
            num_visible = mask.shape[1] - masked_count(mask.shape[1], self.mask_ratio)
            visible_ids = mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :num_visible, None]  # [B, V, 1]
            visible = tokens.gather(1, visible_ids.expand(-1, -1, tokens.shape[-1]))
            encoded, _ = self.backbone.encode_sequence(visible)
            encoded = self.decoder_embed(encoded)
            # Visible tokens back in place, the mask token everywhere else.
            sequence = self.mask_token.to(encoded.dtype).expand(batch_size, mask.shape[1], -1)
            sequence = sequence.scatter(1, visible_ids.expand(-1, -1, encoded.shape[-1]), encoded)
            sequence = sequence + self._decoder_positions(grid, sequence)
            for block in self.decoder_blocks:
                sequence = block(sequence)
            return self.decoder_pred(self.decoder_norm(sequence))
        if self.backbone_kind == "vit":  # SimMIM: masked embeddings become the mask token, all tokens encoded
            tokens = self.backbone.embed(images)  # [B, 1, d, h, w, C]
            width = tokens.shape[-1]
            positions = self.backbone.position_table(grid).to(tokens.dtype).view(1, 1, *grid, width)
            masked = mask.view(batch_size, 1, *grid, 1)
            tokens = torch.where(masked, self.mask_token.to(tokens.dtype).view(1, 1, 1, 1, 1, width) + positions,
                                 tokens)
            encoded, _ = self.backbone.encode(tokens)
            return self.prediction_head(encoded.flatten(1, 4))
        # SimMIM on the Swin encoder: masked voxels replaced in the input, prediction from the stride-32 map.
        voxels = mask_volume(mask, grid, self.patch_size)
        fill = self.mask_value.to(images.dtype) if self.mask_value is not None else images.new_zeros(())
        features = self.backbone.deepest_features(torch.where(voxels, fill, images))
        return rearrange(self.prediction_head(features), "b p d h w -> b (d h w) p")


def is_sparse_cnn(backbone: nn.Module) -> bool:
    """A CNN that SparK can run sparsely: nnU-Net's residual encoder (`voco.networks.resenc.ResEncEncoder`)."""
    from voco.networks.resenc import ResEncEncoder

    return isinstance(backbone, ResEncEncoder)


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `MaskedImagePretext.views`: the input, the masked input (masked patches blue) and the
    reconstruction (visible patches from the input, masked ones predicted), middle z slice, one intensity scale.

    matplotlib is imported lazily; the file appears complete or not at all.
    """
    import numpy as np
    from matplotlib import colormaps

    image = views["input_slice"].numpy()
    low, high = float(image.min()), float(image.max())
    high = high if high > low else low + 1.0
    gray = colormaps["gray"].with_extremes(bad="tab:blue")
    masked = np.ma.masked_where(views["mask_slice"].numpy(), views["masked_slice"].numpy())
    figure, axes = new_figure(9.0, 3.4, 1, 3)
    panels = [(image, "input"), (masked, f"masked ({100 * views['mask_ratio']:.0f} %)"),
              (views["reconstruction_slice"].numpy(), f"reconstruction (PSNR {views['psnr']:.1f} dB)")]
    for axis, (values, title) in zip(axes[0], panels):
        show_axial(axis, values, letters=True, cmap=gray, vmin=low, vmax=high, interpolation="nearest")
        axis.set_title(title, fontsize=9)
    figure.suptitle(f"masked image modelling ({views.get('variant', '')}), middle z slice", fontsize=9)
    return save_figure(figure, path)
