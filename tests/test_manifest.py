"""Manifest schema, Decathlon JSON, datalist splits, the example manifests and the PreCT-160K catalogue."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from voco.data.catalogue import load_catalogue
from voco.data.manifest import (load_manifest, manifest_from_records, save_manifest, split_datalist,
                                to_datalist)
from voco.data.presets import PRESETS
from voco.errors import ManifestError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "data_manifests" / "examples"
CATALOGUE_SPEC = REPO_ROOT.parent / "shared" / "specs" / "preCT160k_reference.json"

RECORDS = [
    {"dataset": "BTCV", "subject": "0001", "study": "baseline", "report": "no acute findings",
     "scan": {"image": "btcv/img0001.nii.gz", "label": "btcv/label0001.nii.gz", "shape": [512, 512, 90],
              "spacing": [0.8, 0.8, 2.5], "orientation": "LPS"}},
    {"dataset": "BTCV", "subject": "0001", "study": "follow_up",
     "scan": {"image": "btcv/img0001b.nii.gz", "attributes": {"lesion": True}}},
    {"dataset": "BTCV", "subject": "0002", "study": "baseline", "scan": {"image": "btcv/img0002.nii.gz"}},
    {"dataset": "Brain", "subject": "7", "study": "0",
     "scan": {"image": "brain/t1.nii.gz", "modality": "MR", "preset": "mr_zscore", "series": "1.2.3"}},
]


def test_round_trip_records_save_load_datalist(tmp_path):
    manifest = manifest_from_records(RECORDS, name="round_trip", modality="CT", description="test")
    manifest["dataset_dir"] = "../volumes"
    path = save_manifest(manifest, tmp_path / "manifests" / "m.json")
    loaded = load_manifest(path)
    assert loaded["_path"] == str(path) and loaded["datasets"] == manifest["datasets"]
    root = (tmp_path / "volumes").resolve()
    assert to_datalist(loaded) == [
        {"image": str(root / "btcv/img0001.nii.gz"), "label": str(root / "btcv/label0001.nii.gz"),
         "dataset": "BTCV", "subject": "0001", "study": "baseline", "scan_index": 0, "modality": "CT",
         "preset": "ct_abdomen", "report": "no acute findings", "shape": [512, 512, 90],
         "spacing": [0.8, 0.8, 2.5], "orientation": "LPS"},
        {"image": str(root / "btcv/img0001b.nii.gz"), "dataset": "BTCV", "subject": "0001", "study": "follow_up",
         "scan_index": 0, "modality": "CT", "preset": "ct_abdomen", "attributes": {"lesion": True}},
        {"image": str(root / "btcv/img0002.nii.gz"), "dataset": "BTCV", "subject": "0002", "study": "baseline",
         "scan_index": 0, "modality": "CT", "preset": "ct_abdomen"},
        {"image": str(root / "brain/t1.nii.gz"), "dataset": "Brain", "subject": "7", "study": "0",
         "scan_index": 0, "modality": "MR", "preset": "mr_zscore", "series": "1.2.3"},
    ]
    elsewhere = tmp_path / "moved"
    assert [entry["image"] for entry in to_datalist(loaded, dataset_dir=elsewhere, datasets=["Brain"])] == [
        str(elsewhere.resolve() / "brain/t1.nii.gz")]
    with pytest.raises(ManifestError, match="none of the datasets"):
        to_datalist(loaded, datasets=["LUNA16"])


def test_save_manifest_is_atomic(tmp_path):
    path = save_manifest(manifest_from_records(RECORDS, name="good"), tmp_path / "m.json")
    before = path.read_text(encoding="utf-8")
    broken = manifest_from_records(RECORDS, name="bad")
    broken["datasets"][0]["preset"] = "ct_brain"
    with pytest.raises(ManifestError, match="unknown preset 'ct_brain'"):
        save_manifest(broken, path)
    assert path.read_text(encoding="utf-8") == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_decathlon_json_keeps_splits_and_subjects(tmp_path):
    datalist_file = tmp_path / "task.json"
    datalist_file.write_text(json.dumps({
        "modality": {"0": "MRI"},
        "training": [{"image": "./imagesTr/hippo_001.nii.gz", "label": "./labelsTr/hippo_001.nii.gz"},
                     {"image": "./imagesTr/hippo_002.nii.gz", "label": "./labelsTr/hippo_002.nii.gz"}],
        "validation": [{"image": "./imagesTr/hippo_003.nii.gz", "label": "./labelsTr/hippo_003.nii.gz"}],
        "test": ["./imagesTs/hippo_004.nii.gz"]}), encoding="utf-8")
    datalist = to_datalist(load_manifest(datalist_file))
    assert [(e["subject"], e["split"], e["modality"], e["preset"]) for e in datalist] == [
        ("hippo_001", "training", "MR", "mr_zscore"), ("hippo_002", "training", "MR", "mr_zscore"),
        ("hippo_003", "validation", "MR", "mr_zscore"), ("hippo_004", "test", "MR", "mr_zscore")]
    assert all(e["dataset"] == "task" for e in datalist)
    assert Path(datalist[0]["image"]).resolve() == (tmp_path / "imagesTr" / "hippo_001.nii.gz").resolve()
    assert Path(datalist[0]["label"]).resolve() == (tmp_path / "labelsTr" / "hippo_001.nii.gz").resolve()
    assert "label" not in datalist[3]
    training, validation = split_datalist(datalist, validation_fraction=0.5, seed=3)
    assert [e["subject"] for e in training] == ["hippo_001", "hippo_002"]  # the file's own split wins
    assert [e["subject"] for e in validation] == ["hippo_003"]


def test_split_datalist_by_subject_and_seed():
    datalist = [{"image": f"/d/{subject}_{scan}.nii.gz", "dataset": "D", "subject": f"s{subject:02d}"}
                for subject in range(10) for scan in range(3)]
    training, validation = split_datalist(datalist, validation_fraction=0.2, seed=0)
    training_subjects = {e["subject"] for e in training}
    validation_subjects = {e["subject"] for e in validation}
    assert len(validation_subjects) == 2 and not training_subjects & validation_subjects
    assert len(training) == 24 and len(validation) == 6  # every scan of a subject stays with it
    assert split_datalist(datalist, validation_fraction=0.2, seed=0) == (training, validation)
    assert any(split_datalist(datalist, 0.2, seed=seed)[1] != validation for seed in range(1, 6))
    assert len({e["subject"] for e in split_datalist(datalist[:6], 0.01)[1]}) == 1  # at least one subject
    assert split_datalist(datalist, 0.0) == (datalist, [])
    with pytest.raises(ManifestError, match="validation_fraction is 1.0"):
        split_datalist(datalist, 1.0)


def test_a_small_manifest_keeps_a_training_batch(caplog):
    """3 subjects, validation_fraction 0.34, batch 2: one held out, not two (which would leave one volume for a batch
    of two); 3 subjects and batch 3: none held out, with a warning that validation is skipped."""
    datalist = [{"image": f"/d/{subject}.nii.gz", "dataset": "D", "subject": f"s{subject}"} for subject in range(3)]
    assert [len(part) for part in split_datalist(datalist, 0.34)] == [1, 2]  # the old rule, without a batch size
    assert [len(part) for part in split_datalist(datalist, 0.34, min_training=2)] == [2, 1]
    with caplog.at_level("WARNING", logger="voco.data.manifest"):
        training, validation = split_datalist(datalist, 0.34, min_training=3)
    assert (len(training), validation) == (3, [])
    assert "would hold out 2 of the 3 subjects" in caplog.text and "validation is skipped" in caplog.text
    marked = [dict(entry, split="validation") for entry in datalist]
    with pytest.raises(ManifestError, match="marks 0 scans for training and 3 for validation"):
        split_datalist(marked, 0.1)



def _valid() -> dict:
    manifest = manifest_from_records(RECORDS, name="valid")
    return json.loads(json.dumps(manifest))


def _set(path: str, value):
    """An edit of the valid manifest: set (or with value ... delete) the key at a dotted path."""

    def edit(manifest: dict) -> dict:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is ...:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return manifest

    return edit


BAD_MANIFESTS = {
    "missing key": (_set("datasets.0.subjects.0.studies", ...),
                    r"datasets\[0\]\.subjects\[0\] has no 'studies' key"),
    "missing image": (_set("datasets.0.subjects.1.studies.0.scans.0.image", ...),
                      r"datasets\[0\]\.subjects\[1\]\.studies\[0\]\.scans\[0\] has no 'image' key"),
    "wrong type": (_set("datasets.0.subjects", {"0001": {}}), r"datasets\[0\]\.subjects must be a list, not dict"),
    "wrong type of label": (_set("datasets.0.subjects.0.studies.0.scans.0.label", 3),
                            r"scans\[0\]\.label must be a path"),
    "short shape": (_set("datasets.0.subjects.0.studies.0.scans.0.shape", [512, 512]),
                    r"scans\[0\]\.shape is \[512, 512\], not a list of three positive numbers; fix or remove it"),
    "lettered shape": (_set("datasets.0.subjects.0.studies.0.scans.0.shape", ["a", "b", "c"]),
                       r"scans\[0\]\.shape is \['a', 'b', 'c'\], not a list of three positive numbers"),
    "negative spacing": (_set("datasets.0.subjects.0.studies.0.scans.0.spacing", [1.0, -1.0, 2.5]),
                         r"scans\[0\]\.spacing is \[1.0, -1.0, 2.5\], not a list of three positive numbers"),
    "unknown preset": (_set("datasets.0.preset", "ct_brain"), r"datasets\[0\] names the unknown preset 'ct_brain'"),
    "unknown scan preset": (_set("datasets.1.subjects.0.studies.0.scans.0.preset", "mri"),
                            r"datasets\[1\]\.subjects\[0\]\.studies\[0\]\.scans\[0\] names the unknown preset 'mri'"),
    "bad modality": (_set("datasets.1.modality", "XR"), r"datasets\[1\] has modality 'XR'"),
    "bad split": (_set("datasets.0.subjects.0.studies.0.scans.0.split", "train"), r"split is 'train'"),
    "repeated dataset": (_set("datasets.1.name", "BTCV"), r"datasets\[1\] repeats the dataset name 'BTCV'"),
    "wrong version": (_set("version", 2), r"has manifest version 2"),
    "wrong format": (_set("format", "monai-datalist"), r"is not a voco manifest"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_names_the_entry(case, tmp_path):
    edit, message = BAD_MANIFESTS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(_valid())), encoding="utf-8")
    with pytest.raises(ManifestError, match=message) as error:
        load_manifest(path)
    assert str(path) in str(error.value) and str(error.value).count("\n") == 0


@pytest.mark.parametrize("content, message", [
    ('{"format": "voco-manifest", "version": 1,', r"is not valid JSON \(line 1"),
    ('[1, 2, 3]', r"neither a voco manifest"),
    ('{"training": []}', r"has no entries in 'training', 'validation' or 'test'"),
    ('{"training": [{"image": ["t1.nii.gz", "t2.nii.gz"]}]}', r"training\[0\] lists several image files"),
    ('{"training": [{"label": "l.nii.gz"}]}', r"training\[0\] has no 'image' key"),
])
def test_bad_json_files(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_binary_file_is_not_a_manifest(tmp_path):
    path = tmp_path / "scan.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ManifestError, match="is not a text JSON file"):
        load_manifest(path)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist; check the path"):
        load_manifest(tmp_path / "absent.json")


def test_example_manifests_load():
    shared = to_datalist(load_manifest(EXAMPLES / "shared_data.json"))
    assert [(Path(e["image"]).name, e["modality"], e["preset"]) for e in shared] == [
        ("ct_abdomen_3mm.nii.gz", "CT", "ct_abdomen"), ("ct_thorax_1p5mm.nii.gz", "CT", "ct_abdomen"),
        ("mr_abdomen_3mm.nii.gz", "MR", "mr_zscore")]
    decathlon = to_datalist(load_manifest(EXAMPLES / "decathlon_example.json"))
    assert [e["split"] for e in decathlon] == ["training", "training", "validation", "test"]
    assert [e["subject"] for e in decathlon] == ["case_001", "case_002", "case_003", "case_004"]


def test_shared_data_example_points_at_the_real_volumes(real_shared_data):
    for entry in to_datalist(load_manifest(EXAMPLES / "shared_data.json")):
        path = Path(entry["image"]).resolve()
        assert path == (real_shared_data / path.name).resolve() and path.is_file()


# ---------------------------------------------------------------------------------------------------------- catalogue


def test_preCT160k_catalogue_totals_and_groups():
    catalogue = load_catalogue()
    rows = {row["name"]: row for row in catalogue["datasets"]}
    assert len(rows) == 23 and catalogue["stated_total"] == 160167
    assert sum(row["volumes"] for row in rows.values()) == catalogue["sum_of_rows"] == 161757
    assert sum(row["volumes"] for row in rows.values() if row["in_10k"]) == catalogue["sum_10k_rows"] == 10881
    assert all(row["in_160k"] and row["preset"] in PRESETS for row in rows.values())
    groups = {preset: {name for name, row in rows.items() if row["preset"] == preset} for preset in PRESETS}
    assert {"BTCV", "FLARE23", "AbdomenAtlas1.0", "PANORAMA"} <= groups["ct_abdomen"]
    assert {"LUNA16", "LIDC", "CT-RATE", "NLST", "STOIC 2021"} <= groups["ct_chest"]
    assert {"HNSCC", "TCGA-HNSC", "TotalSegmentator", "CT COLONOGRAPHY"} <= groups["ct_resize"]
    assert all(rows[name]["body_region"] == "Abdomen" for name in groups["ct_abdomen"])
    assert rows["LIDC"]["reference_json"] == "Self-supervised/jsons/LIDC.json"
    assert rows["LIDC"]["reference_json_volumes"] == 589 and rows["NLST"]["reference_json_volumes"] is None


def test_catalogue_rows_match_the_spec():
    if not CATALOGUE_SPEC.is_file():
        pytest.skip(f"the catalogue spec {CATALOGUE_SPEC} is absent")
    spec = json.loads(CATALOGUE_SPEC.read_text(encoding="utf-8"))
    catalogue = load_catalogue()
    assert [(r["dataset"], r["region"], r["volumes"], r["in_10k"], r["in_160k"]) for r in spec["rows"]] == [
        (r["name"], r["body_region"], r["volumes"], r["in_10k"], r["in_160k"]) for r in catalogue["datasets"]]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["datasets"][0].update(volumes=25), r"sum_of_rows is 161757 but its rows add up to 161758"),
    (lambda c: c["datasets"][2].update(volumes=True), r"datasets\[2\]\.volumes must be whole number"),
    (lambda c: c["datasets"][3].update(preset="ct_body"), r"datasets\[3\] \(FLARE23\) names the unknown preset"),
    (lambda c: c["datasets"][1].pop("in_10k"), r"datasets\[1\] has no 'in_10k' key"),
    (lambda c: c.update(version=2), r"catalogue version 2"),
])
def test_bad_catalogue(edit, message, tmp_path):
    catalogue = copy.deepcopy(load_catalogue())
    edit(catalogue)
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps(catalogue), encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        load_catalogue(path)


def test_a_scan_listed_twice_is_warned_about(caplog):
    """Issue 16 item 13: a copied scan entry was accepted silently (it counts twice, and may leak across splits)."""
    manifest = _valid()
    scans = manifest["datasets"][0]["subjects"][0]["studies"][0]["scans"]
    with caplog.at_level("WARNING", logger="voco.data.manifest"):
        to_datalist(manifest)
        assert caplog.records == []
        scans.append(dict(scans[0]))
        datalist = to_datalist(manifest)
    assert len(datalist) == len({entry["image"] for entry in datalist}) + 1  # still listed: a warning, not an error
    (record,) = caplog.records
    assert record.getMessage().startswith(f"1 scans are listed more than once in the manifest (e.g. "
                                          f"{datalist[0]['image']}, 2 times): each copy is used as a scan of its own")
