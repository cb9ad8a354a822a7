"""Pretraining on several channels: the scans of one study stacked in the order of a channel list
(`voco.data.channels`), through the region loader and a pretraining bundle, to an exported C-channel encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco.data.channels import channel_names_of, check_channels, stack_channels
from voco.data.folder import build_manifest_from_folder
from voco.data.manifest import load_manifest, to_datalist
from voco.errors import ConfigError

SIDE = 16


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))


@pytest.fixture()
def two_sequence_manifest(tmp_path) -> Path:
    """Subjects with a T1 that grows along x and a T2 that grows along y (sub-3 lacks its T2), MR."""
    x, y, _ = np.meshgrid(*[np.arange(SIDE, dtype=np.float32)] * 3, indexing="ij")
    root = tmp_path / "brains"
    for subject in ("sub-1", "sub-2", "sub-3"):
        write(root / f"{subject}_T1.nii.gz", 100 + 10 * x)
        if subject != "sub-3":
            write(root / f"{subject}_T2.nii.gz", 1000 + 50 * y)  # another scale: each sequence is z-scored alone
    path, problems = build_manifest_from_folder(root, output=tmp_path / "brains.json", modality="MR",
                                                subject_pattern=r"(sub-\d+)")
    assert problems == []
    return path


def test_channel_list_setting_is_checked():
    assert check_channels(None) is None and check_channels([]) is None
    assert check_channels(["T1", " flair "]) == ["t1", "flair"]
    for bad, words in [("t1,t2", "must be a list of channel names"), (["t1", ""], "must be a list"),
                       (["t1", "T1"], "names a channel twice")]:
        with pytest.raises(ConfigError, match=words):
            check_channels(bad)
    assert channel_names_of({"image": "/d/case7_0001.nii.gz"}) == {"0001"}
    assert channel_names_of({"image": "/d/x.nii.gz", "channel": "FLAIR",
                             "attributes": {"series_description": "T2 FLAIR"}}) == {"flair", "t2 flair", "x"}


def test_scans_of_a_study_stack_in_channel_order(two_sequence_manifest, caplog):
    datalist = to_datalist(load_manifest(two_sequence_manifest))
    with caplog.at_level(logging.WARNING, logger="voco.data.channels"):
        stacked = stack_channels(datalist, ["T2", "T1"])
    assert [(entry["subject"], [Path(image).name for image in entry["image"]]) for entry in stacked] == [
        ("sub-1", ["sub-1_T2.nii.gz", "sub-1_T1.nii.gz"]), ("sub-2", ["sub-2_T2.nii.gz", "sub-2_T1.nii.gz"])]
    assert stacked[0]["scan_index"] == "t2+t1" and stacked[0]["channels"] == ["t2", "t1"]
    assert "1 of 3 studies are left out for lacking a channel (e.g. brains/sub-3/0 has no scan answering to 't2')" \
        in caplog.text
    with pytest.raises(ConfigError, match=r"no study has one scan for each of the channels \['flair'\]; its scans "
                                          r"answer to t1, t2 \(the 'channel' field"):
        stack_channels(datalist, ["flair"])


def test_region_loader_delivers_the_channels_stacked(two_sequence_manifest):
    from voco.data.regions import build_region_loader

    loader = build_region_loader(two_sequence_manifest, batch_size=2, num_workers=0, region_size=(SIDE,) * 3,
                                 channels=["t1", "t2"], preset="mr_zscore", cache="memory")
    batch = next(iter(loader))
    image = batch["image"]
    assert image.shape == (2, 2, SIDE, SIDE, SIDE) and image.dtype == torch.float32
    inside = (slice(4, 12),) * 3  # the preset resamples 16 mm to 11 voxels of 1.5 mm and pads them to 16
    t1, t2 = image[0, 0][inside], image[0, 1][inside]
    # each sequence z-scored on its own; T1 grows along x only, T2 along y only
    for channel in image[0]:
        assert abs(float(channel[channel != 0].mean())) < 0.2
    assert float(t1.diff(dim=0).mean()) > 0.05 and abs(float(t1.diff(dim=1).mean())) < 1e-4
    assert float(t2.diff(dim=1).mean()) > 0.05 and abs(float(t2.diff(dim=0).mean())) < 1e-4


def test_pretrain_on_two_channels_and_fine_tune_a_two_channel_swinunetr(tmp_path):
    """The VoCo bundle with `--channels`: the encoder takes both sequences, the run records them, and the export
    loads into a two-channel SwinUNETR without any channel adaptation."""
    import json

    from conftest import run_bundle_command
    from monai.networks.nets import SwinUNETR

    from voco.checkpoints import export_encoder, load_encoder_weights, read_checkpoint
    from voco.data.phantoms import make_phantom

    root = tmp_path / "two_sequences"
    for seed in range(4):
        phantom = make_phantom(seed, shape=(48, 48, 32), spacing=(2.0, 2.0, 3.0), lesion_probability=0.0)
        (root / f"case{seed}").mkdir(parents=True)
        phantom.save(root / f"case{seed}" / "ct.nii.gz")
        phantom.image = -phantom.image  # a second "sequence" with another contrast on the same grid
        phantom.save(root / f"case{seed}" / "inverted.nii.gz")
    manifest, _ = build_manifest_from_folder(root, output=tmp_path / "two.json")
    result = run_bundle_command("voco_pretrain", ["train.json", "smoke.json"], tmp_path, "--manifest", str(manifest),
                                "--channels", "['ct', 'inverted']", "--run_name", "two", "--max_steps", "2",
                                "--val_interval", "2", "--checkpoint_interval", "2")
    assert "step 2/2" in result.stdout and "probe at step 0" in result.stdout  # the probe feeds both channels
    state = read_checkpoint(tmp_path / "runs" / "two" / "checkpoints" / "checkpoint_final.pt")
    assert state["backbone_spec"]["in_channels"] == 2
    facts = json.loads((tmp_path / "runs" / "two" / "pretraining.json").read_text())
    assert facts["channels"] == ["ct", "inverted"] and facts["backbone"]["in_channels"] == 2
    out, _ = export_encoder(tmp_path / "runs" / "two" / "checkpoints" / "checkpoint_final.pt", tmp_path / "enc.pt")
    model = SwinUNETR(in_channels=2, out_channels=2, feature_size=12, use_v2=True, window_size=2)  # as smoke.json
    report = load_encoder_weights(model, out)
    assert report.loaded_fraction == 1.0 and report.adapted_channels == []
