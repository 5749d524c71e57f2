"""Task-vector sparsification, shared by TIES, DARE, breadcrumbs and DELLA.

Every function takes one task vector ``delta`` (any shape) and returns a tensor of
the same shape with some entries zeroed (and, where asked, the survivors rescaled).
"""

from __future__ import annotations

import torch


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``density`` fraction of entries with the largest |delta|."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[keep] = True
    return (flat * mask).reshape(delta.shape)


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density; rescale keeps E[result] = delta."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    kept = delta * keep
    return kept / density if rescale else kept


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the
    smallest entries, keeping a ``density`` fraction from the middle of the ranking."""
    if density >= 1.0 and gamma <= 0.0:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_top = int(gamma * n)
    if n_keep + n_top > n:
        n_top = n - n_keep
    n_bottom = n - n_keep - n_top
    flat = delta.reshape(-1)
    order = torch.argsort(flat.abs())  # ascending magnitude
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[n_bottom : n_bottom + n_keep]] = True
    return (flat * mask).reshape(delta.shape)


def rank_magnitude_sampling(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability grows linearly with magnitude rank inside
    each row, from density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1.0 and epsilon <= 0.0:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)  # 0 = smallest
    spread = ranks / max(width - 1, 1)
    p_keep = (density - epsilon + 2.0 * epsilon * spread).clamp(0.0, 1.0)
    keep = torch.rand(rows.shape, generator=generator, device=delta.device) < p_keep
    kept = rows * keep
    if rescale:
        kept = torch.where(keep, kept / p_keep.clamp(min=1e-8), kept)
    return kept.reshape(delta.shape)
