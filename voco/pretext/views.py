"""Device-side pieces that several pretexts use to make their views: the batch's regions, flips and rot90 of a
batch of crops, intensity jitter, gathering rows of every rank with their gradient, and drawing a picture of the
views (axial slices in radiological convention) and writing it atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from voco.distributed import world_size
from voco.errors import ConfigError
from voco.files import atomic_write
from voco.geometry import crop_boxes


def regions(batch: Mapping[str, Any] | torch.Tensor, pretext: str = "the pretext") -> torch.Tensor:
    """The regions ``[B, C, X, Y, Z]`` of a batch ``{"image": ...}`` (or the tensor itself), as a plain tensor
    (MONAI metadata stripped: the device-side code and ``torch.compile`` need none)."""
    images = batch["image"] if isinstance(batch, Mapping) else batch
    if not isinstance(images, torch.Tensor):
        raise ConfigError(f"{pretext} expects a batch {{'image': Tensor[B, C, X, Y, Z]}} or a tensor, got {type(images)}.")
    return images.as_tensor() if hasattr(images, "as_tensor") else images


def flip_rotate(crops: torch.Tensor, flips: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Flip (``flips [M, 3]`` bools per axis) then rot90 in the x-y plane (``rotations [M]``, k in 0..3) a batch of
    crops ``[M, C, X, Y, Z]`` (X = Y where k is odd), in one gather (`voco.geometry.crop_boxes`)."""
    size = crops.shape[2:]
    whole = torch.tensor([0, 0, 0, *size], dtype=torch.long).expand(crops.shape[0], 1, 6)
    return crop_boxes(crops, whole, flips[:, None], rotations[:, None])[:, 0]


def intensity_jitter(crops: torch.Tensor, scale_range: float = 0.1, shift_range: float = 0.1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``crop * U(1 - scale_range, 1 + scale_range) + U(-shift_range, shift_range)``, one draw per crop of
    ``[M, C, ...]`` (draws on the CPU ``generator``, applied on the crops' device)."""
    count = crops.shape[0]
    scale = 1 + (torch.rand(count, generator=generator) * 2 - 1) * scale_range
    shift = (torch.rand(count, generator=generator) * 2 - 1) * shift_range
    view = (count,) + (1,) * (crops.ndim - 1)
    return crops * scale.to(crops).view(view) + shift.to(crops).view(view)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered rows and keeps this rank's rows.

    Ours (the pattern of lightly's GatherLayer) because ``torch.distributed.nn.functional.all_gather`` is
    deprecated and its replacement lives in a private module."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.contiguous()
        dist.all_reduce(gradient)  # every rank's loss depends on every rank's rows
        rows = gradient.shape[0] // dist.get_world_size()
        return gradient[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_gradient(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x [n, ...]`` concatenated in rank order ``[world_size * n, ...]``, with the gradient of all
    ranks' losses flowing back to each rank's own rows; the identity when not distributed. All ranks must pass
    the same shape (``drop_last=True``)."""
    if world_size() <= 1:
        return x
    return _GatherWithGradient.apply(x)


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A CPU generator from an int seed (None: torch's global generator is used)."""
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG so that the file appears complete or not at all."""
    path = Path(path)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path


def new_figure(width: float, height: float, rows: int, columns: int):
    """A matplotlib figure (no pyplot, no display) and its axes grid with the axes switched off."""
    from voco.errors import optional_import

    optional_import("matplotlib", "the views picture")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return figure, axes


ORIENTATION_LETTERS = (("R", 0.04, 0.5), ("L", 0.96, 0.5), ("A", 0.5, 0.95), ("P", 0.5, 0.05))


def show_axial(axis: Any, slice_xy: Any, letters: bool = False, **imshow_options: Any) -> None:
    """Draw an axial slice ``[X, Y]`` of a RAS-oriented volume (what every voco pipeline delivers) in radiological
    convention, as a clinician reads it: the patient's right on the image's left, anterior at the top; `letters`
    marks the sides (R, L, A, P). Data coordinates stay (x, y), so a box is
    ``Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0)``."""
    axis.imshow(slice_xy.T, origin="lower", **imshow_options)
    if not axis.xaxis_inverted():  # x grows towards the patient's right: right on the left (overlays: once)
        axis.invert_xaxis()
    if letters:
        for letter, u, v in ORIENTATION_LETTERS:
            axis.text(u, v, letter, transform=axis.transAxes, ha="center", va="center", fontsize=7,
                      fontweight="bold", color="yellow")
