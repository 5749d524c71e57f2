"""Weighted averages and copies: linear, passthrough, nearswap, model_stock."""

from __future__ import annotations

import torch

from .chunks import exact, float32, row_chunks, task_vectors
from .spec import NORMALIZE_TRUE, WEIGHT, Floats, MethodSpec, ParamSpec, Tensors, require_base


def linear(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, normalize: bool,
    generator: torch.Generator | None
) -> torch.Tensor:
    """sum_i weight_i * x_i, divided by sum_i weight_i when normalize (float32, by row chunks)."""
    total = float(sum(weight))
    if normalize and abs(total) < 1e-8:
        raise ValueError("linear: weights sum to zero, cannot normalize; set normalize: false")
    merged = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for s in row_chunks(merged.shape):
        # sum_i w_i * x_i accumulated in place in the output's rows, in model order (x_0 converted as copied in)
        mixed = merged[s].copy_(tensors[0][s]).mul_(float(weight[0]))
        for x, w in zip(tensors[1:], weight[1:], strict=True):
            mixed.add_(float32(x[s]), alpha=float(w))
        if normalize:
            mixed.div_(total)
    return merged


def passthrough(
    tensors: Tensors, base: torch.Tensor | None, *, scale: Floats, generator: torch.Generator | None
) -> torch.Tensor:
    """Copy the single input tensor, optionally scaled (used by frankenmerges)."""
    return tensors[0] * scale[0] if scale[0] != 1.0 else tensors[0]


def nearswap(
    tensors: Tensors, base: torch.Tensor | None, *, t: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Take the other model's value where it is close to the base (|diff| < t):
    w = clamp(t / max(|base - other|, 1e-6), 0, 1); result = w * other + (1 - w) * base."""
    other, base = tensors[0], require_base(base, "nearswap")
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * other + (1.0 - w) * base


def model_stock(
    tensors: Tensors, base: torch.Tensor | None, *, filter_wise: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Model Stock: interpolate between the base and the average of the fine-tunes with
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of task vectors (over
    the whole tensor, or per vector along the last dim when filter_wise). Where the
    denominator vanishes (|.| < 1e-6) the base is kept."""
    n, base = len(tensors), require_base(base, "model_stock")
    slices = row_chunks(base.shape)
    deltas = task_vectors(list(tensors), base)  # whole: the cosines are reductions over them
    if filter_wise:
        flat = [d.reshape(1, -1) if base.dim() < 2 else d for d in deltas]  # [..., last]
    else:
        flat = [d.reshape(-1) for d in deltas]  # [numel]
    norms = [f.norm(dim=-1) for f in flat]  # once per model, not once per pair
    pair_cos = []
    for i in range(n):
        for j in range(i + 1, n):
            products = norms[i] * norms[j]
            # model i's last pair multiplies its task vector in place (the same products, no [numel] temporary)
            elementwise = flat[i].mul_(flat[j]) if j == n - 1 else flat[i] * flat[j]
            pair_cos.append((elementwise.sum(dim=-1) / products.clamp(min=1e-6)).clamp(-1.0, 1.0))
            del elementwise
    del flat, deltas
    cos = torch.stack(pair_cos).mean(dim=0).unsqueeze(-1)  # [..., 1]
    denominator = 1.0 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    if not filter_wise or base.dim() < 2:
        ratio = ratio.reshape(())
    merged = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for s in slices:  # ratio * average + (1 - ratio) * base, in the output's rows
        r = ratio if ratio.dim() == 0 else ratio[s]
        average = merged[s].copy_(tensors[0][s])  # float32, converted as written
        for x in tensors[1:]:
            average.add_(exact(x[s]))  # the sum in model order
        average.div_(n).mul_(r).add_(float32(base[s]).mul_(1.0 - r))
    return merged


SPECS = (
    MethodSpec("linear", linear, (WEIGHT, NORMALIZE_TRUE),
               "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
               "weighted average of the models' parameters", uses_base=False, streams=True),
    MethodSpec("passthrough", passthrough,
               (ParamSpec("scale", "per_model", default=1.0, help="multiply the copied tensor"),),
               "-", "copy tensors from one model unchanged (frankenmerges with slices)",
               uses_base=False, max_models=1),
    MethodSpec("nearswap", nearswap,
               (ParamSpec("t", "global", required=True, bounds=(0.0, float("inf")),
                          help="similarity threshold: entries closer than t take the other model's value"),),
               "Alexandru Aioanei 2024, nearswap (mergekit)",
               "interpolate towards the other model where it is close to the base",
               requires_base=True, min_models=1, max_models=1),
    MethodSpec("model_stock", model_stock,
               (ParamSpec("filter_wise", "global", "bool", default=False,
                          help="compute the interpolation ratio per row instead of per tensor"),),
               "Jang et al. 2024, Model Stock (arXiv:2403.19522)",
               "move from the base towards the fine-tunes' average by their task-vector agreement",
               requires_base=True, min_models=2, streams=True),
)
