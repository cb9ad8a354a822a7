"""What a backbone offers the pretexts, declared once: a pretext checks the interface it needs at construction.

Two kinds of encoder, both with ``in_channels``, ``embedding_dim`` and ``forward(images [B, C, X, Y, Z]) -> [B,
embedding_dim]`` (a pooled embedding):

- `FeaturePyramid` (`voco.networks.swin.SwinEncoder`): ``forward_features(images)`` -> maps ``[B, feature_channels[i],
  X / feature_strides[i], ...]``, shallow to deep; ``deepest_features(images)`` -> the last map alone (what SimMIM,
  query boxes and VoCo's pooled features need, without the full-resolution maps).
- `TokenSequence` (`voco.networks.vit.ViTEncoder`): patches of ``patch_size`` on a ``token_grid(size)``;
  ``embed(images)`` -> tokens ``[B, N, d, h, w, hidden_size]`` (N scans of a study, 1 for single volumes) with the
  position embedding; ``encode(tokens, extra)`` -> ``(tokens, extra)`` through the blocks; ``encode_sequence``
  for a sequence of visible tokens (MAE; only where ``can_drop_tokens``); ``position_table(grid)`` ->
  ``[d h w, hidden_size]``; ``forward_tokens`` = ``encode(embed(images))``.

A mismatch is one sentence naming what the backbone lacks (`require`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from voco.errors import ConfigError


@runtime_checkable
class FeaturePyramid(Protocol):
    in_channels: int
    embedding_dim: int
    feature_channels: Sequence[int]
    feature_strides: Sequence[int]

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]: ...

    def deepest_features(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TokenSequence(Protocol):
    in_channels: int
    embedding_dim: int
    hidden_size: int
    patch_size: Sequence[int]
    input_size: Sequence[int]
    can_drop_tokens: bool

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, int, int]: ...

    def position_table(self, grid: Sequence[int]) -> torch.Tensor: ...

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode(self, tokens: torch.Tensor, extra: torch.Tensor | None = None, scan_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def encode_sequence(self, sequence: torch.Tensor, extra: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward_tokens(self, images: torch.Tensor, extra: torch.Tensor | None = None,
                       scan_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def require(backbone: object, interfaces: Sequence[type], pretext: str) -> type:
    """The first of `interfaces` that `backbone` offers; else a ConfigError naming, for each, what it lacks."""
    for interface in interfaces:
        if isinstance(backbone, interface):
            return interface
    lacking = "; ".join(f"{interface.__name__} lacks {', '.join(_missing(backbone, interface))}"
                        for interface in interfaces)
    raise ConfigError(f"{pretext} needs a backbone offering {' or '.join(i.__name__ for i in interfaces)} "
                      f"(voco.networks.interfaces), and the {type(backbone).__name__} does not ({lacking}); build it "
                      "with voco.networks.build_backbone.")


def _missing(backbone: object, interface: type) -> list[str]:
    members = [name for name in dir(interface) if not name.startswith("_")] + list(interface.__annotations__)
    return sorted({name for name in members if not hasattr(backbone, name)})
