"""Cross-modal fusion layers, poolers and heads for language-image pretraining (MG-3D, specs/mg3d.md section 1).

Two sets of tokens meet: ``a [B, n_a, D]`` and ``b [B, n_b, D]`` with masks ``[B, n]`` (True = a real token,
None = all real). Every fusion has ``forward(a, b, a_mask, b_mask) -> (a', b')``:

- `GatedFusion` (``"reference"``): MG-3D's gated module G. A token keeps its *own* value, scaled by the mean of a
  sigmoid gate over the other modality: ``a'_i = mean_j sigmoid(q_i . k_j / sqrt(D)) v_i`` (and the same for b),
  single head, no residual, norm or MLP; pads are left out of the mean (the reference averages over them too).
- `CrossAttentionFusion` (``"attention"``): pre-norm residual cross-attention blocks; only the sides asked for are
  updated (queries), the other side is the key-value set and comes back unchanged.

`UnidirectionalGate` is MG-3D's U(q; kv) with each context item its own key-value set; `MeanPool` and
`AttentionPool` turn token sets into one vector, `sentence_means` a report's tokens into sentence features;
`StandardisedMLP`, `ReconstructionDecoder` and `contrastive_head` are MG-3D's sentence, MIM and contrastive heads.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from voco.errors import require_choice
from voco.networks.vit import MLP

FUSIONS = ("attention", "reference")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """The mean of ``tokens`` over ``dim`` where ``mask`` (same shape without the channels) is True."""
    if mask is None:
        return tokens.mean(dim=dim)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=dim) / weights.sum(dim=dim).clamp(min=1)


def sentence_means(features: torch.Tensor, sentence_index: torch.Tensor, count: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features ``[B, L, F]`` averaged per sentence (``sentence_index [B, L]``, -1 = none) -> ``([B, count, F],
    sentence mask [B, count])``; a sentence a report lacks is zero and False."""
    one_hot = F.one_hot(sentence_index + 1, count + 1)[..., 1:].to(features.dtype)  # -1: the dropped column
    sizes = one_hot.sum(dim=1)
    return one_hot.transpose(1, 2) @ features / sizes.clamp(min=1)[..., None], sizes > 0


def key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A True-is-real mask as `nn.MultiheadAttention`'s ``key_padding_mask`` (True = ignore)."""
    return None if mask is None else ~mask.bool()


class GatedCrossLayer(nn.Module):
    """One layer of MG-3D's gated module G: ``[B, n_a, D], [B, n_b, D] -> same shapes``.

    >>> layer = GatedCrossLayer(8)
    >>> a_out, b_out = layer(torch.randn(2, 3, 8), torch.randn(2, 5, 8))
    >>> tuple(a_out.shape), tuple(b_out.shape)
    ((2, 3, 8), (2, 5, 8))
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query_a, self.key_a, self.value_a = (nn.Linear(width, width) for _ in range(3))
        self.query_b, self.key_b, self.value_b = (nn.Linear(width, width) for _ in range(3))

    @staticmethod
    def gate(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``mean_j sigmoid(q_i . k_j / sqrt(D))`` over the real keys: one gate in (0, 1) per query ``[B, n_q, 1]``."""
        gates = torch.sigmoid(queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1]))
        return masked_mean(gates.transpose(1, 2), key_mask)[..., None]

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None = None,
                b_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate(self.query_a(a), self.key_b(b), b_mask) * self.value_a(a),
                self.gate(self.query_b(b), self.key_a(a), a_mask) * self.value_b(b))


class GatedFusion(nn.Module):
    """``layers`` `GatedCrossLayer` s, each taking both outputs of the one before (MG-3D: two)."""

    def __init__(self, width: int, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GatedCrossLayer(width) for _ in range(layers))

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None = None,
                b_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            a, b = layer(a, b, a_mask, b_mask)
        return a, b


class CrossAttentionLayer(nn.Module):
    """Pre-norm residual cross-attention: ``q + attn(norm(q), norm(kv))``, then ``q + mlp(norm(q))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_query, self.norm_context, self.norm_mlp = (nn.LayerNorm(width) for _ in range(3))
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, queries: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(queries), context, context,
                                     key_padding_mask=key_padding(context_mask), need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


class CrossAttentionFusion(nn.Module):
    """``layers`` cross-attention layers per updated side (``update``: "a", "b" or "ab"); a layer of each side reads
    the other side's state before that layer. Only the updated sides have parameters."""

    def __init__(self, width: int, num_heads: int = 8, layers: int = 2, update: str = "ab") -> None:
        super().__init__()
        self.a_from_b = nn.ModuleList(CrossAttentionLayer(width, num_heads) for _ in range(layers * ("a" in update)))
        self.b_from_a = nn.ModuleList(CrossAttentionLayer(width, num_heads) for _ in range(layers * ("b" in update)))

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None = None,
                b_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in range(max(len(self.a_from_b), len(self.b_from_a))):
            a, b = (self.a_from_b[layer](a, b, b_mask) if self.a_from_b else a,
                    self.b_from_a[layer](b, a, a_mask) if self.b_from_a else b)
        return a, b


def build_fusion(kind: str, width: int, num_heads: int = 8, layers: int = 2, update: str = "ab") -> nn.Module:
    """`GatedFusion` (``"reference"``; always updates both sides) or `CrossAttentionFusion` (``"attention"``)."""
    require_choice("fusion", kind, FUSIONS)
    return GatedFusion(width, layers) if kind == "reference" else CrossAttentionFusion(width, num_heads, layers, update)


class UnidirectionalGate(nn.Module):
    """MG-3D's U(q; kv) with each context item its own key-value set: ``sigmoid(Q(q) . K(c_s) / sqrt(D)) V(c_s)``,
    a sigmoid (not a softmax) gate on each item's value. ``q [B, D], context [B, S, D] -> [B, S, D]``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        scores = (self.query(query)[:, None] * self.key(context)).sum(dim=-1, keepdim=True)
        return torch.sigmoid(scores / math.sqrt(query.shape[-1])) * self.value(context)


class MeanPool(nn.Module):
    """``tanh(Linear(mean of the real tokens))``: ``[B, n, D] -> [B, D]``. MG-3D weights its 48 token positions by
    a ``Linear(48, 1)``, which fixes the token count; the mean takes any input size and padded scans."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.dense(masked_mean(tokens, mask)))


class AttentionPool(nn.Module):
    """CLIP's attention pool: the mean token, prepended to the tokens, attends to all of them (pads hidden).
    ``[B, n, D] -> [B, D]``."""

    def __init__(self, width: int, num_heads: int = 8) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mean = masked_mean(tokens, mask)[:, None]
        keys = torch.cat([mean, tokens], dim=1)
        key_mask = None if mask is None else torch.cat([mask.new_ones(mask.shape[0], 1), mask.bool()], dim=1)
        pooled, _ = self.attention(mean, keys, keys, key_padding_mask=key_padding(key_mask), need_weights=False)
        return pooled[:, 0]


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------
class StandardisedMLP(nn.Module):
    """Linear -> standardisation -> GELU -> Linear (-> tanh): MG-3D's sentence heads. Their BatchNorm1d (no affine,
    no running statistics) sees ``[1, S, hidden]``, so it standardises each sentence over its features: a LayerNorm
    without affine."""

    def __init__(self, in_features: int, hidden: int, out_features: int, tanh: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.tanh = nn.Linear(in_features, hidden), nn.Linear(hidden, out_features), tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        x = self.second(F.gelu(F.layer_norm(x, x.shape[-1:])))
        return torch.tanh(x) if self.tanh else x


class ReconstructionDecoder(nn.Module):
    """MG-3D's MIM decoder: per stage a 3^3 conv, InstanceNorm, LeakyReLU, then trilinear x2 (the last stage lands on
    the input size), channels halving to ``width / 16`` (768 -> 384 -> 192 -> 96 -> 48 -> 48), then a 1^3 conv.
    ``log2(token stride)`` stages: ``[M, width, d, h, w] -> [M, out_channels, X, Y, Z]``."""

    def __init__(self, width: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        stages = max(1, math.ceil(math.log2(max(stride))))
        channels = [max(width // 2 ** min(stage, stages - 1), 8) for stage in range(stages + 1)]
        self.stages = nn.ModuleList(Convolution(3, channels[k], channels[k + 1], kernel_size=3, norm="instance",
                                                act="leakyrelu") for k in range(stages))
        self.head = nn.Conv3d(channels[-1], out_channels, kernel_size=1)

    def forward(self, maps: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        grid = maps.shape[2:]
        for stage, block in enumerate(self.stages, 1):
            size = tuple(output_size) if stage == len(self.stages) else tuple(
                min(g * 2 ** stage, int(o)) for g, o in zip(grid, output_size))
            maps = F.interpolate(block(maps), size=size, mode="trilinear", align_corners=False)
        return self.head(maps)


def contrastive_head(width: int, embedding_dim: int) -> nn.Module:
    """MG-3D's contrastive head: LayerNorm, Linear without bias (the caller L2-normalises)."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embedding_dim, bias=False))


__all__ = ["FUSIONS", "GatedCrossLayer", "GatedFusion", "CrossAttentionLayer", "CrossAttentionFusion", "build_fusion",
           "UnidirectionalGate", "MeanPool", "AttentionPool", "masked_mean", "sentence_means", "key_padding",
           "StandardisedMLP", "ReconstructionDecoder", "contrastive_head"]
