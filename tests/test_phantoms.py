"""Synthetic CT phantoms: determinism, anatomy in world space, HU values, files on disk and their manifest."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest

from voco.data.manifest import load_manifest, to_datalist
from voco.data.phantoms import (ALL_ORIENTATIONS, CLASS_INDEX, PHANTOM_CLASSES, STAMP_NAME, ensure_phantom_studies,
                                ensure_phantoms, make_phantom, synthesize)
from voco.errors import ConfigError, VocoError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"shape_range": [[40, 48], [40, 48], [20, 24]]}


def centroid(label: np.ndarray, name: str) -> np.ndarray:
    """Mean voxel index of a class in a [X, Y, Z] label map."""
    indices = np.argwhere(label == CLASS_INDEX[name])
    assert len(indices), f"{name} is missing from the label map"
    return indices.mean(axis=0)


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder an array to RAS voxel order with nibabel (the reference for what MONAI's Orientationd does)."""
    return nibabel.orientations.apply_orientation(array, nibabel.orientations.io_orientation(affine))


def siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name != folder.name)


def test_make_phantom_is_deterministic_for_a_seed_and_differs_across_seeds():
    first, again, other = (make_phantom(seed, shape=(48, 48, 24)) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.label, again.label)
    np.testing.assert_array_equal(first.affine, again.affine)
    assert (first.orientation, first.report, first.attributes) == (again.orientation, again.report, again.attributes)
    assert first.image.dtype == np.float32 and first.label.dtype == np.uint8 and first.image.shape == first.shape
    assert np.abs(first.image - other.image).mean() > 10.0
    assert not np.array_equal(first.label, other.label)


def test_every_orientation_stores_the_same_anatomy_with_a_matching_affine():
    reference = make_phantom(5, shape=(12, 10, 8), spacing=(1.0, 1.5, 3.0), orientation="RAS")
    for code in ALL_ORIENTATIONS:
        phantom = make_phantom(5, shape=(12, 10, 8), spacing=(1.0, 1.5, 3.0), orientation=code)
        assert "".join(nibabel.aff2axcodes(phantom.affine)) == code == phantom.orientation
        np.testing.assert_array_equal(to_ras(phantom.image, phantom.affine), reference.image)
        np.testing.assert_array_equal(to_ras(phantom.label, phantom.affine), reference.label)
        # The same voxels sit at the same world positions: the centre voxel maps to the world origin.
        centre = (np.asarray(phantom.shape) - 1) / 2
        np.testing.assert_allclose(nibabel.affines.apply_affine(phantom.affine, centre), 0.0, atol=1e-9)
        assert sorted(phantom.spacing) == pytest.approx(sorted(reference.spacing))


def test_labels_and_hounsfield_values_are_plausible():
    phantom = make_phantom(1, shape=(64, 64, 40), spacing=(1.5, 1.5, 3.0), lesion_probability=1.0)
    image, label = to_ras(phantom.image, phantom.affine), to_ras(phantom.label, phantom.affine)
    assert set(np.unique(label)) == set(PHANTOM_CLASSES), "every class, lesion included, is drawn"

    def median(name: str) -> float:
        return float(np.median(image[label == CLASS_INDEX[name]]))

    assert abs(np.median(image[:4, :4, :]) + 1000) < 20, "air outside the body"
    assert 45 < median("liver") < 75 and 35 < median("spleen") < 60
    assert 30 < median("kidney_left") < 170 and -10 < median("bladder") < 25
    assert median("aorta") > 100 and median("lesion") < median("liver") - 15
    assert 400 < np.percentile(image[label == CLASS_INDEX["spine"]], 90) < 1100
    body = (image > -500) & (label == 0)
    assert np.mean(image[body] < -60) > 0.1, "fat (about -100 HU) under the skin and around the bowel"
    assert -1024 <= image.min() and image.max() < 1300
    # The background is noisy (10-20 HU), not flat.
    assert 8 < np.std(image[:4, :4, :]) < 25


def test_attributes_and_report_follow_the_content():
    normal = make_phantom(2, shape=(48, 48, 24), lesion_probability=0.0, enlarged_spleen_probability=0.0)
    assert normal.attributes == {"lesion": False, "lesion_count": 0, "lesion_organs": [], "enlarged_spleen": False}
    assert "Impression: no focal lesion" in normal.report and "Spleen: normal size." in normal.report
    assert not (normal.label == CLASS_INDEX["lesion"]).any()

    ill = make_phantom(2, shape=(48, 48, 24), lesion_probability=1.0, enlarged_spleen_probability=1.0)
    assert ill.attributes["lesion"] and ill.attributes["enlarged_spleen"] and ill.attributes["lesion_count"] >= 1
    assert "Spleen: enlarged." in ill.report and "splenomegaly" in ill.report
    for organ in ill.attributes["lesion_organs"]:
        assert {"liver": "Liver: ", "kidney_left": "left kidney", "kidney_right": "right kidney"}[organ] in ill.report
    assert (ill.label == CLASS_INDEX["lesion"]).any()
    # Same seed, same body: the enlarged spleen is much bigger than the normal one.
    spleen = CLASS_INDEX["spleen"]
    assert (ill.label == spleen).sum() > 1.8 * (normal.label == spleen).sum()


def test_bad_arguments_are_reported_as_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="XYZ"):
        make_phantom(0, orientation="XYZ")
    with pytest.raises(ConfigError, match="shape_range"):
        make_phantom(0, shape_range=[[40, 30], [40, 48], [20, 24]])
    with pytest.raises(ConfigError, match="number of phantoms"):
        synthesize(tmp_path / "set", n=0)
    with pytest.raises(ConfigError, match="colour"):
        ensure_phantoms(tmp_path / "set", n=1, colour="red")
    with pytest.raises(ConfigError, match="synthesize_studies does not take these options .*make_phantom_study"):
        ensure_phantom_studies(tmp_path / "studies", n=1, field_of_view_range=[[1, 2]] * 3)  # a make_phantom option
    assert not any(tmp_path.iterdir()), "nothing written for refused arguments"


def test_synthesized_phantoms_look_the_same_way_up_after_monai_orientation(tmp_path):
    """Written in different orientations, read by MONAI and turned to RAS: same anatomy, same layout."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    written = {}
    for code in ("RAS", "LPS", "RPI", "PIL"):
        phantom = make_phantom(6, shape=(40, 36, 20), spacing=(2.0, 2.0, 4.0), orientation=code,
                               lesion_probability=0.0)
        written[code] = (tmp_path / f"{code}.nii.gz", tmp_path / f"{code}_label.nii.gz")
        phantom.save(*written[code])
    other_seed = make_phantom(7, shape=(44, 40, 24), orientation="LAI", lesion_probability=0.0)
    written["other seed"] = (tmp_path / "other.nii.gz", tmp_path / "other_label.nii.gz")
    other_seed.save(*written["other seed"])

    readers = ["NibabelReader"] + (["ITKReader"] if importlib.util.find_spec("itk") else [])
    for reader in readers:
        load = Compose([LoadImaged(["image", "label"], reader=reader), EnsureChannelFirstd(["image", "label"]),
                        Orientationd(["image", "label"], axcodes="RAS", labels=None)])
        loaded = {code: load({"image": str(image), "label": str(label)}) for code, (image, label) in written.items()}
        reference = loaded["RAS"]["label"][0].numpy()
        for code, item in loaded.items():
            label = item["label"][0].numpy()
            if code != "other seed":
                np.testing.assert_array_equal(label, reference, err_msg=f"{code} read by {reader}")
                np.testing.assert_allclose(item["image"].numpy(), loaded["RAS"]["image"].numpy(), atol=0.5)
            # RAS+: x grows towards the patient's right, y anterior, z superior.
            liver, spleen = centroid(label, "liver"), centroid(label, "spleen")
            assert liver[0] > spleen[0], f"liver right of the spleen ({code}, {reader})"
            assert centroid(label, "kidney_right")[0] > centroid(label, "kidney_left")[0]
            assert liver[2] > centroid(label, "bladder")[2] and liver[2] > centroid(label, "hip_bones")[2]
            assert centroid(label, "kidney_left")[2] > centroid(label, "hip_bones")[2]
            assert centroid(label, "aorta")[1] > centroid(label, "spine")[1], "aorta in front of the spine"
            assert centroid(label, "stomach")[1] > centroid(label, "spine")[1]


def test_synthesize_writes_files_and_a_manifest_that_load_manifest_reads(tmp_path):
    out_dir = tmp_path / "phantoms"
    manifest_path = synthesize(out_dir, n=3, seed=1, **SMALL)
    assert manifest_path == out_dir / "manifest.json"
    assert siblings(out_dir) == [], "no temporary folder left beside the set"

    manifest = load_manifest(manifest_path)
    assert [(d["name"], d["modality"], d["preset"]) for d in manifest["datasets"]] == [("phantoms", "CT", "ct_abdomen")]
    datalist = to_datalist(manifest)
    assert [entry["subject"] for entry in datalist] == ["phantom_0000", "phantom_0001", "phantom_0002"]
    for index, entry in enumerate(datalist):
        image, label = nibabel.load(entry["image"]), nibabel.load(entry["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert list(image.shape) == entry["shape"]
        assert "".join(nibabel.aff2axcodes(image.affine)) == entry["orientation"]
        np.testing.assert_allclose(image.header.get_zooms(), entry["spacing"], atol=1e-3)
        phantom = make_phantom((1, index), **SMALL)  # phantom i of a set is make_phantom((seed, i))
        assert entry["report"] == phantom.report and entry["attributes"] == phantom.attributes
        np.testing.assert_array_equal(np.asarray(label.dataobj), phantom.label)
        np.testing.assert_allclose(np.asarray(image.dataobj), phantom.image, atol=0.51)

    unlabelled = synthesize(tmp_path / "unlabelled", n=1, with_labels=False, name="plain", **SMALL)
    assert "label" not in to_datalist(load_manifest(unlabelled))[0]
    assert not (tmp_path / "unlabelled" / "labels").exists()


def test_ensure_phantoms_reuses_a_complete_set_and_rewrites_an_incomplete_one(tmp_path):
    out_dir = tmp_path / "set"
    manifest = ensure_phantoms(out_dir, 2, 0, **SMALL)
    files = sorted(path for path in out_dir.rglob("*") if path.is_file())
    modified = {path: path.stat().st_mtime_ns for path in files}

    assert ensure_phantoms(out_dir, 2, 0, **SMALL) == manifest
    assert {path: path.stat().st_mtime_ns for path in files} == modified, "a complete set is not rewritten"

    (out_dir / "labels" / "phantom_0001.nii.gz").unlink()
    ensure_phantoms(out_dir, 2, 0, **SMALL)
    assert (out_dir / "labels" / "phantom_0001.nii.gz").is_file()
    assert len(to_datalist(load_manifest(manifest))) == 2

    ensure_phantoms(out_dir, 3, 0, **SMALL)  # other arguments: a new set replaces the old one
    assert len(to_datalist(load_manifest(manifest))) == 3
    assert json.loads((out_dir / STAMP_NAME).read_text())["arguments"]["n"] == 3
    assert [name for name in siblings(out_dir) if not name.endswith(".lock")] == []


def test_ensure_phantoms_from_two_processes_at_once_gives_one_complete_set(tmp_path):
    out_dir = tmp_path / "shared"
    script = ("import sys; from voco.data.phantoms import ensure_phantoms; "
              f"print(ensure_phantoms(sys.argv[1], 3, 5, shape_range={SMALL['shape_range']!r}))")
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(out_dir)], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert {stdout.strip() for stdout, _ in outputs} == {str(out_dir / "manifest.json")}
    datalist = to_datalist(load_manifest(out_dir / "manifest.json"))
    assert len(datalist) == 3 and all(Path(entry["image"]).is_file() for entry in datalist)
    assert [name for name in siblings(out_dir) if not name.endswith(".lock")] == []


def test_refused_destinations_are_left_as_they_were(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(VocoError, match="not a folder"):
        synthesize(a_file, n=1, **SMALL)
    assert a_file.read_text() == "keep me"

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("a,b\n")
    with pytest.raises(VocoError, match="other files"):
        ensure_phantoms(foreign, 1, **SMALL)
    assert [path.name for path in foreign.iterdir()] == ["table.csv"]
    leftovers = [name for name in os.listdir(tmp_path) if name not in ("notes.txt", "results")]
    assert [name for name in leftovers if not name.endswith(".lock")] == [], "no half-written output"


def test_a_written_set_is_readable_by_colleagues_under_the_umask(tmp_path):
    """mkdtemp makes the staging folder 0700; the set renamed into place has the mode a mkdir gives (issue 16)."""
    previous = os.umask(0o022)
    try:
        ensure_phantoms(tmp_path / "set", 1, 0, **SMALL)
    finally:
        os.umask(previous)
    assert (tmp_path / "set").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "set" / "manifest.json").stat().st_mode & 0o777 == 0o644


def _rendered(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float)


def test_pictures_are_in_radiological_convention_with_orientation_letters(tmp_path):
    """A phantom written in LPS, read and turned to RAS as every pipeline does, drawn with `show_axial`: the
    liver (the patient's right) on the image's left, the aorta (anterior) above the spine, letters R L A P."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    from voco.pretext.views import new_figure, show_axial

    phantom = make_phantom(6, shape=(40, 36, 20), spacing=(2.0, 2.0, 4.0), orientation="LPS", lesion_probability=0.0)
    phantom.save(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz")
    loaded = Compose([LoadImaged(["label"]), EnsureChannelFirstd(["label"]),
                      Orientationd(["label"], axcodes="RAS", labels=None)])({"label": str(tmp_path / "label.nii.gz")})
    label = loaded["label"][0].numpy()
    z = int(round(centroid(label, "liver")[2]))
    drawn = {}
    for organ in ("liver", "spleen", "aorta", "spine"):
        figure, axes = new_figure(3.0, 3.0, 1, 1)
        show_axial(axes[0, 0], (label[:, :, z] == CLASS_INDEX[organ]).astype(float), letters=True, cmap="gray",
                   vmin=0, vmax=1)
        assert [text.get_text() for text in axes[0, 0].texts] == ["R", "L", "A", "P"]
        pixels = _rendered(figure)
        box = axes[0, 0].get_window_extent()  # display coordinates: y from the bottom
        inside = pixels[int(pixels.shape[0] - box.y1) + 1:int(pixels.shape[0] - box.y0) - 1,
                        int(box.x0) + 1:int(box.x1) - 1]
        bright = np.argwhere(inside.min(axis=-1) > 200)  # the white organ (the letters are yellow)
        assert len(bright) > 20, f"no {organ} in slice {z}"
        drawn[organ] = bright.mean(axis=0)  # (row, column) on the image
    assert drawn["liver"][1] < drawn["spleen"][1], "the patient's right (liver) on the image's left"
    assert drawn["aorta"][0] < drawn["spine"][0], "anterior (aorta) above posterior (spine)"
