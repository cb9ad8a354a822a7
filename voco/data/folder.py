"""Manifests from folders: scan a tree of volumes and write its manifest (`voco manifest build DIR` calls
`build_manifest_from_folder`; checking and summarising a manifest is `voco.data.manifest_checks`).

How a folder tree becomes datasets / subjects / studies / scans:

- dataset: the first-level sub-folder (``ROOT/BTCV/...`` -> "BTCV"); volumes at the top, or under a role folder
  such as ``imagesTr``, belong to a dataset named after the scanned folder itself. When the first-level folders
  look like subjects instead (no volume at the top and the same relative file, e.g. ``ct.nii.gz``, in several of
  them, as in TotalSegmentator or AbdomenAtlas), or when `dataset` is given, the whole folder is one dataset and
  its first-level folders are subjects.
- subject: what `--subject_pattern` (a regular expression) finds in the scan's path below the dataset; else the
  DICOM PatientID; else the first folder below the dataset that is not a role folder; else the file name without
  its extension (and without an nnU-Net channel suffix ``_0000``).
- study: the DICOM StudyInstanceUID, else "0".
- scan: one file, or one DICOM series (files grouped by series with itk's GDCMSeriesFileNames).
- labels: files in ``labelsTr`` / ``labels`` / ``masks`` / ``segmentations`` folders, or named ``*_seg`` /
  ``*label*``, are paired with the image of the same name (in the matching ``imagesTr`` / ``images`` folder or the
  same folder) and never listed as images.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from voco.data.manifest import (DEFAULT_PRESETS, MODALITY_ALIASES, manifest_from_records, normalize_modality,
                                save_manifest)
from voco.data.volume_checks import header_problems, inspect_volume
from voco.data.volumes import (VolumeHeader, dicom_series_names, dicom_tags, file_stem, image_format, one_line,
                               read_dicom_header)
from voco.errors import ManifestError, MissingDependencyError, VolumeError
from voco.progress import Progress

logger = logging.getLogger(__name__)

# Files that sit beside volumes in most datasets and are not volumes: skipped silently, not reported.
SIDECAR_SUFFIXES = frozenset({
    ".json", ".txt", ".md", ".rst", ".csv", ".tsv", ".xls", ".xlsx", ".pdf", ".log", ".yaml", ".yml", ".xml",
    ".html", ".ini", ".cfg", ".py", ".ipynb", ".sh", ".pt", ".pth", ".pkl", ".db", ".tmp"})
# Role folders group files by what they are (images / labels of a split), not by subject.
IMAGE_FOLDER = re.compile(r"^(images?|imgs?)(tr|ts|val|va|test|train)?$", re.IGNORECASE)
LABEL_FOLDER = re.compile(r"^(labels?|masks?|segmentations?)(tr|ts|val|va|test|train)?$", re.IGNORECASE)
LABEL_WORDS = frozenset({"label", "labels", "seg", "segmentation", "mask"})
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# DICOM tags read per series: PatientID, StudyInstanceUID, SeriesDescription, Modality.
PATIENT_ID, STUDY_UID, SERIES_DESCRIPTION, DICOM_MODALITY = "0010|0020", "0020|000d", "0008|103e", "0008|0060"
NON_IMAGE_DICOM = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "RWV"})
PROGRESS_MINIMUM = 200  # fewer files than this read in seconds: no progress shown


# ---------------------------------------------------------------------------------------------------------------
# Scanning


@dataclass
class _Volume:
    """One scan found in the tree: a volume file, or a DICOM series folder."""

    path: Path
    label: Path | None = None
    series: str | None = None
    files: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


def _tokens(stem: str) -> list[str]:
    return [token for token in re.split(r"[_\-.\s]+", stem) if token]


def _label_name_key(stem: str) -> str | None:
    """For a label-like name (``case1_seg``, ``label_case1``, ``case1label``) the name of its image's key
    (``case1``, "" for a bare ``segmentation``); None for a name that does not look like a label."""
    kept, found = [], False
    for token in _tokens(stem):
        if token.lower() in LABEL_WORDS:
            found = True
            continue
        match = re.match(r"^(.+?)labels?$", token, re.IGNORECASE)
        if match:
            found = True
            kept.append(match.group(1))
            continue
        kept.append(token)
    return "_".join(kept) if found else None


def _pairing_place(path: Path) -> tuple[Path, str]:
    """Where an image and its label meet: ``Task/imagesTr/x`` and ``Task/labelsTr/x`` both map to (Task, "tr")."""
    folder = path.parent
    match = IMAGE_FOLDER.match(folder.name) or LABEL_FOLDER.match(folder.name)
    if match:
        return folder.parent, (match.group(2) or "").lower()
    return folder, ""


def _strip_channel_folders(images: Iterable[Path]) -> set[Path]:
    """Image role folders whose files carry an nnU-Net channel suffix (``case_0000``).

    The image folders of one dataset (``imagesTr`` and ``imagesTs`` together) qualify when every stem ends in
    four digits and there are fewer distinct suffixes than images: channels repeat, case numbers do not.
    """
    by_dataset: dict[Path, list[Path]] = defaultdict(list)
    for path in images:
        if IMAGE_FOLDER.match(path.parent.name):
            by_dataset[path.parent.parent].append(path)
    stripped = set()
    for paths in by_dataset.values():
        matches = [NNUNET_CHANNEL.match(file_stem(path)) for path in paths]
        if all(matches) and len({match.group("channel") for match in matches}) < len(paths):
            stripped.update(path.parent for path in paths)
    return stripped


def _case_name(path: Path, channel_folders: set[Path]) -> str:
    stem = file_stem(path)
    match = NNUNET_CHANNEL.match(stem) if path.parent in channel_folders else None
    return match.group("case") if match else stem


def _walk(root: Path, problems: list[str]) -> tuple[list[Path], list[Path]]:
    """(volume files, folders holding DICOM files) under root, sorted; unsupported files go to `problems`."""
    files, dicom_folders = [], []
    visited = set()  # real paths: linked dataset folders are followed, link cycles are not
    for directory, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith(".") and name != "__pycache__")
        holds_dicom = False
        # voxel data files (case.raw, case.zraw, case.raw.gz) of a MetaImage or detached NRRD header beside them
        header_stems = {name.rsplit(".", 1)[0] for name in names if name.lower().endswith((".mhd", ".nhdr"))}
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            kind = image_format(path)
            if kind == "dicom":
                holds_dicom = True
            elif kind is not None:
                files.append(path)
            elif not path.suffix or path.suffix.lower() in SIDECAR_SUFFIXES:
                continue  # README, LICENSE, dataset.json, reports: not volumes, not problems
            elif name.removesuffix(".gz").rsplit(".", 1)[0] in header_stems:
                continue  # read through its header
            elif not path.exists():
                problems.append(f"{path} does not exist (a broken link); fix or remove the link.")
            else:
                problems.append(f"{path} has the unsupported extension '{path.suffix}' and was skipped; convert it "
                                f"to NIfTI (.nii.gz), NRRD or MetaImage, or move it out of the folder.")
        if holds_dicom:
            dicom_folders.append(Path(directory))
    return files, dicom_folders


def _pair_labels(files: list[Path], channel_folders: set[Path], problems: list[str]) -> list[_Volume]:
    """Split files into images and labels and attach each label to its image."""
    images: list[_Volume] = []
    labels: list[tuple[Path, str]] = []
    for path in files:
        in_image_folder = IMAGE_FOLDER.match(path.parent.name) is not None  # the folder's role wins over the name
        name_key = None if in_image_folder else _label_name_key(file_stem(path))
        if LABEL_FOLDER.match(path.parent.name):  # masks/case1_mask.nii.gz pairs with images/case1.nii.gz
            labels.append((path, name_key if name_key is not None else "_".join(_tokens(file_stem(path)))))
        elif name_key is not None:
            labels.append((path, name_key))
        else:
            images.append(_Volume(path))
    # An image answers to its full name and, with an nnU-Net channel suffix, to its case name.
    by_key: dict[tuple[Path, str], _Volume] = {}
    images_at: dict[Path, list[_Volume]] = defaultdict(list)
    for volume in images:
        place = _pairing_place(volume.path)
        by_key[(place, "_".join(_tokens(file_stem(volume.path))))] = volume
        by_key.setdefault((place, "_".join(_tokens(_case_name(volume.path, channel_folders)))), volume)
        images_at[place].append(volume)
    unpaired: dict[Path, list[Path]] = defaultdict(list)
    for path, key in labels:
        place = _pairing_place(path)
        image = by_key.get((place, key))
        if image is None and key == "" and len(images_at[place]) == 1:  # KiTS: imaging.nii.gz + segmentation.nii.gz
            image = images_at[place][0]
        if image is None:
            unpaired[path.parent].append(path)
        elif image.label is not None:
            problems.append(f"{path} is a second label for {image.path} (which keeps {image.label.name}); "
                            f"remove or rename one of them.")
        else:
            image.label = path
    for folder, paths in unpaired.items():
        example = paths[0].name
        if len(paths) == 1:
            problems.append(f"{paths[0]} looks like a label but no image of the same name was found, so it was "
                            f"skipped; rename it to match its image.")
        else:
            problems.append(f"{len(paths)} files in {folder} (e.g. {example}) look like labels without an image of "
                            f"the same name, so they were skipped; rename them to match their images.")
    return images


def _dicom_series(folder: Path, read_voxels: bool, problems: list[str]) -> list[tuple[_Volume, VolumeHeader]]:
    """One (volume, header) per DICOM image series in `folder`; bad series go to `problems`."""
    found = []
    try:
        names = dicom_series_names(folder)
        identifiers = list(names.GetSeriesUIDs())
    except MissingDependencyError:
        raise  # itk missing: a setup problem, not a bad file
    except Exception as error:
        problems.append(f"{folder} holds DICOM files that could not be grouped into series ({one_line(error)}); "
                        f"check the export.")
        return found
    if not identifiers:
        problems.append(f"{folder} holds DICOM files but no readable image series; check the export or remove them.")
    for identifier in identifiers:
        files = tuple(names.GetFileNames(identifier))
        try:
            tags = dicom_tags(files[0], (PATIENT_ID, STUDY_UID, SERIES_DESCRIPTION, DICOM_MODALITY))
            kind = tags.get(DICOM_MODALITY, "").upper()
            if kind in NON_IMAGE_DICOM:
                problems.append(f"{folder} holds a DICOM {kind} series ({identifier}), which is not an image and "
                                f"was skipped.")
                continue
            header = read_dicom_header(folder, identifier, files=files)
        except MissingDependencyError:
            raise
        except VolumeError as error:
            problems.append(str(error))
            continue
        except Exception as error:  # GDCM errors on a damaged file
            problems.append(f"{folder} DICOM series {identifier} could not be read ({one_line(error)}); "
                            f"export it again or remove it.")
            continue
        series_problems = header_problems(header, read_voxels=read_voxels)
        if series_problems:
            problems.extend(series_problems)
            continue
        found.append((_Volume(folder, series=identifier, files=files, tags=tags), header))
    return found


def _first_level_holds_subjects(root: Path, volumes: Sequence[_Volume]) -> bool:
    """True when the first-level folders look like subjects of one dataset, not datasets: nothing sits at the top
    and the same relative path (e.g. ``ct.nii.gz``) occurs below more than one of them."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for volume in volumes:
        parts = volume.path.relative_to(root).parts
        if len(parts) < 2 or IMAGE_FOLDER.match(parts[0]) or LABEL_FOLDER.match(parts[0]):
            return False
        owners[parts[1:]].add(parts[0])
    return any(len(folders) > 1 for folders in owners.values())


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(value), 6) for value in values]


def subject_matcher(pattern: str | None) -> re.Pattern | None:
    """The compiled `--subject_pattern`: a regular expression searched in a scan's path relative to its dataset
    folder, whose group ``subject`` (or else its first group, or else the whole match) names the subject."""
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ManifestError(f"--subject_pattern '{pattern}' is not a regular expression ({error}); give one such "
                            f"as 'sub-(\\d+)' or '(?P<subject>patient\\d+)_'.") from None


def _subject_from_pattern(matcher: re.Pattern, relative: str) -> str | None:
    match = matcher.search(relative)
    if match is None:
        return None
    if "subject" in matcher.groupindex:
        return match.group("subject")
    return match.group(1) if matcher.groups else match.group(0)


def _read_headers(root: Path, candidates: Sequence[_Volume], dicom_folders: Sequence[Path], read_voxels: bool,
                  problems: list[str]) -> list[tuple[_Volume, VolumeHeader]]:
    """Each candidate's header (a label that does not fit its image is dropped, a bad image skipped, both into
    `problems`) and each DICOM folder's series, with a progress bar on a terminal or lines in a log."""
    found: list[tuple[_Volume, VolumeHeader]] = []
    with Progress(len(candidates) + len(dicom_folders), f"volumes read under {root}",
                  minimum=PROGRESS_MINIMUM) as progress:
        for volume in candidates:
            header, volume_problems = inspect_volume(volume.path, read_voxels=read_voxels)
            progress.update()
            if volume_problems:
                problems.extend(volume_problems)
                continue
            if volume.label is not None:
                label_header, label_problems = inspect_volume(volume.label, read_voxels=read_voxels)
                if label_problems:
                    problems.extend(f"{message.rstrip('.')}; its image {volume.path.name} is kept without a label."
                                    for message in label_problems[:1])
                    volume.label = None
                elif label_header.spatial_shape != header.spatial_shape:
                    problems.append(f"{volume.label} has the shape {list(label_header.spatial_shape)} but its "
                                    f"image {volume.path.name} has {list(header.spatial_shape)}, so the image is kept "
                                    f"without a label; fix or remove the label.")
                    volume.label = None
            found.append((volume, header))
        for folder in dicom_folders:
            found.extend(_dicom_series(folder, read_voxels, problems))
            progress.update()
    return found


def scan_folder(directory: str | os.PathLike, *, modality: str = "CT", dataset: str | None = None,
                read_voxels: bool = False, subject_pattern: str | None = None) -> tuple[list[dict], list[str]]:
    """Find every volume under `directory` and describe it as a manifest record, reading headers only.

    Args:
        directory: the folder to walk (NIfTI, NRRD, MetaImage files and DICOM series, any depth).
        modality: "CT", "MR" or "PT" for the datasets; a DICOM series whose Modality tag says otherwise gets its
            own modality and that modality's default preset.
        dataset: put everything into one dataset of this name (first-level folders become subjects).
        read_voxels: also read every voxel (slow; catches truncated files and NaN / infinite voxels).
        subject_pattern: a regular expression that names the subject from a scan's path relative to its dataset
            (`subject_matcher`), e.g. ``sub-(\\d+)`` to group ``sub-01_T1w.nii.gz`` and ``sub-01_T2w.nii.gz``;
            scans it does not match keep the default subject (with a warning naming one of them).

    Returns:
        (records, problems): records as `voco.data.manifest.manifest_from_records` takes them,
        ``{"dataset", "subject", "study", "scan": {"image", "label"?, "series"?, "shape", "spacing",
        "orientation", ...}}`` with paths relative to `directory`; problems are sentences, one per bad file
        (bad files are skipped, never fatal).
    """
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"folder {root} does not exist; give the folder that holds the volumes.")
    modality = normalize_modality(modality, f"scan of {root}")
    matcher = subject_matcher(subject_pattern)
    problems: list[str] = []
    files, dicom_folders = _walk(root, problems)
    channel_folders = _strip_channel_folders(files)
    candidates = _pair_labels(files, channel_folders, problems)

    found = _read_headers(root, candidates, dicom_folders, read_voxels, problems)

    one_dataset = dataset is not None or _first_level_holds_subjects(root, [volume for volume, _ in found])
    records, unmatched = [], []
    for volume, header in found:
        parts = volume.path.relative_to(root).parts
        folder_parts = parts if volume.series is not None else parts[:-1]
        if one_dataset:
            dataset_name, inner = dataset or root.name or "dataset", folder_parts
        elif len(folder_parts) >= 1 and not (IMAGE_FOLDER.match(folder_parts[0]) or LABEL_FOLDER.match(folder_parts[0])):
            dataset_name, inner = folder_parts[0], folder_parts[1:]
        else:
            dataset_name, inner = root.name or "dataset", folder_parts
        subject_folders = [part for part in inner if not (IMAGE_FOLDER.match(part) or LABEL_FOLDER.match(part))]
        if volume.series is not None:
            subject = volume.tags.get(PATIENT_ID) or (subject_folders[0] if subject_folders else volume.path.name)
        else:
            subject = subject_folders[0] if subject_folders else _case_name(volume.path, channel_folders)
        if matcher is not None:
            named = _subject_from_pattern(matcher, "/".join([*inner, *([] if volume.series else parts[-1:])]))
            if named:
                subject = named
            else:
                unmatched.append(volume.path.relative_to(root).as_posix())
        scan: dict[str, Any] = {"image": volume.path.relative_to(root).as_posix() or "."}
        if volume.label is not None:
            scan["label"] = volume.label.relative_to(root).as_posix()
        if volume.series is not None:
            scan["series"] = volume.series
            scan_modality = MODALITY_ALIASES.get(volume.tags.get(DICOM_MODALITY, "").upper())
            if scan_modality is not None and scan_modality != modality:
                scan["modality"], scan["preset"] = scan_modality, DEFAULT_PRESETS[scan_modality]
            if SERIES_DESCRIPTION in volume.tags:
                scan["attributes"] = {"series_description": volume.tags[SERIES_DESCRIPTION]}
        scan.update(shape=list(header.spatial_shape), spacing=_round(header.spacing), orientation=header.orientation)
        records.append({"dataset": dataset_name, "subject": subject, "study": volume.tags.get(STUDY_UID, "0"),
                        "scan": scan})
    if unmatched:
        logger.warning(f"{len(unmatched)} scans (e.g. {unmatched[0]}) do not match --subject_pattern "
                        f"'{subject_pattern}' and keep the subject of the folder layout; they are in the manifest.")
    return records, problems


def build_manifest_from_folder(directory: str | os.PathLike, *, output: str | os.PathLike = "manifest.json",
                               modality: str = "CT", name: str | None = None, preset: str | None = None,
                               dataset: str | None = None, read_voxels: bool = False,
                               subject_pattern: str | None = None) -> tuple[Path, list[str]]:
    """Scan `directory` and write its manifest to `output` (atomically); bad files are reported and left out.

    The manifest's ``dataset_dir`` is the scanned folder relative to the manifest file, and image paths are
    relative to the scanned folder, so folder and manifest can move together.

    Returns:
        (the manifest path, one sentence per skipped file).

    Raises:
        ManifestError: the folder does not exist or holds no readable volume.
    """
    root = Path(directory).expanduser().resolve()
    records, problems = scan_folder(root, modality=modality, dataset=dataset, read_voxels=read_voxels,
                                    subject_pattern=subject_pattern)
    if not records:
        detail = f" ({len(problems)} files were skipped, e.g. {problems[0]!r})" if problems else ""
        raise ManifestError(f"folder {root} holds no readable volume{detail}; give a folder with NIfTI, NRRD, "
                            f"MetaImage or DICOM volumes.")
    output = Path(output).expanduser().resolve()
    manifest = manifest_from_records(records, name=name or root.name, modality=modality, preset=preset,
                                     description=f"volumes found under {root} by `voco manifest build`")
    try:
        manifest["dataset_dir"] = Path(os.path.relpath(root, output.parent)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        manifest["dataset_dir"] = root.as_posix()
    return save_manifest(manifest, output), problems
