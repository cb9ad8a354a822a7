"""Running this checkout's MONAI bundles from Python (the demo, `voco benchmark run`)."""

from __future__ import annotations

import ast
import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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
    check_overrides(config_paths(name, config_files), overrides)
    check_values(config_paths(name, config_files), overrides)
    run(config_file=config_paths(name, config_files), bundle_root=str(folder),
        logging_file=str(folder / "configs" / "logging.conf"), **overrides)


# What `python -m monai.bundle run` takes besides config ids (MONAI's `run` and `ConfigWorkflow` arguments).
RUN_ARGUMENTS = frozenset({"config_file", "meta_file", "logging_file", "args_file", "init_id", "run_id", "final_id",
                           "tracking", "workflow_type", "workflow_name", "properties_path"})
# Keys a config component may gain from an override without holding them already.
COMPONENT_KEYS = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})


def check_overrides(config_files: Sequence[str | Path], names: Iterable[str]) -> None:
    """Refuse an override that names no setting of the bundle's configs, with the closest setting's name.

    Why: MONAI's parser adds an unknown id as a new, unused entry, so ``--max_step 1`` would train with the default
    ``max_steps`` without a word. Nested ids (``train#handlers#0#interval``) must lead through existing entries; the
    last part may add a key to an existing component (``..#_disabled_``).

    Raises:
        ConfigError: naming the override and, where one is close, the setting meant.
    """
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files([str(file) for file in config_files])
    for name in names:
        if name in RUN_ARGUMENTS:
            continue
        node: Any = config
        parts = re.split(r"::|#", name)
        for depth, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif depth == len(parts) - 1 and isinstance(node, dict) and (depth > 0 or part in COMPONENT_KEYS):
                break
            else:
                known = [key for key in config if not key.startswith("_")] if depth == 0 else \
                    [str(key) for key in (node if isinstance(node, dict) else range(len(node)))] \
                    if isinstance(node, (dict, list)) else []
                close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
                where = (f"bundles/{Path(config_files[0]).parent.parent.name} ("
                         f"{', '.join(Path(file).name for file in config_files)})")
                hint = (f"did you mean --{'#'.join(parts[:depth] + close)}?" if close else
                        "see the settings table of the bundle's docs/README.md.")
                raise ConfigError(f"--{name} names no setting of {where}, so it would be ignored; {hint}")


# The smallest value of the whole-number settings the bundles share; a value below is refused before the run.
AT_LEAST = {"batch_size": 1, "max_steps": 1, "max_epochs": 1, "num_workers": 0, "val_interval": 1, "log_interval": 1,
            "checkpoint_interval": 1, "probe_interval": 1, "warmup_steps": 0, "training_cases": 1, "seed": 0,
            "accumulation_steps": 1, "max_bad_steps": 1, "checkpoints_kept": 1, "val_batches": 1}


# Sizes in voxels, whatever their default is computed from: three whole numbers.
SIZE_SETTINGS = frozenset({"region_size", "roi_size", "scan_size", "spatial_size"})
SIZE_EXAMPLE = [96, 96, 96]


def check_values(config_files: Sequence[str | Path], overrides: Mapping[str, Any]) -> None:
    """Refuse an override whose value does not fit its setting's default: a whole number for a whole-number
    setting (``--max_steps 2.5`` would run 3 steps), at least `AT_LEAST`; a finite number for a number (a learning
    rate also positive); a list of as many whole numbers for a size such as ``region_size``; True or False for a
    switch (python-fire reads ``false`` as the text 'false', which counts as true).

    Why: MONAI's parser takes any value, and the run then fails deep in a transform or an optimizer with a
    traceback, or silently does something else.

    Raises:
        ConfigError: naming the setting, the value given and what to give.
    """
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files([str(file) for file in config_files])
    for name, value in overrides.items():
        if name in RUN_ARGUMENTS or name not in config:
            continue
        default = config[name]
        expression = isinstance(default, str) and default[:1] in ("$", "@")
        need = _value_need(name, value, SIZE_EXAMPLE if expression and name in SIZE_SETTINGS else default)
        if need is not None:
            shown = "" if expression else f" (the default is {default!r})"
            raise ConfigError(f"--{name} {value!r} cannot be used; give {need}{shown}.")


def _value_need(name: str, value: Any, default: Any) -> str | None:
    """What `value` should be, where it does not fit `default`'s kind; None where it fits."""
    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False (capitalised)"
    if isinstance(default, int):
        least = AT_LEAST.get(name)
        fits = isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)
        return None if fits else "a whole number" + (f" of at least {least}" if least is not None else "")
    if isinstance(default, float):
        positive = default > 0 and name in ("learning_rate",)
        fits = number(value) and math.isfinite(value) and (not positive or value > 0)
        return None if fits else "a positive finite number" if positive else "a finite number"
    if isinstance(default, list) and default and all(number(item) for item in default):
        whole = all(isinstance(item, int) for item in default)
        fits = isinstance(value, (list, tuple)) and len(value) == len(default) and all(
            number(item) and item > 0 and (not whole or isinstance(item, int)) for item in value)
        kind = "whole numbers" if whole else "numbers"
        return None if fits else f"a list of {len(default)} positive {kind}, e.g. {default}"
    return None


def command_line_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]] | None:
    """``(config files, {override: value})`` of a ``python -m monai.bundle run ...`` command line, values parsed as
    python-fire parses them, or None for any other program (a bundle run from Python through `run_bundle` is
    checked there)."""
    if len(argv) < 2 or Path(argv[0]).parts[-2:] != ("bundle", "__main__.py") or argv[1] != "run":
        return None
    from fire.parser import DefaultParseValue

    overrides, files = {}, []
    arguments = list(argv[2:])
    for index, argument in enumerate(arguments):
        if not argument.startswith("--"):
            continue
        name, equals, value = argument[2:].partition("=")
        if not equals:  # "--name value", or a bare "--flag" that fire reads as True
            following = arguments[index + 1] if index + 1 < len(arguments) else "--"
            value = following if not following.startswith("--") else "True"
        overrides[name] = DefaultParseValue(value)
        if name == "config_file":
            files = list(ast.literal_eval(value)) if value.startswith("[") else value.split(",")
    return files, overrides


def check_command_line() -> None:
    """`check_overrides` and `check_values` for the command line this process runs, when it is
    ``python -m monai.bundle run``."""
    found = command_line_overrides(sys.argv)
    if found and found[0]:
        check_overrides(found[0], found[1])
        check_values(*found)
