"""VoCo (Volume Contrast): learn where a sub-volume lies by contrasting it with the base crops of its volume.

Wu, Zhuang and Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical
Image Analysis" (CVPR 2024) and its large-scale follow-up (PreCT-160K, called V2 here). The facts this
file follows, with worked examples, are in specs/voco.md.

One step, for a batch of B regions ``[B, 1, X, Y, Z]`` already on the device:

1. **Crops.** Each region is cut into a grid of K *base crops* (V2: 3 x 3 of 64^3 over 192 x 192 x 64,
   full depth) and S *random crops* of the same size (S = 2). The *position label* of a random crop is
   the fraction of it inside each base crop (`voco.geometry.position_labels`): at most four non-zero,
   summing to 1. Every crop gets its own flips, x-y rot90 and intensity shift (its probability, like how V1
   resizes its crops, comes with the layout); all crops of the batch are cut in one gather on the device (no
   per-crop transform chain).
2. **Embeddings.** The shared backbone embeds all B(K + S) crops in one pass. A *student* projector sees
   the embeddings through ``Dropout1d(0.2)`` (which drops whole crops); a *teacher* projector, initialised
   independently, is moved towards the student by EMA (m = 0.9) and then applied to the clean
   embeddings without gradients.
3. **Losses.** s(a, b) = ReLU(cos(a, b)) compares a random crop with each base crop:
   - *intra*: the student's random crops against the teacher's base crops of the same volume must
     reproduce the position labels (`position_loss`);
   - *inter*: against the base crops of another volume (i + 1 mod B), the student's similarities must
     match the teacher's. ``inter_volume="global"`` takes volume i + 1 of the *global* batch of all DDP ranks
     (its base crops gathered, the student's with their gradient), so the loss of W ranks of b volumes is that
     of one process with W b volumes, given the same projections (the projectors' batch norms still see each
     rank's crops only); ``"batch"`` (the reference) pairs within each rank's batch;
   - *regularization*: the student's base crops of one volume must be dissimilar (`regularization_loss`).
   loss = intra + inter + regularization. ``loss_form="v1"`` uses the CVPR loss instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from monai.networks.utils import eval_mode

from voco.distributed import world_size
from voco.errors import ConfigError, require_choice
from voco.geometry import (CROP_SAMPLING_MODES, CropLayout, crop_boxes, get_layout, position_labels,
                           sample_random_boxes)
from voco.health import embedding_health
from voco.networks.heads import VoCoProjector
from voco.networks.teacher import EMATeacher
from voco.pretext.views import as_generator, gather_with_gradient, new_figure, regions, save_figure, show_axial

LOSS_FORMS = ("v2", "v1")
INTER_VOLUME_MODES = ("batch", "global")


# --------------------------------------------------------------------------------------------------
# Crops and their position labels
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropAugmentation:
    """Per-crop augmentation of the reference (V2 values; `reference_augmentation` gives a layout's own)."""

    flip_probability: float = 0.2  # for each of the three axes
    rotate_probability: float = 0.2  # rot90 in the x-y plane, k uniform in 1..3
    shift_probability: float = 0.5  # add an offset drawn from U(-shift_range, shift_range)
    shift_range: float = 0.1


def reference_augmentation(layout: str | CropLayout) -> CropAugmentation:
    """The reference's per-crop augmentation for a layout: flips and rotations as in V2, the intensity shift with
    the layout's probability (V2: 0.5, V1: 0.1)."""
    return CropAugmentation(shift_probability=get_layout(layout).shift_probability)


def crop_augmentation(augmentation: bool | CropAugmentation | Mapping | None,
                      layout: str | CropLayout) -> CropAugmentation | None:
    """An augmentation setting as a `CropAugmentation`: True = the layout's reference one, False or None = none,
    a dict = its fields."""
    if augmentation is True:
        return reference_augmentation(layout)
    if isinstance(augmentation, Mapping):
        return CropAugmentation(**augmentation)
    return augmentation or None


@dataclass
class VoCoCrops:
    """The inputs of one VoCo step.

    Attributes:
        crops: ``[B, K + S, C, *input_size]``: the K base crops of each region, then its S random crops.
        base_boxes: ``[K, 6]`` boxes of the base crops in region voxels (the same for every region).
        random_boxes: ``[B, S, 6]`` boxes of the random crops.
        labels: ``[B, S, K]`` position labels: the fraction of each random crop inside each base crop.
    """

    crops: torch.Tensor
    base_boxes: torch.Tensor
    random_boxes: torch.Tensor
    labels: torch.Tensor


def sample_augmentation(augmentation: CropAugmentation, batch_size: int, num_crops: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw each crop's flips ``[B, N, 3]`` (bool), rot90 k ``[B, N]`` (0 = none) and intensity shift ``[B, N]``."""
    shape = (batch_size, num_crops)
    flips = torch.rand(*shape, 3, generator=generator) < augmentation.flip_probability
    rotate = torch.rand(shape, generator=generator) < augmentation.rotate_probability
    rotations = torch.where(rotate, torch.randint(1, 4, shape, generator=generator), 0)
    shift = torch.rand(shape, generator=generator) < augmentation.shift_probability
    offsets = (torch.rand(shape, generator=generator) * 2 - 1) * augmentation.shift_range
    return flips, rotations, torch.where(shift, offsets, 0.0)


def make_crops(images: torch.Tensor, layout: CropLayout, random_crops_per_volume: int = 2,
               crop_sampling: str = "uniform", augmentation: bool | CropAugmentation | Mapping | None = True,
               generator: torch.Generator | None = None) -> VoCoCrops:
    """Cut the base and random crops of a batch of regions ``[B, C, *layout.region_size]`` on their device.

    ``augmentation``: see `crop_augmentation` (True: the layout's reference augmentation). Boxes and augmentation
    parameters are drawn from ``generator`` (CPU; None = torch's global one), so that crops and labels are
    reproducible. Labels describe the boxes; flips and rotations change how a crop is oriented, not which voxels
    it holds. Crops are resized (trilinear, with the layout's ``align_corners``) when the layout says so (V1).
    """
    augmentation = crop_augmentation(augmentation, layout)
    batch_size, channels = images.shape[:2]
    num_base, num_random = layout.num_base_crops, random_crops_per_volume
    # Boxes, labels and augmentation parameters are a few numbers: drawn on the CPU, then moved once.
    base_boxes = layout.base_boxes()
    random_boxes = sample_random_boxes(layout, num_random, batch_size, crop_sampling, generator)
    labels = position_labels(random_boxes, base_boxes)
    boxes = torch.cat([base_boxes.expand(batch_size, num_base, -1), random_boxes], dim=1)
    flips = rotations = offsets = None
    if augmentation is not None:
        flips, rotations, offsets = sample_augmentation(augmentation, batch_size, num_base + num_random, generator)
    # the intensity shift goes with the cut unless the crops are resized first
    crops = crop_boxes(images, boxes, flips, rotations, None if layout.needs_resize else offsets)  # [B, N, C, ...]
    if layout.needs_resize:
        crops = F.interpolate(crops.flatten(0, 1), size=layout.input_size, mode="trilinear",
                              align_corners=layout.align_corners)
        crops = crops.view(batch_size, num_base + num_random, channels, *layout.input_size)
        if offsets is not None:
            crops.add_(offsets.to(crops)[..., None, None, None, None])  # in place: crops is a fresh tensor
    device = images.device
    return VoCoCrops(crops, base_boxes.to(device), random_boxes.to(device), labels.to(device))


# --------------------------------------------------------------------------------------------------
# Similarity and losses (exactly the reference's; test vectors in specs/voco.md section 4)
# --------------------------------------------------------------------------------------------------
def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) of every row of ``a [..., S, P]`` with every row of ``b [..., K, P]`` -> ``[..., S, K]``.

    In float32 (or float64) whatever the autocast state, as the reference's ``cosine_similarity``: in bf16, cosines
    above ~0.998 round to 1, where ``log(1 - p)`` of the position loss is largest (near collapse)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        return F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).transpose(-1, -2)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s(a, b) = ReLU(cos(a, b)) of every row of ``a [..., S, P]`` with every row of ``b [..., K, P]``.

    Returns ``[..., S, K]`` (float32 at least, see `cosines`); no temperature, no softmax. A single vector ``a [P]``
    gives ``[K]``.
    """
    return F.relu(cosines(a, b))


def position_loss(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """VoCo's CE between position labels y and predicted similarities p (V2), one value per volume.

        CE = sum[-y * log(1 - |y - p| + 1e-6)] / (sum y + 1e-6)
           + sum[-1(y = 0) * log(1 - p + 1e-6)] / (#(y = 0) + 1e-6)

    Sums run over all S x K entries of a volume: ``[..., S, K] -> [...]`` (a 1-D input gives a scalar).
    """
    dims = tuple(range(max(labels.ndim - 2, 0), labels.ndim))
    positive = -(labels * torch.log(1 - (labels - predictions).abs() + 1e-6)).sum(dims) / (labels.sum(dims) + 1e-6)
    negatives = (labels == 0).to(predictions.dtype)
    negative = -(negatives * torch.log(1 - predictions + 1e-6)).sum(dims) / (negatives.sum(dims) + 1e-6)
    return positive + negative


def position_loss_v1(labels: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CVPR (V1) form of `position_loss`: (positive, negative) per volume; the negative term is
    sum[1(y = 0) * p^2] / #(y = 0)."""
    dims = tuple(range(max(labels.ndim - 2, 0), labels.ndim))
    positive = -(labels * torch.log(1 - (labels - predictions).abs() + 1e-6)).sum(dims) / (labels.sum(dims) + 1e-6)
    negatives = (labels == 0).to(predictions.dtype)
    negative = (negatives * predictions ** 2).sum(dims) / (negatives.sum(dims) + 1e-6)
    return positive, negative


def regularization_loss(bases: torch.Tensor) -> torch.Tensor:
    """REG(q) = 2 / (K(K-1)) * sum_{i<j} ReLU(cos(q_i, stopgrad(q_j)))^2 over the K base crops of a volume.

    ``[..., K, P] -> [...]``."""
    num_bases = bases.shape[-2]
    pairs = torch.triu(torch.ones(num_bases, num_bases, dtype=torch.bool, device=bases.device), diagonal=1)
    return F.relu(cosines(bases, bases.detach())[..., pairs]).pow(2).mean(dim=-1)


def next_volume_bases(bases: torch.Tensor, inter_volume: str = "batch") -> torch.Tensor:
    """The base crops ``[B, K, P]`` of the volume each volume meets in the inter-volume term: volume i + 1 (mod B)
    of this process's batch (``"batch"``), or of the global batch of all ranks in rank order (``"global"``).

    "global" gathers every rank's ``bases`` with `gather_with_gradient` (a student's gradient flows back to the
    rank that owns the row; a teacher's bases carry none, so theirs is a plain gather). Outside
    ``torch.distributed`` both are the same. All ranks must hold the same B (``drop_last=True``)."""
    if inter_volume == "global" and world_size() > 1:
        count = bases.shape[0]
        every_rank = gather_with_gradient(bases)  # [world_size * B, K, P]
        rows = (torch.arange(count, device=bases.device) + dist.get_rank() * count + 1) % every_rank.shape[0]
        return every_rank[rows]
    return bases.roll(-1, dims=0)


def voco_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, num_base: int,
                loss_form: str = "v2", inter_volume: str = "batch") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """VoCo's loss parts of one batch from its projections -> (``{"intra", "inter", "regularization"}`` means over
    the batch's volumes, the predictions ``[B, S, K]``).

    Args:
        student, teacher: ``[B, K + S, P]`` projections of the base crops, then the random crops (teacher: no grad).
        labels: ``[B, S, K]`` position labels.
        num_base: K.
    """
    student_bases, student_randoms = student[:, :num_base], student[:, num_base:]  # [B, K, P], [B, S, P]
    teacher_bases, teacher_randoms = teacher[:, :num_base], teacher[:, num_base:]
    if loss_form == "v2":
        predictions = similarity(student_randoms, teacher_bases)  # [B, S, K]
        intra = position_loss(labels, predictions)
        # Volume i meets the base crops of volume i + 1; the teacher's similarities are the target.
        inter = position_loss(similarity(teacher_randoms, next_volume_bases(teacher_bases, inter_volume)),
                              similarity(student_randoms, next_volume_bases(student_bases, inter_volume)))
    else:  # V1: symmetric prediction, squared negatives, no inter-volume term
        predictions = 0.5 * (similarity(student_randoms, teacher_bases) + similarity(teacher_randoms, student_bases))
        positive, negative = position_loss_v1(labels, predictions)
        intra, inter = positive + negative, torch.zeros_like(positive)
    regularization = regularization_loss(student_bases)
    return {"intra": intra.mean(), "inter": inter.mean(), "regularization": regularization.mean()}, predictions


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class VoCoPretext(nn.Module):
    """VoCo around a backbone: ``forward(batch) -> {"loss", "loss/intra", "loss/inter", ...}``.

    Output: ``loss``, ``loss/intra``, ``loss/inter``, ``loss/regularization``, ``metric/position_mae``,
    ``metric/position_top1``, ``teacher_momentum`` and the `voco.health.embedding_health` of the teacher's
    projections (``health/embedding_std``, ``health/top_component_share``, ``health/collapsed``).

    Args:
        backbone: maps crops ``[N, C, *input_size] -> [N, embedding_dim]`` and has ``embedding_dim``
            (e.g. ``build_backbone("swin", "B")``).
        layout: a `CropLayout` or its name ("v2", "v1", "tiny").
        random_crops_per_volume: S (reference: 2).
        crop_sampling: "uniform" (ours: random crops reach every edge) or "reference" (centres in
            [r/2, X - r/2)); see `voco.geometry.sample_random_boxes`.
        augmentation: per-crop augmentation: True (the reference's for the layout: V2's, or V1's rarer intensity
            shift), False, a `CropAugmentation` or a dict of its fields.
        projector_hidden_dim, projector_out_dim: projector widths (V2: 1024, 1024).
        student_dropout: p of the ``Dropout1d`` before the student projector (0.2); active in training only
            (the reference also applies it in evaluation).
        teacher_momentum: EMA momentum of the teacher projector (0.9).
        momentum_schedule: "fixed" (reference) or "cosine" (towards 1 over ``total_steps`` updates).
        total_steps: number of training steps (for the cosine schedule).
        loss_form: "v2" (intra + inter + regularization) or "v1" (CVPR: symmetric prediction, p^2 negatives,
            no inter-volume term; only the loss changes, the network stays V2's).
        intra_weight, inter_weight, regularization_weight: loss weights (1 : 1 : 1).
        inter_volume: whose base crops volume i meets in the inter-volume term: "batch" (volume i + 1 of this
            rank's batch, the reference) or "global" (of the global batch of all DDP ranks; see
            `next_volume_bases`).
        generator: a CPU ``torch.Generator`` or an int seed for crops and augmentation (None: global RNG).
    """

    def __init__(self, backbone: nn.Module, layout: str | CropLayout = "v2", random_crops_per_volume: int = 2,
                 crop_sampling: str = "uniform", augmentation: bool | CropAugmentation | Mapping = True,
                 projector_hidden_dim: int = 1024, projector_out_dim: int = 1024, student_dropout: float = 0.2,
                 teacher_momentum: float = 0.9, momentum_schedule: str = "fixed", total_steps: int | None = None,
                 loss_form: str = "v2", intra_weight: float = 1.0, inter_weight: float = 1.0,
                 regularization_weight: float = 1.0, generator: torch.Generator | int | None = None,
                 inter_volume: str = "batch") -> None:
        super().__init__()
        require_choice("crop_sampling", crop_sampling, CROP_SAMPLING_MODES)
        require_choice("loss_form", loss_form, LOSS_FORMS)
        require_choice("inter_volume", inter_volume, INTER_VOLUME_MODES)
        if random_crops_per_volume < 1:
            raise ConfigError(f"random_crops_per_volume is {random_crops_per_volume}; use 1 or more (reference: 2).")
        self.backbone = backbone
        self.layout = get_layout(layout)
        self.random_crops_per_volume = int(random_crops_per_volume)
        self.crop_sampling, self.loss_form, self.inter_volume = crop_sampling, loss_form, inter_volume
        self.augmentation = crop_augmentation(augmentation, self.layout)
        self.loss_weights = {"intra": intra_weight, "inter": inter_weight, "regularization": regularization_weight}
        self.generator = as_generator(generator)

        embedding_dim = backbone.embedding_dim
        self.student_dropout = nn.Dropout1d(student_dropout)  # on [N, D] it drops whole crops' embeddings
        self.student_projector = VoCoProjector(embedding_dim, projector_hidden_dim, projector_out_dim)
        # The teacher projector starts from its own random initialisation, not from a copy of the student.
        self.teacher_projector = EMATeacher(VoCoProjector(embedding_dim, projector_hidden_dim, projector_out_dim),
                                            momentum=teacher_momentum, schedule=momentum_schedule,
                                            total_steps=total_steps)

    def make_crops(self, images: torch.Tensor) -> VoCoCrops:
        """Base and random crops of regions ``[B, C, *layout.region_size]`` with their labels (see `make_crops`)."""
        if tuple(images.shape[2:]) != self.layout.region_size:
            raise ConfigError(f"VoCo got regions of shape {tuple(images.shape[2:])} but its crop layout needs "
                              f"{self.layout.region_size}; set the data pipeline's region size to the layout's.")
        return make_crops(images, self.layout, self.random_crops_per_volume, self.crop_sampling, self.augmentation,
                          self.generator)

    def project(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Embed crops ``[B, N, C, ...]`` in one backbone pass -> student and teacher projections ``[B, N, P]``
        (float32, so that the losses' logs are exact under autocast) and the teacher momentum.

        In training the teacher projector is first moved towards the student by EMA, as in the reference."""
        batch_size, num_crops = crops.shape[:2]
        embeddings = self.backbone(crops.flatten(0, 1))  # [B * N, D]: batch norms of the projectors see all crops
        student = self.student_projector(self.student_dropout(embeddings))
        if self.training:
            momentum = self.teacher_projector.update(self.student_projector)
        else:
            momentum = self.teacher_projector.current_momentum()
        with torch.no_grad():
            teacher = self.teacher_projector(embeddings)
        return (student.float().view(batch_size, num_crops, -1), teacher.float().view(batch_size, num_crops, -1),
                momentum)

    def forward(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"image": [B, C, X, Y, Z]}`` (or the tensor), B >= 2 -> scalar losses and metrics (tensors)."""
        images = regions(batch, "VoCo")
        ranks = world_size() if self.inter_volume == "global" else 1
        if images.shape[0] * ranks < 2:
            raise ConfigError(f"VoCo needs at least 2 regions per batch for its inter-volume term, got "
                              f"{images.shape[0]}; set the batch size to 2 or more (and drop_last=True).")
        views = self.make_crops(images)
        student, teacher, momentum = self.project(views.crops)
        labels = views.labels.float()  # [B, S, K]
        parts, predictions = voco_losses(student, teacher, labels, self.layout.num_base_crops, self.loss_form,
                                         self.inter_volume)
        loss = sum(self.loss_weights[name] * value for name, value in parts.items())
        predictions = predictions.detach()
        return {
            "loss": loss,
            **{f"loss/{name}": value.detach() for name, value in parts.items()},
            "metric/position_mae": (predictions - labels).abs().mean(),
            "metric/position_top1": (predictions.argmax(-1) == labels.argmax(-1)).float().mean(),
            "teacher_momentum": torch.tensor(momentum, device=loss.device),
            # the teacher's projections of all B (K + S) crops: clean (dropout maps every dropped crop to one vector)
            **embedding_health(teacher),
        }

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
        """What VoCo sees and predicts for the first region of a batch (CPU tensors, for `save_views_picture`).

        Runs without dropout and without a teacher update (the module's mode is restored afterwards).
        Keys: ``region_slice [X, Y]`` (middle z slice), ``base_boxes [K, 6]``, ``random_boxes [S, 6]``,
        ``base_crops [K, *input_size]``, ``random_crops [S, *input_size]`` (first channel, as fed to the
        network), ``labels [S, K]``, ``predictions [S, K]`` (s(student random crop, teacher base crop)), ``grid``.
        """
        images = regions(batch, "VoCo")
        with eval_mode(self):
            views = self.make_crops(images)
            student, teacher, _ = self.project(views.crops)
        num_base = self.layout.num_base_crops
        predictions = similarity(student[0, num_base:], teacher[0, :num_base])
        return {
            "region_slice": images[0, 0, :, :, images.shape[-1] // 2].float().cpu(),
            "base_boxes": views.base_boxes.cpu(),
            "random_boxes": views.random_boxes[0].cpu(),
            "base_crops": views.crops[0, :num_base, 0].float().cpu(),
            "random_crops": views.crops[0, num_base:, 0].float().cpu(),
            "labels": views.labels[0].float().cpu(),
            "predictions": predictions.cpu(),
            "grid": self.layout.grid,
        }


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `VoCoPretext.views`: the region with its base grid and random crops, each random crop
    with its true and predicted position labels as heatmaps over the grid, and every base crop.

    Middle z slices throughout; matplotlib is imported lazily. The file appears complete or not at all.
    """
    from matplotlib.patches import Rectangle

    base_crops, random_crops = views["base_crops"], views["random_crops"]
    labels, predictions = views["labels"], views["predictions"]
    num_base, num_random = base_crops.shape[0], random_crops.shape[0]
    grid_rows = views["grid"][0]
    columns = max(num_base, 1 + 3 * num_random)
    figure, axes = new_figure(1.7 * columns, 3.8, 2, columns)

    def middle_slice(crop: torch.Tensor) -> torch.Tensor:
        return crop[..., crop.shape[-1] // 2]

    # Region slice (radiological convention) with the base grid in white and the random crops in colour.
    region_axis = axes[0, 0]
    show_axial(region_axis, views["region_slice"], letters=True, cmap="gray")
    colours = ["tab:red", "tab:orange", "tab:green", "tab:cyan", "tab:purple", "tab:pink"]
    for box, colour in [(b, "white") for b in views["base_boxes"]] + [
            (b, colours[s % len(colours)]) for s, b in enumerate(views["random_boxes"])]:
        x0, y0, _, x1, y1, _ = box.tolist()
        region_axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                        linewidth=1.0 if colour == "white" else 1.8))
    region_axis.set_title("region", fontsize=8)

    for s in range(num_random):
        colour = colours[s % len(colours)]
        crop_axis, label_axis, prediction_axis = axes[0, 1 + 3 * s], axes[0, 2 + 3 * s], axes[0, 3 + 3 * s]
        show_axial(crop_axis, middle_slice(random_crops[s]), cmap="gray")
        crop_axis.set_title(f"random crop {s}", fontsize=8, color=colour)
        for axis, values, name in [(label_axis, labels[s], "label"), (prediction_axis, predictions[s], "predicted")]:
            heatmap = values.reshape(grid_rows, -1)
            axis.imshow(heatmap, cmap="viridis", vmin=0, vmax=1)
            for (i, j), value in zip(torch.cartesian_prod(*[torch.arange(n) for n in heatmap.shape]).tolist(),
                                     heatmap.flatten().tolist()):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="black" if value > 0.5 else "white")
            axis.set_title(f"{name} {s}", fontsize=8)
    for k in range(num_base):
        show_axial(axes[1, k], middle_slice(base_crops[k]), cmap="gray")
        axes[1, k].set_title(f"base {k}", fontsize=8)

    return save_figure(figure, path)
