"""RAM and RAM+ (tensor-local): average the entries several models changed, keep the entries one model
changed alone (RAM+ scales those up).

Steps on task vectors delta_i = x_i - base (n models, each [*shape]):
  1. probe       nz_i = |delta_i| > epsilon (an entry at most epsilon counts as unchanged and is dropped);
                 c = sum_i nz_i: shared where c >= 2, unique where c == 1
  2. rescale     (RAM+ only) lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = (# shared entries of model i)
                 / max(# unique entries of model i, epsilon), counted over this tensor ("tensor-local");
                 RAM: lambda_i = 1
  3. merge       base + sum_i nz_i * delta_i * (1 / c where shared, lambda_i where unique)
"""

from __future__ import annotations

import torch

from .spec import MethodSpec, ParamSpec, Tensors, require_base

EPSILON = ParamSpec("epsilon", "global", default=1e-5, bounds=(0.0, float("inf")),
                    help="a task-vector entry counts as changed when its magnitude exceeds epsilon")


def _probe(tensors: Tensors, base: torch.Tensor, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 1: the changed entries of each task vector (n x [*shape] bool) and how many models changed
    each entry ([*shape] int32)."""
    changed = [(x - base).abs() > epsilon for x in tensors]
    counts = changed[0].to(torch.int32)
    for nz in changed[1:]:
        counts += nz
    return changed, counts


def _merge(tensors: Tensors, base: torch.Tensor, changed: list[torch.Tensor], counts: torch.Tensor,
           scales: list[torch.Tensor] | None) -> torch.Tensor:
    """Step 3: shared entries averaged over the models that changed them, unique ones times scales[i]
    (kept as they are without scales). Summed model by model, in order."""
    shared = counts > 1
    divisor = counts.clamp(min=1)
    merged = None
    for i, (x, nz) in enumerate(zip(tensors, changed, strict=True)):
        delta = (x - base) * nz  # dropped entries: 0
        unique_part = delta if scales is None else delta * scales[i]
        part = torch.where(shared, delta / divisor, unique_part)
        merged = part if merged is None else merged.add_(part)
    if merged is None:
        raise ValueError("ram: no models to merge")
    return base + merged


def ram(tensors: Tensors, base: torch.Tensor | None, *, epsilon: float,
        generator: torch.Generator | None) -> torch.Tensor:
    base = require_base(base, "ram")
    changed, counts = _probe(tensors, base, epsilon)
    return _merge(tensors, base, changed, counts, None)


def ramplus_tl(tensors: Tensors, base: torch.Tensor | None, *, r: float, alpha: float, epsilon: float,
               generator: torch.Generator | None) -> torch.Tensor:
    base = require_base(base, "ramplus_tl")
    changed, counts = _probe(tensors, base, epsilon)
    shared, unique = counts > 1, counts == 1
    n_shared = torch.stack([(nz & shared).sum() for nz in changed])  # [n] int64
    n_unique = torch.stack([(nz & unique).sum() for nz in changed])  # [n] int64
    rho = n_shared / n_unique.clamp(min=epsilon)  # [n] float32 (an int count clamped by a float promotes)
    scales = 1 + r * rho.clamp(min=0, max=alpha)  # lambda_i
    return _merge(tensors, base, changed, counts, list(scales.to(base.dtype)))


_PAPER = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM) (arXiv:2601.13572)"
SPECS = (
    MethodSpec("ram", ram, (EPSILON,), _PAPER,
               "average task-vector entries several models changed, keep those one model changed alone",
               requires_base=True),
    MethodSpec("ramplus_tl", ramplus_tl,
               (ParamSpec("r", "global", default=0.1, search=(0.0, 1.0),
                          help="RAM+: strength of the unique entries' rescaling, lambda = 1 + r * min(rho, alpha)"),
                ParamSpec("alpha", "global", default=0.2, bounds=(0.0, float("inf")), search=(0.0, 1.0),
                          help="RAM+: cap on rho, a model's shared / unique entry ratio in this tensor"),
                EPSILON),
               _PAPER,
               "RAM, with each model's unique entries scaled by 1 + r * min(shared / unique ratio, alpha)",
               requires_base=True),
)
