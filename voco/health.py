"""Is a pretraining run's encoder collapsing? Two numbers of a batch of embeddings, logged beside the losses.

A self-supervised encoder *collapses* when it maps every input to nearly the same vector (complete collapse) or
to vectors that vary along only a few directions (dimensional collapse); its loss can look quiet meanwhile. Every
pretext passes its batch of embeddings or projections ``[N, D]`` to `embedding_health` (MAE and query box, which
have none: the encoder's output averaged over its tokens) and returns what it gives:

- ``health/embedding_std``: the standard deviation across the batch of each dimension of the L2-normalised
  embeddings, averaged over the D dimensions (SimSiam's collapse monitor, Chen and He, CVPR 2021): about
  ``1 / sqrt(D)`` for embeddings spread over the sphere, 0 when they all coincide;
- ``health/top_component_share``: the share of the batch's variance in its first principal component (the
  largest squared singular value of the centred, normalised embeddings over their sum): small for spread
  embeddings (``1 / min(N - 1, D)`` at best; 0.06-0.2 for 22 random vectors), 1 when they vary along one direction
  only. Needs N >= 3 (two centred vectors always lie on one line), so it is left out of smaller batches;
- ``health/collapsed``: 1 when ``embedding_std < 0.1 / sqrt(D)`` or ``top_component_share > 0.95``, else 0.
  `voco.engine.StepLogger` warns once (`collapse_warning`) when this stays 1 for several logged steps.

The cost is one normalisation and the singular values of a matrix of a few dozen rows, on detached values in
float32 (on a GPU ``svdvals`` waits for the device: one small synchronisation per step).

>>> noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
>>> spread, same = noise, torch.ones(16, 64) + 1e-4 * noise
>>> float(embedding_health(spread)["health/collapsed"]), float(embedding_health(same)["health/collapsed"])
(0.0, 1.0)
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

# Below a tenth of the spread of random unit vectors, or nearly all variance along one direction: collapsed.
COLLAPSE_STD_FRACTION = 0.1
COLLAPSE_TOP_SHARE = 0.95


@torch.no_grad()
def embedding_health(embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse signals of a batch of embeddings ``[..., D]`` (leading axes flattened to N vectors).

    Returns scalar tensors on the embeddings' device (see the module docstring): ``health/embedding_std`` and
    ``health/collapsed`` for N >= 2, ``health/top_component_share`` too for N >= 3; nothing for a single vector.
    All are NaN when an embedding is not finite (the trainer skips such a step anyway).
    """
    vectors = embeddings.detach().flatten(0, -2).float()
    count, dim = vectors.shape
    if count < 2:
        return {}
    finite = torch.isfinite(vectors).all()
    with torch.autocast(vectors.device.type, enabled=False):
        vectors = F.normalize(torch.where(finite, vectors, 0.0), dim=-1)  # svdvals refuses non-finite input
        std = vectors.std(dim=0).mean()
        collapsed = std < COLLAPSE_STD_FRACTION / dim ** 0.5
        health = {"health/embedding_std": std}
        if count >= 3:
            variances = torch.linalg.svdvals(vectors - vectors.mean(dim=0)).square()
            share = variances[0] / variances.sum().clamp_min(torch.finfo(variances.dtype).tiny)
            collapsed = collapsed | (share > COLLAPSE_TOP_SHARE)
            health["health/top_component_share"] = share
        health["health/collapsed"] = collapsed.float()
    return {name: torch.where(finite, value, torch.nan) for name, value in health.items()}


def collapse_warning(values: Mapping[str, float], step: int) -> str | None:
    """The one sentence that says a run's embeddings look collapsed, from a logged step's scalars (those of
    `embedding_health`, under ``health/`` or a cyclic task's ``health/<task>/``), or None when none is flagged."""
    flagged = [key for key, value in values.items()
               if key.startswith("health/") and key.endswith("/collapsed") and value >= 0.5]
    if not flagged:
        return None
    prefix = flagged[0][: -len("collapsed")]  # "health/" or "health/<task>/"
    task = prefix[len("health/"):].rstrip("/")
    measured = [f"std {values[prefix + 'embedding_std']:.3g}"]
    if prefix + "top_component_share" in values:
        measured.append(f"top component {100 * values[prefix + 'top_component_share']:.0f} % of variance")
    whose = f"the {task} task's embeddings" if task else "the embeddings"
    return (f"warning: {whose} are collapsing ({', '.join(measured)} at step {step}); try a lower learning rate, a "
            f"larger batch, a higher teacher momentum, or check that the regions differ.")
