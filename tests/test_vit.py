"""The 3-D ViT with an attention layout: exact grouping of each layout, extra tokens, padded scans, MONAI
compatibility, position embeddings, shapes and errors, gradient checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.networks.vit import (FourierPositionEmbedding, UNETRViT, ViTEncoder, average_extra_tokens, block_groupings,
                               copy_extra_tokens, merge, partition, sincos_1d, sincos_position_embedding)

WIDTH = 24  # divisible by 6 (3-D sin-cos) and by the 2 heads


def small_vit(layout, window_size=2, **kwargs) -> ViTEncoder:
    """Input 16^3, patch 4: a 4 x 4 x 4 token grid; width 24, 2 heads, one block per grouping of ``layout``."""
    depth = kwargs.pop("depth", 3)
    depth = depth if isinstance(layout, str) else len(layout)
    kwargs = {"input_size": 16, "patch_size": 4, "max_scans": 4, **kwargs}
    torch.manual_seed(0)
    return ViTEncoder(hidden_size=WIDTH, depth=depth, num_heads=2, layout=layout, window_size=window_size,
                      **kwargs).eval()


def random_tokens(batch: int, scans: int, grid=(4, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, scans, *grid, WIDTH, generator=torch.Generator().manual_seed(seed))


def changed_outputs(vit: ViTEncoder, tokens: torch.Tensor, index: tuple, extra: torch.Tensor | None = None,
                    perturb_extra: bool = False, scan_mask: torch.Tensor | None = None):
    """Perturb one input token (patch ``tokens[index]`` or ``extra[index]``) and return which patch outputs
    ``[B, N, d, h, w]`` and which extra outputs ``[B, E]`` changed at all."""
    with torch.no_grad():
        before, before_extra = vit.encode(tokens, extra, scan_mask)
        tokens, extra = tokens.clone(), None if extra is None else extra.clone()
        target = extra if perturb_extra else tokens
        target[index] += torch.randn(WIDTH, generator=torch.Generator().manual_seed(7))
        after, after_extra = vit.encode(tokens, extra, scan_mask)
    changed_extra = None if extra is None else (after_extra != before_extra).any(-1)
    return (after != before).any(-1), changed_extra


def reference_encode(vit: ViTEncoder, tokens: torch.Tensor, extra: torch.Tensor | None = None):
    """The layout by its definition: every block partitions the tokens into its groups, copies the extra tokens
    into each group, runs, averages the copies and merges back."""
    shape, num_extra = tokens.shape, 0 if extra is None else extra.shape[1]
    for block, grouping in zip(vit.blocks, vit.groupings):
        groups = partition(tokens, grouping, vit.window_size)
        per_sample = groups.shape[0] // shape[0]
        if extra is not None:
            groups = torch.cat([copy_extra_tokens(extra, per_sample), groups], dim=1)
        groups = block(groups)
        if extra is not None:
            extra, groups = average_extra_tokens(groups[:, :num_extra], per_sample), groups[:, num_extra:]
        tokens = merge(groups, grouping, shape, vit.window_size)
    return vit.norm(tokens), None if extra is None else vit.norm(extra)


# --------------------------------------------------------------------------------------------------
# Which tokens attend together
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping, window_size, scans", [
    ("window", (2, 2, 2), 2), ("window", (1, 2, 4), 3), ("slice", 2, 3), ("scan", 2, 3), ("study", 2, 3),
    ("global", 2, 2)])
def test_one_block_mixes_exactly_the_tokens_of_a_group(grouping, window_size, scans):
    vit = small_vit([grouping], window_size)
    b, n, i, j, k = 1, 1, 1, 2, 3  # the perturbed token
    expected = torch.zeros(2, scans, 4, 4, 4, dtype=torch.bool)
    if grouping == "window":
        a, wb, c = window_size
        expected[b, n, i // a * a:(i // a + 1) * a, j // wb * wb:(j // wb + 1) * wb, k // c * c:(k // c + 1) * c] = True
    elif grouping == "slice":  # one patch-thick slab along z in one scan
        expected[b, n, :, :, k] = True
    elif grouping == "scan":
        expected[b, n] = True
    else:  # study, global: every token of every scan of the study
        expected[b] = True
    changed, _ = changed_outputs(vit, random_tokens(2, scans), (b, n, i, j, k))
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("grouping", ["window", "slice", "scan", "study"])
def test_extra_tokens_take_part_in_every_group(grouping):
    vit = small_vit([grouping])
    tokens, extra = random_tokens(2, 3), torch.randn(2, 2, WIDTH, generator=torch.Generator().manual_seed(1))
    # An extra token is copied into every group: changing it changes every patch output of its sample only.
    changed, changed_extra = changed_outputs(vit, tokens, (1, 0), extra, perturb_extra=True)
    assert changed[1].all() and not changed[0].any()
    assert changed_extra[1].all() and not changed_extra[0].any()  # the other extra token attends to it
    # A patch token reaches the extra tokens of its sample through the average of the copies.
    changed, changed_extra = changed_outputs(vit, tokens, (1, 2, 0, 3, 1), extra)
    assert changed_extra[1].all() and not changed_extra[0].any()


@pytest.mark.parametrize("layout", ["window", "slice", "scan", "global",
                                    ["window", "scan", "global", "study", "window"], ["slice", "study", "scan"]])
def test_encode_equals_the_layout_by_its_definition(layout):
    """`encode` orders the tokens once by the finest grouping; the result must be that of regrouping in every
    block, tokens and extra tokens alike, with the hidden states in the natural token order."""
    vit = small_vit(layout, depth=6)
    tokens, extra = random_tokens(2, 2), torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden_states = []
        encoded, encoded_extra = vit.encode(tokens, extra, hidden_states=hidden_states)
        expected, expected_extra = reference_encode(vit, tokens, extra)
    torch.testing.assert_close(encoded, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoded_extra, expected_extra, rtol=0, atol=1e-5)
    assert len(hidden_states) == vit.depth and hidden_states[-1].shape == (2, 2 * 64, WIDTH)
    torch.testing.assert_close(vit.norm(hidden_states[-1]), encoded.flatten(1, 4), rtol=0, atol=1e-5)


def test_padded_scans_change_neither_the_other_scans_nor_the_extra_tokens():
    vit = small_vit(["slice", "scan", "study", "scan", "study"])
    tokens, extra = random_tokens(2, 3), torch.randn(2, 1, WIDTH, generator=torch.Generator().manual_seed(3))
    scan_mask = torch.tensor([[True, True, False], [True, True, True]])
    other_content = tokens.clone()
    other_content[0, 2] = torch.randn(4, 4, 4, WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before, before_extra = vit.encode(tokens, extra, scan_mask)
        after, after_extra = vit.encode(other_content, extra, scan_mask)
        unmasked_before, unmasked_before_extra = vit.encode(tokens, extra)
        unmasked_after, unmasked_after_extra = vit.encode(other_content, extra)
    torch.testing.assert_close(after[0, :2], before[0, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(after_extra, before_extra, rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    assert not torch.allclose(after[0, 2], before[0, 2])  # the padded scan itself is still encoded
    # Without the mask the same content does reach them: the mask is what keeps them apart.
    assert not torch.allclose(unmasked_after[0, :2], unmasked_before[0, :2], atol=1e-3)
    assert not torch.allclose(unmasked_after_extra[0], unmasked_before_extra[0], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
def blocks_with(groupings, name):
    return [index for index, grouping in enumerate(groupings) if grouping == name]


def test_block_groupings_of_the_layouts():
    window = block_groupings("window", 12)
    assert blocks_with(window, "global") == [2, 5, 8, 11]  # ViTDet: the last block of every three, not 0, 3, 6, 9
    assert blocks_with(window, "window") == [0, 1, 3, 4, 6, 7, 9, 10]
    assert blocks_with(block_groupings("window", 12, global_every=4), "global") == [3, 7, 11]
    hierarchical = block_groupings("slice", 12)  # HLIP three-level
    assert blocks_with(hierarchical, "slice") == [0, 3, 6, 9]
    assert blocks_with(hierarchical, "scan") == [1, 4, 7, 10]
    assert blocks_with(hierarchical, "study") == [2, 5, 8, 11]
    two_level = block_groupings("scan", 12)  # HLIP two-level
    assert blocks_with(two_level, "study") == [2, 5, 8, 11] and blocks_with(two_level, "scan") == [
        0, 1, 3, 4, 6, 7, 9, 10]
    assert block_groupings("global", 4) == ("global",) * 4
    assert block_groupings(["window", "global", "scan"], 3) == ("window", "global", "scan")
    tiny = build_backbone("vit", "tiny", input_size=32, patch_size=8, layout="window", window_size=2)
    assert tiny.groupings == window


def test_block_groupings_errors():
    with pytest.raises(ConfigError, match="explicit layout needs 3"):
        block_groupings(["window", "global"], 3)
    with pytest.raises(ConfigError, match="explicit layout"):
        block_groupings(["window", "diagonal", "global"], 3)
    with pytest.raises(ConfigError, match="unknown attention layout 'swin'"):
        block_groupings("swin", 12)
    with pytest.raises(ConfigError, match="global_every"):
        block_groupings("window", 12, global_every=0)


# --------------------------------------------------------------------------------------------------
# Grouping helpers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["global", "study", "scan", "slice", "window"])
def test_partition_holds_the_groups_and_merge_inverts_it(grouping):
    batch, scans, (d, h, w), window = 2, 3, (4, 2, 6), (2, 1, 3)
    tokens = random_tokens(batch, scans, (d, h, w))
    groups = partition(tokens, grouping, window)
    assert torch.equal(merge(groups, grouping, tokens.shape, window), tokens)
    per_sample = {"global": 1, "study": 1, "scan": scans, "slice": scans * w, "window": scans * 2 * 2 * 2}[grouping]
    assert groups.shape == (batch * per_sample, scans * d * h * w // per_sample, WIDTH)
    # Group g of sample b holds exactly the tokens the docstring says, in some order.
    b, n = 1, 2
    if grouping in ("global", "study"):
        index, expected = b, tokens[b]
    elif grouping == "scan":
        index, expected = b * scans + n, tokens[b, n]
    elif grouping == "slice":
        index, expected = (b * scans + n) * w + 5, tokens[b, n, :, :, 5]
    else:  # window (1, 0, 1) of scan n: x 2..3, y 0, z 3..5
        index, expected = ((b * scans + n) * 2 + 1) * 2 * 2 + 1, tokens[b, n, 2:4, 0:1, 3:6]
    assert torch.equal(groups[index].sort(dim=0).values, expected.reshape(-1, WIDTH).sort(dim=0).values)


def test_extra_token_copies_average_back_and_weights_leave_groups_out():
    extra = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(5))
    copies = copy_extra_tokens(extra, 4)
    assert copies.shape == (8, 3, WIDTH) and torch.equal(copies[4:8], extra[1:2].expand(4, -1, -1))
    torch.testing.assert_close(average_extra_tokens(copies, 4), extra)
    # Group 1 of sample 0 and groups 2, 3 of sample 1 have weight 0: whatever they hold is ignored.
    changed = copies.clone()
    changed[1] = 100.0
    changed[6:8] = -100.0
    changed[2] = changed[2] + 3.0  # sample 0: mean of groups 0, 2, 3 = extra + 1
    weights = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    averaged = average_extra_tokens(changed, 4, weights)
    torch.testing.assert_close(averaged[0], extra[0] + 1.0)
    torch.testing.assert_close(averaged[1], extra[1])


# --------------------------------------------------------------------------------------------------
# MONAI compatibility
# --------------------------------------------------------------------------------------------------
def test_global_sincos_vit_loads_into_monai_vit_and_gives_its_output():
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ours = ViTEncoder(input_size=32, patch_size=8, hidden_size=48, depth=2, num_heads=2, layout="global").eval()
    monai_vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=2,
                    pos_embed_type="sincos", qkv_bias=True).eval()
    report = monai_vit.load_state_dict(ours.state_dict(), strict=False)
    assert not report.unexpected_keys
    assert sorted(report.missing_keys) == sorted(f"blocks.{i}.norm_cross_attn.{p}" for i in range(2)
                                                 for p in ("weight", "bias"))
    images = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, expected_hidden = monai_vit(images)
        hidden_states = []
        tokens, _ = ours.encode(ours.embed(images), hidden_states=hidden_states)
    torch.testing.assert_close(tokens.flatten(1, 4), expected, rtol=0, atol=1e-5)
    for ours_hidden, monai_hidden in zip(hidden_states, expected_hidden, strict=True):
        torch.testing.assert_close(ours_hidden, monai_hidden, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4, 4), (2, 3, 5)])
def test_sincos_table_equals_monai(grid):
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    expected = build_sincos_position_embedding(grid, 48, spatial_dims=3)[0]
    torch.testing.assert_close(sincos_position_embedding(grid, 48), expected, rtol=0, atol=0)


def test_unetr_vit_inside_monai_unetr():
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=192,
                  num_heads=2, qkv_bias=True).eval()
    ours = copy.deepcopy(unetr)
    ours.vit = UNETRViT(input_size=32, patch_size=16, hidden_size=48, depth=12, num_heads=2, layout="global").eval()
    report = ours.vit.load_state_dict(unetr.vit.state_dict(), strict=False)  # UNETR's learned table loads too
    assert not report.missing_keys and all("norm_cross_attn" in key for key in report.unexpected_keys)
    images = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), unetr(images), rtol=0, atol=1e-5)
        # A windowed layout is kept in fine-tuning: the same UNETR with a ViTDet-style encoder runs.
        ours.vit = UNETRViT(input_size=32, patch_size=16, hidden_size=48, depth=12, num_heads=2, layout="window",
                            window_size=(1, 1, 2))
        assert ours(images).shape == (1, 2, 32, 32, 32)


# --------------------------------------------------------------------------------------------------
# Position embeddings, shapes, errors
# --------------------------------------------------------------------------------------------------
def test_sincos_table_is_interpolated_to_other_grids():
    vit = small_vit("window")
    table = vit.patch_embedding.position_embeddings[0]
    assert torch.equal(vit.position_table((4, 4, 4)), table)
    stretched = vit.position_table((8, 4, 2))
    assert stretched.shape == (64, WIDTH) and torch.isfinite(stretched).all()
    # Trilinear (align_corners=False) doubling along x: the first new row is the first old row (edge clamped).
    doubled = vit.position_table((8, 4, 4)).view(8, 4, 4, WIDTH)
    torch.testing.assert_close(doubled[0], table.view(4, 4, 4, WIDTH)[0])
    torch.testing.assert_close(doubled[1], 0.75 * table.view(4, 4, 4, WIDTH)[0] + 0.25 * table.view(4, 4, 4, WIDTH)[1])
    assert vit.embed(torch.randn(1, 1, 32, 16, 8)).shape == (1, 1, 8, 4, 2, WIDTH)


def test_fourier_position_embedding_runs_for_any_grid_and_learns_its_frequencies():
    vit = small_vit("global", position_embedding="fourier")
    assert "patch_embedding.position_embeddings" not in vit.state_dict()
    frequencies = vit.position_encoder.log_frequencies
    assert isinstance(frequencies, torch.nn.Parameter) and frequencies.requires_grad
    assert frequencies[0].item() == 0.0 and frequencies[-1].item() == pytest.approx(math.log(3 / 2))  # grid 4: Nyquist (4 - 1) / 2
    for grid in [(4, 4, 4), (3, 5, 2), (1, 1, 1), (9, 2, 7)]:
        assert vit.position_table(grid).shape == (math.prod(grid), WIDTH)
    vit.train()
    vit(torch.randn(2, 1, 12, 20, 8)).square().sum().backward()
    assert frequencies.grad is not None and frequencies.grad.abs().sum() > 0
    assert FourierPositionEmbedding(WIDTH, (32, 8, 8)).log_frequencies[-1].item() == pytest.approx(math.log(31 / 2))


def test_anisotropic_patches():
    torch.manual_seed(0)
    vit = ViTEncoder(input_size=(32, 32, 16), patch_size=(8, 8, 4), hidden_size=WIDTH, depth=3, num_heads=2,
                     layout="window", window_size=(2, 2, 2)).eval()
    images = torch.randn(2, 1, 32, 32, 16)
    assert vit.token_grid((32, 32, 16)) == (4, 4, 4)
    assert vit.embed(images).shape == (2, 1, 4, 4, 4, WIDTH)
    assert vit.forward_features(images).shape == (2, WIDTH, 4, 4, 4) and vit(images).shape == (2, WIDTH)
    assert vit.patch_embedding.patch_embeddings.kernel_size == (8, 8, 4)


def test_input_standardise_is_the_plain_vit_on_standardised_input_and_travels_in_the_spec():
    images = torch.rand(2, 1, 16, 16, 16)
    standardised = small_vit("window", input_standardise=[0.5, 0.125])
    plain = small_vit("window")  # same seed: same weights
    assert torch.equal(standardised(images), plain((images - 0.5) / 0.125))
    assert not torch.equal(standardised(images), plain(images))
    rebuilt = build_backbone("vit", "tiny", input_size=16, patch_size=4, input_standardise=(0.5, 0.125))
    assert rebuilt.input_standardise == (0.5, 0.125)
    with pytest.raises(ConfigError, match="input_standardise"):
        small_vit("window", input_standardise=[0.5, 0.0])


def test_sizes_and_settings_it_cannot_take_raise_config_errors():
    vit = small_vit("window")
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        vit(torch.randn(1, 1, 18, 16, 16))
    with pytest.raises(ConfigError, match="not divisible by the attention window"):
        vit(torch.randn(1, 1, 12, 16, 16))  # grid 3 x 4 x 4, window 2
    with pytest.raises(ConfigError, match="not divisible by the attention window"):
        small_vit("window", window_size=3)
    with pytest.raises(ConfigError, match="max_scans is 4"):
        vit.embed(torch.randn(1, 5, 1, 16, 16, 16))
    with pytest.raises(ConfigError, match=r"\[B, 1, X, Y, Z\]"):
        vit(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ConfigError, match="patch_size"):
        small_vit("window", patch_size=(4, 4))
    with pytest.raises(ConfigError, match="position_embedding"):
        small_vit("window", position_embedding="rope")
    with pytest.raises(ConfigError, match="not divisible by 5 heads"):
        ViTEncoder(input_size=16, patch_size=4, hidden_size=WIDTH, depth=1, num_heads=5)
    with pytest.raises(ConfigError, match="mixes window and slice"):
        small_vit(["window", "slice"])


def test_encode_sequence_is_for_all_global_layouts_only():
    windowed = small_vit("window")
    assert not windowed.can_drop_tokens and not small_vit("scan").can_drop_tokens
    with pytest.raises(ConfigError, match="cannot be encoded alone"):
        windowed.encode_sequence(torch.randn(1, 10, WIDTH))
    plain = small_vit(["global", "study", "global"])
    assert plain.can_drop_tokens
    tokens, extra = random_tokens(2, 1), torch.randn(2, 1, WIDTH)
    with torch.no_grad():
        expected, expected_extra = plain.encode(tokens, extra)
        encoded, encoded_extra = plain.encode_sequence(tokens.flatten(1, 4), extra)
        visible, _ = plain.encode_sequence(tokens.flatten(1, 4)[:, ::3])  # a subset, as MAE encodes
    torch.testing.assert_close(encoded, expected.flatten(1, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(encoded_extra, expected_extra, rtol=0, atol=1e-5)
    assert visible.shape == (2, 22, WIDTH)


def test_scan_index_embedding_is_permuted_in_training_only():
    vit = small_vit("scan")
    images = torch.randn(1, 3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(10))
    table = sincos_1d(torch.arange(vit.max_scans), WIDTH)

    def scan_positions() -> list[int]:
        """Which scan-index position each scan got: a study's tokens minus those of each scan embedded alone."""
        with torch.no_grad():
            study = vit.embed(images)[0]
            added = [(study[n] - vit.embed(images[:, n])[0, 0]).mean(dim=(0, 1, 2)) for n in range(3)]
        positions = [int((table - value).abs().amax(-1).argmin()) for value in added]
        for value, position in zip(added, positions):
            torch.testing.assert_close(value, table[position], rtol=0, atol=1e-5)
        return positions

    assert scan_positions() == [0, 1, 2]  # evaluation: scans in their order
    vit.train()
    torch.manual_seed(1)
    drawn = [scan_positions() for _ in range(5)]
    assert all(len(set(positions)) == 3 for positions in drawn)
    assert any(positions != [0, 1, 2] for positions in drawn) and len({tuple(p) for p in drawn}) > 1


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = small_vit("window", depth=3).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.use_checkpoint = True
    images = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    extra = torch.randn(2, 1, WIDTH, generator=torch.Generator().manual_seed(9))
    for model in (plain, checkpointed):
        tokens, extra_out = model.forward_tokens(images, extra)
        (tokens.square().mean() + extra_out.square().mean()).backward()
    for (name, parameter), other in zip(plain.named_parameters(), checkpointed.parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(other.grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_stochastic_depth_drops_a_whole_sample_across_its_attention_groups():
    from voco.networks.vit import Block

    torch.manual_seed(0)
    block = Block(WIDTH, 2, drop_path=0.5).train()
    samples, groups = 16, 8
    factors = block._residual(torch.ones(samples * groups, 3, WIDTH), groups_per_sample=groups)
    per_sample = factors[:, 0, 0].view(samples, groups)
    assert torch.all(per_sample == per_sample[:, :1])  # every window of a sample is kept or dropped together
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # kept branches are scaled by 1 / (1 - p)
