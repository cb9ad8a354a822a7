"""The nnU-Net path: a phantom task converted to nnU-Net's raw format and planned by nnU-Net's own ResEnc-L planner, a
pretrained ResEnc exported for that plan (`voco export --format nnunet`) and loaded by nnU-Net's own loader into the
network nnU-Net's trainer builds; the architecture check, the added configuration, the preprocessing sentences and the
plan carried with the export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from voco.checkpoints.nnunet import NNUNET_WEIGHTS_FORMAT, preprocessing_differences
from voco.cli import main
from voco.data.nnunet_raw import decathlon_to_nnunet_raw
from voco.errors import ConfigError
from voco.networks import build_backbone

DATASET_ID = 501
# The plan nnU-Net's ResEnc-L planner makes for the phantoms below: 3 stages of 32, 64, 128 features.
PLAN_ENCODER = {"name": "resenc", "size": "L", "in_channels": 1, "n_stages": 3}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Five small phantoms as the Decathlon-style task phantom-seg, converted to nnU-Net raw (checked by nnU-Net's
    dataset integrity check), fingerprinted and planned with nnUNetPlannerResEncL, in nnU-Net folders of their own."""
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncL
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, \
        plan_experiment_dataset

    from voco.benchmark.phantom_tasks import prepare_phantom_task

    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("raw", "preprocessed", "results"):
            patch.setenv(f"nnUNet_{name}", str(root / name))
        task = prepare_phantom_task("phantom-seg", root / "task", n=5, n_validation=1,
                                    shape_range=((24, 32), (24, 32), (16, 24)))
        raw = decathlon_to_nnunet_raw(task / "phantom_seg.json", root / "raw", dataset_id=DATASET_ID)
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=True, clean=True,
                                    verbose=False, show_progress_bar=False)
        plan_experiment_dataset(DATASET_ID, nnUNetPlannerResEncL)
        yield SimpleNamespace(root=root, task=task, raw=raw,
                              plans=root / "preprocessed" / raw.name / "nnUNetResEncUNetLPlans.json")


def pretraining_run(folder: Path, spec: dict, manifest: Path) -> dict[str, torch.Tensor]:
    """A pretraining run folder as the bundles leave it: a training checkpoint ({"pretext": the pretext's state
    dict, its backbone under "backbone.", "backbone_spec": `RunInfo`'s}) and pretraining.json; the encoder's
    tensors."""
    from voco.engine import RunInfo

    torch.manual_seed(1)
    pretext = nn.Module()
    pretext.backbone = build_backbone(**spec)
    pretext.decoder = nn.Conv3d(pretext.backbone.embedding_dim, 1, 1)  # a pretext's own head: not exported
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"pretext": pretext.state_dict(), "backbone_spec": RunInfo(spec, "spark").state_dict(),
                "trainer": {"iteration": 8}}, folder / "checkpoints" / "checkpoint_iteration=8.pt")
    (folder / "pretraining.json").write_text(json.dumps({
        "manifest": str(manifest), "dataset_dir": None, "preset": "ct_abdomen", "region_size": [64, 64, 64],
        "backbone": spec, "channels": None}))
    return pretext.backbone.state_dict()


def nnunet_network(plans: Path, configuration: str):
    """The network `nnUNetv2_train DATASET CONFIGURATION` trains: built by nnU-Net's trainer from the plans file,
    initialised by nnU-Net with another seed than the export's."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(plans))
    labels = manager.get_label_manager(load_json(str(plans.with_name("dataset.json"))))
    torch.manual_seed(2)
    return nnUNetTrainer.build_network_architecture(manager, manager.get_configuration(configuration), 1,
                                                    labels.num_segmentation_heads, True)


def assert_loaded(network, exported: Path, encoder: dict[str, torch.Tensor]) -> None:
    """nnU-Net's own loader takes the file; every encoder tensor is the pretrained one (in the encoder and in the
    decoder's reference to it), and the decoder is the file's."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    saved = torch.load(exported, weights_only=False)["network_weights"]
    decoder = [name for name in saved if name.startswith("decoder.stages.") or name.startswith("decoder.transpconvs.")]
    assert decoder and not all(torch.equal(network.state_dict()[name], saved[name]) for name in decoder)
    load_pretrained_weights(network, str(exported))
    state = network.state_dict()
    assert {name for name in state if name.startswith("encoder.")} == set(encoder)
    assert all(torch.equal(state[name], tensor) and torch.equal(state[f"decoder.{name}"], tensor)
               for name, tensor in encoder.items())
    assert all(torch.equal(state[name], saved[name]) for name in decoder)
    assert not any(".seg_layers." in name for name in saved)  # the task's own: nnU-Net never loads them


def test_a_phantom_task_becomes_an_nnunet_raw_dataset_that_nnunet_plans(planned):
    assert planned.raw.name == "Dataset501_phantom-seg"
    cases = sorted(path.name for path in (planned.raw / "labelsTr").iterdir())
    assert cases == [f"phantom_{index:04d}.nii.gz" for index in range(5)]  # training and validation entries
    assert sorted(path.name for path in (planned.raw / "imagesTr").iterdir()) == [
        case.replace(".nii.gz", "_0000.nii.gz") for case in cases]
    described = json.loads((planned.raw / "dataset.json").read_text())
    assert described["channel_names"] == {"0": "CT"} and described["numTraining"] == 5
    assert described["labels"]["background"] == 0 and described["labels"]["liver"] == 1
    plan = json.loads(planned.plans.read_text())
    architecture = plan["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"].endswith("ResidualEncoderUNet")
    assert architecture["arch_kwargs"]["features_per_stage"] == [32, 64, 128]


def test_an_encoder_of_the_plans_architecture_loads_through_nnunets_loader(planned, tmp_path, capsys):
    encoder = pretraining_run(tmp_path / "run", PLAN_ENCODER, planned.task / "manifest.json")
    out = tmp_path / "exported" / "resenc_nnunet.pt"
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "nnunet", "--plans", str(planned.plans),
                 "--configuration", "3d_fullres"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {len(encoder)} encoder tensors" in printed
    assert (f"fine-tune with: nnUNetv2_train Dataset501_phantom-seg 3d_fullres 0 -p nnUNetResEncUNetLPlans "
            f"-pretrained_weights {out}") in printed
    assert_loaded(nnunet_network(planned.plans, "3d_fullres"), out, encoder)

    # the pretraining plan travels with the weights: inside the file and in the provenance beside it
    carried = torch.load(out, weights_only=True)["voco"]
    assert carried["format"] == NNUNET_WEIGHTS_FORMAT and carried["configuration"] == "3d_fullres"
    assert carried["pretraining"]["preset"] == "ct_abdomen" and carried["backbone_spec"]["n_stages"] == 3
    assert carried["preprocessing_differences"] and all(
        f"preprocessing: {sentence}" in printed for sentence in carried["preprocessing_differences"])
    provenance = json.loads(out.with_name(out.name + ".provenance.json").read_text())
    assert provenance["pretraining"]["region_size"] == [64, 64, 64] and provenance["volumes"] == 5
    assert out.with_name(out.name + ".sha256").is_file()


def test_another_architecture_is_one_sentence_or_an_added_configuration(planned, tmp_path, capsys):
    """A tiny ResEnc (4 stages of 8-64 features) against the plan's 3 stages: the export stops naming the setting;
    with --add_configuration it writes a copy of the plans with a configuration of the encoder's architecture, which
    nnU-Net's trainer builds and loads the weights into."""
    encoder = pretraining_run(tmp_path / "run", {"name": "resenc", "size": "tiny", "in_channels": 1},
                              planned.task / "manifest.json")
    out = tmp_path / "tiny_nnunet.pt"
    original = planned.plans.read_text()
    arguments = ["export", str(tmp_path / "run"), str(out), "--format", "nnunet", "--plans", str(planned.plans)]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("voco: error: nnUNetResEncUNetLPlans.json's 3d_fullres has n_stages 3 where the "
                            "pretrained encoder has 4; export with --add_configuration 3d_fullres_voco") \
        and '--backbone \'{"name": "resenc", "size": "L", "n_stages": 3}\'' in error and error.count("\n") == 1
    assert not out.exists()

    assert main(arguments + ["--add_configuration", "3d_fullres_voco"]) == 0
    copy = planned.plans.with_name("nnUNetResEncUNetLPlans_voco.json")
    assert f"-p nnUNetResEncUNetLPlans_voco -pretrained_weights {out}" in capsys.readouterr().out
    assert planned.plans.read_text() == original  # nnU-Net's own plans stay as they were
    plan = json.loads(copy.read_text())
    added = plan["configurations"]["3d_fullres_voco"]
    assert plan["plans_name"] == "nnUNetResEncUNetLPlans_voco" and added["inherits_from"] == "3d_fullres"
    parent = plan["configurations"]["3d_fullres"]["patch_size"]
    assert all(size % 8 == 0 and abs(size - wanted) <= 4 for size, wanted in zip(added["patch_size"], parent))
    assert added["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]
    assert_loaded(nnunet_network(copy, "3d_fullres_voco"), out, encoder)


def test_the_preprocessing_differences_are_one_sentence_each(planned):
    plan = json.loads(planned.plans.read_text())
    patch = plan["configurations"]["3d_fullres"]["patch_size"]
    window = plan["foreground_intensity_properties_per_channel"]["0"]
    sentences = preprocessing_differences(plan, "3d_fullres", {"preset": "ct_abdomen", "region_size": [64, 64, 64]})
    assert len(sentences) == 3
    assert sentences[0].startswith(f"nnU-Net trains 3d_fullres on {' x '.join(map(str, patch))} patches, the encoder "
                                   "was pretrained on 64 x 64 x 64 regions: a CNN's weights fit any input size")
    assert "the encoder was pretrained at 1.5 x 1.5 x 1.5 mm (preset ct_abdomen)" in sentences[1]
    assert (f"clips channel 0 to the dataset's foreground HU [{window['percentile_00_5']:.0f}, "
            f"{window['percentile_99_5']:.0f}]") in sentences[2]
    assert "the scale and offset do not matter to an InstanceNorm'd CNN, the clipping window does (" in sentences[2]
    assert f"HU 250 to {window['percentile_99_5']:.0f} were clipped to one value in pretraining and vary now" in \
        sentences[2]
    # a run that records its plan (presets, spacing, intensity) rather than one preset says the same
    recorded = {"presets": ["ct_abdomen"], "spacing": [1.5, 1.5, 1.5],
                "intensity": {"kind": "window", "window": [-175.0, 250.0], "range": [0.0, 1.0]}}
    assert preprocessing_differences(plan, "3d_fullres", {"preset": None, "region_size": [64, 64, 64],
                                                          "plan": recorded}) == sentences
    several = preprocessing_differences(plan, "3d_fullres", {"region_size": patch, "plan": {
        **recorded, "presets": ["ct_abdomen", "ct_chest"], "spacing": None, "intensity": None}})
    assert several == ["the pretraining used the presets ct_abdomen, ct_chest, so its spacing and intensities cannot "
                       "be compared with nnU-Net's."]
    # the same patch and a preset without a window: only the spacing and the clipping remain
    sentences = preprocessing_differences(plan, "3d_fullres", {"preset": "mr_zscore", "region_size": patch})
    assert len(sentences) == 2 and "per-volume z-scores without clipping (preset mr_zscore)" in sentences[1]
    assert preprocessing_differences(plan, "3d_fullres", None)[0].startswith(
        "no pretraining.json beside the checkpoint")


def test_what_does_not_fit_is_one_sentence(planned, tmp_path, capsys):
    swin = tmp_path / "swin.pt"
    torch.save({"pretext": {"backbone.swinViT.patch_embed.proj.weight": torch.zeros(2, 1, 2, 2, 2)}}, swin)
    plain = json.loads(planned.plans.read_text())
    plain["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    plain_plans = tmp_path / "nnUNetPlans.json"
    plain_plans.write_text(json.dumps(plain))
    pretraining_run(tmp_path / "run", PLAN_ENCODER, planned.task / "manifest.json")
    run = str(tmp_path / "run")
    for arguments, sentence in (
            ([run, "x.pt", "--format", "nnunet"], "--format nnunet needs --plans"),
            ([run, "x.pt", "--plans", str(planned.plans)], "--plans, --configuration and --add_configuration are for "
                                                           "--format nnunet"),
            ([run, "x.pt", "--format", "onnx"], "unknown export format 'onnx'; use one of voco, nnunet."),
            ([str(swin), "x.pt", "--format", "nnunet", "--plans", str(planned.plans)], f"{swin} holds no ResEnc "
                                                                                       "encoder"),
            ([run, "x.pt", "--format", "nnunet", "--plans", str(planned.plans), "--configuration", "3d_lowres"],
             "nnUNetResEncUNetLPlans.json has no configuration '3d_lowres'; use one of 2d, 3d_fullres"),
            ([run, "x.pt", "--format", "nnunet", "--plans", str(plain_plans)], "nnUNetPlans.json's 3d_fullres builds "
                                                                               "a PlainConvUNet, not nnU-Net's "
                                                                               "ResidualEncoderUNet")):
        assert main(["export", *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"voco: error: {sentence}") and error.count("\n") == 1, error
    assert not Path("x.pt").exists()


def test_an_msd_folder_with_four_dimensional_images_is_split_into_channels(tmp_path, capsys):
    """An MSD task folder (TaskNN_Name: its id and name), two channels in one 4-D file, split by nnU-Net's own
    converter; a second conversion to the same id is refused."""
    import nibabel

    folder = tmp_path / "Task05_Prostate"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("prostate_00", "prostate_01"):
        nibabel.save(nibabel.Nifti1Image(rng.normal(size=(6, 5, 4, 2)).astype(np.float32), np.eye(4)),
                     folder / "imagesTr" / f"{case}.nii.gz")
        nibabel.save(nibabel.Nifti1Image((rng.random((6, 5, 4)) > 0.5).astype(np.uint8), np.eye(4)),
                     folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ"},
        "training": [{"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
                     for case in ("prostate_00", "prostate_01")], "test": []}))
    assert main(["nnunet_raw", str(folder), str(tmp_path / "raw")]) == 0
    target = tmp_path / "raw" / "Dataset005_Prostate"
    assert f"wrote {target}; plan it with: nnUNetv2_plan_and_preprocess -d 5 -pl nnUNetPlannerResEncL" in \
        capsys.readouterr().out
    assert sorted(path.name for path in (target / "imagesTr").iterdir()) == [
        "prostate_00_0000.nii.gz", "prostate_00_0001.nii.gz", "prostate_01_0000.nii.gz", "prostate_01_0001.nii.gz"]
    described = json.loads((target / "dataset.json").read_text())
    assert described["channel_names"] == {"0": "T2", "1": "ADC"} and described["labels"] == {"background": 0, "PZ": 1}
    first = nibabel.load(target / "imagesTr" / "prostate_00_0001.nii.gz").get_fdata()
    assert np.allclose(first, nibabel.load(folder / "imagesTr" / "prostate_00.nii.gz").get_fdata()[..., 1])
    with pytest.raises(ConfigError, match=r"already holds dataset 5 \(Dataset005_Prostate\); remove it or give "
                                          r"another --dataset_id"):
        decathlon_to_nnunet_raw(folder, tmp_path / "raw")
    (folder / "dataset.json").rename(tmp_path / "mine.json")
    with pytest.raises(ConfigError, match=r"is not an MSD folder name \(TaskNN_Name\), so its nnU-Net dataset id is "
                                          r"unknown; give one with --dataset_id"):
        decathlon_to_nnunet_raw(tmp_path / "mine.json", tmp_path / "raw")
