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


def run_bundle_command(bundle: str, config_files: list[str], cwd: Path, *overrides: str, launcher: list[str] | None = None,
                       env: dict | None = None):
    """`python -m monai.bundle run` of bundles/<bundle> with these config files, as a user types it; asserts exit 0."""
    import subprocess
    import sys

    folder = REPO_ROOT / "bundles" / bundle
    configs = "[" + ",".join(f"'{folder}/configs/{name}'" for name in config_files) + "]"
    command = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", "--config_file", configs,
                                                "--bundle_root", str(folder), "--logging_file",
                                                str(folder / "configs" / "logging.conf"), *overrides]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
