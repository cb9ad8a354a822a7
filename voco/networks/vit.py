"""A 3-D Vision Transformer whose attention layout says, block by block, which tokens attend together.

One stack of standard pre-norm transformer blocks (attention through ``scaled_dot_product_attention``, so
fused kernels are used on GPUs). What changes between the reference systems is only how tokens are grouped
for attention in each block — a *layout*, not a separate model class:

- ``global``: every token of the input attends to every other (plain ViT, MAE).
- ``window``: non-shifted 3-D windows of tokens, with global attention in every k-th block (ViTDet and the
  mammography slides done right: windows everywhere except blocks 2, 5, 8, 11 of 12 for k = 3).
- ``scan`` and ``slice``: HLIP's hierarchy for studies ``[B, N_scans, C, X, Y, Z]``: *slice* = the tokens of one
  patch-thick slab along the last spatial axis (z, the axial direction of RAS volumes), *scan* = all tokens of
  one scan, *study* = all tokens of all scans of a study. ``scan`` is the two-level layout (study blocks
  2, 5, 8, 11, scan blocks elsewhere), ``slice`` the three-level one (slice 0, 3, 6, 9; scan 1, 4, 7, 10;
  study 2, 5, 8, 11). A single scan is N = 1, where study = scan = global.

Extra tokens (a CLS, query or box token owned by a pretext head) are copied into every group of a block and
the copies averaged back when the block's groups merge, as HLIP and the slides do. No layout adds parameters,
so weights move freely between layouts.

Position embeddings: frozen 3-D sin-cos (default; each axis gets a third of the channels, MONAI's channel
order) or log-spaced Fourier features of coordinates normalised to [-1, 1] through an MLP (learnable
frequencies, highest ≈ half the grid: the Nyquist limit). A sin-cos table made for one grid is trilinearly
interpolated when the input's grid differs. Studies add a frozen 1-D sin-cos scan-index embedding whose
positions are permuted at random in training (scan order carries no meaning).

Parameter names are MONAI's ``ViT`` names (``patch_embedding.patch_embeddings``, ``blocks.i.attn.qkv``,
``blocks.i.mlp.linear1`` ...), so the encoder of a ViT trained here loads by name into MONAI's ``ViT`` /
``UNETR`` (with ``qkv_bias=True``); the downstream benchmark builds a UNETR around this class directly
(`UNETRViT`), so a windowed layout is kept in fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from voco.errors import ConfigError

LAYOUTS = ("global", "window", "scan", "slice")
GROUPINGS = ("global", "window", "slice", "scan", "study")
POSITION_EMBEDDINGS = ("sincos", "fourier")
# hidden size, depth, heads (MLP 4x). tiny is for tests; depth 12 so that UNETR's skip connections exist.
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 96, "depth": 12, "num_heads": 3},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
}


def as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """One positive int or three -> a 3-tuple; ConfigError naming the setting otherwise."""
    values = (int(value),) * 3 if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"{name} must be one positive int or three, got {value!r}.")
    return values  # type: ignore[return-value]


def block_groupings(layout: str | Sequence[str], depth: int, global_every: int = 3) -> tuple[str, ...]:
    """The grouping of each block: a layout name expanded over ``depth`` blocks, or an explicit list.

    ``global_every = k`` puts the coarsest grouping in blocks k-1, 2k-1, ... (2, 5, 8, 11 for k = 3, depth 12).

    >>> block_groupings("window", 6)
    ('window', 'window', 'global', 'window', 'window', 'global')
    >>> block_groupings("slice", 6)
    ('slice', 'scan', 'study', 'slice', 'scan', 'study')
    """
    if not isinstance(layout, str):
        groupings = tuple(str(g) for g in layout)
        unknown = [g for g in groupings if g not in GROUPINGS]
        if len(groupings) != depth or unknown:
            raise ConfigError(f"an explicit layout needs {depth} groupings from {', '.join(GROUPINGS)}, got "
                              f"{list(groupings)}.")
        return groupings
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown attention layout {layout!r}; use one of {', '.join(LAYOUTS)} or a list of "
                          f"{depth} groupings.")
    if global_every < 1:
        raise ConfigError(f"global_every is {global_every}; use 1 or more (ViTDet and HLIP: 3).")
    if layout == "global":
        return ("global",) * depth
    if layout == "slice":  # HLIP three-level: slice, scan, study, slice, ...
        return tuple(("slice", "scan", "study")[i % 3] for i in range(depth))
    local, coarse = ("window", "global") if layout == "window" else ("scan", "study")
    return tuple(coarse if (i + 1) % global_every == 0 else local for i in range(depth))


# --------------------------------------------------------------------------------------------------
# Grouping tokens for attention
# --------------------------------------------------------------------------------------------------
def partition(tokens: torch.Tensor, grouping: str, window_size: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """Patch tokens ``[B, N, d, h, w, C]`` -> groups ``[B * G, T, C]`` that attend within themselves.

    global/study: G = 1, T = N d h w; scan: G = N, T = d h w; slice: G = N w, T = d h (one z slab);
    window: G = N (d/a)(h/b)(w/c), T = a b c for a window (a, b, c).
    """
    batch, scans, d, h, w, channels = tokens.shape
    if grouping in ("global", "study"):
        return tokens.reshape(batch, scans * d * h * w, channels)
    if grouping == "scan":
        return tokens.reshape(batch * scans, d * h * w, channels)
    if grouping == "slice":
        return tokens.permute(0, 1, 4, 2, 3, 5).reshape(batch * scans * w, d * h, channels)
    if grouping == "window":
        a, b, c = window_size
        windows = tokens.view(batch, scans, d // a, a, h // b, b, w // c, c, channels)
        return windows.permute(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(-1, a * b * c, channels)
    raise ConfigError(f"unknown grouping {grouping!r}; use one of {', '.join(GROUPINGS)}.")


def merge(groups: torch.Tensor, grouping: str, shape: Sequence[int], window_size: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """The inverse of `partition`: groups ``[B * G, T, C]`` -> patch tokens of ``shape`` ``[B, N, d, h, w, C]``."""
    batch, scans, d, h, w, channels = shape
    if grouping in ("global", "study", "scan"):
        return groups.reshape(batch, scans, d, h, w, channels)
    if grouping == "slice":
        return groups.reshape(batch, scans, w, d, h, channels).permute(0, 1, 3, 4, 2, 5)
    a, b, c = window_size
    windows = groups.reshape(batch, scans, d // a, h // b, w // c, a, b, c, channels)
    return windows.permute(0, 1, 2, 5, 3, 6, 4, 7, 8).reshape(batch, scans, d, h, w, channels)


def copy_extra_tokens(extra: torch.Tensor, groups_per_sample: int) -> torch.Tensor:
    """Extra tokens ``[B, E, C]`` copied into each of the G groups of every sample: ``[B * G, E, C]``."""
    return extra.repeat_interleave(groups_per_sample, dim=0)


def average_extra_tokens(copies: torch.Tensor, groups_per_sample: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The copies ``[B * G, E, C]`` averaged back into ``[B, E, C]`` (weighted by ``weights [B, G]`` if given:
    groups of padded scans get weight 0)."""
    copies = copies.reshape(-1, groups_per_sample, *copies.shape[1:])
    if weights is None:
        return copies.mean(dim=1)
    weights = weights.to(copies.dtype)
    return (copies * weights[:, :, None, None]).sum(dim=1) / weights.sum(dim=1).clamp(min=1)[:, None, None]


# --------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------
def sincos_position_embedding(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Frozen 3-D sin-cos embedding ``[d h w, dim]`` of a token grid; each axis gets ``2 (dim // 6)`` channels
    (MONAI's ``build_sincos_position_embedding`` order: axis 1, axis 0, axis 2), zero-padded up to ``dim``."""
    per_axis = dim // 6
    if per_axis == 0:
        raise ConfigError(f"a 3-D sin-cos position embedding needs a hidden size of at least 6, got {dim}.")
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float32) / per_axis)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for axis in (1, 0, 2):
        angles = axes[axis].flatten()[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """1-D sin-cos embedding ``[n, dim]`` of positions ``[n]`` (the scan-index embedding of studies)."""
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32, device=positions.device) / max(half, 1))
    angles = positions.float()[:, None] * omega[None]
    return F.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), (0, dim - 2 * half))


class FourierPositionEmbedding(nn.Module):
    """Fourier features of token coordinates normalised to [-1, 1], through an MLP: ``grid -> [d h w, dim]``.

    Frequencies are log-spaced from 1 to the Nyquist limit of the largest grid side, (n - 1) / 2 (the slides'
    public code passes one far above it), and learnable. Any grid works, so nothing is interpolated.
    """

    def __init__(self, dim: int, grid: Sequence[int], num_frequencies: int = 16) -> None:
        super().__init__()
        highest = max((max(grid) - 1) / 2.0, 1.0)  # coordinates linspace(-1, 1, n): Nyquist at (n - 1) / 2
        self.log_frequencies = nn.Parameter(torch.linspace(0.0, math.log(highest), num_frequencies))
        self.mlp = nn.Sequential(nn.Linear(3 * 2 * num_frequencies, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        device = self.log_frequencies.device
        axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in grid]
        coordinates = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [T, 3]
        angles = math.pi * coordinates[:, :, None] * self.log_frequencies.exp()[None, None]  # [T, 3, F]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1))


# --------------------------------------------------------------------------------------------------
# Blocks (MONAI's parameter names)
# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``: ``[G, T, C] -> [G, T, C]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows ordered (q|k|v, head, channel) as in MONAI
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        groups, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(groups, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.out_proj(x.transpose(1, 2).reshape(groups, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); optional stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def _residual(self, branch: torch.Tensor, groups_per_sample: int = 1) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return branch
        # Stochastic depth drops a whole sample's branch: one draw per sample, shared by all its attention groups.
        keep = torch.rand(branch.shape[0] // groups_per_sample, 1, 1, device=branch.device) >= self.drop_path
        return branch * keep.repeat_interleave(groups_per_sample, dim=0).to(branch.dtype) / (1.0 - self.drop_path)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                groups_per_sample: int = 1) -> torch.Tensor:
        """``x [B * G, T, C]``: G attention groups of each of B samples, consecutive."""
        x = x + self._residual(self.attn(self.norm1(x), attention_mask), groups_per_sample)
        return x + self._residual(self.mlp(self.norm2(x)), groups_per_sample)


class PatchEmbedding(nn.Module):
    """Non-overlapping 3-D patches -> tokens (a strided convolution; anisotropic patches allowed)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: Sequence[int], grid: Sequence[int],
                 position_embedding: str) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        if position_embedding == "sincos":  # frozen, but saved: MONAI's ViT/UNETR keep theirs under this name
            self.register_buffer("position_embeddings", sincos_position_embedding(grid, hidden_size)[None])
        self.grid = tuple(grid)


# --------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------
class ViTEncoder(nn.Module):
    """3-D ViT with a per-block attention layout.

    Args:
        in_channels: input channels.
        input_size: the input size ``(X, Y, Z)`` the position table is made for (other sizes divisible by the
            patch are interpolated).
        patch_size: patch size, one int or three (anisotropic, e.g. ``(16, 16, 8)``).
        hidden_size, depth, num_heads, mlp_ratio: the transformer (see `VIT_SIZES`).
        layout: ``"global"``, ``"window"``, ``"scan"``, ``"slice"`` or a list of ``depth`` groupings
            (``global``, ``window``, ``slice``, ``scan``, ``study``); see the module docstring.
        window_size: window in tokens (one int or three) for ``window`` blocks; must divide the token grid.
        global_every: k: the coarsest grouping in every k-th block (3).
        position_embedding: ``"sincos"`` (frozen, default) or ``"fourier"``.
        max_scans: scans per study the scan-index embedding covers (studies only).
        qkv_bias: bias of the qkv projection (MAE and timm: True).
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks.
        use_checkpoint: gradient checkpointing of each block (less memory, about 30 % more compute).
        input_standardise: ``(centre, spread)``: the encoder sees ``(x - centre) / spread`` (None: x as given). A
            from-scratch ViT learns little from a preset's [0, 1] (all positive, mean ~0.3: the patch embedding's
            output is small beside the position code); ``(0.5, 0.125)`` centres the window. Part of the backbone
            spec, so checkpoints, probes and fine-tuning rebuild it and feed the same [0, 1] volumes.

    Shapes: images ``[B, C, X, Y, Z]`` or studies ``[B, N, C, X, Y, Z]``; tokens ``[B, N, d, h, w, hidden]``.
    ``forward(images) -> [B, hidden]`` (mean of the final patch tokens), the ``embedding_dim`` every pretext uses.

    >>> encoder = ViTEncoder(input_size=32, patch_size=8, **VIT_SIZES["tiny"], layout="window", window_size=2)
    >>> encoder(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 96])
    """

    def __init__(self, in_channels: int = 1, input_size: int | Sequence[int] = 96, patch_size: int | Sequence[int] = 16,
                 hidden_size: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 layout: str | Sequence[str] = "global", window_size: int | Sequence[int] = 3, global_every: int = 3,
                 position_embedding: str = "sincos", max_scans: int = 16, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                 input_standardise: Sequence[float] | None = None) -> None:
        super().__init__()
        if input_standardise is not None and (len(input_standardise) != 2 or not float(input_standardise[1]) > 0):
            raise ConfigError(f"input_standardise must be [centre, spread] with spread > 0, got {input_standardise!r}.")
        self.input_standardise = None if input_standardise is None else tuple(float(v) for v in input_standardise)
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(f"unknown position_embedding {position_embedding!r}; use one of "
                              f"{', '.join(POSITION_EMBEDDINGS)}.")
        self.in_channels, self.hidden_size, self.depth = in_channels, hidden_size, depth
        self.patch_size = as_triple(patch_size, "patch_size")
        self.input_size = as_triple(input_size, "input_size")
        self.window_size = as_triple(window_size, "window_size")
        self.groupings = block_groupings(layout, depth, global_every)
        self.layout = layout if isinstance(layout, str) else "custom"
        if "window" in self.groupings and "slice" in self.groupings:
            raise ConfigError(f"the layout {list(self.groupings)} mixes window and slice blocks; use one of the two.")
        # The finest grouping fixes the token order for the whole stack (see `encode`).
        self.finest_grouping = next((g for g in ("window", "slice") if g in self.groupings), "scan")
        grid = self.token_grid(self.input_size)
        self.position_embedding_kind, self.max_scans = position_embedding, int(max_scans)
        self.patch_embedding = PatchEmbedding(in_channels, hidden_size, self.patch_size, grid, position_embedding)
        if position_embedding == "fourier":
            self.position_encoder = FourierPositionEmbedding(hidden_size, grid)
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates)
        self.norm = nn.LayerNorm(hidden_size)
        self.use_checkpoint = use_checkpoint
        self.embedding_dim = hidden_size
        self.spatial_divisor = self.patch_size

    # ---------------------------------------------------------------- shapes
    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """Token grid ``(d, h, w)`` of an input size; raises ConfigError when the patch or window does not fit."""
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or any(s % p for s, p in zip(size, self.patch_size)):
            raise ConfigError(f"input size {size} is not divisible by the patch size {self.patch_size}; crop or pad "
                              "the input, or change patch_size.")
        grid = tuple(s // p for s, p in zip(size, self.patch_size))
        if "window" in self.groupings and any(g % w for g, w in zip(grid, self.window_size)):
            raise ConfigError(f"the token grid {grid} (input {size} / patch {self.patch_size}) is not divisible by the "
                              f"attention window {self.window_size}; set window_size to a divisor of the grid.")
        return grid  # type: ignore[return-value]

    @property
    def can_drop_tokens(self) -> bool:
        """Whether a subset of tokens can be encoded alone (MAE): only when every block attends globally."""
        return all(g in ("global", "study") for g in self.groupings)

    # ---------------------------------------------------------------- embedding
    def position_table(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding ``[d h w, hidden]`` for a token grid (interpolated sin-cos or Fourier features)."""
        if self.position_embedding_kind == "fourier":
            return self.position_encoder(grid)
        table = self.patch_embedding.position_embeddings[0]
        if tuple(grid) == self.patch_embedding.grid:
            return table
        volume = table.T.reshape(1, self.hidden_size, *self.patch_embedding.grid)
        return F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)[0].flatten(1).T

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, X, Y, Z]`` or studies ``[B, N, C, X, Y, Z]`` -> tokens ``[B, N, d, h, w, hidden]`` with
        position (and, for studies, scan-index) embeddings added."""
        study = images.ndim == 6  # studies get scan-index embeddings, also of one scan (padding must not change it)
        if images.ndim == 5:
            images = images[:, None]
        if images.ndim != 6 or images.shape[2] != self.in_channels:
            raise ConfigError(f"the ViT takes [B, {self.in_channels}, X, Y, Z] or [B, N, {self.in_channels}, X, Y, Z], "
                              f"got {tuple(images.shape)}.")
        batch, scans = images.shape[:2]
        grid = self.token_grid(images.shape[3:])
        if self.input_standardise is not None:
            centre, spread = self.input_standardise
            images = (images - centre) / spread
        tokens = self.patch_embedding.patch_embeddings(images.flatten(0, 1))  # [B N, C, d, h, w]
        tokens = tokens.permute(0, 2, 3, 4, 1).reshape(batch, scans, *grid, self.hidden_size)
        tokens = tokens + self.position_table(grid).to(tokens.dtype).view(1, 1, *grid, self.hidden_size)
        if study:
            if scans > self.max_scans:
                raise ConfigError(f"a study has {scans} scans but the encoder's max_scans is {self.max_scans}; "
                                  "raise max_scans.")
            order = torch.randperm(self.max_scans, device=tokens.device)[:scans] if self.training else \
                torch.arange(scans, device=tokens.device)
            scan_embedding = sincos_1d(order, self.hidden_size).to(tokens.dtype)
            tokens = tokens + scan_embedding.view(1, scans, 1, 1, 1, self.hidden_size)
        return tokens

    # ---------------------------------------------------------------- blocks
    def _run_block(self, block: Block, x: torch.Tensor, mask: torch.Tensor | None,
                   groups_per_sample: int = 1) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, mask, groups_per_sample, use_reentrant=False)
        return block(x, mask, groups_per_sample)

    def encode(self, tokens: torch.Tensor, extra: torch.Tensor | None = None, scan_mask: torch.Tensor | None = None,
               hidden_states: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks with the layout's grouping, then the final norm.

        Args:
            tokens: ``[B, N, d, h, w, C]`` from `embed`.
            extra: optional extra tokens ``[B, E, C]`` (CLS, query, box): copied into every group, averaged back.
            scan_mask: optional ``[B, N]`` bools, False for padded scans: their tokens are not attended to in
                study blocks and their groups do not count in the average of the extra tokens.
            hidden_states: a list that receives each block's patch tokens ``[B, N d h w, C]`` (for UNETR).

        Returns:
            ``(tokens [B, N, d, h, w, C], extra [B, E, C] or None)``, normalised.

        The tokens are put in the order of the layout's finest grouping once, before the first block (window-
        or slice-major): attention and MLP do not care about token order, so every coarser grouping is then a
        free reshape of the same sequence, and no block copies tokens to regroup them.
        """
        shape = tokens.shape
        batch, scans, d, h, w, channels = shape
        num_extra = 0 if extra is None else extra.shape[1]
        finest = self.finest_grouping
        sequence = partition(tokens, finest, self.window_size).reshape(batch, -1, channels)
        groups_in_scan = 1 if finest == "scan" else (
            w if finest == "slice" else math.prod(g // s for g, s in zip((d, h, w), self.window_size)))
        groups_per_sample = {"global": 1, "study": 1, "scan": scans, finest: scans * groups_in_scan}

        def natural_order(sequence: torch.Tensor) -> torch.Tensor:
            return merge(sequence.reshape(batch * scans * groups_in_scan, -1, channels), finest, shape,
                         self.window_size)

        for block, grouping in zip(self.blocks, self.groupings):
            per_sample = groups_per_sample[grouping]
            groups = sequence.reshape(batch * per_sample, -1, channels)
            mask = group_weights = None
            if scan_mask is not None:
                if per_sample == 1:  # study blocks: keys of padded scans are hidden; extra tokens stay visible
                    keys = torch.cat([scan_mask.new_ones(batch, num_extra),
                                      scan_mask[:, :, None].expand(-1, -1, d * h * w).reshape(batch, -1)], dim=1)
                    mask = keys[:, None, None, :]
                else:  # groups inside one scan: a padded scan's groups are left out of the extra-token average
                    group_weights = scan_mask[:, :, None].expand(-1, -1, per_sample // scans).reshape(batch, -1)
            if extra is not None:
                groups = torch.cat([copy_extra_tokens(extra, per_sample), groups], dim=1)
            groups = self._run_block(block, groups, mask, per_sample)
            if extra is not None:
                extra = average_extra_tokens(groups[:, :num_extra], per_sample, group_weights)
                groups = groups[:, num_extra:]
            sequence = groups.reshape(batch, -1, channels)
            if hidden_states is not None:
                hidden_states.append(natural_order(sequence).reshape(batch, -1, channels))
        return self.norm(natural_order(sequence)), None if extra is None else self.norm(extra)

    def encode_sequence(self, sequence: torch.Tensor, extra: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks on any token sequence ``[B, L, C]`` (e.g. the visible tokens of MAE) with global
        attention; only for layouts whose blocks are all global (`can_drop_tokens`)."""
        if not self.can_drop_tokens:
            raise ConfigError(f"the {self.layout} layout groups tokens by position, so a subset of tokens cannot be "
                              "encoded alone; use layout 'global' or the SimMIM variant, which keeps every token.")
        num_extra = 0 if extra is None else extra.shape[1]
        x = sequence if extra is None else torch.cat([extra, sequence], dim=1)
        for block in self.blocks:
            x = self._run_block(block, x, None)
        x = self.norm(x)
        return x[:, num_extra:], (x[:, :num_extra] if extra is not None else None)

    def forward_tokens(self, images: torch.Tensor, extra: torch.Tensor | None = None,
                       scan_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``embed`` then ``encode``: images or studies -> ``(tokens [B, N, d, h, w, C], extra)``."""
        return self.encode(self.embed(images), extra, scan_mask)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Single-scan images ``[B, C, X, Y, Z]`` -> feature map ``[B, hidden, d, h, w]``."""
        tokens, _ = self.forward_tokens(images)
        return tokens[:, 0].permute(0, 4, 1, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, X, Y, Z] -> [B, hidden]``: the mean of the final patch tokens."""
        tokens, _ = self.forward_tokens(images)
        return tokens.flatten(1, 4).mean(dim=1)


class UNETRViT(ViTEncoder):
    """`ViTEncoder` with the interface of MONAI's ``ViT`` inside ``UNETR``: ``forward(x) -> (tokens [B, n, C],
    [hidden state of every block])``, so a UNETR keeps this encoder's layout and position embedding."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        hidden_states: list[torch.Tensor] = []
        tokens, _ = self.encode(self.embed(images), hidden_states=hidden_states)
        return tokens.flatten(1, 4), hidden_states


def vit_spec(size: str | int) -> dict[str, int]:
    """hidden size, depth and heads of a named ViT size (tiny, S, B, L)."""
    by_name = {name.lower(): spec for name, spec in VIT_SIZES.items()}
    if str(size).lower() not in by_name:
        raise ConfigError(f"unknown ViT size {size!r}; use one of {', '.join(VIT_SIZES)}.")
    return dict(by_name[str(size).lower()])
