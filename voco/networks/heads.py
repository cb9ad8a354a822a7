"""Heads on top of a backbone's embedding."""

from __future__ import annotations

from torch import nn


class VoCoProjector(nn.Sequential):
    """VoCo's projector: (Linear -> BatchNorm1d -> ReLU) x 2 -> Linear.

    The batch norms have neither affine parameters nor running statistics
    (``affine=False, track_running_stats=False``), as in the reference: they always normalise with the
    statistics of the current batch (all crops of the step), in training and in evaluation alike, so a
    batch needs at least two rows.

    Args:
        in_dim: embedding width of the backbone (24 * C for the Swin encoder).
        hidden_dim: width of the two hidden layers (V2: 1024; V1: 2048).
        out_dim: output width (V2: 1024; V1: 2048).

    Shapes: ``[N, in_dim] -> [N, out_dim]``, N >= 2.

    >>> import torch
    >>> VoCoProjector(288, 64, 32)(torch.randn(4, 288)).shape
    torch.Size([4, 32])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
