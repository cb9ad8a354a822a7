"""Shared fixtures: the real sample volumes of ../shared/data and small temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`$VOCO_SHARED_DATA`, or ../shared/data beside the checkout; None where neither exists."""
    candidates = [os.environ.get("VOCO_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ct_abdomen_3mm.nii.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    directory = shared_data_dir()
    if directory is None:
        pytest.skip("the real sample volumes are absent: set VOCO_SHARED_DATA or put them at ../shared/data")
    return directory
