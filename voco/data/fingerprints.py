"""Content fingerprints of volumes: the same scan gives the same fingerprint whatever file holds it (NIfTI or
.nii.gz, MetaImage, NRRD, a DICOM series, another orientation or origin), another scan a different one.

They let a downstream benchmark find its test cases in an encoder's pretraining data (BTCV is in both of the
reference's pretraining sets): an exported encoder carries the fingerprints of the volumes it was pretrained on
(`voco.checkpoints.provenance`), and `voco benchmark check / run` compares a task's images with them
(`voco.benchmark.leakage`).

A fingerprint is the first 16 hex digits of the SHA-256 of the volume in RAS orientation: its shape, its voxel size
(to 0.01 mm) and a lattice of 8 x 8 x 8 voxel values (to 0.01, after the file's scaling). The origin is left out
(a copy re-saved by another tool may move it); the voxel sample separates scans that share a grid, as volumes
registered to one atlas do (BraTS). Each volume is read once; `fingerprint_volumes` keeps what it computed in a cache
file keyed by path, size and modification time, so a second export or check costs only the header look-ups.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from voco.files import write_json_atomically

logger = logging.getLogger(__name__)

SAMPLES_PER_AXIS = 8


def volume_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of one volume file (or DICOM series folder), read with MONAI's readers in RAS orientation.

    Raises:
        whatever the reader raises for a file that cannot be read (the callers count those and go on)."""
    from monai.transforms import LoadImage, Orientation

    image = Orientation(axcodes="RAS")(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
    voxels = np.asarray(image.detach().cpu().numpy(), dtype=np.float64)
    spacing = [round(float(size), 2) for size in image.pixdim[:3]]
    lattice = tuple(np.linspace(0, size - 1, num=min(SAMPLES_PER_AXIS, size)).round().astype(int)
                    for size in voxels.shape[1:4])
    sample = np.round(voxels[np.ix_(range(voxels.shape[0]), *lattice)], 2) + 0.0  # + 0.0: -0.0 hashes as 0.0
    digest = hashlib.sha256(json.dumps([list(voxels.shape), spacing]).encode())
    digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def _stamp(path: str) -> list:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def fingerprint_volumes(paths: Iterable[str], cache_file: str | os.PathLike | None = None
                        ) -> tuple[dict[str, str], list[str]]:
    """Fingerprints of many volumes: ({path: fingerprint}, [paths that could not be read]).

    With `cache_file`, fingerprints computed before for an unchanged file (same size and modification time) are
    reused, and the new ones are added to it (written atomically at the end)."""
    cache: dict[str, list] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        except ValueError:
            cache = {}  # a damaged cache is only lost time: computed again
    found, unreadable, computed = {}, [], 0
    unique = list(dict.fromkeys(str(path) for path in paths))
    for index, path in enumerate(unique, start=1):
        try:
            stamp = _stamp(path)
            cached = cache.get(path)
            if cached is not None and cached[:2] == stamp:
                found[path] = cached[2]
                continue
            found[path] = volume_fingerprint(path)
            cache[path] = [*stamp, found[path]]
            computed += 1
        except Exception as error:  # noqa: BLE001 - one unreadable volume is counted, not fatal
            logger.debug("no fingerprint for %s: %s", path, error)
            unreadable.append(path)
        if index % 200 == 0:
            logger.info("fingerprints: %d of %d volumes", index, len(unique))
    if cache_file is not None and computed:
        write_json_atomically(cache, cache_file, indent=None)
    return found, unreadable


def overlap(fingerprints: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """The paths of `fingerprints` whose fingerprint is among `known`, in the order given."""
    known = set(known)
    return [path for path, fingerprint in fingerprints.items() if fingerprint in known]
