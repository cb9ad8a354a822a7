"""Headers that lie (issue 16 items 7 and 9): a tiny file claiming a huge volume is refused before anything is
allocated, in every place that reads volumes; a volume with broken geometry is reported by build and check."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voco.data.volume_checks import DEFAULT_MAX_VOXELS, check_volume, max_voxels, size_problems


def write_header_only(path: Path, shape: tuple[int, ...], dtype=np.int16, zooms=(1.0, 1.0, 1.0)) -> Path:
    """A .nii.gz holding a header that claims `shape` and almost no voxel data (a few dozen bytes compressed)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms(zooms)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    with gzip.open(path, "wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


# A child process reads the bomb under an address-space limit of what it holds after its imports + 1.5 GB: reading
# the claimed 1100³ int16 voxels (2.7 GB) there would end in MemoryError instead of the sentence.
BOMB_SCRIPT = r"""
import resource, sys
from pathlib import Path
from monai import transforms as mt
from voco.data.folder import build_manifest_from_folder
from voco.data.manifest_checks import check_manifest
from voco.data.regions import preset_transforms, volume_error
from voco.data.volume_checks import check_volume
from voco.errors import VolumeError

folder, bomb = Path(sys.argv[1]), sys.argv[2]
held = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (held + 1536 * 2**20, resource.RLIM_INFINITY))
print("check_volume:", check_volume(bomb)[0])
manifest, skipped = build_manifest_from_folder(folder / "data", output=folder / "manifest.json", read_voxels=True)
print("build:", skipped[0])
rows = check_manifest(sys.argv[3])
print("check:", rows[0]["problem"])
try:
    mt.Compose(preset_transforms("ct_abdomen", (16, 16, 16)))({"image": bomb})
except Exception as error:  # MONAI's Compose wraps it; the loader names the volume as volume_error does
    print("loader:", volume_error({"image": bomb}, error))
"""


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory) -> Path:
    from voco.data.phantoms import ensure_phantoms

    folder = tmp_path_factory.mktemp("bomb")
    (folder / "data").mkdir()
    write_header_only(folder / "data" / "bomb.nii.gz", (1100, 1100, 1100))
    ensure_phantoms(folder / "data" / "good", n=1, seed=0)
    return folder


def test_a_header_claiming_1100_cubed_voxels_is_refused_before_allocation(bomb_folder: Path, tmp_path: Path):
    import json

    bomb = bomb_folder / "data" / "bomb.nii.gz"
    assert bomb.stat().st_size < 200
    manifest = tmp_path / "bomb_datalist.json"  # a datalist naming the bomb, as one written by hand would
    manifest.write_text(json.dumps({"training": [{"image": str(bomb)}]}))
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(bomb_folder), str(bomb), str(manifest)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sentence = f"{bomb} claims 1100 × 1100 × 1100 voxels (1.33e+09), more than the 1.07e+09 voco reads " \
               f"(VOCO_MAX_VOXELS); raise VOCO_MAX_VOXELS if the volume is real, else remove it."
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["check_volume"] == sentence
    assert lines["build"] == sentence
    assert lines["check"] == sentence
    assert lines["loader"].startswith(f"volume {bomb} ") and sentence[:-1] in lines["loader"]


def test_a_volume_that_resampling_would_blow_up_is_refused(tmp_path: Path):
    # 4e6 voxels of 1 mm on disk, resampled to 0.05 mm (a typo in a spacing): every axis grows 20-fold
    problems = size_problems("scan.nii.gz", (200, 200, 100), (1.0, 1.0, 1.0), (0.05, 0.05, 0.05))
    assert problems == ["scan.nii.gz would hold 3.2e+10 voxels once resampled from 1, 1, 1 mm to 0.05, 0.05, 0.05 "
                        "mm, more than the 1.07e+09 voco reads (VOCO_MAX_VOXELS); check its spacing, or raise "
                        "VOCO_MAX_VOXELS if the volume is real, else remove it."]
    assert size_problems("scan.nii.gz", (200, 200, 100), (1.0, 1.0, 1.0), (1.5, 1.5, 1.5)) == []


def test_the_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_header_only(tmp_path / "big.nii.gz", (64, 64, 64))
    assert max_voxels() == DEFAULT_MAX_VOXELS == 2 ** 30
    monkeypatch.setenv("VOCO_MAX_VOXELS", "100000")
    assert check_volume(path, read_voxels=False) == [
        f"{path} claims 64 × 64 × 64 voxels (2.62e+05), more than the 1e+05 voco reads (VOCO_MAX_VOXELS); raise "
        f"VOCO_MAX_VOXELS if the volume is real, else remove it."]
    monkeypatch.setenv("VOCO_MAX_VOXELS", "lots")
    with pytest.raises(Exception, match=r"^VOCO_MAX_VOXELS='lots' is not a positive number of voxels; set it to "
                                        r"e.g. 1073741824 or unset it.$"):
        max_voxels()


def write_volume(path: Path, shape=(12, 12, 8)) -> Path:
    image = nib.Nifti1Image(np.random.default_rng(0).integers(-100, 100, shape).astype(np.int16),
                            np.diag([1.0, 1.0, 2.0, 1.0]))
    nib.save(image, path)
    return path


def patch_header(path: Path, **fields) -> Path:
    """Overwrite header fields in the file's bytes, as a broken converter would (nibabel itself refuses to write
    most of these)."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    for name, value in fields.items():
        header[name] = value
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))
    return path


@pytest.fixture
def broken_geometry(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with one good volume and three whose geometry is broken -> (folder, {file: expected sentence})."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_volume(folder / "good.nii.gz")
    orientation = ("has an orientation matrix (NIfTI sform/qform, or the image direction) that is not finite or "
                   "leaves an axis without a direction, so its anatomy cannot be placed; fix its header or remove it.")
    expected = {
        "nan.nii.gz": orientation,
        "zero_column.nii.gz": orientation,
        "negative.nii": "claims a negative size (shape 12 × 12 × -8); fix its header or remove it.",
    }
    # the sform alone places these volumes (qform code 0), so the broken sform is what every reader uses
    patch_header(write_volume(folder / "nan.nii.gz"), qform_code=0, sform_code=1, srow_x=[np.nan, 0, 0, 0])
    patch_header(write_volume(folder / "zero_column.nii.gz"), qform_code=0, sform_code=1, srow_x=[1, 0, 0, 0],
                 srow_y=[0, 0, 0, 0], srow_z=[0, 0, 2, 0])
    patch_header(write_volume(folder / "negative.nii"), dim=[3, 12, 12, -8, 1, 1, 1, 1])
    return folder, expected


def test_broken_geometry_is_skipped_by_build_and_flagged_by_check(broken_geometry, tmp_path: Path):
    import json

    from voco.data.folder import build_manifest_from_folder
    from voco.data.manifest_checks import check_manifest

    folder, expected = broken_geometry
    for name, sentence in expected.items():
        problems = check_volume(folder / name, read_voxels=False)
        assert problems and problems[0] == f"{folder / name} {sentence}", (name, problems)
    manifest, skipped = build_manifest_from_folder(folder, output=tmp_path / "manifest.json")
    assert sorted(skipped) == sorted(f"{folder / name} {sentence}" for name, sentence in expected.items())
    written = json.loads(manifest.read_text())
    scans = [scan for subject in written["datasets"][0]["subjects"] for study in subject["studies"]
             for scan in study["scans"]]
    assert [Path(scan["image"]).name for scan in scans] == ["good.nii.gz"]
    assert all(size > 0 for size in scans[0]["shape"])
    # a manifest written by hand that names them: check flags each, with the same sentence
    written["datasets"][0]["subjects"] += [{"id": name, "studies": [{"id": "0", "scans": [{"image": name}]}]}
                                           for name in expected]
    by_hand = tmp_path / "by_hand.json"
    by_hand.write_text(json.dumps(written))
    rows = check_manifest(by_hand, read_voxels=False)
    assert sorted(row["problem"] for row in rows) == sorted(skipped)
