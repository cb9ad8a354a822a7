"""The query-box pretext: box sampling, crops, GIoU (hand values and MONAI), loss, training, views picture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voco.data.phantoms import make_phantom
from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.pretext.query_box import (CrossAttentionBlock, QueryBoxPretext, box_iou_giou, centre_size_to_corners,
                                    query_box_loss, sample_query_boxes, save_views_picture)

REGION = (32, 32, 64)  # the smoke bundle's region: a 4 x 4 x 8 token grid for patch 8


def tiny_vit(region_size=REGION, layout="window", **kwargs):
    return build_backbone("vit", "tiny", input_size=region_size, patch_size=8, layout=layout, window_size=2, **kwargs)


def tiny_pretext(region_size=REGION, seed=0, **kwargs) -> QueryBoxPretext:
    torch.manual_seed(seed)
    return QueryBoxPretext(tiny_vit(region_size), generator=seed, **kwargs)


def phantom_regions(region_size, count=2) -> torch.Tensor:
    """Whole synthetic abdomens at the region size, HU window [-175, 250] -> [0, 1]: ``[count, 1, *region_size]``."""
    volumes = [torch.from_numpy(make_phantom(seed, shape=region_size, orientation="RAS").image) for seed in range(count)]
    return ((torch.stack(volumes)[:, None] + 175) / 425).clamp(0, 1)


def coordinate_region(size) -> torch.Tensor:
    """A region whose voxel value encodes its position, x * 10000 + y * 100 + z: ``[1, 1, *size]`` (float64)."""
    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij")
    return (x * 10000 + y * 100 + z)[None, None]


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region_size", [(96, 96, 96), (32, 32, 64), (192, 192, 64), (17, 40, 9)])
def test_sampled_boxes_fit_the_region_and_have_the_stated_sides(region_size):
    pretext = QueryBoxPretext(tiny_vit((32, 32, 64)), boxes_per_region=8, generator=1)
    images = torch.zeros(64, 1, *region_size)
    pretext.crop_size = (8, 8, 8)  # the crops are not looked at here; keep them small
    views = pretext.make_views(images)
    boxes, voxels = views.boxes, views.voxel_boxes  # [64, 8, 6] each
    assert boxes.shape == voxels.shape == (64, 8, 6)
    size = torch.tensor(region_size, dtype=torch.float32)
    assert (voxels[..., :3] >= -1e-4).all() and (voxels[..., 3:] <= size + 1e-3).all()
    sides = (voxels[..., 3:] - voxels[..., :3]) / size  # fractions of each region side
    torch.testing.assert_close(sides, boxes[..., 3:])
    torch.testing.assert_close((voxels[..., :3] + voxels[..., 3:]) / 2 / size, boxes[..., :3])
    x_side, ratios = sides[..., 0], sides[..., 1:] / sides[..., :1]
    assert x_side.min() >= 0.1 and x_side.max() <= 0.4
    assert ratios.min() >= 0.8 - 1e-5 and ratios.max() <= 1.2 + 1e-5
    # 512 draws fill the ranges (a sampler stuck at one value would fail), and centres reach both ends
    assert x_side.min() < 0.11 and x_side.max() > 0.39 and ratios.min() < 0.82 and ratios.max() > 1.18
    lower, upper = boxes[..., :3] - boxes[..., 3:] / 2, boxes[..., :3] + boxes[..., 3:] / 2
    assert lower.min() < 0.01 and upper.max() > 0.99


def test_large_boxes_are_clipped_to_the_region():
    boxes = sample_query_boxes(200, 4, scale_range=(0.7, 1.0), aspect_range=(0.8, 1.2),
                               generator=torch.Generator().manual_seed(0))
    sizes, centres = boxes[..., 3:], boxes[..., :3]
    assert sizes.max() == 1.0 and (sizes <= 1.0).all()
    assert (centres - sizes / 2 >= 0).all() and (centres + sizes / 2 <= 1 + 1e-6).all()


def test_boxes_and_crops_are_reproducible_from_a_seed():
    images = torch.rand(2, 1, *REGION)
    first = tiny_pretext(seed=3).make_views(images)
    second = tiny_pretext(seed=3).make_views(images)
    other = tiny_pretext(seed=4).make_views(images)
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.crops, second.crops)
    assert not torch.equal(first.boxes, other.boxes)


# --------------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------------
def test_a_box_the_size_of_the_crop_gives_its_voxels_exactly():
    region = coordinate_region((16, 16, 16))
    pretext = tiny_pretext(intensity_scale_range=0.0, intensity_shift_range=0.0, crop_size=(8, 8, 8))
    # corners (2, 4, 6) - (10, 12, 14) in voxels: centre (6, 8, 10) / 16, size 8 / 16
    box = torch.tensor([[[6 / 16, 8 / 16, 10 / 16, 0.5, 0.5, 0.5]]])
    views = pretext.make_views(region, box)
    torch.testing.assert_close(views.voxel_boxes, torch.tensor([[[2.0, 4, 6, 10, 12, 14]]]))
    assert torch.equal(views.crops[0, 0, 0], region[0, 0, 2:10, 4:12, 6:14])
    # the whole region as the box, at the region size (the default crop size): the region itself
    pretext.crop_size = None
    whole = pretext.make_views(region, torch.tensor([[[0.5, 0.5, 0.5, 1.0, 1.0, 1.0]]]))
    assert torch.equal(whole.crops[0, 0], region[0])


def test_a_box_twice_the_crop_gives_the_means_of_two_by_two_by_two_voxels():
    region = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pretext = tiny_pretext(intensity_scale_range=0.0, intensity_shift_range=0.0, crop_size=(4, 4, 4))
    box = torch.tensor([[[0.25, 0.25, 0.25, 0.5, 0.5, 0.5]]])  # voxels 0..8 on every axis
    crop = pretext.make_views(region, box).crops[0, 0]
    torch.testing.assert_close(crop, F.avg_pool3d(region[0, :, :8, :8, :8], 2))


def test_intensity_jitter_and_flips():
    region = coordinate_region((8, 8, 8)).float() / 1e5
    box = torch.tensor([[[0.5, 0.5, 0.5, 1.0, 1.0, 1.0]]])
    jittered = tiny_pretext(crop_size=(8, 8, 8)).make_views(region, box).crops[0, 0]
    # one scale in [0.9, 1.1] and one shift in [-0.1, 0.1] per crop: jittered = a * region + b exactly
    design = torch.stack([region.flatten(), torch.ones(region.numel())], dim=1)
    scale, shift = torch.linalg.lstsq(design, jittered.flatten()[:, None]).solution.flatten().tolist()
    assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1 and not torch.allclose(jittered, region[0])
    torch.testing.assert_close(jittered, region[0] * scale + shift, rtol=0, atol=1e-5)
    flipped = tiny_pretext(crop_size=(8, 8, 8), intensity_scale_range=0.0, intensity_shift_range=0.0,
                           flip_probability=1.0).make_views(region, box).crops[0, 0]
    assert torch.equal(flipped, region[0].flip(1, 2, 3))


# --------------------------------------------------------------------------------------------------
# GIoU, loss and metrics
# --------------------------------------------------------------------------------------------------
def test_iou_and_giou_of_hand_computed_boxes():
    unit = torch.tensor([0.0, 0, 0, 1, 1, 1])
    cases = [  # (box a, box b, IoU, GIoU)
        (unit, unit, 1.0, 1.0),  # identical
        (unit, torch.tensor([2.0, 0, 0, 3, 1, 1]), 0.0, -1 / 3),  # disjoint: union 2, enclosing 3 x 1 x 1
        (torch.tensor([0.0, 0, 0, 2, 2, 2]), unit, 1 / 8, 1 / 8),  # inside: the enclosing box is the outer one
        (torch.tensor([0.0, 0, 0, 2, 2, 2]), torch.tensor([1.0, 1, 1, 3, 3, 3]), 1 / 15, 1 / 15 - 12 / 27),
    ]
    first, second = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases])
    iou, giou = box_iou_giou(first, second)
    torch.testing.assert_close(iou, torch.tensor([c[2] for c in cases]), rtol=0, atol=1e-6)
    torch.testing.assert_close(giou, torch.tensor([c[3] for c in cases]), rtol=0, atol=1e-6)


def test_boxes_and_giou_agree_with_monai():
    from monai.data.box_utils import box_pair_giou, convert_box_mode

    generator = torch.Generator().manual_seed(0)
    centre_size = sample_query_boxes(40, 1, (0.1, 0.6), generator=generator).view(40, 6)
    corners = centre_size_to_corners(centre_size)
    torch.testing.assert_close(corners, convert_box_mode(centre_size, src_mode="cccwhd", dst_mode="xyzxyz"))
    others = centre_size_to_corners(sample_query_boxes(40, 1, (0.1, 0.6), generator=generator).view(40, 6))
    monai_eps = torch.finfo(torch.float32).eps  # MONAI adds this to its denominators; ours is smaller by default
    torch.testing.assert_close(box_iou_giou(corners, others, eps=monai_eps)[1], box_pair_giou(corners, others),
                               rtol=0, atol=1e-6)
    assert (box_iou_giou(corners, others)[0] > 0).any() and (box_iou_giou(corners, others)[0] == 0).any()


def test_loss_of_a_perfect_and_of_a_known_prediction():
    target = torch.tensor([[0.3, 0.6, 0.5, 0.2, 0.25, 0.18]])
    perfect = query_box_loss(target.clone(), target)
    assert float(perfect["loss"]) < 1e-5 and float(perfect["iou"]) == pytest.approx(1.0, abs=1e-5)
    assert float(perfect["centre_error"]) == 0.0
    # the first prediction (bias 0.5) against a box shifted by 0.25 in x: L1 0.25; overlap 0.5 x 0.5 x 0.25,
    # union 0.1875, IoU 1/3; the enclosing box 0.75 x 0.5 x 0.5 = the union, so GIoU = IoU
    parts = query_box_loss(torch.full((1, 6), 0.5), torch.tensor([[0.25, 0.5, 0.5, 0.5, 0.5, 0.5]]))
    assert float(parts["l1"]) == pytest.approx(0.25)
    assert float(parts["iou"]) == pytest.approx(1 / 3, abs=1e-6)
    assert float(parts["giou"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(parts["loss"]) == pytest.approx(5 * 0.25 + 2 * 2 / 3, abs=1e-5)
    assert float(parts["centre_error"]) == pytest.approx(0.25 / 3)
    l1_only = query_box_loss(torch.full((1, 6), 0.5), torch.tensor([[0.25, 0.5, 0.5, 0.5, 0.5, 0.5]]), 1.0, 0.0)
    assert float(l1_only["loss"]) == pytest.approx(0.25)


def test_a_head_that_outputs_the_true_box_gives_zero_loss_and_iou_one():
    pretext = tiny_pretext(seed=5)
    expected = sample_query_boxes(1, 1, generator=torch.Generator().manual_seed(5))  # what forward draws first
    with torch.no_grad():
        pretext.box_head.weight.zero_()
        pretext.box_head.bias.copy_(expected[0, 0])
    output = pretext(torch.rand(1, 1, *REGION))
    assert float(output["loss"].detach()) < 1e-5
    assert float(output["metric/box_iou"]) == pytest.approx(1.0, abs=1e-5)
    assert float(output["metric/box_centre_error"]) < 1e-6


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def test_cross_attention_block_attends_only_to_the_memory():
    torch.manual_seed(0)
    block = CrossAttentionBlock(12, num_heads=3)
    queries, memory = torch.randn(2, 4, 12), torch.randn(2, 10, 12)
    together = block(queries, memory)
    one_by_one = torch.cat([block(queries[:, i:i + 1], memory) for i in range(4)], dim=1)
    torch.testing.assert_close(together, one_by_one)  # queries are independent of each other
    # without positions the memory is a set; with them, moving tokens to other positions changes the result
    order = torch.randperm(10)
    torch.testing.assert_close(block(queries, memory[:, order]), together)
    position = torch.randn(10, 12)
    with_position = block(queries, memory, position)
    torch.testing.assert_close(block(queries, memory[:, order], position[order]), with_position)
    assert not torch.allclose(block(queries, memory[:, order], position), with_position)


def test_several_boxes_per_region_shapes_and_independence():
    pretext = tiny_pretext(boxes_per_region=3).eval()
    images = torch.rand(2, 1, *REGION)
    views = pretext.make_views(images)
    assert views.crops.shape == (2, 3, 1, *REGION) and views.boxes.shape == (2, 3, 6)
    with torch.no_grad():
        predicted = pretext.predict(images, views.crops)
        alone = pretext.predict(images, views.crops[:, 1:2])
    assert predicted.shape == (2, 3, 6)
    torch.testing.assert_close(predicted[:, 1:2], alone, rtol=1e-4, atol=1e-5)
    output = pretext(images)
    assert set(output) == {"loss", "loss/l1", "loss/giou", "metric/box_iou", "metric/box_centre_error",
                           "health/embedding_std", "health/top_component_share", "health/collapsed"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in output.values())
    assert not any(value.requires_grad for key, value in output.items() if key != "loss")


def test_windowed_tiny_vit_trains_every_part():
    pretext = tiny_pretext()  # window layout, window 2 over a 4 x 4 x 8 token grid
    assert pretext.backbone.groupings[0] == "window"
    output = pretext({"image": torch.rand(2, 1, *REGION)})
    output["loss"].backward()
    for name in ["query_token", "pool_block.query.weight", "cross_blocks.1.key_value.weight", "box_head.weight",
                 "backbone.patch_embedding.patch_embeddings.weight", "backbone.blocks.0.attn.qkv.weight"]:
        gradient = dict(pretext.named_parameters())[name].grad
        assert gradient is not None and gradient.abs().sum() > 0, name


def test_smaller_crop_size_encodes_crops_separately():
    pretext = tiny_pretext(crop_size=(16, 16, 32), boxes_per_region=2)
    output = pretext(torch.rand(2, 1, *REGION))
    assert torch.isfinite(output["loss"])


def test_loss_falls_on_phantom_regions():
    """30 AdamW steps of a tiny ViT on two phantom abdomens, fresh boxes every step: the mean loss of the last
    5 steps is well below that of the first 5."""
    region_size = (16, 16, 32)
    torch.manual_seed(0)
    pretext = QueryBoxPretext(build_backbone("vit", "tiny", input_size=region_size, patch_size=8),
                              boxes_per_region=4, generator=0)
    optimizer = torch.optim.AdamW(pretext.parameters(), lr=1e-4)
    images = phantom_regions(region_size)
    losses = []
    for _ in range(30):
        loss = pretext(images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses


def test_swin_backbone_uses_its_deepest_feature_map():
    torch.manual_seed(0)
    backbone = build_backbone("swin", "tiny", window_size=2)
    pretext = QueryBoxPretext(backbone, generator=0)
    tokens, grid = pretext.encode_tokens(torch.rand(2, 1, *REGION))
    assert tokens.shape == (2, 2, 192) and grid == (1, 1, 2)  # stride 32, 16 x 12 channels
    output = pretext(torch.rand(1, 1, *REGION))
    output["loss"].backward()
    assert backbone.swinViT.patch_embed.proj.weight.grad is not None


def test_settings_a_user_can_get_wrong():
    with pytest.raises(ConfigError, match=r"^the query-box pretext needs a backbone offering TokenSequence or "
                                          r"FeaturePyramid .* the Linear does not \(TokenSequence lacks can_drop_tokens"):
        QueryBoxPretext(torch.nn.Linear(3, 3))
    backbone = tiny_vit()
    for settings in [{"boxes_per_region": 0}, {"min_scale": 0.5, "max_scale": 0.2}, {"max_scale": 1.5},
                     {"aspect_range": (1.2, 0.8)}, {"num_cross_blocks": 0}, {"flip_probability": 2},
                     {"l1_weight": 0, "giou_weight": 0}, {"num_heads": 5}]:
        with pytest.raises(ConfigError):
            QueryBoxPretext(backbone, **settings)
    rotating = QueryBoxPretext(backbone, rotate_probability=1.0, crop_size=(16, 8, 8))
    with pytest.raises(ConfigError, match="square"):
        rotating.make_views(torch.rand(1, 1, *REGION))


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------
def test_views_and_their_picture(tmp_path):
    pretext = tiny_pretext(boxes_per_region=2)
    images = torch.rand(2, 1, *REGION)
    views = pretext.views({"image": images})
    assert pretext.training  # mode restored
    assert views["region_slice"].shape == REGION[:2] and views["crop"].shape == REGION
    true = views["true_box"]
    assert true.shape == views["predicted_box"].shape == (6,)
    assert true[2] <= views["slice_index"] < true[5]  # the slice cuts through the true box
    torch.testing.assert_close(views["region_slice"], images[0, 0, :, :, views["slice_index"]])
    assert 0.0 <= views["iou"] <= 1.0
    path = save_views_picture(views, tmp_path / "views.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
