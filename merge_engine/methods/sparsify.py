"""Task-vector sparsification, shared by TIES, DARE, breadcrumbs and DELLA.

Every function takes one task vector ``delta`` (any shape) and returns a tensor of
the same shape with some entries zeroed (and, where asked, the survivors rescaled).
Which entries survive is mergekit 0.1.5's rule for each (mergekit/sparsify.py);
README "Differences from mergekit" lists where the rescaling differs.
"""

from __future__ import annotations

import torch

L1_EPS = 1e-7  # below this L1 norm (before or after the mask) nothing is rescaled, as mergekit


def _match_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so that its L1 norm equals delta's (mergekit's ``RescaleNorm.l1``)."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES trim: keep the ``density`` fraction of entries with the largest |delta|,
    at least one for any density > 0; ``rescale`` restores delta's L1 norm."""
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), k, sorted=False).indices] = True
    kept = (flat * mask).reshape(delta.shape)
    return _match_l1(delta, kept) if rescale else kept


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density; ``rescale`` divides the
    survivors by density so that E[result] = delta (the paper's rescale)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    kept = delta * keep
    return kept / density if rescale else kept


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the
    smallest entries, keeping int(density * n) entries from the middle of the
    magnitude ranking (fewer outliers dropped when both do not fit); ``rescale``
    restores delta's L1 norm."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    flat = delta.reshape(-1)
    order = torch.argsort(flat.abs())  # ascending magnitude
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[n_bottom : n_bottom + n_keep]] = True
    kept = (flat * mask).reshape(delta.shape)
    return _match_l1(delta, kept) if rescale else kept


def rank_magnitude_sampling(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA MagPrune: the keep probability of an entry grows linearly with its
    magnitude rank along dim 1 (a 1-D delta is one row), from density - epsilon
    (smallest) to density + epsilon (largest); ``rescale`` divides each survivor by
    its keep probability (the paper's rescale)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1.0 or density - epsilon <= 0.0:
        raise ValueError(f"keep probabilities density +/- epsilon = {density} +/- {epsilon} must lie inside "
                         f"(0, 1); lower epsilon below {min(density, 1.0 - density):g}")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # [rows, width, ...]
    width = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)  # 0 = smallest
    p_keep = density - epsilon + 2.0 * epsilon * ranks / max(width - 1, 1)
    keep = torch.rand(rows.shape, generator=generator, device=delta.device) < p_keep
    kept = rows * keep
    if rescale:
        kept = kept / p_keep
    return kept.reshape(delta.shape)
