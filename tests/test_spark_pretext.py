"""SparK on the tiny ResEnc: masked voxels stay out of the encoder (nothing leaks from them into visible features, and
the visible features are those of the CNN run on the visible voxels alone), only masked voxels enter the loss,
shapes, the routing from the MAE bundle's settings, and the mae_pretrain bundle's ResEnc smoke run with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_png_artifacts, only_finished_run, run_bundle_command, tracking_store
from torch import nn

from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.pretext.mae import (MaskedImagePretext, mask_volume, normalize_patches, patchify, random_mask,
                              save_views_picture)
from voco.pretext.spark import SparKPretext, masked_image_pretext, VisibleVoxels, masked_instance_norm


def tiny_spark(seed: int = 0, **kwargs) -> SparKPretext:
    torch.manual_seed(seed)
    backbone = build_backbone("resenc", "tiny", **kwargs)  # 4 stages, 8-64 channels, total stride 8
    return SparKPretext(backbone, decoder_dim=32, generator=seed)


def masked_voxels(pretext: SparKPretext, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return mask_volume(mask, pretext.patch_grid(images.shape[2:]), pretext.patch_size)


def test_masked_voxels_do_not_leak_into_visible_features():
    """Whatever the masked voxels hold, every stage's output is the same, bit for bit (stage 1 and the deepest
    included); one visible voxel changed changes them; masked positions are 0 at every stage."""
    pretext = tiny_spark()
    images = torch.rand(2, 1, 32, 32, 32)
    mask = pretext.make_mask(2, pretext.patch_grid(images.shape[2:]))
    hidden = masked_voxels(pretext, mask, images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * 100
    visible_voxel = tuple(index[0] for index in torch.nonzero(~hidden, as_tuple=True))
    nudged = images.clone()
    nudged[visible_voxel] += 1.0
    with torch.no_grad():
        features, visible = pretext.sparse_features(images, mask)
        with_noise, _ = pretext.sparse_features(torch.where(hidden, noise, images), mask)
        with_nudge, _ = pretext.sparse_features(nudged, mask)
        dense = pretext.backbone.forward_features(torch.where(hidden, 0.0, images))
    for stage, (clean, noisy) in enumerate(zip(features, with_noise)):
        assert torch.equal(clean, noisy), f"stage {stage + 1} leaks"
        assert clean.masked_select(~visible.at(clean.shape[2:])).eq(0).all()
    assert not torch.equal(with_nudge[0], features[0]) and not torch.equal(with_nudge[-1], features[-1])
    # the dense encoder on the same zero-filled input sees the mask: its visible features differ
    assert not torch.allclose(dense[0] * visible.at(dense[0].shape[2:]), features[0], atol=1e-3)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_visible_features_are_those_of_the_cnn_on_the_visible_voxels_alone(use_checkpoint):
    """The upper half along x masked: every stage's map over the lower half is the dense ResEnc's map of the lower
    half cut out (the masked InstanceNorms count only the visible voxels, the convolutions read zeros where the
    crop has padding) — also through gradient checkpointing, whose recomputation must run sparsely too."""
    pretext = tiny_spark(seed=1)
    pretext.backbone.use_checkpoint = use_checkpoint
    images = torch.rand(2, 1, 16, 16, 16, requires_grad=True)  # a 2^3 patch grid of 8^3 voxels
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[:, 1] = True
    features, _ = pretext.sparse_features(images, mask.flatten(1))
    cropped = pretext.backbone.forward_features(images[:, :, :8])
    for sparse, dense in zip(features, cropped):
        torch.testing.assert_close(sparse[:, :, :dense.shape[2]], dense, rtol=1e-4, atol=1e-5)
        assert sparse[:, :, dense.shape[2]:].eq(0).all()
    sparse_gradient, = torch.autograd.grad(features[-1].square().sum(), images)
    dense_gradient, = torch.autograd.grad(cropped[-1].square().sum(), images)
    # float noise only (the deepest InstanceNorm has 4 voxels per channel here)
    assert (sparse_gradient - dense_gradient).abs().max() < 1e-3 * dense_gradient.abs().max()


def test_masked_instance_norm_has_the_statistics_of_the_visible_voxels():
    norm = nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 8, 8, 8, generator=generator) * 3 + 1
    visible = VisibleVoxels(random_mask(2, (2, 2, 2), 0.5, generator), (2, 2, 2)).at((8, 8, 8))
    normalised = masked_instance_norm(features, visible, norm)
    for region in range(2):
        kept = visible[region, 0]
        expected = F.instance_norm(features[region][:, kept][None], weight=norm.weight, bias=norm.bias, eps=norm.eps)
        torch.testing.assert_close(normalised[region][:, kept], expected[0])
        assert normalised[region][:, ~kept].eq(0).all()


def test_only_masked_voxels_enter_the_loss_against_per_patch_normalised_input():
    pretext = tiny_spark(seed=2)
    images = torch.rand(2, 1, 16, 16, 16)
    reconstructions = []

    def keep(module, inputs, output):
        output.retain_grad()
        reconstructions.append(output)

    handle = pretext.decoder.head.register_forward_hook(keep)
    pretext.generator.manual_seed(5)
    output = pretext(images)
    handle.remove()
    output["loss"].backward()
    pretext.generator.manual_seed(5)
    mask = pretext.make_mask(2, pretext.patch_grid(images.shape[2:]))  # the mask of that step
    hidden = masked_voxels(pretext, mask, images)
    gradient = reconstructions[0].grad
    assert gradient.masked_select(~hidden).eq(0).all() and gradient.masked_select(hidden).ne(0).all()
    targets, _, _ = normalize_patches(patchify(images, pretext.patch_size))
    errors = (patchify(reconstructions[0].detach(), pretext.patch_size) - targets).pow(2).mean(dim=-1)
    torch.testing.assert_close(output["loss"].detach(), errors[mask].mean())
    assert float(output["metric/mask_ratio"]) == 5 / 8  # round(0.6 * 8) of 8 patches


def test_shapes_on_the_tiny_resenc_and_an_anisotropic_one(tmp_path):
    pretext = tiny_spark()
    images = torch.rand(2, 1, 16, 32, 16)
    grid = pretext.patch_grid(images.shape[2:])
    mask = pretext.make_mask(2, grid)
    with torch.no_grad():
        features, _ = pretext.sparse_features(images, mask)
        assert [f.shape for f in features] == [f.shape for f in pretext.backbone.forward_features(images)]
        assert grid == (2, 4, 2) and pretext.predict(images, mask).shape == (2, 16, 8 ** 3)
    views = pretext.views(images)
    assert views["variant"] == "spark" and views["reconstruction_slice"].shape == (16, 32)
    assert save_views_picture(views, tmp_path / "views.png").read_bytes()[:4] == b"\x89PNG"

    anisotropic = tiny_spark(n_stages=3, strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]])
    assert anisotropic.patch_size == (4, 4, 2)
    output = anisotropic(torch.rand(2, 1, 8, 8, 4))
    assert output["loss"].isfinite() and anisotropic.predict(torch.rand(1, 1, 8, 8, 4),
                                                             torch.tensor([[True] * 5 + [False] * 3])).shape == (1, 8, 32)


def test_the_mae_settings_route_a_cnn_to_spark_and_bad_settings_stop_in_one_sentence():
    resenc = build_backbone("resenc", "tiny")
    settings = dict(mask_ratio=0.6, normalize_targets=True, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                    unmasked_weight=0.0)
    for variant in ("mae", "auto", "spark"):
        assert isinstance(masked_image_pretext(resenc, variant, **settings), SparKPretext)
    assert masked_image_pretext(resenc, "simmim", **settings).variant == "simmim"  # the dense baseline, if asked
    vit = build_backbone("vit", "tiny", input_size=32, patch_size=8)
    assert type(masked_image_pretext(vit, "mae", **settings)) is MaskedImagePretext
    with pytest.raises(ConfigError, match="not a CNN"):
        masked_image_pretext(vit, "spark")
    with pytest.raises(ConfigError, match="is SparK"):
        MaskedImagePretext(resenc)
    with pytest.raises(ConfigError, match="nnU-Net's residual encoder"):
        SparKPretext(vit)
    with pytest.raises(ConfigError, match="at least 8"):
        SparKPretext(resenc, decoder_dim=4)
    with pytest.raises(ConfigError, match="not divisible by the ResEnc's total stride"):
        SparKPretext(resenc, decoder_dim=32)(torch.rand(1, 1, 16, 16, 12))


def test_the_mae_bundle_runs_spark_on_the_resenc_and_resumes(tmp_path):
    """`monai.bundle run` with train.json, smoke.json and resenc_smoke.json: 4 steps tracked in MLflow with the
    views picture and the frozen-encoder probe, then the same command to 6 steps goes on from the checkpoint of
    step 4."""
    from voco.checkpoints import read_checkpoint

    configs = ["train.json", "smoke.json", "resenc_smoke.json"]
    tracking_uri = tracking_store(tmp_path)
    first = run_bundle_command("mae_pretrain", configs, tmp_path, "--run_name", "smoke")
    resumed = run_bundle_command("mae_pretrain", configs, tmp_path, "--run_name", "smoke", "--max_steps", "6",
                                 "--probe", "False")  # probed in the first run; the probe is most of a run's time
    assert "step 4/4" in first.stdout
    assert "step 6/6" in resumed.stdout and "step 2/6" not in resumed.stdout
    client, run = only_finished_run(tracking_uri, "mae_pretrain")
    for name in ["loss", "loss/reconstruction", "metric/reconstruction_psnr", "metric/mask_ratio",
                 "val/loss/reconstruction", "probe/dice"]:
        assert name in run.data.metrics, name
    assert run.data.metrics["metric/mask_ratio"] == pytest.approx(38 / 64)  # 32^3 regions, 8^3 patches
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert_png_artifacts(client, run, tmp_path, ["views/views.png"])
    state = read_checkpoint(tmp_path / "runs" / "smoke" / "checkpoints" / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6
    assert state["backbone_spec"]["name"] == "resenc" and state["backbone_spec"]["pretext"] == "spark"
    assert "backbone.encoder.stages.0.blocks.0.conv1.conv.weight" in state["pretext"]
    assert "decoder.densify.0.mask_token" in state["pretext"]


def test_the_resenc_l_config_builds_spark_on_nnunets_resenc_l():
    """bundles/mae_pretrain/configs/resenc.json as the README's command composes it: SparK on a ResEnc-L whose encoder
    is nnU-Net's (6 stages, 32-320 features), decoder 512 wide; a 64 x 64 x 32 region (4 patches) gives a finite loss."""
    from monai.bundle import ConfigParser

    from voco.networks.resenc import resenc_architecture

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "mae_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(bundle / "train.json"), str(bundle / "resenc.json")])
    parser["manifest"] = "unused.json"  # only the pretext is built here
    torch.manual_seed(0)
    pretext = parser.get_parsed_content("pretext")
    assert type(pretext).__name__ == "SparKPretext" and parser["region_size"] == [160, 160, 160]
    assert pretext.backbone.architecture == resenc_architecture("L")
    output = pretext(torch.rand(1, 1, 64, 64, 32))  # 2 x 2 x 1 patches of the total stride, 32
    assert torch.isfinite(output["loss"])
