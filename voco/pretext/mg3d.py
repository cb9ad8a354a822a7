"""MG-3D: multi-grained language-image pretraining of 3-D volumes and their reports (Ni et al.; the reference code
as specs/mg3d.md reads it, which this file follows, its bugs fixed behind switches).

One step, for a batch of B studies ``{"image": [B, S, C, X, Y, Z] (or scans [B, C, X, Y, Z]), "scan_mask": [B, S]
(optional), "report": [B strings]}`` already on the device:

**Tokens.** A `TokenSequence` backbone (the ViT) gives its patch tokens, a `FeaturePyramid` (the Swin encoder) its
deepest map flattened to tokens (Swin-B on 128 x 96 x 128: 4 x 3 x 4 = 48); the tokens of a study's valid scans form
one set. A report is split into sentences (`split_sentences`), each tokenized alone and laid out ``[CLS] s_0 ...
s_S-1 [SEP]`` so that every token knows its sentence (`tokenize_sentences`), then encoded by the text encoder.
Linear adapters bring both into the fusion width D (MG-3D: 768), plus a modality embedding (text 0, image 1). A
sentence feature is the mean of its tokens.

1. **MLM + SFR.** Whole-word masking of the report (p = 0.15, 80/10/10; `whole_word_mask`); the masked text tokens,
   fused with the unmasked volume's tokens (text as queries), pass BERT's MLM transform (dense, GELU, LayerNorm) and
   a vocabulary decoder: cross-entropy over the masked tokens only (`masked_token_loss`). *SFR* reconstructs each
   sentence from the same transformed tokens averaged per sentence (Linear, standardisation, GELU, Linear): ``1 -
   cos`` against a stop-gradient target, the text encoder's own feature of that sentence in the unmasked report,
   averaged over the sentences (`sentence_reconstruction_loss`).
2. **MIM.** Windows of ``mim_window_size`` voxels (16^3), ``mim_mask_ratio`` (0.5) of them, drawn once per batch,
   are zeroed; the masked volume's tokens, fused with the report's sentence features (volume as queries), are
   decoded by stages of 3^3 conv, InstanceNorm, LeakyReLU and trilinear x2 back to the input size, then a 1^3 conv:
   ``mean(((x_hat - x) m)^2) / ratio`` over every voxel of the valid scans, m = masked (`masked_reconstruction_loss`).
3. **CML, DFA, SSM** on the unmasked volume (tokens V) and report (sentences s):
   - *CML*: InfoNCE (fixed tau = 0.1, both directions) between the volume pool g_u^v (token mean, Linear, tanh) and
     the report pool g_u^t (CLIP's attention pool of the sentences), each through LayerNorm + Linear, L2-normalised.
   - *DFA*: y = g_u^v; two layers of ``a_s = U(q = y; kv = s)`` (each sentence's value gated by a sigmoid; layer 2
     gates layer 1's a_s), each followed by ``y = tanh(W mean_s a_s)``; InfoNCE(g_m^v, y), tau = 0.1, both
     directions, g_m^v the pool of the tokens fused with the sentences (volume as queries).
   - *SSM*: for each pair of studies i < j of this rank, ``G`` = cosines of their sentences' text vectors (no
     gradient) and ``P`` = cosines of their sentence-wise image features (a sentence attends, softmax, to the image
     tokens; then Linear, standardisation, GELU, Linear to 128, tanh); similar = G >= 0.9, dissimilar = G <= 0.6;
     the pair's loss is ``mean |P (similar + dissimilar) - G similar|`` over its similar and dissimilar entries, and
     L_SSM the mean over the pairs that have any (`sentence_matching_loss`).

``loss = mlm_weight L_MLM + sfr_weight L_SFR + mim_weight L_MIM + cml_weight L_CML + dfa_weight L_DFA + ssm_weight
L_SSM``, by default MG-3D's ``(MLM + 0.1 SFR) + MIM + 0.1 (CML + DFA + SSM)``; a weight of 0 builds and runs nothing
of that part. Under ``torch.distributed`` CML and DFA contrast this rank's anchors against every rank's candidates,
gathered with their gradient (`voco.pretext.clip.clip_loss`); MLM, SFR, MIM and SSM stay on each rank. CML's heads
embed studies and reports (`encode_studies`, `encode_reports`): `voco.pretext.zero_shot` scores MG-3D as it does CLIP.

**Fixes and the reference's behaviour** (specs/mg3d.md section 4). Each switch defaults to the fix; the other value
reproduces the reference:

- ``fusion="attention"``: pre-norm residual cross-attention (`CrossAttentionFusion`). ``"reference"``: MG-3D's
  gated module G (`GatedFusion`): a token keeps its own value, scaled by a gate from the other modality (4.5).
- ``mim_guidance="sentences"``: MIM fused with the report's sentences, as the paper says. ``"tokens"``: fused with
  the text tokens by MLM's own fusion, the route the reference's typo takes (4.1).
- ``cml_pairing="volume_report"``: volume pool vs report pool. ``"reference"``: the fused pair [g_m^t, g_m^v] vs the
  unfused pair [g_u^t, g_u^v] of a study, each through LayerNorm + Linear (2D -> E) (4.6).
- ``sfr_target="frozen"``: the stop-gradient sentence feature in the text width, mean over sentences.
  ``"reference"``: a trainable MLP (-> 384, ReLU, -> 8) of the sentence's embedding-layer mean, summed (4.7).
- ``sentence_image_features="attention"``: SSM's sentence-wise image features attend to the image tokens.
  ``"reference"``: DFA's last a_s, sentence values gated by one global image vector (4.8).
- ``ssm_similarity="encoder"``: G from the sentence features of the text encoder (no gradient; a frozen BERT runs in
  eval mode). ``"reference"``: from the sentences' embedding-layer means (4.8).
- ``ssm_average="kept"``: a pair's mean over its similar and dissimilar entries; a pair with none is left out.
  ``"reference"``: ambiguous entries count as 0 in the mean and every pair counts (4.8).
- ``detach_sentences=False``: CML, DFA and SSM train the text side. True: pass 3's sentences carry no gradient (4.4).

Not reproduced: the stale text cache (4.3), the doubled modality embedding (4.4), clauses split at "," and ";" (we
split sentences), the image pool's Linear(48 -> 1) over token positions (a mean takes any size). The text encoder is
`voco.networks.text`'s small one (with ``[MASK]``: ``build_text_encoder(..., mask_token=True)``) or a local BERT-family
`HuggingFaceTextEncoder`; for MG-3D's fully frozen RadBERT freeze its LayerNorms too (``requires_grad_(False)``).
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import nn

from voco.data.reports import split_sentences
from voco.distributed import world_size
from voco.errors import ConfigError, require_choice
from voco.networks.fusion import (FUSIONS, AttentionPool, MeanPool, ReconstructionDecoder, StandardisedMLP,
                                  UnidirectionalGate, build_fusion, contrastive_head, key_padding, masked_mean,
                                  sentence_means)
from voco.networks.interfaces import FeaturePyramid, TokenSequence, require
from voco.networks.text import IGNORE_INDEX, tokenize_sentences, whole_word_mask
from voco.networks.vit import as_triple
from voco.pretext.clip import batch_reports, clip_loss, study_images
from voco.pretext.mae import mask_volume, random_mask
from voco.pretext.views import as_generator, new_figure, save_figure, show_axial

PARTS = ("mlm", "sfr", "mim", "cml", "dfa", "ssm")
SWITCHES = {"fusion": FUSIONS, "mim_guidance": ("sentences", "tokens"), "cml_pairing": ("volume_report", "reference"),
            "sfr_target": ("frozen", "reference"), "sentence_image_features": ("attention", "reference"),
            "ssm_similarity": ("encoder", "reference"), "ssm_average": ("kept", "reference")}
TEXT_API = ("width", "max_length", "vocabulary_size", "special_token_ids", "word_pieces", "embed_tokens",
            "encode_tokens", "token_strings")
SENTENCE_DIM = 128  # MG-3D's sentence head output


# --------------------------------------------------------------------------------------------------
# Masks and losses (float32)
# --------------------------------------------------------------------------------------------------
def window_mask(spatial_size: Sequence[int], window_size: int | Sequence[int], mask_ratio: float,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """MG-3D's window masking: ``round(mask_ratio * windows)`` windows of ``window_size`` voxels at random, one draw
    for the whole batch -> voxel mask ``[1, 1, X, Y, Z]`` (True = masked)."""
    window = as_triple(window_size, "mim_window_size")
    if any(int(size) % step for size, step in zip(spatial_size, window)):
        raise ConfigError(f"the input size {tuple(spatial_size)} is not divisible by the MIM window {window}; set "
                          "mim_window_size to a divisor of the input size.")
    grid = tuple(int(size) // step for size, step in zip(spatial_size, window))
    return mask_volume(random_mask(1, grid, mask_ratio, generator, device), grid, window)


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` over the tokens whose label is not `IGNORE_INDEX` (the masked ones)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def masked_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor,
                               mask_ratio: float, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(((prediction - target) m)^2) / mask_ratio`` over all voxels of ``[M, C, X, Y, Z]`` scans, ``m =
    voxel_mask`` (broadcast); ``scan_mask [M]`` (False: padding) leaves scans out of the mean."""
    squared = ((prediction.float() - target.float()) * voxel_mask).square().flatten(1).mean(dim=1)
    weights = torch.ones_like(squared) if scan_mask is None else scan_mask.to(squared.dtype)
    return (squared * weights).sum() / weights.sum() / mask_ratio


def sentence_reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor, sentence_mask: torch.Tensor,
                                 summed: bool = False) -> torch.Tensor:
    """``1 - cos(p_s, t_s)`` of each real sentence ``[B, S, F]``, averaged (or, ``summed``, added as MG-3D does) over
    a report's sentences, then averaged over the reports."""
    distance = (1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)) * sentence_mask
    per_report = distance.sum(dim=1)
    return (per_report if summed else per_report / sentence_mask.sum(dim=1).clamp(min=1)).mean()


def sentence_matching_loss(image_sentences: torch.Tensor, text_sentences: torch.Tensor, sentence_mask: torch.Tensor,
                           similar: float = 0.9, dissimilar: float = 0.6, average: str = "kept") -> torch.Tensor:
    """MG-3D's inter-patient sentence-similarity matching over the pairs i < j of the batch.

    ``G = cos(t_is, t_jt)`` of the text vectors ``[B, S, T]`` (no gradient), ``P = cos(e_is, e_jt)`` of the image
    features ``[B, S, E]``; an entry is similar where G >= ``similar``, dissimilar where G <= ``dissimilar``, else
    ambiguous. Its error is ``|P - G|`` (similar), ``|P|`` (dissimilar) or 0 (ambiguous). ``average="kept"``: a
    pair's mean over its similar and dissimilar entries, pairs without any left out; ``"reference"``: over all its
    real entries, every pair counted. The loss is the mean over the counted pairs (0 if none).
    """
    with torch.autocast(image_sentences.device.type, enabled=False):
        features = F.normalize(image_sentences.float(), dim=-1)
        predicted = torch.einsum("isk,jtk->ijst", features, features)
        with torch.no_grad():
            vectors = F.normalize(text_sentences.float(), dim=-1)
            targets = torch.einsum("isk,jtk->ijst", vectors, vectors)
        count = sentence_mask.shape[0]
        pairs = torch.ones(count, count, dtype=torch.bool, device=sentence_mask.device).triu(1)[:, :, None, None]
        real = sentence_mask[:, None, :, None] & sentence_mask[None, :, None, :] & pairs
        close, far = real & (targets >= similar), real & (targets <= dissimilar)
        errors = (predicted * (close | far) - targets * close).abs()
        entries = (close | far) if average == "kept" else real
        sizes = entries.sum(dim=(2, 3))
        counted = sizes > 0
        if not bool(counted.any()):
            return image_sentences.sum() * 0.0  # no pair with a verdict: nothing to match, the graph stays whole
        return (errors.sum(dim=(2, 3))[counted] / sizes[counted]).mean()


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
class MG3DPretext(nn.Module):
    """MG-3D pretraining: ``forward(batch) -> {"loss", "loss/mlm", "loss/sfr", "loss/mim", "loss/cml", "loss/dfa",
    "loss/ssm"}`` (the parts whose weight is above 0; see the module docstring).

    Args:
        backbone: a `TokenSequence` (ViT) or `FeaturePyramid` (Swin) encoder.
        text_encoder: a `voco.networks.text` encoder (its token-level API); with MLM or SFR its vocabulary needs
            ``[MASK]``. Whichever of its parameters require grad are trained.
        fusion_dim: D, the width of the adapters, fusion and heads (MG-3D: 768).
        embedding_dim: width of the CML embeddings (MG-3D: 768).
        num_heads: heads of the attention fusion and the attention pools (must divide D).
        fusion_layers: layers of each fusion (MG-3D: 2).
        mlm_weight, sfr_weight, mim_weight, cml_weight, dfa_weight, ssm_weight: the loss weights (0: part off).
        mask_probability: share of report tokens masked, whole words (BERT: 0.15).
        mim_window_size, mim_mask_ratio: MIM's masked windows (voxels per axis, dividing the input) and their share.
        temperature: tau of CML and DFA (fixed, 0.1).
        similar_threshold, dissimilar_threshold: SSM's text cosines for similar / dissimilar sentence pairs.
        fusion, mim_guidance, cml_pairing, sfr_target, sentence_image_features, ssm_similarity, ssm_average,
            detach_sentences: the fix or the reference's behaviour, see the module docstring.
        seed: seed of ``self.generator``, which draws the word and window masks (the engine checkpoints it).

    ``find_unused_parameters``: whether DDP must look for unused parameters (the gated fusion leaves some gates
    unused, and the Swin encoder's shallow blocks are not read).
    """

    min_batch_size = 2  # studies per step: CML and DFA need negatives, SSM a pair

    def __init__(self, backbone: nn.Module, text_encoder: nn.Module, fusion_dim: int = 768, embedding_dim: int = 768,
                 num_heads: int = 8, fusion_layers: int = 2, mlm_weight: float = 1.0, sfr_weight: float = 0.1,
                 mim_weight: float = 1.0, cml_weight: float = 0.1, dfa_weight: float = 0.1, ssm_weight: float = 0.1,
                 mask_probability: float = 0.15, mim_window_size: int | Sequence[int] = 16,
                 mim_mask_ratio: float = 0.5, temperature: float = 0.1, similar_threshold: float = 0.9,
                 dissimilar_threshold: float = 0.6, fusion: str = "attention", mim_guidance: str = "sentences",
                 cml_pairing: str = "volume_report", sfr_target: str = "frozen",
                 sentence_image_features: str = "attention", ssm_similarity: str = "encoder",
                 ssm_average: str = "kept", detach_sentences: bool = False, seed: int | None = 0) -> None:
        super().__init__()
        switches = dict(fusion=fusion, mim_guidance=mim_guidance, cml_pairing=cml_pairing, sfr_target=sfr_target,
                        sentence_image_features=sentence_image_features, ssm_similarity=ssm_similarity,
                        ssm_average=ssm_average)
        for name, value in switches.items():
            require_choice(name, value, SWITCHES[name])
            setattr(self, name, value)
        weights = [mlm_weight, sfr_weight, mim_weight, cml_weight, dfa_weight, ssm_weight]
        self.weights = {part: float(weight) for part, weight in zip(PARTS, weights) if float(weight) != 0.0}
        if any(weight < 0 for weight in weights) or not self.weights:
            raise ConfigError(f"the MG-3D loss weights are {dict(zip(PARTS, weights))}; use 0 (part off) or more, and "
                              "at least one above 0.")
        for name, value, low, high in [("mask_probability", mask_probability, 0, 1), ("mim_mask_ratio", mim_mask_ratio,
                                       0, 1), ("temperature", temperature, 0, math.inf),
                                       ("dissimilar_threshold", dissimilar_threshold, -1, similar_threshold)]:
            if not low < value < high:
                raise ConfigError(f"{name} is {value}; use a value between {low} and {high}.")
        interface = require(backbone, (TokenSequence, FeaturePyramid), "the MG-3D pretext")
        lacking = [name for name in TEXT_API if not hasattr(text_encoder, name)]
        if lacking:
            raise ConfigError(f"the MG-3D pretext needs a text encoder with token-level access, and the "
                              f"{type(text_encoder).__name__} lacks {', '.join(lacking)}; use one of "
                              "voco.networks.text.")
        on = {part: part in self.weights for part in PARTS}
        language = on["mlm"] or on["sfr"]
        if language and text_encoder.special_token_ids["mask"] is None:
            raise ConfigError("the text encoder's vocabulary has no [MASK] token for masked language modelling; build "
                              "it with build_text_encoder(..., mask_token=True) or set mlm_weight and sfr_weight to 0.")
        self.backbone, self.text_encoder, self.uses_tokens = backbone, text_encoder, interface is TokenSequence
        width, text_width = int(fusion_dim), int(text_encoder.width)
        vision_width = backbone.hidden_size if self.uses_tokens else backbone.feature_channels[-1]
        self.image_adapter, self.text_adapter = nn.Linear(vision_width, width), nn.Linear(text_width, width)
        self.modality_embedding = nn.Embedding(2, width)  # text 0, image 1

        # Fusions: a = the queries' side. Only the sides some part reads are built (no unused parameters for DDP).
        mim_from_tokens = on["mim"] and mim_guidance == "tokens"
        fused_sentences = on["cml"] and cml_pairing == "reference"
        image_queries = (on["mim"] and not mim_from_tokens) or on["dfa"] or fused_sentences
        self.token_fusion = build_fusion(fusion, width, num_heads, fusion_layers, "a" * language + "b" *
                                         mim_from_tokens) if language or mim_from_tokens else None  # text x image
        self.sentence_fusion = build_fusion(fusion, width, num_heads, fusion_layers, "a" * image_queries + "b" *
                                            fused_sentences) if image_queries else None  # image x sentences
        if language:  # BERT's MLM transform, shared by MLM and SFR
            self.mlm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        if on["mlm"]:
            self.mlm_decoder = nn.Linear(width, text_encoder.vocabulary_size)
        if on["sfr"]:
            reference = sfr_target == "reference"
            self.sfr_head = StandardisedMLP(width, 128 if reference else width, 8 if reference else text_width)
            if reference:
                self.sfr_target_head = nn.Sequential(nn.Linear(text_width, 384), nn.ReLU(), nn.Linear(384, 8))
        if on["mim"]:
            stride = backbone.patch_size if self.uses_tokens else (backbone.feature_strides[-1],) * 3
            self.decoder = ReconstructionDecoder(width, backbone.in_channels, stride)
        gated_sentences = on["ssm"] and sentence_image_features == "reference"
        if on["cml"] or on["dfa"] or gated_sentences:
            self.image_pool = MeanPool(width)
        if on["cml"]:
            self.report_pool = AttentionPool(width, num_heads)
            pair = 2 if fused_sentences else 1
            self.image_head = contrastive_head(pair * width, embedding_dim)  # reference: the fused pair
            self.report_head = contrastive_head(pair * width, embedding_dim)  # reference: the unfused pair
            if fused_sentences:
                self.fused_report_pool = AttentionPool(width, num_heads)
        if on["dfa"] or gated_sentences:  # DFA's y <- tanh(W mean a_s) after each gate; SSM alone needs the first
            self.aggregation_gates = nn.ModuleList(UnidirectionalGate(width) for _ in range(2))
            self.aggregation_projections = nn.ModuleList(nn.Linear(width, width) for _ in range(2 if on["dfa"] else 1))
        if on["ssm"]:
            self.sentence_head = StandardisedMLP(width, width // 2, SENTENCE_DIM, tanh=True)
            if not gated_sentences:
                self.sentence_attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mask_probability, self.mim_window_size = float(mask_probability), mim_window_size
        self.mim_mask_ratio, self.temperature = float(mim_mask_ratio), float(temperature)
        self.similar_threshold, self.dissimilar_threshold = float(similar_threshold), float(dissimilar_threshold)
        self.detach_sentences = bool(detach_sentences)
        self.find_unused_parameters = fusion == "reference" or not self.uses_tokens
        self.generator = as_generator(seed)

    # ---------------------------------------------------------------- tokens
    def image_tokens(self, images: torch.Tensor, scan_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, int]]:
        """Studies ``[B, S, C, X, Y, Z]`` -> adapted tokens ``[B, S n, D]`` (scan-major), their mask (None: all
        real) and the token grid of a scan."""
        batch, scans = images.shape[:2]
        if self.uses_tokens:
            tokens, _ = self.backbone.forward_tokens(images, scan_mask=scan_mask)
            grid, tokens = tuple(tokens.shape[2:5]), tokens.flatten(1, 4)
        else:  # only the valid scans go through the backbone
            valid = torch.ones(batch * scans, dtype=torch.bool, device=images.device) if scan_mask is None \
                else scan_mask.flatten()
            maps = self.backbone.deepest_features(images.flatten(0, 1)[valid])
            per_scan = maps.new_zeros(batch * scans, *maps.shape[1:])
            per_scan[valid] = maps
            grid, tokens = tuple(maps.shape[2:]), per_scan.flatten(2).transpose(1, 2).reshape(batch, -1, maps.shape[1])
        mask = None if scan_mask is None else scan_mask.repeat_interleave(math.prod(grid), dim=1)
        return self.image_adapter(tokens) + self.modality_embedding.weight[1], mask, grid

    def text_tokens(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` -> (the text encoder's features ``[B, L, width]``, adapted tokens ``[B, L, D]``)."""
        features = self.text_encoder.encode_tokens(token_ids, attention_mask)
        adapted = self.text_adapter(features.to(self.text_adapter.weight.dtype))
        return features, adapted + self.modality_embedding.weight[0]

    def sentence_vectors(self, source: str, features: torch.Tensor, text: dict) -> torch.Tensor:
        """Stop-gradient text vectors of the sentences ``[B, S, F]``: means of the encoder's features (``"encoder"``)
        or of its embedding layer (any other source: the reference's)."""
        if source != "encoder":
            features = self.text_encoder.embed_tokens(text["token_ids"])
        return sentence_means(features.detach().float(), text["sentence_index"], text["count"])[0]

    def read_reports(self, reports: Sequence[str], device: torch.device, encode: bool = True) -> dict[str, Any]:
        """Reports -> their `SentenceTokens` (CPU, ``tokens``), sentence ``count``, and ``token_ids``,
        ``attention_mask``, ``sentence_index`` on ``device``; with ``encode`` also the unmasked report's encoder
        ``features [B, L, width]``, adapted ``words [B, L, D]``, ``sentences [B, S, D]`` and ``sentence_mask``."""
        tokens = tokenize_sentences(self.text_encoder, [split_sentences(report) for report in reports])
        empty = [index for index, row in enumerate(tokens.sentence_index) if int(row.max()) < 0]
        if empty:
            raise ConfigError(f"the reports of studies {empty} of the batch hold no words; MG-3D needs a report for "
                              "every study (leave studies without one out of the manifest).")
        text = {"tokens": tokens, "count": int(tokens.sentence_index.max()) + 1,
                **{key: getattr(tokens, key).to(device) for key in ("token_ids", "attention_mask", "sentence_index")}}
        if encode:
            text["features"], text["words"] = self.text_tokens(text["token_ids"], text["attention_mask"])
            text["sentences"], text["sentence_mask"] = sentence_means(text["words"], text["sentence_index"],
                                                                      text["count"])
        return text

    # ---------------------------------------------------------------- the three passes
    def predict_words(self, text: dict, image: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1: whole-word masked report fused with the volume -> (MLM-transformed tokens ``[B, L, D]``, labels)."""
        masked_ids, labels = whole_word_mask(text["tokens"], self.text_encoder.special_token_ids["mask"],
                                             self.text_encoder.vocabulary_size, self.mask_probability, self.generator)
        _, words = self.text_tokens(masked_ids.to(text["token_ids"].device), text["attention_mask"])
        fused, _ = self.token_fusion(words, image[0], text["attention_mask"], image[1])
        return self.mlm_transform(fused), labels.to(words.device)

    def reconstruct(self, images: torch.Tensor, scan_mask: torch.Tensor | None, text: dict
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2: the window-masked volume fused with the report -> (prediction ``[B S, C, X, Y, Z]``, voxel mask)."""
        voxel_mask = window_mask(images.shape[-3:], self.mim_window_size, self.mim_mask_ratio, self.generator,
                                 images.device)
        tokens, token_mask, grid = self.image_tokens(torch.where(voxel_mask, 0.0, images), scan_mask)
        if self.mim_guidance == "tokens":
            _, fused = self.token_fusion(text["words"], tokens, text["attention_mask"], token_mask)
        else:
            fused, _ = self.sentence_fusion(tokens, text["sentences"], token_mask, text["sentence_mask"])
        maps = fused.reshape(images.shape[0] * images.shape[1], -1, fused.shape[-1]).transpose(1, 2)
        return self.decoder(maps.reshape(*maps.shape[:2], *grid), images.shape[-3:]), voxel_mask

    def contrast(self, anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE at the fixed temperature, float32, gathered across ranks."""
        with torch.autocast(anchors.device.type, enabled=False):
            scale = torch.tensor(1.0 / self.temperature, device=anchors.device)
            return clip_loss(F.normalize(anchors.float(), dim=-1), F.normalize(candidates.float(), dim=-1), scale)

    def alignment_losses(self, image: tuple, text: dict) -> dict[str, torch.Tensor]:
        """Pass 3: CML, DFA and SSM of the unmasked volume and report."""
        tokens, token_mask, _ = image
        sentences, sentence_mask = text["sentences"], text["sentence_mask"]
        if self.detach_sentences:
            sentences = sentences.detach()
        parts, plain_image = {}, self.image_pool(tokens, token_mask) if hasattr(self, "image_pool") else None
        fused_image = fused_sentences = None
        if "dfa" in self.weights or ("cml" in self.weights and self.cml_pairing == "reference"):
            fused_tokens, fused_sentences = self.sentence_fusion(tokens, sentences, token_mask, sentence_mask)
            fused_image = self.image_pool(fused_tokens, token_mask)
        if "cml" in self.weights:
            plain_report = self.report_pool(sentences, sentence_mask)
            if self.cml_pairing == "reference":
                fused_pair = torch.cat([self.fused_report_pool(fused_sentences, sentence_mask), fused_image], dim=-1)
                parts["cml"] = self.contrast(self.image_head(fused_pair),
                                             self.report_head(torch.cat([plain_report, plain_image], dim=-1)))
            else:
                parts["cml"] = self.contrast(self.image_head(plain_image), self.report_head(plain_report))
        if hasattr(self, "aggregation_gates"):
            aggregated, summary = sentences, plain_image
            for layer, gate in enumerate(self.aggregation_gates):
                aggregated = gate(summary, aggregated)
                if layer < len(self.aggregation_projections):
                    summary = torch.tanh(self.aggregation_projections[layer](masked_mean(aggregated, sentence_mask)))
            if "dfa" in self.weights:
                parts["dfa"] = self.contrast(fused_image, summary)
        if "ssm" in self.weights:
            features = aggregated if self.sentence_image_features == "reference" else self.sentence_attention(
                sentences, tokens, tokens, need_weights=False, key_padding_mask=key_padding(token_mask))[0]
            parts["ssm"] = sentence_matching_loss(
                self.sentence_head(features), self.sentence_vectors(self.ssm_similarity, text["features"], text),
                sentence_mask, self.similar_threshold, self.dissimilar_threshold, self.ssm_average)
        return parts

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"image", "scan_mask" (optional), "report"}`` -> ``{"loss", "loss/<part>"}`` (scalar tensors)."""
        images, scan_mask = study_images(batch)
        reports = batch_reports(batch, images.shape[0])
        if {"cml", "dfa"} & set(self.weights) and images.shape[0] * world_size() < 2:
            raise ConfigError(f"MG-3D's CML and DFA need at least 2 studies per step for negatives, got "
                              f"{images.shape[0]}; set the batch size to 2 or more.")
        unmasked_text = bool({"mim", "cml", "dfa", "ssm"} & set(self.weights)) or (
            "sfr" in self.weights and self.sfr_target == "frozen")  # what reads the unmasked report
        text, parts = self.read_reports(reports, images.device, encode=unmasked_text), {}
        image = self.image_tokens(images, scan_mask) if set(self.weights) - {"mim"} else None
        if {"mlm", "sfr"} & set(self.weights):
            transformed, labels = self.predict_words(text, image)
            if "mlm" in self.weights:
                chosen = labels != IGNORE_INDEX  # the vocabulary decoder runs on the masked tokens alone
                parts["mlm"] = masked_token_loss(self.mlm_decoder(transformed[chosen]), labels[chosen])
            if "sfr" in self.weights:
                predicted, sentence_mask = sentence_means(transformed, text["sentence_index"], text["count"])
                target = self.sfr_target_head(self.sentence_vectors("embeddings", None, text)) \
                    if self.sfr_target == "reference" else self.sentence_vectors("encoder", text["features"], text)
                parts["sfr"] = sentence_reconstruction_loss(self.sfr_head(predicted), target, sentence_mask,
                                                            summed=self.sfr_target == "reference")
        if "mim" in self.weights:
            prediction, voxel_mask = self.reconstruct(images, scan_mask, text)
            parts["mim"] = masked_reconstruction_loss(prediction, images.flatten(0, 1), voxel_mask, self.mim_mask_ratio,
                                                      None if scan_mask is None else scan_mask.flatten())
        parts.update(self.alignment_losses(image, text) if {"cml", "dfa", "ssm"} & set(self.weights) else {})
        loss = sum(self.weights[part] * value for part, value in parts.items())
        return {"loss": loss, **{f"loss/{part}": parts[part].detach() for part in PARTS if part in parts}}

    # ---------------------------------------------------------------- embeddings: zero-shot and retrieval
    def joint_space(self) -> None:  # refuse embeddings without CML's volume and report heads
        if "cml" not in self.weights or self.cml_pairing != "volume_report":
            raise ConfigError("study and report embeddings come from MG-3D's CML heads; set cml_weight above 0 and "
                              "cml_pairing to 'volume_report' for zero-shot classification and retrieval.")

    def encode_studies(self, images: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Studies ``[B, S, C, X, Y, Z]`` or scans -> L2-normalised ``[B, embedding_dim]``: g_u^v, CML's image head."""
        self.joint_space()
        tokens, token_mask, _ = self.image_tokens(*study_images({"image": images, "scan_mask": scan_mask}))
        return F.normalize(self.image_head(self.image_pool(tokens, token_mask)).float(), dim=-1)

    def encode_reports(self, reports: Sequence[str]) -> torch.Tensor:
        """Report texts (B strings) -> L2-normalised ``[B, embedding_dim]``: g_u^t, CML's report head."""
        self.joint_space()
        text = self.read_reports(batch_reports({"report": reports}, len(reports)), self.image_adapter.weight.device)
        return F.normalize(self.report_head(self.report_pool(text["sentences"], text["sentence_mask"])).float(), dim=-1)

    def current_logit_scale(self) -> torch.Tensor:  # CML's fixed 1 / temperature, for the zero-shot pair softmax
        return torch.tensor(1.0 / self.temperature)

    # ---------------------------------------------------------------- picture
    @torch.no_grad()
    def views(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """What the first study of a batch looks like to MG-3D (CPU, for `save_views_picture`), in evaluation mode
        (restored afterwards): middle z slices ``[X, Y]`` of its first valid scan (``input``, ``masked``, ``mask``,
        ``reconstruction``: visible voxels from the input, masked ones predicted; MIM only), the ``report``, and its
        ``masked_words`` with the ``predicted_words`` (MLM only)."""
        images, scan_mask = study_images(batch)
        reports = batch_reports(batch, images.shape[0])[:1]
        images, scan_mask = images[:1], None if scan_mask is None else scan_mask[:1]
        scan = 0 if scan_mask is None else int(scan_mask[0].nonzero()[0, 0])
        middle = images.shape[-1] // 2
        views: dict[str, Any] = {"report": reports[0], "input": images[0, scan, 0, :, :, middle].float().cpu()}
        with eval_mode(self):
            text = self.read_reports(reports, images.device)
            if "mim" in self.weights:
                prediction, voxel_mask = self.reconstruct(images, scan_mask, text)
                voxel_mask = voxel_mask[0, 0, :, :, middle].cpu()
                predicted = prediction[scan, 0, :, :, middle].float().cpu()
                views.update(masked=torch.where(voxel_mask, 0.0, views["input"]), mask=voxel_mask,
                             reconstruction=torch.where(voxel_mask, predicted, views["input"]))
            if "mlm" in self.weights:
                transformed, labels = self.predict_words(text, self.image_tokens(images, scan_mask))
                chosen = labels[0] != IGNORE_INDEX
                guesses = self.mlm_decoder(transformed[0, chosen]).argmax(dim=-1)
                views.update(masked_words=self.text_encoder.token_strings(labels[0, chosen].tolist()),
                             predicted_words=self.text_encoder.token_strings(guesses.tolist()))
        return views


def save_views_picture(views: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of `MG3DPretext.views`: the input, masked input and reconstruction (middle z slice, one intensity
    scale; those MIM draws), and the report with its masked words and the model's guesses.

    matplotlib is imported lazily; the file appears complete or not at all.
    """
    panels = [(views[key], title) for key, title in [("input", "input"), ("masked", "masked (MIM)"),
                                                     ("reconstruction", "reconstruction")] if key in views]
    low, high = float(views["input"].min()), float(views["input"].max())
    figure, axes = new_figure(3.0 * len(panels) + 4.0, 3.4, 1, len(panels) + 1)
    for axis, (values, title) in zip(axes[0], panels):
        show_axial(axis, values, letters=True, cmap="gray", vmin=low, vmax=max(high, low + 1e-6),
                   interpolation="nearest")
        axis.set_title(title, fontsize=9)
    lines = [views["report"]]
    if "masked_words" in views:
        lines.append("masked -> predicted: " + ", ".join(
            f"'{word}' -> '{guess}'" for word, guess in zip(views["masked_words"], views["predicted_words"])))
    text = "\n\n".join(textwrap.fill(line, width=52, max_lines=8, placeholder=" ...") for line in lines)
    axes[0, -1].text(0.0, 0.5, text, fontsize=7, va="center", ha="left", transform=axes[0, -1].transAxes)
    figure.suptitle("MG-3D: masked volume and report, first study, middle z slice", fontsize=9)
    return save_figure(figure, path)
