"""The downstream task registry: every row against the reference spec, validation, look-ups, dataset checks and
the phantom tasks."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest

from voco.benchmark.phantom_tasks import prepare_phantom_task
from voco.benchmark.checks import check_task_dataset
from voco.benchmark.registry import (DEFAULT_REGISTRY, Task, format_task_table, get_task, load_registry,
                                     reference_number, task_rows, validate_registry)
from voco.data.phantoms import PHANTOM_CLASSES
from voco.errors import ConfigError, ManifestError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_CANDIDATES = [os.environ.get("VOCO_SHARED_SPECS"), REPO_ROOT.parent / "shared" / "specs"]
SPEC_FILE = next((Path(folder) / "downstream_tasks_reference.json" for folder in SPEC_CANDIDATES
                  if folder and (Path(folder) / "downstream_tasks_reference.json").is_file()), None)
PHANTOM_IDS = ("phantom-seg", "phantom-cls", "phantom-reg")
SMALL = {"shape_range": [[40, 48], [40, 48], [20, 24]]}


@pytest.fixture(scope="module")
def registry() -> dict[str, Task]:
    return load_registry()


@pytest.fixture(scope="module")
def spec_rows() -> list[dict]:
    if SPEC_FILE is None:
        pytest.skip("the reference spec is absent: set VOCO_SHARED_SPECS or put it at ../shared/specs")
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


@pytest.fixture()
def registry_document() -> dict:
    return json.loads(DEFAULT_REGISTRY.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# The shipped registry against the reference


def test_registry_holds_every_reference_task_and_the_phantom_tasks(registry, spec_rows):
    assert list(registry) == [row["id"] for row in spec_rows] + list(PHANTOM_IDS)
    assert len(spec_rows) == 51
    kinds = [task.task_type for task in registry.values() if not task.provenance.get("synthetic")]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "segmentation": 44, "classification": 2, "registration": 2, "vision-language": 3}


def test_every_reference_row_is_carried_over_exactly(registry, spec_rows):
    for row in spec_rows:
        task = registry[row["id"]]
        where = row["id"]
        assert (task.dataset, task.task_type, task.body_region) == (row["dataset"], row["task_type"],
                                                                     row["body_region"]), where
        assert task.modality == {"MRI": "MR"}.get(row["modality"], row["modality"]), where
        assert task.num_classes == (row["num_classes"] or 0), where
        if row["class_names"] is not None:
            assert task.class_names == tuple(row["class_names"]), where
        elif row["num_classes"]:  # names the reference does not give are numbered, and say so
            assert task.class_names == tuple(f"label_{k}" for k in range(1, row["num_classes"] + 1)), where
            assert "class_names" in task.provenance["voco_choices"], where
        assert task.roi_size == (tuple(row["roi_size"]) if row["roi_size"] else None), where
        assert task.spacing == (tuple(row["target_spacing"]) if row["target_spacing"] else None), where
        assert task.in_channels == row["in_channels"], where
        expected_out = {"registration": 3, "vision-language": None}.get(row["task_type"], row["out_channels"])
        assert task.out_channels == expected_out, where

        intensity = row["intensity"]
        if row["task_type"] == "registration":  # the reference's volumes come scaled already
            assert row["intensity"] is None and task.intensity.kind == "none", where
        elif intensity is None:
            assert task.intensity is None, where
        elif intensity["transform"] == "ScaleIntensityRanged":
            assert (task.intensity.kind, task.intensity.a_min, task.intensity.a_max, task.intensity.b_min,
                    task.intensity.b_max, task.intensity.clip) == ("window", intensity["a_min"], intensity["a_max"],
                                                                   intensity["b_min"], intensity["b_max"],
                                                                   intensity["clip"]), where
        elif intensity["transform"] == "NormalizeIntensityd":
            assert (task.intensity.kind, task.intensity.nonzero, task.intensity.channel_wise) == (
                "zscore", intensity["nonzero"], intensity["channel_wise"]), where
        else:  # free text: our MONAI equivalent, with the original words in the notes
            assert task.intensity.kind == "window" and "intensity" in task.provenance["voco_choices"], where
            assert any(intensity["transform"] in note for note in task.notes), where

        if row["main_py_json_list"]:
            assert task.datalist_file == os.path.normpath(row["main_py_json_list"]), where
        assert task.provenance["split"] == {"method": row["split_method"], "n_train": row["n_train"],
                                            "n_val": row["n_val"], "n_test_listed": row["n_test_listed"]}, where

        reported = row["readme_reported_results"]
        if reported is None:
            assert task.reference_results is None, where
        else:
            assert task.reference_results == {
                "source": reported["source"], "metric": reported["metric"],
                "values": {key: value for key, value in reported.items() if key not in ("source", "metric")}}, where

        for flag in ("in_downstream_readme_head", "in_downstream_readme_2024_10", "inferred_fields", "sources"):
            assert task.provenance[flag] == row[flag], (where, flag)
        assert task.provenance["reference_metric"] == row["metric"], where
        assert set(row["notes"]) <= set(task.notes), where
        incomplete = any(row[key] is None for key in ("roi_size", "in_channels", "out_channels", "intensity"))
        runs_in_voco = row["id"] in ("ct-rate-vocab-cls", "ct-rate-retrieval")  # voco.benchmark.vision_language
        if not runs_in_voco and ((incomplete and row["task_type"] != "registration")
                                 or row["task_type"] == "vision-language"):
            assert not task.runnable and any(note.startswith("not runnable") or "language-image" in note
                                             for note in task.notes), where
    for task_id in ("flare23", "verse20", "autopet-ii23"):
        assert not registry[task_id].runnable
    assert registry["btcv"].runnable and registry["msd-task09-spleen"].runnable


def test_registration_and_vision_language_rows_follow_the_brief(registry):
    for task_id, classes in (("ixi", 30), ("oasis", 35)):
        task = registry[task_id]
        assert (task.in_channels, task.out_channels, task.roi_size) == (2, 3, (160, 192, 224))
        assert task.class_names[0] == "label_1" and task.num_classes == classes
        assert any("placeholders" in note for note in task.notes)
        assert task.runnable and task.datalist_file == f"{task_id}.json"
        assert {"class_names", "out_channels", "intensity", "datalist.file"} <= set(task.provenance["voco_choices"])
    report_generation = registry["ctrg-chest-report-gen"]
    assert report_generation.task_type == "vision-language" and not report_generation.runnable
    assert "run by the language-image issue" in report_generation.notes
    for task_id in ("ct-rate-vocab-cls", "ct-rate-retrieval"):  # the CT-RATE layout: no datalist file
        task = registry[task_id]
        assert task.task_type == "vision-language" and task.runnable and task.datalist_file is None
        assert any(note.startswith("run by voco.benchmark.vision_language") for note in task.notes)
        assert (task.intensity.a_min, task.intensity.a_max, task.intensity.b_min) == (-1000.0, 200.0, 0.0)


def test_phantom_tasks_match_the_phantom_generator(registry):
    segmentation, classification = registry["phantom-seg"], registry["phantom-cls"]
    assert segmentation.class_names == tuple(PHANTOM_CLASSES[index] for index in range(1, len(PHANTOM_CLASSES)))
    assert (segmentation.out_channels, segmentation.roi_size, segmentation.spacing) == (12, (64, 64, 32),
                                                                                        (1.5, 1.5, 1.5))
    assert (segmentation.intensity.kind, segmentation.intensity.a_min, segmentation.intensity.a_max) == (
        "window", -175.0, 250.0)
    assert classification.task_type == "classification" and classification.out_channels == 1
    assert classification.metrics == ("AUC", "ACC") and classification.roi_size == (64, 64, 32)
    for task in (segmentation, classification):
        assert task.runnable and task.provenance["synthetic"] is True and task.reference_results is None


def test_reference_number_gives_the_best_or_a_named_method(registry):
    assert reference_number(registry["btcv"]) == 86.64
    assert reference_number(registry["btcv"], "baseline") == 82.79  # the README writes "Baseline" here
    assert reference_number(registry["totalsegmentator"], "VoCo-B") == 84.84
    assert reference_number(registry["btcv"], "VoCo-B") is None
    assert reference_number(registry["word"]) is None


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _break(document: dict, task_id: str, change) -> tuple[dict, int]:
    broken = copy.deepcopy(document)
    index = next(i for i, entry in enumerate(broken["tasks"]) if entry["id"] == task_id)
    change(broken["tasks"][index])
    return broken, index


@pytest.mark.parametrize("task_id, change, field", [
    ("btcv", lambda e: e.update(task_type="detection"), "task_type"),
    ("btcv", lambda e: e.pop("roi_size"), "roi_size"),
    ("btcv", lambda e: e.update(in_channels="1"), "in_channels"),
    ("btcv", lambda e: e.update(in_channels=True), "in_channels"),
    ("btcv", lambda e: e.update(roi_size=[96, 96]), "roi_size"),
    ("btcv", lambda e: e.update(spacing=[1.5, 0, 1.5]), "spacing"),
    ("btcv", lambda e: e.update(out_channels=13), "out_channels"),
    ("btcv", lambda e: e.update(roi=[96, 96, 96]), "roi"),
    ("btcv", lambda e: e["intensity"].update(kind="histogram"), "intensity.kind"),
    ("btcv", lambda e: e["intensity"].pop("a_max"), "intensity.a_max"),
    ("btcv", lambda e: e["reference_results"]["values"].update({"VoCo-B": "86.6"}), "reference_results.values"),
    ("luna16-ncc", lambda e: e.update(out_channels=3), "out_channels"),
    ("ixi", lambda e: e.update(out_channels=2), "out_channels"),
    ("flare23", lambda e: e.update(runnable=True), "in_channels"),
    ("msd-task09-spleen", lambda e: e["datalist"].update(file=None), "datalist.file"),
])
def test_a_bad_entry_gives_a_manifest_error_naming_the_entry_and_field(registry_document, task_id, change, field):
    broken, index = _break(registry_document, task_id, change)
    with pytest.raises(ManifestError) as caught:
        validate_registry(broken, source="tasks.json")
    message = str(caught.value)
    assert f"tasks.json: tasks[{index}] ({task_id})" in message and f"'{field}" in message


def test_a_repeated_id_and_a_wrong_format_or_version_are_refused(registry_document, tmp_path):
    repeated = copy.deepcopy(registry_document)
    repeated["tasks"].append(copy.deepcopy(repeated["tasks"][0]))
    with pytest.raises(ManifestError, match=r"tasks\[54\] \(btcv\) repeats the task id"):
        validate_registry(repeated, source="tasks.json")
    for key, value, words in (("format", "voco-manifest", "not a voco task registry"), ("version", 2, "version 2")):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**registry_document, key: value}))
        with pytest.raises(ManifestError, match=words):
            load_registry(path)
    (tmp_path / "broken.json").write_text("{\"format\": ")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_registry(tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------------------------------
# Look-ups and the listing


def test_get_task_finds_ids_regardless_of_case_and_suggests_close_ones(registry):
    assert get_task("btcv", registry).id == "btcv"
    assert get_task("BTCV", registry).id == "btcv"
    with pytest.raises(ConfigError, match="did you mean 'msd-task09-spleen'"):
        get_task("msd-task09-spleem", registry)
    with pytest.raises(ConfigError, match="'btcv'"):
        get_task("btvc", registry)
    with pytest.raises(ConfigError, match="no downstream task 'knee-mri'.*`voco benchmark list` shows all 54"):
        get_task("knee-mri", registry)


def test_task_rows_filter_by_type_and_modality_and_the_table_shows_them(registry):
    registration = task_rows(task_type="registration", registry=registry)
    assert [row["id"] for row in registration] == ["ixi", "oasis", "phantom-reg"]
    magnetic_resonance = task_rows(modality="MRI", registry=registry)
    assert magnetic_resonance == task_rows(modality="mr", registry=registry)
    assert len(magnetic_resonance) == 11 and {row["modality"] for row in magnetic_resonance} == {"MR"}
    both = task_rows(task_type="classification", modality="CT", registry=registry)
    assert [row["id"] for row in both] == ["cc-ccii", "luna16-ncc", "phantom-cls"]
    assert len(task_rows(registry=registry)) == 54
    with pytest.raises(ConfigError, match="task type 'detection'"):
        task_rows(task_type="detection", registry=registry)

    btcv = next(row for row in task_rows(registry=registry) if row["id"] == "btcv")
    assert btcv == {"id": "btcv", "type": "segmentation", "modality": "CT", "classes": 13, "roi": [96, 96, 96],
                    "spacing": [1.5, 1.5, 1.5], "metric": "Dice", "reference": 86.64, "runnable": True}
    lines = format_task_table(task_rows(task_type="classification", registry=registry)).splitlines()
    assert lines[0].split() == ["id", "type", "modality", "classes", "roi", "spacing", "metric", "reference",
                                "runnable"]
    assert lines[2].split() == ["cc-ccii", "classification", "CT", "3", "-", "native", "ACC", "-", "no"]
    assert lines[3].split() == ["luna16-ncc", "classification", "CT", "2", "64×64×64", "native", "AUC", "-", "yes"]
    assert lines[-1] == "3 tasks, 2 runnable"
    assert format_task_table([]) == "no tasks match"


# ---------------------------------------------------------------------------------------------------------------
# Checking a dataset folder


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))


def _spleen_folder(root: Path) -> Path:
    """A tiny copy of the MSD Task09 layout: two cases in training, one in validation, the registry's datalist."""
    entries = []
    for case in (1, 2, 3):
        image = np.random.default_rng(case).normal(0, 100, (10, 9, 6)).astype(np.int16)
        label = np.zeros((10, 9, 6), np.uint8)
        label[3:6, 3:6, 2:4] = 1
        _save(root / "imagesTr" / f"spleen_{case}.nii.gz", image)
        _save(root / "labelsTr" / f"spleen_{case}.nii.gz", label)
        entries.append({"image": f"imagesTr/spleen_{case}.nii.gz", "label": f"labelsTr/spleen_{case}.nii.gz"})
    (root / "spleen.json").write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    return root


def test_a_well_formed_task_folder_passes_the_check(registry, tmp_path):
    task = registry["msd-task09-spleen"]
    assert task.datalist_file == "spleen.json"
    rows = check_task_dataset(task, _spleen_folder(tmp_path / "Task09_Spleen"))
    assert rows == [] and rows.scans == 3


def test_the_check_reports_each_problem_with_its_path(registry, tmp_path):
    task = registry["msd-task09-spleen"]
    root = _spleen_folder(tmp_path / "Task09_Spleen")
    (root / "imagesTr" / "spleen_1.nii.gz").unlink()
    out_of_range = np.zeros((10, 9, 6), np.uint8)
    out_of_range[0, 0, 0] = 3
    _save(root / "labelsTr" / "spleen_2.nii.gz", out_of_range)
    _save(root / "labelsTr" / "spleen_3.nii.gz", np.zeros((10, 9, 5), np.uint8))

    rows = check_task_dataset(task, root)
    by_entry = {row["entry"]: row for row in rows}
    assert len(rows) == 3 and set(by_entry) == {"training[0]", "training[1]", "validation[0]"}
    assert by_entry["training[0]"]["path"] == str(root / "imagesTr" / "spleen_1.nii.gz")
    assert "does not exist" in by_entry["training[0]"]["problem"]
    assert by_entry["training[1]"]["path"] == str(root / "labelsTr" / "spleen_2.nii.gz")
    assert "label values 3, outside 0..1" in by_entry["training[1]"]["problem"]
    assert by_entry["validation[0]"]["path"] == str(root / "labelsTr" / "spleen_3.nii.gz")
    assert "[10, 9, 5] but its image has [10, 9, 6]" in by_entry["validation[0]"]["problem"]
    # Without reading voxels, label values are not looked at.
    assert {row["entry"] for row in check_task_dataset(task, root, read_voxels=False)} == {"training[0]",
                                                                                           "validation[0]"}

    (root / "spleen.json").unlink()
    rows = check_task_dataset(task, root)
    assert [(row["entry"], row["path"]) for row in rows] == [("datalist", str(root / "spleen.json"))]
    assert "does not exist" in rows[0]["problem"]
    (root / "other.json").write_text("[1, 2")
    rows = check_task_dataset(task, root, datalist="other.json")
    assert rows[0]["path"] == str(root / "other.json") and "cannot be read as JSON" in rows[0]["problem"]
    rows = check_task_dataset(registry["flare23"], root)
    assert rows[0]["entry"] == "datalist" and "names no datalist file" in rows[0]["problem"]


def test_multichannel_images_and_remapped_labels_are_judged_by_the_task(registry, tmp_path):
    brain = registry["msd-task01-brain-tumour"]  # MSD stores the four MR sequences in one 4-D file
    _save(tmp_path / "BRATS_001.nii.gz", np.zeros((8, 8, 6, 4), np.float32))
    _save(tmp_path / "BRATS_001_label.nii.gz", np.full((8, 8, 6), 3, np.uint8))
    _save(tmp_path / "BRATS_002.nii.gz", np.zeros((8, 8, 6, 2), np.float32))
    _save(tmp_path / "BRATS_002_label.nii.gz", np.zeros((8, 8, 6), np.uint8))
    (tmp_path / "brats.json").write_text(json.dumps({"training": [
        {"image": "BRATS_001.nii.gz", "label": "BRATS_001_label.nii.gz"},
        {"image": "BRATS_002.nii.gz", "label": "BRATS_002_label.nii.gz"}]}))
    rows = check_task_dataset(brain, tmp_path)
    assert [(row["entry"], Path(row["path"]).name) for row in rows] == [("training[1]", "BRATS_002.nii.gz")]
    assert "2 channels" in rows[0]["problem"]

    heart = registry["mm-whs-ct"]  # raw MM-WHS codes, which the reference maps to 1..7
    raw = np.zeros((8, 8, 6), np.int16)
    raw[1, 1, 1], raw[2, 2, 2], raw[3, 3, 3] = 205, 850, 4
    _save(tmp_path / "ct_1001_image.nii.gz", np.zeros((8, 8, 6), np.int16))
    _save(tmp_path / "ct_1001_label.nii.gz", raw)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": "ct_1001_image.nii.gz", "label": "ct_1001_label.nii.gz"}]}))
    rows = check_task_dataset(heart, tmp_path)
    assert len(rows) == 1 and "label values 4, outside 0 and the raw values 205" in rows[0]["problem"]


def test_registration_pairs_are_checked_image_by_image(registry, tmp_path):
    task = registry["ixi"]
    _save(tmp_path / "atlas.nii.gz", np.zeros((8, 8, 6), np.float32))
    _save(tmp_path / "atlas_seg.nii.gz", np.full((8, 8, 6), 41, np.uint8))  # FreeSurfer ids: no range check
    _save(tmp_path / "subject_1.nii.gz", np.zeros((8, 8, 6), np.float32))
    _save(tmp_path / "subject_1_seg.nii.gz", np.zeros((8, 7, 6), np.uint8))
    pair = {"moving_image": "atlas.nii.gz", "moving_label": "atlas_seg.nii.gz"}
    (tmp_path / "ixi.json").write_text(json.dumps({
        "training": [{**pair, "fixed_image": "subject_1.nii.gz"}],
        "validation": [{**pair, "fixed_image": "subject_2.nii.gz"},
                       {**pair, "fixed_image": "subject_1.nii.gz", "fixed_label": "subject_1_seg.nii.gz"}]}))
    rows = check_task_dataset(task, tmp_path)
    assert [(row["entry"], Path(row["path"]).name) for row in rows] == [
        ("validation[0]", "subject_2.nii.gz"), ("validation[1]", "subject_1_seg.nii.gz")]
    assert "does not exist" in rows[0]["problem"] and "[8, 7, 6] but its image has [8, 8, 6]" in rows[1]["problem"]


# ---------------------------------------------------------------------------------------------------------------
# The phantom tasks


def test_prepared_phantom_tasks_pass_the_check(registry, tmp_path):
    dataset_dir = tmp_path / "phantom_tasks"
    for task_id in PHANTOM_IDS:
        assert prepare_phantom_task(task_id, dataset_dir, n=6, n_validation=2, seed=3, **SMALL) == dataset_dir
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    attributes = [scan["attributes"] for dataset in manifest["datasets"] for subject in dataset["subjects"]
                  for study in subject["studies"] for scan in study["scans"]]

    segmentation = json.loads((dataset_dir / "phantom_seg.json").read_text())
    assert (len(segmentation["training"]), len(segmentation["validation"])) == (4, 2)
    first = segmentation["training"][0]
    assert first == {"image": "images/phantom_0000.nii.gz", "label": "labels/phantom_0000.nii.gz"}
    assert segmentation["labels"]["11"] == "lesion"

    classification = json.loads((dataset_dir / "phantom_cls.json").read_text())
    entries = classification["training"] + classification["validation"]
    assert sorted(entry["image"] for entry in entries) == [f"images/phantom_{i:04d}.nii.gz" for i in range(6)]
    lesion = {f"images/phantom_{i:04d}.nii.gz": int(facts["lesion"]) for i, facts in enumerate(attributes)}
    assert all(entry["label"] == lesion[entry["image"]] for entry in entries)
    assert 0 < sum(lesion.values()) < 6  # seed 3 gives both classes, so validation holds one of each
    assert sorted(entry["label"] for entry in classification["validation"]) == [0, 1]

    registration = json.loads((dataset_dir / "phantom_reg.json").read_text())
    assert (len(registration["training"]), len(registration["validation"])) == (3, 2)
    assert registration["validation"][-1] == {  # phantom 0 is the atlas, moved onto every other phantom
        "moving_image": "images/phantom_0000.nii.gz", "fixed_image": "images/phantom_0005.nii.gz",
        "moving_label": "labels/phantom_0000.nii.gz", "fixed_label": "labels/phantom_0005.nii.gz"}

    for task_id in PHANTOM_IDS:
        rows = check_task_dataset(registry[task_id], dataset_dir)
        assert rows == [] and rows.scans == (5 if task_id == "phantom-reg" else 6), rows  # reg: 5 atlas pairs

    image = "images/phantom_0000.nii.gz"
    (dataset_dir / "bad_labels.json").write_text(json.dumps({"training": [
        {"image": image, "label": 2}, {"image": image, "label": True}, {"image": image},
        {"image": image, "label": [0, 1]}]}))  # the last: a 0/1 value per class is a multi-label target
    rows = check_task_dataset(registry["phantom-cls"], dataset_dir, datalist="bad_labels.json")
    assert [row["entry"] for row in rows] == ["training[0]", "training[1]", "training[2]"]
    assert "is 2, outside 0..1" in rows[0]["problem"] and rows[0]["path"] == str(dataset_dir / image)


def test_prepare_phantom_task_refuses_real_tasks_and_bad_splits(tmp_path):
    with pytest.raises(ConfigError, match="btcv is not a synthetic phantom task"):
        prepare_phantom_task("btcv", tmp_path / "x")
    with pytest.raises(ConfigError, match="n_validation is 4 for n=4"):
        prepare_phantom_task("phantom-seg", tmp_path / "x", n=4, n_validation=4)
    assert not (tmp_path / "x").exists()
