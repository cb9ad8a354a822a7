"""Sets of phantoms on disk: NIfTI files and a voco manifest, written atomically, reused when complete."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from voco.data.phantoms.anatomy import PHANTOM_VERSION, Phantom, make_phantom
from voco.data.phantoms.studies import MAX_STUDY_SCANS, PHANTOM_STUDY_VERSION, make_phantom_study
from voco.errors import ConfigError, VocoError
from voco.files import with_umask_mode

logger = logging.getLogger("voco.data.phantoms")

STAMP_NAME = ".voco_phantoms.json"
STAMP_FORMAT = "voco-phantoms"


# ---------------------------------------------------------------------------------------------------------------
# Sets of phantoms on disk


def synthesize(out_dir: str | os.PathLike, n: int = 20, seed: int = 0, *, with_labels: bool = True,
               name: str = "phantoms", **phantom_options: Any) -> Path:
    """Write `n` phantoms as NIfTI files with a voco manifest into `out_dir`; returns the manifest path.

    Layout: out_dir/images/phantom_XXXX.nii.gz (int16 HU), out_dir/labels/phantom_XXXX.nii.gz (uint8, when
    `with_labels`), out_dir/manifest.json (one dataset `name`, modality CT, preset "ct_abdomen", one subject per
    phantom with its report and attributes) and a stamp file of the arguments. Phantom i is
    ``make_phantom((seed, i), **phantom_options)`` (its options: the shape and spacing ranges, orientations, lesion
    and enlarged-spleen probabilities, noise, `field_of_view_range` for bodies of a consistent size in mm).
    Everything is written into a temporary sibling folder that is renamed into place at the end, so `out_dir` is
    never half-written. A previous phantom folder is replaced; any other non-empty `out_dir` is refused.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    arguments = _arguments(synthesize, out_dir, n, seed, make_phantom, with_labels=with_labels, name=name,
                           **phantom_options)
    with _staged_set(out_dir, with_labels) as staging:
        records = []
        for index in range(n):
            phantom = make_phantom((seed, index), **phantom_options)
            subject = f"phantom_{index:04d}"
            records.append({"dataset": name, "subject": subject, "study": "ct", "report": phantom.report,
                            "scan": _save_scan(phantom, staging, subject, with_labels)})
            logger.info("phantom %d/%d written to %s", index + 1, n, out_dir)
        _write_set(staging, "phantoms", arguments, records, name,
                   f"{n} synthetic abdominal CT phantoms (voco.data.phantoms, seed {seed})")
    return out_dir / "manifest.json"


def ensure_phantoms(out_dir: str | os.PathLike, n: int = 20, seed: int = 0, **options: Any) -> Path:
    """The manifest of a complete phantom set made with these arguments, synthesised first if need be.

    `options` are those of `synthesize`. A set is reused when its stamp file records the same arguments and
    generator version and all its files exist; otherwise it is written anew. Safe when several processes
    (e.g. torchrun ranks) call it at once: they take turns on a lock file beside `out_dir`, and the rest find
    the set the first one wrote.
    """
    return _ensure_set(synthesize, "phantoms", out_dir, n, seed, options)


def synthesize_studies(out_dir: str | os.PathLike, n: int = 20, seed: int = 0, *, num_scans: int | None = None,
                       with_labels: bool = False, name: str = "phantom_studies", **study_options: Any) -> Path:
    """Write `n` phantom studies (``make_phantom_study((seed, i), num_scans, **study_options)``) with a manifest;
    returns its path.

    Layout: out_dir/images/phantom_XXXX_<series>.nii.gz (int16 HU; labels/ likewise when `with_labels`),
    out_dir/manifest.json: one dataset `name` (modality CT, preset "ct_abdomen"), one subject "phantom_XXXX" per
    study with one study "ct" holding its scans (each with its "series" and, for the wide window, preset
    "ct_chest"), the study's "report" and "findings" (`STUDY_FINDINGS`). Written atomically with a stamp, like
    `synthesize` (the same folder rules).

        manifest_path = synthesize_studies("runs/phantom_studies", n=8)
    """
    out_dir = Path(out_dir).expanduser().resolve()
    arguments = _arguments(synthesize_studies, out_dir, n, seed, make_phantom_study, num_scans=num_scans,
                           with_labels=with_labels, name=name, **study_options)
    options = study_options
    make_phantom_study((seed, 0), num_scans, **options)  # refuse bad options before anything is written
    with _staged_set(out_dir, with_labels) as staging:
        records = []
        for index in range(n):
            study = make_phantom_study((seed, index), num_scans, **options)
            subject = f"phantom_{index:04d}"
            for scan, series in zip(study.scans, study.series):
                record_scan = _save_scan(scan, staging, f"{subject}_{series.name}", with_labels)
                record_scan.update(series=series.name, preset=series.preset)
                records.append({"dataset": name, "subject": subject, "study": "ct", "scan": record_scan,
                                "report": study.report, "findings": study.findings})
            logger.info("phantom study %d/%d (%d scans) written to %s", index + 1, n, len(study.scans), out_dir)
        _write_set(staging, "phantom_studies", arguments, records, name,
                   f"{n} synthetic abdominal CT studies of 1-{MAX_STUDY_SCANS} series with reports "
                   f"(voco.data.phantoms, seed {seed})")
    return out_dir / "manifest.json"


def ensure_phantom_studies(out_dir: str | os.PathLike, n: int = 20, seed: int = 0, **options: Any) -> Path:
    """The manifest of a complete set of phantom studies made with these arguments (`synthesize_studies`'s
    options), synthesised first if need be; reused, locked and replaced as in `ensure_phantoms`."""
    return _ensure_set(synthesize_studies, "phantom_studies", out_dir, n, seed, options)


# The generator version the stamp of each kind of set records: a set made by an older generator is rebuilt.
_SET_VERSIONS: dict[str, Any] = {"phantoms": PHANTOM_VERSION,
                                 "phantom_studies": [PHANTOM_VERSION, PHANTOM_STUDY_VERSION]}
# What makes each member of a set: the options a set writer does not take itself are handed on to it.
_GENERATORS: dict[str, Any] = {"phantoms": make_phantom, "phantom_studies": make_phantom_study}


def _save_scan(phantom: Phantom, staging: Path, stem: str, with_labels: bool) -> dict[str, Any]:
    """Write one phantom as images/<stem>.nii.gz (and labels/<stem>.nii.gz) -> its manifest scan entry."""
    scan: dict[str, Any] = {"image": f"images/{stem}.nii.gz"}
    if with_labels:
        scan["label"] = f"labels/{stem}.nii.gz"
    phantom.save(staging / scan["image"], staging / scan["label"] if with_labels else None)
    scan.update(shape=list(phantom.shape), spacing=[round(size, 4) for size in phantom.spacing],
                orientation=phantom.orientation, attributes=phantom.attributes)
    return scan


def _ensure_set(function: Any, kind: str, out_dir: str | os.PathLike, n: int, seed: int,
                options: dict[str, Any]) -> Path:
    """`function(out_dir, n, seed, **options)`'s manifest, reusing a complete set of `kind` (see `ensure_phantoms`)."""
    out_dir = Path(out_dir).expanduser().resolve()
    arguments = _arguments(function, out_dir, n, seed, _GENERATORS[kind], **options)
    manifest = _complete_set(out_dir, kind, arguments)
    if manifest is not None:
        return manifest
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VocoError(f"cannot create the folder {out_dir.parent} for phantoms ({error.strerror}); "
                        f"choose a writable location.") from error
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        manifest = _complete_set(out_dir, kind, arguments)  # another process may have written it while we waited
        if manifest is not None:
            return manifest
        return function(out_dir, n, seed, **options)


def _arguments(function: Any, out_dir: Path, n: Any, seed: Any, generator: Any, **options: Any) -> dict[str, Any]:
    """All of `function`'s arguments and of the options it hands on to `generator` (defaults filled in) as JSON
    values, to compare with a stamp file."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of phantoms is {n!r}; give a whole number of at least 1.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the phantom seed is {seed!r}; give a whole number of at least 0.")
    own = {key: value for key, value in options.items() if key in inspect.signature(function).parameters}
    handed_on = {key: value for key, value in options.items() if key not in own}
    try:
        bound = inspect.signature(function).bind(out_dir, n, seed, **own)
        passed = inspect.signature(generator).bind_partial(**handed_on)
    except TypeError as error:
        raise ConfigError(f"{function.__name__} does not take these options ({error}); use those of "
                          f"voco.data.phantoms.{function.__name__} and {generator.__name__}.") from None
    bound.apply_defaults()
    passed.apply_defaults()
    variadic = [key for key, parameter in bound.signature.parameters.items() if parameter.kind is parameter.VAR_KEYWORD]
    arguments = {key: value for key, value in bound.arguments.items() if key not in ("out_dir", *variadic)}
    arguments.update((key, value) for key, value in passed.arguments.items() if key not in ("seed", "num_scans"))
    return json.loads(json.dumps(arguments))  # tuples become lists, as they read back from the stamp


@contextlib.contextmanager
def _staged_set(out_dir: Path, with_labels: bool) -> Iterator[Path]:
    """A temporary sibling folder of `out_dir` (with its images/ and, `with_labels`, labels/ folders) to write a set
    into: renamed into place when the block ends, removed when it raises, so `out_dir` is never half-written.
    Refuses an `out_dir` that is not a previous set."""
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = with_umask_mode(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                                   dir=out_dir.parent))
    except OSError as error:
        raise VocoError(f"cannot create the phantom folder {out_dir} ({error.strerror}); "
                        f"choose a writable location.") from error
    try:
        (staging / "images").mkdir()
        if with_labels:
            (staging / "labels").mkdir()
        yield staging
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_set(staging: Path, kind: str, arguments: dict[str, Any], records: Sequence[dict[str, Any]], name: str,
               description: str) -> None:
    """The manifest of `records` (one CT dataset `name`, preset "ct_abdomen"), then the stamp, written last: a
    folder with a stamp is a complete set of the manifest and these records' files."""
    from voco.data.manifest import manifest_from_records, save_manifest

    save_manifest(manifest_from_records(records, name=name, modality="CT", preset="ct_abdomen",
                                        description=description), staging / "manifest.json")
    files = ["manifest.json"] + list(dict.fromkeys(record["scan"][key] for record in records
                                                   for key in ("image", "label") if key in record["scan"]))
    (staging / STAMP_NAME).write_text(json.dumps(
        {"format": STAMP_FORMAT, "kind": kind, "version": _SET_VERSIONS[kind], "arguments": arguments,
         "files": files}, indent=1))


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == STAMP_FORMAT else None


def _complete_set(out_dir: Path, kind: str, arguments: dict[str, Any]) -> Path | None:
    """The manifest of `out_dir` when it holds every file of a `kind` set made with `arguments`, else None."""
    stamp = _read_stamp(out_dir)
    if (stamp is None or stamp.get("kind", "phantoms") != kind or stamp.get("version") != _SET_VERSIONS[kind]
            or stamp.get("arguments") != arguments
            or not all((out_dir / name).is_file() for name in stamp.get("files", []))):
        return None
    return out_dir / "manifest.json"


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()) and _read_stamp(out_dir) is None:
            raise VocoError(f"{out_dir} is a folder with other files in it; give an empty or new folder for the "
                            f"phantoms (only a previous phantom folder is replaced).")
    elif out_dir.exists() or out_dir.is_symlink():
        raise VocoError(f"{out_dir} exists and is not a folder; give a new folder for the phantoms.")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished `staging` folder to `out_dir`, replacing an empty folder or a previous phantom set."""
    _check_replaceable(out_dir)  # again: something may have appeared there while the phantoms were written
    previous = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            previous = staging.with_name(staging.name.replace(".partial", ".previous"))
            os.rename(out_dir, previous)
        else:
            out_dir.rmdir()
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if previous is not None:
            os.rename(previous, out_dir)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if absent); released when the process ends, too."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename in `synthesize` still keeps every set whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
