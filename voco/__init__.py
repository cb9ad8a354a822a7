"""voco: self-supervised pretraining of 3-D medical image encoders, as MONAI bundles tracked in MLflow.

The loader delivers regions; each pretext makes its own views on the device (see DESIGN.md).
`import voco` is cheap and needs neither itk nor mlflow; features that need them import them lazily.
"""

import os

# Where voco is imported before numpy (the `voco` command): numpy/scipy's OpenBLAS threads would otherwise compete
# with torch's OpenMP threads and slow CPU training ~10x on small machines. An explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

from voco.errors import CheckpointError, ConfigError, ManifestError, VocoError, VolumeError, install_error_hook

install_error_hook()  # a user's mistake ends a bundle run with its one sentence, not a traceback

__all__ = ["__version__", "VocoError", "ManifestError", "VolumeError", "CheckpointError", "ConfigError"]
