"""Presets and the region pipeline on the real CT and MR volumes, and the bad-volume policies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_bad_volumes, write_volume
from monai import transforms as mt

from voco.data.presets import PRESETS, get_preset
from voco.data.regions import build_region_dataset, build_region_loader, preset_transforms
from voco.errors import ConfigError, VolumeError


def preset_output(path, preset, region_size, keep_meta=True):
    """Run a preset; with keep_meta the last two steps (drop metadata, select keys) are left out."""
    steps = preset_transforms(preset, region_size)
    return mt.Compose(steps[:-2] if keep_meta else steps)({"image": str(path)})["image"]


@pytest.mark.parametrize("file_name, preset", [("ct_thorax_1p5mm.nii.gz", "ct_abdomen"),
                                               ("ct_abdomen_3mm.nii.gz", "ct_chest"),
                                               ("mr_abdomen_3mm.nii.gz", "mr_zscore")])
def test_preset_orients_to_ras_at_the_preset_spacing(shared_data, file_name, preset):
    source = nib.load(shared_data / file_name)
    image = preset_output(shared_data / file_name, preset, (16, 16, 16))
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(image.pixdim.numpy(), get_preset(preset).spacing, rtol=1e-5)
    # the LPS thorax file really is flipped on disk, so this checks a reorientation, not a no-op
    if "thorax" in file_name:
        assert nib.aff2axcodes(source.affine)[:2] == ("L", "P")


def test_reorientation_keeps_anatomy(shared_data):
    """The same LPS volume, resampled to RAS by the preset, matches nibabel's own reorientation voxel by voxel."""
    path = shared_data / "ct_thorax_1p5mm.nii.gz"
    image = mt.Compose(preset_transforms("ct_abdomen", (8, 8, 8))[:5])({"image": str(path)})["image"]  # size..RAS
    source = nib.load(path)
    ras = nib.as_closest_canonical(source).get_fdata()
    np.testing.assert_array_equal(image[0].numpy(), ras.astype(np.float32))


@pytest.mark.parametrize("preset, window", [("ct_abdomen", (-175, 250)), ("ct_chest", (-1000, 500))])
def test_hu_window_scales_to_unit_range(shared_data, preset, window):
    image = preset_output(shared_data / "ct_abdomen_3mm.nii.gz", preset, (16, 16, 16), keep_meta=False)
    assert image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    raw = nib.load(shared_data / "ct_abdomen_3mm.nii.gz").get_fdata()
    assert raw.min() < window[0] and raw.max() > window[1]  # the window really clips this volume


def test_mr_preset_is_zscored_over_the_foreground(shared_data):
    image = preset_output(shared_data / "mr_abdomen_3mm.nii.gz", "mr_zscore", (16, 16, 16), keep_meta=False)
    foreground = image[image != 0]
    assert abs(float(foreground.mean())) < 0.05 and abs(float(foreground.std()) - 1.0) < 0.05


def test_small_volumes_are_padded_to_the_region(shared_data):
    """The MR volume is 20 slices of 3 mm (40 at 1.5 mm): padded to a 64-slice region, not rejected."""
    dataset = build_region_dataset([{"image": str(shared_data / "mr_abdomen_3mm.nii.gz"), "preset": "mr_zscore"}],
                                   region_size=(192, 192, 64))
    item = dataset[0]
    assert tuple(item["image"].shape) == (1, 192, 192, 64) and item["skipped_volumes"] == 0


def test_resize_preset_delivers_exactly_the_region(shared_data):
    image = preset_output(shared_data / "ct_thorax_1p5mm.nii.gz", "ct_resize", (48, 40, 24), keep_meta=False)
    assert tuple(image.shape) == (1, 48, 40, 24)


def test_loader_batches_regions_from_mixed_presets(shared_data, tmp_path):
    datalist = [{"image": str(shared_data / "ct_abdomen_3mm.nii.gz"), "preset": "ct_abdomen"},
                {"image": str(shared_data / "mr_abdomen_3mm.nii.gz"), "preset": "mr_zscore"}]
    loader = build_region_loader(datalist, region_size=(64, 64, 32), batch_size=2, num_workers=0,
                                 cache="disk", cache_dir=tmp_path / "cache")
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 1, 64, 64, 32)
    assert batch["skipped_volumes"].tolist() == [0, 0]
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 2  # one preprocessed volume per file, under a folder per preset
    assert {path.parent.name.split("-")[0] for path in cached} == {"ct_abdomen", "mr_zscore"}


@pytest.fixture
def mixed_datalist(tmp_path):
    """Two good volumes and five bad ones: missing, truncated, 2-D, NaN, empty."""
    rng = np.random.default_rng(0)
    good = [write_volume(tmp_path / f"good{i}.nii.gz", rng.uniform(-100, 200, (20, 20, 12))) for i in range(2)]
    bad = write_bad_volumes(tmp_path / "bad")
    entries = [{"image": path, "dataset": "d", "subject": str(i), "study": "0", "scan_index": 0}
               for i, path in enumerate(good[:1] + bad + good[1:])]
    return entries, bad


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_bad_volumes_are_skipped_and_counted(mixed_datalist, cache):
    entries, bad = mixed_datalist
    dataset = build_region_dataset(entries, region_size=(16, 16, 8), cache=cache, max_bad_fraction=1.0)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(tuple(item["image"].shape) == (1, 16, 16, 8) for item in items)
    # index 1 walks over the five bad volumes to the second good one; later bad indices are already known
    assert items[1]["skipped_volumes"] == len(bad)
    assert sum(item["skipped_volumes"] for item in items) == len(bad)
    assert dataset.known_bad == set(range(1, 1 + len(bad)))


def test_strict_policy_names_the_file_and_entry(mixed_datalist):
    entries, bad = mixed_datalist
    dataset = build_region_dataset(entries, region_size=(16, 16, 8), bad_volumes="stop", max_bad_fraction=1.0)
    assert tuple(dataset[0]["image"].shape) == (1, 16, 16, 8)
    for index, path in enumerate(bad, start=1):
        with pytest.raises(VolumeError) as error:
            dataset[index]
        message = str(error.value)
        assert path in message and f"d/{index}/0/0" in message and "\n" not in message


def test_a_mostly_bad_manifest_fails_before_any_volume_is_preprocessed(mixed_datalist):
    entries, bad = mixed_datalist  # 5 bad of 7; the headers show 3 of them (missing, 2-D, empty): 3/7 = 0.43
    with pytest.raises(VolumeError, match=r"3 of the 7 volumes checked before training cannot be used \(the first: "
                                          r".*missing.nii.gz.*max_bad_fraction above 0.43"):
        build_region_dataset(entries, region_size=(16, 16, 8), max_bad_fraction=0.4)
    assert len(build_region_dataset(entries, region_size=(16, 16, 8), max_bad_fraction=0.5)) == 7


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="region_size"):
        build_region_dataset([{"image": "x.nii.gz"}], region_size=(0, 4, 4))
    with pytest.raises(ConfigError, match="cache"):
        build_region_dataset([{"image": "x.nii.gz"}], cache="ssd")
    with pytest.raises(ConfigError, match="bad_volumes"):
        build_region_dataset([{"image": "x.nii.gz"}], bad_volumes="ignore")
    with pytest.raises(ConfigError, match="preset"):
        build_region_dataset([{"image": "x.nii.gz", "preset": "ct_brain"}])
    assert set(PRESETS) == {"ct_abdomen", "ct_chest", "ct_resize", "mr_zscore", "ct_rate"}


def test_the_manifest_is_sharded_into_equal_disjoint_parts_per_rank():
    from voco.data.regions import shard_for_rank

    datalist = [{"image": f"v{i}.nii.gz"} for i in range(7)]
    shards = [shard_for_rank(datalist, seed=3, rank=rank, world_size=3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 3, 3]  # 7 volumes: two repeats pad the last parts
    images = [entry["image"] for shard in shards for entry in shard]
    assert set(images) == {entry["image"] for entry in datalist} and len(set(images)) == 7
    assert shards == [shard_for_rank(datalist, seed=3, rank=rank, world_size=3) for rank in range(3)]  # seeded
    assert shard_for_rank(datalist) == datalist  # not distributed: everything
    assert shard_for_rank(datalist, seed=3, shard=False, rank=1, world_size=3) == datalist  # shard_manifest: false
    with pytest.raises(ConfigError, match="2 training volumes for 4 ranks"):
        shard_for_rank(datalist[:2], rank=0, world_size=4)
