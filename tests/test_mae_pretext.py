"""Masked image modelling (MAE, SimMIM): masks, patches, targets, loss, PSNR, backbones, training, views."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from voco.errors import ConfigError
from voco.engine import decay_groups
from voco.networks import build_backbone
from voco.pretext.mae import (MaskedImagePretext, block_lattice, block_mask, mask_volume, masked_count,
                              normalize_patches, patchify, random_mask, reconstruction_psnr,
                              save_views_picture, unpatchify)

GRIDS = [(4, 4, 4), (6, 6, 3), (3, 5, 2)]
RATIOS = [0.25, 0.5, 0.6, 0.75, 0.9]


def tiny_vit(input_size=(32, 32, 32), patch_size=8, **kwargs):
    return build_backbone("vit", "tiny", input_size=input_size, patch_size=patch_size, **kwargs)


def tiny_mae(backbone=None, seed: int = 0, **kwargs) -> MaskedImagePretext:
    torch.manual_seed(seed)
    kwargs = {"decoder_dim": 48, "decoder_depth": 1, "decoder_heads": 4, "generator": seed, **kwargs}
    return MaskedImagePretext(backbone or tiny_vit(), **kwargs)


def phantom_regions(count: int, size=(32, 32, 32)) -> torch.Tensor:
    """Central regions of CT phantoms (`voco.data.phantoms`), HU windowed [-175, 250] -> [0, 1]: [B, 1, *size]."""
    from voco.data.phantoms import make_phantom

    regions = []
    for seed in range(count):
        shape = tuple(s + 16 for s in size)
        volume = torch.from_numpy(make_phantom(seed, shape=shape, orientation="RAS").image)
        volume = ((volume.clamp(-175, 250) + 175) / 425)
        start = [(n - s) // 2 for n, s in zip(volume.shape, size)]
        regions.append(volume[tuple(slice(a, a + s) for a, s in zip(start, size))])
    return torch.stack(regions)[:, None]


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid, ratio", list(itertools.product(GRIDS, RATIOS)))
def test_random_and_block_masks_hide_exactly_the_rounded_count_in_every_region(grid, ratio):
    num_patches = math.prod(grid)
    expected = masked_count(num_patches, ratio)
    assert expected == min(max(math.floor(ratio * num_patches + 0.5), 1), num_patches - 1)
    generator = torch.Generator().manual_seed(1)
    for mask in [random_mask(5, grid, ratio, generator), block_mask(5, grid, ratio, 2, generator),
                 block_mask(5, grid, ratio, (2, 2, 1), generator)]:
        assert mask.shape == (5, num_patches) and mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [expected] * 5


@pytest.mark.parametrize("block_size", [2, 3, (2, 2, 1)])
def test_block_masks_are_unions_of_cubes(block_size):
    """Every cube of the shifted lattice is masked whole or not at all, except at most one (the last one
    taken, masked in part to reach the exact count); each cube is a box of at most block_size patches per axis."""
    grid = (6, 6, 4)
    side = (block_size,) * 3 if isinstance(block_size, int) else block_size
    mask = block_mask(8, grid, 0.6, block_size, torch.Generator().manual_seed(0))
    cubes, _ = block_lattice(8, grid, block_size, torch.Generator().manual_seed(0))  # the lattice that mask drew
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
    for sample in range(8):
        partial = 0
        for cube in cubes[sample].unique():
            members = cubes[sample] == cube
            corner, far = coordinates[members].min(0).values, coordinates[members].max(0).values
            extent = far - corner + 1
            assert members.sum() == extent.prod() and all(e <= s for e, s in zip(extent.tolist(), side))
            masked = mask[sample, members]
            partial += bool(masked.any() and not masked.all())
        assert partial <= 1
    # cubes, not scattered patches: masked patches have more masked neighbours than under random masking
    def masked_neighbours(masks):
        volume = masks.view(-1, *grid).float()
        neighbours = sum(volume.roll(shift, axis) for axis in (1, 2, 3) for shift in (1, -1))
        return float((neighbours * volume).sum() / volume.sum())

    scattered = random_mask(8, grid, 0.6, torch.Generator().manual_seed(0))
    assert masked_neighbours(mask) > masked_neighbours(scattered) + 0.3


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_masks_differ_between_regions_and_repeat_with_a_seed(mask_type):
    first = tiny_mae(seed=3, mask_type=mask_type).make_mask(4, (4, 4, 4))
    again = tiny_mae(seed=3, mask_type=mask_type).make_mask(4, (4, 4, 4))
    other = tiny_mae(seed=4, mask_type=mask_type).make_mask(4, (4, 4, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(not torch.equal(first[i], first[j]) for i, j in itertools.combinations(range(4), 2))


def test_mask_ratio_must_leave_something_hidden_and_something_visible():
    with pytest.raises(ConfigError, match="mask_ratio"):
        masked_count(64, 1.0)
    with pytest.raises(ConfigError, match="mask_ratio"):
        tiny_mae(mask_ratio=0.0)
    assert masked_count(4, 0.1) == 1 and masked_count(4, 0.95) == 3


# --------------------------------------------------------------------------------------------------
# Patches and targets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size, shape", [(8, (2, 1, 16, 24, 32)), ((16, 16, 8), (2, 2, 32, 48, 16)),
                                               ((4, 2, 1), (1, 3, 8, 4, 3))])
def test_patchify_unpatchify_round_trip(patch_size, shape):
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    p = (patch_size,) * 3 if isinstance(patch_size, int) else patch_size
    grid = [s // q for s, q in zip(shape[2:], p)]
    patches = patchify(images, patch_size)
    assert patches.shape == (shape[0], math.prod(grid), math.prod(p) * shape[1])
    assert torch.equal(unpatchify(patches, grid, patch_size, shape[1]), images)
    # patch l = raster position (i, j, k) of the grid, its values ordered (p1, p2, p3, C)
    i, j, k = grid[0] - 1, 0, grid[2] - 1
    block = images[1 % shape[0], :, i * p[0]:(i + 1) * p[0], j * p[1]:(j + 1) * p[1], k * p[2]:(k + 1) * p[2]]
    index = (i * grid[1] + j) * grid[2] + k
    assert torch.equal(patches[1 % shape[0], index], block.permute(1, 2, 3, 0).flatten())
    # the voxel mask of a patch mask is the unpatchified mask
    mask = torch.rand(shape[0], math.prod(grid), generator=torch.Generator().manual_seed(1)) < 0.5
    expected = unpatchify(mask[..., None].expand(-1, -1, math.prod(p)).float(), grid, patch_size, 1).bool()
    assert torch.equal(mask_volume(mask, grid, patch_size), expected)


def test_patchify_rejects_sizes_the_patch_does_not_divide():
    with pytest.raises(ConfigError, match="patches"):
        patchify(torch.zeros(1, 1, 16, 16, 12), 8)


def test_per_patch_normalised_target_by_hand():
    """A patch (1, 2, 3, 4): mean 2.5, unbiased variance 5/3 (as MAE's norm_pix_loss), std sqrt(5/3 + 1e-6)."""
    images = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2, 1)
    targets, mean, std = normalize_patches(patchify(images, (2, 2, 1)))
    assert mean.item() == 2.5 and std.item() == pytest.approx(math.sqrt(5 / 3 + 1e-6))
    torch.testing.assert_close(targets[0, 0], torch.tensor([-1.1618950, -0.3872983, 0.3872983, 1.1618950]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(targets * std + mean, patchify(images, (2, 2, 1)))


# --------------------------------------------------------------------------------------------------
# Loss and PSNR
# --------------------------------------------------------------------------------------------------
def with_fixed_prediction(pretext: MaskedImagePretext, predictions: torch.Tensor) -> list[torch.Tensor]:
    """Make `pretext.predict` return `predictions` and record the masks it is given."""
    masks: list[torch.Tensor] = []

    def predict(images, mask):
        masks.append(mask)
        return predictions

    pretext.predict = predict
    return masks


@pytest.mark.parametrize("variant, normalize", [("mae", True), ("mae", False), ("simmim", False)])
def test_loss_counts_masked_patches_only(variant, normalize):
    pretext = tiny_mae(variant=variant, normalize_targets=normalize, seed=2)
    images = phantom_regions(2)
    patches = patchify(images, 8)
    targets = normalize_patches(patches)[0] if normalize else patches
    predictions = torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))
    masks = with_fixed_prediction(pretext, predictions)
    pretext.generator.manual_seed(9)
    loss = pretext(images)["loss"]
    mask = masks[0]
    error = (predictions - targets).pow(2) if variant == "mae" else (predictions - targets).abs()
    torch.testing.assert_close(loss, error[mask].mean())
    changed = predictions.clone()
    visible = (~mask).nonzero()[0]
    changed[visible[0], visible[1]] += 100.0  # a visible patch: no effect
    with_fixed_prediction(pretext, changed)
    pretext.generator.manual_seed(9)
    assert pretext(images)["loss"].item() == loss.item()
    masked = mask.nonzero()[0]
    changed[masked[0], masked[1]] += 1.0  # a masked patch: the loss moves
    pretext.generator.manual_seed(9)
    assert pretext(images)["loss"].item() != loss.item()


def test_simmim_unmasked_weight_adds_the_visible_patches():
    pretext = tiny_mae(variant="simmim", unmasked_weight=0.5)
    images = phantom_regions(2)
    patches = patchify(images, 8)
    predictions = patches + torch.where(torch.arange(patches.shape[1])[None, :, None] % 2 == 0, 0.2, 0.0)
    masks = with_fixed_prediction(pretext, predictions)
    loss = pretext(images)["loss"]
    error = (predictions - patches).abs().mean(-1)
    weights = masks[0].float() + 0.5 * (~masks[0]).float()
    torch.testing.assert_close(loss, (error * weights).sum() / weights.sum())


def test_psnr_of_a_perfect_and_of_a_known_error():
    targets = torch.rand(2, 10, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True
    perfect = reconstruction_psnr(targets, targets, mask)
    assert torch.isfinite(perfect) and perfect.item() == pytest.approx(100.0)  # MSE floored at 1e-10
    # region 0 off by 0.1 (MSE 1e-2: 20 dB), region 1 by 0.01 (MSE 1e-4: 40 dB); visible patches ignored
    offsets = torch.tensor([0.1, 0.01])[:, None, None]
    predictions = torch.where(mask[..., None], targets + offsets, targets + 5.0)
    assert reconstruction_psnr(predictions, targets, mask).item() == pytest.approx(30.0, abs=1e-3)
    assert reconstruction_psnr(predictions, targets, mask, data_range=2.0).item() == pytest.approx(
        30.0 + 20 * math.log10(2.0), abs=1e-3)


def test_psnr_is_measured_in_intensities_when_targets_are_normalised():
    pretext = tiny_mae(normalize_targets=True)
    images = phantom_regions(2)
    normalised, mean, std = normalize_patches(patchify(images, 8))
    with_fixed_prediction(pretext, normalised)
    assert pretext(images)["metric/reconstruction_psnr"].item() == pytest.approx(100.0)
    with_fixed_prediction(pretext, normalised + 0.1 / std)  # an intensity error of exactly 0.1: 20 dB
    assert pretext(images)["metric/reconstruction_psnr"].item() == pytest.approx(20.0, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Backbones and variants
# --------------------------------------------------------------------------------------------------
def test_mae_step_on_a_global_vit_with_anisotropic_patches():
    backbone = tiny_vit(input_size=(32, 32, 16), patch_size=(16, 16, 8))
    pretext = tiny_mae(backbone, normalize_targets=True, mask_type="block")
    assert pretext.variant == "mae"
    output = pretext(torch.rand(3, 1, 32, 32, 16))
    assert set(output) == {"loss", "loss/reconstruction", "metric/reconstruction_psnr", "metric/mask_ratio"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in output.values())
    assert output["metric/mask_ratio"].item() == masked_count(8, 0.75) / 8
    assert pretext.decoder_pred.out_features == 16 * 16 * 8
    output["loss"].backward()
    assert pretext.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert pretext.mask_token.grad is not None and pretext.decoder_pred.weight.grad is not None
    # bf16 autocast (as the engine runs it on GPUs): the loss stays float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pretext(torch.rand(2, 1, 32, 32, 16))["loss"].dtype == torch.float32


def test_mae_decoder_puts_encoded_tokens_back_in_place_and_the_mask_token_elsewhere():
    """Without decoder blocks a patch's prediction depends on the image only where the patch was visible."""
    pretext = tiny_mae(decoder_depth=0)
    first, second = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    mask = pretext.make_mask(2, (4, 4, 4))
    one, two = pretext.predict(first, mask), pretext.predict(second, mask)
    torch.testing.assert_close(one[mask], two[mask])  # mask token + position: the same for any image
    both = mask[0] & mask[1]
    assert both.any()
    torch.testing.assert_close(one[0][both], one[1][both])  # ... and for any region
    assert (one[~mask] - two[~mask]).abs().amax(dim=-1).min() > 1e-4  # every visible patch sees its image


def test_mae_with_a_windowed_vit_or_the_swin_tells_the_user_what_to_use():
    windowed = tiny_vit(layout="window", window_size=2)
    with pytest.raises(ConfigError, match="variant 'simmim'.*layout 'global'"):
        MaskedImagePretext(windowed, variant="mae")
    assert MaskedImagePretext(windowed).variant == "simmim"  # auto
    with pytest.raises(ConfigError, match="simmim"):
        MaskedImagePretext(build_backbone("swin", "tiny", window_size=2), variant="mae")
    with pytest.raises(ConfigError, match="variant"):
        MaskedImagePretext(windowed, variant="beit")
    with pytest.raises(ConfigError, match="mask_type"):
        MaskedImagePretext(windowed, mask_type="grid")


def test_simmim_runs_on_a_windowed_vit():
    pretext = tiny_mae(tiny_vit(layout="window", window_size=2), mask_type="block", mask_ratio=0.6)
    assert pretext.variant == "simmim"
    output = pretext(phantom_regions(2))
    assert output["metric/mask_ratio"].item() == masked_count(64, 0.6) / 64
    output["loss"].backward()
    assert pretext.mask_token.grad is not None and pretext.mask_token.grad.abs().sum() > 0
    assert pretext.backbone.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("mask_value", ["zero", "learned"])
def test_simmim_runs_on_the_tiny_swin(mask_value):
    torch.manual_seed(0)
    backbone = build_backbone("swin", "tiny", window_size=2)
    pretext = MaskedImagePretext(backbone, mask_ratio=0.5, mask_value=mask_value, generator=0)
    assert pretext.variant == "simmim" and pretext.patch_size == (32, 32, 32)
    images = phantom_regions(2, (32, 32, 64))
    output = pretext(images)
    assert output["metric/mask_ratio"].item() == 0.5 and torch.isfinite(output["loss"])
    output["loss"].backward()
    assert pretext.prediction_head.weight.grad is not None
    assert pretext.backbone.swinViT.patch_embed.proj.weight.grad is not None
    if mask_value == "learned":
        assert pretext.mask_value.grad is not None
    with pytest.raises(ConfigError, match="multiples of 32"):
        pretext(torch.zeros(2, 1, 32, 32, 48))


def test_loss_falls_on_phantom_regions():
    """30 AdamW steps of a tiny ViT MAE (normalised targets, fresh masks every step) on four phantom regions:
    the mean loss of the last 5 steps is below 0.9 of the first 5 (measured: 0.74-0.76 for three seeds)."""
    images = phantom_regions(4)
    pretext = tiny_mae(normalize_targets=True, decoder_dim=64, decoder_depth=2)
    optimizer = torch.optim.AdamW(decay_groups(pretext, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        output = pretext(images)
        optimizer.zero_grad()
        output["loss"].backward()
        optimizer.step()
        losses.append(output["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_parameter_groups_leave_biases_norms_and_tokens_undecayed():
    pretext = tiny_mae()
    decayed, undecayed = decay_groups(pretext, 0.05)
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    undecayed_ids = {id(p) for p in undecayed["params"]}
    assert id(pretext.mask_token) in undecayed_ids and id(pretext.decoder_norm.weight) in undecayed_ids
    assert id(pretext.decoder_embed.bias) in undecayed_ids
    assert {id(p) for p in decayed["params"]} >= {id(pretext.decoder_embed.weight), id(pretext.decoder_pred.weight)}
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(pretext.parameters()))


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_views_and_their_picture(tmp_path, normalize):
    pretext = tiny_mae(normalize_targets=normalize)
    pretext.train()
    images = phantom_regions(2)
    views = pretext.views({"image": images})
    assert pretext.training
    for key in ("input_slice", "masked_slice", "mask_slice", "reconstruction_slice", "prediction_slice"):
        assert views[key].shape == (32, 32) and views[key].device.type == "cpu"
    middle = images[0, 0, :, :, 16]
    assert torch.equal(views["input_slice"], middle)
    visible, hidden = ~views["mask_slice"], views["mask_slice"]
    assert hidden.any() and visible.any()
    # visible voxels pasted from the input, masked ones from the prediction
    assert torch.equal(views["reconstruction_slice"][visible], middle[visible])
    assert torch.equal(views["reconstruction_slice"][hidden], views["prediction_slice"][hidden])
    assert torch.all(views["masked_slice"][hidden] == 0)
    assert views["mask_ratio"] == 0.75 and math.isfinite(views["psnr"])
    path = save_views_picture(views, tmp_path / "views" / "mae.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["mae.png"]
