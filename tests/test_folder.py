"""Volume headers and checks, folder scans, manifest build / check / stats (voco.data.volumes, voco.data.folder)."""

from __future__ import annotations

import gzip
import json
import locale
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco.data.folder import build_manifest_from_folder, scan_folder
from voco.data.manifest_checks import check_manifest, format_problem_table, manifest_stats
from voco.data.manifest import load_manifest, to_datalist
from voco.data.volume_checks import assert_valid_volume, check_volume
from voco.data.volumes import SUPPORTED_EXTENSIONS, file_stem, image_format, read_header
from voco.errors import ManifestError, VolumeError

SIDE = 16  # tiny volumes: 16^3 voxels


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), axis_signs=(1, 1, 1)) -> Path:
    """NIfTI with a diagonal affine: `axis_signs` (-1, -1, 1) gives an LPS voxel orientation."""
    affine = np.diag([*(sign * size for sign, size in zip(axis_signs, spacing)), 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def ramp(shape=(SIDE, SIDE, SIDE), dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 200 - 100).reshape(shape).astype(dtype)


def write_itk(path: Path, array_xyz: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    """Write with itk (NRRD / MetaImage by extension); `array_xyz` is indexed [x, y, z] like nibabel's arrays."""
    itk = pytest.importorskip("itk")
    image = itk.image_from_array(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))  # itk arrays are [z, y, x]
    image.SetSpacing([float(size) for size in spacing])
    image.SetOrigin([float(value) for value in origin])
    if direction is not None:
        image.SetDirection(itk.matrix_from_array(np.asarray(direction, dtype=float)))
    path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, array_xyz: np.ndarray, spacing, origin, *, patient: str, study: str,
                       series: str, description: str, modality: str = "CT", prefix: str = "slice",
                       suffix: str = ".dcm") -> list[Path]:
    """One .dcm file per axial slice, written with itk's GDCMImageIO, positions and spacing in the tags."""
    itk = pytest.importorskip("itk")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the process locale to "C"
    for k in range(array_xyz.shape[2]):
        slice_image = itk.image_from_array(np.ascontiguousarray(array_xyz[:, :, k].T))  # [y, x]
        slice_image.SetSpacing([float(spacing[0]), float(spacing[1])])
        tags = slice_image.GetMetaDataDictionary()
        for tag, value in {
            "0010|0020": patient, "0020|000d": study, "0020|000e": series, "0008|103e": description,
            "0008|0060": modality, "0020|0013": str(k + 1),
            "0020|0032": f"{origin[0]}\\{origin[1]}\\{origin[2] + k * spacing[2]}",  # ImagePositionPatient
            "0020|0037": "1\\0\\0\\0\\1\\0",  # ImageOrientationPatient: axial
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",  # PixelSpacing: row spacing (y) first
            "0018|0050": str(spacing[2]),
        }.items():
            tags[tag] = value
        image_io = itk.GDCMImageIO.New()
        image_io.KeepOriginalUIDOn()  # keep our Study/Series UIDs
        path = folder / f"{prefix}{k:03d}{suffix}"
        writer = itk.ImageFileWriter[type(slice_image)].New(Input=slice_image, FileName=str(path), ImageIO=image_io)
        writer.Update()
        files.append(path)
    locale.setlocale(locale.LC_ALL, saved_locale)
    return files


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> Path:
    """ROOT/Scans: a NIfTI (LPS), a NRRD, an MHA (RAS directions) and a DICOM series (two in one folder);
    ROOT/Task01: Decathlon-style imagesTr / labelsTr with nnU-Net channel suffixes; ROOT/Organs: a *_seg pair."""
    pytest.importorskip("itk")
    root = tmp_path_factory.mktemp("mixed") / "collection"
    write_nifti(root / "Scans" / "nifti_case.nii.gz", ramp(), spacing=(0.8, 0.8, 2.5), axis_signs=(-1, -1, 1))
    write_itk(root / "Scans" / "patient7" / "nrrd_case.nrrd", ramp(), spacing=(0.7, 0.7, 3.0))
    write_itk(root / "Scans" / "mha_case.mha", ramp((SIDE, SIDE, 8)), spacing=(1.0, 1.25, 2.0),
              direction=np.diag([-1.0, -1.0, 1.0]))  # LPS world axes flipped: voxel axes point R, A, S
    write_dicom_series(root / "Scans" / "dicom", ramp((SIDE, SIDE, 6)), (0.5, 0.75, 2.0), (10.0, 20.0, 30.0),
                       patient="PAT-001", study="1.2.826.0.1.3680043.2.1125.1", series="1.2.826.0.1.3680043.2.1125.2",
                       description="axial venous")
    write_dicom_series(root / "Scans" / "dicom", ramp((SIDE, SIDE, 4)), (0.5, 0.5, 5.0), (0.0, 0.0, 0.0),
                       patient="PAT-001", study="1.2.826.0.1.3680043.2.1125.1", series="1.2.826.0.1.3680043.2.1125.3",
                       description="scout", prefix="other")
    for case in ("la_003", "la_004"):
        write_nifti(root / "Task01" / "imagesTr" / f"{case}_0000.nii.gz", ramp())
        write_nifti(root / "Task01" / "labelsTr" / f"{case}.nii.gz", np.zeros((SIDE,) * 3, np.uint8))
    write_nifti(root / "Task01" / "imagesTs" / "la_009_0000.nii.gz", ramp())
    write_nifti(root / "Organs" / "liver.nii.gz", ramp())
    write_nifti(root / "Organs" / "liver_seg.nii.gz", np.zeros((SIDE,) * 3, np.uint8))
    write_nifti(root / "Organs" / "spleen_label.nii.gz", np.zeros((SIDE,) * 3, np.uint8))  # no image "spleen"
    (root / "Task01" / "dataset.json").write_text("{}")  # a sidecar: neither a volume nor a problem
    return root


@pytest.fixture(scope="module")
def mixed_scan(mixed_tree) -> tuple[dict, list[str]]:
    """scan_folder of the mixed tree: records keyed by image path (DICOM: by series description), problems."""
    records, problems = scan_folder(mixed_tree)
    keyed = {}
    for record in records:
        scan = record["scan"]
        keyed[scan["attributes"]["series_description"] if "series" in scan else scan["image"]] = record
    assert len(keyed) == len(records)
    return keyed, problems


# ------------------------------------------------------------------------------------------------- formats, headers


def test_image_format_by_name(tmp_path):
    assert {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"} <= set(SUPPORTED_EXTENSIONS)
    cases = {"a.nii.gz": "nifti", "a.NII": "nifti", "a.nrrd": "nrrd", "a.nhdr": "nrrd", "a.mha": "metaimage",
             "a.mhd": "metaimage", "a.dcm": "dicom", "a.png": None, "a.gz": None}
    assert {name: image_format(tmp_path / name) for name in cases} == cases
    dicom_without_suffix = tmp_path / "IM0001"
    dicom_without_suffix.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert image_format(dicom_without_suffix) == "dicom"
    assert image_format(tmp_path) == "dicom"  # a folder with a DICOM file in it
    assert file_stem("case_01.nii.gz") == "case_01" and file_stem("x.mha") == "x"


def test_read_header_nifti_is_lazy_and_right(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", ramp(), spacing=(0.8, 0.9, 2.5), axis_signs=(-1, -1, 1))
    header = read_header(path)
    assert header.format == "nifti" and header.shape == (SIDE, SIDE, SIDE) and header.dtype == "int16"
    assert header.spacing == pytest.approx((0.8, 0.9, 2.5)) and header.orientation == "LPS"


def test_read_header_itk_formats(mixed_tree):
    nrrd = read_header(mixed_tree / "Scans" / "patient7" / "nrrd_case.nrrd")
    assert (nrrd.format, nrrd.shape, nrrd.dtype, nrrd.orientation) == ("nrrd", (SIDE, SIDE, SIDE), "int16", "LPS")
    assert nrrd.spacing == pytest.approx((0.7, 0.7, 3.0))
    mha = read_header(mixed_tree / "Scans" / "mha_case.mha")
    assert (mha.format, mha.shape, mha.orientation) == ("metaimage", (SIDE, SIDE, 8), "RAS")
    assert mha.spacing == pytest.approx((1.0, 1.25, 2.0))


def test_read_header_dicom_series(mixed_tree):  # the scan gives the series ids
    folder = mixed_tree / "Scans" / "dicom"
    with pytest.raises(VolumeError, match="holds 2 DICOM series"):
        read_header(folder)  # two series: which one must be said
    records, _ = scan_folder(folder)
    identifiers = {r["scan"]["attributes"]["series_description"]: r["scan"]["series"] for r in records}
    assert {r["scan"]["image"] for r in records} == {"."}  # the scanned folder itself
    venous = read_header(folder, series=identifiers["axial venous"])
    assert venous.format == "dicom" and venous.shape == (SIDE, SIDE, 6) and len(venous.files) == 6
    assert venous.spacing == pytest.approx((0.5, 0.75, 2.0)) and venous.orientation == "LPS"
    assert check_volume(folder, series=identifiers["scout"]) == []


# ------------------------------------------------------------------------------------------------------ folder scan


def test_scan_folder_reads_every_format_with_header_facts(mixed_scan):
    by_image, _ = mixed_scan
    nifti = by_image["Scans/nifti_case.nii.gz"]
    assert (nifti["dataset"], nifti["subject"], nifti["study"]) == ("Scans", "nifti_case", "0")
    assert nifti["scan"]["shape"] == [SIDE, SIDE, SIDE] and nifti["scan"]["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert nifti["scan"]["orientation"] == "LPS"
    nrrd = by_image["Scans/patient7/nrrd_case.nrrd"]
    assert nrrd["subject"] == "patient7" and nrrd["scan"]["spacing"] == pytest.approx([0.7, 0.7, 3.0])
    mha = by_image["Scans/mha_case.mha"]
    assert mha["scan"]["shape"] == [SIDE, SIDE, 8] and mha["scan"]["orientation"] == "RAS"


def test_scan_folder_groups_dicom_by_series(mixed_scan):
    records, _ = mixed_scan
    assert len(records) == 9  # Scans: 3 files + 2 DICOM series (10 .dcm files); Task01: 3 images; Organs: 1 image
    venous, scout = records["axial venous"], records["scout"]  # one scan per series, not per file
    assert venous["scan"]["image"] == scout["scan"]["image"] == "Scans/dicom"
    assert venous["scan"]["series"] != scout["scan"]["series"]
    assert venous["scan"]["series"].startswith("1.2.826.0.1.3680043.2.1125.2")  # GDCM's id starts with the UID
    assert (venous["dataset"], venous["subject"], venous["study"]) == ("Scans", "PAT-001", "1.2.826.0.1.3680043.2.1125.1")
    assert venous["scan"]["shape"] == [SIDE, SIDE, 6] and venous["scan"]["spacing"] == pytest.approx([0.5, 0.75, 2.0])
    assert venous["scan"]["orientation"] == "LPS" and "modality" not in venous["scan"]
    assert scout["scan"]["shape"] == [SIDE, SIDE, 4] and scout["scan"]["spacing"] == pytest.approx([0.5, 0.5, 5.0])


def test_dicom_named_by_uid_and_its_own_modality(tmp_path):
    """PACS exports name slices by UID (no .dcm); an MR series in a CT folder keeps MR and gets the MR preset."""
    write_dicom_series(tmp_path / "export" / "PAT9", ramp((SIDE, SIDE, 3)), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0),
                       patient="PAT9", study="1.2.3", series="1.2.3.4", description="t1", modality="MR",
                       prefix="1.2.840.10008.5.1.4.", suffix="")
    records, problems = scan_folder(tmp_path / "export", modality="CT")
    assert problems == [] and len(records) == 1
    record = records[0]
    assert (record["dataset"], record["subject"], record["study"]) == ("PAT9", "PAT9", "1.2.3")
    assert record["scan"]["modality"] == "MR" and record["scan"]["preset"] == "mr_zscore"
    assert record["scan"]["shape"] == [SIDE, SIDE, 3]


def test_scan_folder_pairs_labels(mixed_scan):
    by_image, problems = mixed_scan
    task = {record["subject"]: record for record in by_image.values() if record["dataset"] == "Task01"}
    assert set(task) == {"la_003", "la_004", "la_009"}  # nnU-Net channel suffix stripped from subject ids
    assert task["la_003"]["scan"]["label"] == "Task01/labelsTr/la_003.nii.gz"
    assert task["la_004"]["scan"]["label"] == "Task01/labelsTr/la_004.nii.gz"
    assert "label" not in task["la_009"]["scan"]  # imagesTs has no labels
    assert by_image["Organs/liver.nii.gz"]["scan"]["label"] == "Organs/liver_seg.nii.gz"
    listed = {record["scan"]["image"] for record in by_image.values()}
    assert not any("labelsTr" in image or "_seg" in image or "spleen" in image for image in listed)
    assert len([p for p in problems if "spleen_label.nii.gz" in p]) == 1 and len(problems) == 1


def test_first_level_subject_folders_make_one_dataset(tmp_path):
    root = tmp_path / "AbdomenAtlas"
    for subject in ("BDMAP_01", "BDMAP_02"):
        write_nifti(root / subject / "ct.nii.gz", ramp())
        write_nifti(root / subject / "segmentations" / "liver.nii.gz", np.zeros((SIDE,) * 3, np.uint8))
    records, problems = scan_folder(root)
    assert [(r["dataset"], r["subject"], r["scan"]["image"]) for r in records] == [
        ("AbdomenAtlas", "BDMAP_01", "BDMAP_01/ct.nii.gz"), ("AbdomenAtlas", "BDMAP_02", "BDMAP_02/ct.nii.gz")]
    assert len(problems) == 2 and all("segmentations" in problem and "liver.nii.gz" in problem for problem in problems)
    forced, _ = scan_folder(tmp_path, dataset="atlas")
    assert {(r["dataset"], r["subject"]) for r in forced} == {("atlas", "AbdomenAtlas")}


def test_subject_pattern_groups_the_scans_of_one_patient(tmp_path, caplog):
    """BIDS-like names in one folder: without a pattern every file is its own subject; `--subject_pattern` groups
    them, a named group wins, an unmatched scan keeps its default subject with a warning, a bad regex is a sentence."""
    root = tmp_path / "study"
    for name in ("sub-01_T1w", "sub-01_T2w", "sub-02_T1w", "phantom"):
        write_nifti(root / f"{name}.nii.gz", ramp())
    default, _ = scan_folder(root)
    assert sorted(r["subject"] for r in default) == ["phantom", "sub-01_T1w", "sub-01_T2w", "sub-02_T1w"]
    with caplog.at_level("WARNING", logger="voco.data.folder"):
        grouped, problems = scan_folder(root, subject_pattern=r"sub-(\d+)")
    assert problems == []
    assert sorted((r["subject"], r["scan"]["image"]) for r in grouped) == [
        ("01", "sub-01_T1w.nii.gz"), ("01", "sub-01_T2w.nii.gz"), ("02", "sub-02_T1w.nii.gz"),
        ("phantom", "phantom.nii.gz")]
    assert "1 scans (e.g. phantom.nii.gz) do not match --subject_pattern" in caplog.text
    named, _ = scan_folder(root, subject_pattern=r"(T\dw)|(?P<subject>sub-\d+)")
    assert {r["subject"] for r in named} >= {"sub-01", "sub-02"}
    path, _ = build_manifest_from_folder(root, output=tmp_path / "m.json", subject_pattern=r"sub-(\d+)")
    assert manifest_stats(path).splitlines()[0].endswith("subjects 3, studies 3, scans 4, labels 0, reports 0")
    with pytest.raises(ManifestError, match=r"--subject_pattern 'sub-\(\\d\+' is not a regular expression"):
        scan_folder(root, subject_pattern=r"sub-(\d+")


# ----------------------------------------------------------------------------------------------- real sample volumes


def test_build_manifest_from_shared_data(shared_data, tmp_path):
    output = tmp_path / "manifests" / "shared.json"
    path, problems = build_manifest_from_folder(shared_data, output=output, modality="CT")
    assert path == output.resolve() and problems == []
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["dataset_dir"] == os.path.relpath(shared_data.resolve(), output.parent.resolve())
    datalist = {Path(entry["image"]).name: entry for entry in to_datalist(load_manifest(path))}
    assert set(datalist) == {"ct_abdomen_3mm.nii.gz", "ct_thorax_1p5mm.nii.gz", "mr_abdomen_3mm.nii.gz"}
    for name, entry in datalist.items():
        assert Path(entry["image"]).resolve() == (shared_data / name).resolve()
        assert entry["dataset"] == shared_data.name and entry["subject"] == name.split(".")[0]
    assert datalist["ct_abdomen_3mm.nii.gz"]["spacing"] == [3.0, 3.0, 3.0]
    assert datalist["ct_abdomen_3mm.nii.gz"]["orientation"] == "RAS"
    assert datalist["ct_abdomen_3mm.nii.gz"]["shape"] == [122, 101, 112]
    assert datalist["ct_thorax_1p5mm.nii.gz"]["spacing"] == [1.5, 1.5, 1.5]
    assert datalist["ct_thorax_1p5mm.nii.gz"]["orientation"] == "LPS"
    assert datalist["mr_abdomen_3mm.nii.gz"]["shape"] == [117, 91, 20]
    assert datalist["mr_abdomen_3mm.nii.gz"]["orientation"] == "LPS"
    assert format_problem_table(check_manifest(path)) == "no problems in 3 scans"


# ------------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture()
def bad_tree(tmp_path) -> dict[str, Path]:
    """A folder with two good volumes and one of every kind of bad input."""
    root = tmp_path / "bad"
    files = {
        "good": write_nifti(root / "good.nii.gz", ramp()),
        "good_float": write_nifti(root / "good_float.nii.gz", ramp(dtype=np.float32)),
        "flat": write_nifti(root / "flat.nii.gz", ramp((SIDE, SIDE))),
        "movie": write_nifti(root / "movie.nii.gz", ramp((SIDE, SIDE, SIDE, 2))),
        "empty": write_nifti(root / "empty.nii.gz", np.zeros((SIDE, SIDE, 0), np.int16)),
    }
    nan_volume = ramp(dtype=np.float32)
    nan_volume[3, 4, 5] = np.nan
    files["nan"] = write_nifti(root / "nan.nii.gz", nan_volume)
    inf_volume = ramp(dtype=np.float32)
    inf_volume[0, 0, 0] = np.inf
    files["inf"] = write_nifti(root / "inf.nii.gz", inf_volume)
    whole = gzip.compress(write_nifti(tmp_path / "whole.nii", ramp(dtype=np.float32)).read_bytes())
    files["truncated"] = root / "truncated.nii.gz"
    files["truncated"].write_bytes(whole[: len(whole) // 2])  # the header survives, the voxels do not
    files["garbage"] = root / "garbage.nii.gz"
    files["garbage"].write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    files["unsupported"] = root / "slice.png"
    files["unsupported"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    files["missing"] = root / "gone.nii.gz"
    files["missing"].symlink_to(root / "never_written.nii.gz")  # a broken link: listed, but no file behind it
    (root / "notes.txt").write_text("sidecar files are ignored")
    return files


def _named(problems: list[str], path: Path) -> list[str]:
    return [problem for problem in problems if path.name in problem]


def test_build_reports_every_bad_file_and_keeps_the_good(bad_tree, tmp_path):
    path, problems = build_manifest_from_folder(bad_tree["good"].parent, output=tmp_path / "m.json", read_voxels=True)
    expected = {"flat": "2-D", "movie": "2 channels or time points", "empty": "empty", "nan": "1 NaN",
                "inf": "1 infinite", "truncated": "truncated or corrupt", "garbage": "could not be read",
                "unsupported": "unsupported extension '.png'", "missing": "does not exist"}
    for kind, phrase in expected.items():
        named = _named(problems, bad_tree[kind])
        assert len(named) == 1 and phrase in named[0], (kind, problems)
    assert len(problems) == len(expected)
    images = sorted(Path(entry["image"]).name for entry in to_datalist(load_manifest(path)))
    assert images == ["good.nii.gz", "good_float.nii.gz"]


def test_headers_only_scan_then_check_finds_voxel_problems(bad_tree, tmp_path):
    path, problems = build_manifest_from_folder(bad_tree["good"].parent, output=tmp_path / "m.json")
    images = {Path(entry["image"]).name for entry in to_datalist(load_manifest(path))}
    assert images == {"good.nii.gz", "good_float.nii.gz", "nan.nii.gz", "inf.nii.gz", "truncated.nii.gz"}
    assert not _named(problems, bad_tree["truncated"])  # only reading the voxels finds a truncated stream
    bad_tree["good_float"].unlink()  # disappears after the manifest was written
    rows = check_manifest(path)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert set(by_name) == {"nan.nii.gz", "inf.nii.gz", "truncated.nii.gz", "good_float.nii.gz"}
    assert "does not exist" in by_name["good_float.nii.gz"]["problem"]
    assert "NaN" in by_name["nan.nii.gz"]["problem"] and "truncated" in by_name["truncated.nii.gz"]["problem"]
    assert by_name["nan.nii.gz"]["entry"] == "bad/nan/0/0"
    table = format_problem_table(rows)
    assert table.splitlines()[0].split() == ["entry", "path", "problem"]
    assert "bad/truncated/0/0" in table and table.splitlines()[-1] == "4 problems in 4 of 5 scans"
    assert check_manifest(path, read_voxels=False) == [row for row in rows if "does not exist" in row["problem"]]


def test_check_manifest_compares_labels_and_recorded_facts(tmp_path):
    root = tmp_path / "data"
    write_nifti(root / "imagesTr" / "a.nii.gz", ramp())
    write_nifti(root / "labelsTr" / "a.nii.gz", np.zeros((SIDE,) * 3, np.uint8))
    path, problems = build_manifest_from_folder(root, output=tmp_path / "m.json")
    assert problems == [] and format_problem_table(check_manifest(path)) == "no problems in 1 scans"
    write_nifti(root / "labelsTr" / "a.nii.gz", np.zeros((SIDE, SIDE, 8), np.uint8))
    write_nifti(root / "imagesTr" / "a.nii.gz", ramp(), spacing=(2.0, 2.0, 2.0))
    problems = {Path(row["path"]).parent.name: row["problem"] for row in check_manifest(path)}
    assert "spacing [2.0, 2.0, 2.0] but the manifest records [1.0, 1.0, 1.0]" in problems["imagesTr"]
    assert "shape [16, 16, 8] but its image has [16, 16, 16]" in problems["labelsTr"]


def test_build_fails_in_one_sentence_without_volumes(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest_from_folder(tmp_path / "nowhere", output=tmp_path / "m.json")
    write_nifti(tmp_path / "only" / "flat.nii.gz", ramp((SIDE, SIDE)))
    with pytest.raises(ManifestError, match="holds no readable volume.*flat.nii.gz"):
        build_manifest_from_folder(tmp_path / "only", output=tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()  # nothing half-written


# -------------------------------------------------------------------------------------------- loaded-volume checks


def test_assert_valid_volume_on_loaded_arrays():
    assert_valid_volume(np.zeros((SIDE, SIDE, SIDE), np.float32), (1.0, 1.0, 1.0), "a.nii.gz")
    assert_valid_volume(torch.zeros(1, SIDE, SIDE, SIDE), [1.5, 1.5, 1.5], "a.nii.gz")  # channel-first, one channel
    assert_valid_volume(np.zeros((1, SIDE, SIDE, SIDE), np.int16), None, "a.nii.gz")  # spacing unknown
    bad = {
        "is a 2-D image": (np.zeros((SIDE, SIDE)), (1.0, 1.0)),
        "2 channels or time points (shape 2 × 16 × 16 × 16)": (torch.zeros(2, SIDE, SIDE, SIDE), (1.0, 1.0, 1.0)),
        "is empty": (np.zeros((1, SIDE, 0, SIDE)), (1.0, 1.0, 1.0)),
        "has the spacing 1, 0, 1 mm": (np.zeros((SIDE,) * 3), (1.0, 0.0, 1.0)),
        "has the spacing 1, nan, 1 mm": (np.zeros((SIDE,) * 3), (1.0, float("nan"), 1.0)),
        "has 2 NaN and 1 infinite voxels": (torch.tensor([np.nan, np.nan, np.inf, 0.0]).reshape(1, 1, 2, 2),
                                            (1.0, 1.0, 1.0)),
    }
    for phrase, (array, spacing) in bad.items():
        with pytest.raises(VolumeError, match="^volume.nii.gz ") as error:
            assert_valid_volume(array, spacing, "volume.nii.gz")
        assert phrase in str(error.value)


def test_assert_valid_volume_tells_2d_metatensor_from_thin_volume():
    from monai.data import MetaTensor

    image_2d = MetaTensor(torch.zeros(1, SIDE, SIDE), meta={"spatial_shape": (SIDE, SIDE)})  # after channel-first
    with pytest.raises(VolumeError, match="2-D image"):
        assert_valid_volume(image_2d, None, "slice.nii.gz")
    assert_valid_volume(MetaTensor(torch.zeros(1, SIDE, SIDE, 1), meta={"spatial_shape": (SIDE, SIDE, 1)}), None, "x")


def test_check_volume_spacing_from_the_header(tmp_path):
    path = tmp_path / "zero.mha"
    write_itk(path, ramp(), spacing=(1.0, 1.0, 1.0))
    header_text = path.read_bytes()
    assert b"ElementSpacing = 1 1 1" in header_text
    path.write_bytes(header_text.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 0 1"))
    [problem] = check_volume(path)
    assert problem.startswith(str(path)) and "spacing 1, 0, 1 mm" in problem


# ---------------------------------------------------------------------------------------------------------- summary


def test_manifest_stats_counts_and_ranges(mixed_tree, tmp_path):
    path, _ = build_manifest_from_folder(mixed_tree, output=tmp_path / "m.json")
    text = manifest_stats(path)
    assert text.splitlines()[0].endswith("datasets 3, subjects 8, studies 8, scans 9, labels 3, reports 0")
    task = text[text.index("dataset Task01"):].split("\n\n")[0]
    assert "modality CT, preset ct_abdomen" in task
    assert "subjects 3, studies 3, scans 3, labels 2, reports 0" in task
    assert "shape (voxels)  all 16 × 16 × 16\n" in task
    scans = text[text.index("dataset Scans"):].split("\n\n")[0]
    assert "subjects 4, studies 4, scans 5, labels 0, reports 0" in scans
    # extremes are real scans (by voxel count and voxel volume), not per-axis minima from different scans
    assert "shape (voxels)  smallest 16 × 16 × 4 (dicom series " in scans
    assert "median per axis 16 × 16 × 8   largest 16 × 16 × 16 (nifti_case.nii.gz)" in scans
    assert "spacing         finest 0.5 × 0.75 × 2 mm (dicom series " in scans
    assert "median per axis 0.7 × 0.75 × 2.5 mm   coarsest 1 × 1.25 × 2 mm (mha_case.mha)" in scans
    assert "orientation     LPS 4, RAS 1" in scans
    # Without recorded facts the headers are read instead.
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for dataset in manifest["datasets"]:
        for subject in dataset["subjects"]:
            for study in subject["studies"]:
                for scan in study["scans"]:
                    del scan["shape"], scan["spacing"], scan["orientation"]
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(manifest), encoding="utf-8")
    assert manifest_stats(stripped).split("\n", 1)[1] == text.split("\n", 1)[1]


def test_the_data_file_of_a_metaimage_header_is_no_false_alarm(tmp_path):
    """Issue 16 item 13: ``case.raw`` beside ``case.mhd`` is the volume's voxel data, not an unsupported file."""
    root = tmp_path / "mhd"
    write_itk(root / "case.mhd", ramp(), spacing=(1.0, 1.0, 2.0))
    assert sorted(path.name for path in root.iterdir()) == ["case.mhd", "case.raw"]
    (root / "stray.raw").write_bytes(b"\0" * 16)  # data without its header is still reported
    path, problems = build_manifest_from_folder(root, output=tmp_path / "m.json")
    assert [Path(entry["image"]).name for entry in to_datalist(load_manifest(path))] == ["case.mhd"]
    assert len(problems) == 1 and "stray.raw has the unsupported extension '.raw'" in problems[0]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "doubled"])
def test_a_dicom_series_with_a_missing_corrupt_or_doubled_slice_is_reported(tmp_path, damage):
    """Issue 16 item 8: itk places the slices from the first and last position, so a gap became an averaged spacing
    (23 slices at 2.09 mm for 24 at 2 mm) and the series was accepted."""
    files = write_dicom_series(tmp_path / "scans" / "PAT1", ramp((SIDE, SIDE, 8)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                               patient="PAT1", study="1.2.3", series="1.2.3.9", description="axial")
    if damage == "missing":
        files[3].unlink()
    elif damage == "corrupt":
        files[3].write_bytes(files[3].read_bytes()[:200])  # cut short inside its header
    else:
        shutil.copy(files[3], files[3].with_name("slice003_copy.dcm"))
    records, problems = scan_folder(tmp_path / "scans")
    assert records == [] and len(problems) == 1, problems
    assert problems[0].startswith("the DICOM series 1.2.3.9") and "has unevenly spaced slices (" in problems[0]
    assert "a slice is missing, corrupt or doubled; export the series again or remove it." in problems[0]
