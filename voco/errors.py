"""Errors a user can cause, each reported in one sentence that names the thing and what to do."""

from __future__ import annotations

import importlib
from types import ModuleType


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
