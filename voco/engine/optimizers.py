"""Optimizer set-up shared by the pretraining bundles."""

from __future__ import annotations

import torch


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on weight matrices and kernels, none on biases, norms and learned
    tokens (1-D parameters, and parameters named ``*token`` or ``*mask_value``), as MAE and the slides' recipe do."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            learned_token = name.rsplit(".", 1)[-1].endswith(("token", "mask_value"))
            (no_decay if parameter.ndim <= 1 or learned_token else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
