"""Language-image pretraining on studies and reports: HLIP's study-level CLIP, with SigLIP and an MG-3D-style
sentence-similarity matching as options (specs/pretext.md section 6).

One step, for a batch of B studies ``{"image": [B, S, 1, X, Y, Z], "scan_mask": [B, S], "report": [B strings]}``
already on the device:

1. **Study embedding.** With a `ViTEncoder` (HLIP's hierarchical layouts ``scan`` / ``slice``) a learned *CLS
   token* rides through the blocks as an extra token: copied into every slice / scan / study attention group and
   averaged back, padded scans (``scan_mask`` False) hidden from study attention and left out of the average. Its
   final state goes through ``Linear(width, embedding_dim, bias=False)``. Any other backbone with
   ``forward([M, C, X, Y, Z]) -> [M, width]`` (the Swin encoder) encodes the valid scans one by one; the study
   feature is the mean over its valid scans, then the same projection.
2. **Report embedding.** The text encoder (``forward(reports) -> [B, width]``; a small transformer trained from
   scratch or a BERT-family model, often frozen but for its LayerNorms) then ``Linear(width, embedding_dim,
   bias=False)``. Both embeddings are L2-normalised.
3. **Loss** on the logits ``s * cos(study_i, report_j)`` with a learnable logit scale ``s = exp(t)``
   (``t = ln(1 / 0.07)`` at the start, CLIP's), clamped at ``max_logit_scale`` = 100 in the forward pass and
   clamped in the parameter after every optimizer step (`after_step`), as CLIP does:

   - ``"infonce"`` (CLIP, HLIP): the mean of the two cross-entropies study -> report and report -> study, the
     matching pair as the target class;
   - ``"siglip"``: every (study, report) pair is a binary decision, ``-log sigmoid(z_ij (s cos_ij + b))`` with
     ``z = +1`` for the matching pair and -1 otherwise, summed over candidates and averaged over anchors; ``t`` starts
     at ``ln 10`` and the learnable bias ``b`` at -10 (the SigLIP paper).

   Under ``torch.distributed`` both embeddings are gathered from every rank *with* their gradient
   (`gather_with_gradient`): rank r's studies and reports are its anchors against every rank's candidates, the
   target of anchor i being candidate ``r n + i``. Each rank's loss is the mean over its own anchors, so the mean
   over ranks (what DDP's gradient averaging optimises) is the single-process loss of the global batch.
4. **Sentence-similarity matching** (optional, ``sentence_matching_weight > 0``; the idea of MG-3D, our own
   formulation): studies whose reports read alike should look alike. The *detached* report-report similarities of
   different studies, softmaxed at the logit scale, are soft targets for the softmax of the study-study similarities
   of the same pairs (a study and its own report left out); the loss is their cross-entropy. With a frozen text
   encoder the targets are fixed; it needs three or more studies in the (global) batch to carry any signal.

Where a backbone's scans, the report and its findings come from is the data loader's business; the zero-shot
evaluation (prompt pairs, AUC, balanced accuracy, retrieval) lives in `voco.pretext.zero_shot`.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from monai.networks.utils import eval_mode

from voco.distributed import get_rank, world_size
from voco.errors import ConfigError
from voco.health import embedding_health
from voco.networks.interfaces import TokenSequence
from voco.pretext.views import as_generator, gather_with_gradient, new_figure, save_figure, show_axial

LOSSES = ("infonce", "siglip")
SIGLIP_INITIAL_TEMPERATURE = 0.1  # the SigLIP paper: t' = ln 10
SIGLIP_INITIAL_BIAS = -10.0


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------
def study_images(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The studies ``[B, S, C, X, Y, Z]`` of a batch and its ``scan_mask [B, S]`` bools (None: all scans valid).

    Single-scan images ``[B, C, X, Y, Z]`` are studies of S = 1. MONAI metadata is stripped.

    >>> images, scan_mask = study_images({"image": torch.zeros(2, 1, 16, 16, 8)})
    >>> tuple(images.shape), scan_mask
    ((2, 1, 1, 16, 16, 8), None)
    """
    images = batch.get("image") if isinstance(batch, Mapping) else None
    if not isinstance(images, torch.Tensor) or images.ndim not in (5, 6):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"the CLIP pretext expects batch['image'] as [B, S, C, X, Y, Z] studies or [B, C, X, Y, Z] "
                          f"scans, got {shape}; check the data loader of the language-image bundle.")
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    images = images[:, None] if images.ndim == 5 else images
    scan_mask = batch.get("scan_mask")
    if scan_mask is not None:
        scan_mask = scan_mask.as_tensor() if hasattr(scan_mask, "as_tensor") else scan_mask
        scan_mask = scan_mask.to(images.device, torch.bool)
        if tuple(scan_mask.shape) != tuple(images.shape[:2]):
            raise ConfigError(f"batch['scan_mask'] has shape {tuple(scan_mask.shape)} but the studies hold "
                              f"{tuple(images.shape[:2])} scans; give one bool per scan of each study.")
    return images, scan_mask


def batch_reports(batch: Mapping[str, Any], count: int) -> list[str]:
    """The ``count`` report texts of a batch, as a list of strings."""
    reports = batch.get("report")
    if reports is None or isinstance(reports, str) or len(reports) != count:
        raise ConfigError(f"the CLIP pretext needs batch['report'], a list of {count} report texts (one per study), "
                          f"got {type(reports).__name__}; give every study its report.")
    return [str(report) for report in reports]


# --------------------------------------------------------------------------------------------------
# Losses (embeddings L2-normalised, float32)
# --------------------------------------------------------------------------------------------------
def gathered_logits(anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's anchors ``[n, E]`` against every rank's candidates: ``(logits [n, M], targets [n])``.

    ``logits = logit_scale * anchors @ candidates.T`` with the candidates gathered across ranks with their gradient
    (M = world size x n); anchor i of rank r is matched to candidate ``targets[i] = r n + i``. ``gather=False`` (or
    no ``torch.distributed``): this rank's candidates only, M = n.
    """
    gather = gather and world_size() > 1
    candidates = gather_with_gradient(candidates) if gather else candidates
    rank = get_rank() if gather else 0
    targets = torch.arange(anchors.shape[0], device=anchors.device) + rank * anchors.shape[0]
    return logit_scale * anchors @ candidates.T, targets


def clip_loss(study_embeddings: torch.Tensor, report_embeddings: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the mean of the study -> report and report -> study cross-entropies.

    Args:
        study_embeddings, report_embeddings: ``[n, E]`` L2-normalised; row i of both is one study and its report.
        logit_scale: the (clamped) scale ``s``, a scalar tensor.
        gather: contrast against every rank's pairs under ``torch.distributed`` (see `gathered_logits`).

    >>> embeddings = torch.eye(2)  # perfectly matched pairs, orthogonal otherwise
    >>> round(clip_loss(embeddings, embeddings, torch.tensor(1.0)).item(), 4)  # -log(e / (e + 1))
    0.3133
    """
    study_logits, targets = gathered_logits(study_embeddings, report_embeddings, logit_scale, gather)
    report_logits, _ = gathered_logits(report_embeddings, study_embeddings, logit_scale, gather)
    return (F.cross_entropy(study_logits, targets) + F.cross_entropy(report_logits, targets)) / 2


def siglip_loss(study_embeddings: torch.Tensor, report_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: ``-(1/n) sum_ij log sigmoid(z_ij (s cos_ij + b))``, z = +1 on matching pairs.

    Each rank's studies are the anchors against every rank's reports, so every pair of the global batch is counted
    once over all ranks.

    >>> embeddings = torch.eye(2)
    >>> round(siglip_loss(embeddings, embeddings, torch.tensor(1.0), torch.tensor(0.0)).item(), 4)
    1.0064
    """
    logits, targets = gathered_logits(study_embeddings, report_embeddings, logit_scale, gather)
    signs = -torch.ones_like(logits).scatter_(1, targets[:, None], -1.0)  # +1 on the matching pair, -1 elsewhere
    return -F.logsigmoid(signs * (logits + logit_bias)).sum() / logits.shape[0]


def sentence_matching_loss(study_embeddings: torch.Tensor, report_embeddings: torch.Tensor,
                           logit_scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Inter-patient sentence-similarity matching: studies with similar reports should have similar images.

    For anchor study i and every *other* study j of the (gathered) batch: targets ``q_ij = softmax_j(s r_i . r_j)``
    from the detached report embeddings, predictions ``p_ij = softmax_j(s x_i . x_j)`` from the study embeddings;
    the loss is the mean over anchors of ``-sum_j q_ij log p_ij``. The scale s is detached too: this loss shapes the
    study embeddings only.

    >>> studies, reports = torch.eye(3), F.normalize(torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]), dim=-1)
    >>> round(sentence_matching_loss(studies, reports, torch.tensor(1.0)).item(), 4)  # p = 1/2 for every pair
    0.6931
    """
    scale = logit_scale.detach()
    report_logits, targets = gathered_logits(report_embeddings.detach(), report_embeddings.detach(), scale, gather)
    study_logits, _ = gathered_logits(study_embeddings, study_embeddings, scale, gather)
    own = F.one_hot(targets, study_logits.shape[1]).bool()  # a study with itself is not a pair
    soft_targets = report_logits.masked_fill(own, float("-inf")).softmax(dim=-1)
    log_predictions = study_logits.masked_fill(own, float("-inf")).log_softmax(dim=-1)
    return -torch.where(own, 0.0, soft_targets * log_predictions).sum(dim=-1).mean()  # where: avoids 0 * -inf


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class CLIPPretext(nn.Module):
    """Study-report contrastive pretraining (HLIP): ``forward(batch) -> {"loss", "loss/...", "metric/..."}``.

    Args:
        backbone: a `ViTEncoder` (studies ``[B, S, C, X, Y, Z]`` with a CLS token; use layout ``"slice"`` or
            ``"scan"`` for HLIP's hierarchy) or any module with ``forward([M, C, X, Y, Z]) -> [M, embedding_dim]``
            and ``embedding_dim`` (the Swin encoder: scan by scan, masked mean over the scans of a study).
        text_encoder: ``forward(reports: Sequence[str]) -> [B, width]`` with a ``width`` attribute
            (`voco.networks.text`); whichever of its parameters require grad are trained.
        embedding_dim: width of the joint embedding space (HLIP: 512).
        loss: ``"infonce"`` (symmetric, CLIP) or ``"siglip"``.
        initial_temperature: ``1 / s`` at the start; None: 0.07 (CLIP) for InfoNCE, 0.1 (SigLIP's ln 10) for SigLIP.
        max_logit_scale: the largest logit scale s (CLIP: 100).
        gather_negatives: under ``torch.distributed``, contrast against every rank's batch (False: this rank's only).
        sentence_matching_weight: weight of the sentence-similarity matching loss (0: off).
        seed: seed of ``self.generator``, the CPU generator for anything random the pretext draws (the engine
            checkpoints it); None: torch's global generator. Nothing draws from it yet: the loader shuffles the
            scans, and the ViT permutes its scan-index embedding with torch's global generator.

    Output: ``loss``, ``loss/contrastive`` (or ``loss/siglip``), ``loss/sentence_matching`` (weight > 0),
    ``metric/logit_scale``, ``metric/batch_top1`` (share of this rank's studies whose most similar report of the
    gathered batch is their own), and the `voco.health.embedding_health` of this rank's study embeddings
    (``health/embedding_std``, ``health/collapsed``, and ``health/top_component_share`` from 3 studies on).

    >>> from voco.networks import build_backbone
    >>> from voco.networks.text import SmallTextEncoder
    >>> backbone = build_backbone("vit", "tiny", input_size=(16, 16, 8), patch_size=(8, 8, 4), layout="slice")
    >>> pretext = CLIPPretext(backbone, SmallTextEncoder(["no", "mass", "."], width=32, depth=1, num_heads=2), 16)
    >>> output = pretext({"image": torch.rand(2, 3, 1, 16, 16, 8), "report": ["No mass.", "Mass."]})
    >>> sorted(output)  # doctest: +NORMALIZE_WHITESPACE
    ['health/collapsed', 'health/embedding_std', 'loss', 'loss/contrastive', 'metric/batch_top1',
     'metric/logit_scale']
    """

    min_batch_size = 2  # studies per step: one study has no negatives (validation skips a last batch of one)


    def __init__(self, backbone: nn.Module, text_encoder: nn.Module, embedding_dim: int = 512, loss: str = "infonce",
                 initial_temperature: float | None = None, max_logit_scale: float = 100.0,
                 gather_negatives: bool = True, sentence_matching_weight: float = 0.0, seed: int | None = 0) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"unknown CLIP loss {loss!r}; use one of {', '.join(LOSSES)}.")
        if initial_temperature is None:
            initial_temperature = SIGLIP_INITIAL_TEMPERATURE if loss == "siglip" else 0.07
        if not 0 < initial_temperature:
            raise ConfigError(f"initial_temperature is {initial_temperature}; use a positive value (CLIP: 0.07).")
        if not max_logit_scale > 0:
            raise ConfigError(f"max_logit_scale is {max_logit_scale}; use a positive value (CLIP: 100).")
        if sentence_matching_weight < 0:
            raise ConfigError(f"sentence_matching_weight is {sentence_matching_weight}; use 0 (off) or more.")
        for module, name, attribute in [(backbone, "backbone", "embedding_dim"),
                                        (text_encoder, "text encoder", "width")]:
            if not isinstance(getattr(module, attribute, None), int):
                raise ConfigError(f"the {name} {type(module).__name__} has no int `{attribute}`; use a voco backbone "
                                  "and a text encoder from voco.networks.text.")
        self.backbone, self.text_encoder = backbone, text_encoder
        self.uses_tokens = isinstance(backbone, TokenSequence)
        width = backbone.embedding_dim
        # Initialised like MAE's / timm's CLS token: N(0, 0.02).
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02) if self.uses_tokens else None
        self.study_projection = nn.Linear(width, embedding_dim, bias=False)
        self.report_projection = nn.Linear(text_encoder.width, embedding_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INITIAL_BIAS)) if loss == "siglip" else None
        self.loss_name, self.max_logit_scale = loss, float(max_logit_scale)
        self.gather_negatives = bool(gather_negatives)
        self.sentence_matching_weight = float(sentence_matching_weight)
        self.generator = as_generator(seed)

    # ---------------------------------------------------------------- embeddings
    def encode_studies(self, images: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Studies ``[B, S, C, X, Y, Z]`` (or scans ``[B, C, X, Y, Z]``) -> L2-normalised ``[B, embedding_dim]``.

        ``scan_mask [B, S]``: False where a scan is padding; None: every scan is valid.
        """
        images = images[:, None] if images.ndim == 5 else images
        if scan_mask is not None and not bool(scan_mask.any(dim=1).all()):
            raise ConfigError("a study in the batch has no valid scan (scan_mask all False); drop empty studies in "
                              "the data loader.")
        if self.uses_tokens:
            cls_token = self.cls_token.to(images.dtype).expand(images.shape[0], -1, -1)
            _, extra = self.backbone.forward_tokens(images, extra=cls_token, scan_mask=scan_mask)
            features = extra[:, 0]
        else:
            batch, scans = images.shape[:2]
            valid = torch.ones(batch, scans, dtype=torch.bool, device=images.device) if scan_mask is None else scan_mask
            # Only the valid scans go through the backbone (padding costs nothing and no normalisation sees it).
            scan_features = self.backbone(images.flatten(0, 1)[valid.flatten()])
            per_scan = scan_features.new_zeros(batch * scans, scan_features.shape[-1])
            per_scan[valid.flatten()] = scan_features
            weights = valid.to(per_scan.dtype)[:, :, None]
            features = (per_scan.view(batch, scans, -1) * weights).sum(dim=1) / weights.sum(dim=1)
        return F.normalize(self.study_projection(features).float(), dim=-1)

    def encode_reports(self, reports: Sequence[str]) -> torch.Tensor:
        """Report texts (B strings) -> L2-normalised ``[B, embedding_dim]``."""
        if isinstance(reports, str):
            raise ConfigError("encode_reports takes a list of reports, got one string; wrap it in a list.")
        features = self.text_encoder(list(reports))
        return F.normalize(self.report_projection(features.to(self.report_projection.weight.dtype)).float(), dim=-1)

    def current_logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at ``max_logit_scale`` (no gradient above it)."""
        return self.logit_scale.float().exp().clamp(max=self.max_logit_scale)

    # ---------------------------------------------------------------- training
    def losses(self, study_embeddings: torch.Tensor, report_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its parts for matched embeddings ``[n, E]`` of this rank (gathered across ranks inside)."""
        with torch.autocast(study_embeddings.device.type, enabled=False):  # logits up to 100: float32, not bf16
            scale = self.current_logit_scale()
            gather = self.gather_negatives
            if self.loss_name == "siglip":
                loss = siglip_loss(study_embeddings, report_embeddings, scale, self.logit_bias.float(), gather)
                parts = {"siglip": loss}
            else:
                loss = clip_loss(study_embeddings, report_embeddings, scale, gather)
                parts = {"contrastive": loss}
            if self.sentence_matching_weight > 0:
                parts["sentence_matching"] = sentence_matching_loss(study_embeddings, report_embeddings, scale,
                                                                    gather)
                loss = loss + self.sentence_matching_weight * parts["sentence_matching"]
            with torch.no_grad():
                logits, targets = gathered_logits(study_embeddings, report_embeddings, scale, gather)
                top1 = (logits.argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, **{f"loss/{name}": value.detach() for name, value in parts.items()},
                "metric/logit_scale": scale.detach(), "metric/batch_top1": top1}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"image", "scan_mask" (optional), "report"}`` -> scalar losses and metrics (tensors)."""
        images, scan_mask = study_images(batch)
        reports = batch_reports(batch, images.shape[0])
        ranks = world_size() if self.gather_negatives else 1
        if images.shape[0] * ranks < 2:
            raise ConfigError(f"the CLIP pretext needs at least 2 studies per step for negatives, got "
                              f"{images.shape[0]}; set the batch size to 2 or more.")
        studies = self.encode_studies(images, scan_mask)
        return {**self.losses(studies, self.encode_reports(reports)), **embedding_health(studies)}

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the logit scale's parameter at ``ln(max_logit_scale)`` (called by the engine after each optimizer
        step), as CLIP does, so that it cannot drift above where the forward clamp stops its gradient."""
        self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    # ---------------------------------------------------------------- picture
    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], max_studies: int = 4) -> dict[str, Any]:
        """What a picture of one step shows (CPU tensors, for `save_views_picture`); runs in evaluation mode
        (restored afterwards).

        Keys: ``scans [k, S, X, Y]`` (middle z slice of each scan of the first k <= ``max_studies`` studies, first
        channel), ``scan_mask [k, S]``, ``reports`` (k strings), ``similarity [B, B]`` (cosine of study i and report
        j of the whole batch), ``logit_scale``.
        """
        images, scan_mask = study_images(batch)
        reports = batch_reports(batch, images.shape[0])
        with eval_mode(self):
            similarity = self.encode_studies(images, scan_mask) @ self.encode_reports(reports).T
        count = min(max_studies, images.shape[0])
        mask = torch.ones(images.shape[:2], dtype=torch.bool) if scan_mask is None else scan_mask.cpu()
        return {
            "scans": images[:count, :, 0, :, :, images.shape[-1] // 2].float().cpu(),
            "scan_mask": mask[:count],
            "reports": reports[:count],
            "similarity": similarity.float().cpu(),
            "logit_scale": float(self.current_logit_scale()),
        }


def check_clip_checkpoint(checkpoint: Mapping[str, Any], source: str = "this checkpoint") -> None:
    """Refuse a checkpoint that holds no CLIP model (weights and a ``backbone_spec`` with ``pretext: clip``)."""
    spec = checkpoint.get("backbone_spec")
    if not isinstance(spec, Mapping) or spec.get("pretext") != "clip" or "clip" not in spec \
            or "pretext" not in checkpoint:
        raise ConfigError(f"{source} holds no CLIP model (its backbone_spec names no CLIP heads); give a checkpoint "
                          f"of bundles/clip_pretrain (runs/<run>/checkpoints/checkpoint_final.pt).")


def clip_from_checkpoint(checkpoint: Mapping[str, Any]) -> CLIPPretext:
    """The CLIP model a ``clip_pretrain`` checkpoint holds, rebuilt from its ``backbone_spec`` and loaded (eval mode).

    The spec is the backbone's (`voco.networks.build_backbone` keys) plus ``pretext: "clip"`` and ``clip:
    {"embedding_dim", "loss", "text_encoder": <build_text_encoder keys>}``; a small text encoder's vocabulary comes
    from the weights (its extra state). `checkpoint`: what `voco.checkpoints.read_checkpoint` returns.
    """
    from voco.networks import build_backbone
    from voco.networks.text import build_text_encoder

    check_clip_checkpoint(checkpoint)
    spec = dict(checkpoint["backbone_spec"])
    spec.pop("pretext")
    heads = spec.pop("clip")
    text_spec, state = dict(heads["text_encoder"]), checkpoint["pretext"]
    vocabulary = (state.get("text_encoder._extra_state") or {}).get("vocabulary")
    text_encoder = build_text_encoder(**text_spec, vocabulary=vocabulary)
    pretext = CLIPPretext(build_backbone(**spec), text_encoder, embedding_dim=int(heads["embedding_dim"]),
                          loss=str(heads["loss"]))
    pretext.load_state_dict(state)
    return pretext.eval()


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `CLIPPretext.views`: one row per study (its scans' middle z slices, padded scans marked, and
    its report), and the batch's study-report cosine matrix (matching pairs on the diagonal).

    matplotlib is imported lazily; the file appears complete or not at all.
    """
    scans, scan_mask, reports = views["scans"], views["scan_mask"], views["reports"]
    count, num_scans = scans.shape[:2]
    figure, axes = new_figure(1.8 * num_scans + 6.0, 1.9 * count + 0.4, count, num_scans + 2)
    for study in range(count):
        for scan in range(num_scans):
            axis = axes[study, scan]
            if bool(scan_mask[study, scan]):
                show_axial(axis, scans[study, scan], letters=True, cmap="gray")
            axis.set_title(f"study {study}, scan {scan}" if scan_mask[study, scan] else "padding", fontsize=7)
        text = textwrap.fill(reports[study], width=48, max_lines=8, placeholder=" ...")
        axes[study, num_scans].text(0.0, 0.5, text, fontsize=6, va="center", ha="left", wrap=True,
                                    transform=axes[study, num_scans].transAxes)
    similarity_axis = axes[0, num_scans + 1]
    similarity_axis.axis("on")
    similarity_axis.imshow(views["similarity"], cmap="viridis", vmin=-1, vmax=1)
    similarity_axis.set_xlabel("report", fontsize=7)
    similarity_axis.set_ylabel("study", fontsize=7)
    similarity_axis.set_title(f"cosine (scale {views['logit_scale']:.1f})", fontsize=7)
    return save_figure(figure, path)
