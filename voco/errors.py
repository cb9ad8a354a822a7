"""Errors a user can cause, each reported in one sentence that names the thing and what to do."""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Iterable


class VocoError(Exception):
    """Base class: the message is one sentence naming the file, entry or value and what to do."""


class ManifestError(VocoError, ValueError):
    """A manifest (or Decathlon JSON) that cannot be read or does not follow the schema."""


class VolumeError(VocoError, ValueError):
    """An image volume that is missing, unreadable, not 3-D, empty or has non-finite values."""


class CheckpointError(VocoError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class ConfigError(VocoError, ValueError):
    """A setting with a value voco cannot use."""


class MissingDependencyError(VocoError, ImportError):
    """An optional package (itk, mlflow, matplotlib) that a feature needs is not installed."""


def optional_import(package: str, feature: str) -> ModuleType:
    """Import `package` or raise a one-sentence error that names it and the feature that needs it.

    itk and mlflow are imported this way so that `import voco` works on a machine without them.
    """
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingDependencyError(
            f"{feature} needs the Python package '{package.split('.')[0]}', which is not installed; "
            f"run `pip install {package.split('.')[0]}` (or `make venv`) and try again ({error})."
        ) from error


def user_error_in(error: BaseException | None) -> VocoError | None:
    """The `VocoError` that caused `error` (itself, or one of its causes: MONAI's config parser wraps what a config
    expression raised), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, VocoError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def error_sentence(error: BaseException) -> str:
    """The one sentence of an error; one re-raised from a DataLoader worker carries the worker's traceback first and
    its original ``module.Class: sentence`` line last."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return re.sub(r"^[\w.]+Error: ", "", lines[-1]) if len(lines) > 1 else lines[0]


def install_error_hook() -> None:
    """Report an uncaught `VocoError` as its one sentence (``error: ...``, exit status 1) instead of a traceback, also
    when MONAI's bundle runner wrapped it; ``VOCO_TRACEBACK=1`` keeps the traceback. Other exceptions are untouched."""
    import os
    import sys

    previous = sys.excepthook
    if getattr(previous, "_voco_hook", False):
        return

    def hook(kind: type, value: BaseException, traceback) -> None:
        user_error = user_error_in(value)
        if user_error is None or os.environ.get("VOCO_TRACEBACK"):
            previous(kind, value, traceback)
            return
        print(f"error: {error_sentence(user_error)}", file=sys.stderr, flush=True)

    hook._voco_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def require_choice(setting: str, value: object, choices: Iterable[object]) -> None:
    """Stop with ``unknown <setting> <value>; use one of ...`` unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {setting} {value!r}; use one of {', '.join(map(str, choices))}.")
