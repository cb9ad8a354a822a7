"""Study-level data for language-image pretraining (HLIP, MG-3D): the scans of a study with its report.

A study is what a radiologist reports on: one report and several scans of different series (thin and thick
slices, other windows, fields of view and sizes). The manifest holds them (datasets -> subjects -> studies ->
scans, with the study's optional "report" and "findings"); this module makes one training item per study

    {"image": float32 [N, 1, X, Y, Z], "report": str, "findings": float32 [F], "study_id": str}

with N <= max_scans varying between studies, and `collate_studies` brings a batch to a fixed scan count: "repeat"
(HLIP: scans repeated cyclically, no mask) or "pad" (zero scans with ``scan_mask`` False, for an attention key mask).

Each scan goes through its own preset (`voco.data.regions.preset_transforms`: RAS, spacing, window or z-score,
crop to the body) and then a centre crop/pad to `scan_size` (HLIP's fixed size per scan); this deterministic part
is cached per scan ("none", "memory" or "disk", in the compact dtype of the region cache). A scan that fails to
load is dropped from its study and counted; a study none of whose scans loads is skipped or stops the run like a
bad volume of the region pipeline (`SkipBadVolumes`).

Randomness (which scans when a study has more than max_scans, their order, the report's sentence order) draws only
from the generator ``R`` of `StudySampling`, a MONAI `Randomizable` held by the dataset: the trainer's
``dataset[(index, seed)]`` reseeds it, so an item depends on (seed, index) alone and a resumed run is exact.

    loader = build_study_loader("runs/phantom_studies/manifest.json", scan_size=(64, 64, 32), max_scans=4)
    batch = next(iter(loader))  # image [2, 4, 1, 64, 64, 32], scan_mask [2, 4], report: 2 strings, findings [2, F]
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import DataLoader
from monai.utils import get_seed

from voco.data.manifest import FINDINGS_KEY
from voco.data.compact import ExpandIntensityd, UnpackCompactd, compact_transforms
from voco.data.regions import (SkipBadVolumes, as_region_size, cached_by_preset, check_bad_volume_policy,
                               check_cache_settings, preset_transforms, resolve_datalist, stopping_error,
                               volume_error)
from voco.data.reports import shuffle_sentences
from voco.errors import ConfigError, ManifestError, VolumeError

logger = logging.getLogger(__name__)

__all__ = ["FINDINGS_KEY", "SCAN_MODES", "STUDY_KEYS", "StudySampling", "StudyDataset", "SkipBadStudies",
           "group_studies", "finding_names", "report_texts", "scan_transforms", "collate_studies",
           "build_study_dataset", "build_study_loader"]

SCAN_MODES = ("repeat", "pad")
# What a study item carries (and `SkipBadVolumes` keeps); ``dropped_scans`` counts the bad scans left out of it.
STUDY_KEYS = ("image", "report", "findings", "study_id", "dropped_scans")
# The part of a scan's entry that keys its disk-cache file: what changes the preprocessed scan, and where it came
# from (for error messages); not the report or findings, which change without changing the image.
CACHED_SCAN_KEYS = ("image", "preset", "source_stamp", "dataset", "subject", "study", "scan_index")
# Part of the disk-cache folder name: bump it whenever the per-scan pipeline changes what a cache file holds.
STUDY_CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Studies of a datalist


def _study_key(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    """(dataset, subject, study) of a scan entry; a plain datalist entry (no subject, no study) is its own study."""
    if "subject" in entry or "study" in entry:
        return str(entry.get("dataset", "")), str(entry.get("subject", "")), str(entry.get("study", ""))
    return "", str(entry["image"]), ""


def group_studies(datalist: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Scan entries (`voco.data.manifest.to_datalist`) -> one entry per study, in the order studies first appear.

    A study is the scans with the same (dataset, subject, study); an entry with neither subject nor study (a plain
    datalist) is a study of one scan. Each study entry:
    ``{"study_id": "dataset/subject/study", "dataset", "subject", "study", "scans": [scan entries, manifest order],
    "report": str | None, "findings": {name: bool}, "image": first scan's image (for error messages)}``.

        group_studies(to_datalist(manifest))[0]["study_id"]  # e.g. 'phantom_studies/phantom_0000/ct'
    """
    studies: dict[tuple[str, str, str], dict] = {}
    for position, entry in enumerate(datalist):
        if not isinstance(entry, Mapping) or not entry.get("image"):
            raise ManifestError(f"datalist entry {position} has no 'image'; give every scan entry its image path.")
        key = _study_key(entry)
        study = studies.get(key)
        if study is None:
            study = studies[key] = {"study_id": "/".join(part for part in key if part), "dataset": key[0],
                                    "subject": key[1], "study": key[2], "scans": [], "report": None,
                                    FINDINGS_KEY: {}, "image": entry["image"]}
        study["scans"].append(dict(entry))
        if study["report"] is None and entry.get("report"):
            study["report"] = entry["report"]
        if not study[FINDINGS_KEY] and entry.get(FINDINGS_KEY):
            study[FINDINGS_KEY] = dict(entry[FINDINGS_KEY])
    return list(studies.values())


def finding_names(studies: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sorted union of the studies' finding names (the order of an item's ``findings`` vector)."""
    return sorted({name for study in studies for name in study.get(FINDINGS_KEY) or {}})


def report_texts(source: str | os.PathLike | Mapping | Sequence[Mapping], dataset_dir: str | None = None
                 ) -> list[str]:
    """The reports of a manifest (path or loaded) or datalist, one per study that has one (for a text vocabulary)."""
    return [study["report"] for study in group_studies(resolve_datalist(source, dataset_dir)) if study["report"]]


# ---------------------------------------------------------------------------------------------------------------
# The study dataset


def scan_transforms(preset: str, scan_size: Sequence[int], cache_dtype: str = "float32",
                    compression: str = "none") -> list[mt.Transform]:
    """The deterministic pipeline of one scan: its preset, a centre crop/pad to exactly `scan_size` (HLIP), and,
    for a cache, the compact dtype (`voco.data.compact.compact_transforms`). ``{"image": path}`` ->
    ``{"image": [1, X, Y, Z]}`` (float32, or the compact dtype: `ExpandIntensityd` turns it back)."""
    steps = preset_transforms(preset, scan_size) + [mt.ResizeWithPadOrCropd(keys=["image"], spatial_size=scan_size)]
    if cache_dtype != "float32":
        steps += compact_transforms(cache_dtype, compression)
    if compression == "zlib":  # a RandomizableTrait: MONAI's caches keep the compressed bytes and stop before it
        steps.append(UnpackCompactd(keys=["image"], dtype=cache_dtype))
    return steps


class StudySampling(mt.Randomizable):
    """The random choices of a study item, all drawn from ``self.R`` (reseeded per item by `SkipBadVolumes`).

    Args:
        shuffle_scans: read a study's scans in a random order (training), so that a study with more than
            max_scans scans gives a random subset; False keeps the manifest order (validation).
        shuffle_report: shuffle the report's sentences within its sections (`shuffle_sentences`).
    """

    def __init__(self, shuffle_scans: bool = True, shuffle_report: bool = True) -> None:
        self.shuffle_scans, self.shuffle_report = shuffle_scans, shuffle_report
        self.set_random_state(seed=get_seed())  # its own generator, not Randomizable's shared class-level one

    def randomize(self, data: Any = None) -> None:
        """Nothing is drawn ahead: `scan_order` and `report` draw when called."""

    def scan_order(self, num_scans: int) -> list[int]:
        """The order in which a study's `num_scans` scans are read: a permutation, or 0..n-1."""
        return [int(k) for k in self.R.permutation(num_scans)] if self.shuffle_scans else list(range(num_scans))

    def report(self, text: str) -> str:
        return shuffle_sentences(text, self.R) if self.shuffle_report and text else text


class StudyDataset(torch.utils.data.Dataset):
    """One item per study: its scans (preprocessed by `scans`), report and findings.

    Item: ``{"image": float32 [N, 1, X, Y, Z], "report": str ("" if none), "findings": float32 [F] (1/0, NaN where
    unknown, in `finding_names` order), "study_id": str, "dropped_scans": int}`` with N <= `max_scans`: the first
    `max_scans` scans that load, in `sampling`'s order. A scan that fails is dropped and counted (once per
    process: it is remembered and not read again) under ``bad_volumes="skip"``, or raises its VolumeError under
    "stop"; a study none of whose scans loads raises a VolumeError.

    Args:
        studies: study entries (`group_studies`).
        scans: a dataset whose item ``scan_positions[i][k]`` is ``{"image": [1, X, Y, Z]}`` of scan k of study i.
        scan_positions: for each study, the positions of its scans in `scans`, in manifest order.
        finding_names: the findings vector's names.
        sampling: the random choices (`StudySampling`).
    """

    def __init__(self, studies: Sequence[Mapping[str, Any]], scans: torch.utils.data.Dataset,
                 scan_positions: Sequence[Sequence[int]], finding_names: Sequence[str], max_scans: int = 4,
                 sampling: StudySampling | None = None, bad_volumes: str = "skip") -> None:
        check_bad_volume_policy(bad_volumes)
        self.studies, self.scans = list(studies), scans
        self.scan_positions = [list(positions) for positions in scan_positions]
        self.finding_names, self.max_scans = list(finding_names), int(max_scans)
        self.sampling = sampling if sampling is not None else StudySampling()
        self.bad_volumes = bad_volumes
        self.expand = ExpandIntensityd(keys=["image"])  # the cached compact dtype back to float32, per scan
        self.known_bad_scans: set[int] = set()

    def __len__(self) -> int:
        return len(self.studies)

    def findings_vector(self, study: Mapping[str, Any]) -> torch.Tensor:
        findings = study.get(FINDINGS_KEY) or {}
        return torch.tensor([float(findings[name]) if name in findings else float("nan")
                             for name in self.finding_names], dtype=torch.float32)

    def __getitem__(self, index: int) -> dict:
        study, positions = self.studies[index], self.scan_positions[index]
        order = self.sampling.scan_order(len(positions))
        report = self.sampling.report(study.get("report") or "")
        images, dropped, first_problem = [], 0, None
        for k in order:
            if len(images) == self.max_scans:
                break
            if positions[k] in self.known_bad_scans:
                continue
            try:
                images.append(self.expand(self.scans[positions[k]])["image"])
            except Exception as error:  # noqa: BLE001 - a user's file: reported with its name, then dropped or raised
                problem = error if isinstance(error, VolumeError) else volume_error(study["scans"][k], error)
                if self.bad_volumes == "stop":
                    raise stopping_error(problem) from None
                logger.warning("dropping a bad scan of study %s: %s", study["study_id"], problem)
                self.known_bad_scans.add(positions[k])
                dropped += 1
                first_problem = first_problem or problem
        if not images:
            if first_problem is not None:
                raise first_problem
            raise VolumeError(f"no scan of study {study['study_id']} could be loaded (its {len(positions)} scans "
                              f"failed before); fix or remove them from the manifest.")
        return {"image": torch.stack([torch.as_tensor(image) for image in images]).float(), "report": report,
                "findings": self.findings_vector(study), "study_id": study["study_id"], "dropped_scans": dropped}


class SkipBadStudies(SkipBadVolumes):
    """`SkipBadVolumes` around a `StudyDataset`: a study none of whose scans loads is skipped (counted in the next
    item's ``skipped_volumes`` as one) or stops the run. Also gives the study dataset's `studies`,
    `finding_names` and `max_scans` (also reachable as ``.dataset.<name>``)."""

    @property
    def studies(self) -> list[dict]:
        return self.dataset.studies

    @property
    def finding_names(self) -> list[str]:
        return self.dataset.finding_names

    @property
    def max_scans(self) -> int:
        return self.dataset.max_scans


def collate_studies(items: Sequence[Mapping[str, Any]], max_scans: int, scan_mode: str = "repeat") -> dict:
    """Batch study items with different scan counts at a fixed count of `max_scans` scans per study.

    - ``"repeat"`` (HLIP): each study's scans repeated cyclically (scans 0, 1, 2, 0, 1, ...) to exactly
      `max_scans`; ``scan_mask`` is all True (no mask needed).
    - ``"pad"``: zero scans appended; ``scan_mask`` is False for them (an attention key mask).

    A study with exactly `max_scans` scans gives the same tensors either way. Output:
    ``{"image": [B, max_scans, 1, X, Y, Z], "scan_mask": bool [B, max_scans], "num_scans": int64 [B],
    "report": list[str], "findings": [B, F], "study_id": list[str], "skipped_volumes": int64 [B]}``, where
    ``skipped_volumes`` adds each item's skipped studies (`SkipBadVolumes`) and dropped scans.

        batch = collate_studies([dataset[0], dataset[1]], max_scans=4, scan_mode="pad")
    """
    if scan_mode not in SCAN_MODES:
        raise ConfigError(f"scan_mode={scan_mode!r}; use one of {', '.join(SCAN_MODES)}.")
    if not items:
        raise ConfigError("collate_studies got no items; give at least one study item.")
    images, masks = [], []
    for item in items:
        image = torch.as_tensor(item["image"])
        count = int(image.shape[0])
        if not 1 <= count <= max_scans:
            raise ConfigError(f"study {item.get('study_id')} has {count} scans, but a batch holds 1 to "
                              f"max_scans={max_scans}; give collate_studies the dataset's max_scans.")
        if scan_mode == "repeat":
            images.append(image[torch.arange(max_scans) % count])
            masks.append(torch.ones(max_scans, dtype=torch.bool))
        else:
            images.append(torch.cat([image, image.new_zeros((max_scans - count, *image.shape[1:]))]))
            masks.append(torch.arange(max_scans) < count)
    return {
        "image": torch.stack(images),
        "scan_mask": torch.stack(masks),
        "num_scans": torch.tensor([int(torch.as_tensor(item["image"]).shape[0]) for item in items]),
        "report": [str(item.get("report") or "") for item in items],
        "findings": torch.stack([torch.as_tensor(item.get("findings", ()), dtype=torch.float32) for item in items]),
        "study_id": [str(item.get("study_id", "")) for item in items],
        "skipped_volumes": torch.tensor([int(item.get("skipped_volumes", 0)) + int(item.get("dropped_scans", 0))
                                         for item in items], dtype=torch.int64),
    }


def _scan_size(scan_size: int | Sequence[int]) -> tuple[int, int, int]:
    try:
        return as_region_size(scan_size)
    except (ConfigError, TypeError, ValueError):
        raise ConfigError(f"scan_size {scan_size!r} must be three positive voxel counts, e.g. [96, 96, 64].") from None


def build_study_dataset(source: str | os.PathLike | Mapping | Sequence[Mapping], *,
                        scan_size: int | Sequence[int] = (96, 96, 64), max_scans: int = 4, preset: str | None = None,
                        cache: str = "none", cache_dir: str | os.PathLike | None = None, cache_dtype: str = "auto",
                        cache_compression: str = "none", bad_volumes: str = "skip", dataset_dir: str | None = None,
                        shuffle: bool = True, sentence_shuffle: bool = True, findings: Sequence[str] | None = None,
                        num_cache_workers: int | None = None, max_bad_fraction: float = 0.5) -> SkipBadStudies:
    """One item per study of a manifest (or datalist), each scan through its own preset.

    Args:
        source: manifest path, loaded manifest or scan datalist (as `voco.data.regions.resolve_datalist`).
        scan_size: every scan is centre cropped/padded to this size (voxels) after its preset.
        max_scans: at most this many scans per item (a random subset when `shuffle`, else the first ones).
        preset: use this preset for every scan instead of each scan's own.
        cache, cache_dir, cache_dtype, cache_compression, num_cache_workers: the per-scan cache, as the region
            pipeline's (`voco.data.regions.build_region_dataset`); disk files live under
            ``cache_dir/study-scans-v1-<preset>-<dtype>-<key>/`` (never mixed with the region cache).
        bad_volumes: "skip" (drop a bad scan, skip a study without any good one, and count) or "stop".
        max_bad_fraction: refuse a manifest whose scan headers are bad for more than this fraction of its scans
            before any work (`voco.data.regions.preflight`); 1 turns the check off.
        shuffle: scans in a random order (training); False: manifest order (validation).
        sentence_shuffle: shuffle the report's sentences within its sections (pass False for validation).
        findings: the names (and order) of the findings vector; default `finding_names` of the studies.

    Returns a `SkipBadStudies` (a `SkipBadVolumes`): ``dataset[i]`` or ``dataset[(i, seed)]`` is a study item (see
    `StudyDataset`) plus ``skipped_volumes``; ``dataset.studies``, ``dataset.finding_names`` and
    ``dataset.max_scans`` describe it.

        dataset = build_study_dataset("manifest.json", scan_size=(64, 64, 32), max_scans=4)
        dataset[(0, 123)]["image"].shape  # e.g. torch.Size([3, 1, 64, 64, 32])
    """
    scan_size = _scan_size(scan_size)
    if isinstance(max_scans, bool) or not isinstance(max_scans, (int, np.integer)) or max_scans < 1:
        raise ConfigError(f"max_scans={max_scans!r}; give a whole number of at least 1 (HLIP uses e.g. 8).")
    check_cache_settings(cache, cache_dir, bad_volumes, preset, cache_dtype, cache_compression, what="scans")
    studies = group_studies(resolve_datalist(source, dataset_dir))
    if not studies:
        raise ConfigError("the manifest has no studies to train on; add scans or check the dataset filter.")
    names = finding_names(studies)
    if findings is not None:
        unknown = [name for name in findings if name not in names]
        if unknown:
            raise ConfigError(f"no study of the manifest has the findings {unknown}; use some of {names} (or "
                              f"attach them with voco.data.reports.attach_reports).")
        names = list(findings)

    # One scan dataset per preset (each its own cache folder), concatenated; positions tie studies to their scans.
    scans = [scan for study in studies for scan in study["scans"]]
    scan_dataset, ordered = cached_by_preset(
        scans, lambda preset_name, dtype, compression: scan_transforms(preset_name, scan_size, dtype, compression),
        scan_size, preset=preset, cache=cache, cache_dir=cache_dir, cache_dtype=cache_dtype,
        cache_compression=cache_compression, num_cache_workers=num_cache_workers, max_bad_fraction=max_bad_fraction,
        folder_prefix=f"study-scans-v{STUDY_CACHE_FORMAT}-", cached_keys=CACHED_SCAN_KEYS)
    position = {id(scan): index for index, scan in enumerate(ordered)}
    scan_positions = [[position[id(scan)] for scan in study["scans"]] for study in studies]
    dataset = StudyDataset(studies, scan_dataset, scan_positions, names, max_scans=int(max_scans),
                           sampling=StudySampling(shuffle, sentence_shuffle), bad_volumes=bad_volumes)
    return SkipBadStudies(dataset, studies, bad_volumes=bad_volumes, keys=STUDY_KEYS)


def build_study_loader(source: str | os.PathLike | Mapping | Sequence[Mapping], *, batch_size: int = 2,
                       num_workers: int = 2, shuffle: bool = True, seed: int = 0,
                       sampler: torch.utils.data.Sampler | None = None, drop_last: bool = True,
                       scan_mode: str = "repeat", **dataset_options: Any) -> DataLoader:
    """`build_study_dataset(source, shuffle=shuffle, **dataset_options)` in a MONAI DataLoader with
    `collate_studies` (batches: see there). `shuffle` is the training order: studies in a random order and their
    scans shuffled; False keeps both in manifest order (validation; pass ``sentence_shuffle=False`` too).
    Generator, sampler and worker rules are those of `voco.data.regions.build_region_loader`.

        loader = build_study_loader(manifest, scan_size=(64, 64, 32), max_scans=4, scan_mode="pad")
    """
    if scan_mode not in SCAN_MODES:
        raise ConfigError(f"scan_mode={scan_mode!r}; use one of {', '.join(SCAN_MODES)}.")
    dataset = build_study_dataset(source, shuffle=shuffle, **dataset_options)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last and len(dataset) >= batch_size,
                      generator=generator, persistent_workers=num_workers > 0,
                      collate_fn=functools.partial(collate_studies, max_scans=dataset.max_scans, scan_mode=scan_mode))
