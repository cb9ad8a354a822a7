"""Checkpoints: read any supported format safely, load an encoder with a report, export it, find a run's newest.

- `voco.checkpoints.formats`: reading (weights only), where the encoder and decoder tensors are in each format, export;
- `voco.checkpoints.loading`: `load_encoder_weights` and its `LoadReport`;
- `voco.checkpoints.run_folder`: a run folder's checkpoints, newest first, and the one resume and export read;
- `voco.checkpoints.exports`: `voco export` (the encoder alone, or with ``--format nnunet`` through
  `voco.checkpoints.nnunet` the whole network nnU-Net builds from a plans file), with its provenance;
- `voco.checkpoints.plan` and `provenance`: the preprocessing plan and pretraining volumes that travel with an export.
"""

from voco.checkpoints.formats import decoder_state_dict, encoder_state_dict, export_encoder, read_checkpoint
from voco.checkpoints.loading import LoadReport, load_encoder_weights
from voco.checkpoints.run_folder import find_latest_checkpoint, ranked_checkpoints, stored_step

__all__ = [
    "LoadReport",
    "decoder_state_dict",
    "encoder_state_dict",
    "export_encoder",
    "find_latest_checkpoint",
    "load_encoder_weights",
    "ranked_checkpoints",
    "read_checkpoint",
    "stored_step",
]
