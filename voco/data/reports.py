"""Radiology reports: their sentences (split and shuffled within sections, for language-image pretraining) and
reports and findings imported from a CSV table into a manifest (CT-RATE's layout, or any table with an id column).
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from voco.data.manifest import FINDINGS_KEY, load_manifest, validate_manifest
from voco.errors import ManifestError

logger = logging.getLogger(__name__)

__all__ = ["split_sentences", "shuffle_sentences", "attach_reports", "image_stem", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

# Report sections whose heading stays at the front when the sentences are shuffled (within each section).
SECTION_HEADING = re.compile(r"(findings|impressions?|conclusions?|comparison|technique|history|indications?|"
                             r"clinical (?:history|information))\s*:", re.IGNORECASE)
# Words ending in a full stop that do not end a sentence (besides "e.g."-style words and single letters).
ABBREVIATIONS = frozenset({"approx", "ca", "cf", "dr", "fig", "incl", "mr", "mrs", "ms", "nr", "resp", "st", "vs"})
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s+)(?=\S)")
INITIALISM = re.compile(r"(?:[a-z]\.)+", re.IGNORECASE)  # "e.g.", "i.e.", "a.m.", an initial "J."
REPORT_COLUMN = re.compile(r"finding|impression|report|conclusion", re.IGNORECASE)
TRUE_VALUES, FALSE_VALUES = {"1", "1.0", "true", "yes", "y", "t"}, {"0", "0.0", "false", "no", "n", "f"}


# ---------------------------------------------------------------------------------------------------------------
# Report sentences


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ".", "!" or "?" followed by a space, except after an abbreviation.

    Not a sentence end: "e.g."-style words and single letters ("i.e.", "J."), `ABBREVIATIONS` ("approx.", "vs."),
    a full stop followed by a lower-case word (reports start sentences with a capital; an all lower-case report
    stays one sentence), and a list number at the start of a sentence ("1. Liver lesion." is one sentence).
    Decimal numbers ("2.5 cm") never split: no space follows their point.

        split_sentences("Liver: 2.5 cm lesion, e.g. a cyst. Spleen normal.")
        # ['Liver: 2.5 cm lesion, e.g. a cyst.', 'Spleen normal.']
    """
    sentences, start = [], 0
    for match in SENTENCE_END.finditer(text):
        sentence = text[start:match.start(1)].strip()
        words = sentence.split()
        last = words[-1].lstrip("(\"'[") if words else ""
        if (INITIALISM.fullmatch(last) or last.rstrip(".").lower() in ABBREVIATIONS
                or text[match.end()].islower() or (len(words) == 1 and last.rstrip(".").isdigit())):
            continue
        sentences.append(sentence)
        start = match.end()
    rest = text[start:].strip()
    return sentences + [rest] if rest else sentences


def _report_paragraphs(report: str) -> list[list[tuple[str, list[str]]]]:
    """Paragraphs (split at blank lines) of sections ``(heading, sentences)``; heading "" before the first one."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", report):
        sections: list[tuple[str, list[str]]] = []
        heading, sentences = "", []
        for sentence in split_sentences(paragraph):
            match = SECTION_HEADING.match(sentence)
            if match:
                if heading or sentences:
                    sections.append((heading, sentences))
                heading, rest = sentence[:match.end()], sentence[match.end():].strip()
                sentences = [rest] if rest else []
            else:
                sentences.append(sentence)
        if heading or sentences:
            sections.append((heading, sentences))
        if sections:
            paragraphs.append(sections)
    return paragraphs


def shuffle_sentences(report: str, rng: np.random.RandomState | np.random.Generator) -> str:
    """The report with its sentences in a random order within each section, sections in their order.

    Sections start at a heading such as "Findings:" or "Impression:" (`SECTION_HEADING`; the heading stays in
    front) or a blank line (a paragraph, e.g. one CSV column of `attach_reports`); sentences are split by
    `split_sentences`. Spaces inside a paragraph become single spaces; paragraphs stay apart by a blank line.

        shuffle_sentences("Liver normal. Spleen enlarged. Impression: splenomegaly.", np.random.RandomState(0))
        # 'Spleen enlarged. Liver normal. Impression: splenomegaly.'
    """
    paragraphs = []
    for sections in _report_paragraphs(report):
        parts = []
        for heading, sentences in sections:
            order = rng.permutation(len(sentences)) if len(sentences) > 1 else range(len(sentences))
            parts.append(" ".join(([heading] if heading else []) + [sentences[k] for k in order]))
        paragraphs.append(" ".join(parts))
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------------------------------------------------
# Reports from a CSV


def image_stem(path: str) -> str:
    """A file name without its folder and image suffix: "img/train_1_a_1.nii.gz" -> "train_1_a_1"."""
    name = Path(str(path).strip()).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _finding_value(value: str) -> bool | None:
    """A CSV cell as a finding: True / False, None when empty (unknown); ValueError for anything else."""
    value = value.strip().lower()
    if not value:
        return None
    if value in TRUE_VALUES or value in FALSE_VALUES:
        return value in TRUE_VALUES
    raise ValueError(value)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(columns, [(line number, row)]) of a CSV file, with one-sentence errors for what a user can get wrong."""
    if not path.is_file():
        raise ManifestError(f"report table {path} does not exist; check the path.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            reader = csv.DictReader(stream)
            columns = [str(column).strip() for column in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [(reader.line_num, {key: (value or "") for key, value in row.items() if key is not None})
                    for row in reader]
    except UnicodeDecodeError as error:
        raise ManifestError(f"report table {path} is not UTF-8 text ({error.reason}); save it as a UTF-8 "
                            f"CSV.") from None
    except csv.Error as error:
        raise ManifestError(f"report table {path} is not a readable CSV ({error}); fix the file.") from None
    if not columns or not rows:
        raise ManifestError(f"report table {path} has no header or no rows; give a CSV with a header line and one "
                            f"row per study or volume.")
    return columns, rows


def attach_reports(manifest: str | os.PathLike | Mapping[str, Any], csv_path: str | os.PathLike, *,
                   id_column: str | None = None, report_columns: Sequence[str] | None = None,
                   finding_columns: Sequence[str] | None = None) -> dict:
    """A copy of `manifest` whose studies carry the reports and findings of a CSV table (e.g. CT-RATE's).

    Each row is matched to one study by its `id_column` (default: the first column), tried in this order against
    the study id "dataset/subject/study", the study's own id, the file names of its scans without folder and image
    suffix (.nii.gz, .nii, .nrrd, .mha; CT-RATE's VolumeName "train_1_a_1.nii.gz" matches the scan
    "…/train_1_a_1.nii.gz") and the subject id. A study's report becomes its `report_columns` (default: the columns
    named like findings, impression, report or conclusion) joined as paragraphs; its findings are updated with the
    `finding_columns` (default: every other column of only 0/1 or true/false values, as in CT-RATE's
    multi_abnormality_labels.csv), an empty cell being unknown. Rows matching no study are counted and logged (an
    error only when none matches); rows giving one study different contents are an error.

        manifest = attach_reports(load_manifest("ct_rate.json"), "train_reports.csv")
        manifest = attach_reports(manifest, "multi_abnormality_labels.csv")
        save_manifest(manifest, "ct_rate_with_reports.json")
    """
    if isinstance(manifest, Mapping):
        validate_manifest(manifest)
        manifest = copy.deepcopy(dict(manifest))
    else:
        manifest = load_manifest(manifest)
    path = Path(csv_path).expanduser().resolve()
    columns, rows = _read_table(path)
    id_column = id_column if id_column is not None else columns[0]
    named = {"id_column": [id_column], "report_columns": list(report_columns or []),
             "finding_columns": list(finding_columns or [])}
    for option, names in named.items():
        for name in names:
            if name not in columns:
                raise ManifestError(f"report table {path} has no column {name!r} ({option}); its columns are "
                                    f"{columns}.")
    if report_columns is None:
        report_columns = [column for column in columns if column != id_column and REPORT_COLUMN.search(column)
                          and column not in named["finding_columns"]]
    if finding_columns is None:
        finding_columns = []
        for column in columns:
            if column == id_column or column in report_columns:
                continue
            try:
                values = [_finding_value(row[column]) for _, row in rows]
            except ValueError:
                continue
            if any(value is not None for value in values):
                finding_columns.append(column)
    if not report_columns and not finding_columns:
        raise ManifestError(f"report table {path} has neither report columns nor 0/1 finding columns; name them "
                            f"with report_columns=[...] or finding_columns=[...] (its columns are {columns}).")

    # Where each id leads, per kind of id in the order they are tried: -> the studies (dataset, subject, study).
    levels: list[dict[str, set[tuple[int, int, int]]]] = [{}, {}, {}, {}]
    for d, dataset in enumerate(manifest["datasets"]):
        for s, subject in enumerate(dataset["subjects"]):
            for t, study in enumerate(subject["studies"]):
                place = (d, s, t)
                ids = [{f"{dataset['name']}/{subject['id']}/{study['id']}"}, {str(study["id"])},
                       {image_stem(scan["image"]) for scan in study["scans"]}, {str(subject["id"])}]
                for level, keys in zip(levels, ids):
                    for key in keys:
                        level.setdefault(key, set()).add(place)

    given: dict[tuple[int, int, int], tuple[int, str, dict[str, bool]]] = {}
    unmatched = []
    for line, row in rows:
        row_id = row.get(id_column, "").strip()
        if not row_id:
            raise ManifestError(f"report table {path} line {line} has an empty {id_column!r}; fill it in or remove "
                                f"the row.")
        places: set[tuple[int, int, int]] = set()
        for level in levels:
            places = level.get(row_id, set()) | level.get(image_stem(row_id), set())
            if places:
                break
        if not places:
            unmatched.append(row_id)
            continue
        if len(places) > 1:
            raise ManifestError(f"report table {path} line {line}: {id_column} {row_id!r} matches {len(places)} "
                                f"studies; use an id column that names one study (a study id or an image file name).")
        report = "\n\n".join(row[column].strip() for column in report_columns if row[column].strip())
        findings = {}
        for column in finding_columns:
            try:
                value = _finding_value(row[column])
            except ValueError:
                raise ManifestError(f"report table {path} line {line}, column {column!r} is {row[column]!r}; give "
                                    f"1/0 (or true/false), or leave it empty when unknown.") from None
            if value is not None:
                findings[column] = value
        place = places.pop()
        if place in given and given[place][1:] != (report, findings):
            raise ManifestError(f"report table {path} lines {given[place][0]} and {line} give the same study "
                                f"different reports or findings; keep one row per study.")
        given[place] = (line, report, findings)

    if not given:
        raise ManifestError(f"none of the {len(rows)} rows of report table {path} matches a study of the manifest "
                            f"(e.g. {unmatched[:3]}); its {id_column!r} must hold study ids, subject ids or image "
                            f"file names.")
    if unmatched:
        logger.warning("%d of %d rows of %s match no study of the manifest and are left out (e.g. %s)",
                       len(unmatched), len(rows), path, ", ".join(unmatched[:3]))
    for (d, s, t), (_, report, findings) in given.items():
        study = manifest["datasets"][d]["subjects"][s]["studies"][t]
        if report:
            study["report"] = report
        if findings:
            study[FINDINGS_KEY] = {**study.get(FINDINGS_KEY, {}), **findings}
    logger.info("%s: reports or findings for %d studies", path, len(given))
    validate_manifest(manifest, source=f"manifest with the reports of {path}")
    return manifest
