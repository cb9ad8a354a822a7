"""Per-task networks, their losses, and initialisation from a pretrained encoder.

    network = build_task_network(task, size="B")                      # SwinUNETR-v2, classifier or registration
    report = initialize_from_pretrained(network, "VoCo_B_SSL_head.pt", mode="finetune")
    loss_function = task_loss(task)

- segmentation: MONAI ``SwinUNETR(use_v2=True)`` (the VoCo downstream network) or, with ``backbone="vit"``,
  MONAI ``UNETR`` whose ViT is our :class:`voco.networks.vit.UNETRViT` (MONAI's parameter names, so a ViT
  pretrained here loads by name, with the pretraining's attention layout kept), or, with ``backbone="resenc"``,
  nnU-Net's ``ResidualEncoderUNet`` (dynamic-network-architectures, deep supervision off, nnU-Net's He
  initialisation), whose ``encoder.*`` tensors are those of our ``ResEncEncoder``;
- classification: :class:`EncoderClassifier`, the VoCo ``SwinEncoder`` with its pooled ``24 C`` embedding (or a
  ``ViTEncoder``'s mean token, or a ``ResEncEncoder``'s pooled deepest map) and a linear head;
- registration: :class:`RegistrationNetwork`, a ``SwinUNETR`` predicting a displacement field from the moving and
  fixed images, and MONAI's ``Warp``.

The pretrained weights go into :func:`encoder_of` the network, through :func:`voco.checkpoints.load_encoder_weights`,
so every format it recognises works (official ``VoCo_*_SSL_head.pt``, ``VoComni_*``, MONAI ``model_swinvit.pt``,
our training checkpoints and exports). A whole-SwinUNETR checkpoint (``VoComni_*``) also fills :func:`decoder_of` a
SwinUNETR with its decoder tensors that fit (``load_decoder``), as the reference loader does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import (BendingEnergyLoss, DiceCELoss, DiceLoss, DiffusionLoss,
                          LocalNormalizedCrossCorrelationLoss)
from monai.networks import one_hot
from monai.networks.blocks import Warp
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from voco.benchmark.registry import Task
from voco.checkpoints import LoadReport, load_encoder_weights
from voco.errors import ConfigError
from voco.networks import build_backbone, swin_feature_size
from voco.networks.resenc import RESENC_CLASS, ResEncEncoder
from voco.networks.swin import ENCODER_BLOCKS, SwinEncoder
from voco.networks.vit import UNETRViT, ViTEncoder, vit_spec

__all__ = [
    "INITIALIZATION_MODES",
    "EncoderClassifier",
    "RegistrationLoss",
    "RegistrationNetwork",
    "build_task_network",
    "decoder_of",
    "encoder_of",
    "initialize_from_pretrained",
    "task_loss",
]

INITIALIZATION_MODES = ("finetune", "frozen", "linear_probe", "scratch")
TASK_BACKBONES = {"segmentation": ("swin", "vit", "resenc"), "classification": ("swin", "vit", "resenc"),
                  "registration": ("swin",)}
# UNETR decoder width per ViT size ("B": the ViT-B/16 UNETR of the paper; "tiny" is for tests). UNETR needs 12 blocks
# and patch 16.
UNETR_FEATURE_SIZES = {"tiny": 12, "s": 16, "b": 16}
VIT_PATCH = 16
SWIN_DIVISOR = 32  # the input sizes the Swin network needs to be divisible by (the ViT: VIT_PATCH; the ResEnc: its
# total stride)
# Settings of a pretrained backbone that are fine-tuning's own choice rather than the encoder's (build_task_network's
# dropout is the fine-tuning's regularisation).
FINE_TUNING_OWN = ("drop_path_rate",)
SWIN_DECODER_BLOCKS = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out")  # MONAI SwinUNETR's
SIMILARITIES = ("lncc", "mse")
REGULARIZATIONS = ("bending", "diffusion")


class EncoderClassifier(nn.Module):
    """A pretrained encoder's pooled embedding, dropout and one linear layer: ``[N, C, X, Y, Z] -> [N, num_outputs]``.

    Args:
        encoder: a backbone whose ``forward`` returns a pooled embedding ``[N, embedding_dim]`` (``SwinEncoder``:
            ``24 C``).
        num_outputs: logits: 1 for a binary task with a sigmoid, else the number of classes.
        dropout: dropout rate on the embedding.

    >>> from voco.networks import SwinEncoder
    >>> EncoderClassifier(SwinEncoder(feature_size=12), 3)(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 3])
    """

    def __init__(self, encoder: nn.Module, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.embedding_dim, num_outputs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(image)))


class RegistrationNetwork(nn.Module):
    """Deformable registration: a SwinUNETR-v2 predicts a dense displacement field (DDF) that warps the moving image.

    Input ``[N, 2 m, X, Y, Z]``: the moving image's m channels, then the fixed image's. Output ``(warped, ddf)``:
    the moving image resampled by the field ``[N, m, X, Y, Z]`` and the field ``[N, 3, X, Y, Z]`` in voxels (channel
    i moves along spatial axis i, MONAI ``Warp``'s convention), so ``warped(x) = moving(x + ddf(x))``.

    Args:
        in_channels: moving plus fixed channels (2 for one-channel images).
        feature_size: the SwinUNETR feature size C.
        dropout: SwinUNETR ``drop_rate``.
        use_checkpoint: gradient checkpointing in the Swin blocks.
    """

    def __init__(self, in_channels: int = 2, feature_size: int = 48, dropout: float = 0.0,
                 use_checkpoint: bool = False, window_size: int = 7) -> None:
        super().__init__()
        if in_channels % 2:
            raise ConfigError(f"a registration network takes moving and fixed images with the same channels, "
                              f"so in_channels must be even, got {in_channels}; set the task's in_channels to 2.")
        self.backbone = SwinUNETR(in_channels=in_channels, out_channels=3, feature_size=feature_size, use_v2=True,
                                  drop_rate=dropout, use_checkpoint=use_checkpoint, window_size=window_size)
        # Start near the identity transform (as VoxelMorph and TransMorph do): a random field would fold the
        # moving image before training begins.
        nn.init.normal_(self.backbone.out.conv.conv.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.backbone.out.conv.conv.bias)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.moving_channels = in_channels // 2

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ddf = self.backbone(image)
        return self.warp(image[:, : self.moving_channels], ddf), ddf


def build_task_network(task: Task, *, backbone: str = "swin", size: str | int = "B", dropout: float = 0.0,
                       use_checkpoint: bool = False, window_size: int = 7, vit_layout: str = "global",
                       vit_window_size: int = 3, vit_position_embedding: str = "sincos",
                       backbone_options: Mapping[str, Any] | None = None) -> nn.Module:
    """The network of a task: SwinUNETR-v2 / UNETR / ResEnc U-Net (segmentation), EncoderClassifier, or
    RegistrationNetwork.

    Args:
        task: the registry entry (``task_type``, ``in_channels``, ``out_channels``, ``roi_size``).
        backbone: ``"swin"`` (every task type), ``"vit"`` or ``"resenc"`` (segmentation and classification).
        size: ``"tiny"`` / ``"B"`` / ``"L"`` / ``"H"`` (Swin feature size 12 / 48 / 96 / 192, or an int divisible
            by 12); ``"tiny"`` / ``"S"`` / ``"B"`` for the ViT; ``"tiny"`` / ``"M"`` / ``"L"`` for the ResEnc.
        dropout: SwinUNETR ``drop_rate``, UNETR ``dropout_rate``, or the classifier's dropout on the embedding.
        use_checkpoint: gradient checkpointing of the Swin blocks (less memory, more compute).
        window_size: Swin attention window (7 as released; must match the pretrained encoder's, since the relative
            position tables have its shape; the smoke configs use 2 for speed on CPUs).
        vit_layout, vit_window_size, vit_position_embedding: the ViT's attention layout (``global``, ``window`` ...),
            window in tokens and position embedding, as in pretraining (see `voco.networks.vit.ViTEncoder`).
        backbone_options: the pretrained backbone's other settings (its plan's spec, `voco.checkpoints.plan`): ViT
            ``input_standardise``, ``global_every``, ``patch_size`` ...; ResEnc ``n_stages``, ``features_per_stage``,
            ``strides`` ...; Swin arguments of MONAI's ``SwinUNETR``.

    Raises:
        ConfigError: a task type or backbone without a network here, an unknown size, or a roi the network cannot
            take (Swin: divisible by 32 and not 32^3, ViT: divisible by 16, ResEnc: by its total stride).
    """
    backbone = str(backbone).lower()
    allowed = TASK_BACKBONES.get(task.task_type)
    if allowed is None:
        raise ConfigError(f"task {task.id!r} is a {task.task_type} task, which has no network here; "
                          f"pick a segmentation, classification or registration task.")
    if backbone not in allowed:
        raise ConfigError(f"backbone {backbone!r} is not available for {task.task_type} (task {task.id!r}); "
                          f"use one of {', '.join(allowed)}.")
    options = {key: value for key, value in (backbone_options or {}).items() if key not in FINE_TUNING_OWN}
    if backbone == "resenc":
        return build_resenc_network(task, size, dropout=dropout, use_checkpoint=use_checkpoint, **options)
    _check_roi(task, VIT_PATCH if backbone == "vit" else SWIN_DIVISOR)

    if backbone == "vit":
        spec = {**vit_spec(size), "patch_size": VIT_PATCH, **options}
        vit_options = dict(spec, in_channels=task.in_channels, input_size=task.roi_size, layout=vit_layout,
                           window_size=vit_window_size, position_embedding=vit_position_embedding,
                           use_checkpoint=use_checkpoint)
        if task.task_type == "classification":
            return EncoderClassifier(ViTEncoder(**vit_options), task.out_channels, dropout=dropout)
        if spec["depth"] != 12 or str(size).lower() not in UNETR_FEATURE_SIZES:
            raise ConfigError(f"UNETR takes the skip connections of a 12-block ViT; ViT size {size!r} has "
                              f"{spec['depth']} blocks: use size tiny, S or B for segmentation.")
        if spec["patch_size"] not in (VIT_PATCH, [VIT_PATCH] * 3, (VIT_PATCH,) * 3):
            raise ConfigError(f"UNETR takes a ViT of patch {VIT_PATCH}, and this encoder was pretrained with patch "
                              f"{spec['patch_size']}; fine-tune it on a classification task, or pretrain with "
                              f"patch_size {VIT_PATCH}.")
        network = UNETR(in_channels=task.in_channels, out_channels=task.out_channels, img_size=task.roi_size,
                        dropout_rate=dropout, hidden_size=spec["hidden_size"], mlp_dim=4 * spec["hidden_size"],
                        num_heads=spec["num_heads"], feature_size=UNETR_FEATURE_SIZES[str(size).lower()],
                        qkv_bias=True)
        network.vit = UNETRViT(**vit_options)  # same parameter names as MONAI's ViT, with our layout
        return network
    if task.task_type == "segmentation":  # monai >= 1.5 needs no img_size
        return SwinUNETR(in_channels=task.in_channels, out_channels=task.out_channels,
                         feature_size=swin_feature_size(size), use_v2=True, drop_rate=dropout,
                         use_checkpoint=use_checkpoint, **{**options, "window_size": window_size})
    if task.task_type == "classification":
        encoder = build_backbone(backbone, size, in_channels=task.in_channels, use_checkpoint=use_checkpoint,
                                 **{**options, "window_size": window_size})
        return EncoderClassifier(encoder, task.out_channels, dropout=dropout)
    return RegistrationNetwork(in_channels=task.in_channels, feature_size=swin_feature_size(size), dropout=dropout,
                               use_checkpoint=use_checkpoint, window_size=window_size)


def _check_roi(task: Task, divisor: int | Sequence[int], network: str = "Swin") -> None:
    """The task's roi fits a network that needs sizes divisible by `divisor` (one int, or one per axis)."""
    if task.roi_size is None:  # registry entries marked runnable=False may lack it
        raise ConfigError(f"task {task.id!r} has no roi_size in the registry; complete its entry or pick a "
                          "runnable task.")
    roi = [int(size) for size in task.roi_size]
    divisors = [int(divisor)] * 3 if isinstance(divisor, int) else [int(value) for value in divisor]
    if any(size % each for size, each in zip(roi, divisors)):
        shown = divisors[0] if len(set(divisors)) == 1 else divisors
        raise ConfigError(f"task {task.id!r} has roi_size {roi}, which this network cannot take; "
                          f"give a roi_size divisible by {shown} in every axis.")
    # Instance norm of the deepest (stride 32) features fails in training on a single voxel (e.g. a 32^3 roi).
    if divisors != [VIT_PATCH] * 3 and roi == divisors:
        raise ConfigError(f"task {task.id!r} has roi_size {roi}, too small for the {network} network to train; "
                          f"make at least one axis {2 * max(divisors)} voxels.")


def build_resenc_network(task: Task, size: str | int, *, dropout: float = 0.0, use_checkpoint: bool = False,
                         **architecture: Any) -> nn.Module:
    """nnU-Net's ResEnc U-Net for segmentation (``ResidualEncoderUNet`` of the plan's ``arch_kwargs``,
    `voco.networks.resenc.resenc_architecture`, deep supervision off, initialised as nnU-Net initialises it), or an
    EncoderClassifier on the ResEnc encoder. Its encoder's tensors are ``encoder.*``, as a pretrained
    ``ResEncEncoder``'s; `architecture` (``n_stages``, ``strides`` ...) must be the pretraining's."""
    import pydoc

    from voco.networks.resenc import import_dna, layers_of, resenc_architecture, total_stride

    plan = resenc_architecture(str(size), **architecture)
    _check_roi(task, total_stride(plan), "ResEnc")
    if task.task_type == "classification":
        encoder = build_backbone("resenc", size, in_channels=task.in_channels, use_checkpoint=use_checkpoint,
                                 **architecture)
        return EncoderClassifier(encoder, task.out_channels, dropout=dropout)
    import_dna()  # the one sentence naming the cnn extra where it is missing
    network_class = pydoc.locate(RESENC_CLASS)
    network = network_class(task.in_channels, num_classes=task.out_channels, deep_supervision=False,
                            **layers_of(plan))
    network.apply(network.initialize)  # nnU-Net's initialisation (He, a = 0.01; get_network_from_plans)
    return network


def encoder_of(network: nn.Module) -> nn.Module:
    """The part of a task network that pretrained weights go into (its modules, shared, not copied).

    For a SwinUNETR (alone or inside a RegistrationNetwork) this is a ``ModuleDict`` of its ``swinViT`` and
    ``encoder1|2|3|4|10``, whose state-dict keys are exactly those of the official ``VoCo_*_SSL_head.pt``; for an
    EncoderClassifier its ``encoder``; for a UNETR its ViT; for nnU-Net's ResEnc U-Net a ``ModuleDict`` of its
    ``encoder`` (keys ``encoder.stem.*``, ``encoder.stages.*``, as a pretrained ``ResEncEncoder``'s).
    """
    if isinstance(network, EncoderClassifier):
        return network.encoder
    if isinstance(network, RegistrationNetwork):
        return encoder_of(network.backbone)
    if isinstance(network, SwinUNETR):
        return nn.ModuleDict({name: getattr(network, name) for name in ("swinViT", *ENCODER_BLOCKS)})
    if isinstance(network, UNETR):
        return network.vit
    if f"{type(network).__module__}.{type(network).__name__}" == RESENC_CLASS:  # its decoder holds the encoder too
        return nn.ModuleDict({"encoder": network.encoder})
    if isinstance(network, (SwinEncoder, ViTEncoder, ResEncEncoder)):
        return network
    raise ConfigError(f"a {type(network).__name__} has no known encoder; pass a network from build_task_network.")


def decoder_of(network: nn.Module) -> nn.Module | None:
    """The SwinUNETR decoder of a task network (its modules, shared): a ``ModuleDict`` of ``decoder5..1`` and
    ``out``, whose state-dict keys are those of a whole-SwinUNETR checkpoint's decoder; None for a network without
    one (a classifier, a UNETR: its decoder has other names and no released weights)."""
    if isinstance(network, RegistrationNetwork):
        return decoder_of(network.backbone)
    if isinstance(network, SwinUNETR):
        return nn.ModuleDict({name: getattr(network, name) for name in SWIN_DECODER_BLOCKS})
    return None


def initialize_from_pretrained(network: nn.Module, source: str | os.PathLike | Mapping[str, Any] | None, *,
                               mode: str = "finetune", min_loaded_fraction: float = 0.5,
                               load_decoder: bool | None = None, channel_adaptation: str = "mean",
                               plan_differences: Sequence[str] = ()) -> LoadReport | None:
    """Load pretrained encoder (and decoder) weights into a task network and set which parameters train.

    Args:
        network: a network from :func:`build_task_network`.
        source: a checkpoint path or dict in any format :func:`voco.checkpoints.encoder_state_dict` recognises;
            ``None`` or ``"scratch"`` with ``mode="scratch"``.
        mode: ``"finetune"`` (load the encoder, train everything), ``"frozen"`` (load, freeze the encoder),
            ``"linear_probe"`` (classification only: load, train the final linear layer alone) or ``"scratch"``
            (random initialisation, nothing loaded).
        min_loaded_fraction: refuse a checkpoint of which less than this fraction of the encoder's tensors fit.
        load_decoder: whether the decoder tensors of a whole-SwinUNETR checkpoint (``VoComni_*``) go into the
            network's SwinUNETR decoder where name and shape match (the output layer usually differs: other
            classes). None (default): yes when the checkpoint has such tensors; True: refuse a checkpoint without
            any that fit; False: the decoder stays random. The decoder trains in every mode.
        channel_adaptation: how a one-channel encoder's input layer serves a task of several channels
            (multi-sequence MRI): "mean" (default), "repeat", "first" or "none"
            (`voco.checkpoints.loading.CHANNEL_RULES`); named in the load report.
        plan_differences: how the fine-tuning's preprocessing differs from the pretraining's, one sentence each
            (`voco.benchmark.pretrained_plan.preprocessing_differences`); printed and kept in the load report.

    Returns:
        The load report (its summary is printed), or None for ``"scratch"``. Give the optimizer only the
        parameters that still require gradients.

    Raises:
        ConfigError: an unknown mode, a missing source (or one given with ``"scratch"``), linear probing of a
            network that is not a classifier, ``load_decoder=True`` for a network without a SwinUNETR decoder.
        CheckpointError: the checkpoint cannot be read, too little of it fits the encoder, or ``load_decoder=True``
            and none of its decoder fits.
    """
    if mode not in INITIALIZATION_MODES:
        raise ConfigError(f"initialisation mode {mode!r} is unknown; use one of {', '.join(INITIALIZATION_MODES)}.")
    no_source = source is None or (isinstance(source, str) and source == "scratch")
    if mode == "scratch":
        if not no_source:
            raise ConfigError(f"mode 'scratch' loads no weights, but the checkpoint {_describe(source)} was given; "
                              "drop the checkpoint or use mode 'finetune'.")
        return None
    if no_source:
        raise ConfigError(f"mode {mode!r} needs a pretrained checkpoint; pass its path as the source, "
                          "or use mode 'scratch'.")
    if mode == "linear_probe" and not isinstance(network, EncoderClassifier):
        raise ConfigError(f"mode 'linear_probe' trains a classifier's final linear layer, and a "
                          f"{type(network).__name__} has none; use mode 'frozen' or 'finetune'.")

    decoder = decoder_of(network)
    if load_decoder and decoder is None:
        raise ConfigError(f"load_decoder is on, but a {type(network).__name__} has no SwinUNETR decoder to load; "
                          "set load_decoder to null (or false).")
    encoder = encoder_of(network)
    report = load_encoder_weights(encoder, source, min_loaded_fraction=min_loaded_fraction, decoder=decoder,
                                  load_decoder=load_decoder, channel_adaptation=channel_adaptation)
    report.plan_differences = list(plan_differences)
    print(f"pretrained encoder ({mode}): {report.summary()}")
    for sentence in report.plan_differences:
        print(f"pretraining plan: {sentence}")
    if mode == "frozen":
        encoder.requires_grad_(False)
    elif mode == "linear_probe":
        network.requires_grad_(False)
        network.head.requires_grad_(True)
    return report


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "dict"


# -------------------------------------------------------------------------------------------------------- losses


class RegistrationLoss(nn.Module):
    """Unsupervised registration loss, optionally with label overlap::

        similarity(warped, fixed) + regularization_weight * regularization(ddf)
                                  + label_weight * Dice(warp(one-hot moving label), fixed label)

    Args:
        num_labels: label values 0 .. num_labels - 1 (background included), for the Dice term.
        similarity: ``"lncc"`` (MONAI LocalNormalizedCrossCorrelationLoss, window ``kernel_size``, as the
            VoxelMorph/TransMorph NCC) or ``"mse"``.
        regularization: ``"bending"`` (MONAI BendingEnergyLoss) or ``"diffusion"`` (MONAI DiffusionLoss, the
            TransMorph reference's gradient penalty).
        regularization_weight: weight of the smoothness term.
        label_weight: weight of the Dice term (0 switches it off; it needs the labels then).
        kernel_size: LNCC window, voxels.

    ``forward(warped, fixed, ddf, moving_label=None, fixed_label=None)`` returns the scalar loss;
    :meth:`components` returns it under ``"loss"`` with its parts under ``"loss/<part>"``.
    """

    def __init__(self, num_labels: int = 2, similarity: str = "lncc", regularization: str = "bending",
                 regularization_weight: float = 1.0, label_weight: float = 0.0, kernel_size: int = 9) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ConfigError(f"registration similarity {similarity!r} is unknown; use one of "
                              f"{', '.join(SIMILARITIES)}.")
        if regularization not in REGULARIZATIONS:
            raise ConfigError(f"registration regularization {regularization!r} is unknown; use one of "
                              f"{', '.join(REGULARIZATIONS)}.")
        self.similarity = (LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)
                           if similarity == "lncc" else nn.MSELoss())
        self.regularization = BendingEnergyLoss() if regularization == "bending" else DiffusionLoss()
        self.regularization_weight = regularization_weight
        self.label_weight = label_weight
        self.num_labels = num_labels
        self.label_dice = DiceLoss(include_background=False, to_onehot_y=True)
        # Bilinear, so that the Dice term has gradients with respect to the field.
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def components(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                   moving_label: torch.Tensor | None = None, fixed_label: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        parts = {"loss/similarity": self.similarity(warped, fixed),
                 "loss/regularization": self.regularization(ddf)}
        loss = parts["loss/similarity"] + self.regularization_weight * parts["loss/regularization"]
        if self.label_weight:
            if moving_label is None or fixed_label is None:
                raise ConfigError("the registration loss has a label (Dice) term but the batch has no moving and "
                                  "fixed labels; add them to the datalist or set label_weight to 0.")
            warped_label = self.warp(one_hot(moving_label, self.num_labels), ddf)
            parts["loss/label_dice"] = self.label_dice(warped_label, fixed_label)
            loss = loss + self.label_weight * parts["loss/label_dice"]
        return {"loss": loss, **parts}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor,
                moving_label: torch.Tensor | None = None, fixed_label: torch.Tensor | None = None) -> torch.Tensor:
        return self.components(warped, fixed, ddf, moving_label, fixed_label)["loss"]


def task_loss(task: Task, *, similarity: str = "lncc", regularization: str = "bending",
              regularization_weight: float = 1.0, label_weight: float = 0.0) -> nn.Module:
    """The training loss of a task.

    - segmentation: ``DiceCELoss(to_onehot_y, softmax)`` with the BTCV reference's squared Dice and smoothing;
      called as ``loss(logits [N, K, ...], label [N, 1, ...])``.
    - classification: ``BCEWithLogitsLoss`` for one output (label float ``[N, 1]``), else ``CrossEntropyLoss``
      (label long ``[N]``).
    - registration: :class:`RegistrationLoss` (the keyword arguments apply to it only), with the task's
      anatomical labels plus background for its Dice term.
    """
    if task.task_type == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    if task.task_type == "classification":
        return nn.BCEWithLogitsLoss() if task.out_channels == 1 else nn.CrossEntropyLoss()
    if task.task_type == "registration":
        return RegistrationLoss(num_labels=task.num_classes + 1, similarity=similarity,
                                regularization=regularization, regularization_weight=regularization_weight,
                                label_weight=label_weight)
    raise ConfigError(f"task {task.id!r} is a {task.task_type} task, which has no loss here; "
                      f"pick a segmentation, classification or registration task.")
