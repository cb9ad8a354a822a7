"""Pretext tasks: each an nn.Module around a backbone whose forward(batch) returns {"loss": ..., "loss/...": ...}.

One file per objective: voco.py (VoCo), mae.py (MAE and SimMIM), query_box.py (query-box localisation),
contrastive.py (contrastive embedding), cyclic.py (several of them in turn on one backbone), clip.py (study-report
CLIP / SigLIP) with its zero-shot evaluation in zero_shot.py.
"""

from __future__ import annotations

from voco.pretext.clip import CLIPPretext
from voco.pretext.contrastive import ContrastivePretext
from voco.pretext.cyclic import CyclicPretext
from voco.pretext.mae import MaskedImagePretext
from voco.pretext.query_box import QueryBoxPretext
from voco.pretext.voco import VoCoPretext, save_views_picture

__all__ = ["CLIPPretext", "ContrastivePretext", "CyclicPretext", "MaskedImagePretext", "QueryBoxPretext", "VoCoPretext",
           "save_views_picture"]
