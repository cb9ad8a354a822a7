"""A user's own labelled data as a downstream task: a Decathlon / MSD-style dataset.json (or a voco manifest with label
maps) read into a Task, checked like a registry task, fine-tuned by `voco benchmark run` and reported without a
published number."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import tracking_store, write_volume

from voco.benchmark.checks import check_task_dataset
from voco.benchmark.own_data import resolve_task, task_from_dataset
from voco.benchmark.registry import get_task
from voco.benchmark.runs import plan_grid
from voco.cli import main
from voco.errors import ConfigError, ManifestError


def write_dataset(folder: Path, content: dict, name: str = "dataset.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(content))
    return folder / name


def segmentation_json(**fields) -> dict:
    return {"name": "My Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}], **fields}


def test_a_decathlon_dataset_json_is_a_task(tmp_path):
    path = write_dataset(tmp_path / "my_liver", segmentation_json())
    task = resolve_task(str(path))
    assert (task.id, task.task_type, task.class_names) == ("my-liver", "segmentation", ("liver", "tumour"))
    assert (task.in_channels, task.out_channels, task.modality, task.metrics) == (1, 3, "CT", ("Dice",))
    assert task.intensity.kind == "window" and (task.intensity.a_min, task.intensity.a_max) == (-175.0, 250.0)
    assert task.spacing == (1.5, 1.5, 1.5) and task.roi_size == (96, 96, 96)  # the ct_abdomen preset, VoCo's crop
    assert task.reference_results is None and task.provenance["own_dataset"] == str(path)
    assert task.datalist_file == str(path)
    assert resolve_task(str(tmp_path / "my_liver")) == task  # the folder stands for its dataset.json


def test_modality_channels_and_overrides(tmp_path):
    """MSD's modality names the channels; any that is not CT is z-scored (nnU-Net's rule); overrides win."""
    mr = write_dataset(tmp_path / "brain", segmentation_json(name="", modality={"0": "FLAIR", "1": "T1w"}))
    task = task_from_dataset(mr)
    assert (task.id, task.in_channels, task.modality, task.intensity.kind) == ("brain", 2, "MR", "zscore")
    assert task.provenance["preset"] == "mr_zscore" and task.provenance["channels"] == ["FLAIR", "T1w"]
    chest = task_from_dataset(mr, preset="ct_chest", roi_size=[64, 64, 32], spacing=2)
    assert (chest.intensity.a_min, chest.roi_size, chest.spacing) == (-1000.0, (64, 64, 32), (2.0, 2.0, 2.0))
    # nnU-Net v2 writes channel_names and labels as {name: value}
    v2 = write_dataset(tmp_path / "v2", {"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1},
                                         "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]})
    assert task_from_dataset(v2).class_names == ("spleen",)
    # a registry task's preprocessing can be changed the same way
    assert resolve_task("btcv", roi_size=(64, 64, 64)).roi_size == (64, 64, 64)
    assert resolve_task("btcv") == get_task("btcv")


def test_a_number_label_is_a_classification(tmp_path):
    binary = write_dataset(tmp_path / "nodules", {"labels": {"0": "benign", "1": "malignant"},
                                                  "training": [{"image": "a.nii.gz", "label": 1},
                                                               {"image": "b.nii.gz", "label": 0}]})
    task = task_from_dataset(binary)
    assert (task.task_type, task.class_names, task.out_channels, task.metrics) == (
        "classification", ("benign", "malignant"), 1, ("AUC", "ACC"))
    three = write_dataset(tmp_path / "three", {"training": [{"image": "a.nii.gz", "label": 2}]})
    assert task_from_dataset(three).class_names == ("class_0", "class_1", "class_2")


def test_a_name_of_the_registry_is_never_taken_for_the_registry_task(tmp_path):
    path = write_dataset(tmp_path / "copy", segmentation_json(name="BTCV"))
    assert task_from_dataset(path).id == "btcv-own"


@pytest.mark.parametrize("fields, words", [
    ({"labels": None}, "has label maps but no 'labels'"),
    ({"labels": {"0": "background", "2": "liver"}}, "without gaps"),
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "one whole number per class"),
    ({"modality": ["CT"]}, "one name per channel"),
    ({"training": [{"image": "a.nii.gz"}]}, "no labelled entry"),
    ({"training": [{"image": "a.nii.gz", "label": 1.5}]}, "give a label map file"),
])
def test_what_cannot_be_a_task_is_one_sentence_naming_the_file(tmp_path, fields, words):
    path = write_dataset(tmp_path / "bad", segmentation_json(**fields))
    with pytest.raises(ManifestError, match=words) as caught:
        task_from_dataset(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_and_bad_sizes(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; give the path of your dataset.json"):
        resolve_task(str(tmp_path / "nowhere" / "dataset.json"))
    path = write_dataset(tmp_path / "ok", segmentation_json())
    with pytest.raises(ConfigError, match="--roi_size"):
        task_from_dataset(path, roi_size=[96, 96])
    with pytest.raises(ConfigError, match="unknown preset"):
        task_from_dataset(path, preset="ct_brain")


def test_a_manifest_with_label_maps_is_a_task_too(tmp_path):
    import numpy as np

    image = write_volume(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), np.float32))
    label = write_volume(tmp_path / "lab.nii.gz", np.ones((8, 8, 8), np.float32))
    manifest = {"format": "voco-manifest", "version": 1, "name": "kidneys", "labels": {"0": "bg", "1": "kidney"},
                "datasets": [{"name": "k", "modality": "MR", "subjects": [{"id": "1", "studies": [{"id": "0", "scans": [
                    {"image": image, "label": label}, {"image": image}]}]}]}]}
    task = task_from_dataset(write_dataset(tmp_path, manifest, "manifest.json"))
    assert (task.id, task.class_names, task.modality) == ("kidneys", ("kidney",), "MR")
    assert check_task_dataset(task, tmp_path) == []  # the one labelled scan, read and checked


@pytest.fixture(scope="module")
def own_dataset(tmp_path_factory) -> Path:
    """Phantoms written as a user's Decathlon folder: dataset.json with its own name, modality and labels."""
    from voco.benchmark.phantom_tasks import prepare_phantom_task

    folder = prepare_phantom_task("phantom-seg", tmp_path_factory.mktemp("own") / "my_organs", n=4, n_validation=1)
    content = json.loads((folder / "phantom_seg.json").read_text())
    content.update(name="my-organs", modality={"0": "CT"})
    write_dataset(folder, content)
    return folder


@pytest.fixture(scope="module")
def leaky_encoder(own_dataset, tmp_path_factory) -> Path:
    """An encoder exported from a pretraining run whose manifest held two of the task's images (one re-saved as
    another file, flipped and moved) and two volumes of its own: `voco export` writes the fingerprints beside it."""
    import nibabel as nib
    import numpy as np
    import torch

    from voco.data.phantoms import ensure_phantoms
    from voco.networks import build_backbone

    folder = tmp_path_factory.mktemp("pretraining")
    content = json.loads((own_dataset / "dataset.json").read_text())
    first, second = (own_dataset / content["training"][0]["image"], own_dataset / content["validation"][0]["image"])
    scan = nib.load(first)  # the same scan as another file: uncompressed, x flipped, origin moved
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = scan.shape[0] - 1
    affine = scan.affine @ flip
    affine[:3, 3] += 25.0
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[::-1], affine), folder / "copy.nii")
    others = json.loads(Path(ensure_phantoms(folder / "others", 2, seed=7, shape_range=((24, 32),) * 3)).read_text())
    images = [str(folder / "copy.nii"), str(second)] + [
        str(folder / "others" / scan["image"]) for dataset in others["datasets"] for subject in dataset["subjects"]
        for study in subject["studies"] for scan in study["scans"]]
    manifest = {"format": "voco-manifest", "version": 1, "name": "pretraining", "datasets": [
        {"name": "mixed", "modality": "CT", "subjects": [
            {"id": str(index), "studies": [{"id": "0", "scans": [{"image": image}]}]}
            for index, image in enumerate(images)]}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run = folder / "runs" / "voco" / "pretrained"
    (run / "checkpoints").mkdir(parents=True)
    (run / "pretraining.json").write_text(json.dumps({"manifest": str(folder / "manifest.json"), "dataset_dir": None,
                                                      "preset": None, "region_size": [64, 64, 32],
                                                      "backbone": {"name": "swin", "size": "tiny"}}))
    torch.save(build_backbone("swin", "tiny", window_size=2).state_dict(), run / "checkpoints" / "checkpoint_8.pt")
    assert main(["export", str(run / "checkpoints" / "checkpoint_8.pt"), str(folder / "leaky.pt")]) == 0
    return folder / "leaky.pt"


def test_export_records_the_pretraining_volumes_and_check_finds_the_seen_cases(own_dataset, leaky_encoder, capsys):
    provenance = json.loads((leaky_encoder.parent / "leaky.pt.provenance.json").read_text())
    assert provenance["format"] == "voco-encoder-provenance" and provenance["volumes"] == 4
    assert len(provenance["fingerprints"]) == 4 and provenance["pretraining"]["region_size"] == [64, 64, 32]
    capsys.readouterr()
    assert main(["benchmark", "check", str(own_dataset / "dataset.json"), "--voxels", "False", "--pretrained",
                 str(leaky_encoder)]) == 0
    out = capsys.readouterr().out
    assert "warning: 2 of the 4 images of my-organs" in out and "in the pretraining data of leaky.pt" in out


def test_fingerprints_follow_the_scan_not_the_file(own_dataset, leaky_encoder):
    from voco.data.fingerprints import volume_fingerprint

    content = json.loads((own_dataset / "dataset.json").read_text())
    first = own_dataset / content["training"][0]["image"]
    assert volume_fingerprint(leaky_encoder.parent / "copy.nii") == volume_fingerprint(first)
    other = own_dataset / content["training"][1]["image"]
    assert volume_fingerprint(other) != volume_fingerprint(first)


def test_check_command_validates_an_own_dataset(own_dataset, capsys):
    assert main(["benchmark", "check", str(own_dataset / "dataset.json"), "--voxels", "False"]) == 0
    out = capsys.readouterr().out
    assert "task my-organs: segmentation of 11 classes" in out and "ct_abdomen preprocessing" in out
    content = json.loads((own_dataset / "dataset.json").read_text())
    content["labels"] = {"0": "background", "1": "liver"}  # the label maps hold values up to 11
    broken = write_dataset(own_dataset.parent / "broken", content)
    rows = check_task_dataset(task_from_dataset(broken), own_dataset)
    assert rows and "outside 0..1 for the 1 classes of my-organs" in rows[0]["problem"]


def test_benchmark_run_on_an_own_dataset_and_a_report_without_a_published_number(own_dataset, leaky_encoder,
                                                                                 tmp_path, monkeypatch, capsys):
    """One command fine-tunes scratch and a pretrained encoder on the user's dataset.json; the runs carry the
    user's task name, the dataset path and its fingerprint; the report compares with no published number and
    marks the encoder that was pretrained on two of the task's images."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    tracking_uri = tracking_store(tmp_path)
    path = own_dataset / "dataset.json"
    cells = plan_grid([str(path)], [str(leaky_encoder), "scratch"], size="tiny")
    assert [(cell.task, cell.source) for cell in cells] == [("my-organs", str(path))] * 2
    capsys.readouterr()
    assert main(["benchmark", "run", str(path), "--pretrained", f"{leaky_encoder},scratch", "--config",
                 "smoke", "--max_epochs", "1", "--roi_size", "64,64,32", "--tracking_uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "grid: 2 done" in out and "warning: 2 of the 4 images of my-organs" in out

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("benchmark-my-organs").experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(cell.run_name for cell in cells)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for run in runs:
        assert run.info.status == "FINISHED" and run.info.run_name.startswith("my-organs-")
        assert run.data.tags["voco.task_source"] == str(path)
        assert run.data.tags["voco.datalist_sha256"] == digest
        assert json.loads(run.data.tags["voco.grid_settings"])["roi_size"] == [64, 64, 32]

    assert main(["benchmark", "report", "--tracking_uri", tracking_uri, "--tasks", str(path)]) == 0
    report = capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| my-organs")]
    assert len(rows) == 2 and all("| no published number |" in row for row in rows)
    assert [row.endswith("| 2/4 images seen in pretraining |") for row in rows] == [True, False]  # scratch: none
    seen = {run.data.tags["voco.encoder"]: run.data.tags["voco.seen_in_pretraining"] for run in runs}
    assert seen == {"leaky": "2/4", "scratch": ""}


def test_a_four_channel_mr_task_fine_tunes_from_a_one_channel_encoder(own_dataset, tmp_path, monkeypatch, capsys):
    """BraTS-style data (one 4-channel file per case, four MR sequences named in modality) fine-tuned from a
    one-channel encoder: the input layers are spread over the channels by the default rule, named in the report."""
    import mlflow
    import nibabel as nib
    import numpy as np
    import torch

    from voco.networks import build_backbone

    content = json.loads((own_dataset / "dataset.json").read_text())
    folder = tmp_path / "brain"
    (folder / "images").mkdir(parents=True)
    for entry in content["training"] + content["validation"]:
        scan = nib.load(own_dataset / entry["image"])
        values = np.asarray(scan.dataobj, dtype=np.float32)
        sequences = np.stack([values, -values, values ** 2 / 1000.0, np.sqrt(np.abs(values))], axis=-1)
        entry["image"] = str(folder / "images" / Path(entry["image"]).name)
        nib.save(nib.Nifti1Image(sequences, scan.affine), entry["image"])
        entry["label"] = str(own_dataset / entry["label"])
    content.update(name="brain-mr", modality={"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"})
    path = write_dataset(folder, content)
    assert check_task_dataset(task_from_dataset(path), folder, read_voxels=False) == []

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    tracking_uri = tracking_store(tmp_path)
    torch.save(build_backbone("swin", "tiny", window_size=2).state_dict(), tmp_path / "ct_encoder.pt")
    assert main(["benchmark", "run", str(path), "--pretrained", str(tmp_path / "ct_encoder.pt"), "--config", "smoke",
                 "--max_epochs", "1", "--roi_size", "64,64,32", "--tracking_uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "loaded 145/145 encoder tensors" in out and "input channels 1 -> 4 by 'mean'" in out
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark-brain-mr").experiment_id])
    assert run.info.status == "FINISHED" and "best/metric/dice" in run.data.metrics


def test_one_case_without_a_validation_list_is_one_sentence(tmp_path):
    from voco.benchmark.finetune import task_datalists

    path = write_dataset(tmp_path / "one", segmentation_json())
    with pytest.raises(ManifestError, match="has 1 training case and no 'validation' list"):
        task_datalists(task_from_dataset(path), tmp_path / "one")
    two = write_dataset(tmp_path / "two", segmentation_json(training=[
        {"image": "a.nii.gz", "label": "la.nii.gz"}, {"image": "b.nii.gz", "label": "lb.nii.gz"}]))
    training, validation = task_datalists(task_from_dataset(two), tmp_path / "two")
    assert (len(training), len(validation)) == (1, 1)
