"""Boxes, grids, random crops and position labels (voco.geometry), against the worked examples of specs/voco.md."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from voco.errors import ConfigError
from voco.geometry import (LAYOUTS, VOCO_TINY_LAYOUT, VOCO_V1_LAYOUT, VOCO_V2_LAYOUT, CropLayout, boxes_from_centres,
                           crop_boxes, get_layout, grid_boxes, overlap_fraction, position_labels, sample_random_boxes)


def labels_at_centre(layout: CropLayout, centre_xy: tuple[int, int]) -> torch.Tensor:
    """Labels of one random crop centred at (x, y), z centred, as the reference computes them -> [K]."""
    centre = torch.tensor([[centre_xy[0], centre_xy[1], layout.region_size[2] // 2]])
    return position_labels(boxes_from_centres(centre, layout.crop_size), layout.base_boxes())[0]


def expected(num_base: int, non_zero: dict[int, float]) -> torch.Tensor:
    labels = torch.zeros(num_base, dtype=torch.float64)
    for k, value in non_zero.items():
        labels[k] = value
    return labels


@pytest.mark.parametrize("layout, centre, non_zero", [
    (VOCO_V2_LAYOUT, (100, 50), {3: 0.673828125, 4: 0.263671875, 6: 0.044921875, 7: 0.017578125}),
    (VOCO_V2_LAYOUT, (96, 96), {4: 1.0}),
    (VOCO_V2_LAYOUT, (159, 159), {4: 0.000244140625, 5: 0.015380859375, 7: 0.015380859375, 8: 0.968994140625}),
    (VOCO_V1_LAYOUT, (150, 200), {5: 0.390625, 6: 0.546875, 9: 240 / 9216, 10: 336 / 9216}),
])
def test_worked_label_examples_of_the_spec(layout, centre, non_zero):
    labels = labels_at_centre(layout, centre).double()
    torch.testing.assert_close(labels, expected(layout.num_base_crops, non_zero), rtol=0, atol=1e-7)
    assert labels.sum().item() == pytest.approx(1.0, abs=1e-7)


def test_v1_example_matches_the_rounded_digits_of_the_spec():
    labels = labels_at_centre(VOCO_V1_LAYOUT, (150, 200))
    assert f"{labels[9].item():.7f}".startswith("0.026041") and f"{labels[10].item():.7f}".startswith("0.036458")


def test_named_layouts():
    assert VOCO_V2_LAYOUT.region_size == (192, 192, 64) and VOCO_V2_LAYOUT.grid == (3, 3, 1)
    assert VOCO_V2_LAYOUT.num_base_crops == 9 and not VOCO_V2_LAYOUT.needs_resize
    assert VOCO_V1_LAYOUT.region_size == (384, 384, 96) and VOCO_V1_LAYOUT.num_base_crops == 16
    assert VOCO_V1_LAYOUT.needs_resize and VOCO_V1_LAYOUT.input_size == (64, 64, 64)
    assert CropLayout.tiled(32, (3, 3)).region_size == (96, 96, 32)
    assert VOCO_TINY_LAYOUT.region_size == (96, 96, 64) and VOCO_TINY_LAYOUT.crop_size == (32, 32, 64)
    assert get_layout("V2") is VOCO_V2_LAYOUT and get_layout(VOCO_V1_LAYOUT) is VOCO_V1_LAYOUT
    assert set(LAYOUTS) == {"v2", "v1", "tiny"}
    with pytest.raises(ConfigError, match="unknown crop layout"):
        get_layout("v3")
    with pytest.raises(ConfigError, match="does not tile"):
        CropLayout((100, 96, 32), (3, 3), (32, 32, 32), (32, 32, 32))


def test_v1_and_v2_layouts_treat_their_crops_as_the_references_do():
    """V1 resizes its 96^3 crops with corners aligned and shifts intensities with p = 0.1; V2 (and what derives from
    it) needs no resize and shifts with p = 0.5."""
    assert VOCO_V1_LAYOUT.align_corners and VOCO_V1_LAYOUT.shift_probability == 0.1
    for layout in (VOCO_V2_LAYOUT, VOCO_TINY_LAYOUT, CropLayout.tiled(32, (3, 3))):
        assert not layout.align_corners and layout.shift_probability == 0.5
    for probability in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="shift_probability"):
            dataclasses.replace(VOCO_V2_LAYOUT, shift_probability=probability)


def test_grid_boxes_order_and_cover():
    boxes = grid_boxes((192, 192, 64), (3, 3))
    assert boxes.shape == (9, 6)
    # k = i * n + j with i along x: base crop 5 = (1, 2) covers x [64, 128), y [128, 192), all of z.
    assert boxes[5].tolist() == [64, 128, 0, 128, 192, 64]
    cubes = grid_boxes((4, 6, 8), (2, 3, 4))
    assert cubes.shape == (24, 6)
    cover = torch.zeros(4, 6, 8, dtype=torch.int64)
    for x0, y0, z0, x1, y1, z1 in cubes.tolist():
        cover[x0:x1, y0:y1, z0:z1] += 1
    assert bool((cover == 1).all())  # the base crops tile the region exactly once
    assert cubes[(1 * 3 + 2) * 4 + 3].tolist() == [2, 4, 6, 4, 6, 8]
    with pytest.raises(ConfigError):
        grid_boxes((10, 10), (3, 3))


def brute_force_fraction(box_a: list[int], box_b: list[int], shape: tuple[int, ...]) -> float:
    """Count voxels of a inside b on a voxel grid."""
    dims = len(shape)
    mask_a, mask_b = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    mask_a[tuple(slice(box_a[d], box_a[d + dims]) for d in range(dims))] = True
    mask_b[tuple(slice(box_b[d], box_b[d + dims]) for d in range(dims))] = True
    return (mask_a & mask_b).sum().item() / mask_a.sum().item()


@pytest.mark.parametrize("layout", [CropLayout.tiled((8, 8, 6), (3, 3)), CropLayout.tiled((4, 6, 4), (2, 2, 3))],
                         ids=["3x3 grid, full depth", "2x2x3 grid"])
@pytest.mark.parametrize("mode", ["reference", "uniform"])
def test_labels_sum_to_one_and_match_voxel_counts(layout, mode):
    generator = torch.Generator().manual_seed(7)
    random_boxes = sample_random_boxes(layout, num_crops=5, batch_size=4, mode=mode, generator=generator)
    base_boxes = layout.base_boxes()
    labels = position_labels(random_boxes, base_boxes)
    assert labels.shape == (4, 5, layout.num_base_crops)
    torch.testing.assert_close(labels.sum(-1), torch.ones(4, 5))
    assert int((labels > 0).sum(-1).max()) <= 2 ** sum(g > 1 for g in layout.grid)
    for b, s in itertools.product(range(4), range(5)):
        counted = [brute_force_fraction(random_boxes[b, s].tolist(), base.tolist(), layout.region_size)
                   for base in base_boxes]
        torch.testing.assert_close(labels[b, s], torch.tensor(counted, dtype=labels.dtype), rtol=0, atol=1e-6)


def test_overlap_fraction_on_arbitrary_boxes_2d_3d_and_batched():
    generator = torch.Generator().manual_seed(3)
    for shape in [(12, 10), (9, 8, 7)]:
        dims = len(shape)
        starts = torch.stack([torch.randint(0, n - 1, (6,), generator=generator) for n in shape], -1)
        sizes = torch.stack([torch.randint(1, n, (6,), generator=generator) for n in shape], -1)
        ends = torch.minimum(starts + sizes, torch.tensor(shape))
        boxes = torch.cat([starts, ends], -1)
        fractions = overlap_fraction(boxes[:3], boxes[3:])
        for i, j in itertools.product(range(3), range(3)):
            assert fractions[i, j].item() == pytest.approx(
                brute_force_fraction(boxes[i].tolist(), boxes[3 + j].tolist(), shape), abs=1e-6)
        # float boxes give the same answer; batched leading axes broadcast
        torch.testing.assert_close(overlap_fraction(boxes[:3].double(), boxes[3:].double()), fractions.double())
        batched = overlap_fraction(boxes.view(2, 3, 2 * dims), boxes[3:])
        torch.testing.assert_close(batched[1], overlap_fraction(boxes[3:], boxes[3:]))
        assert torch.diagonal(batched[1]).eq(1).all()


def test_reference_sampling_excludes_the_far_edge_and_centres_z():
    layout = VOCO_V2_LAYOUT
    boxes = sample_random_boxes(layout, 2000, mode="reference", generator=torch.Generator().manual_seed(0))[0]
    centres = (boxes[:, :3] + boxes[:, 3:]) // 2
    assert int(centres[:, :2].min()) == 32 and int(centres[:, :2].max()) == 159  # uniform in [32, 160)
    assert bool((boxes[:, 2] == 0).all() and (boxes[:, 5] == 64).all())  # full depth
    labels = position_labels(boxes, layout.base_boxes())
    assert float(labels[:, 8].max()) < 0.97  # the reference quirk: the last base crop never reaches 1
    assert int(boxes[:, 0].min()) == 0 and int(boxes[:, 3].max()) == 191  # never touches x = 192


def test_uniform_sampling_reaches_every_edge_and_is_reproducible():
    layout = CropLayout.tiled((16, 16, 8), (3, 3))
    boxes = sample_random_boxes(layout, 3000, mode="uniform", generator=torch.Generator().manual_seed(0))[0]
    assert int(boxes[:, 0].min()) == 0 and int(boxes[:, 3].max()) == 48
    assert int(boxes[:, 1].min()) == 0 and int(boxes[:, 4].max()) == 48
    labels = position_labels(boxes, layout.base_boxes())
    assert float(labels.max(0).values.min()) == 1.0  # every base crop can be matched exactly
    again = sample_random_boxes(layout, 3000, mode="uniform", generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(boxes, again)
    with pytest.raises(ConfigError, match="crop_sampling"):
        sample_random_boxes(layout, 1, mode="edges")


def test_crop_boxes_equals_slicing_then_flip_then_rot90():
    images = torch.randn(2, 2, 11, 11, 7)
    boxes = torch.tensor([[[1, 2, 0, 6, 7, 4], [0, 0, 3, 5, 5, 7]], [[6, 6, 1, 11, 11, 5], [3, 4, 2, 8, 9, 6]]])
    offsets = torch.tensor([[0.0, 0.25], [-0.1, 0.0]])
    for flip_axes in itertools.product([False, True], repeat=3):
        for k in range(4):
            flips = torch.tensor(flip_axes).expand(2, 2, 3)
            # crop by crop (the CPU's way) and in one gather (the GPU's way): the same tensors, bit for bit
            for one_by_one in (True, False):
                crops = crop_boxes(images, boxes, flips, torch.full((2, 2), k), offsets, one_by_one=one_by_one)
                assert crops.shape == (2, 2, 2, 5, 5, 4)
                for b, n in itertools.product(range(2), range(2)):
                    x0, y0, z0, x1, y1, z1 = boxes[b, n].tolist()
                    reference = images[b, :, x0:x1, y0:y1, z0:z1]
                    axes = [1 + d for d in range(3) if flip_axes[d]]
                    reference = torch.rot90(reference.flip(axes) if axes else reference, k, dims=(1, 2))
                    assert torch.equal(crops[b, n], reference + offsets[b, n]), (flip_axes, k, one_by_one)
    mixed = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(0)) < 0.5  # different per crop
    rotations = torch.tensor([[1, 0], [3, 2]])
    assert torch.equal(crop_boxes(images, boxes, mixed, rotations, offsets, one_by_one=True),
                       crop_boxes(images, boxes, mixed, rotations, offsets, one_by_one=False))


def test_crop_boxes_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="one size"):
        crop_boxes(torch.zeros(1, 1, 8, 8, 8), torch.tensor([[[0, 0, 0, 4, 4, 4], [0, 0, 0, 2, 2, 2]]]))
