"""SCE: select (by variance), calculate (weights), erase (minority signs), merge."""

from __future__ import annotations

import torch

from .consensus import sign_agreement_mask
from .spec import INT8_MASK, MethodSpec, ParamSpec, Tensors, require_base


def _variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Keep the select_topk fraction of entries whose values vary most across models."""
    variance = deltas.var(dim=0, unbiased=False)  # [*shape]
    k = int(torch.count_nonzero(variance).item() * select_topk)
    mask = torch.zeros_like(variance, dtype=torch.bool).reshape(-1)
    if k > 0:
        mask[torch.topk(variance.reshape(-1), k, sorted=False).indices] = True
    return mask.reshape(variance.shape)


def sce(
    tensors: Tensors, base: torch.Tensor | None, *, select_topk: float, int8_mask: bool,
    generator: torch.Generator | None
) -> torch.Tensor:
    base = require_base(base, "sce")
    deltas = torch.stack([t - base for t in tensors])  # [n, *shape]
    if select_topk < 1.0:
        deltas = deltas * _variance_mask(deltas, select_topk)  # select
    energy = deltas.pow(2).reshape(len(tensors), -1).mean(dim=1)  # calculate: [n]
    total = energy.sum().item()
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / len(tensors))
    weights = weights.view(-1, *([1] * (deltas.dim() - 1)))
    agree = sign_agreement_mask(deltas, int8=int8_mask).to(deltas.dtype)  # erase
    kept_weights = weights * agree
    return base + (deltas * kept_weights).sum(dim=0) / kept_weights.sum(dim=0).clamp(min=1e-6)  # merge


SPECS = (
    MethodSpec("sce", sce,
               (ParamSpec("select_topk", "global", default=1.0, bounds=(0.0, 1.0), search=(0.0, 1.0),
                          help="fraction of highest-variance entries kept"), INT8_MASK),
               "Wan et al. 2024, FuseChat (SCE) (arXiv:2408.07990)",
               "select high-variance entries, weight models by task-vector energy, erase minority signs",
               requires_base=True),
)
