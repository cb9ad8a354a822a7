"""Query-box localisation: find where a small crop of a region came from.

Derived from UP-DETR (Dai et al., "UP-DETR: Unsupervised Pre-training for Object Detection with Transformers",
CVPR 2021) as the mammography slides use it, in 3-D. The facts this file follows are in specs/pretext.md,
section 3. One step, for a batch of B regions ``[B, 1, X, Y, Z]`` already on the device:

1. **Boxes.** For every region, M boxes (``boxes_per_region``; the slides use one) are drawn on a CPU
   generator as fractions of the region: side along x ``s ~ U(0.1, 0.4)``, the y and z sides ``s * U(0.8, 1.2)``
   each (clipped to 1), centre uniform such that the box fits. A box is thus roughly the region's shape scaled
   by s, so resizing its content to the region size magnifies it almost isotropically.
2. **Crops.** Each box's content is resampled to the crop size (default: the region size, as in the slides) in
   one ``grid_sample`` on the device (`voco.geometry.resample_boxes`) and its intensities are jittered.
   Flips and rotations are off by default: UP-DETR found that they make the task too hard.
3. **Tokens.** The *same* backbone encodes the regions and the crops (one pass when they have one size): a ViT
   gives its final patch tokens; a backbone without ``encode`` (the Swin encoder) its deepest feature map
   flattened to tokens.
4. **Query.** A learned query token attention-pools each crop's tokens (a cross-attention block from the query
   to the crop tokens), then ``num_cross_blocks`` pre-norm cross-attention blocks let it attend to the tokens of
   its region; as in DETR's decoder, a frozen sin-cos position embedding is added to the region tokens' keys,
   so that attention can tell where a token lies.
5. **Box.** ``Linear(dim, 6)``, bias 0.5 and small weights, predicts the box as (centre x, y, z, size x, y, z)
   in fractions of the region: the first prediction is the region's centre with half its size. The output is
   not squashed (no sigmoid, no clamp), so the L1 term has a gradient everywhere; GIoU and IoU read sizes
   clamped at 0, since a negative size is no box.
6. **Loss.** ``l1_weight * L1 + giou_weight * (1 - GIoU)`` (UP-DETR: 5 and 2; the slides: L1 only, giou_weight
   0), L1 summed over the six numbers and averaged over boxes as in DETR. Metrics: the mean IoU of predicted
   and true boxes and the mean absolute error of the centre (fractions of the region).

UP-DETR's other parts (many query patches per image, Hungarian matching, a class head) are left out, as in the
slides: each query knows which crop it carries, so there is nothing to match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from monai.networks.utils import eval_mode

from voco.errors import ConfigError
from voco.geometry import resample_boxes
from voco.health import embedding_health
from voco.networks.interfaces import FeaturePyramid, TokenSequence, require
from voco.networks.vit import MLP, sincos_position_embedding
from voco.pretext.views import (as_generator, flip_rotate, intensity_jitter, new_figure, regions, save_figure,
                               show_axial)



# --------------------------------------------------------------------------------------------------
# Boxes: sampling and geometry (boxes as (centre, size) fractions of the region, MONAI's "cccwhd" order)
# --------------------------------------------------------------------------------------------------
def sample_query_boxes(batch_size: int, boxes_per_region: int = 1, scale_range: Sequence[float] = (0.1, 0.4),
                       aspect_range: Sequence[float] = (0.8, 1.2), spatial_dims: int = 3,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw boxes inside the unit region -> ``[batch_size, boxes_per_region, 2 * spatial_dims]`` on the CPU.

    Each box is ``(centre x, y, z, size x, y, z)`` in fractions of the region side on that axis. The x size is
    ``U(*scale_range)``, every other size the x size times ``U(*aspect_range)``, clipped to 1; the centre is
    uniform in ``[size / 2, 1 - size / 2]`` so that the box fits.

    >>> boxes = sample_query_boxes(2, 3, generator=torch.Generator().manual_seed(0))
    >>> boxes.shape, bool((boxes[..., :3] - boxes[..., 3:] / 2 >= 0).all())
    (torch.Size([2, 3, 6]), True)
    """
    shape = (batch_size, boxes_per_region)
    low, high = scale_range
    scale = low + (high - low) * torch.rand(*shape, 1, generator=generator)
    aspect = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * torch.rand(*shape, spatial_dims - 1,
                                                                                generator=generator)
    sizes = torch.cat([scale, scale * aspect], dim=-1).clamp(max=1.0)
    centres = sizes / 2 + (1 - sizes) * torch.rand(*shape, spatial_dims, generator=generator)
    return torch.cat([centres, sizes], dim=-1)


def centre_size_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` (centre, size) -> ``[..., 6]`` corners (x0, y0, z0, x1, y1, z1): MONAI's "cccwhd" -> "xyzxyz".

    Written out because `monai.data.box_utils.convert_box_mode` checks the sizes with a host sync and takes
    ``[N, 6]`` only; the two agree (tests)."""
    centres, sizes = boxes.chunk(2, dim=-1)
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)


def box_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of paired corner boxes ``[..., 6]`` (x0, y0, z0, x1, y1, z1) -> two ``[...]``.

    GIoU = IoU - (enclosing volume - union) / enclosing volume (Rezatofighi et al. 2019), in (-1, 1].
    Written here rather than `monai.data.box_utils.box_pair_giou`, which takes ``[N, 6]`` only and checks its
    result for NaN with a host sync on every call; the values agree (tests). ``eps`` only guards 0 / 0 (two empty
    boxes): it is tiny because boxes in fractions of the region have volumes down to about 1e-4.
    """
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    dims = boxes1.shape[-1] // 2
    volume1 = (boxes1[..., dims:] - boxes1[..., :dims]).clamp(min=0).prod(-1)
    volume2 = (boxes2[..., dims:] - boxes2[..., :dims]).clamp(min=0).prod(-1)
    overlap = (torch.minimum(boxes1[..., dims:], boxes2[..., dims:])
               - torch.maximum(boxes1[..., :dims], boxes2[..., :dims])).clamp(min=0).prod(-1)
    union = volume1 + volume2 - overlap
    iou = overlap / (union + eps)
    enclosing = (torch.maximum(boxes1[..., dims:], boxes2[..., dims:])
                 - torch.minimum(boxes1[..., :dims], boxes2[..., :dims])).clamp(min=0).prod(-1)
    return iou, iou - (enclosing - union) / (enclosing + eps)


def query_box_loss(predicted: torch.Tensor, target: torch.Tensor, l1_weight: float = 5.0,
                   giou_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """Loss and metrics of predicted boxes against true ones, both ``[..., 6]`` (centre, size) fractions.

    Returns ``{"loss", "l1", "giou", "iou", "centre_error"}`` (scalars): ``l1`` is |predicted - target| summed over
    the six numbers and averaged over boxes (DETR), ``giou`` the mean of 1 - GIoU, ``loss`` their weighted sum;
    ``iou`` and ``centre_error`` (mean |centre difference| per axis) are detached. Predicted sizes are clamped at
    0 for GIoU and IoU.
    """
    predicted, target = predicted.float(), target.float()
    l1 = (predicted - target).abs().sum(-1).mean()
    dims = predicted.shape[-1] // 2
    predicted_box = torch.cat([predicted[..., :dims], predicted[..., dims:].clamp(min=0)], dim=-1)
    iou, giou = box_iou_giou(centre_size_to_corners(predicted_box), centre_size_to_corners(target))
    giou_loss = (1 - giou).mean()
    return {
        "loss": l1_weight * l1 + giou_weight * giou_loss,
        "l1": l1,
        "giou": giou_loss,
        "iou": iou.detach().mean(),
        "centre_error": (predicted[..., :dims] - target[..., :dims]).detach().abs().mean(),
    }


# --------------------------------------------------------------------------------------------------
# The query: cross-attention blocks
# --------------------------------------------------------------------------------------------------
class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: queries attend to a memory of tokens, then an MLP.

        q = q + attention(norm_query(q), keys = norm_memory(m) + p, values = norm_memory(m))
        q = q + mlp(norm_mlp(q))

    The optional position embedding p is added to the keys only (DETR's decoder). Queries do not attend to each
    other, so the M queries of a region are independent.

    Shapes: queries ``[B, M, C]``, memory ``[B, T, C]``, position ``[T, C]`` or ``[B, T, C]`` -> ``[B, M, C]``.

    >>> block = CrossAttentionBlock(12, num_heads=3)
    >>> block(torch.zeros(2, 4, 12), torch.randn(2, 10, 12)).shape
    torch.Size([2, 4, 12])
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"the query width {dim} is not divisible by {num_heads} heads; set num_heads to a "
                              f"divisor of {dim}.")
        self.num_heads = num_heads
        self.norm_query, self.norm_memory, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def attention(self, queries: torch.Tensor, memory: torch.Tensor,
                  position: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_queries, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.query(queries).view(batch, num_queries, self.num_heads, head_dim).transpose(1, 2)
        weight_k, weight_v = self.key_value.weight.chunk(2)
        bias_k, bias_v = self.key_value.bias.chunk(2) if self.key_value.bias is not None else (None, None)
        keys = memory if position is None else memory + position
        k = F.linear(keys, weight_k, bias_k).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        v = F.linear(memory, weight_v, bias_v).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, M, head_dim]
        return self.out_proj(x.transpose(1, 2).reshape(batch, num_queries, dim))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, position: torch.Tensor | None = None
                ) -> torch.Tensor:
        queries = queries + self.attention(self.norm_query(queries), self.norm_memory(memory), position)
        return queries + self.mlp(self.norm_mlp(queries))


# --------------------------------------------------------------------------------------------------
# Views: boxes and crops of a batch
# --------------------------------------------------------------------------------------------------
@dataclass
class QueryBoxViews:
    """The inputs of one query-box step.

    Attributes:
        crops: ``[B, M, C, *crop_size]``: each box's content resampled and augmented.
        boxes: ``[B, M, 6]`` the true boxes, (centre, size) in fractions of the region (the targets).
        voxel_boxes: ``[B, M, 6]`` the same boxes as float corners in region voxels (edges, max exclusive).
    """

    crops: torch.Tensor
    boxes: torch.Tensor
    voxel_boxes: torch.Tensor


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class QueryBoxPretext(nn.Module):
    """Query-box localisation around a backbone: ``forward(batch) -> {"loss", "loss/l1", "loss/giou", ...}``.

    Args:
        backbone: a `ViTEncoder` (``embed`` + ``encode``) or a backbone whose ``forward_features`` returns feature
            maps (the Swin encoder: its deepest map is used). Shared with other pretexts; only the query token,
            the cross-attention blocks and the box head below belong to this one.
        boxes_per_region: M boxes (queries) per region (slides: 1).
        min_scale, max_scale: range of the box's x side as a fraction of the region's (0.1, 0.4).
        aspect_range: range of the factor between the x side and each other side (0.8, 1.2).
        crop_size: size the box contents are resampled to; None: the region size (the slides). A smaller size
            makes crops cheaper to encode (e.g. half the region: boxes up to half the region keep full detail).
        intensity_scale_range, intensity_shift_range: crop intensity jitter ``x * U(1 +- a) + U(+- b)`` (0.1, 0.1).
        flip_probability: chance of flipping a crop along each axis (0: UP-DETR found flips make the task too hard).
        rotate_probability: chance of a rot90 in the x-y plane, k uniform in 1..3 (0; needs square crops in x-y).
        num_cross_blocks: cross-attention blocks from the query to the region tokens (2).
        num_heads: heads of the query blocks; None: the ViT's own count, else width // 64.
        mlp_ratio: MLP width of the query blocks relative to the token width (4).
        l1_weight, giou_weight: loss weights (UP-DETR: 5 and 2; the slides: L1 only, giou_weight 0).
        generator: a CPU ``torch.Generator`` or an int seed for boxes and augmentation (None: global RNG).

    Shapes: regions ``[B, C, X, Y, Z]``; predicted and true boxes ``[B, M, 6]`` (centre, size) fractions.
    """

    def __init__(self, backbone: nn.Module, boxes_per_region: int = 1, min_scale: float = 0.1, max_scale: float = 0.4,
                 aspect_range: Sequence[float] = (0.8, 1.2), crop_size: Sequence[int] | None = None,
                 intensity_scale_range: float = 0.1, intensity_shift_range: float = 0.1,
                 flip_probability: float = 0.0, rotate_probability: float = 0.0, num_cross_blocks: int = 2,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        if boxes_per_region < 1:
            raise ConfigError(f"boxes_per_region is {boxes_per_region}; use 1 or more (the slides: 1).")
        if not 0 < min_scale <= max_scale <= 1:
            raise ConfigError(f"min_scale {min_scale} and max_scale {max_scale} must satisfy 0 < min <= max <= 1; "
                              "give the box side as a fraction of the region side (reference: 0.1 and 0.4).")
        if len(aspect_range) != 2 or not 0 < aspect_range[0] <= aspect_range[1]:
            raise ConfigError(f"aspect_range is {list(aspect_range)}; give [low, high] with 0 < low <= high "
                              "(reference: [0.8, 1.2]).")
        if not (0 <= flip_probability <= 1 and 0 <= rotate_probability <= 1):
            raise ConfigError(f"flip_probability {flip_probability} and rotate_probability {rotate_probability} "
                              "must be probabilities; give numbers in [0, 1] (reference: 0).")
        if num_cross_blocks < 1:
            raise ConfigError(f"num_cross_blocks is {num_cross_blocks}; use 1 or more, or the query never sees the "
                              "region (slides: 2).")
        if l1_weight < 0 or giou_weight < 0 or l1_weight + giou_weight == 0:
            raise ConfigError(f"l1_weight {l1_weight} and giou_weight {giou_weight} must be >= 0 and not both 0 "
                              "(UP-DETR: 5 and 2; the slides: 1 and 0).")
        self.backbone = backbone
        self.boxes_per_region = int(boxes_per_region)
        self.scale_range, self.aspect_range = (float(min_scale), float(max_scale)), tuple(float(a) for a in aspect_range)
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.intensity_scale_range, self.intensity_shift_range = intensity_scale_range, intensity_shift_range
        self.flip_probability, self.rotate_probability = flip_probability, rotate_probability
        self.l1_weight, self.giou_weight = float(l1_weight), float(giou_weight)
        self.generator = as_generator(generator)

        dim = self.token_width(backbone)
        if num_heads is None:
            blocks = getattr(backbone, "blocks", None)
            num_heads = blocks[0].attn.num_heads if blocks is not None else max(1, dim // 64)
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query_token, std=0.02)
        self.pool_block = CrossAttentionBlock(dim, num_heads, mlp_ratio)  # the query reads its crop
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, mlp_ratio)
                                          for _ in range(num_cross_blocks))  # ... and looks for it in the region
        self.norm = nn.LayerNorm(dim)
        self.box_head = nn.Linear(dim, 6)
        nn.init.normal_(self.box_head.weight, std=1e-3)  # small: the first predictions stay near the bias
        nn.init.constant_(self.box_head.bias, 0.5)  # the region's centre, half its size
        self._position_tables: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------- tokens
    @staticmethod
    def token_width(backbone: nn.Module) -> int:
        """Width of the tokens `encode_tokens` gives for this backbone; ConfigError for one it cannot use."""
        if require(backbone, (TokenSequence, FeaturePyramid), "the query-box pretext") is TokenSequence:
            return int(backbone.hidden_size)
        return int(backbone.feature_channels[-1])

    def encode_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Images ``[N, C, X, Y, Z]`` -> tokens ``[N, T, dim]`` and their grid ``(d, h, w)``, T = d h w.

        ViT: the final (normed) patch tokens; otherwise the deepest feature map."""
        if isinstance(self.backbone, TokenSequence):
            tokens, _ = self.backbone.forward_tokens(images)  # [N, 1, d, h, w, dim]
            return tokens.flatten(1, 4), tuple(tokens.shape[2:5])
        deepest = self.backbone.deepest_features(images)  # [N, dim, d, h, w]
        return deepest.flatten(2).transpose(1, 2), tuple(deepest.shape[2:])

    def position_table(self, grid: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Frozen sin-cos table ``[T, dim]`` for the keys of the region tokens, made once per grid and device."""
        key = (tuple(grid), like.device, like.dtype)
        if key not in self._position_tables:
            table = sincos_position_embedding(grid, like.shape[-1])
            self._position_tables[key] = table.to(device=like.device, dtype=like.dtype)
        return self._position_tables[key]

    # ---------------------------------------------------------------- views
    def make_views(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> QueryBoxViews:
        """Draw M boxes per region of ``[B, C, X, Y, Z]`` (or take ``boxes [B, M, 6]`` (centre, size) fractions)
        and cut, resample and augment their crops on the images' device."""
        batch_size, channels, *region_size = images.shape
        crop_size = self.crop_size or tuple(region_size)
        if boxes is None:
            boxes = sample_query_boxes(batch_size, self.boxes_per_region, self.scale_range, self.aspect_range,
                                       len(region_size), self.generator)
        boxes = boxes.float()
        # Fractions -> voxel edges; a few numbers drawn on the CPU, moved to the device inside resample_boxes.
        voxel_boxes = centre_size_to_corners(boxes.cpu()) * torch.tensor(region_size * 2, dtype=torch.float32)
        crops = resample_boxes(images, voxel_boxes, crop_size).flatten(0, 1)  # [B M, C, *crop_size]
        count = crops.shape[0]
        if self.flip_probability > 0 or self.rotate_probability > 0:
            flips = torch.rand(count, 3, generator=self.generator) < self.flip_probability
            rotate = torch.rand(count, generator=self.generator) < self.rotate_probability
            rotations = torch.where(rotate, torch.randint(1, 4, (count,), generator=self.generator), 0)
            if crop_size[0] != crop_size[1] and self.rotate_probability > 0:
                raise ConfigError(f"rotate_probability > 0 needs crops square in x-y, got {crop_size}; set "
                                  "rotate_probability to 0 or make crop_size (or the region) square in x-y.")
            crops = flip_rotate(crops, flips, rotations)
        if self.intensity_scale_range or self.intensity_shift_range:
            crops = intensity_jitter(crops, self.intensity_scale_range, self.intensity_shift_range, self.generator)
        crops = crops.reshape(batch_size, -1, channels, *crop_size)
        return QueryBoxViews(crops, boxes.to(images.device), voxel_boxes)

    # ---------------------------------------------------------------- prediction
    def encode(self, images: torch.Tensor, crops: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Regions ``[B, C, X, Y, Z]`` and their crops ``[B, M, C, ...]`` -> tokens of the regions ``[B, T, dim]``
        and of the crops ``[B M, T', dim]``, and the regions' token grid."""
        batch_size = images.shape[0]
        crops = crops.flatten(0, 1)
        if crops.shape[1:] == images.shape[1:]:  # one backbone pass for regions and crops
            tokens, grid = self.encode_tokens(torch.cat([images, crops]))
            return tokens[:batch_size], tokens[batch_size:], grid
        region_tokens, grid = self.encode_tokens(images)
        return region_tokens, self.encode_tokens(crops)[0], grid

    def locate(self, region_tokens: torch.Tensor, crop_tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Tokens from `encode` -> predicted boxes ``[B, M, 6]`` ((centre, size) fractions of the region,
        unsquashed)."""
        batch_size = region_tokens.shape[0]
        queries = self.pool_block(self.query_token.expand(crop_tokens.shape[0], -1, -1), crop_tokens)  # [B M, 1, dim]
        queries = queries.view(batch_size, crop_tokens.shape[0] // batch_size, -1)
        position = self.position_table(grid, region_tokens)
        for block in self.cross_blocks:
            queries = block(queries, region_tokens, position)
        return self.box_head(self.norm(queries))

    def predict(self, images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Regions ``[B, C, X, Y, Z]`` and their crops ``[B, M, C, ...]`` -> predicted boxes ``[B, M, 6]``."""
        return self.locate(*self.encode(images, crops))

    def forward(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"image": [B, C, X, Y, Z]}`` (or the tensor) -> ``{"loss", "loss/l1", "loss/giou", "metric/box_iou",
        "metric/box_centre_error"}`` and the `voco.health.embedding_health` of the encoder's tokens averaged per
        region and per crop (``health/...``): scalar tensors, all but "loss" detached."""
        images = regions(batch, "the query-box pretext")
        views = self.make_views(images)
        region_tokens, crop_tokens, grid = self.encode(images, views.crops)
        predicted = self.locate(region_tokens, crop_tokens, grid)
        parts = query_box_loss(predicted, views.boxes, self.l1_weight, self.giou_weight)
        return {
            "loss": parts["loss"],
            "loss/l1": parts["l1"].detach(),
            "loss/giou": parts["giou"].detach(),
            "metric/box_iou": parts["iou"],
            "metric/box_centre_error": parts["centre_error"],
            **embedding_health(torch.cat([region_tokens.mean(dim=1), crop_tokens.mean(dim=1)])),
        }

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        """What the pretext sees and predicts for the first box of the first region (CPU, for `save_views_picture`).

        Keys: ``region_slice [X, Y]`` (the z slice through the true box's centre), ``slice_index``,
        ``true_box`` and ``predicted_box`` ``[6]`` (corners in region voxels), ``crop [*crop_size]`` (first
        channel, as fed to the network) and ``iou``. Runs in eval mode (restored afterwards).
        """
        images = regions(batch, "the query-box pretext")
        with eval_mode(self):
            views = self.make_views(images)
            predicted = self.predict(images, views.crops).float()
        region_size = images.shape[2:]
        scale = torch.tensor(list(region_size) * 2, dtype=torch.float32)
        true, guess = views.boxes[0, 0].cpu(), predicted[0, 0].cpu()
        guess = torch.cat([guess[:3], guess[3:].clamp(min=0)])
        slice_index = min(int(true[2] * region_size[2]), region_size[2] - 1)
        iou, _ = box_iou_giou(centre_size_to_corners(guess), centre_size_to_corners(true))
        return {
            "region_slice": images[0, 0, :, :, slice_index].float().cpu(),
            "slice_index": slice_index,
            "true_box": centre_size_to_corners(true) * scale,
            "predicted_box": centre_size_to_corners(guess) * scale,
            "crop": views.crops[0, 0, 0].float().cpu(),
            "iou": float(iou),
        }


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `QueryBoxPretext.views`: the region slice through the true box's centre with the true box
    (green) and the predicted one (red) projected onto it, and the middle z slice of the crop the query carried
    (the same plane), in radiological convention (`show_axial`); matplotlib is imported lazily; the file appears complete or not at all.
    """
    from matplotlib.patches import Rectangle

    figure, axes = new_figure(6.4, 3.4, 1, 2)
    region_axis, crop_axis = axes[0]
    show_axial(region_axis, views["region_slice"], letters=True, cmap="gray")
    for box, colour, name in [(views["true_box"], "tab:green", "true"), (views["predicted_box"], "tab:red", "predicted")]:
        x0, y0, _, x1, y1, _ = [float(value) for value in box]
        # Box edges are voxel edges; imshow puts voxel i at [i - 0.5, i + 0.5].
        region_axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                        linewidth=1.8, label=name))
    region_axis.legend(loc="lower right", fontsize=7)
    region_axis.set_title(f"region, z = {views['slice_index']}, IoU {views['iou']:.2f}", fontsize=8)
    crop = views["crop"]
    show_axial(crop_axis, crop[..., crop.shape[-1] // 2], cmap="gray")
    crop_axis.set_title("query crop (resampled, jittered)", fontsize=8)
    return save_figure(figure, path)
