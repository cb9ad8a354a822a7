"""The ResEnc backbone: nnU-Net's residual encoder under nnU-Net's parameter names, its feature pyramid, sizes and
errors."""

from __future__ import annotations

import pytest
import torch

from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.networks.interfaces import FeaturePyramid
from voco.networks.resenc import RESENC_CLASS, RESENC_IMPORTS, resenc_architecture


def test_tiny_resenc_is_a_feature_pyramid_with_a_pooled_deepest_embedding():
    torch.manual_seed(0)
    encoder = build_backbone("resenc", "tiny")
    assert isinstance(encoder, FeaturePyramid)
    images = torch.randn(2, 1, 16, 16, 16)
    maps = encoder.forward_features(images)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16, 16), (2, 16, 8, 8, 8), (2, 32, 4, 4, 4), (2, 64, 2, 2, 2)]
    assert encoder.feature_channels == (8, 16, 32, 64) and encoder.feature_strides == (1, 2, 4, 8)
    assert torch.allclose(encoder(images), maps[-1].mean(dim=(2, 3, 4)))
    assert encoder.embedding_dim == 64 and torch.equal(encoder.deepest_features(images), maps[-1])


def test_resenc_l_is_nnunets_encoder_key_for_key():
    """Every tensor of our ResEnc-L is a tensor of the ResidualEncoderUNet nnU-Net builds from the same plan, with
    the same shape; the ones we lack are the decoder's own."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = resenc_architecture("L")
    assert architecture["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert architecture["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    ours = build_backbone("resenc", "L").state_dict()
    network = get_network_from_plans(RESENC_CLASS, architecture, list(RESENC_IMPORTS), input_channels=1,
                                     output_channels=3, allow_init=True, deep_supervision=True)
    theirs = network.state_dict()
    assert all(theirs[key].shape == tensor.shape for key, tensor in ours.items())
    assert {key for key in theirs if key.startswith("encoder.")} == set(ours)
    assert sum(t.numel() for t in ours.values()) == sum(t.numel() for k, t in theirs.items() if k.startswith("encoder."))


def test_anisotropic_strides_and_fewer_stages():
    encoder = build_backbone("resenc", "tiny", n_stages=3, strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]])
    assert encoder.feature_strides == (1, (2, 2, 1), (4, 4, 2)) and encoder.spatial_divisor == (4, 4, 2)
    assert encoder(torch.zeros(1, 1, 8, 8, 6)).shape == (1, 32)


def test_resenc_errors_name_the_setting():
    with pytest.raises(ConfigError, match="unknown ResEnc size 'XL'"):
        build_backbone("resenc", "XL")
    with pytest.raises(ConfigError, match="strides has 2 entries"):
        build_backbone("resenc", "tiny", strides=[1, 2])
    encoder = build_backbone("resenc", "tiny")
    with pytest.raises(ConfigError, match="not divisible by the ResEnc's total stride"):
        encoder(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(ConfigError, match=r"\[B, 1, X, Y, Z\]"):
        encoder(torch.zeros(1, 2, 16, 16, 16))


def final_encoder(run_folder):
    from voco.checkpoints import encoder_state_dict, read_checkpoint

    checkpoint = read_checkpoint(run_folder / "checkpoints" / "checkpoint_final.pt")
    return checkpoint["backbone_spec"], encoder_state_dict(checkpoint)[0]


def test_voco_pretrains_a_resenc_by_switching_the_backbone_spec(tmp_path):
    """VoCo's bundle as a user runs it, with the backbone spec switched (configs/resenc_smoke.json): the pooled
    deepest ResEnc map is the crop embedding; the checkpoint holds the spec and the encoder under nnU-Net's names."""
    from conftest import run_bundle_command

    result = run_bundle_command("voco_pretrain", ["train.json", "smoke.json", "resenc_smoke.json"], tmp_path,
                                "--output_dir", str(tmp_path / "run"))
    assert "step 4/4" in result.stdout and "loss/intra" in result.stdout
    spec, encoder = final_encoder(tmp_path / "run")
    assert spec["name"] == "resenc" and spec["size"] == "tiny"
    assert set(encoder) == set(build_backbone("resenc", "tiny").state_dict())


def test_spark_contrastive_and_query_boxes_pretrain_a_resenc_in_turn(tmp_path):
    """The multitask bundle's ResEnc smoke: SparK, two-view contrastive and query boxes, one task per step."""
    from conftest import run_bundle_command

    result = run_bundle_command("multitask_pretrain", ["train.json", "smoke.json", "resenc_smoke.json"], tmp_path,
                                "--output_dir", str(tmp_path / "run"))
    assert all(f"loss/{task}" in result.stdout for task in ("mae", "contrastive", "query_box"))
    spec, encoder = final_encoder(tmp_path / "run")
    assert spec["name"] == "resenc" and set(encoder) == set(build_backbone("resenc", "tiny").state_dict())
