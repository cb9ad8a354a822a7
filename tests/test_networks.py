"""Backbone (SwinUNETR-v2 encoder from MONAI), VoCo projector and EMA teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from voco.errors import ConfigError
from voco.networks import (BACKBONE_SIZES, EMATeacher, SwinEncoder, VoCoProjector, build_backbone, cosine_momentum)


@pytest.fixture(scope="module")
def tiny_encoder() -> SwinEncoder:
    torch.manual_seed(0)
    return build_backbone("swin", "tiny", window_size=2)  # window 2: CPU-fast; 7 is the reference's


def test_tiny_encoder_embedding_and_feature_maps(tiny_encoder):
    x = torch.randn(2, 1, 32, 32, 64)
    features = tiny_encoder.forward_features(x)
    c = tiny_encoder.feature_size
    assert c == 12 and tiny_encoder.embedding_dim == 24 * c and tiny_encoder.spatial_divisor == 32
    assert [f.shape[1] for f in features] == [c, c, 2 * c, 4 * c, 16 * c] == list(tiny_encoder.feature_channels)
    for feature, stride in zip(features, tiny_encoder.feature_strides):
        assert tuple(feature.shape[2:]) == (32 // stride, 32 // stride, 64 // stride)
    embedding = tiny_encoder(x)
    assert embedding.shape == (2, 24 * c)
    # the embedding is the concatenation of the global average pools, in encoder order
    torch.testing.assert_close(embedding, torch.cat([f.mean(dim=(2, 3, 4)) for f in features], dim=1))


def test_gradient_checkpointing_switch_keeps_the_result(tiny_encoder):
    x = torch.randn(2, 1, 32, 32, 64)
    tiny_encoder.use_checkpoint = False
    plain = tiny_encoder(x)
    tiny_encoder.use_checkpoint = True
    assert tiny_encoder.use_checkpoint
    checkpointed = tiny_encoder(x)
    checkpointed.sum().backward()
    tiny_encoder.use_checkpoint = False
    assert not tiny_encoder.use_checkpoint
    torch.testing.assert_close(plain, checkpointed)
    assert tiny_encoder.swinViT.patch_embed.proj.weight.grad is not None


def test_encoder_rejects_inputs_it_cannot_take(tiny_encoder):
    with pytest.raises(ConfigError, match="divisible by 32"):
        tiny_encoder(torch.zeros(2, 1, 48, 32, 32))
    with pytest.raises(ConfigError, match=r"\[N, 1, X, Y, Z\]"):
        tiny_encoder(torch.zeros(2, 2, 32, 32, 32))


def test_b_encoder_has_the_145_keys_of_the_released_checkpoints_and_loads_into_swinunetr():
    from monai.networks.nets import SwinUNETR

    encoder = build_backbone("swin", "B")
    state = encoder.state_dict()
    assert len(state) == 145
    assert {key.split(".")[0] for key in state} == {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4",
                                                   "encoder10"}
    assert sum(p.numel() for p in encoder.parameters()) / 1e6 == pytest.approx(53.2, abs=0.05)
    assert encoder.embedding_dim == 1152
    full = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=True)
    result = full.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert len(result.missing_keys) == 22
    assert all(key.split(".")[0] in {"decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"}
               for key in result.missing_keys)
    key = "swinViT.layers1c.0.layer.conv1.conv.weight"  # a use_v2 residual block: exists only with use_v2=True
    assert key in state and torch.equal(full.state_dict()[key], state[key])


def test_build_backbone_sizes_and_errors():
    assert BACKBONE_SIZES == {"tiny": 12, "B": 48, "L": 96, "H": 192}
    assert build_backbone("swin", "TINY").feature_size == 12
    assert build_backbone("swin", 24, in_channels=2).embedding_dim == 24 * 24
    with pytest.raises(ConfigError, match="unknown Swin backbone size 'XL'"):
        build_backbone("swin", "XL")
    with pytest.raises(ConfigError, match="divisible by 12"):
        build_backbone("swin", 20)
    with pytest.raises(ConfigError, match="unknown backbone 'resnet'"):
        build_backbone("resnet", "B")


def test_projector_layers_shapes_and_batch_statistics():
    projector = VoCoProjector(288, 64, 32)
    assert [type(layer) for layer in projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [p.shape for p in projector.parameters()] == [(64, 288), (64,), (64, 64), (64,), (32, 64), (32,)]
    assert list(projector.buffers()) == []  # no affine parameters, no running statistics
    x = torch.randn(6, 288)
    trained = projector(x)
    assert trained.shape == (6, 32)
    torch.testing.assert_close(projector.eval()(x), trained)  # always the statistics of the batch


def test_ema_update_arithmetic():
    torch.manual_seed(0)
    student, teacher_network = VoCoProjector(8, 6, 4), VoCoProjector(8, 6, 4)
    before = [p.detach().clone() for p in teacher_network.parameters()]
    teacher = EMATeacher(teacher_network, momentum=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.update(student) == 0.9
    for old, new, source in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source, rtol=0, atol=1e-7)
    assert int(teacher.updates) == 1 and "updates" in teacher.state_dict()
    teacher.update(student, momentum=0.0)  # m = 0 copies the student
    for new, source in zip(teacher.module.parameters(), student.parameters()):
        assert torch.equal(new, source)
    with pytest.raises(ValueError, match="same parameters"):
        teacher.update(VoCoProjector(8, 6, 5))


def test_ema_copy_of_and_buffers():
    student = nn.BatchNorm1d(3)
    teacher = EMATeacher.copy_of(student, momentum=0.5)
    student.running_mean.fill_(2.0)
    with torch.no_grad():
        student.weight.fill_(3.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.module.weight, torch.full((3,), 2.0))  # 0.5 * 1 + 0.5 * 3
    torch.testing.assert_close(teacher.module.running_mean, torch.full((3,), 2.0))  # buffers are copied


def test_momentum_schedules():
    assert cosine_momentum(0, 100, 0.9) == pytest.approx(0.9)
    assert cosine_momentum(50, 100, 0.9) == pytest.approx(0.95)
    assert cosine_momentum(100, 100, 0.9) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)
    teacher = EMATeacher(nn.Linear(2, 2), momentum=0.9, schedule="cosine", total_steps=4)
    used = [teacher.update(nn.Linear(2, 2)) for _ in range(6)]
    assert used == pytest.approx([0.9, 0.9 + 0.1 * (1 - math.cos(math.pi / 4)) / 2, 0.95,
                                  1 - 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 1.0, 1.0])
    fixed = EMATeacher(nn.Linear(2, 2))
    assert [fixed.update(nn.Linear(2, 2)) for _ in range(3)] == [0.9, 0.9, 0.9]
    with pytest.raises(ConfigError, match="total_steps"):
        EMATeacher(nn.Linear(2, 2), schedule="cosine")
    with pytest.raises(ConfigError, match="momentum schedule"):
        EMATeacher(nn.Linear(2, 2), schedule="linear")


def test_a_compiled_backbone_computes_the_same_and_keeps_its_parameter_names():
    """`compile_backbone` (each ViT block / the whole Swin) traced by dynamo (aot_eager: no code generation on CPU)."""
    import torch

    from voco.networks import build_backbone, compile_backbone

    torch.manual_seed(0)
    eager = build_backbone("vit", "tiny", input_size=[16, 16, 16], patch_size=8, layout="window", window_size=1)
    compiled = build_backbone("vit", "tiny", input_size=[16, 16, 16], patch_size=8, layout="window", window_size=1)
    compiled.load_state_dict(eager.state_dict())
    assert compile_backbone(compiled, backend="aot_eager") is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.rand(2, 1, 16, 16, 16)
    for model in (eager, compiled):
        model(images).square().sum().backward()
    torch.testing.assert_close(compiled(images), eager(images), rtol=0, atol=1e-5)
    for (name, parameter), (_, reference) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compile_backbone(eager, enabled=False) is eager and eager.blocks[0]._compiled_call_impl is None


def test_backbones_state_their_interfaces_and_a_pretext_names_what_is_missing(tiny_encoder):
    """Issue 15 item 5: the Swin offers a feature pyramid, the ViT a token sequence; a pretext that needs one names
    the members a backbone lacks in one sentence."""
    from voco.networks.interfaces import FeaturePyramid, TokenSequence, require

    vit = build_backbone("vit", "tiny", input_size=[32, 32, 32], patch_size=8)
    assert isinstance(tiny_encoder, FeaturePyramid) and not isinstance(tiny_encoder, TokenSequence)
    assert isinstance(vit, TokenSequence) and not isinstance(vit, FeaturePyramid)
    assert require(vit, (TokenSequence, FeaturePyramid), "MIM") is TokenSequence
    images = torch.rand(1, 1, 64, 64, 64)
    assert torch.equal(tiny_encoder.deepest_features(images), tiny_encoder.forward_features(images)[-1])

    class PooledOnly(nn.Module):
        in_channels, embedding_dim = 1, 8

    with pytest.raises(ConfigError) as refused:
        require(PooledOnly(), (FeaturePyramid,), "SimMIM")
    assert str(refused.value) == (
        "SimMIM needs a backbone offering FeaturePyramid (voco.networks.interfaces), and the PooledOnly does not "
        "(FeaturePyramid lacks deepest_features, feature_channels, feature_strides, forward_features); build it with "
        "voco.networks.build_backbone.")
