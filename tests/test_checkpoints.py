"""Checkpoint reading, encoder import from every supported format, the load report, export."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from voco.checkpoints import (
    LoadReport,
    decoder_state_dict,
    encoder_state_dict,
    export_encoder,
    find_latest_checkpoint,
    load_encoder_weights,
    read_checkpoint,
)
from voco.errors import CheckpointError, ConfigError

# The official SSL-head layout: the encoder part of MONAI's SwinUNETR(use_v2=True).
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
ENCODER_NAMES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
ENCODER_TENSORS = 145  # for every feature size
DECODER_TENSORS = 22


class CustomObject:
    """Something only arbitrary unpickling can restore."""

    def __init__(self) -> None:
        self.weights = torch.zeros(2)


class EncoderOnly(nn.Module):
    """Stands in for voco.networks.swin.SwinEncoder: the same submodule names, so the same keys."""

    def __init__(self, swin_unetr: SwinUNETR) -> None:
        super().__init__()
        for name in ENCODER_NAMES:
            setattr(self, name, getattr(swin_unetr, name))


def swin_unetr(feature_size: int = 12, seed: int = 0, use_v2: bool = True) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, use_v2=use_v2)


def encoder_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state_dict.items() if key.startswith(ENCODER_PREFIXES)}


@pytest.fixture(scope="module")
def ssl_head() -> dict[str, torch.Tensor]:
    """A synthetic VoCo_*_SSL_head.pt at feature size 12, with weights unlike a fresh seed-0 model."""
    return encoder_part(swin_unetr(seed=1).state_dict())


def assert_loaded_exactly(model: nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[prefix + name], tensor), name


def save(tmp_path: Path, content: Any, name: str = "checkpoint.pt") -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


# --------------------------------------------------------------------------------- source formats


def official(head: dict) -> dict:
    return dict(head)


def ddp_prefixed(head: dict) -> dict:
    return {"module." + key: value for key, value in head.items()}


def reference_training(head: dict) -> dict:
    weights = {"module.backbone." + key: value for key, value in head.items()}
    weights["module.student.0.weight"] = torch.randn(8, 4)  # the V2 projectors: not part of the encoder
    weights["module.teacher.0.weight"] = torch.randn(8, 4)
    return {"global_step": 700, "state_dict": weights}


def reference_v1_student_teacher(head: dict) -> dict:
    """V1 keeps two whole networks; the student is the one to take."""
    weights = {"student." + key: value for key, value in head.items()}
    weights |= {"teacher." + key: value + 1 for key, value in head.items()}
    return {"state_dict": weights}


def vocomni_whole_model(head: dict) -> dict:
    whole = swin_unetr(seed=1).state_dict()  # same seed: its encoder equals `head`
    return {"network_weights": whole}


def voco_training(head: dict) -> dict:
    pretext = {"backbone." + key: value for key, value in head.items()}
    pretext |= {"student_projector.0.weight": torch.randn(8, 4), "teacher_projector.0.weight": torch.randn(8, 4)}
    return {
        "pretext": pretext,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "trainer": {"iteration": 200, "epoch_length": 100},
        "backbone_spec": {"name": "swin", "size": "B", "feature_size": 12, "in_channels": 1},
    }


def swin_vit_spelling(head: dict) -> dict:
    return {"net": {"module." + key.replace("swinViT.", "swin_vit."): value for key, value in head.items()}}


@pytest.mark.parametrize(
    ("make_checkpoint", "expected_format"),
    [
        (official, "state dict: SwinUNETR encoder"),
        (ddp_prefixed, "DDP 'module.' prefix stripped"),
        (reference_training, "reference training checkpoint ['state_dict']: SwinUNETR encoder under 'backbone.'"),
        (reference_v1_student_teacher, "SwinUNETR encoder under 'student.'"),
        (vocomni_whole_model, "container ['network_weights']: whole SwinUNETR (encoder and 22 decoder tensors)"),
        (voco_training, "voco training checkpoint: SwinUNETR encoder under 'backbone.'"),
        (swin_vit_spelling, "'swin_vit' renamed to 'swinViT'"),
    ],
)
def test_every_format_loads_the_whole_encoder(
    tmp_path: Path, ssl_head: dict, make_checkpoint: Callable[[dict], dict], expected_format: str
) -> None:
    path = save(tmp_path, make_checkpoint(ssl_head))
    model = swin_unetr(seed=0)

    report = load_encoder_weights(model, path)

    assert expected_format in report.source_format
    assert sorted(report.loaded) == sorted(ssl_head)
    assert report.loaded_fraction == 1.0
    assert report.skipped_unexpected == [] and report.skipped_shape == [] and report.missing_encoder == []
    assert len(report.outside_encoder) == DECODER_TENSORS
    assert all(name.startswith(("decoder", "out.")) for name in report.outside_encoder)
    assert_loaded_exactly(model, ssl_head)


def test_dropped_tensors_are_counted_in_the_format(ssl_head: dict) -> None:
    weights, source_format = encoder_state_dict(reference_training(ssl_head))
    assert set(weights) == set(ssl_head)
    assert source_format.endswith("2 other tensors dropped")
    # A whole SwinUNETR's decoder is not dropped: it is counted apart, and decoder_state_dict finds it.
    _, whole_format = encoder_state_dict(vocomni_whole_model(ssl_head))
    assert whole_format.endswith(f"whole SwinUNETR (encoder and {DECODER_TENSORS} decoder tensors)")
    whole = swin_unetr(seed=1).state_dict()
    decoder = decoder_state_dict(ddp_prefixed(vocomni_whole_model(ssl_head)["network_weights"]))
    assert set(decoder) == set(whole) - set(ssl_head) and len(decoder) == DECODER_TENSORS
    assert all(torch.equal(decoder[name], whole[name]) for name in decoder)
    assert decoder_state_dict(reference_training(ssl_head)) == {}


def test_monai_model_swinvit_maps_to_swinvit_and_drops_the_ssl_heads(tmp_path: Path) -> None:
    """MONAI's model_swinvit.pt: v1 Swin transformer without the swinViT owner, mlp.fc1/fc2, SSL heads."""
    swin_v1 = swin_unetr(seed=1, use_v2=False).swinViT.state_dict()
    research_names = {
        "module." + key.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): value
        for key, value in swin_v1.items()
    }
    heads = {
        "module.rotation_head.weight": torch.randn(4, 192),
        "module.contrastive_head.weight": torch.randn(512, 192),
        "module.conv.0.weight": torch.randn(96, 192, 3, 3, 3),
        "module.norm.weight": torch.randn(192),
    }
    path = save(tmp_path, {"epoch": 3, "state_dict": research_names | heads}, "model_swinvit.pt")

    weights, source_format = encoder_state_dict(read_checkpoint(path))
    assert "MONAI model_swinvit" in source_format and "4 other tensors dropped" in source_format
    assert set(weights) == {"swinViT." + key for key in swin_v1}

    model = swin_unetr(seed=0)
    report = load_encoder_weights(model, path)
    assert len(report.loaded) == len(swin_v1) == 126
    # v2 residual blocks (layers1c..layers4c: 8 tensors) and encoder1..10 (11 tensors) are not in it.
    assert len(report.missing_encoder) == ENCODER_TENSORS - 126
    assert "swinViT.layers1c.0.layer.conv1.conv.weight" in report.missing_encoder
    assert "encoder10.layer.conv2.conv.weight" in report.missing_encoder
    assert "use_v2=False" in report.table()
    assert_loaded_exactly(model, {"swinViT." + key: value for key, value in swin_v1.items()})


# ------------------------------------------------------------------------------- the load report


def test_wrong_key_wrong_shape_and_missing_key_are_named(ssl_head: dict) -> None:
    checkpoint = dict(ssl_head)
    checkpoint["swinViT.patch_embed.proj.weight"] = torch.randn(12, 2, 2, 2, 2)  # two-channel MRI
    checkpoint["swinViT.layers1.0.blocks.0.attn.extra_scale"] = torch.ones(3)
    del checkpoint["encoder10.layer.conv1.conv.weight"]
    model = swin_unetr(seed=0)
    patch_embedding_before = model.swinViT.patch_embed.proj.weight.detach().clone()

    report = load_encoder_weights(model, checkpoint)

    assert report.skipped_shape == [("swinViT.patch_embed.proj.weight", (12, 2, 2, 2, 2), (12, 1, 2, 2, 2))]
    assert report.skipped_unexpected == ["swinViT.layers1.0.blocks.0.attn.extra_scale"]
    assert report.missing_encoder == ["encoder10.layer.conv1.conv.weight"]
    assert len(report.loaded) == ENCODER_TENSORS - 2
    assert report.loaded_fraction == pytest.approx(143 / 145)
    table = report.table()
    for name in ("swinViT.patch_embed.proj.weight", "attn.extra_scale", "encoder10.layer.conv1.conv.weight"):
        assert name in table
    assert "(12, 2, 2, 2, 2) -> (12, 1, 2, 2, 2)" in table
    assert "2 input channels and the model 1" in table
    assert "decoder1.conv_block.conv1.conv.weight" in table  # outside the encoder, listed as expected
    assert "skipped 1 not in the model and 1 with another shape; 1 encoder tensors missing" in report.summary()
    assert "\n" not in report.summary()
    assert torch.equal(model.swinViT.patch_embed.proj.weight, patch_embedding_before)


def test_a_checkpoint_that_loads_almost_nothing_is_refused_and_changes_nothing() -> None:
    other_size = encoder_part(swin_unetr(feature_size=24, seed=1).state_dict())
    model = swin_unetr(seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    with pytest.raises(CheckpointError, match=r"Refused to load <dict> .*loaded 16/145 encoder tensors"):
        load_encoder_weights(model, other_size)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

    # Only the window-dependent relative position tables fit; the report says which ones.
    report = load_encoder_weights(model, other_size, min_loaded_fraction=0.0)
    assert all("relative_position" in name for name in report.loaded)
    assert "feature size 24 and the model 12" in report.table()


def test_an_encoder_holding_nan_is_refused_and_changes_nothing(ssl_head: dict) -> None:
    """A diverged run's weights: "loaded 145/145" would hide them, and training on them gives NaN losses (issue 16)."""
    broken = dict(ssl_head)
    name = next(key for key in broken if key.endswith("patch_embed.proj.weight"))
    broken[name] = broken[name].clone()
    broken[name].view(-1)[0] = float("nan")
    model = swin_unetr(seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or infinite values \(e.g. .*patch_embed"):
        load_encoder_weights(model, broken)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_unrelated_weights_are_refused() -> None:
    with pytest.raises(CheckpointError, match="loaded 0/145"):
        load_encoder_weights(swin_unetr(), {"fc.weight": torch.zeros(2, 2)})


def test_encoder_alone_and_encoder_under_a_prefix(ssl_head: dict) -> None:
    encoder = EncoderOnly(swin_unetr(seed=0))
    report = load_encoder_weights(encoder, ssl_head)
    assert report.loaded_fraction == 1.0 and report.outside_encoder == [] and report.missing == []
    assert_loaded_exactly(encoder, ssl_head)

    pretext = nn.Module()
    pretext.backbone = EncoderOnly(swin_unetr(seed=0))
    pretext.projector = nn.Linear(4, 4)
    for prefix in ("", "backbone."):  # found by itself, or named
        report = load_encoder_weights(pretext, ssl_head, prefix=prefix)
        assert len(report.loaded) == ENCODER_TENSORS and report.outside_encoder == []
    assert_loaded_exactly(pretext, ssl_head, prefix="backbone.")
    with pytest.raises(ConfigError, match="'student.'"):
        load_encoder_weights(pretext, ssl_head, prefix="student.")


def test_the_voco_swin_encoder_takes_the_official_layout(ssl_head: dict) -> None:
    from voco.networks.swin import SwinEncoder

    torch.manual_seed(0)
    encoder = SwinEncoder(feature_size=12)
    report = load_encoder_weights(encoder, ssl_head)
    assert len(report.loaded) == ENCODER_TENSORS and report.missing == [] and report.outside_encoder == []
    assert_loaded_exactly(encoder, ssl_head)


def test_report_of_an_empty_model_has_zero_fraction() -> None:
    assert LoadReport().loaded_fraction == 0.0


# -------------------------------------------------------------------------------------- reading


def test_a_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, {"model": CustomObject()}, "custom.pt")
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path)
    message = str(raised.value)
    assert str(path) in message and "CustomObject" in message and "torch.save(model.state_dict(), path)" in message


def test_a_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, nn.Linear(2, 2), "whole_model.pt")
    with pytest.raises(CheckpointError, match="refuses to load"):
        load_encoder_weights(swin_unetr(), path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_truncated_file_is_refused(tmp_path: Path, ssl_head: dict, zip_format: bool) -> None:
    complete = tmp_path / "complete.pt"
    torch.save(ssl_head, complete, _use_new_zipfile_serialization=zip_format)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(complete.read_bytes()[: complete.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is truncated or not a PyTorch checkpoint"):
        read_checkpoint(truncated)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_called_damaged_not_pickled_objects(tmp_path: Path, seed: int) -> None:
    """Issue 16 item 13: random bytes fail torch's weights-only unpickler too ("Unsupported operand"); that is a
    damaged file, not one holding Python objects."""
    import random

    path = tmp_path / "random.pt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError, match=r"random\.pt is truncated or not a PyTorch checkpoint"):
        read_checkpoint(path)


def test_missing_file_folder_and_non_dict_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict"):
        read_checkpoint(save(tmp_path, torch.zeros(3), "tensor.pt"))
    with pytest.raises(CheckpointError, match="holds no tensors"):
        encoder_state_dict({"global_step": 3, "state_dict": {}})


def test_safetensors_are_read(tmp_path: Path, ssl_head: dict) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "encoder.safetensors"
    safetensors_torch.save_file({key: value.contiguous() for key, value in ssl_head.items()}, str(path))
    assert load_encoder_weights(swin_unetr(), path).loaded_fraction == 1.0


# ------------------------------------------------------------------------------------- exporting


def test_export_from_a_training_checkpoint_round_trips(tmp_path: Path, ssl_head: dict) -> None:
    source = save(tmp_path, voco_training(ssl_head), "checkpoint_iteration=200.pt")
    out_path, count = export_encoder(source, tmp_path / "exported" / "encoder.pt")

    assert count == ENCODER_TENSORS and out_path == tmp_path / "exported" / "encoder.pt"
    # no temporary file left beside it; its SHA-256 in sha256sum's format
    assert sorted(os.listdir(out_path.parent)) == ["encoder.pt", "encoder.pt.sha256"]
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    assert (out_path.parent / "encoder.pt.sha256").read_text() == f"{digest}  encoder.pt\n"
    exported = torch.load(out_path, map_location="cpu", weights_only=True)
    assert set(exported) == set(ssl_head)
    model = swin_unetr(seed=0)
    report = load_encoder_weights(model, out_path)
    assert len(report.loaded) == ENCODER_TENSORS and report.missing_encoder == []
    assert report.source == str(out_path)
    assert_loaded_exactly(model, ssl_head)


def test_an_exported_encoder_with_a_flipped_bit_is_refused(tmp_path: Path, ssl_head: dict) -> None:
    """Issue 16 item 6: torch loads a file with one bit flipped inside a tensor record without a word; the checksum
    recorded at export stops ``--pretrained`` from fine-tuning on damaged weights."""
    out_path, _ = export_encoder(ssl_head, tmp_path / "encoder.pt")
    tensor = ssl_head["swinViT.layers1.0.blocks.0.attn.qkv.weight"]
    content = bytearray(out_path.read_bytes())
    start = content.find(tensor.numpy().tobytes())
    assert start > 0
    content[start + 100] ^= 0x01
    out_path.write_bytes(bytes(content))
    assert not torch.equal(torch.load(out_path, weights_only=True)["swinViT.layers1.0.blocks.0.attn.qkv.weight"],
                           tensor)  # torch alone reads the damaged value
    model = swin_unetr(seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"^Checkpoint .*encoder.pt does not match the SHA-256 recorded when "
                                              r"it was written \(encoder.pt.sha256\)"):
        load_encoder_weights(model, out_path)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_export_at_feature_size_48_has_the_145_official_tensors(tmp_path: Path) -> None:
    whole = swin_unetr(feature_size=48, seed=1)
    out_path, count = export_encoder(whole.state_dict(), tmp_path / "VoCo_B_SSL_head.pt")
    del whole
    assert count == ENCODER_TENSORS
    report = load_encoder_weights(swin_unetr(feature_size=48, seed=0), out_path)
    assert len(report.loaded) == ENCODER_TENSORS and report.loaded_fraction == 1.0
    assert len(report.outside_encoder) == DECODER_TENSORS


def test_export_of_a_resenc_run_keeps_nnunets_names(tmp_path: Path) -> None:
    """A ResEnc pretext's backbone exports under nnU-Net's encoder names and loads into a new ResEnc strictly; the
    pretext's heads and its teacher copy stay out."""
    from voco.networks import build_backbone

    encoder = build_backbone("resenc", "tiny").state_dict()
    pretext = {"backbone." + key: value for key, value in encoder.items()}
    pretext |= {"teacher.backbone." + key: value + 1 for key, value in encoder.items()}
    pretext |= {"decoder.0.weight": torch.randn(4, 64, 1, 1, 1)}
    out_path, count = export_encoder({"pretext": pretext, "backbone_spec": {"name": "resenc", "size": "tiny"}},
                                     tmp_path / "resenc.pt")
    exported = torch.load(out_path, weights_only=True)
    assert count == len(encoder) and set(exported) == set(encoder)
    assert all(key.startswith(("encoder.stem.", "encoder.stages.")) for key in exported)
    build_backbone("resenc", "tiny").load_state_dict(exported, strict=True)
    assert all(torch.equal(exported[key], value) for key, value in encoder.items())


def test_export_without_encoder_writes_nothing(tmp_path: Path) -> None:
    out_path = tmp_path / "out" / "encoder.pt"
    with pytest.raises(CheckpointError, match="Found no encoder tensors"):
        export_encoder({"pretext": {"backbone.projector.weight": torch.zeros(2)}}, out_path)
    assert not out_path.parent.exists()


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, ssl_head: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_path = tmp_path / "encoder.pt"
    out_path.write_bytes(b"previous export")

    def disk_full(content: Any, path: str) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half written")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_encoder(ssl_head, out_path)
    assert out_path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["encoder.pt"]  # neither a temporary file nor a checksum of the failed write


# ---------------------------------------------------------------------------------- run folders


def test_find_latest_checkpoint_ranks_by_iteration_and_skips_incomplete(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path) is None
    assert find_latest_checkpoint(tmp_path / "absent") is None
    weights = {"w": torch.zeros(1)}
    for name in ("checkpoint_iteration=1000.pt", "checkpoint_iteration=200.pt", "checkpoint_key_metric=0.9.pt"):
        torch.save(weights, tmp_path / name)  # saved last: the newest mtime, yet iteration 200 < 1000
    complete = (tmp_path / "checkpoint_iteration=1000.pt").read_bytes()
    (tmp_path / "checkpoint_iteration=1200.pt").write_bytes(complete[: len(complete) // 2])  # killed mid-write
    (tmp_path / ".checkpoint_iteration=1300.pt.tmp").write_bytes(complete)
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_iteration=1000.pt"
    torch.save(weights, tmp_path / "checkpoint_final_iteration=1500.pt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_final_iteration=1500.pt"
    torch.save(weights, tmp_path / "net_2000.pt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "net_2000.pt"


def test_find_latest_checkpoint_reads_the_iteration_of_a_fixed_final_name(tmp_path: Path) -> None:
    """The bundle saves its final state as checkpoint_final.pt: the trainer state inside says when."""
    weights = {"w": torch.zeros(1)}
    torch.save({"pretext": weights, "trainer": {"iteration": 1000}}, tmp_path / "checkpoint_iteration=1000.pt")
    torch.save({"pretext": weights, "trainer": {"iteration": 1050}}, tmp_path / "checkpoint_final.pt")
    os.utime(tmp_path / "checkpoint_final.pt", (1_000_000, 1_000_000))  # copied folder: mtime says nothing
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_final.pt"
    torch.save({"global_step": 1100, "state_dict": {}}, tmp_path / "resumed.pt")  # reference style
    assert find_latest_checkpoint(tmp_path) == tmp_path / "resumed.pt"
    (tmp_path / "checkpoints").mkdir()  # the bundle's layout: <run folder>/checkpoints/
    torch.save({"pretext": {}, "trainer": {"iteration": 1200}}, tmp_path / "checkpoints" / "checkpoint_final.pt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint_final.pt"


def test_find_latest_checkpoint_falls_back_to_modification_time(tmp_path: Path) -> None:
    for age, name in enumerate(("newest.pt", "older.pt", "oldest.pt")):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "newest.pt"


@pytest.mark.parametrize("rule", ["mean", "repeat", "first"])
def test_a_one_channel_encoder_serves_a_four_channel_task(rule: str) -> None:
    """The input layers' one-channel kernels are spread over four channels by the chosen rule, named in the report;
    with "mean", four identical channels give exactly the one-channel encoder's features."""
    from voco.networks import build_backbone

    torch.manual_seed(0)
    one = build_backbone("swin", "tiny", window_size=2).eval()
    four = build_backbone("swin", "tiny", in_channels=4, window_size=2).eval()
    report = load_encoder_weights(four, one.state_dict(), channel_adaptation=rule)
    adapted = {name for name, before, after, used in report.adapted_channels if (before, after, used) == (1, 4, rule)}
    assert adapted == {"swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                       "encoder1.layer.conv3.conv.weight"}
    assert report.loaded_fraction == 1.0 and not report.skipped_shape
    assert f"input channels 1 -> 4 by {rule!r}" in report.summary()
    kernel, spread = one.swinViT.patch_embed.proj.weight, four.swinViT.patch_embed.proj.weight
    expected = {"mean": kernel.repeat(1, 4, 1, 1, 1) / 4, "repeat": kernel.repeat(1, 4, 1, 1, 1),
                "first": torch.cat([kernel, torch.zeros_like(kernel).repeat(1, 3, 1, 1, 1)], dim=1)}[rule]
    assert torch.equal(spread, expected)
    if rule == "mean":
        x = torch.randn(1, 1, 32, 32, 64)  # instance norm needs more than one voxel at stride 32
        with torch.no_grad():
            for single, spread_out in zip(one.forward_features(x), four.forward_features(x.repeat(1, 4, 1, 1, 1))):
                torch.testing.assert_close(spread_out, single, rtol=1e-3, atol=1e-3)  # float sums in another order


def test_channel_adaptation_none_keeps_the_layer_random_and_an_unknown_rule_is_refused() -> None:
    from voco.networks import build_backbone

    one, four = build_backbone("swin", "tiny", window_size=2), build_backbone("swin", "tiny", in_channels=4,
                                                                             window_size=2)
    report = load_encoder_weights(four, one.state_dict(), channel_adaptation="none")
    assert not report.adapted_channels and len(report.skipped_shape) == 3
    assert "1 input channels and the model 4" in report.table()
    with pytest.raises(ConfigError, match="unknown channel adaptation rule 'average'"):
        load_encoder_weights(four, one.state_dict(), channel_adaptation="average")
