"""Leakage: a downstream task's images that were also in an encoder's pretraining data.

A benchmark case the encoder was pretrained on inflates its number (BTCV is in both of the reference's pretraining
sets). An encoder exported by voco carries the fingerprints of its pretraining volumes
(`voco.checkpoints.provenance`); here the task's images are fingerprinted the same way (`voco.data.fingerprints`) and
compared. The downstream bundle does it before fine-tuning, warns with the count, and records it with the run
(tag ``voco.seen_in_pretraining``, e.g. "3/30"), which `voco benchmark report` shows beside the number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from voco.benchmark.own_data import read_datalist
from voco.benchmark.registry import Task
from voco.checkpoints.provenance import read_provenance
from voco.data.fingerprints import fingerprint_volumes, overlap
from voco.data.manifest import SPLITS


def task_images(task: Task, dataset_dir: str | os.PathLike, datalist: str | None = None) -> list[str]:
    """Every image file the task's datalist names (all splits; every channel file; registration: both images)."""
    root = Path(dataset_dir).expanduser().resolve()
    name = datalist or task.datalist_file
    path = Path(name) if Path(name).is_absolute() else root / name
    data = read_datalist(path)
    images = []
    for split in SPLITS:
        for entry in data.get(split) or []:
            entry = {task.image_key: entry} if isinstance(entry, str) else entry
            for key, value in entry.items() if isinstance(entry, dict) else ():
                if key == task.image_key or key.endswith("_" + task.image_key):
                    images += [str(root / file) for file in (value if isinstance(value, list) else [value])
                               if isinstance(file, str)]
    return images


def seen_in_pretraining(task: Task, dataset_dir: str | os.PathLike | None, pretrained: Any,
                        datalist: str | None = None, cache_file: str | os.PathLike | None = None) -> dict | None:
    """Which of the task's images the encoder file `pretrained` was pretrained on.

    Returns:
        {"seen": [paths], "checked": number of images fingerprinted, "unreadable": count, "pretraining_volumes"},
        or None where there is nothing to compare (scratch, no dataset folder, no datalist, or an encoder without
        a provenance file: an official checkpoint, an export copied without it).
    """
    if pretrained in (None, "", "scratch") or dataset_dir is None or not (datalist or task.datalist_file):
        return None
    provenance = read_provenance(pretrained)
    if provenance is None or provenance.get("fingerprints") is None:  # none, or its manifest was gone at export
        return None
    found, unreadable = fingerprint_volumes(task_images(task, dataset_dir, datalist), cache_file=cache_file)
    return {"seen": overlap(found, provenance["fingerprints"]), "checked": len(found), "unreadable": len(unreadable),
            "pretraining_volumes": provenance.get("volumes")}


def leakage_sentence(task: Task, pretrained: str, result: dict | None) -> str:
    """One line for the user: how many of the task's images the encoder has seen, or why nothing was compared."""
    name = Path(str(pretrained)).name
    if result is None:
        return (f"{name} carries no fingerprints of its pretraining volumes (no {name}.provenance.json beside it, or "
                f"one written without them), so whether it has seen images of {task.id} cannot be checked")
    if not result["seen"]:
        return (f"none of the {result['checked']} images of {task.id} is among the {result['pretraining_volumes']} "
                f"volumes {name} was pretrained on")
    return (f"{len(result['seen'])} of the {result['checked']} images of {task.id} (e.g. {result['seen'][0]}) were "
            f"in the pretraining data of {name}: its results on them overstate what it does on new scans; the run "
            f"and the report mark it")


def seen_tag(task: Task, dataset_dir: str | os.PathLike | None, pretrained: Any, datalist: str | None = None,
             cache_file: str | os.PathLike | None = None) -> str:
    """For the downstream bundle: check, say what was found (a warning where the encoder has seen task images), and
    return the run's tag value ("3/30", "0/30", or "" where nothing could be compared)."""
    result = seen_in_pretraining(task, dataset_dir, pretrained, datalist, cache_file)
    if result is None:
        return ""
    print(("warning: " if result["seen"] else "leakage check: ") + leakage_sentence(task, str(pretrained), result))
    return f"{len(result['seen'])}/{result['checked']}"
