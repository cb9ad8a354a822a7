"""The preprocessing plan travels with the weights: written into pretraining.json and the export's provenance, read
back from a run's checkpoint, an export or a checkpoint dict, used as the fine-tuning's default (network and
preprocessing), overridden by explicit settings, and every difference named in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from voco.benchmark.pretrained_plan import (network_settings, planned_task, preprocessing_differences,
                                            task_preset)
from voco.checkpoints.plan import PLAN_KEY, full_backbone_spec, plan_differences, pretraining_plan, read_plan
from voco.checkpoints.provenance import read_provenance, write_provenance

VIT = {"name": "vit", "size": "tiny", "in_channels": 1, "input_size": [32, 32, 32], "patch_size": 16,
       "layout": "window", "window_size": 2, "input_standardise": [0.5, 0.125], "use_checkpoint": True}


def write_manifest(folder, preset: str | None = None) -> str:
    """A manifest of two CT scans (the files need not exist: the plan reads only what the manifest says)."""
    from voco.data.manifest import manifest_from_records, save_manifest

    records = [{"dataset": "ct", "subject": str(i), "study": "0", "scan": {"image": f"scan{i}.nii.gz"}}
               for i in range(2)]
    return str(save_manifest(manifest_from_records(records, "ct", preset=preset), folder / "manifest.json"))


def facts_of(folder, backbone=VIT, preset=None, manifest_preset=None) -> dict:
    """What a pretraining bundle passes to prepare_run."""
    return {"manifest": write_manifest(folder, manifest_preset), "dataset_dir": None, "preset": preset,
            "region_size": [64, 64, 64], "backbone": dict(backbone), "channels": None}


def test_prepare_run_writes_the_plan_into_pretraining_json(tmp_path):
    from voco.engine import prepare_run
    from voco.networks import build_backbone

    run = prepare_run(tmp_path / "run", "", "unused", lock=False, facts=facts_of(tmp_path, manifest_preset="ct_chest"))
    recorded = json.loads((run / "pretraining.json").read_text())
    plan = recorded[PLAN_KEY]
    assert plan["presets"] == ["ct_chest"]  # the manifest's own preset, as the region pipeline takes it
    assert plan["spacing"] == [1.25, 1.25, 5.0]
    assert plan["intensity"] == {"kind": "window", "window": [-1000.0, 500.0], "range": [0.0, 1.0]}
    assert plan["region_size"] == [64, 64, 64]
    backbone = plan["backbone"]
    assert backbone["input_standardise"] == [0.5, 0.125] and backbone["hidden_size"] == 96
    assert backbone["position_embedding"] == "sincos" and "use_checkpoint" not in backbone  # defaults filled in
    rebuilt = build_backbone(**backbone)  # the spec in full rebuilds the pretrained encoder
    assert rebuilt.input_standardise == (0.5, 0.125) and rebuilt.groupings[0] == "window"
    assert set(recorded) - {PLAN_KEY} == {"manifest", "dataset_dir", "preset", "region_size", "backbone", "channels"}


def test_the_export_carries_the_plan_and_the_export_alone_gives_it_back(tmp_path):
    facts = facts_of(tmp_path, preset="ct_abdomen")
    encoder = tmp_path / "export" / "encoder.pt"
    encoder.parent.mkdir()
    torch.save({"patch_embedding.patch_embeddings.weight": torch.zeros(1)}, encoder)
    write_provenance(encoder, {**facts, PLAN_KEY: pretraining_plan(facts)})
    provenance = read_provenance(encoder)
    assert provenance["pretraining"][PLAN_KEY]["presets"] == ["ct_abdomen"]
    plan = read_plan(encoder)  # no run folder here: the provenance alone
    assert plan == provenance["pretraining"][PLAN_KEY]
    assert plan["spacing"] == [1.5, 1.5, 1.5] and plan["backbone"]["layout"] == "window"
    # the facts of a run of an older voco (no plan): the export makes the plan they imply
    older = tmp_path / "older.pt"
    torch.save({}, older)
    write_provenance(older, facts)
    assert read_plan(older) == plan
    # the manifest gone by export time: the plan still travels, the fingerprints do not (no leakage check)
    Path(facts["manifest"]).unlink()
    moved = tmp_path / "moved.pt"
    torch.save({}, moved)
    write_provenance(moved, {**facts, PLAN_KEY: plan})
    provenance = read_provenance(moved)
    assert read_plan(moved) == plan and provenance["fingerprints"] is None and provenance["volumes"] is None
    assert facts["manifest"] in provenance["no_fingerprints"]


def test_a_plan_is_read_from_a_runs_checkpoint_and_from_a_checkpoint_dict(tmp_path):
    from voco.engine import prepare_run

    run = prepare_run(tmp_path / "run", "", "unused", lock=False, facts=facts_of(tmp_path))
    (run / "checkpoints").mkdir()
    checkpoint = run / "checkpoints" / "checkpoint_final.pt"
    torch.save({"pretext": {"backbone.norm.weight": torch.ones(2)}, "backbone_spec": {**VIT, "pretext": "mae"}},
               checkpoint)
    assert read_plan(checkpoint)["presets"] == ["ct_abdomen"]  # the modality's default preset of the manifest
    # a checkpoint without its run folder: the backbone alone, and one sentence saying that
    alone = read_plan({"backbone_spec": {**VIT, "pretext": "mae"}})
    assert alone["backbone"] == full_backbone_spec(VIT) and alone["presets"] == [] and alone["pretext"] == "mae"
    (sentence,) = plan_differences(alone, {}, source="checkpoint_final")
    assert sentence.startswith("checkpoint_final carries its backbone but not its preprocessing")
    assert read_plan("scratch") is None and read_plan({"swinViT.x": torch.zeros(1)}) is None


def test_network_settings_default_to_the_plan_and_explicit_settings_win():
    plan = {"backbone": full_backbone_spec(VIT)}
    chosen = network_settings(plan)
    assert (chosen["backbone"], chosen["size"], chosen["vit_layout"], chosen["vit_window_size"]) == (
        "vit", "tiny", "window", 2)
    assert chosen["backbone_options"]["input_standardise"] == [0.5, 0.125]
    assert "input_size" not in chosen["backbone_options"]  # the task's roi decides
    overridden = network_settings(plan, vit_layout="global", backbone_options={"input_standardise": None})
    assert overridden["vit_layout"] == "global" and overridden["backbone_options"]["input_standardise"] is None
    # another backbone or size is another encoder: nothing of the plan, the defaults
    assert network_settings(plan, backbone="swin") == {"backbone": "swin", "size": "B", "window_size": 7,
                                                      "vit_layout": "global", "vit_window_size": 3,
                                                      "vit_position_embedding": "sincos", "backbone_options": {}}
    assert network_settings(plan, size="B")["backbone_options"] == {}
    resenc = network_settings({"backbone": full_backbone_spec({"name": "resenc", "size": "tiny", "n_stages": 3})})
    assert (resenc["size"], resenc["backbone_options"]["n_stages"]) == ("tiny", 3)
    assert network_settings(None, backbone="resenc")["size"] == "L"


def test_the_vit_network_is_built_with_the_plans_input_standardise():
    from voco.benchmark.networks import build_task_network
    from voco.benchmark.registry import get_task
    from voco.errors import ConfigError

    settings = network_settings({"backbone": full_backbone_spec(VIT)})
    network = build_task_network(get_task("phantom-cls"), **settings)
    assert network.encoder.input_standardise == (0.5, 0.125) and network.encoder.groupings[0] == "window"
    settings["backbone_options"]["patch_size"] = 8
    with pytest.raises(ConfigError, match="UNETR takes a ViT of patch 16, and this encoder was pretrained with "
                                          "patch 8; fine-tune it on a classification task"):
        build_task_network(get_task("phantom-seg"), **settings)


def plan_of(preset: str, region_size=(64, 64, 64)) -> dict:
    return pretraining_plan({"preset": preset, "region_size": list(region_size), "backbone": {"name": "swin"}})


def test_the_task_is_preprocessed_as_pretrained_where_it_allows_and_as_told_otherwise():
    assert task_preset("phantom-seg", plan_of("ct_chest")) == "ct_chest"
    task = planned_task("phantom-seg", "ct_chest")
    assert task.spacing == (1.25, 1.25, 5.0) and (task.intensity.a_min, task.intensity.a_max) == (-1000.0, 500.0)
    assert task_preset("phantom-seg", plan_of("ct_chest"), "ct_abdomen") == "ct_abdomen"  # explicit wins
    assert task_preset("phantom-seg", plan_of("ct_chest"), "task") == "task"  # the task's own, explicitly
    assert task_preset("phantom-seg", plan_of("mr_zscore")) == "task"  # an MRI z-score does not fit a CT window
    assert task_preset("phantom-seg", plan_of("ct_resize")) == "task"  # no spacing to resample a label map to
    assert task_preset("phantom-seg", None) == "task"
    assert planned_task("phantom-seg", "task", spacing=(2.0, 2.0, 2.0)).spacing == (2.0, 2.0, 2.0)


def test_every_difference_is_one_sentence():
    plan = plan_of("ct_abdomen")
    overridden = planned_task("phantom-seg", "ct_chest")
    sentences = preprocessing_differences(plan, overridden, "ct_chest", {}, "runs/x/encoder.pt")
    assert sentences == [
        "pretrained on ct_abdomen intensities HU [-175, 250] -> [0, 1], fine-tuning uses HU [-1000, 500] -> [0, 1] "
        "(ct_chest)",
        "pretrained at 1.5 x 1.5 x 1.5 mm (ct_abdomen), fine-tuning resamples to 1.25 x 1.25 x 5 mm (ct_chest)",
        "pretrained on regions of 64 x 64 x 64 voxels, fine-tuning's roi is 64 x 64 x 32"]
    same = preprocessing_differences(plan_of("ct_abdomen", (64, 64, 32)), planned_task("phantom-seg", "ct_abdomen"),
                                     "ct_abdomen", {}, "encoder.pt")
    assert same == [] and preprocessing_differences(plan, overridden, "ct_chest", {}, "scratch") == []
    standardised = {**plan_of("ct_abdomen", (64, 64, 32)), "backbone": full_backbone_spec(VIT)}
    (sentence,) = preprocessing_differences(standardised, planned_task("phantom-seg", "ct_abdomen"), "ct_abdomen",
                                            {"backbone_options": {"input_standardise": None}}, "encoder.pt")
    assert sentence == ("pretrained with the encoder's input mapped to (x - 0.5) / 0.125, fine-tuning maps it as "
                        "given")
    (unknown,) = preprocessing_differences(None, overridden, "ct_chest", {}, "VoCo_B_SSL_head.pt")
    assert unknown.startswith("VoCo_B_SSL_head carries no pretraining plan")


def test_the_grid_takes_the_network_of_the_plan(tmp_path):
    from voco.benchmark.runs import plan_grid

    encoder = tmp_path / "resenc_encoder.pt"
    torch.save({"encoder.stem.convs.0.conv.weight": torch.zeros(1)}, encoder)
    facts = {"manifest": write_manifest(tmp_path), "preset": "ct_abdomen", "region_size": [64, 64, 32],
             "backbone": {"name": "resenc", "size": "tiny"}}
    write_provenance(encoder, facts)
    cells = plan_grid(["phantom-seg"], [str(encoder), "scratch"])
    assert {(cell.pretrained, cell.backbone, cell.size) for cell in cells} == {
        (str(encoder), "resenc", "tiny"), ("scratch", "resenc", "tiny")}  # scratch: the same network
    explicit = plan_grid(["phantom-seg"], ["scratch"], backbone="swin", default_size="tiny")
    assert [(cell.backbone, cell.size) for cell in explicit] == [("swin", "tiny")]


def test_the_bundle_defaults_to_the_plan_and_names_what_an_override_changes(tmp_path):
    """An exported ResEnc with only its provenance beside it: the bundle builds the ResEnc the plan names without
    --backbone, and --preset ct_chest (an override) is named against the pretraining's ct_abdomen."""
    from conftest import run_bundle_command
    from voco.networks import build_backbone

    encoder = tmp_path / "export" / "encoder.pt"
    encoder.parent.mkdir()
    torch.save(build_backbone("resenc", "tiny").state_dict(), encoder)
    write_provenance(encoder, {"manifest": write_manifest(tmp_path), "preset": "ct_abdomen",
                               "region_size": [64, 64, 32], "backbone": {"name": "resenc", "size": "tiny"}})
    result = run_bundle_command("downstream_benchmark", ["train.json", "smoke.json"], tmp_path, "--task",
                                "phantom-cls", "--size", "None", "--pretrained", str(encoder), "--preset", "ct_chest",
                                "--max_epochs", "1", "--run_name", "planned", "--mlflow", "False")
    assert "loaded 90/90 encoder tensors" in result.stdout
    assert ("pretraining plan: pretrained on ct_abdomen intensities HU [-175, 250] -> [0, 1], fine-tuning uses "
            "HU [-1000, 500] -> [0, 1] (ct_chest)") in result.stdout
    run = tmp_path / "runs" / "benchmark" / "planned"
    recorded = json.loads((run / "settings.json").read_text())
    assert (recorded["backbone"], recorded["size"], recorded["preset"]) == ("resenc", "tiny", "ct_chest")
    differences = json.loads((run / "result.json").read_text())["preprocessing_differences"]
    assert len(differences) == 2 and differences[1].startswith("pretrained at 1.5 x 1.5 x 1.5 mm (ct_abdomen)")
