"""Running this checkout's MONAI bundles from Python (the demo, `voco benchmark run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from voco.errors import ConfigError, VocoError

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def bundle_dir(name: str) -> Path:
    """bundles/<name> of this checkout (voco is installed in editable mode from it)."""
    folder = BUNDLES_DIR / name
    if not folder.is_dir():
        raise VocoError(f"bundle folder {folder} is missing; run voco from its source checkout (pip install -e .).")
    return folder


def config_paths(name: str, config_files: Sequence[str]) -> list[str]:
    """The config files of a bundle, checked to exist (train.json first, then overrides such as smoke.json)."""
    configs = bundle_dir(name) / "configs"
    missing = [file for file in config_files if not (configs / file).is_file()]
    if missing:
        known = ", ".join(sorted(path.name for path in configs.glob("*.json") if path.name != "metadata.json"))
        raise ConfigError(f"bundle {name} has no config {missing[0]!r} in {configs}; use one of {known}.")
    return [str(configs / file) for file in config_files]


def run_bundle(name: str, config_files: Sequence[str], **overrides: Any) -> None:
    """`python -m monai.bundle run` in this process (saves an interpreter start); overrides are config ids."""
    from monai.bundle import run

    folder = bundle_dir(name)
    run(config_file=config_paths(name, config_files), bundle_root=str(folder),
        logging_file=str(folder / "configs" / "logging.conf"), **overrides)
