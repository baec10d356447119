"""Gradient conflict resolution for the parameters all attributes share (PCGrad, Yu et al., NeurIPS 2020).

Each attribute's loss pulls the shared LoRA trunk its own way. When two attributes' gradients point against each
other (negative dot product), summing them lets one cancel the other's progress. PCGrad removes from each
gradient its component along every gradient it conflicts with, then sums.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pcgrad(grads: list[Tensor], generator: torch.Generator) -> Tensor:
    """Combine flattened per-objective gradients, projecting out their conflicting components.

    For each g_i, visit the other objectives j in a random order; whenever the (already projected) g_i has a
    negative dot product with the ORIGINAL g_j, remove g_i's component along g_j:
    ``g_i -= (g_i . g_j / |g_j|^2) g_j``. Return the sum of the projected gradients. Gradients that conflict
    with nothing come back unchanged, so the result equals the plain sum when there is no conflict.
    """
    if not grads:
        raise ValueError("pcgrad needs at least one gradient")
    squared_norms = [float(g.dot(g)) for g in grads]
    projected_sum = torch.zeros_like(grads[0])
    for i, original in enumerate(grads):
        projected = original.clone()
        for j in torch.randperm(len(grads), generator=generator).tolist():
            if j == i or squared_norms[j] == 0.0:
                continue
            dot = projected.dot(grads[j])
            if dot < 0:
                projected -= (dot / squared_norms[j]) * grads[j]
        projected_sum += projected
    return projected_sum


def combine_gradients(grads: list[Tensor], use_pcgrad: bool, generator: torch.Generator) -> Tensor:
    """PCGrad, or the plain sum for the ``--no-pcgrad`` ablation."""
    if use_pcgrad:
        return pcgrad(grads, generator)
    return torch.stack(grads).sum(dim=0)


def conflict_share(grads: list[Tensor]) -> float:
    """Share of objective pairs (i < j) whose gradients conflict (negative dot product); for the training log."""
    pairs = [(i, j) for i in range(len(grads)) for j in range(i + 1, len(grads))]
    if not pairs:
        return 0.0
    return sum(float(grads[i].dot(grads[j])) < 0 for i, j in pairs) / len(pairs)
