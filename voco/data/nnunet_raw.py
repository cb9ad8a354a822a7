"""A Decathlon-style labelled dataset (a Medical Segmentation Decathlon task folder, a voco phantom task, your own
``dataset.json``) as an nnU-Net raw dataset, what ``nnUNetv2_plan_and_preprocess`` reads::

    <nnUNet_raw>/Dataset<ID>_<Name>/imagesTr/<case>_0000.nii.gz    one file per channel
                                   /labelsTr/<case>.nii.gz
                                   /imagesTs/<case>_0000.nii.gz    the datalist's "test" images, if any
                                   /dataset.json                   channel_names, labels, numTraining, file_ending

Every labelled entry of the datalist ("training" and "validation": nnU-Net makes its own cross-validation folds)
becomes a training case named after its image file. Images are split into channels by nnU-Net's own MSD converter
(`nnunetv2.dataset_conversion.convert_MSD_dataset.split_4d_nifti`: a 3-D file is copied, a 4-D one split); for an
MSD download, ``nnUNetv2_convert_MSD_dataset -i Task09_Spleen`` gives the same layout, this one also reads any
Decathlon-style datalist (paths anywhere below the folder, other image formats, channels as lists of files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from voco.errors import ConfigError, optional_import
from voco.files import with_umask_mode

_MSD_FOLDER = re.compile(r"^Task(\d+)_(\w+)$")
_NIFTI_GZ = ".nii.gz"


def decathlon_to_nnunet_raw(source: str | os.PathLike, out: str | os.PathLike | None = None,
                            dataset_id: int | None = None, name: str | None = None,
                            datalist: str = "dataset.json") -> Path:
    """Write the nnU-Net raw dataset of the Decathlon-style datalist `source` (its folder, or the JSON file).

    Args:
        source: the dataset folder holding `datalist`, or the datalist file itself; paths in it are relative to its
            folder.
        out: the nnU-Net raw folder (default: the ``nnUNet_raw`` environment variable).
        dataset_id: nnU-Net's dataset number (default: the number of an MSD folder name ``TaskNN_Name``).
        name: the dataset's name (default: the MSD folder's, else the datalist's "name", else the folder's).

    Returns:
        the written ``Dataset<ID>_<Name>`` folder, renamed into place once complete.

    Raises:
        ConfigError: no datalist, no labelled entries, a missing file, two cases of one name, no dataset id, or an
            existing dataset of that id.
    """
    path = Path(source).expanduser().resolve()
    datalist_path = path / datalist if path.is_dir() else path
    if not datalist_path.is_file():
        raise ConfigError(f"{datalist_path} does not exist; give a Decathlon-style dataset folder (with a "
                          f"dataset.json listing its training images and labels) or that JSON file.")
    folder = datalist_path.parent
    content = json.loads(datalist_path.read_text(encoding="utf-8"))
    msd = _MSD_FOLDER.match(folder.name)
    dataset_id = int(dataset_id if dataset_id is not None else msd.group(1) if msd else _no_id(folder))
    name = _clean_name(name or (msd.group(2) if msd else None) or content.get("name") or folder.name)
    raw = Path(out if out is not None else os.environ.get("nnUNet_raw") or _no_out()).expanduser().resolve()
    target = raw / f"Dataset{dataset_id:03d}_{name}"
    taken = sorted(p.name for p in raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    if taken:
        raise ConfigError(f"{raw} already holds dataset {dataset_id} ({taken[0]}); remove it or give another "
                          f"--dataset_id (nnU-Net needs one dataset per id).")

    labelled = [entry for key in ("training", "validation") for entry in content.get(key, [])
                if isinstance(entry, dict) and entry.get("label")]
    if not labelled:
        raise ConfigError(f"{datalist_path} lists no labelled entries under 'training' or 'validation'; nnU-Net "
                          f"trains on image-label pairs, give a datalist that has them.")
    tests = [entry["image"] if isinstance(entry, dict) else entry for entry in content.get("test", [])]
    channels = _channel_names(content, labelled[0]["image"])
    split_4d_nifti = optional_import("nnunetv2.dataset_conversion.convert_MSD_dataset",
                                     "Converting a dataset to nnU-Net's raw format").split_4d_nifti

    raw.mkdir(parents=True, exist_ok=True)
    staging = with_umask_mode(tempfile.mkdtemp(prefix=f".{target.name}.", dir=raw))
    try:
        cases: dict[str, str] = {}
        for entry in labelled:
            case = _case_name(entry["image"], cases, datalist_path)
            _write_image(folder, entry["image"], case, staging / "imagesTr", len(channels), split_4d_nifti)
            _write_file(folder / entry["label"], staging / "labelsTr" / f"{case}{_NIFTI_GZ}")
        tested: dict[str, str] = {}
        for image in tests:
            _write_image(folder, image, _case_name(image, tested, datalist_path), staging / "imagesTs",
                         len(channels), split_4d_nifti)
        labels = {str(value): int(key) for key, value in content.get("labels", {"0": "background"}).items()}
        labels = {"background" if value == 0 else key: value for key, value in labels.items()}  # nnU-Net's name
        described = {key: content[key] for key in ("description", "reference", "licence", "release", "tensorImageSize")
                     if key in content}
        (staging / "dataset.json").write_text(json.dumps({
            "name": name, **described, "channel_names": channels, "labels": labels, "numTraining": len(cases),
            "file_ending": _NIFTI_GZ, "converted_by": f"voco nnunet_raw from {datalist_path}"}, indent=1) + "\n")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _no_id(folder: Path) -> int:
    raise ConfigError(f"{folder.name} is not an MSD folder name (TaskNN_Name), so its nnU-Net dataset id is unknown; "
                      f"give one with --dataset_id (e.g. 501: ids above 500 are free of nnU-Net's own datasets).")


def _no_out() -> str:
    raise ConfigError("give the nnU-Net raw folder to write into, or set the nnUNet_raw environment variable as "
                      "nnU-Net's own commands need it.")


def _clean_name(name: str) -> str:
    """A name nnU-Net's ``Dataset<ID>_<Name>`` pattern takes: letters, digits and hyphens (no '_' or spaces)."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", str(name)).strip("-")
    if not cleaned:
        raise ConfigError(f"the dataset name {name!r} has no letters or digits; give one with --name.")
    return cleaned


def _channel_names(content: dict[str, Any], image: Any) -> dict[str, str]:
    modality = content.get("modality") or content.get("channel_names")
    if isinstance(modality, dict) and modality:
        return {str(key): str(value) for key, value in modality.items()}
    count = len(image) if isinstance(image, list) else 1
    return {str(index): "CT" if count == 1 else f"channel{index}" for index in range(count)}


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (_NIFTI_GZ, ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _case_name(image: Any, seen: dict[str, str], datalist_path: Path) -> str:
    """The case's name: its (first) image file's name without its ending; two images of one name are refused."""
    first = image[0] if isinstance(image, list) else image
    case = _stem(first)
    if case in seen:
        raise ConfigError(f"{datalist_path} lists two images named {case} ({seen[case]} and {first}); nnU-Net names "
                          f"cases by file name, so rename one of them.")
    seen[case] = str(first)
    return case


def _write_image(folder: Path, image: Any, case: str, target: Path, channels: int, split_4d_nifti: Any) -> None:
    """One image as ``<case>_0000.nii.gz`` ...: a list of files is one file per channel; a 4-D file is split by
    nnU-Net's converter, which names the parts after the file, so the file is first given the case's name."""
    target.mkdir(parents=True, exist_ok=True)
    if isinstance(image, list):
        for index, part in enumerate(image):
            _write_file(folder / part, target / f"{case}_{index:04d}{_NIFTI_GZ}")
    else:
        staged = target / f"{case}{_NIFTI_GZ}"
        _write_file(folder / image, staged)
        split_4d_nifti(str(staged), str(target))
        staged.unlink()
    written = len(list(target.glob(f"{case}_[0-9][0-9][0-9][0-9]{_NIFTI_GZ}")))
    if written != channels:
        raise ConfigError(f"{image} has {written} channels but the datalist names {channels} (its 'modality'); "
                          f"give images with one channel per name.")


def _write_file(source: Path, target: Path) -> None:
    """Copy a NIfTI (.nii.gz) file as it is; read any other format and write it as .nii.gz."""
    if not source.is_file():
        raise ConfigError(f"{source} does not exist; the datalist names it, so restore it or remove its entry.")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.lower().endswith(_NIFTI_GZ):
        shutil.copyfile(source, target)
        return
    sitk = optional_import("SimpleITK", "Converting a dataset to nnU-Net's raw format")
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target), True)
