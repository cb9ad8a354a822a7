"""Volume files: which formats voco reads and their headers (fast, no voxels); the checks a volume must pass are
`voco.data.volume_checks`.

Headers are read with nibabel (NIfTI: lazy proxies, only the first bytes are read) and with itk
(NRRD, MetaImage, DICOM: ``ReadImageInformation`` / ``UpdateOutputInformation``). itk is imported only when a
non-NIfTI file is met, so NIfTI-only work never pays for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from voco.errors import VocoError, VolumeError, optional_import

# Longest suffixes first, so ".nii.gz" wins over ".gz".
FORMAT_OF_EXTENSION = {
    ".nii.gz": "nifti", ".nii": "nifti",
    ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".mha": "metaimage", ".mhd": "metaimage",
    ".dcm": "dicom", ".dicom": "dicom",
}
SUPPORTED_EXTENSIONS = tuple(FORMAT_OF_EXTENSION)  # plus folders that hold a DICOM series
SUPPORTED_DESCRIPTION = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series"
DICOM_MAGIC_OFFSET = 128  # a DICOM Part 10 file has a 128-byte preamble, then "DICM"
# ITK's component type names -> numpy dtype names (ITK's "long" is 64-bit on the platforms itk wheels target).
ITK_COMPONENT_DTYPES = {
    "unsigned_char": "uint8", "char": "int8", "unsigned_short": "uint16", "short": "int16",
    "unsigned_int": "uint32", "int": "int32", "unsigned_long": "uint64", "long": "int64",
    "unsigned_long_long": "uint64", "long_long": "int64", "float": "float32", "double": "float64",
}


@dataclass
class VolumeHeader:
    """What a volume's header says, without its voxels.

    Attributes:
        path: the file (or DICOM series folder) it was read from.
        format: "nifti", "nrrd", "metaimage" or "dicom".
        shape: voxel counts per array axis in file order ``(X, Y, Z[, extra axes])``; an image with several
            components per voxel (vector pixels) has them as a trailing axis.
        spacing: voxel size in mm per spatial axis (2 or 3 values).
        orientation: the axis code of the voxel axes in nibabel's (RAS+) convention, e.g. "RAS" or "LPS".
        dtype: numpy name of the stored voxel type, e.g. "int16".
        series: the DICOM series identifier (as itk's GDCMSeriesFileNames names it), else None.
        files: for a DICOM series, its slice files in reading order; else empty.
    """

    path: str
    format: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    dtype: str
    series: str | None = None
    files: tuple[str, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[:3])

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """Axes after the three spatial ones (time points, channels, vector components)."""
        return tuple(self.shape[3:])


# ---------------------------------------------------------------------------------------------------------------
# Formats


def _matching_extension(name: str) -> str | None:
    lower = name.lower()
    return next((extension for extension in SUPPORTED_EXTENSIONS if lower.endswith(extension)), None)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file named .dcm, or one that carries the DICOM 'DICM' marker (exports often have no suffix)."""
    path = Path(path)
    if path.name.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(DICOM_MAGIC_OFFSET)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files_in(directory: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """DICOM files directly inside `directory` (not in sub-folders), sorted; at most `limit` of them."""
    found = []
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if is_dicom_file(entry.path):
            found.append(Path(entry.path))
            if limit is not None and len(found) >= limit:
                break
    return found


def image_format(path: str | os.PathLike) -> str | None:
    """"nifti", "nrrd", "metaimage" or "dicom" (a .dcm file, a file with the DICOM marker, or a folder holding
    DICOM files), from the name alone where it can (other files: their first 132 bytes); None for anything else."""
    path = Path(path)
    extension = _matching_extension(path.name)
    if extension is not None:
        return FORMAT_OF_EXTENSION[extension]
    if path.is_dir():
        return "dicom" if dicom_files_in(path, limit=1) else None
    if path.is_file() and is_dicom_file(path):  # exports name slices IM0001 or by UID (1.2.840...1029.320)
        return "dicom"
    return None


def file_stem(path: str | os.PathLike) -> str:
    """The name without its image extension: ``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    extension = _matching_extension(name)
    return name[: -len(extension)] if extension else Path(name).stem


# ---------------------------------------------------------------------------------------------------------------
# Headers


def one_line(error: BaseException) -> str:
    """A library error as a short clause that fits inside our one-sentence messages."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def orientation_from_directions(directions: Any, lps: bool) -> str:
    """Axis code (nibabel convention) of voxel axes whose direction cosines are the columns of `directions`.

    ITK stores directions in LPS space; nibabel's codes are RAS+, so the first two world axes flip sign.
    """
    matrix = np.eye(3)
    given = np.asarray(directions, dtype=float)
    size = min(3, given.shape[0])
    matrix[:size, :size] = given[:size, :size]
    if lps:
        matrix = np.diag([-1.0, -1.0, 1.0]) @ matrix
    affine = np.eye(4)
    affine[:3, :3] = matrix
    return axis_codes(affine)


def axis_codes(affine: Any) -> str:
    """nibabel's axis code of a 4 x 4 voxel-to-RAS affine, "???" where the affine is not finite (a bad header,
    which the spacing check reports)."""
    nibabel = optional_import("nibabel", "reading volume headers")
    affine = np.asarray(affine, dtype=float)
    if not np.isfinite(affine).all():
        return "???"
    return "".join(code or "?" for code in nibabel.aff2axcodes(affine))


def _nifti_header(path: Path) -> VolumeHeader:
    nibabel = optional_import("nibabel", "reading NIfTI headers")
    image = nibabel.load(str(path))  # lazy: only the header is read here
    header = image.header
    shape = tuple(int(size) for size in image.shape)
    if path.name.lower().endswith(".nii"):  # uncompressed: a short file is a truncated one, no voxels needed
        expected = int(image.dataobj.offset) + math.prod(shape) * header.get_data_dtype().itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise VolumeError(f"{path} is truncated ({actual} of {expected} bytes); download or export it again.")
    spacing = tuple(float(size) for size in header.get_zooms()[: min(3, len(shape))])
    orientation = axis_codes(image.affine)
    return VolumeHeader(str(path), "nifti", shape, spacing, orientation, header.get_data_dtype().name)


def _itk_header_from_io(path: Path, image_format_name: str, image_io: Any) -> VolumeHeader:
    dimensions = image_io.GetNumberOfDimensions()
    shape = [int(image_io.GetDimensions(axis)) for axis in range(dimensions)]
    while len(shape) > 3 and shape[-1] == 1:  # itk pads some formats with singleton axes
        shape.pop()
    components = int(image_io.GetNumberOfComponents())
    if components > 1:
        shape.append(components)
    spatial = min(3, dimensions)
    spacing = tuple(float(image_io.GetSpacing(axis)) for axis in range(spatial))
    directions = np.array([image_io.GetDirection(axis)[:spatial] for axis in range(spatial)]).T
    component = image_io.GetComponentTypeAsString(image_io.GetComponentType())
    return VolumeHeader(str(path), image_format_name, tuple(shape), spacing,
                        orientation_from_directions(directions, lps=True),
                        ITK_COMPONENT_DTYPES.get(component, component))


def _itk_file_header(path: Path, image_format_name: str) -> VolumeHeader:
    itk = optional_import("itk", f"reading {image_format_name} files")
    image_io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise VolumeError(f"{path} is not a {image_format_name} file itk can read; export it again or remove it.")
    image_io.SetFileName(str(path))
    image_io.ReadImageInformation()
    return _itk_header_from_io(path, image_format_name, image_io)


def dicom_series_names(directory: str | os.PathLike) -> Any:
    """itk's GDCMSeriesFileNames for `directory` (not recursive), set up exactly as MONAI's ITKReader sets it up,
    so that our series identifiers are the ones ``ITKReader(series_name=...)`` accepts."""
    itk = optional_import("itk", "reading DICOM series")
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date, as in monai.data.ITKReader
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(directory))
    return names


def dicom_tags(file: str | os.PathLike, tags: Sequence[str]) -> dict[str, str]:
    """The given DICOM tags ("gggg|eeee") of one file, stripped; tags the file lacks are left out."""
    itk = optional_import("itk", "reading DICOM tags")
    image_io = itk.GDCMImageIO.New()
    image_io.SetFileName(str(file))
    image_io.ReadImageInformation()
    dictionary = image_io.GetMetaDataDictionary()
    found = {}
    for tag in tags:
        if dictionary.HasKey(tag):
            value = str(dictionary[tag]).strip().strip("\x00").strip()
            if value:
                found[tag] = value
    return found


def read_dicom_header(path: str | os.PathLike, series: str | None = None,
                      files: Sequence[str] | None = None) -> VolumeHeader:
    """Header of a DICOM series (a folder, optionally with a series identifier), or of one .dcm file.

    `files` (the series' slice files in order, as GDCMSeriesFileNames gives them) saves listing the folder again.
    """
    itk = optional_import("itk", "reading DICOM series")
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if files is None:
        if path.is_file() and series is None:  # one .dcm file on its own (a slice or a multi-frame volume)
            files = [str(path)]
        else:
            names = dicom_series_names(folder)
            identifiers = list(names.GetSeriesUIDs())
            if not identifiers:
                raise VolumeError(f"{folder} holds no readable DICOM series; check the export or remove it.")
            if series is None:
                if len(identifiers) > 1:
                    raise VolumeError(f"{folder} holds {len(identifiers)} DICOM series; name one with 'series' "
                                      f"(one of {', '.join(identifiers[:3])}{', ...' if len(identifiers) > 3 else ''}).")
                series = identifiers[0]
            elif series not in identifiers:
                raise VolumeError(f"{folder} holds no DICOM series {series!r}; rebuild the manifest with "
                                  f"`voco manifest build`.")
            files = list(names.GetFileNames(series))
    first = itk.GDCMImageIO.New()
    first.SetFileName(str(files[0]))
    first.ReadImageInformation()
    if len(files) == 1:
        header = _itk_header_from_io(path, "dicom", first)
        if len(header.shape) == 2:  # a single slice reads as [X, Y]; as a volume it is [X, Y, 1]
            header.shape = (*header.shape, 1)
    else:
        _check_slice_positions(itk, folder, series, files)
        # The series reader reads the first and last slice headers to place the slices; no voxels.
        reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=[str(file) for file in files],
                                                               ImageIO=itk.GDCMImageIO.New())
        reader.UpdateOutputInformation()
        image = reader.GetOutput()
        shape = [int(size) for size in image.GetLargestPossibleRegion().GetSize()]
        if first.GetNumberOfComponents() > 1:
            shape.append(int(first.GetNumberOfComponents()))
        component = first.GetComponentTypeAsString(first.GetComponentType())
        header = VolumeHeader(str(path), "dicom", tuple(shape), tuple(float(s) for s in image.GetSpacing()),
                              orientation_from_directions(itk.array_from_matrix(image.GetDirection()), lps=True),
                              ITK_COMPONENT_DTYPES.get(component, component))
    header.series = series
    header.files = tuple(str(file) for file in files)
    return header


def _check_slice_positions(itk: Any, folder: Path, series: str | None, files: Sequence[str]) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: a missing, corrupt (left out of the
    series) or duplicated slice. Why: itk's series reader places the slices from the first and last position alone,
    so a gap becomes an averaged spacing and the anatomy is silently stretched."""
    positions = []
    for file in files:
        image_io = itk.GDCMImageIO.New()
        image_io.SetFileName(str(file))
        try:
            image_io.ReadImageInformation()
        except Exception as error:  # a damaged slice header
            raise VolumeError(f"slice {file} of the DICOM series in {folder} cannot be read ({one_line(error)}); "
                              f"export the series again or remove it.") from error
        positions.append([image_io.GetOrigin(axis) for axis in range(3)])
    positions = np.asarray(positions, dtype=float)
    across = positions[-1] - positions[0]  # along the slice normal (or a gantry tilt's axis), as itk places them
    if len(files) < 3 or not np.all(np.isfinite(positions)) or not np.linalg.norm(across) > 0:
        return
    distances = np.diff(positions @ (across / np.linalg.norm(across)))
    step = float(np.median(np.abs(distances)))
    irregular = np.flatnonzero(np.abs(np.abs(distances) - step) > 0.05 * step + 1e-3)
    if step > 0 and irregular.size == 0:
        return
    at = int(irregular[0]) if irregular.size else 0
    named = f"DICOM series {series} in {folder}" if series else f"DICOM series in {folder}"
    raise VolumeError(f"the {named} has unevenly spaced slices ({abs(distances[at]):g} mm between slices {at + 1} "
                      f"and {at + 2} of {len(files)}, {step:g} mm elsewhere): a slice is missing, corrupt or "
                      f"doubled; export the series again or remove it.")


def read_header(path: str | os.PathLike, series: str | None = None) -> VolumeHeader:
    """Read a volume's header (never its voxels): NIfTI, NRRD, MetaImage, a DICOM file or a DICOM series folder.

    Args:
        path: the file, or the folder that holds a DICOM series.
        series: which DICOM series of the folder (a GDCMSeriesFileNames identifier); needed only when the folder
            holds more than one.

    Raises:
        VolumeError: the file is missing, has an unsupported extension or cannot be read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VolumeError(f"{path} does not exist; check the path or remove the entry.")
    kind = image_format(path)
    if kind is None:
        what = "folder holds no DICOM files" if path.is_dir() else f"has the unsupported extension '{path.suffix}'"
        raise VolumeError(f"{path} {what}; give a {SUPPORTED_DESCRIPTION}.")
    try:
        if kind == "nifti":
            return _nifti_header(path)
        if kind == "dicom":
            return read_dicom_header(path, series)
        return _itk_file_header(path, kind)
    except VocoError:  # our own sentence (truncated file), or a missing itk: pass on as it is
        raise
    except Exception as error:  # any reader failure (bad header, wrong magic, gzip error) is a bad file
        raise VolumeError(f"{path} could not be read as {kind} ({one_line(error)}); "
                          f"export it again or remove it.") from error


def load_voxels(header: VolumeHeader) -> Any:
    """All voxels of the volume described by `header`, as stored (no intensity scaling applied)."""
    if header.format == "nifti":
        nibabel = optional_import("nibabel", "reading NIfTI volumes")
        return nibabel.load(header.path).dataobj.get_unscaled()
    itk = optional_import("itk", f"reading {header.format} volumes")
    source = list(header.files) if len(header.files) > 1 else (header.files[0] if header.files else header.path)
    return itk.array_view_from_image(itk.imread(source))


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by files and loaded arrays
