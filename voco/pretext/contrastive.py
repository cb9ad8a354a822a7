"""Contrastive embedding: views of one region embed close together, views of different regions far apart.

The embedding task of the mammography slides (specs/pretext.md section 4), made 3-D. One step, for a batch of
B regions ``[B, 1, X, Y, Z]`` already on the device:

1. **Views.** Each region gives V = ``num_views`` views, all resampled to the model input size in one
   ``grid_sample`` (`voco.geometry.resample_boxes`):

   - view 1, *global*: a box of U(0.5, 1) of the region's volume (the region's aspect ratio), anywhere inside it;
   - view 2, *augmented*: a global box or, with probability ``local_probability``, a *local* one of U(0.2, 0.4)
     of the volume; flipped per axis, rot90 in the x-y plane (square inputs only), intensity jitter, optionally
     inverted;
   - view 3 (V = 3), *masked*: view 1 again, with ``token_mask_ratio`` of its ViT patch tokens replaced by a
     learned mask token (plus that token's position embedding, as in SimMIM) after the patch embedding.

   Boxes, augmentations and masks are drawn on a CPU generator, so a seed reproduces them.
2. **Embedding.** A learned *embedding token* rides through the ViT as an extra token (copied into every
   attention group of a block and averaged back, so windowed and hierarchical layouts work), then
   ``Linear(width, embedding_dim, bias=False) -> LayerNorm(embedding_dim, elementwise_affine=False)``. A backbone
   without tokens (the Swin encoder) gives its pooled feature instead; it has no masked view.
3. **Loss** over all pairs of the batch's N = B V embeddings, a view with itself excluded; *positives* are
   views of the same region, *negatives* views of different regions:

   - ``"cosine"`` (the slides'): ``1 - cos`` on positives and ``max(0, cos - margin)`` on negatives — torch's
     ``CosineEmbeddingLoss`` on every pair — each averaged over its own pairs, then weighted;
   - ``"infonce"``: ``-log softmax_k(cos_ik / tau)[j]`` for every positive pair (i, j), the softmax over all
     k != i: SimCLR's NT-Xent for V = 2, SupCon's L_out for V = 3 (the other positive stays in the
     denominator). Symmetric, since (i, j) and (j, i) both count.

   Under ``torch.distributed`` the embeddings of every rank are gathered *with* their gradient (SimCLR's global
   batch): rank r's rows are its anchors, and every rank's rows are its candidates.
4. **Teacher** (optional, ``teacher_momentum``; BYOL/DINO-style): an EMA copy of backbone + head embeds the same
   views without gradient; each student view is pulled to the teacher's embeddings of the *other* views of its
   region (and pushed from those of other regions). The teacher copies the whole *shared* backbone: one more
   backbone of parameters in memory (no gradients, no optimizer state; ViT-B: ~86 M parameters, 0.35 GB in fp32),
   moved towards the backbone after every optimizer step (`after_step`), whichever task trained it.

Where all embeddings coincide both losses are flat (the cosine loss sits at 1: cos = 1 is a maximum, so it has
no gradient). An untrained ViT's embedding token is close to that on look-alike regions in [0, 1] (cosines
> 0.99 on windowed CT phantoms); zero-mean intensities (z-score) start far enough from it in our tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from monai.networks.utils import eval_mode

from voco.distributed import get_rank, world_size
from voco.errors import ConfigError, require_choice
from voco.geometry import resample_boxes, sample_boxes
from voco.health import embedding_health
from voco.networks.interfaces import TokenSequence
from voco.networks.teacher import EMATeacher
from voco.pretext.views import (as_generator, flip_rotate, gather_with_gradient, intensity_jitter, new_figure,
                                regions, save_figure, show_axial)

LOSS_FORMS = ("cosine", "infonce")
VIEW_NAMES = ("global", "augmented", "masked")


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewAugmentation:
    """How the views are cut and how view 2 is augmented (the slides' recipe).

    Scales are fractions of the region's *volume*; a box keeps the region's aspect ratio.
    """

    global_scale: tuple[float, float] = (0.5, 1.0)
    local_scale: tuple[float, float] = (0.2, 0.4)
    local_probability: float = 0.5  # view 2 is a local crop with this probability, else a global one
    flip_probability: float = 0.5  # for each of the three axes
    rotate_probability: float = 0.5  # rot90 in the x-y plane, k uniform in 1..3 (square x-y inputs only)
    intensity_scale_range: float = 0.1  # x * U(1 - s, 1 + s) + U(-t, t)
    intensity_shift_range: float = 0.1
    invert_probability: float = 0.0  # x -> min + max - x of the view

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"{name} is {getattr(self, name)}; use (low, high) with 0 < low <= high <= 1.")
        for name in ("local_probability", "flip_probability", "rotate_probability", "invert_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} is {getattr(self, name)}; use a probability in [0, 1].")


@dataclass
class ContrastiveViews:
    """The inputs of one step.

    Attributes:
        views: ``[B, V, C, *input_size]``: global, augmented (and masked) view of each region.
        boxes: ``[B, V, 6]`` float boxes of the views in region voxels (view 3 shares view 1's box).
        local: ``[B]`` bools: view 2 is a local crop.
        flips: ``[B, 3]`` bools, ``rotations [B]`` rot90 k, ``inverted [B]`` bools: view 2's augmentation.
        token_mask: ``[B, V, d h w]`` bools, True where a patch token is replaced by the mask token (only in
            view 3), or None for V = 2.
    """

    views: torch.Tensor
    boxes: torch.Tensor
    local: torch.Tensor
    flips: torch.Tensor
    rotations: torch.Tensor
    inverted: torch.Tensor
    token_mask: torch.Tensor | None


def random_token_mask(count: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``[count, num_tokens]`` bools with exactly ``round(ratio * num_tokens)`` True per row, at random."""
    ranks = torch.rand(count, num_tokens, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < round(ratio * num_tokens)


def make_views(images: torch.Tensor, num_views: int, input_size: Sequence[int],
               augmentation: ViewAugmentation = ViewAugmentation(), token_grid: Sequence[int] | None = None,
               token_mask_ratio: float = 0.5, generator: torch.Generator | None = None) -> ContrastiveViews:
    """Cut the views of regions ``[B, C, X, Y, Z]`` on their device (see the module docstring).

    ``token_grid`` (the ViT's grid of the input size) is needed for V = 3. Every random number comes from the
    CPU ``generator`` (None: torch's global one); the few numbers are moved to the device once.
    """
    batch_size = images.shape[0]
    region_size = images.shape[2:]
    device = images.device
    # Boxes: view 1 global; view 2 global or local; view 3 = view 1.
    global_scales = torch.empty(batch_size, 2).uniform_(*augmentation.global_scale, generator=generator)
    local_scales = torch.empty(batch_size).uniform_(*augmentation.local_scale, generator=generator)
    local = torch.rand(batch_size, generator=generator) < augmentation.local_probability
    scales = torch.stack([global_scales[:, 0], torch.where(local, local_scales, global_scales[:, 1])], dim=1)
    boxes = sample_boxes(region_size, scales, generator)  # [B, 2, 6]
    if num_views == 3:
        boxes = torch.cat([boxes, boxes[:, :1]], dim=1)
    crops = resample_boxes(images, boxes[:, :2], input_size)  # [B, 2, C, *input_size]

    # View 2: flips, x-y rot90, inversion, intensity jitter.
    flips = torch.rand(batch_size, 3, generator=generator) < augmentation.flip_probability
    rotate = torch.rand(batch_size, generator=generator) < augmentation.rotate_probability
    rotations = torch.where(rotate, torch.randint(1, 4, (batch_size,), generator=generator), 0)
    if input_size[0] != input_size[1]:  # rot90 in x-y would change the shape
        rotations = torch.zeros_like(rotations)
    inverted = torch.rand(batch_size, generator=generator) < augmentation.invert_probability
    augmented = flip_rotate(crops[:, 1], flips, rotations)  # [B, C, *input_size]
    low = augmented.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = augmented.amax(dim=(1, 2, 3, 4), keepdim=True)
    augmented = torch.where(inverted.to(device).view(-1, 1, 1, 1, 1), low + high - augmented, augmented)
    augmented = intensity_jitter(augmented, augmentation.intensity_scale_range, augmentation.intensity_shift_range,
                                 generator)

    views = [crops[:, 0], augmented] + ([crops[:, 0]] if num_views == 3 else [])
    token_mask = None
    if num_views == 3:
        num_tokens = math.prod(token_grid)
        token_mask = torch.zeros(batch_size, 3, num_tokens, dtype=torch.bool)
        token_mask[:, 2] = random_token_mask(batch_size, num_tokens, token_mask_ratio, generator)
        token_mask = token_mask.to(device, non_blocking=True)
    return ContrastiveViews(torch.stack(views, dim=1), boxes.to(device), local.to(device), flips.to(device),
                            rotations.to(device), inverted.to(device), token_mask)


# --------------------------------------------------------------------------------------------------
# Pairs and losses
# --------------------------------------------------------------------------------------------------
@dataclass
class ContrastivePairs:
    """Anchors (this rank's views) against candidates (every rank's views, or the teacher's embeddings of them).

    Attributes:
        cosines: ``[n, M]`` cosine similarities; n = this rank's views, M = world size x n.
        positives: ``[n, M]`` bools: another view of the same region.
        negatives: ``[n, M]`` bools: a view of another region.
        own: ``[n, M]`` bools: the anchor's own column (excluded from both).
    """

    cosines: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor
    own: torch.Tensor


def contrastive_pairs(embeddings: torch.Tensor, views_per_region: int, targets: torch.Tensor | None = None
                      ) -> ContrastivePairs:
    """The cosine of every anchor with every candidate, and which pairs are positive.

    Args:
        embeddings: ``[n, E]`` this rank's view embeddings, region-major (row = region * V + view).
        views_per_region: V.
        targets: ``[n, E]`` the candidates' embeddings in the same order (a teacher's); None: ``embeddings``.

    Under ``torch.distributed`` the candidates of all ranks are gathered with gradient; rank r's anchor i is
    candidate ``r n + i``, and candidate j belongs to region ``j // V``.
    """
    targets = embeddings if targets is None else targets
    candidates = gather_with_gradient(targets)
    rank = get_rank()
    count, device = embeddings.shape[0], embeddings.device
    with torch.autocast(device.type, enabled=False):  # cosines near 1 need float32, not bf16
        cosines = F.normalize(embeddings, dim=-1) @ F.normalize(candidates, dim=-1).T
    rows = torch.arange(count, device=device) + rank * count  # each anchor's own column
    columns = torch.arange(candidates.shape[0], device=device)
    own = rows[:, None] == columns[None]
    same_region = rows[:, None] // views_per_region == columns[None] // views_per_region
    return ContrastivePairs(cosines, same_region & ~own, ~same_region, own)


def _pair_mean(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``pairs`` (masked sums: no host sync)."""
    return (values * pairs).sum() / pairs.sum().clamp(min=1)


def cosine_embedding_loss(pairs: ContrastivePairs, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The slides' loss, split: ``(mean over positives of 1 - cos, mean over negatives of max(0, cos - margin))``.

    Per pair this is ``torch.nn.CosineEmbeddingLoss`` (target 1 for positives, -1 for negatives).

    >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # regions (0, 1), (2, 3)
    >>> [round(float(v), 4) for v in cosine_embedding_loss(contrastive_pairs(e, 2))]
    [0.6464, 0.6036]
    """
    positive = _pair_mean(1.0 - pairs.cosines, pairs.positives)
    negative = _pair_mean(F.relu(pairs.cosines - margin), pairs.negatives)
    return positive, negative


def info_nce_loss(pairs: ContrastivePairs, temperature: float = 0.1) -> torch.Tensor:
    """Mean over positive pairs (i, j) of ``-log softmax_k(cos_ik / temperature)[j]``, k over all candidates but
    the anchor itself (NT-Xent for two views per region; SupCon's L_out for more)."""
    logits = (pairs.cosines / temperature).masked_fill(pairs.own, float("-inf"))
    log_probabilities = torch.where(pairs.positives, logits.log_softmax(dim=-1), 0.0)  # avoids 0 * -inf
    return -log_probabilities.sum() / pairs.positives.sum().clamp(min=1)


@torch.no_grad()
def pair_metrics(pairs: ContrastivePairs) -> dict[str, torch.Tensor]:
    """Mean cosine of positive and of negative pairs, and the share of anchors whose most similar candidate
    (itself excluded) is a view of the same region."""
    nearest = pairs.cosines.masked_fill(pairs.own, float("-inf")).argmax(dim=-1)
    return {
        "metric/positive_cosine": _pair_mean(pairs.cosines, pairs.positives),
        "metric/negative_cosine": _pair_mean(pairs.cosines, pairs.negatives),
        "metric/retrieval_top1": pairs.positives.gather(1, nearest[:, None]).float().mean(),
    }


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class EmbeddingHead(nn.Module):
    """The task's own parameters: the embedding token and mask token (ViT backbones), and the projection
    ``Linear(width, embedding_dim, bias=False) -> LayerNorm(embedding_dim, elementwise_affine=False)``.

    ``forward(features [M, width]) -> [M, embedding_dim]``.
    """

    def __init__(self, width: int, embedding_dim: int, embedding_token: bool, mask_token: bool) -> None:
        super().__init__()
        # Initialised like MAE's CLS and mask tokens: N(0, 0.02).
        self.embedding_token = nn.Parameter(torch.randn(1, 1, width) * 0.02) if embedding_token else None
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02) if mask_token else None
        self.projection = nn.Linear(width, embedding_dim, bias=False)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projection(features))


def embed_views(backbone: nn.Module, head: EmbeddingHead, views: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Views ``[M, C, *input_size]`` -> embeddings ``[M, embedding_dim]`` through ``backbone`` and ``head``.

    A ViT (``embed``/``encode``) carries ``head.embedding_token`` as an extra token; patch tokens where
    ``token_mask [M, d h w]`` is True are replaced by ``head.mask_token`` plus their position embedding. Any other
    backbone gives its pooled ``forward(views) -> [M, width]``.
    """
    if head.embedding_token is None:
        return head(backbone(views))
    tokens = backbone.embed(views)  # [M, 1, d, h, w, width]
    count, grid, width = tokens.shape[0], tokens.shape[2:5], tokens.shape[-1]
    if token_mask is not None:
        masked = head.mask_token[0] + backbone.position_table(grid)  # [d h w, width]
        tokens = torch.where(token_mask.view(count, 1, *grid, 1), masked.to(tokens.dtype).view(1, 1, *grid, width),
                             tokens)
    _, extra = backbone.encode(tokens, extra=head.embedding_token.to(tokens.dtype).expand(count, -1, -1))
    return head(extra[:, 0])


class ContrastivePretext(nn.Module):
    """Contrastive embedding around a (shared) backbone: ``forward(batch) -> {"loss", "loss/...", "metric/..."}``.

    Args:
        backbone: a `ViTEncoder` (``embed``/``encode``: embedding token, token masking) or any module with
            ``forward(x) -> [M, embedding_dim]`` and ``embedding_dim`` (the Swin encoder: pooled features).
        num_views: V = 2 (global, augmented) or 3 (+ the token-masked copy of the global view; ViT only).
        input_size: the size every view is resampled to; None: the region size.
        augmentation: True (the defaults of `ViewAugmentation`), False (boxes only), a `ViewAugmentation` or a
            dict of its fields.
        token_mask_ratio: share of patch tokens of view 3 replaced by the mask token.
        embedding_dim: width of the embedding (the head's output).
        loss_form: ``"cosine"`` (the slides') or ``"infonce"``.
        margin: cosine form: negatives cost ``max(0, cos - margin)``.
        positive_weight, negative_weight: cosine form: weights of the two halves.
        temperature: InfoNCE temperature.
        teacher_momentum: None (no teacher, the slides') or the EMA momentum of a teacher copy of backbone + head.
        momentum_schedule, total_steps: the teacher's momentum schedule (see `EMATeacher`).
        generator: a CPU ``torch.Generator`` or an int seed for views and masks (None: torch's global RNG).

    Output: ``loss``, ``loss/positive`` and ``loss/negative`` (cosine) or ``loss/infonce``,
    ``metric/positive_cosine``, ``metric/negative_cosine``, ``metric/retrieval_top1``, the
    `voco.health.embedding_health` of the student's embeddings of all views (``health/...``) and
    ``teacher_momentum`` (with a teacher).
    """

    def __init__(self, backbone: nn.Module, num_views: int = 3, input_size: int | Sequence[int] | None = None,
                 augmentation: bool | ViewAugmentation | Mapping = True, token_mask_ratio: float = 0.5,
                 embedding_dim: int = 256, loss_form: str = "cosine", margin: float = 0.0,
                 positive_weight: float = 1.0, negative_weight: float = 1.0, temperature: float = 0.1,
                 teacher_momentum: float | None = None, momentum_schedule: str = "fixed",
                 total_steps: int | None = None, generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        require_choice("loss_form", loss_form, LOSS_FORMS)
        if num_views not in (2, 3):
            raise ConfigError(f"num_views is {num_views}; use 2 (global + augmented) or 3 (+ token-masked).")
        if temperature <= 0:
            raise ConfigError(f"temperature is {temperature}; use a positive value (e.g. 0.1).")
        uses_tokens = isinstance(backbone, TokenSequence)
        if num_views == 3 and not uses_tokens:
            raise ConfigError(f"the masked third view needs a ViT backbone with patch tokens, not "
                              f"{type(backbone).__name__}; set num_views=2.")
        if num_views == 3 and not 0.0 < token_mask_ratio < 1.0:
            raise ConfigError(f"token_mask_ratio is {token_mask_ratio}; use a share in (0, 1) for the masked view.")
        if isinstance(augmentation, Mapping):
            augmentation = ViewAugmentation(**{key: tuple(value) if isinstance(value, list) else value
                                               for key, value in augmentation.items()})
        elif augmentation is True:
            augmentation = ViewAugmentation()
        elif augmentation is False:  # views differ by their boxes only
            augmentation = ViewAugmentation(flip_probability=0.0, rotate_probability=0.0, intensity_scale_range=0.0,
                                            intensity_shift_range=0.0)
        elif not isinstance(augmentation, ViewAugmentation):
            raise ConfigError(f"augmentation is {augmentation!r}; use True, False, a ViewAugmentation or a dict of "
                              "its fields.")
        self.backbone = backbone
        self.num_views, self.augmentation = int(num_views), augmentation
        self.input_size = None if input_size is None else tuple(
            int(s) for s in ((input_size,) * 3 if isinstance(input_size, int) else input_size))
        if self.input_size is not None and uses_tokens:
            backbone.token_grid(self.input_size)  # a ConfigError now rather than at the first step
        self.token_mask_ratio, self.loss_form = float(token_mask_ratio), loss_form
        self.margin, self.temperature = float(margin), float(temperature)
        self.loss_weights = {"positive": float(positive_weight), "negative": float(negative_weight)}
        self.generator = as_generator(generator)
        self.head = EmbeddingHead(backbone.embedding_dim, embedding_dim, embedding_token=uses_tokens,
                                  mask_token=uses_tokens and num_views == 3)
        self.teacher = None
        if teacher_momentum is not None:
            self.teacher = EMATeacher.copy_of(self._student(), momentum=teacher_momentum, schedule=momentum_schedule,
                                              total_steps=total_steps)
            self.teacher.eval()

    def _student(self) -> nn.ModuleDict:
        """Backbone and head under the names the teacher copy has (a view: no parameters are copied)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def train(self, mode: bool = True) -> ContrastivePretext:
        """The teacher always runs in evaluation mode (no stochastic depth in the targets)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def make_views(self, images: torch.Tensor) -> ContrastiveViews:
        """The views of regions ``[B, C, X, Y, Z]`` (see `make_views`)."""
        input_size = self.input_size or tuple(images.shape[2:])
        token_grid = self.backbone.token_grid(input_size) if self.num_views == 3 else None
        return make_views(images, self.num_views, input_size, self.augmentation, token_grid, self.token_mask_ratio,
                          self.generator)

    def embed(self, views: ContrastiveViews) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student embeddings ``[B V, E]`` (float32) of all views in one backbone pass, and the teacher's (no
        gradient) or None."""
        images = views.views.flatten(0, 1)
        token_mask = None if views.token_mask is None else views.token_mask.flatten(0, 1)
        student = embed_views(self.backbone, self.head, images, token_mask).float()
        if self.teacher is None:
            return student, None
        with torch.no_grad():
            teacher = self.teacher.module
            return student, embed_views(teacher["backbone"], teacher["head"], images, token_mask).float()

    def forward(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"image": [B, C, X, Y, Z]}`` (or the tensor) -> scalar losses and metrics (tensors)."""
        images = regions(batch, "the contrastive pretext")
        ranks = world_size()
        if images.shape[0] * ranks < 2:
            raise ConfigError(f"the contrastive pretext needs at least 2 regions per step for negatives, got "
                              f"{images.shape[0] * ranks}; set the batch size to 2 or more.")
        student, teacher = self.embed(self.make_views(images))
        pairs = contrastive_pairs(student, self.num_views, teacher)
        if self.loss_form == "cosine":
            positive, negative = cosine_embedding_loss(pairs, self.margin)
            parts = {"positive": positive, "negative": negative}
            loss = sum(self.loss_weights[name] * value for name, value in parts.items())
        else:
            loss = info_nce_loss(pairs, self.temperature)
            parts = {"infonce": loss}
        output = {"loss": loss, **{f"loss/{name}": value.detach() for name, value in parts.items()},
                  **pair_metrics(pairs), **embedding_health(student)}
        if self.teacher is not None:
            output["teacher_momentum"] = torch.tensor(self.teacher.current_momentum(), device=loss.device)
        return output

    def after_step(self) -> None:
        """Move the teacher towards backbone and head (called by the engine after each optimizer step)."""
        if self.teacher is not None:
            self.teacher.update(self._student())

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        """The views of the first region of a batch and the batch's similarities (CPU tensors, for
        `save_views_picture`); runs in evaluation mode (restored afterwards).

        Keys: ``region_slice [X, Y]`` (middle z slice), ``boxes [V, 6]``, ``views [V, *input_size]`` (first
        channel), ``names`` (V strings), ``token_mask [d, h, w]`` (view 3) or None, ``patch_size``,
        ``similarity [B V, B V]`` (cosines of the batch's views; against the teacher's if there is one),
        ``views_per_region``.
        """
        images = regions(batch, "the contrastive pretext")
        with eval_mode(self):
            views = self.make_views(images)
            student, teacher = self.embed(views)
        targets = student if teacher is None else teacher
        similarity = F.normalize(student, dim=-1) @ F.normalize(targets, dim=-1).T
        augmented = "local" if bool(views.local[0]) else "global"
        flips = "".join(axis for axis, flip in zip("xyz", views.flips[0].tolist()) if flip)
        augmented += (f", flip {flips}" if flips else "") + (f", rot90 x{int(views.rotations[0])}"
                                                             if int(views.rotations[0]) else "")
        augmented += ", inverted" if bool(views.inverted[0]) else ""
        token_mask = None
        if views.token_mask is not None:
            token_mask = views.token_mask[0, 2].view(*self.backbone.token_grid(views.views.shape[3:])).cpu()
        return {
            "region_slice": images[0, 0, :, :, images.shape[-1] // 2].float().cpu(),
            "boxes": views.boxes[0].float().cpu(),
            "views": views.views[0, :, 0].float().cpu(),
            "names": ["global", f"augmented ({augmented})", "masked"][: self.num_views],
            "token_mask": token_mask,
            "patch_size": tuple(getattr(self.backbone, "patch_size", (1, 1, 1))),
            "similarity": similarity.cpu(),
            "views_per_region": self.num_views,
        }


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `ContrastivePretext.views`: the region with the view boxes, each view (masked patches of
    view 3 in blue), and the batch's cosine-similarity matrix (positive pairs are the V x V diagonal blocks).

    Middle z slices throughout; matplotlib is imported lazily. The file appears complete or not at all.
    """
    import matplotlib
    from matplotlib.patches import Rectangle

    region, boxes, images = views["region_slice"], views["boxes"], views["views"]
    num_views = images.shape[0]
    figure, axes = new_figure(2.2 * (num_views + 2), 2.8, 1, num_views + 2)
    colours = ["tab:red", "tab:orange", "tab:green"]

    show_axial(axes[0, 0], region, letters=True, cmap="gray")
    for v, box in enumerate(boxes[:2]):  # view 3 shares view 1's box
        x0, y0, _, x1, y1, _ = box.tolist()
        axes[0, 0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colours[v],
                                       linewidth=1.8))
    axes[0, 0].set_title("region", fontsize=8)

    masked_colour_map = matplotlib.colormaps["gray"].with_extremes(bad="tab:blue")
    for v in range(num_views):
        image = images[v, :, :, images.shape[-1] // 2].clone()
        if v == 2 and views["token_mask"] is not None:
            patch = views["patch_size"]
            slab = views["token_mask"][:, :, (images.shape[-1] // 2) // patch[2]]  # [d, h]
            covered = slab.repeat_interleave(patch[0], dim=0).repeat_interleave(patch[1], dim=1)
            image[covered] = float("nan")
        show_axial(axes[0, 1 + v], image, cmap=masked_colour_map)
        axes[0, 1 + v].set_title(views["names"][v], fontsize=7, color=colours[v])

    similarity_axis = axes[0, num_views + 1]
    similarity_axis.imshow(views["similarity"], cmap="viridis", vmin=-1, vmax=1)
    similarity_axis.set_title(f"cosine, batch ({views['views_per_region']} views/region)", fontsize=7)
    return save_figure(figure, path)
