"""The online frozen-encoder probe: its features, its closed-form classifier, its Dice, and its handler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voco.errors import ConfigError
from voco.probe import LinearProbe, ProbeSet, _features_at, load_probe_set, probe_dice


def test_sampled_features_equal_the_upsampled_maps_the_prediction_uses():
    """Fit samples features with grid_sample, prediction upsamples class scores: both must see the same features."""
    torch.manual_seed(0)
    size = (8, 12, 6)
    maps = [torch.randn(3, 8, 12, 6), torch.randn(5, 4, 6, 3), torch.randn(2, 1, 2, 1)]
    indices = torch.randperm(8 * 12 * 6)[:50]
    sampled = _features_at(maps, indices, size)
    upsampled = torch.cat([F.interpolate(m[None], size=size, mode="trilinear", align_corners=False)[0]
                           for m in maps]).flatten(1)[:, indices].T
    assert sampled.shape == (50, 10)
    torch.testing.assert_close(sampled, upsampled, atol=1e-5, rtol=1e-5)


def _blobs(seed: int) -> torch.Tensor:
    """A label volume [1, 16, 16, 8] with three classes in boxes at random places."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    for value in (1, 2):
        x, y = torch.randint(0, 10, (2,), generator=generator).tolist()
        label[0, x:x + 6, y:y + 6, 2:6] = value
    return label


def test_linear_probe_recovers_separable_classes_exactly():
    """Features that encode the class (a one-hot map plus a coarse nuisance map) give a perfect segmentation, and
    the predicted class scores are the closed-form ridge solution's."""
    labels = [_blobs(seed) for seed in range(4)]
    maps = [[F.one_hot(label[0], 3).permute(3, 0, 1, 2).float() + 0.01 * torch.randn(3, 16, 16, 8),
             torch.randn(4, 4, 4, 2)] for label in labels]
    probe = LinearProbe(num_classes=3, ridge=1e-4, voxels_per_class=64).fit(maps[:2], labels[:2])
    for volume_maps, label in zip(maps[2:], labels[2:]):
        assert torch.equal(probe.predict(volume_maps, label.shape[1:]), label[0])


def test_probe_dice_scores_a_probe_set_and_leaves_random_state_and_mode_alone():
    labels = [_blobs(seed) for seed in range(4)]
    images = [label.float() / 2 + 0.05 * torch.randn(label.shape) for label in labels]
    probe_set = ProbeSet(images[:2], labels[:2], images[2:], labels[2:], ("left", "right"))

    class Quadratic(torch.nn.Module):  # features: the intensity and its square, and a coarse map of it
        def forward_features(self, x):
            return [torch.cat([x, x * x], dim=1), F.avg_pool3d(x, 2)]

    backbone = Quadratic().train()
    state = torch.get_rng_state()
    metrics = probe_dice(backbone, probe_set, voxels_per_class=64)
    assert torch.equal(torch.get_rng_state(), state) and backbone.training
    assert set(metrics) == {"probe/dice", "probe/dice/left", "probe/dice/right"}
    # intensity and its square separate 0, 0.5 and 1 up to the noise: every class is found almost perfectly
    assert metrics["probe/dice/left"] > 0.9 and metrics["probe/dice/right"] > 0.9
    assert metrics["probe/dice"] == pytest.approx((metrics["probe/dice/left"] + metrics["probe/dice/right"]) / 2)


def test_load_probe_set_reads_labelled_phantoms_and_refuses_unlabelled_sets(tmp_path):
    from voco.data.phantoms import synthesize

    manifest = synthesize(tmp_path / "labelled", n=2, seed=5, shape_range=[[24, 24], [24, 24], [12, 12]])
    probe_set = load_probe_set(manifest, (32, 32, 16))
    assert len(probe_set.fit_images) == 1 and len(probe_set.test_images) == 1
    assert probe_set.fit_images[0].shape == (1, 32, 32, 16) and probe_set.test_labels[0].dtype == torch.long
    assert probe_set.class_names[0] == "liver" and probe_set.num_classes == len(probe_set.class_names) + 1
    unlabelled = synthesize(tmp_path / "unlabelled", n=2, seed=5, shape_range=[[24, 24], [24, 24], [12, 12]],
                            with_labels=False)
    with pytest.raises(ConfigError, match="label map"):
        load_probe_set(unlabelled, (32, 32, 16))


def test_probe_of_a_tiny_swin_encoder_on_phantoms(tmp_path):
    """The real thing at tiny size: a random Swin encoder's multi-scale features, probed on phantoms."""
    from voco.data.phantoms import synthesize
    from voco.networks import build_backbone

    torch.manual_seed(0)
    manifest = synthesize(tmp_path / "probe", n=4, seed=7, shape_range=[[28, 32], [28, 32], [16, 20]],
                          in_plane_spacing_range=[1.5, 1.5], slice_spacing_range=[1.5, 1.5])
    probe_set = load_probe_set(manifest, (64, 64, 32))  # the deepest Swin map (stride 32) needs > 1 voxel
    backbone = build_backbone(name="swin", size="tiny", in_channels=1, window_size=2)
    metrics = probe_dice(backbone, probe_set, voxels_per_class=128)
    assert 0.0 < metrics["probe/dice"] < 1.0
    assert metrics["probe/dice/liver"] > 0.3  # the liver is large and bright: even random features find it
