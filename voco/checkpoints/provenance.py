"""What an exported encoder was pretrained on, written beside it as ``<encoder file>.provenance.json``:

    {"format": "voco-encoder-provenance", "version": 1,
     "pretraining": {"manifest": "...", "dataset_dir": null, "preset": "ct_abdomen", "region_size": [...],
                     "backbone": {...}, "plan": {"presets": [...], "spacing": [...], "intensity": {...}, ...}},
     "volumes": 160000, "unreadable": 3, "fingerprints": ["3f2a...", ...]}

The encoder file itself stays a plain dict of tensors (it loads by name into MONAI's SwinUNETR); the pretraining
run records its facts in ``<run folder>/pretraining.json`` (`voco.engine.prepare_run`), and `voco export` turns
them into this file with the fingerprints of the manifest's volumes (`voco.data.fingerprints`). The ``plan`` is the
preprocessing the encoder was pretrained with (`voco.checkpoints.plan`), which fine-tuning takes by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from voco.files import write_json_atomically

PROVENANCE_FORMAT = "voco-encoder-provenance"
PROVENANCE_VERSION = 1
RUN_FACTS_FILE = "pretraining.json"  # in a pretraining run folder


def provenance_path(encoder_path: str | os.PathLike) -> Path:
    path = Path(encoder_path)
    return path.with_name(path.name + ".provenance.json")


def run_facts(source: str | os.PathLike) -> tuple[dict, Path] | None:
    """(the facts a pretraining run recorded: manifest, preset, region size, backbone, plan; its folder), found from
    the run folder or a checkpoint inside it (``<run>/checkpoints/<file>``); None where there are none."""
    path = Path(source).expanduser().resolve()
    for folder in (path, path.parent, path.parent.parent):
        recorded = folder / RUN_FACTS_FILE
        if recorded.is_file():
            try:
                return json.loads(recorded.read_text(encoding="utf-8")), folder
            except ValueError:
                return None
    return None


def write_provenance(encoder_path: str | os.PathLike, facts: Mapping[str, Any],
                     cache_file: str | os.PathLike | None = None) -> Path:
    """Fingerprint the volumes of the run's manifest (reusing `cache_file`) and write the provenance file beside
    the encoder. Where the manifest cannot be read any more (moved, deleted), the file still carries the pretraining
    plan, with ``"fingerprints": null`` and the reason in ``"no_fingerprints"``: no leakage check is possible, but
    the preprocessing still travels."""
    from voco.data.fingerprints import fingerprint_volumes
    from voco.data.manifest import load_manifest, to_datalist
    from voco.errors import VocoError

    try:
        manifest = load_manifest(facts["manifest"])
        images = [entry["image"] for entry in to_datalist(manifest, dataset_dir=facts.get("dataset_dir"))]
        found, unreadable = fingerprint_volumes(images, cache_file=cache_file)
    except VocoError as error:
        fingerprints = {"volumes": None, "unreadable": None, "fingerprints": None, "no_fingerprints": str(error)}
    else:
        fingerprints = {"volumes": len(found), "unreadable": len(unreadable),
                        "fingerprints": sorted(set(found.values()))}
    return write_json_atomically({"format": PROVENANCE_FORMAT, "version": PROVENANCE_VERSION,
                                  "pretraining": dict(facts), **fingerprints}, provenance_path(encoder_path))


def read_provenance(encoder_path: str | os.PathLike) -> dict | None:
    """The provenance recorded beside an encoder file, or None where there is none (an official checkpoint, an
    export copied without it) or it is not ours."""
    path = provenance_path(encoder_path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("format") == PROVENANCE_FORMAT else None
