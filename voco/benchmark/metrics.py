"""Downstream metrics: Dice per class (segmentation, registration labels), AUC and accuracy, Jacobian folding.

    segmentation_metrics(logits, label, num_classes=14)      # {"dice": 0.82, "dice/spleen": 0.91, ...}
    classification_metrics(logits, label)                     # {"auc": 0.93, "accuracy": 0.88}
    registration_metrics(ddf, moving_label, fixed_label, 36)  # Dice of the warped labels + folding fraction

Dice follows the VoCo/SwinUNETR reference: MONAI ``DiceMetric(include_background=False)``, a class absent from the
ground truth of a volume giving NaN that is left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import DiceMetric, compute_roc_auc
from monai.metrics.utils import do_metric_reduction
from monai.networks import one_hot
from monai.networks.blocks import Warp

from voco.errors import ConfigError

__all__ = [
    "classification_metrics",
    "jacobian_determinant",
    "non_positive_jacobian_fraction",
    "registration_metrics",
    "segmentation_metrics",
]


def segmentation_metrics(prediction: torch.Tensor, label: torch.Tensor, num_classes: int,
                         class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Dice per foreground class and their mean, as MONAI ``DiceMetric(include_background=False)`` computes them.

    Args:
        prediction: logits or probabilities ``[N, num_classes, ...]`` (the argmax is taken), or a label map
            ``[N, 1, ...]`` of class indices.
        label: the ground-truth label map ``[N, 1, ...]``.
        num_classes: label values 0 .. num_classes - 1, background included (a segmentation task's
            ``out_channels``).
        class_names: names of the foreground classes 1 .. num_classes - 1 for the keys; ``class_<i>`` otherwise.

    Returns:
        ``{"dice": mean, "dice/<class>": ...}``: the mean over volumes of each volume's mean over the classes its
        ground truth holds (MONAI's ``MetricReduction.MEAN``, as the reference); a class's value is its mean over
        the volumes that hold it, NaN where none does.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must count the background too (at least 2); pass the "
                          "task's out_channels.")
    names = list(class_names) if class_names is not None else [f"class_{index}" for index in range(1, num_classes)]
    if len(names) != num_classes - 1:
        raise ConfigError(f"{len(names)} class names were given for {num_classes - 1} foreground classes; "
                          "pass one name per foreground class.")
    if prediction.shape[1] == num_classes and prediction.is_floating_point():
        prediction = prediction.argmax(dim=1, keepdim=True)
    dice = DiceMetric(include_background=False, reduction="none")
    per_volume = dice(one_hot(prediction, num_classes), one_hot(label, num_classes))  # [N, num_classes - 1]
    present = ~torch.isnan(per_volume)
    # clone(): do_metric_reduction overwrites the NaNs of its input.
    mean, _ = do_metric_reduction(per_volume.clone(), "mean")
    per_class, _ = do_metric_reduction(per_volume.clone(), "mean_batch")
    # do_metric_reduction gives 0 where no value counted; NaN says "absent from every ground truth" instead.
    per_class = torch.where(present.any(dim=0), per_class, torch.nan)
    mean = mean if present.any() else torch.tensor(torch.nan)
    return {"dice": float(mean), **{f"dice/{name}": float(value) for name, value in zip(names, per_class)}}


def classification_metrics(logits: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Area under the ROC curve (MONAI ``compute_roc_auc``, macro over classes) and accuracy.

    Args:
        logits: ``[N, 1]`` (or ``[N]``) for a binary task with one sigmoid output, ``[N, K]`` for K classes.
        label: class indices ``[N]`` (or ``[N, 1]``): 0 / 1 for binary.

    Returns:
        ``{"auc": ..., "accuracy": ...}``; the AUC is NaN when the labels hold one class only.
    """
    label = label.reshape(-1)
    if logits.ndim == 1 or logits.shape[1] == 1:
        probability = torch.sigmoid(logits.reshape(-1).float())
        auc = compute_roc_auc(probability, label)
        predicted = (probability >= 0.5).long()
    else:
        probability = torch.softmax(logits.float(), dim=1)
        auc = compute_roc_auc(probability, one_hot(label[:, None].long(), logits.shape[1], dim=1))
        predicted = probability.argmax(dim=1)
    accuracy = (predicted == label.long()).float().mean()
    return {"auc": float(auc), "accuracy": float(accuracy)}


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the transform ``x -> x + ddf(x)``, per voxel.

    Written here because MONAI has no Jacobian determinant of a field. Derivatives are finite differences in
    voxel units (central inside, one-sided at the border: ``numpy.gradient``, as the VoxelMorph/TransMorph
    evaluation), so a field that is affine in the voxel coordinates gives its exact determinant everywhere.

    Args:
        ddf: displacement field ``[N, 3, X, Y, Z]`` (or ``[3, X, Y, Z]``) in voxels, channel i along spatial axis i.

    Returns:
        ``[N, X, Y, Z]`` (or ``[X, Y, Z]``): 1 where the transform keeps volume, <= 0 where it folds.
    """
    batched = ddf.ndim == 5
    ddf = ddf if batched else ddf[None]
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ConfigError(f"a displacement field must be [N, 3, X, Y, Z] or [3, X, Y, Z], got {tuple(ddf.shape)}; "
                          "pass the network's ddf output.")
    derivatives = torch.gradient(ddf.float(), dim=(2, 3, 4))  # derivatives[j][:, i] = d ddf_i / d x_j
    jacobian = torch.stack(derivatives, dim=2)  # [N, i, j, X, Y, Z]
    jacobian = jacobian + torch.eye(3, device=ddf.device).reshape(1, 3, 3, 1, 1, 1)
    determinant = torch.linalg.det(jacobian.permute(0, 3, 4, 5, 1, 2))
    return determinant if batched else determinant[0]


def non_positive_jacobian_fraction(ddf: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels where the transform folds (Jacobian determinant <= 0): ``[N]``, or a scalar for one field.

    Multiply by 100 for the "% of voxels with non-positive Jacobian determinant" of the IXI reference.
    """
    determinant = jacobian_determinant(ddf)
    folded = (determinant <= 0).float()
    return folded.flatten(start_dim=1).mean(dim=1) if ddf.ndim == 5 else folded.mean()


def registration_metrics(ddf: torch.Tensor, moving_label: torch.Tensor, fixed_label: torch.Tensor,
                         num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Dice of the moving labels warped by ``ddf`` (nearest neighbour) against the fixed labels, and folding.

    Args:
        ddf: ``[N, 3, X, Y, Z]`` in voxels, as :class:`voco.benchmark.networks.RegistrationNetwork` predicts it.
        moving_label, fixed_label: label maps ``[N, 1, X, Y, Z]``.
        num_classes: label values 0 .. num_classes - 1, background included (anatomical labels + 1).
        class_names: names of the anatomical labels 1 .. num_classes - 1.

    Returns:
        :func:`segmentation_metrics` of the warped labels plus ``"non_positive_jacobian"``: the fraction of voxels
        that fold, averaged over the batch.
    """
    warped_label = Warp(mode="nearest", padding_mode="zeros")(moving_label.float(), ddf)
    metrics = segmentation_metrics(warped_label, fixed_label, num_classes, class_names)
    metrics["non_positive_jacobian"] = float(non_positive_jacobian_fraction(ddf).mean())
    return metrics
