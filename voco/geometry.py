"""Boxes, grids of base crops, random crops, overlaps and position labels: pure tensor math, no I/O.

Boxes follow MONAI's standard mode: ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in voxel units with the
max exclusive (2-D boxes are ``[xmin, ymin, xmax, ymax]``); a box tensor has shape ``[..., 2 * D]``.
Everything works on whatever device the tensors are on, batched over leading axes.

VoCo (see specs/voco.md) cuts a region into a grid of *base crops* and draws a few *random crops*
from it; the *position label* of a random crop is the fraction of it that lies inside each base crop.

>>> layout = VOCO_V2_LAYOUT
>>> random_box = boxes_from_centres(torch.tensor([[96, 96, 32]]), layout.crop_size)
>>> position_labels(random_box, layout.base_boxes())[0, 4].item()
1.0
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from voco.errors import ConfigError, require_choice

CROP_SAMPLING_MODES = ("reference", "uniform")


# --------------------------------------------------------------------------------------------------
# Overlaps
# --------------------------------------------------------------------------------------------------
def box_volume(boxes: torch.Tensor) -> torch.Tensor:
    """Volume (area in 2-D) of boxes ``[..., 2D]`` -> ``[...]``; empty boxes have volume 0."""
    spatial_dims = boxes.shape[-1] // 2
    return (boxes[..., spatial_dims:] - boxes[..., :spatial_dims]).clamp(min=0).prod(dim=-1)


def overlap_fraction(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Intersection volume of every box of ``a`` with every box of ``b``, over the volume of the ``a`` box.

    Our own rather than ``monai.data.box_utils``: MONAI gives IoU/GIoU of unbatched boxes, not the
    intersection over one box's volume, batched.

    Args:
        boxes_a: ``[..., Na, 2D]`` boxes (int or float).
        boxes_b: ``[..., Nb, 2D]`` boxes; leading axes broadcast against those of ``boxes_a``.

    Returns:
        ``[..., Na, Nb]`` floats in [0, 1] (float64 for float64 input, else the default float dtype).
    """
    if boxes_a.shape[-1] != boxes_b.shape[-1] or boxes_a.shape[-1] % 2:
        raise ValueError(f"boxes must both be [..., 2D], got {tuple(boxes_a.shape)} and {tuple(boxes_b.shape)}")
    dtype = torch.float64 if torch.float64 in (boxes_a.dtype, boxes_b.dtype) else torch.get_default_dtype()
    a = boxes_a.to(dtype)[..., :, None, :]  # [..., Na, 1, 2D]
    b = boxes_b.to(dtype)[..., None, :, :]  # [..., 1, Nb, 2D]
    spatial_dims = boxes_a.shape[-1] // 2
    lower = torch.maximum(a[..., :spatial_dims], b[..., :spatial_dims])
    upper = torch.minimum(a[..., spatial_dims:], b[..., spatial_dims:])
    intersection = (upper - lower).clamp(min=0).prod(dim=-1)  # [..., Na, Nb]
    return intersection / box_volume(a)


def position_labels(random_boxes: torch.Tensor, base_boxes: torch.Tensor) -> torch.Tensor:
    """VoCo's position labels: the fraction of each random crop that lies inside each base crop.

    Args:
        random_boxes: ``[..., S, 2D]`` random crops.
        base_boxes: ``[..., K, 2D]`` base crops (e.g. ``layout.base_boxes()`` of shape ``[K, 2D]``).

    Returns:
        ``[..., S, K]``; each row sums to 1 when the base crops tile the region holding the random crop.
    """
    return overlap_fraction(random_boxes, base_boxes)


# --------------------------------------------------------------------------------------------------
# Grids and layouts
# --------------------------------------------------------------------------------------------------
def _as_size(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    size = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != spatial_dims or min(size) < 1:
        raise ConfigError(f"{name} {value!r} must be {spatial_dims} positive integers; fix the crop layout.")
    return size


def grid_boxes(region_size: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Boxes of the base crops that tile a region in an n x m (x l) grid.

    Args:
        region_size: ``(X, Y[, Z])`` voxels.
        grid: base crops per axis, ``(n, m)`` or ``(n, m, l)``; missing trailing axes are not split
            (``(3, 3)`` on a 3-D region: every base crop spans the full depth, as in VoCo).

    Returns:
        ``[n * m * l, 2D]`` long boxes; base crop ``k = (i * m + j) * l + h`` covers
        ``x in [i*bx, (i+1)*bx)``, ``y in [j*by, (j+1)*by)``, ``z in [h*bz, (h+1)*bz)``.
    """
    region_size = tuple(int(s) for s in region_size)
    grid = tuple(int(g) for g in grid) + (1,) * (len(region_size) - len(grid))
    if len(grid) != len(region_size) or any(r % g for r, g in zip(region_size, grid)) or min(grid) < 1:
        raise ConfigError(f"a grid of {grid} base crops does not tile a region of {region_size} voxels evenly; "
                          f"choose a region size divisible by the grid.")
    base_size = torch.tensor([r // g for r, g in zip(region_size, grid)])
    cells = torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid))  # [K, D], last axis fastest
    starts = cells * base_size
    return torch.cat([starts, starts + base_size], dim=-1)


@functools.lru_cache(maxsize=16)
def _layout_grid_boxes(region_size: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """`grid_boxes` of a layout, computed once: every step asks for them (0.15 ms, a tenth of a batch-1 cut)."""
    return grid_boxes(region_size, grid)


@dataclass(frozen=True)
class CropLayout:
    """Where VoCo's crops come from: a region tiled by a grid of base crops, and the network's input size.

    The two reference versions also treat their crops differently (V1 against V2), so that travels with the layout.

    Attributes:
        region_size: ``(X, Y, Z)`` voxels of the region the loader delivers.
        grid: base crops per axis (``(3, 3)`` = 3 x 3 in x-y, full depth; a third entry splits z too).
        crop_size: size of every crop (base and random) cut from the region; the base crops tile it.
        input_size: size fed to the network; crops are resized (trilinear) to it when it differs (V1).
        align_corners: the ``align_corners`` of that resize (V1: True, as the reference's MONAI ``Resized``).
        shift_probability: chance that a crop's intensities are shifted, in the reference's per-crop augmentation
            (V2: 0.5, V1: 0.1).
    """

    region_size: tuple[int, ...]
    grid: tuple[int, ...]
    crop_size: tuple[int, ...]
    input_size: tuple[int, ...]
    align_corners: bool = False
    shift_probability: float = 0.5

    def __post_init__(self) -> None:
        spatial_dims = len(tuple(self.region_size))
        region_size = _as_size(self.region_size, spatial_dims, "region_size")
        grid = _as_size(self.grid, len(tuple(self.grid)), "grid") + (1,) * (spatial_dims - len(tuple(self.grid)))
        crop_size = _as_size(self.crop_size, spatial_dims, "crop_size")
        input_size = _as_size(self.input_size, spatial_dims, "input_size")
        if len(grid) != spatial_dims or tuple(g * c for g, c in zip(grid, crop_size)) != region_size:
            raise ConfigError(f"a grid of {grid} base crops of {crop_size} voxels does not tile the region "
                              f"{region_size}; make region_size = grid x crop_size on every axis.")
        object.__setattr__(self, "region_size", region_size)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "crop_size", crop_size)
        object.__setattr__(self, "input_size", input_size)
        if not 0 <= self.shift_probability <= 1:
            raise ConfigError(f"shift_probability {self.shift_probability!r} is not a probability; use a value in "
                              f"[0, 1] (reference: 0.5 in V2, 0.1 in V1).")

    @classmethod
    def tiled(cls, crop_size: int | Sequence[int], grid: Sequence[int],
              input_size: int | Sequence[int] | None = None, spatial_dims: int = 3) -> CropLayout:
        """The layout whose region is exactly ``grid`` base crops of ``crop_size`` (e.g. a scaled-down one).

        >>> CropLayout.tiled(32, (3, 3)).region_size
        (96, 96, 32)
        """
        crop = _as_size(crop_size, spatial_dims, "crop_size")
        full_grid = tuple(grid) + (1,) * (spatial_dims - len(tuple(grid)))
        region = tuple(c * g for c, g in zip(crop, full_grid))
        return cls(region, tuple(grid), crop, crop if input_size is None else _as_size(input_size, spatial_dims,
                                                                                        "input_size"))

    @property
    def spatial_dims(self) -> int:
        return len(self.region_size)

    @property
    def num_base_crops(self) -> int:
        return math.prod(self.grid)

    @property
    def needs_resize(self) -> bool:
        return self.crop_size != self.input_size

    def base_boxes(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[K, 2D]`` long boxes of the base crops (see `grid_boxes` for their order); a fresh tensor each call."""
        return _layout_grid_boxes(self.region_size, self.grid).to(device, copy=True)


# V2 (large-scale, our default): 3 x 3 base crops of 64^3 over 192 x 192 x 64, full depth, no resize.
VOCO_V2_LAYOUT = CropLayout((192, 192, 64), (3, 3), (64, 64, 64), (64, 64, 64))
# V1 (CVPR 2024): 4 x 4 base crops of 96^3 over 384 x 384 x 96, each crop resized to 64^3 with corners aligned;
# intensities shifted less often.
VOCO_V1_LAYOUT = CropLayout((384, 384, 96), (4, 4), (96, 96, 96), (64, 64, 64), align_corners=True,
                            shift_probability=0.1)
# The V2 layout scaled down for tests and smoke runs: 3 x 3 base crops of 32 x 32 x 64 over 96 x 96 x 64.
# Not 32^3: the Swin encoder's deepest map would be 1 voxel, and its instance norm cannot train on that.
VOCO_TINY_LAYOUT = CropLayout.tiled((32, 32, 64), (3, 3))
LAYOUTS = {"v2": VOCO_V2_LAYOUT, "v1": VOCO_V1_LAYOUT, "tiny": VOCO_TINY_LAYOUT}


def get_layout(layout: str | CropLayout) -> CropLayout:
    """A `CropLayout` itself, or one of `LAYOUTS` by name ("v2", "v1", "tiny")."""
    if isinstance(layout, CropLayout):
        return layout
    if str(layout).lower() not in LAYOUTS:
        raise ConfigError(f"unknown crop layout {layout!r}; use one of {', '.join(LAYOUTS)} or a CropLayout.")
    return LAYOUTS[str(layout).lower()]


# --------------------------------------------------------------------------------------------------
# Random crops
# --------------------------------------------------------------------------------------------------
def boxes_from_centres(centres: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
    """Boxes of size ``crop_size`` around integer centres ``[..., D]`` (start = centre - size // 2) -> ``[..., 2D]``."""
    size = torch.as_tensor(tuple(crop_size), device=centres.device, dtype=centres.dtype)
    starts = centres - size // 2
    return torch.cat([starts, starts + size], dim=-1)


def sample_boxes(region_size: Sequence[int], scales: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Float boxes ``[..., 6]`` holding ``scales [...]`` of the region's volume, with the region's aspect ratio
    (each side ``size * scale^(1/3)``), placed uniformly inside the region."""
    size = torch.tensor([float(s) for s in region_size])
    sides = size * scales[..., None] ** (1.0 / 3.0)
    starts = torch.rand(sides.shape, generator=generator) * (size - sides)
    return torch.cat([starts, starts + sides], dim=-1)


def sample_random_boxes(layout: CropLayout, num_crops: int, batch_size: int = 1, mode: str = "uniform",
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Draw random crops of ``layout.crop_size`` inside the region -> ``[batch_size, num_crops, 2D]`` long boxes.

    Modes:
        ``"reference"``: exactly the reference: on every axis split by the grid, the centre is a uniform
            integer in ``[r/2, X - r/2)`` (upper bound excluded, so the crop never touches the far edge and
            the last row/column of base crops never gets a label of 1); other axes are centred (full depth).
        ``"uniform"`` (our default): the start is a uniform integer in ``[0, X - r]`` on every axis, both
            ends included, so every base crop can be matched exactly and the distribution of positions is
            symmetric (the reference's is shifted by one voxel towards the origin).

    Draws come from ``generator`` (a CPU generator; None = torch's global one) so that crops are
    reproducible; the few integers drawn are then moved to ``device``.
    """
    require_choice("crop_sampling", mode, CROP_SAMPLING_MODES)
    starts = []
    for extent, size, cells in zip(layout.region_size, layout.crop_size, layout.grid):
        if mode == "reference" and cells == 1:
            start = torch.full((batch_size, num_crops), (extent - size) // 2)
        elif mode == "reference":
            half = size // 2
            start = torch.randint(half, extent - half, (batch_size, num_crops), generator=generator) - half
        else:
            start = torch.randint(0, extent - size + 1, (batch_size, num_crops), generator=generator)
        starts.append(start)
    starts = torch.stack(starts, dim=-1)
    size = torch.tensor(layout.crop_size)
    return torch.cat([starts, starts + size], dim=-1).to(device)


# --------------------------------------------------------------------------------------------------
# Cutting crops out of a batch of regions
# --------------------------------------------------------------------------------------------------
def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None,
               rotations: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
               one_by_one: bool | None = None) -> torch.Tensor:
    """Cut equally sized crops out of a batch of 3-D images, optionally flipped, rotated and shifted in intensity.

    ``torch.rot90`` by k is a flip of x and/or y followed, for odd k, by an x-y transpose. Two ways, same result:

    - on a GPU, one gather: a crop is a stack of ``sx`` y-z slabs, and the slab at every (y0, z0) is a view of the
      images (``unfold``), so one gather over (b, n, x) copies whole contiguous slabs, with x flips folded into the
      x indices; what is left (y and z flips, transposes) is applied to the crops that have it, grouped by
      combination; few kernel launches whatever the batch;
    - on the CPU (`one_by_one`, the default there), crop by crop: slice, flip, copy into the batch and add the
      offset while the crop is in the cache, so the cost per volume is that of plain slicing at any batch size
      (the gather's later passes over a batch of crops larger than the cache cost twice as much from batch 4 on).

    Args:
        images: ``[B, C, X, Y, Z]``.
        boxes: ``[B, N, 6]`` integer boxes inside the images, all of the same size ``(sx, sy, sz)``.
            Boxes, flips and rotations on the CPU (as VoCo draws them) cost no device synchronisation.
        flips: optional ``[B, N, 3]`` bools: flip the crop along x, y, z.
        rotations: optional ``[B, N]`` ints k in 0..3: then ``torch.rot90(crop, k, dims=(x, y))``
            (applied after the flips; needs ``sx == sy`` when k is odd).
        offsets: optional ``[B, N]`` intensity shifts added to each crop.
        one_by_one: crop by crop (default: on the CPU) or in one gather (default elsewhere).

    Returns:
        ``[B, N, C, sx, sy, sz]``, equal to ``rot90(flip(images[b, :, x0:x1, y0:y1, z0:z1]), k) + offset``.
    """
    batch_size, num_crops = boxes.shape[:2]
    device = images.device
    size = (boxes[0, 0, 3:] - boxes[0, 0, :3]).tolist()
    if not bool(((boxes[..., 3:] - boxes[..., :3]) == boxes.new_tensor(size)).all()):
        raise ValueError("crop_boxes needs boxes of one size; resize crops of different sizes separately.")
    flips = torch.zeros(batch_size, num_crops, 3, dtype=torch.bool) if flips is None else flips.bool()
    rotations = torch.zeros(batch_size, num_crops, dtype=torch.long) if rotations is None else rotations % 4
    transpose = rotations % 2 == 1
    if size[0] != size[1] and bool(transpose.any()):
        raise ValueError(f"rot90 in the x-y plane by an odd k needs square crops, got {size}.")
    # torch.rot90 by k = flip y then transpose (k=1), flip x and y (k=2), flip x then transpose (k=3).
    reverse_x = flips[..., 0] ^ ((rotations == 2) | (rotations == 3))
    reverse_y = flips[..., 1] ^ ((rotations == 1) | (rotations == 2))

    if one_by_one is None:
        one_by_one = images.device.type == "cpu"
    if one_by_one:
        return _crop_one_by_one(images, boxes, size, torch.stack([reverse_x, reverse_y, flips[..., 2]], -1),
                                transpose, offsets)
    after_gather = reverse_y.long() + 2 * flips[..., 2].long() + 4 * transpose.long()  # [B, N] codes 0..7
    boxes, reverse_x = boxes.to(device=device, dtype=torch.long), reverse_x.to(device)
    steps = torch.arange(size[0], device=device)
    x = boxes[..., 0, None] + torch.where(reverse_x[..., None], size[0] - 1 - steps, steps)  # [B, N, sx]
    slabs = images.unfold(3, size[1], 1).unfold(4, size[2], 1)  # [B, C, X, Y - sy + 1, Z - sz + 1, sy, sz], a view
    batch_index = torch.arange(batch_size, device=device)[:, None, None]
    crops = slabs[batch_index, :, x, boxes[..., 1, None], boxes[..., 2, None]]  # [B, N, sx, C, sy, sz]
    crops = crops.movedim(3, 2)
    for code in after_gather.unique().tolist():
        if code == 0:
            continue
        which = tuple(index.to(device) for index in (after_gather == code).nonzero(as_tuple=True))
        selected = crops[which]  # [M, C, sx, sy, sz]
        flip_dims = [dim for dim, bit in ((-2, 1), (-1, 2)) if code & bit]
        if flip_dims:
            selected = selected.flip(flip_dims)
        if code & 4:
            selected = selected.transpose(-3, -2)
        crops[which] = selected
    if offsets is not None:
        crops.add_(offsets.to(crops)[..., None, None, None, None])  # in place: crops is a fresh tensor
    return crops


def _crop_one_by_one(images: torch.Tensor, boxes: torch.Tensor, size: Sequence[int], reverse: torch.Tensor,
                     transpose: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """`crop_boxes` crop by crop: ``reverse [B, N, 3]`` flips x, y, z, then ``transpose [B, N]`` swaps x and y."""
    batch_size, num_crops = boxes.shape[:2]
    crops = images.new_empty(batch_size, num_crops, images.shape[1], *size)
    starts, reverse, transpose = boxes[..., :3].tolist(), reverse.tolist(), transpose.tolist()
    shifts = offsets.tolist() if offsets is not None else None
    for b in range(batch_size):
        for n in range(num_crops):
            x0, y0, z0 = starts[b][n]
            crop = images[b, :, x0:x0 + size[0], y0:y0 + size[1], z0:z0 + size[2]]
            dims = [1 + axis for axis in range(3) if reverse[b][n][axis]]
            shift = shifts[b][n] if shifts is not None else 0.0
            # written straight into its place in the batch (through a transposed view where the crop is
            # transposed): one pass over the crop, no flipped temporary, the shift fused where there is no flip
            target = crops[b, n].transpose(1, 2) if transpose[b][n] else crops[b, n]
            if dims:
                torch.ops.aten.flip.out(crop, dims, out=target)
                if shift:
                    target.add_(shift)  # while the crop is in the cache
            elif shift:
                torch.add(crop, shift, out=target)
            else:
                target.copy_(crop)
    return crops


def resample_boxes(images: torch.Tensor, boxes: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Cut boxes of any size out of a batch of 3-D images and resample each to ``size``, in one ``grid_sample``.

    The output voxel centres are spread evenly over the box (``align_corners=False`` semantics): a box the size
    of the output returns its voxels exactly, a box twice the output size returns the means of voxel pairs along
    each axis (trilinear). Points outside the image take the border value.

    Args:
        images: ``[B, C, X, Y, Z]``.
        boxes: ``[B, N, 6]`` float (or int) boxes ``[x0, y0, z0, x1, y1, z1]`` in voxel edges, max exclusive.
        size: output size ``(sx, sy, sz)``.
        mode: ``"bilinear"`` (trilinear in 3-D) or ``"nearest"``.

    Returns:
        ``[B, N, C, sx, sy, sz]`` on the images' device and dtype.
    """
    batch_size, channels = images.shape[:2]
    num_boxes = boxes.shape[1]
    spatial = torch.tensor(images.shape[2:], dtype=torch.float32, device=images.device)
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    # Box edges in grid_sample's normalised coordinates: voxel edge e of an axis of length S maps to 2 e / S - 1.
    lower, upper = 2 * boxes[..., :3] / spatial - 1, 2 * boxes[..., 3:] / spatial - 1  # [B, N, 3]
    axes = [torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=images.device) for n in size]  # output voxel centres
    unit = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [sx, sy, sz, 3] in [-1, 1]
    centre, half = (lower + upper) / 2, (upper - lower) / 2
    points = centre[:, :, None, None, None] + half[:, :, None, None, None] * unit  # [B, N, sx, sy, sz, 3]
    # grid_sample reads the last grid axis as (W, H, D) = (z, y, x); boxes are stacked along the first output axis.
    grid = points.flip(-1).reshape(batch_size, num_boxes * size[0], size[1], size[2], 3)
    crops = torch.nn.functional.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="border",
                                            align_corners=False)  # [B, C, N * sx, sy, sz]
    return crops.view(batch_size, channels, num_boxes, *size).movedim(2, 1)
