"""Pretext tasks: each an nn.Module around a backbone whose forward(batch) returns {"loss": ..., "loss/...": ...}."""

from __future__ import annotations

from voco.pretext.voco import VoCoPretext, save_views_picture

__all__ = ["VoCoPretext", "save_views_picture"]
