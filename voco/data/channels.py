"""Multi-channel inputs for pretraining: the scans of one study (T1, T1ce, T2, FLAIR of a BraTS case; the
``_0000``/``_0001`` files of an nnU-Net case) stacked in the order of a channel list.

A scan answers to a channel name by, in this order: its manifest field ``channel``; its series description
(DICOM); the last token of its file name (``case7_flair.nii.gz`` -> "flair", ``case7_0001.nii.gz`` -> "0001").
Names compare without case. A study that lacks one of the channels, or has two scans for one, is left out and
counted; the stacked entry's ``image`` is the list of files, which MONAI's ``LoadImaged`` stacks channel-first
(the scans of one study must share their voxel grid, as co-registered sequences do).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from voco.data.volumes import file_stem
from voco.errors import ConfigError

logger = logging.getLogger(__name__)


def image_files(image: Any) -> list:
    """The files of an entry's ``image``: the list of a stacked entry's channels, else the one file."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def check_channels(channels: Any) -> list[str] | None:
    """The channel list of a setting (None or an empty list: one channel, no stacking), or one sentence."""
    if channels is None or (isinstance(channels, (list, tuple)) and not channels):
        return None
    if isinstance(channels, str) or not isinstance(channels, (list, tuple)) \
            or not all(isinstance(name, str) and name.strip() for name in channels):
        raise ConfigError(f"channels {channels!r} must be a list of channel names, e.g. "
                          f"'[\"t1\", \"t1ce\", \"t2\", \"flair\"]' (leave it null for one channel).")
    names = [name.strip().lower() for name in channels]
    if len(set(names)) != len(names):
        raise ConfigError(f"channels {channels!r} names a channel twice; give each channel once.")
    return names


def channel_count(channels: Any) -> int:
    """The input channels of the backbone for a `channels` setting: 1 without stacking."""
    return len(check_channels(channels) or [None])


def channel_names_of(entry: Mapping[str, Any]) -> set[str]:
    """Every name a scan answers to (lower case): its ``channel`` field, series description, last name token."""
    names = set()
    if entry.get("channel"):
        names.add(str(entry["channel"]).lower())
    description = (entry.get("attributes") or {}).get("series_description")
    if description:
        names.add(str(description).strip().lower())
    tokens = [token for token in re.split(r"[_\-.\s]+", file_stem(Path(str(entry["image"])))) if token]
    if tokens:
        names.add(tokens[-1].lower())
    return names


def stack_channels(datalist: Sequence[Mapping[str, Any]], channels: Sequence[str]) -> list[dict]:
    """One entry per study that has exactly one scan for every channel: ``image`` the files in channel order,
    ``scan_index`` the channels joined by "+", the study's other fields from its first channel's scan.

    Raises:
        ConfigError: no study has all the channels (the sentence names what the scans answer to).
    """
    names = check_channels(channels)
    studies: dict[tuple, list[Mapping[str, Any]]] = {}
    for entry in datalist:
        studies.setdefault((entry.get("dataset"), entry.get("subject"), entry.get("study")), []).append(entry)
    stacked, incomplete = [], []
    for key, scans in studies.items():
        study, chosen = "/".join(str(part) for part in key), []
        for name in names:
            matches = [scan for scan in scans if name in channel_names_of(scan)]
            if len(matches) != 1:
                incomplete.append((study, name, len(matches)))
                break
            chosen.append(matches[0])
        else:
            if any(scan.get("series") for scan in chosen):
                raise ConfigError(f"study {study} has DICOM series among its channels; "
                                  f"stacking channels needs one file per scan, so convert the series to NIfTI first.")
            entry = {field: value for field, value in chosen[0].items() if field not in ("label", "series")}
            entry.update(image=[scan["image"] for scan in chosen], scan_index="+".join(names), channels=list(names))
            stacked.append(entry)
    if incomplete:
        study, name, found = incomplete[0]
        logger.warning("%d of %d studies are left out for lacking a channel (e.g. %s has %s scan answering to %r)",
                       len(incomplete), len(studies), study, "no" if found == 0 else found, name)
    if not stacked:
        seen = sorted({name for entry in datalist for name in channel_names_of(entry)})
        raise ConfigError(f"no study has one scan for each of the channels {names}; its scans answer to "
                          f"{', '.join(seen[:12])}{' ...' if len(seen) > 12 else ''} (the 'channel' field, the series "
                          f"description or the last token of the file name); name the channels so.")
    return stacked
