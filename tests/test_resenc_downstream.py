"""Downstream fine-tuning with nnU-Net's ResEnc: the ResEnc U-Net (segmentation) and a pooled head on the ResEnc
encoder (classification) in every initialisation mode, a pretrained tiny ResEnc loaded tensor for tensor, and the
downstream bundle's smoke run with --backbone resenc."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from voco.benchmark.finetune import trainable_parameters
from voco.benchmark.networks import (EncoderClassifier, build_task_network, encoder_of,
                                     initialize_from_pretrained)
from voco.benchmark.registry import get_task
from voco.errors import ConfigError
from voco.networks import build_backbone


def training_checkpoint(encoder: torch.nn.Module) -> dict:
    """What a pretraining run of the resenc backbone saves: the pretext's tensors under ``backbone.``, its spec."""
    return {"pretext": {f"backbone.{name}": tensor.clone() for name, tensor in encoder.state_dict().items()},
            "backbone_spec": {"name": "resenc", "size": "tiny", "in_channels": 1, "pretext": "mae"}}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny ResEnc encoder with weights unlike a fresh one's, saved as a training checkpoint and as an export."""
    folder = tmp_path_factory.mktemp("resenc")
    torch.manual_seed(1)
    encoder = build_backbone("resenc", "tiny")
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
    torch.save(training_checkpoint(encoder), folder / "checkpoint.pt")
    torch.save(encoder.state_dict(), folder / "encoder.pt")  # the export's form: the encoder's own names
    return folder, encoder.state_dict()


@pytest.mark.parametrize("task_id, mode", [("phantom-seg", "finetune"), ("phantom-seg", "frozen"),
                                           ("phantom-seg", "scratch"), ("phantom-cls", "finetune"),
                                           ("phantom-cls", "frozen"), ("phantom-cls", "linear_probe"),
                                           ("phantom-cls", "scratch")])
def test_resenc_networks_build_and_train_in_every_mode(pretrained, task_id, mode):
    folder, _ = pretrained
    task = get_task(task_id)
    network = build_task_network(task, backbone="resenc", size="tiny")
    encoder = encoder_of(network)
    assert all(name.startswith("encoder.") for name in encoder.state_dict())
    report = initialize_from_pretrained(network, None if mode == "scratch" else str(folder / "checkpoint.pt"),
                                        mode=mode)
    output = network(torch.zeros(1, task.in_channels, *task.roi_size))
    if task.task_type == "segmentation":  # nnU-Net's U-Net, deep supervision off: one full-size map
        assert type(network).__name__ == "ResidualEncoderUNet"
        assert output.shape == (1, task.out_channels, *task.roi_size)
    else:
        assert isinstance(network, EncoderClassifier) and output.shape == (1, task.out_channels)
    trainable = {id(parameter) for parameter in trainable_parameters(network)}
    encoder_trains = {id(parameter) in trainable for parameter in encoder.parameters()}
    assert encoder_trains == {mode in ("finetune", "scratch")}
    if mode == "linear_probe":
        assert trainable == {id(network.head.weight), id(network.head.bias)}
    assert (report is None) == (mode == "scratch")


def test_linear_probe_of_the_unet_is_one_sentence():
    network = build_task_network(get_task("phantom-seg"), backbone="resenc", size="tiny")
    with pytest.raises(ConfigError, match="mode 'linear_probe' trains a classifier's final linear layer, and a "
                                          "ResidualEncoderUNet has none; use mode 'frozen' or 'finetune'"):
        initialize_from_pretrained(network, {"x": torch.zeros(1)}, mode="linear_probe")


@pytest.mark.parametrize("source", ["checkpoint.pt", "encoder.pt"])
def test_a_pretrained_resenc_loads_every_encoder_tensor_and_frozen_keeps_them(pretrained, source):
    """From a training checkpoint ({"pretext": {"backbone.encoder..."}}) and from an export (encoder.*), every
    encoder tensor of the U-Net is matched and copied; a frozen encoder is unchanged by a training step while the
    decoder learns."""
    folder, weights = pretrained
    task = get_task("phantom-seg")
    network = build_task_network(task, backbone="resenc", size="tiny")
    report = initialize_from_pretrained(network, str(folder / source), mode="frozen")
    assert report.loaded_fraction == 1.0 and sorted(report.loaded) == sorted(weights)
    assert not (report.skipped_unexpected or report.skipped_shape or report.missing_encoder)
    encoder_state = encoder_of(network).state_dict()
    assert all(torch.equal(encoder_state[name], weights[name]) for name in weights)

    decoder_before = {name: tensor.clone() for name, tensor in network.decoder.state_dict().items()
                      if not name.startswith("encoder.")}
    optimizer = torch.optim.SGD(trainable_parameters(network), lr=0.1)
    image = torch.randn(1, 1, *task.roi_size)
    label = torch.randint(0, task.out_channels, (1, *task.roi_size))
    torch.nn.functional.cross_entropy(network(image), label).backward()
    optimizer.step()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in encoder_of(network).state_dict().items())
    decoder_after = network.decoder.state_dict()
    assert any(not torch.equal(decoder_after[name], before) for name, before in decoder_before.items())


def test_a_whole_resenc_unet_reports_its_decoder_as_outside_the_encoder(pretrained):
    from voco.checkpoints import load_encoder_weights

    folder, weights = pretrained
    network = build_task_network(get_task("phantom-seg"), backbone="resenc", size="tiny")
    report = load_encoder_weights(network, folder / "checkpoint.pt")
    assert report.loaded_fraction == 1.0 and report.encoder_key_count == len(weights)
    assert report.outside_encoder and all(name.startswith("decoder.") for name in report.outside_encoder)


def test_another_resenc_architecture_is_refused_with_a_hint(pretrained):
    from voco.errors import CheckpointError

    folder, _ = pretrained
    network = build_task_network(get_task("phantom-seg"), backbone="resenc", size="tiny",
                                 backbone_options={"features_per_stage": [16, 32, 64, 128]})
    with pytest.raises(CheckpointError, match="Refused to load .*checkpoint.pt because too little of it fits"):
        initialize_from_pretrained(network, str(folder / "checkpoint.pt"))
    report = initialize_from_pretrained(network, str(folder / "checkpoint.pt"), min_loaded_fraction=0.0)
    assert "the checkpoint's ResEnc has other stages" in report.table()


def test_the_roi_must_be_divisible_by_the_total_stride_and_registration_stays_swin():
    task = replace(get_task("phantom-seg"), roi_size=(64, 64, 36))
    with pytest.raises(ConfigError, match=r"task 'phantom-seg' has roi_size \[64, 64, 36\], which this network "
                                          r"cannot take; give a roi_size divisible by 8 in every axis"):
        build_task_network(task, backbone="resenc", size="tiny")
    smallest = replace(get_task("phantom-cls"), roi_size=(8, 8, 8))
    with pytest.raises(ConfigError, match="too small for the ResEnc network to train; make at least one axis 16"):
        build_task_network(smallest, backbone="resenc", size="tiny")
    with pytest.raises(ConfigError, match="backbone 'resenc' is not available for registration .*use one of swin"):
        build_task_network(get_task("phantom-reg"), backbone="resenc", size="tiny")


def test_downstream_bundle_smoke_with_the_resenc(pretrained, tmp_path):
    """`--backbone resenc --size tiny` through the bundle, from the training checkpoint: every encoder tensor loads,
    and the run records the network it built."""
    from conftest import run_bundle_command

    folder, weights = pretrained
    result = run_bundle_command("downstream_benchmark", ["train.json", "smoke.json"], tmp_path, "--backbone",
                                "resenc", "--size", "tiny", "--pretrained", str(folder / "checkpoint.pt"),
                                "--max_epochs", "1", "--run_name", "resenc", "--mlflow", "False")
    output = result.stdout + result.stderr
    assert f"loaded {len(weights)}/{len(weights)} encoder tensors" in output
    run = tmp_path / "runs" / "benchmark" / "resenc"
    recorded = json.loads((run / "settings.json").read_text())
    assert (recorded["backbone"], recorded["size"], recorded["backbone_options"]["n_stages"]) == ("resenc", "tiny", 4)
    assert json.loads((run / "result.json").read_text())["backbone"] == "resenc"
    assert (run / "checkpoints" / "model.pt").is_file()
