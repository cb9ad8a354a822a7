"""The compact cache: what the model sees after a cache round trip, the versioned cache key, the footprint."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from voco.data.phantoms import synthesize
from voco.data.compact import CompactIntensityd, ExpandIntensityd, UnpackCompactd
from voco.data.regions import build_region_dataset, cache_folder_name, preset_transforms
from voco.errors import ConfigError

UINT16_BOUND = 0.5 / 65535 + 2.0 ** -25  # half a quantisation step + float32 rounding of the division
FLOAT16_RELATIVE = 2.0 ** -11  # half a float16 step
REAL_VOLUMES = [("ct_abdomen_3mm.nii.gz", "ct_abdomen"), ("ct_thorax_1p5mm.nii.gz", "ct_chest"),
                ("mr_abdomen_3mm.nii.gz", "mr_zscore")]


def round_trip(image: torch.Tensor, dtype: str, compress: bool) -> tuple[dict, torch.Tensor]:
    """Compact (and compress), then unpack and expand, as the cache and the region step do -> (stored, values)."""
    stored = CompactIntensityd(keys=["image"], dtype=dtype, compress=compress)({"image": image})
    item = UnpackCompactd(keys=["image"], dtype=dtype)(stored) if compress else stored
    return stored, ExpandIntensityd(keys=["image"])(item)["image"]


@pytest.mark.parametrize("compress", [False, True])
def test_unit_intensities_come_back_within_half_a_uint16_step(compress):
    generator = torch.Generator().manual_seed(0)
    # random values, the ends of the range, and values exactly half-way between two steps (the worst case)
    image = torch.cat([torch.rand(3998, generator=generator), torch.tensor([0.0, 1.0]),
                       (torch.arange(100) + 0.5) / 65535]).view(1, 41, 1, 100)
    stored, values = round_trip(image, "uint16", compress)
    assert stored["image"].dtype == (torch.uint8 if compress else torch.uint16)
    assert values.dtype == torch.float32 and values.shape == image.shape
    error = (values - image).abs()
    assert float(error.max()) <= UINT16_BOUND
    assert float(error.max()) > 0.4 / 65535  # the half-way values really meet the bound
    assert float(values.min()) == 0.0 and float(values.max()) == 1.0  # the window's ends stay exact


def test_uint8_is_a_coarser_step_of_the_same_kind():
    image = torch.cat([torch.rand(998, generator=torch.Generator().manual_seed(2)), torch.tensor([0.0, 1.0])])
    stored, values = round_trip(image.view(1, 10, 10, 10), "uint8", compress=False)
    assert stored["image"].dtype == torch.uint8
    assert float((values - image.view(1, 10, 10, 10)).abs().max()) <= 0.5 / 255 + 2.0 ** -25


@pytest.mark.parametrize("compress", [False, True])
def test_zscores_come_back_within_half_a_float16_step(compress):
    image = (torch.randn(1, 20, 20, 10, generator=torch.Generator().manual_seed(1)) * 3).float()
    image[0, 0, 0, :3] = torch.tensor([0.0, 1e-6, 1e6])  # zero, a float16 subnormal, beyond the float16 range
    _, values = round_trip(image, "float16", compress)
    assert values.dtype == torch.float32
    within = image.abs() <= 65504
    error = (values - image).abs()[within]
    assert bool((error <= torch.clamp(image.abs()[within] * FLOAT16_RELATIVE, min=2.0 ** -25)).all())
    assert float(values[0, 0, 0, 2]) == 65504.0  # clipped to the largest float16, not inf


def cache_files(folder) -> dict[str, torch.Tensor]:
    return {path.parent.name: torch.load(path, weights_only=True) for path in folder.rglob("*.pt")}


def fill_caches(entries, cache_dir, region_size, cache_dtype, compression="none"):
    dataset = build_region_dataset(entries, region_size=region_size, cache="disk", cache_dir=cache_dir,
                                   cache_dtype=cache_dtype, cache_compression=compression)
    items = [dataset[index] for index in range(len(dataset))]
    for item in items:
        assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (1, *region_size)
    return items


@pytest.mark.parametrize("file_name, preset", REAL_VOLUMES)
def test_real_volumes_round_trip_through_the_disk_cache(shared_data, tmp_path, file_name, preset):
    """What the compact cache files hold, expanded, is the float32 cache's content to the dtype's precision."""
    entries = [{"image": str(shared_data / file_name), "preset": preset}]
    region_size = (32, 32, 16)
    for cache_dtype, compression in [("float32", "none"), ("auto", "none"), ("auto", "zlib")]:
        fill_caches(entries, tmp_path / f"{cache_dtype}-{compression}", region_size, cache_dtype, compression)
    (reference,) = cache_files(tmp_path / "float32-none").values()
    assert reference["image"].dtype == torch.float32
    # the file holds just the cropped voxels, not the storage of the whole volume the crop was a view of
    assert reference["image"].untyped_storage().nbytes() == reference["image"].numel() * 4
    dtype = "float16" if preset == "mr_zscore" else "uint16"
    for compression in ("none", "zlib"):
        (stored,) = cache_files(tmp_path / f"auto-{compression}").values()
        item = UnpackCompactd(keys=["image"], dtype=dtype)(stored) if compression == "zlib" else stored
        assert item["image"].dtype == getattr(torch, dtype)
        assert item["image"].untyped_storage().nbytes() == item["image"].numel() * item["image"].element_size()
        values = ExpandIntensityd(keys=["image"])(item)["image"]
        error = (values - reference["image"]).abs()
        if dtype == "uint16":
            assert float(error.max()) <= UINT16_BOUND
        else:
            assert bool((error <= torch.clamp(reference["image"].abs() * FLOAT16_RELATIVE, min=2.0 ** -25)).all())


def test_footprint_on_disk(shared_data, tmp_path):
    """Bytes per volume: compact files are half the float32 ones and uint8 ones a quarter (plus the file format's
    fixed overhead). zlib helps where the volume holds air (the abdomen window) and hardly at all on dense tissue
    (the chest preset); the measured ratios are in benchmarks/README.md."""
    overhead = 4096
    for file_name, preset in REAL_VOLUMES:
        entries = [{"image": str(shared_data / file_name), "preset": preset}]
        settings = [("float32", "none"), ("auto", "none"), ("auto", "zlib")]
        settings += [("uint8", "none")] if preset != "mr_zscore" else []
        sizes = {}
        for cache_dtype, compression in settings:
            folder = tmp_path / preset / f"{cache_dtype}-{compression}"
            fill_caches(entries, folder, (32, 32, 16), cache_dtype, compression)
            (path,) = folder.rglob("*.pt")
            sizes[cache_dtype, compression] = path.stat().st_size
        float32 = sizes["float32", "none"]
        assert sizes["auto", "none"] <= float32 / 2 + overhead
        assert sizes["auto", "zlib"] <= sizes["auto", "none"] + overhead
        if preset == "ct_abdomen":
            assert sizes["auto", "zlib"] <= 0.7 * sizes["auto", "none"]
        if preset != "mr_zscore":
            assert sizes["uint8", "none"] <= float32 / 4 + overhead


def test_the_cache_key_names_the_stored_dtype(tmp_path):
    names = {cache_folder_name("ct_abdomen", (32, 32, 16), dtype, compression)
             for dtype, compression in [("float32", "none"), ("uint16", "none"), ("uint16", "zlib")]}
    assert len(names) == 3 and all(name.startswith("ct_abdomen-") for name in names)
    assert cache_folder_name("ct_abdomen", (32, 32, 16), "uint16") != cache_folder_name("ct_abdomen", (32, 32, 8),
                                                                                         "uint16")
    # Compact and float32 caches of the same files in one cache_dir live side by side; neither reads the other.
    manifest = synthesize(tmp_path / "phantoms", n=2, shape_range=[[40, 48], [40, 48], [20, 24]])
    images = sorted(str(path) for path in (manifest.parent / "images").glob("*.nii.gz"))
    entries = [{"image": image, "preset": "ct_abdomen"} for image in images]
    for cache_dtype in ("auto", "float32"):
        fill_caches(entries, tmp_path / "cache", (16, 16, 8), cache_dtype)
    folders = {path.parent.name: path.parent for path in (tmp_path / "cache").rglob("*.pt")}
    assert sorted(name.split("-")[1] for name in folders) == ["float32", "uint16"]
    for folder in folders.values():
        dtypes = {value["image"].dtype for value in cache_files(folder).values()}
        assert len(list(folder.glob("*.pt"))) == 2 and len(dtypes) == 1


def test_the_memory_cache_is_compact_too(tmp_path):
    path = tmp_path / "volume.nii.gz"
    array = np.random.default_rng(0).uniform(-300, 400, (24, 24, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    dataset = build_region_dataset([{"image": str(path), "preset": "ct_resize"}], region_size=(16, 16, 8),
                                   cache="memory")
    assert dataset.dataset._cache[0]["image"].dtype == torch.uint16
    region = dataset[0]["image"]
    assert region.dtype == torch.float32 and tuple(region.shape) == (1, 16, 16, 8)
    # ct_resize resizes the whole foreground to the region, so the region is the whole cached volume
    expected = mt.Compose(preset_transforms("ct_resize", (16, 16, 8)))({"image": str(path)})["image"]
    assert float((region - expected).abs().max()) <= UINT16_BOUND


def test_bad_cache_settings_are_refused():
    with pytest.raises(ConfigError, match="cache_dtype"):
        build_region_dataset([{"image": "x.nii.gz"}], cache_dtype="int8")
    with pytest.raises(ConfigError, match="cache_compression"):
        build_region_dataset([{"image": "x.nii.gz"}], cache_compression="lz4")
    with pytest.raises(ConfigError, match="cache_compression"):
        build_region_dataset([{"image": "x.nii.gz"}], cache_dtype="float32", cache_compression="zlib")
    with pytest.raises(ConfigError, match="uint8"):
        build_region_dataset([{"image": "x.nii.gz"}], preset="mr_zscore", cache_dtype="uint8")
