"""The region pipeline: manifest -> deterministic preset (cached) -> one random region of fixed size per volume.

It is shared by every pretext and never knows which one runs: it delivers batches ``{"image": [B, 1, X, Y, Z],
"skipped_volumes": [B]}`` and the pretext cuts its own views on the device (see DESIGN.md).

Bad volumes (missing, unreadable, not 3-D, empty, NaN) are skipped and counted under ``bad_volumes="skip"``:
the item of the next good volume is returned instead, and its ``skipped_volumes`` says how many bad ones were
passed over, so the count survives DataLoader workers and collation. ``bad_volumes="stop"`` raises a VolumeError
that names the file and the manifest entry.

The caches ("disk", "memory") hold the preset's output in a compact dtype (`cache_dtype="auto"`, see
`voco.data.compact`); the random-region step crops the compact volume and only then converts the region to float32.
The loader's items are seeded per (seed, epoch, item) through the `voco.seeding` contract.
"""

from __future__ import annotations

import hashlib
import logging
import os
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import json_hashing

from voco.data.channels import check_channels, image_files, stack_channels
from voco.data.manifest import load_manifest, to_datalist
from voco.data.compact import ExpandIntensityd, UnpackCompactd, compact_transforms, stored_dtype
from voco.data.presets import Preset, get_preset
from voco.errors import ConfigError, VocoError, VolumeError
from voco.progress import Progress
from voco.distributed import get_rank, world_size as ranks
from voco.seeding import random_transform_generators

logger = logging.getLogger(__name__)

BAD_VOLUME_POLICIES = ("skip", "stop")
CACHE_MODES = ("disk", "memory", "none")
CACHE_PROGRESS_MINIMUM = 50  # volumes: a smaller memory cache fills in seconds
# Part of the disk-cache key: bump it whenever what a cache file holds changes, so old folders are never read.
CACHE_FORMAT = 2
# Keys every region item carries, whatever extra facts the manifest entries hold (so batches always collate).
REGION_KEYS = ("image",)


def as_region_size(region_size: int | Sequence[int]) -> tuple[int, int, int]:
    """(x, y, z) voxels of a region given as one number or three; anything else is a `ConfigError`."""
    try:
        size = (int(region_size),) * 3 if isinstance(region_size, (int, np.integer)) else \
            tuple(int(s) for s in region_size if float(s) == int(s))
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1 or isinstance(region_size, str):
        raise ConfigError(f"region_size {region_size!r} must be three positive voxel counts, e.g. [192, 192, 64].")
    return size


class CheckHeaderd(mt.MapTransform):
    """Refuse a volume from its header, before it is loaded: not 3-D, empty, a broken spacing or orientation, or too
    large to read (`voco.data.volume_checks.header_problems`, the size also once resampled to `target_spacing`) -- a
    header claiming 1100³ voxels must not allocate gigabytes in every loader worker."""

    def __init__(self, keys: Sequence[str], target_spacing: Sequence[float] | None = None) -> None:
        super().__init__(keys)
        self.target_spacing = target_spacing

    def __call__(self, data: Mapping) -> Mapping:
        from voco.data.volume_checks import header_problems
        from voco.data.volumes import read_header

        for key in self.key_iterator(data):
            for path in image_files(data[key]):  # several for stacked channels
                if not isinstance(path, (str, os.PathLike)):
                    continue  # already an array: nothing left to refuse before allocation
                series = data.get("series") if key == self.keys[0] else None  # a DICOM series is the image's
                problems = header_problems(read_header(path, series=series), target_spacing=self.target_spacing)
                if problems:
                    raise VolumeError(problems[0])
        return data


class CheckVolumed(mt.MapTransform):
    """Check each loaded volume (3-D, not empty, finite) so a bad file fails with its name, not deep in a transform.
    The image of an entry with stacked ``channels`` (`voco.data.channels`) has one channel per name."""

    def __init__(self, keys: Sequence[str], check: Callable[..., None]) -> None:
        super().__init__(keys)
        self.check = check

    def __call__(self, data: Mapping) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            meta = getattr(image, "meta", {})
            spacing = meta.get("pixdim")
            spacing = None if spacing is None else [float(s) for s in list(spacing)[1:4]]
            channels = len(data.get("channels") or ()) or 1 if key == self.keys[0] else 1
            self.check(image, spacing, str(meta.get("filename_or_obj", key)), channels=channels)
        return data


def preset_transforms(preset: str | Preset, region_size: Sequence[int], keys: Sequence[str] = ("image",),
                      label_keys: Sequence[str] = ()) -> list[mt.Transform]:
    """The deterministic MONAI transforms of `preset` for `keys` (images) and `label_keys` (label maps).

    Output: channel-first float32 volumes in RAS, at least `region_size` in every axis (smaller volumes are
    padded, never rejected), so a random region of that size can always be taken.
    """
    from voco.data.volume_checks import assert_valid_volume

    preset = get_preset(preset)
    region_size = as_region_size(region_size)
    keys, label_keys = list(keys), list(label_keys)
    all_keys = keys + label_keys
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    threshold = preset.foreground_threshold
    foreground = mt.CropForegroundd(keys=all_keys, source_key=keys[0], select_fn=lambda x: x > threshold,
                                    allow_smaller=True)
    steps: list[mt.Transform] = [
        CheckHeaderd(keys=all_keys, target_spacing=preset.spacing),
        mt.LoadImaged(keys=all_keys, image_only=False),
        mt.EnsureChannelFirstd(keys=all_keys),
        CheckVolumed(keys=all_keys, check=assert_valid_volume),
        mt.Orientationd(keys=all_keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if preset.spacing is not None:
        steps.append(mt.Spacingd(keys=all_keys, pixdim=preset.spacing, mode=modes))
    if preset.intensity == "window":
        low, high = preset.window
        steps += [mt.ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
                  foreground]
    else:  # MRI has no absolute scale: crop to the body first, then z-score its non-zero voxels
        steps += [foreground, mt.NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)]
    if preset.spacing is None:
        steps.append(mt.Resized(keys=all_keys, spatial_size=region_size, mode=modes))
    steps += [mt.SpatialPadd(keys=all_keys, spatial_size=region_size),
              mt.EnsureTyped(keys=all_keys, dtype=torch.float32, track_meta=False),
              mt.SelectItemsd(keys=all_keys)]
    return steps


def region_transforms(region_size: Sequence[int], keys: Sequence[str] = ("image",), cache_dtype: str = "float32",
                      compression: str = "none") -> list[mt.Transform]:
    """The random part: one region of exactly `region_size` per volume, taken after the cached preset.

    A compact cache (`cache_dtype` uint16, uint8 or float16, see `compact_transforms`) is unpacked if compressed,
    cropped, and only the region is converted to float32."""
    keys = list(keys)
    unpack = [UnpackCompactd(keys=keys, dtype=cache_dtype)] if compression == "zlib" else []
    expand = [ExpandIntensityd(keys=keys)] if cache_dtype != "float32" else []
    return unpack + [mt.RandSpatialCropd(keys=keys, roi_size=as_region_size(region_size), random_size=False)] + expand


def cache_folder_name(preset: str, region_size: Sequence[int], dtype: str, compression: str = "none") -> str:
    """The disk-cache folder of one preset: readable prefix + a key of everything that changes what is stored
    (format version, preset, region size, stored dtype, compression). The source file's identity (path, size,
    modification time) is in each file's own key (MONAI hashes the datalist entry)."""
    stored = dtype if compression == "none" else f"{dtype}.{compression}"
    key = f"v{CACHE_FORMAT}:{preset}:{tuple(region_size)}:{stored}"
    return f"{preset}-{stored}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def source_stamp(path: str | Sequence[str]) -> str:
    """Size and modification time of a file (of each file of stacked channels): part of the disk-cache key, so an
    edited file is not served stale."""
    if isinstance(path, (list, tuple)):
        return ",".join(source_stamp(part) for part in path)
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def describe_entry(entry: Mapping[str, Any]) -> str:
    parts = [str(entry.get(key)) for key in ("dataset", "subject", "study", "scan_index") if key in entry]
    return "/".join(parts) if parts else "?"


def volume_error(entry: Mapping[str, Any], error: BaseException) -> VolumeError:
    """One sentence naming the file, its manifest entry and the innermost cause."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, VocoError):
        reason = reason.rstrip(".")
    return VolumeError(f"volume {entry.get('image')} (manifest entry {describe_entry(entry)}) could not be "
                       f"preprocessed: {reason}; fix or remove it from the manifest.")


def stopping_error(problem: VolumeError) -> VolumeError:
    """The bad volume's sentence under ``bad_volumes="stop"``, which also names the other way out."""
    return VolumeError(f"{str(problem).rstrip('.')}, or run with --bad_volumes skip to train on the rest.")


class _FailedVolume:
    """What the memory cache holds for a volume whose preprocessing failed (the error is raised on access)."""

    def __init__(self, error: VolumeError) -> None:
        self.error = error


class TolerantCacheDataset(CacheDataset):
    """CacheDataset that remembers a failed volume instead of failing the whole cache fill at start, and shows
    the fill's progress (`voco.progress`: MONAI shows it only through tqdm, which voco does not depend on)."""

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        items = []
        with ThreadPool(self.num_workers) as pool, \
                Progress(len(indices), "volumes cached in memory", minimum=CACHE_PROGRESS_MINIMUM,
                         enabled=get_rank() == 0) as progress:
            for item in pool.imap(self._load_cache_item, indices):
                items.append(item)
                progress.update()
        return items

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as error:  # noqa: BLE001 - any failure of a user's file is reported per volume
            return _FailedVolume(volume_error(self.data[idx], error))

    def _transform(self, index: int):
        cached = self._cache[index] if self._cache and index < self.cache_num else None
        if isinstance(cached, _FailedVolume):
            raise cached.error
        return super()._transform(index)


def check_bad_volume_policy(bad_volumes: str) -> None:
    if bad_volumes not in BAD_VOLUME_POLICIES:
        raise ConfigError(f"bad_volumes={bad_volumes!r}; use one of {', '.join(BAD_VOLUME_POLICIES)}.")


class SkipBadVolumes(torch.utils.data.Dataset):
    """Wrap a dataset so that a volume that fails is skipped (next good one returned) or stops the run.

    Each item gets ``skipped_volumes``: how many bad volumes were passed over to produce it. Volumes known
    to be bad are remembered (per worker process) so they are not read again. Items carry `keys` (and the count).

    Random transforms: a `voco.seeding.SeededDataset`. An item asked for as ``dataset[(index, seed)]`` (what the
    trainer's sampler does) first seeds every random transform of the wrapped dataset from `seed`; its random
    region then depends on the seed alone, not on which worker makes it or on what that worker made before — the
    worker processes' own generators would otherwise differ after a resume.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, datalist: Sequence[Mapping[str, Any]],
                 bad_volumes: str = "skip", max_consecutive: int = 32, keys: Sequence[str] = REGION_KEYS) -> None:
        check_bad_volume_policy(bad_volumes)
        self.dataset, self.datalist = dataset, list(datalist)
        self.bad_volumes, self.max_consecutive = bad_volumes, max_consecutive
        self.keys = tuple(keys)
        self.known_bad: set[int] = set()
        self._generators: list[np.random.RandomState] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def seed_random_transforms(self, seed: int) -> None:
        """Seed every random transform of the wrapped dataset (each from its own stream of `seed`)."""
        if self._generators is None:  # found once per process: a worker holds its own copies of the transforms
            self._generators = random_transform_generators(self.dataset)
        for stream, generator in enumerate(self._generators):
            generator.seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):
            index, seed = index
            self.seed_random_transforms(seed)
        skipped = 0
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self.known_bad:
                continue
            try:
                item = self.dataset[candidate]
            except Exception as error:  # noqa: BLE001 - reported with the file name, then skipped or raised
                problem = error if isinstance(error, VolumeError) else volume_error(self.datalist[candidate], error)
                if self.bad_volumes == "stop":
                    raise stopping_error(problem) from None
                logger.warning("skipping a bad volume: %s", problem)
                self.known_bad.add(candidate)
                skipped += 1
                if skipped >= self.max_consecutive:
                    raise VolumeError(f"{skipped} volumes in a row failed to load (the last: "
                                      f"{self.datalist[candidate].get('image')}); check the manifest with "
                                      f"`voco manifest check`.") from None
                continue
            item = {key: item[key] for key in self.keys}
            item["skipped_volumes"] = skipped
            return item
        raise VolumeError(f"no volume of the {len(self)} in this dataset could be loaded; check the manifest with "
                          f"`voco manifest check`.")


def resolve_datalist(source: str | os.PathLike | Mapping | Sequence[Mapping], dataset_dir: str | None = None
                     ) -> list[dict]:
    """A datalist from a manifest path, a loaded manifest or an existing datalist."""
    if isinstance(source, (str, os.PathLike)):
        return to_datalist(load_manifest(source), dataset_dir=dataset_dir)
    if isinstance(source, Mapping):
        return to_datalist(source, dataset_dir=dataset_dir)
    return [dict(entry) for entry in source]


def preflight(datalist: Sequence[Mapping[str, Any]], max_bad_fraction: float = 0.5, sample_size: int = 200,
              seed: int = 0) -> None:
    """Fail fast, before any training, when most of a manifest cannot be used.

    The headers of up to `sample_size` entries (all of them for smaller manifests; a seeded sample otherwise) are
    read: missing files, unreadable headers, volumes that are not 3-D or are empty. If more than
    `max_bad_fraction` of them are bad, a VolumeError says how many and names the first; the rest of a run skips
    and counts bad volumes as it meets them (truncated voxel data and NaNs only show when the voxels are read).
    """
    from voco.data.volume_checks import check_volume

    if max_bad_fraction >= 1.0 or not datalist:
        return
    if not 0.0 <= max_bad_fraction:
        raise ConfigError(f"max_bad_fraction={max_bad_fraction}; give a fraction in [0, 1] (1 turns the check off).")
    picked = range(len(datalist)) if len(datalist) <= sample_size else sorted(
        np.random.default_rng(seed).choice(len(datalist), sample_size, replace=False))
    def first_problem(image: str | Sequence[str]) -> list[str]:  # a list: the files of stacked channels
        return [problem for path in image_files(image) for problem in check_volume(path, read_voxels=False)][:1]

    problems = [problem for index in picked for problem in first_problem(datalist[index]["image"])]
    logger.info("preflight: %d of %d volume headers checked are bad", len(problems), len(picked))
    if len(problems) == len(picked):
        raise VolumeError(f"none of the {len(picked)} volumes checked before training can be used (the first: "
                          f"{problems[0]}); fix the manifest (`voco manifest check` lists every problem).")
    if len(problems) > max_bad_fraction * len(picked):
        raise VolumeError(f"{len(problems)} of the {len(picked)} volumes checked before training cannot be used "
                          f"(the first: {problems[0]}); fix the manifest (`voco manifest check` lists every problem) "
                          f"or raise max_bad_fraction above {len(problems) / len(picked):.2f} to train on the rest.")


def cached_dataset(entries: Sequence[Mapping[str, Any]], transform: mt.Compose, cache: str,
                   folder: Path | None = None, num_cache_workers: int | None = None) -> Dataset:
    """`entries` through `transform`, the deterministic part cached as `cache` says: "disk" (a PersistentDataset
    in `folder`), "memory" (a CacheDataset that remembers failed volumes) or "none"."""
    if cache == "disk":
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(entries, transform, cache_dir=folder, hash_transform=json_hashing)
    if cache == "memory":
        return TolerantCacheDataset(entries, transform, num_workers=num_cache_workers, progress=False)
    return Dataset(entries, transform)


def check_cache_settings(cache: str, cache_dir: str | os.PathLike | None, bad_volumes: str, preset: str | None,
                         cache_dtype: str, cache_compression: str, what: str = "volumes") -> None:
    """Refuse a bad cache or bad-volume setting before any work (the region and the study pipelines)."""
    if cache not in CACHE_MODES:
        raise ConfigError(f"cache={cache!r}; use one of {', '.join(CACHE_MODES)}.")
    if cache == "disk" and cache_dir is None:
        raise ConfigError(f"cache='disk' needs a cache_dir; give a folder for the preprocessed {what}.")
    check_bad_volume_policy(bad_volumes)
    compact_transforms(stored_dtype(preset or "ct_abdomen", cache_dtype), cache_compression)


def cached_by_preset(entries: Sequence[dict], transforms: Callable[[str, str, str], list], size: Sequence[int], *,
                     preset: str | None, cache: str, cache_dir: str | os.PathLike | None, cache_dtype: str,
                     cache_compression: str, num_cache_workers: int | None, max_bad_fraction: float,
                     folder_prefix: str = "", cached_keys: Sequence[str] | None = None
                     ) -> tuple[Dataset, list[dict]]:
    """The volumes of `entries`, each through its preset's deterministic pipeline and cached, as one dataset.

    Each entry gets its ``preset`` (`preset` for all, else its own, else ct_abdomen) and ``source_stamp`` (the
    file's identity, part of the disk cache's key); `preflight` refuses a manifest with too many bad headers; then
    one cached dataset per preset (its own stored dtype and disk folder ``folder_prefix + cache_folder_name``),
    concatenated. ``transforms(preset, stored dtype, compression)`` is the pipeline. `cached_keys`: the keys of an
    entry the cache sees (all by default). Returns the dataset and the entries in its order.
    """
    for entry in entries:
        entry["preset"] = get_preset(preset or entry.get("preset", "ct_abdomen")).name
        entry["source_stamp"] = source_stamp(entry["image"])
    preflight(entries, max_bad_fraction)
    parts, ordered = [], []
    for preset_name in dict.fromkeys(entry["preset"] for entry in entries):
        members = [entry for entry in entries if entry["preset"] == preset_name]
        # Without a cache nothing is stored: the preset's float32 goes straight on.
        dtype = stored_dtype(preset_name, cache_dtype) if cache != "none" else "float32"
        compression = cache_compression if dtype != "float32" else "none"
        folder = Path(cache_dir) / (folder_prefix + cache_folder_name(preset_name, size, dtype, compression)) \
            if cache == "disk" else None
        stored = members if cached_keys is None else [{key: entry[key] for key in cached_keys if key in entry}
                                                      for entry in members]
        parts.append(cached_dataset(stored, mt.Compose(transforms(preset_name, dtype, compression)), cache, folder,
                                    num_cache_workers))
        ordered += members
    return (parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)), ordered


def build_region_dataset(source: str | os.PathLike | Mapping | Sequence[Mapping], *,
                         region_size: int | Sequence[int] = (192, 192, 64), preset: str | None = None,
                         cache: str = "none", cache_dir: str | os.PathLike | None = None,
                         bad_volumes: str = "skip", dataset_dir: str | None = None,
                         num_cache_workers: int | None = None, cache_dtype: str = "auto",
                         cache_compression: str = "none", max_bad_fraction: float = 0.5,
                         channels: Sequence[str] | None = None) -> SkipBadVolumes:
    """One dataset of random regions for a manifest (or datalist), whatever presets its entries name.

    Args:
        source: manifest path, loaded manifest or MONAI datalist (entries need ``image``; ``preset`` optional).
        region_size: size of the region each item delivers, in voxels (x, y, z).
        preset: use this preset for every entry instead of each entry's own.
        cache: "disk" (PersistentDataset under `cache_dir`, keyed by preset, region size, stored dtype and file
            identity), "memory" (CacheDataset) or "none".
        cache_dtype: what the caches store: "auto" (the preset's compact dtype: uint16 for windowed CT, float16
            for z-scored MRI; half of float32), "float32" (the reference's) or "uint8" (windowed presets only: a
            quarter of float32, error up to 2e-3; see `CompactIntensityd`). Regions are float32 in every case.
        cache_compression: "none" or "zlib" (the compact cache only: smaller again, but every read decompresses the
            whole volume; measured in benchmarks/README.md).
        bad_volumes: "skip" (count and go on) or "stop" (raise a VolumeError naming the file).
        max_bad_fraction: refuse a manifest whose volume headers are bad for more than this fraction of entries
            before any work (`preflight`); 1 turns the check off.
        channels: stack the scans of each study in this order of channel names (`voco.data.channels`), e.g.
            ``["t1", "t2"]``: regions ``[C, X, Y, Z]``; None: one channel per scan.
    """
    region_size = as_region_size(region_size)
    check_cache_settings(cache, cache_dir, bad_volumes, preset, cache_dtype, cache_compression)
    datalist = resolve_datalist(source, dataset_dir)
    if not datalist:
        raise ConfigError("the manifest has no scans to train on; add scans or check the dataset filter.")
    if check_channels(channels):
        datalist = stack_channels(datalist, channels)

    def transforms(preset_name: str, dtype: str, compression: str) -> list:
        stored = compact_transforms(dtype, compression) if cache != "none" else []
        return (preset_transforms(preset_name, region_size) + stored
                + region_transforms(region_size, cache_dtype=dtype, compression=compression))

    dataset, ordered = cached_by_preset(datalist, transforms, region_size, preset=preset, cache=cache,
                                        cache_dir=cache_dir, cache_dtype=cache_dtype,
                                        cache_compression=cache_compression, num_cache_workers=num_cache_workers,
                                        max_bad_fraction=max_bad_fraction)
    return SkipBadVolumes(dataset, ordered, bad_volumes=bad_volumes)


def shard_for_rank(datalist: Sequence[Mapping[str, Any]], seed: int = 0, shard: bool = True, rank: int | None = None,
                   world_size: int | None = None) -> list[dict]:
    """This rank's share of the datalist under torchrun (the whole list otherwise, or with `shard` off: every rank
    reads every volume, the bundles' ``shard_manifest: false``): a seeded shuffle cut into
    `world_size` equal parts (MONAI's `partition_dataset`, the last parts padded with repeats), so each rank reads,
    preprocesses and caches only its own volumes — a memory cache takes 1/N of the host memory per rank. Each
    rank then shuffles its part every epoch; volumes do not move between ranks (as with sharded web datasets)."""
    from monai.data import partition_dataset

    if world_size is None:
        rank, world_size = get_rank(), ranks()
    datalist = [dict(entry) for entry in datalist]
    if world_size <= 1 or not shard:
        return datalist
    if len(datalist) < world_size:
        raise ConfigError(f"the manifest has {len(datalist)} training volumes for {world_size} ranks; add volumes or "
                          f"set shard_manifest false.")
    shard = partition_dataset(datalist, num_partitions=world_size, shuffle=True, seed=seed, even_divisible=True)[rank]
    logger.info("rank %d of %d trains on its shard: %d of the %d volumes", rank, world_size, len(shard), len(datalist))
    return shard


def build_region_loader(source: str | os.PathLike | Mapping | Sequence[Mapping], *, batch_size: int = 2,
                        num_workers: int = 2, shuffle: bool = True, seed: int = 0,
                        sampler: torch.utils.data.Sampler | None = None, drop_last: bool = True,
                        **dataset_options: Any) -> DataLoader:
    """The loader every bundle uses: `build_region_dataset(source, **dataset_options)` in a MONAI DataLoader.

    Batches are ``{"image": float32 [B, C, X, Y, Z], "skipped_volumes": int64 [B]}`` (C = 1, or the number of
    `channels` stacked).
    """
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} {value!r} must be a whole number of at least {least}.")
    dataset = build_region_dataset(source, **dataset_options)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last and len(dataset) >= batch_size,
                      generator=generator, persistent_workers=num_workers > 0)
