"""Catalogues of public pretraining collections, kept as data (``data_manifests/preCT160k.json``).

A catalogue lists collections, not files: what exists, how many volumes each has, which body region and which
voco preset its volumes get. Schema (version 1)::

    {"format": "voco-catalogue", "version": 1, "name": "PreCT-160K", "source": "...",
     "stated_total": 160167, "sum_of_rows": 161757, "sum_10k_rows": 10881,
     "datasets": [{"name": "BTCV", "body_region": "Abdomen", "volumes": 24, "in_10k": true, "in_160k": true,
                   "preset": "ct_abdomen", "reference_json": "optional path in the reference repository",
                   "reference_json_volumes": 24, "note": "optional"}]}

``sum_of_rows`` must equal the sum of the ``volumes`` (and ``sum_10k_rows`` that of the ``in_10k`` rows);
``stated_total`` is the total the source states, which may differ (PreCT-160K: 160,167 stated, 161,757 summed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from voco.data.manifest import require_format
from voco.errors import ManifestError

CATALOGUE_FORMAT = "voco-catalogue"
CATALOGUE_VERSION = 1
DEFAULT_CATALOGUE = Path(__file__).resolve().parents[2] / "data_manifests" / "preCT160k.json"
# (key, type, required) of one dataset row
ROW_FIELDS = (("name", str, True), ("body_region", str, True), ("volumes", int, True), ("in_10k", bool, True),
              ("in_160k", bool, True), ("preset", str, True), ("reference_json", str, False),
              ("reference_json_volumes", (int, type(None)), False), ("note", str, False))


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else {"str": "text", "int": "whole number",
                                                       "bool": "true/false"}.get(k.__name__, k.__name__)
                       for k in kinds)


def validate_catalogue(catalogue: Any, source: str = "catalogue") -> None:
    """Check a catalogue's structure and totals; raise ManifestError naming the first bad entry."""
    from voco.data.presets import PRESETS  # catalogue rows name presets; the registry knows which exist

    require_format(catalogue, CATALOGUE_FORMAT, CATALOGUE_VERSION, source, "catalogue",
                   "a catalogue such as data_manifests/preCT160k.json")
    rows = catalogue.get("datasets")
    if not isinstance(rows, list) or not rows:
        raise ManifestError(f"{source} has no 'datasets' list; add one row per collection.")
    names = set()
    for index, row in enumerate(rows):
        where = f"{source}: datasets[{index}]"
        if not isinstance(row, dict):
            raise ManifestError(f"{where} must be a JSON object; fix the catalogue.")
        for key, kind, required in ROW_FIELDS:
            if key not in row:
                if required:
                    raise ManifestError(f"{where} has no '{key}' key; add it.")
                continue
            # bool is an int in Python; a count of true is not a count
            if not isinstance(row[key], kind) or (kind is int and isinstance(row[key], bool)):
                raise ManifestError(f"{where}.{key} must be {_type_name(kind)}, not {row[key]!r}; fix the catalogue.")
        if row["name"] in names:
            raise ManifestError(f"{where} repeats the dataset name {row['name']!r}; give each row its own name.")
        names.add(row["name"])
        if row["volumes"] <= 0:
            raise ManifestError(f"{where} ({row['name']}) has {row['volumes']} volumes; give a positive count.")
        if row["preset"] not in PRESETS:
            raise ManifestError(f"{where} ({row['name']}) names the unknown preset {row['preset']!r}; "
                                f"use one of {', '.join(PRESETS)}.")
    for total_key, selected in (("sum_of_rows", rows), ("sum_10k_rows", [row for row in rows if row["in_10k"]])):
        if total_key in catalogue:
            summed = sum(row["volumes"] for row in selected)
            if catalogue[total_key] != summed:
                raise ManifestError(f"{source} says {total_key} is {catalogue[total_key]!r} but its rows add up to "
                                    f"{summed}; fix the count or the rows.")


def load_catalogue(path: str | os.PathLike | None = None) -> dict:
    """Read and validate a catalogue; without `path`, the PreCT-160K catalogue shipped in data_manifests/.

    Returns:
        the catalogue as a dict (schema in this module's docstring).
    """
    path = Path(path).expanduser().resolve() if path is not None else DEFAULT_CATALOGUE
    if not path.is_file():
        raise ManifestError(f"catalogue {path} does not exist; check the path.")
    try:
        catalogue = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"catalogue {path} is not valid JSON ({error}); fix the file.") from error
    validate_catalogue(catalogue, source=str(path))
    return catalogue
