"""The SwinUNETR-v2 encoder as VoCo uses it, built from MONAI's `SwinUNETR(use_v2=True)`.

Only the encoder half is kept, under the attribute names of the released VoCo checkpoints
(``swinViT``, ``encoder1``, ``encoder2``, ``encoder3``, ``encoder4``, ``encoder10``), so that our
``state_dict()`` has exactly the keys of ``VoCo_{B,L,H}_SSL_head.pt`` (145 tensors) and loads by name
into a full ``SwinUNETR(use_v2=True, feature_size=C)`` for fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from voco.errors import ConfigError

# Feature size C of each named model size: the embedding is 24 * C wide (B = 48 -> 1152).
BACKBONE_SIZES = {"tiny": 12, "B": 48, "L": 96, "H": 192}
ENCODER_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


class SwinEncoder(nn.Module):
    """SwinUNETR-v2 encoder (patch 2, window 7, depths 2-2-2-2, heads 3-6-12-24) with VoCo's pooled embedding.

    Args:
        in_channels: input channels (1 for CT).
        feature_size: C, divisible by 12 (12 tiny, 48 B, 96 L, 192 H).
        use_checkpoint: gradient checkpointing in the Swin blocks (less memory, ~30 % more compute).
        dropout_path_rate: stochastic depth rate of the Swin blocks.
        **swin_kwargs: further `monai.networks.nets.SwinUNETR` arguments (e.g. ``window_size``).

    Shapes (N crops, spatial sizes divisible by 32):
        ``forward(x)``: ``[N, in_channels, X, Y, Z] -> [N, 24 * C]``, the concatenated global average pools
        of ``encoder1(x)``, ``encoder2(h0)``, ``encoder3(h1)``, ``encoder4(h2)``, ``encoder10(h4)`` (h = Swin
        hidden states; h3 is unused, as in the reference).
        ``forward_features(x)``: those five maps, with ``feature_channels`` (C, C, 2C, 4C, 16C) channels at
        ``feature_strides`` (1, 2, 4, 8, 32).

    >>> import torch
    >>> encoder = SwinEncoder(feature_size=12)
    >>> encoder(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 288])
    """

    spatial_divisor = 32
    feature_strides = (1, 2, 4, 8, 32)

    def __init__(self, in_channels: int = 1, feature_size: int = 48, use_checkpoint: bool = False,
                 dropout_path_rate: float = 0.0, **swin_kwargs) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR

        if feature_size % 12:
            raise ConfigError(f"Swin feature size {feature_size} is not divisible by 12; use 12, 48, 96 or 192.")
        full = SwinUNETR(in_channels=in_channels, out_channels=1, feature_size=feature_size, use_v2=True,
                         use_checkpoint=use_checkpoint, dropout_path_rate=dropout_path_rate, **swin_kwargs)
        # Keep the encoder half only, under the names of the released checkpoints; the decoder is dropped.
        self.swinViT = full.swinViT
        self.encoder1, self.encoder2, self.encoder3 = full.encoder1, full.encoder2, full.encoder3
        self.encoder4, self.encoder10 = full.encoder4, full.encoder10
        self.normalize = full.normalize
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.feature_channels = (feature_size, feature_size, 2 * feature_size, 4 * feature_size, 16 * feature_size)
        self.embedding_dim = sum(self.feature_channels)  # 24 * C

    @property
    def use_checkpoint(self) -> bool:
        return any(getattr(block, "use_checkpoint", False) for block in self.swinViT.modules())

    @use_checkpoint.setter
    def use_checkpoint(self, enabled: bool) -> None:
        """Switch gradient checkpointing of every Swin block on or off."""
        for block in self.swinViT.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = bool(enabled)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[N, in_channels, X, Y, Z]`` -> five maps ``[N, feature_channels[i], X/s, Y/s, Z/s]``.

        s = ``feature_strides[i]``. Raises ConfigError for a shape the encoder cannot take (wrong channels,
        sizes not divisible by 32)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels or any(s % self.spatial_divisor for s in x.shape[2:]):
            raise ConfigError(f"the Swin encoder needs input [N, {self.in_channels}, X, Y, Z] with X, Y, Z divisible "
                              f"by {self.spatial_divisor}, got {tuple(x.shape)}; change the crop/input size.")
        hidden_states = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(hidden_states[0]), self.encoder3(hidden_states[1]),
                self.encoder4(hidden_states[2]), self.encoder10(hidden_states[4])]

    def deepest_features(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)[-1]`` alone, without the four shallower maps (the full-resolution ``encoder1``
        alone costs more than the Swin stages)."""
        return self.encoder10(self.swinViT(x, self.normalize)[4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_channels, X, Y, Z]`` -> pooled embedding ``[N, 24 * C]``."""
        return torch.cat([feature.mean(dim=(2, 3, 4)) for feature in self.forward_features(x)], dim=1)


def swin_feature_size(size: str | int) -> int:
    """Feature size C for a named size ("tiny", "B", "L", "H", any case) or an int C divisible by 12."""
    if isinstance(size, int) or (isinstance(size, str) and size.isdigit()):
        feature_size = int(size)
        if feature_size > 0 and feature_size % 12 == 0:
            return feature_size
    else:
        by_name = {name.lower(): value for name, value in BACKBONE_SIZES.items()}
        if str(size).lower() in by_name:
            return by_name[str(size).lower()]
    raise ConfigError(f"unknown Swin backbone size {size!r}; use one of {', '.join(BACKBONE_SIZES)} "
                      f"or a feature size divisible by 12.")
