"""Study-level data: grouping, batching with different scan counts, reports, seeded items, bad scans, phantom
studies and reports attached from a CSV."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from voco.data.manifest import load_manifest, manifest_from_records, to_datalist, validate_manifest
from voco.data.phantoms import (PHANTOM_SERIES, STAMP_NAME, STUDY_FINDINGS, ensure_phantom_studies, ensure_phantoms,
                                make_phantom_study)
from voco.data.reports import attach_reports, shuffle_sentences, split_sentences
from voco.data.studies import (build_study_dataset, build_study_loader, collate_studies, finding_names,
                               group_studies, report_texts)
from voco.errors import ConfigError, ManifestError, VolumeError

SCAN_SIZE = (24, 24, 12)


@pytest.fixture(scope="module")
def study_set(tmp_path_factory) -> Path:
    """Six small phantom studies of 1-4 series (the manifest path)."""
    return ensure_phantom_studies(tmp_path_factory.mktemp("studies") / "set", 6, 3)


def scan_counts(manifest_path: Path) -> list[int]:
    return [len(study["scans"]) for study in group_studies(to_datalist(load_manifest(manifest_path)))]


def sentences(report: str) -> list[str]:
    return sorted(split_sentences(report))


def scan_signature(image: torch.Tensor) -> tuple[float, ...]:
    """One number per scan of a [N, 1, X, Y, Z] study image, to compare scan orders."""
    return tuple(round(float(scan.double().sum()), 3) for scan in image)


# ---------------------------------------------------------------------------------------------------------------
# Manifest findings, grouping


def test_study_findings_are_validated_and_copied_to_every_scan():
    records = [{"dataset": "d", "subject": "s1", "study": "a", "report": "Liver: normal.",
                "findings": {"liver_lesion": False, "splenomegaly": True}, "scan": {"image": f"s1_{k}.nii.gz"}}
               for k in range(2)]
    manifest = manifest_from_records(records, name="m")
    validate_manifest(manifest)
    datalist = to_datalist(manifest, dataset_dir="/data")
    assert [entry["findings"] for entry in datalist] == [{"liver_lesion": False, "splenomegaly": True}] * 2
    datalist[0]["findings"]["splenomegaly"] = False
    assert datalist[1]["findings"]["splenomegaly"], "each entry holds its own copy"

    study = manifest["datasets"][0]["subjects"][0]["studies"][0]
    for bad, message in [({"liver_lesion": 1}, r"findings\.liver_lesion is 1; give true or false"),
                         ({"": True}, "non-empty name"), (["liver_lesion"], "must be an object")]:
        study["findings"] = bad
        with pytest.raises(ManifestError, match=message) as error:
            validate_manifest(manifest, source="m.json")
        assert "m.json: datasets[0].subjects[0].studies[0].findings" in str(error.value)


def test_group_studies_keeps_first_seen_order_and_study_facts():
    datalist = [
        {"image": "/d/a0.nii.gz", "dataset": "d", "subject": "1", "study": "a", "scan_index": 0, "report": "A.",
         "findings": {"x": True}},
        {"image": "/d/b0.nii.gz", "dataset": "d", "subject": "2", "study": "b", "scan_index": 0},
        {"image": "/d/a1.nii.gz", "dataset": "d", "subject": "1", "study": "a", "scan_index": 1, "report": "A.",
         "findings": {"x": True}},
        {"image": "/plain.nii.gz"},  # a plain datalist entry: a study of its own
    ]
    studies = group_studies(datalist)
    assert [study["study_id"] for study in studies] == ["d/1/a", "d/2/b", "/plain.nii.gz"]
    assert [[scan["image"] for scan in study["scans"]] for study in studies] == [
        ["/d/a0.nii.gz", "/d/a1.nii.gz"], ["/d/b0.nii.gz"], ["/plain.nii.gz"]]
    assert [(study["report"], study["findings"], study["image"]) for study in studies] == [
        ("A.", {"x": True}, "/d/a0.nii.gz"), (None, {}, "/d/b0.nii.gz"), (None, {}, "/plain.nii.gz")]
    assert finding_names(studies + [{"findings": {"a": False}}]) == ["a", "x"]
    assert report_texts(datalist) == ["A."]
    with pytest.raises(ManifestError, match="entry 1 has no 'image'"):
        group_studies([datalist[0], {"subject": "3"}])


# ---------------------------------------------------------------------------------------------------------------
# Batching


def study_item(num_scans: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand((num_scans, 1, 4, 3, 2), generator=generator), "report": f"study {seed}.",
            "findings": torch.tensor([1.0, float("nan")]), "study_id": f"s{seed}", "dropped_scans": seed % 2,
            "skipped_volumes": 1}


def test_collate_repeat_and_pad_with_one_two_and_three_scans():
    items = [study_item(count, seed) for seed, count in enumerate((1, 2, 3))]
    repeat, pad = (collate_studies(items, max_scans=3, scan_mode=mode) for mode in ("repeat", "pad"))
    for batch in (repeat, pad):
        assert tuple(batch["image"].shape) == (3, 3, 1, 4, 3, 2) and batch["scan_mask"].dtype == torch.bool
        assert batch["num_scans"].tolist() == [1, 2, 3] and batch["study_id"] == ["s0", "s1", "s2"]
        assert batch["report"] == ["study 0.", "study 1.", "study 2."]
        assert tuple(batch["findings"].shape) == (3, 2) and torch.isnan(batch["findings"][:, 1]).all()
        assert batch["skipped_volumes"].tolist() == [1, 2, 1], "skipped studies plus dropped scans"
    # repeat (HLIP): scans cycle 0, 1, 0 ... and nothing is masked
    assert repeat["scan_mask"].all()
    for slot in range(3):
        assert torch.equal(repeat["image"][0, slot], items[0]["image"][0])
    assert torch.equal(repeat["image"][1], items[1]["image"][[0, 1, 0]])
    # pad: zero scans behind the real ones, masked out
    assert pad["scan_mask"].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert torch.equal(pad["image"][1, :2], items[1]["image"]) and not pad["image"][1, 2].any()
    assert not pad["image"][0, 1:].any()
    # the check: a study that needs neither repeating nor padding is the same in both modes
    assert torch.equal(repeat["image"][2], pad["image"][2]) and torch.equal(repeat["image"][2], items[2]["image"])

    with pytest.raises(ConfigError, match="scan_mode"):
        collate_studies(items, max_scans=3, scan_mode="truncate")
    with pytest.raises(ConfigError, match="s2 has 3 scans"):
        collate_studies(items, max_scans=2)


# ---------------------------------------------------------------------------------------------------------------
# Report sentences


def test_split_sentences_keeps_abbreviations_numbers_and_list_items_together():
    text = ("Liver: a 2.5 cm lesion, e.g. a cyst, approx. 3 cm from the hilum. No ascites! "
            "1. Liver lesion. 2. Splenomegaly, i.e. enlarged spleen. vs. prior: stable.")
    assert split_sentences(text) == ["Liver: a 2.5 cm lesion, e.g. a cyst, approx. 3 cm from the hilum.",
                                     "No ascites!", "1. Liver lesion.", "2. Splenomegaly, i.e. enlarged spleen. "
                                     "vs. prior: stable."]
    assert split_sentences("") == [] and split_sentences("No full stop") == ["No full stop"]


def test_shuffle_sentences_keeps_sentences_sections_and_paragraphs():
    report = ("Findings: Liver normal. Spleen enlarged. Kidneys normal. Bladder normal. "
              "Impression: Splenomegaly. No focal lesion.\n\nComparison: none.")
    results = {shuffle_sentences(report, np.random.RandomState(seed)) for seed in range(8)}
    assert len(results) > 1, "different seeds give different orders"
    for result in results:
        findings_part, comparison = result.split("\n\n")
        assert comparison == "Comparison: none."
        findings, impression = findings_part.split(" Impression: ")
        assert findings.startswith("Findings: "), "a heading stays in front of its section"
        assert sorted(split_sentences(findings.removeprefix("Findings: "))) == sorted(
            ["Liver normal.", "Spleen enlarged.", "Kidneys normal.", "Bladder normal."])
        assert sorted(split_sentences(impression)) == ["No focal lesion.", "Splenomegaly."]
    assert shuffle_sentences(report, np.random.RandomState(3)) == shuffle_sentences(report, np.random.RandomState(3))
    assert shuffle_sentences("", np.random.RandomState(0)) == ""


# ---------------------------------------------------------------------------------------------------------------
# The study dataset


def test_items_follow_the_seed_through_skip_bad_volumes(study_set):
    counts = scan_counts(study_set)
    index = int(np.argmax(counts))
    assert counts[index] >= 3, f"the set needs a study of 3+ scans for this test, has {counts}"
    dataset = build_study_dataset(study_set, scan_size=SCAN_SIZE, max_scans=4)
    first, again = dataset[(index, 11)], dataset[(index, 11)]
    assert torch.equal(first["image"], again["image"]) and first["report"] == again["report"]
    assert tuple(first["image"].shape) == (min(counts[index], 4), 1, *SCAN_SIZE)
    assert first["image"].dtype == torch.float32 and first["skipped_volumes"] == 0

    items = [dataset[(index, seed)] for seed in range(8)]
    orders = {scan_signature(item["image"]) for item in items}
    assert len(orders) > 1 and len({item["report"] for item in items}) > 1, "another seed, another order"
    manifest_report = dataset.studies[index]["report"]
    for item in items:  # the same scans and sentences, in another order
        assert sorted(scan_signature(item["image"])) == sorted(scan_signature(first["image"]))
        assert sentences(item["report"]) == sentences(manifest_report)

    # more scans than max_scans: a random subset of them
    subsets = {scan_signature(build_study_dataset(study_set, scan_size=SCAN_SIZE, max_scans=2)[(index, seed)]
                              ["image"]) for seed in range(6)}
    assert all(len(subset) == 2 and set(subset) <= set(scan_signature(first["image"])) for subset in subsets)
    assert len({frozenset(subset) for subset in subsets}) > 1

    # validation: manifest order, the report as written, whatever the seed
    fixed = build_study_dataset(study_set, scan_size=SCAN_SIZE, max_scans=4, shuffle=False, sentence_shuffle=False)
    items = [fixed[(index, seed)] for seed in range(3)]
    assert len({scan_signature(item["image"]) for item in items}) == 1
    assert all(item["report"] == manifest_report for item in items)


def test_cached_scans_match_the_uncached_ones(study_set, tmp_path):
    datasets = {cache: build_study_dataset(study_set, scan_size=SCAN_SIZE, cache=cache, cache_dir=tmp_path / "cache")
                for cache in ("none", "memory", "disk")}
    for index in range(2):
        items = {cache: dataset[(index, 5)] for cache, dataset in datasets.items()}
        for cache in ("memory", "disk"):
            assert items[cache]["image"].dtype == torch.float32
            # uint16 steps of 1/65535 for the windowed presets
            torch.testing.assert_close(items[cache]["image"], items["none"]["image"], atol=1e-5, rtol=0)


def test_bad_scans_are_dropped_and_all_bad_studies_skipped(study_set, tmp_path):
    datalist = to_datalist(load_manifest(study_set))
    studies = group_studies(datalist)
    several = next(k for k, study in enumerate(studies) if len(study["scans"]) >= 2)
    all_bad = next(k for k in range(len(studies)) if k != several)
    truncated = tmp_path / "truncated.nii.gz"
    content = Path(studies[several]["scans"][1]["image"]).read_bytes()
    truncated.write_bytes(content[: len(content) // 3])  # a corrupt .nii.gz
    bad_study_id = studies[all_bad]["study_id"]
    for entry in datalist:
        if entry["study"] == "ct" and (entry["dataset"], entry["subject"]) == (studies[several]["dataset"],
                                                                              studies[several]["subject"]):
            if entry["scan_index"] == 1:
                entry["image"] = str(truncated)
        elif "/".join((entry["dataset"], entry["subject"], entry["study"])) == bad_study_id:
            entry["image"] = str(tmp_path / f"missing_{entry['scan_index']}.nii.gz")

    dataset = build_study_dataset(datalist, scan_size=SCAN_SIZE, shuffle=False)
    item = dataset[several]
    assert tuple(item["image"].shape) == (min(len(studies[several]["scans"]), 4) - 1, 1, *SCAN_SIZE)
    assert item["dropped_scans"] == 1
    assert collate_studies([item], max_scans=4)["skipped_volumes"].tolist() == [1]
    assert dataset[several]["dropped_scans"] == 0, "a known bad scan is not read (nor counted) again"

    replacement = dataset[all_bad]
    assert replacement["study_id"] == studies[(all_bad + 1) % len(studies)]["study_id"]
    assert replacement["skipped_volumes"] == 1 and all_bad in dataset.known_bad

    with pytest.raises(VolumeError, match="checked before training"):  # mostly bad: refused before any work
        build_study_dataset([dict(entry, image=str(tmp_path / "gone.nii.gz")) for entry in datalist])

    strict = build_study_dataset(datalist, scan_size=SCAN_SIZE, shuffle=False, bad_volumes="stop")
    for index, path in ((several, truncated), (all_bad, tmp_path / "missing_0.nii.gz")):
        with pytest.raises(VolumeError) as error:
            strict[index]
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_loader_end_to_end_on_phantom_studies(study_set, tmp_path):
    manifest = load_manifest(study_set)
    expected = {f"{dataset['name']}/{subject['id']}/{study['id']}": study
                for dataset in manifest["datasets"] for subject in dataset["subjects"] for study in subject["studies"]}
    loader = build_study_loader(study_set, scan_size=SCAN_SIZE, max_scans=4, batch_size=2, num_workers=0,
                                scan_mode="pad", cache="disk", cache_dir=tmp_path / "cache")
    assert loader.dataset.finding_names == sorted(STUDY_FINDINGS) and loader.dataset.max_scans == 4
    seen = []
    for batch in loader:
        assert tuple(batch["image"].shape) == (2, 4, 1, *SCAN_SIZE) and batch["image"].dtype == torch.float32
        for row, study_id in enumerate(batch["study_id"]):
            study = expected[study_id]
            count = len(study["scans"])
            assert batch["scan_mask"][row].tolist() == [True] * count + [False] * (4 - count)
            assert batch["findings"][row].tolist() == [float(study["findings"][name])
                                                       for name in sorted(STUDY_FINDINGS)]
            assert sentences(batch["report"][row]) == sentences(study["report"])
            assert not batch["image"][row, count:].any() and batch["image"][row, :count].amax() > 0.5
            seen.append(study_id)
    assert len(seen) == len(expected) and set(seen) == set(expected)
    # one cache file per scan, under a folder per preset: the wide-window series are read with ct_chest
    cached = list((tmp_path / "cache").rglob("*.pt"))
    presets = [scan.get("preset", "ct_abdomen") for study in expected.values() for scan in study["scans"]]
    assert len(cached) == len(presets)
    assert sum(path.parent.name.startswith("study-scans-v1-ct_chest") for path in cached) == presets.count("ct_chest")


def test_bad_settings_are_refused(study_set):
    for options, message in [({"scan_size": (0, 8, 8)}, "scan_size"), ({"max_scans": 0}, "max_scans"),
                             ({"cache": "ssd"}, "cache"), ({"cache": "disk"}, "cache_dir"),
                             ({"bad_volumes": "ignore"}, "bad_volumes"),
                             ({"findings": ["pneumothorax"]}, "pneumothorax")]:
        with pytest.raises(ConfigError, match=message):
            build_study_dataset(study_set, **options)
    with pytest.raises(ConfigError, match="scan_mode"):
        build_study_loader(study_set, scan_mode="stack")


# ---------------------------------------------------------------------------------------------------------------
# Phantom studies


def test_phantom_studies_on_disk_and_their_reuse(study_set):
    manifest = load_manifest(study_set)
    (dataset,) = manifest["datasets"]
    assert len(dataset["subjects"]) == 6
    series_names = [series.name for series in PHANTOM_SERIES]
    for subject in dataset["subjects"]:
        (study,) = subject["studies"]
        assert set(study["findings"]) == set(STUDY_FINDINGS) and study["report"].startswith(("Liver", "The liver"))
        names = [scan["series"] for scan in study["scans"]]
        assert 1 <= len(names) <= 4 and names[0] == "axial" and len(set(names)) == len(names)
        assert set(names) <= set(series_names)
        axial = study["scans"][0]
        for scan in study["scans"]:  # the default orientations only flip axes: shapes are (x, y, slices)
            image = nibabel.load(Path(study_set).parent / scan["image"])
            assert list(image.shape) == scan["shape"]
            assert scan["preset"] == ("ct_chest" if scan["series"] == "wide_window" else "ct_abdomen")
            np.testing.assert_allclose(np.multiply(scan["shape"], scan["spacing"]),
                                       np.multiply(axial["shape"], axial["spacing"]), rtol=0.1,
                                       err_msg="every series covers the same body")
            slices = {"thin_slice": 2 * axial["shape"][2], "thick_slice": axial["shape"][2] / 2}
            if scan["series"] in slices:
                assert abs(scan["shape"][2] - slices[scan["series"]]) <= 1 and scan["shape"][:2] == axial["shape"][:2]

    folder = Path(study_set).parent
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    modified = {path: path.stat().st_mtime_ns for path in files}
    assert ensure_phantom_studies(folder, 6, 3) == study_set
    assert {path: path.stat().st_mtime_ns for path in files} == modified, "a complete set is not rewritten"
    assert json.loads((folder / STAMP_NAME).read_text())["kind"] == "phantom_studies"


def test_a_phantom_set_of_the_other_kind_is_replaced(tmp_path):
    folder = tmp_path / "set"
    ensure_phantoms(folder, 1, 0, shape_range=[[24, 24], [24, 24], [12, 12]])
    manifest = ensure_phantom_studies(folder, 2, 0, num_scans=2, shape_range=[[24, 24], [24, 24], [12, 12]])
    assert scan_counts(manifest) == [2, 2]
    assert json.loads((folder / STAMP_NAME).read_text())["kind"] == "phantom_studies"
    assert not (folder / "labels").exists() and len(list((folder / "images").iterdir())) == 4


def test_make_phantom_study_is_deterministic_and_findings_are_balanced():
    first, again = make_phantom_study((0, 4)), make_phantom_study((0, 4))
    assert first.report == again.report and first.findings == again.findings
    assert [scan.shape for scan in first.scans] == [scan.shape for scan in again.scans]
    np.testing.assert_array_equal(first.scans[-1].image, again.scans[-1].image)
    with pytest.raises(ConfigError, match="num_scans"):
        make_phantom_study(0, num_scans=9)

    studies = [make_phantom_study((1, index)) for index in range(40)]
    assert {len(study.scans) for study in studies} == {1, 2, 3, 4}
    for name in STUDY_FINDINGS:
        prevalence = np.mean([study.findings[name] for study in studies])
        assert 0.15 <= prevalence <= 0.85, f"{name} is positive in {prevalence:.0%} of the studies"
    for study in studies:  # the impression names exactly the positive findings
        impression = study.report.split("Impression: ")[1]
        assert ("liver lesion" in impression and "no liver lesion" not in impression) == study.findings["liver_lesion"]
        assert ("kidney lesion on" in impression) == study.findings["kidney_lesion"]
        assert ("splenomegaly" in impression and "no splenomegaly" not in impression) == study.findings["splenomegaly"]
        # the same anatomy on every grid: the spleen's size class does not depend on the series
        assert len({scan.attributes["enlarged_spleen"] for scan in study.scans}) == 1
    normal = [study.report for study in studies if not any(study.findings.values())]
    assert len(normal) < 2 or len(set(normal)) > 1, "reports of the same findings are worded differently"


# ---------------------------------------------------------------------------------------------------------------
# Reports from a CSV


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_attach_reports_from_csv_tables(study_set, tmp_path, caplog):
    manifest = load_manifest(study_set)
    subjects = manifest["datasets"][0]["subjects"]
    several = next(subject for subject in subjects if len(subject["studies"][0]["scans"]) >= 2)
    other = next(subject for subject in subjects if subject is not several)
    file_names = [Path(scan["image"]).name for scan in several["studies"][0]["scans"]]
    reports = write_csv(tmp_path / "reports.csv", ["VolumeName", "ClinicalInformation_EN", "Findings_EN",
                                                   "Impressions_EN"], [
        [file_names[0], "Pain.", "Liver normal. Spleen large.", "Splenomegaly."],
        [file_names[1], "Pain.", "Liver normal. Spleen large.", "Splenomegaly."],  # another reconstruction
        [other["id"], "", "Kidneys normal.", ""],  # matched by the subject id
        ["valid_99_a_1.nii.gz", "", "Not in this manifest.", ""],
    ])
    with caplog.at_level(logging.WARNING, logger="voco.data.studies"):
        result = attach_reports(manifest, reports)
    assert "1 of 4 rows" in caplog.text and "valid_99_a_1" in caplog.text
    studies = {subject["id"]: subject["studies"][0] for subject in result["datasets"][0]["subjects"]}
    assert studies[several["id"]]["report"] == "Liver normal. Spleen large.\n\nSplenomegaly."
    assert studies[other["id"]]["report"] == "Kidneys normal."
    assert several["studies"][0]["report"] != studies[several["id"]]["report"], "the given manifest is unchanged"
    assert studies[several["id"]]["findings"] == several["studies"][0]["findings"], "text columns are no findings"

    labels = write_csv(tmp_path / "labels.csv", ["VolumeName", "Lung nodule", "Medical material"], [
        [file_names[0], "1", "0"], [f"phantom_studies/{other['id']}/ct", "0", ""]])
    result = attach_reports(result, labels)
    studies = {subject["id"]: subject["studies"][0] for subject in result["datasets"][0]["subjects"]}
    assert studies[several["id"]]["findings"] == {**several["studies"][0]["findings"], "Lung nodule": True,
                                                  "Medical material": False}
    assert studies[other["id"]]["findings"] == {**other["studies"][0]["findings"], "Lung nodule": False}
    dataset = build_study_dataset(result, scan_size=SCAN_SIZE, findings=["Lung nodule", "Medical material"])
    vectors = {study["subject"]: dataset.dataset.findings_vector(study) for study in dataset.studies}
    assert vectors[several["id"]].tolist() == [1.0, 0.0]
    assert vectors[other["id"]][0] == 0.0 and torch.isnan(vectors[other["id"]][1])
    assert report_texts(result)[0] in {"Liver normal. Spleen large.\n\nSplenomegaly.", "Kidneys normal."}

    bad_tables = [
        (["VolumeName", "Findings_EN"], [[file_names[0], "A."], [file_names[1], "B."]], {}, "lines 2 and 3"),
        (["VolumeName", "Findings_EN"], [["nobody", "A."]], {}, "none of the 1 rows"),
        (["VolumeName", "Findings_EN"], [[file_names[0], "A."]], {"report_columns": ["Report"]}, "no column 'Report'"),
        (["VolumeName", "Nodule"], [[file_names[0], "maybe"]], {"finding_columns": ["Nodule"]}, "line 2, column"),
        (["VolumeName", "Age"], [[file_names[0], "54"]], {}, "neither report columns"),
    ]
    for header, rows, options, message in bad_tables:
        with pytest.raises(ManifestError, match=message):
            attach_reports(manifest, write_csv(tmp_path / "bad.csv", header, rows), **options)
    with pytest.raises(ManifestError, match="does not exist"):
        attach_reports(manifest, tmp_path / "absent.csv")
