"""Arcee Fusion: take the other model's value only where it changed the base the most.

Steps on one tensor (base b and model x, [..., d]; softmax and KL run along the last dim, a 1-D tensor
is one row):
  1. importance  s = |x - b| * KL(p || q),  p = softmax(x) + 1e-8, q = softmax(b) + 1e-8, one KL per row
  2. threshold   tau = Q2 + 1.5 (Q3 - Q1) of s (Tukey's upper fence): Qk is the floor(k (n - 1) / 4)-th
                 smallest of the n entries; tensors above 1M entries estimate it from 1M entries drawn
                 with replacement (the run's seeded generator), as mergekit does
  3. fuse        b + (x - b) * [s >= tau]
"""

from __future__ import annotations

import torch

from .spec import MethodSpec, Tensors, require_base

QUANTILE_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the row's KL divergence of softmax(x) from softmax(b). [..., d] -> [..., d]"""
    eps = 1e-8
    p = torch.softmax(x, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # [..., 1]
    return (x - base).abs() * kl


def upper_fence(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of the entries (a 0-d tensor); quartiles by index floor(k (n - 1) / 4) of the
    sorted entries, of QUANTILE_SAMPLE entries drawn with replacement when there are more."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        if generator is None:
            generator = torch.Generator(device=flat.device).manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, q2, q3 = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(tensors: Tensors, base: torch.Tensor | None, *, generator: torch.Generator | None) -> torch.Tensor:
    base = require_base(base, "arcee_fusion")
    x = tensors[0]
    scores = importance(x, base)  # 1. importance
    keep = scores >= upper_fence(scores, generator)  # 2. threshold
    del scores
    return base + (x - base) * keep.to(x.dtype)  # 3. fuse


SPECS = (
    MethodSpec("arcee_fusion", arcee_fusion, (),
               "Arcee AI, Arcee Fusion (mergekit merge_methods/arcee_fusion.py; arcee.ai)",
               "take the model's values where |x - base| * KL(softmax) is an upper outlier (Tukey fence), "
               "else the base",
               requires_base=True, min_models=1, max_models=1, randomized=True),
)
