"""Data manifests: a versioned JSON description of a collection of volumes.

Schema (version 1)::

    {"format": "voco-manifest", "version": 1, "name": "...", "description": "...",
     "dataset_dir": "optional root, relative to this file",
     "datasets": [
       {"name": "BTCV", "modality": "CT", "preset": "ct_abdomen", "body_region": "abdomen",
        "subjects": [
          {"id": "0001",
           "studies": [
             {"id": "baseline", "report": "optional report text",
              "findings": {"splenomegaly": true, "liver_lesion": false},
              "scans": [
                {"image": "img/0001.nii.gz", "label": "optional", "series": "optional",
                 "modality": "optional override", "preset": "optional override", "split": "optional",
                 "shape": [512, 512, 90], "spacing": [0.8, 0.8, 2.5], "orientation": "LPS",
                 "attributes": {"lesion": true, "class": "optional, per-scan facts for classification"}}]}]}]}]}

Decathlon-style JSON (``{"training": [{"image": ...}], "validation": [...]}``) is read too and
turned into a one-dataset manifest. A manifest flattens to a MONAI datalist: one dict per scan with
absolute ``image`` (and ``label``) paths plus ``dataset``, ``subject``, ``study``, ``modality``,
``preset`` and, where present, ``report`` and ``findings``.

A study's optional ``findings`` are study-level yes/no facts read from its report or a label table (e.g. CT-RATE's
``multi_abnormality_labels.csv``): an object of booleans keyed by a finding name; a finding it does not name is
unknown. Language-image pretraining uses them for zero-shot evaluation (`voco.data.studies`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from voco.errors import ManifestError
from voco.files import write_json_atomically

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "voco-manifest"
MANIFEST_VERSION = 1
MODALITIES = ("CT", "MR", "PT")
MODALITY_ALIASES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT"}
DEFAULT_PRESETS = {"CT": "ct_abdomen", "MR": "mr_zscore", "PT": "ct_resize"}
SPLITS = ("training", "validation", "test")
# Keys of a scan that are copied into its datalist entry as they are.
SCAN_FACT_KEYS = ("series", "shape", "spacing", "orientation", "split", "attributes")
# A study's yes/no facts, {"<finding name>": true/false}; copied into each of its scans' datalist entries.
FINDINGS_KEY = "findings"


def normalize_modality(value: Any, where: str) -> str:
    """'CT', 'MR' (also 'MRI') or 'PT' (also 'PET'), case-insensitive."""
    modality = MODALITY_ALIASES.get(str(value).upper()) if value is not None else None
    if modality is None:
        raise ManifestError(f"{where} has modality {value!r}; use one of {', '.join(MODALITIES)}.")
    return modality


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ManifestError(f"{where} must be a JSON object, not {type(mapping).__name__}; fix the manifest.")
    if key not in mapping:
        raise ManifestError(f"{where} has no '{key}' key; add it (see the schema in voco/data/manifest.py).")
    value = mapping[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}.{key} must be a {names}, not {type(value).__name__}; fix the manifest.")
    return value


def require_format(document: Any, format_name: str, version: int, source: str, kind: str, example: str) -> None:
    """The header check every versioned voco JSON file shares: ``{"format": format_name, "version": version}``."""
    if not isinstance(document, dict) or document.get("format") != format_name:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ManifestError(f"{source} is not a voco {kind} (its 'format' is {found!r}, expected {format_name!r}); "
                            f"give {example}.")
    if document.get("version") != version:
        raise ManifestError(f"{source} has {kind} version {document.get('version')!r}, this voco reads version "
                            f"{version}; upgrade voco or rewrite the file ({example}).")


def validate_manifest(manifest: Mapping[str, Any], source: str = "manifest") -> None:
    """Check the structure of a manifest; raise ManifestError naming the first bad entry."""
    from voco.data.presets import PRESETS  # presets know their own names; manifests only refer to them

    require_format(manifest, MANIFEST_FORMAT, MANIFEST_VERSION, source, "manifest",
                   "a manifest built with `voco manifest build DIR`")
    datasets = _require(manifest, "datasets", list, source)
    names = set()
    for d, dataset in enumerate(datasets):
        where = f"{source}: datasets[{d}]"
        name = _require(dataset, "name", str, where)
        if name in names:
            raise ManifestError(f"{where} repeats the dataset name {name!r}; give each dataset its own name.")
        names.add(name)
        normalize_modality(_require(dataset, "modality", str, where), where)
        if "preset" in dataset and dataset["preset"] not in PRESETS:
            raise ManifestError(f"{where} names the unknown preset {dataset['preset']!r}; "
                                f"use one of {', '.join(PRESETS)}.")
        for s, subject in enumerate(_require(dataset, "subjects", list, where)):
            subject_where = f"{where}.subjects[{s}]"
            _require(subject, "id", (str, int), subject_where)
            for t, study in enumerate(_require(subject, "studies", list, subject_where)):
                study_where = f"{subject_where}.studies[{t}]"
                if "report" in study and not isinstance(study["report"], str):
                    raise ManifestError(f"{study_where}.report must be text; fix the manifest.")
                if FINDINGS_KEY in study:
                    validate_findings(study[FINDINGS_KEY], f"{study_where}.{FINDINGS_KEY}")
                scans = _require(study, "scans", list, study_where)
                if not scans:
                    raise ManifestError(f"{study_where} has no scans; remove the study or add its scans.")
                for c, scan in enumerate(scans):
                    scan_where = f"{study_where}.scans[{c}]"
                    image = _require(scan, "image", str, scan_where)
                    if not image.strip():
                        raise ManifestError(f"{scan_where}.image is empty; give the image path.")
                    if "label" in scan and not isinstance(scan["label"], str):
                        raise ManifestError(f"{scan_where}.label must be a path; fix the manifest.")
                    if "modality" in scan:
                        normalize_modality(scan["modality"], scan_where)
                    if "preset" in scan and scan["preset"] not in PRESETS:
                        raise ManifestError(f"{scan_where} names the unknown preset {scan['preset']!r}; "
                                            f"use one of {', '.join(PRESETS)}.")
                    if "split" in scan and scan["split"] not in SPLITS:
                        raise ManifestError(f"{scan_where}.split is {scan['split']!r}; use one of {', '.join(SPLITS)}.")
                    if "attributes" in scan and not isinstance(scan["attributes"], dict):
                        raise ManifestError(f"{scan_where}.attributes must be an object of named facts; fix the manifest.")
                    for key in ("shape", "spacing"):
                        if key in scan and not (isinstance(scan[key], list) and len(scan[key]) == 3 and all(
                                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                                and math.isfinite(value) for value in scan[key])):
                            raise ManifestError(f"{scan_where}.{key} is {scan[key]!r}, not a list of three positive "
                                                f"numbers; fix or remove it.")


def validate_findings(findings: Any, where: str) -> None:
    """A study's findings: an object whose keys are non-empty names and whose values are true or false."""
    if not isinstance(findings, dict):
        raise ManifestError(f"{where} must be an object of named true/false findings, not "
                            f"{type(findings).__name__}; fix the manifest.")
    for name, value in findings.items():
        if not isinstance(name, str) or not name.strip():
            raise ManifestError(f"{where} has the finding name {name!r}; give each finding a non-empty name.")
        if not isinstance(value, bool):
            raise ManifestError(f"{where}.{name} is {value!r}; give true or false (leave out a finding that is "
                                f"not known).")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; check the path or build one with `voco manifest build DIR`.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {path} is not a text JSON file ({error}); give a .json manifest.") from error
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                            f"{error.msg}); fix the file or rebuild it with `voco manifest build`.") from error
    except RecursionError as error:  # json's parser recurses once per nesting level
        raise ManifestError(f"manifest {path} is nested too deeply to be a manifest; fix the file or rebuild it "
                            f"with `voco manifest build`.") from error


def is_decathlon(data: Any) -> bool:
    return isinstance(data, dict) and "format" not in data and any(
        isinstance(data.get(key), list) for key in ("training", "validation", "test"))


def manifest_from_decathlon(data: Mapping[str, Any], name: str, modality: str | None = None) -> dict:
    """Turn a Decathlon-style datalist into a one-dataset manifest; the list a scan came from is its split."""
    declared = data.get("modality")
    if modality is None and isinstance(declared, dict) and declared:
        modality = next(iter(declared.values()))
    modality = normalize_modality(modality or "CT", f"Decathlon datalist {name}")
    records = []
    for split in SPLITS:
        for index, item in enumerate(data.get(split) or []):
            where = f"Decathlon datalist {name}: {split}[{index}]"
            if isinstance(item, str):  # the "test" list of Decathlon is a list of paths
                item = {"image": item}
            image = _require(item, "image", (str, list), where)
            if isinstance(image, list):  # multi-channel entries list one file per channel
                raise ManifestError(f"{where} lists several image files for one case; voco reads one file "
                                    f"per scan, so stack the channels into one file first.")
            scan = {"image": image, "split": split}
            if isinstance(item.get("label"), str):
                scan["label"] = item["label"]
            subject = str(item.get("subject") or Path(image).name.split(".")[0])
            records.append({"dataset": name, "subject": subject, "study": "0", "scan": scan})
    if not records:
        raise ManifestError(f"Decathlon datalist {name} has no entries in 'training', 'validation' or 'test'; "
                            f"add image entries.")
    return manifest_from_records(records, name=name, modality=modality,
                                 description=str(data.get("description", "")))


def manifest_from_records(records: Iterable[Mapping[str, Any]], name: str, modality: str = "CT",
                          preset: str | None = None, description: str = "") -> dict:
    """Nest flat records ``{"dataset", "subject", "study", "scan": {...}, "report"?, "findings"?}`` into a manifest.

    Datasets, subjects and studies keep the order in which they first appear.
    """
    modality = normalize_modality(modality, f"manifest {name}")
    datasets: dict[str, dict] = {}
    for record in records:
        dataset = datasets.setdefault(record["dataset"], {
            "name": record["dataset"], "modality": modality, "preset": preset or DEFAULT_PRESETS[modality],
            "subjects": [], "_subjects": {}})
        subject = dataset["_subjects"].get(str(record["subject"]))
        if subject is None:
            subject = {"id": str(record["subject"]), "studies": [], "_studies": {}}
            dataset["_subjects"][subject["id"]] = subject
            dataset["subjects"].append(subject)
        study = subject["_studies"].get(str(record["study"]))
        if study is None:
            study = {"id": str(record["study"]), "scans": []}
            subject["_studies"][study["id"]] = study
            subject["studies"].append(study)
        if record.get("report"):
            study["report"] = record["report"]
        if record.get(FINDINGS_KEY) is not None:
            study[FINDINGS_KEY] = dict(record[FINDINGS_KEY])
        study["scans"].append(dict(record["scan"]))
    for dataset in datasets.values():
        for subject in dataset.pop("_subjects").values():
            subject.pop("_studies")
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name,
            "description": description, "datasets": list(datasets.values())}


def load_manifest(path: str | os.PathLike, modality: str | None = None) -> dict:
    """Read and validate a voco manifest or a Decathlon-style JSON file.

    The returned dict carries ``"_path"`` (the absolute file it came from) so that relative image
    paths can be resolved by `to_datalist`.
    """
    path = Path(path).expanduser().resolve()
    data = _read_json(path)
    if is_decathlon(data):
        manifest = manifest_from_decathlon(data, name=path.stem, modality=modality)
    elif isinstance(data, dict) and "format" in data:
        manifest = data
    else:
        raise ManifestError(f"{path} is neither a voco manifest (a 'format': '{MANIFEST_FORMAT}' object) nor a "
                            f"Decathlon datalist (a 'training' list); build a manifest with `voco manifest build DIR`.")
    validate_manifest(manifest, source=str(path))
    manifest["_path"] = str(path)
    return manifest


def save_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate and write a manifest atomically (a temporary file renamed over the target)."""
    path = Path(path).expanduser().resolve()
    content = {key: value for key, value in manifest.items() if not key.startswith("_")}
    validate_manifest(content, source=str(path))
    return write_json_atomically(content, path, ensure_ascii=False)


def resolve_root(manifest: Mapping[str, Any], dataset_dir: str | os.PathLike | None = None) -> Path:
    """The folder relative image paths start from: `dataset_dir`, else the manifest's own, else its folder."""
    if dataset_dir is not None:
        return Path(dataset_dir).expanduser().resolve()
    base = Path(manifest["_path"]).parent if "_path" in manifest else Path.cwd()
    return (base / manifest.get("dataset_dir", ".")).resolve()


def to_datalist(manifest: Mapping[str, Any], dataset_dir: str | os.PathLike | None = None,
                datasets: Sequence[str] | None = None) -> list[dict]:
    """Flatten a manifest into a MONAI datalist: one dict per scan with absolute paths."""
    root = resolve_root(manifest, dataset_dir)
    wanted = set(datasets) if datasets else None
    datalist = []
    for dataset in manifest["datasets"]:
        if wanted is not None and dataset["name"] not in wanted:
            continue
        dataset_modality = normalize_modality(dataset["modality"], dataset["name"])
        for subject in dataset["subjects"]:
            for study in subject["studies"]:
                for index, scan in enumerate(study["scans"]):
                    modality = normalize_modality(scan.get("modality", dataset_modality), dataset["name"])
                    entry = {
                        "image": os.path.normpath(root / scan["image"]),
                        "dataset": dataset["name"],
                        "subject": str(subject["id"]),
                        "study": str(study["id"]),
                        "scan_index": index,
                        "modality": modality,
                        "preset": scan.get("preset", dataset.get("preset", DEFAULT_PRESETS[modality])),
                    }
                    if "label" in scan:
                        entry["label"] = os.path.normpath(root / scan["label"])
                    if "report" in study:
                        entry["report"] = study["report"]
                    if FINDINGS_KEY in study:
                        entry[FINDINGS_KEY] = dict(study[FINDINGS_KEY])
                    entry.update({key: scan[key] for key in SCAN_FACT_KEYS if key in scan})
                    datalist.append(entry)
    if wanted is not None and not datalist:
        raise ManifestError(f"none of the datasets {sorted(wanted)} is in the manifest; "
                            f"it has {[d['name'] for d in manifest['datasets']]}.")
    _warn_of_copies(datalist)
    return datalist


def _warn_of_copies(datalist: Sequence[Mapping[str, Any]]) -> None:
    """Say when one scan (file and DICOM series) is listed more than once: each copy would be trained on as a scan
    of its own, and a copy across the training and validation split leaks."""
    counts = Counter((entry["image"], entry.get("series")) for entry in datalist)
    repeated = [(image, count) for (image, _), count in counts.items() if count > 1]
    if repeated:
        image, count = repeated[0]
        logger.warning("%d scans are listed more than once in the manifest (e.g. %s, %d times): each copy is used as "
                       "a scan of its own; remove the copies unless that is meant.", len(repeated), image, count)


def split_datalist(datalist: Sequence[Mapping[str, Any]], validation_fraction: float = 0.1,
                   seed: int = 0, min_training: int = 1) -> tuple[list[dict], list[dict]]:
    """Split into (training, validation) by subject, so no subject's scans land on both sides.

    Where scans carry an explicit ``split`` (as Decathlon lists do), that split is kept; otherwise
    a seeded shuffle of the subjects puts ``ceil(validation_fraction * n_subjects)`` of them into
    validation (at least one when there are two or more subjects and the fraction is positive), but never so many
    that fewer than `min_training` subjects (the bundles pass their batch size) are left for training: a small
    manifest trains on every subject and skips validation, with a warning, rather than train on a partial batch.

    Raises:
        ManifestError: a fraction outside [0, 1), or no training scan at all (naming the counts).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ManifestError(f"validation_fraction is {validation_fraction}; use a number in [0, 1).")
    if any("split" in entry for entry in datalist):
        training = [dict(e) for e in datalist if e.get("split", "training") == "training"]
        validation = [dict(e) for e in datalist if e.get("split") == "validation"]
        if not training:
            raise ManifestError(f"the manifest marks 0 scans for training and {len(validation)} for validation; "
                                f"mark some 'training' (or drop the 'split' entries to split by validation_fraction).")
        return training, validation
    subjects = sorted({(e["dataset"], e["subject"]) for e in datalist})
    random.Random(seed).shuffle(subjects)
    count = math.ceil(validation_fraction * len(subjects)) if validation_fraction > 0 else 0
    if validation_fraction > 0 and len(subjects) >= 2:
        count = min(max(count, 1), len(subjects) - 1)
    spare = max(len(subjects) - max(int(min_training), 1), 0)  # subjects that can be held out
    if count > spare:
        logger.warning("validation_fraction %g would hold out %d of the %d subjects and leave fewer than the %d a "
                       "training batch needs; holding out %d%s. Add subjects or lower batch_size to validate.",
                       validation_fraction, count, len(subjects), min_training, spare,
                       " (validation is skipped)" if spare == 0 else "")
        count = spare
    held_out = set(subjects[:count])
    training = [dict(e) for e in datalist if (e["dataset"], e["subject"]) not in held_out]
    validation = [dict(e) for e in datalist if (e["dataset"], e["subject"]) in held_out]
    return training, validation
