"""The task-vector family: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

Each method is a composition of three steps on task vectors (delta_i = x_i - base):
  1. sparsify each delta_i        (sparsify.py: magnitude / random / outliers / rank sampling)
  2. elect sign, disjoint merge   (consensus.py; skipped by the "linear" variants)
  3. weighted sum, optionally normalised by the weights that survived, scaled by lambda
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from . import sparsify
from .chunks import exact, float32, row_chunks
from .consensus import sign_agreement_mask
from .spec import (
    DENSITY,
    EPSILON,
    GAMMA,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_FALSE,
    NORMALIZE_TRUE,
    RESCALE_FALSE,
    RESCALE_TRUE,
    WEIGHT_REQUIRED,
    Floats,
    MethodSpec,
    ParamSpec,
    Tensors,
    require_base,
)

# DELLA keep probabilities density +/- epsilon must stay inside (0, 1): with the default
# epsilon 0.15, evolve searches density where that holds.
DELLA_DENSITY = replace(DENSITY, search=(0.2, 0.8))



def combine_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    sparsifier: sparsify.Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Steps 1-3 above, in float32, one row chunk at a time (chunks.py): inputs in any float dtype,
    scratch memory a few chunks per model. tensors: n x [*shape]; base: [*shape]."""
    merged = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    slices = row_chunks(base.shape)
    if sparsifier is None and not consensus:  # plain task arithmetic: a running sum, no [n, chunk] stack
        total = torch.tensor(list(weights), dtype=torch.float32).sum()
        for s in slices:  # in place in the output's rows: the same operations, fewer passes
            b = float32(base[s])
            # sum_i (w_i * delta_i), added in order
            mixed = torch.sub(exact(tensors[0][s]), b, out=merged[s]).mul_(float(weights[0]))
            for x, weight in zip(tensors[1:], weights[1:], strict=True):
                mixed.add_(torch.sub(exact(x[s]), b).mul_(float(weight)))
            if normalize and total.abs() >= 1e-8:
                mixed.div_(total.to(mixed.device))
            if lambda_ != 1.0:  # (x * 1.0 is x)
                mixed.mul_(lambda_)
            mixed.add_(b)  # base + lambda * mixed (addition commutes exactly)
        return merged
    # 1. sparsify: each model's sparsifier reads its task vector first, in model order (one random stream)
    vectors = [sparsify.TaskVector(t, base, slices) for t in tensors]
    trims = [sparsifier.fit(i, v) for i, v in enumerate(vectors)] if sparsifier is not None else []
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device).view(-1, 1)  # [n, 1]
    for s in slices:
        b = float32(base[s]).view(-1)
        weighted = torch.empty((len(tensors), b.numel()), dtype=torch.float32, device=base.device)  # [n, chunk]
        for i, x in enumerate(tensors):  # delta_i, converted as read and sparsified in its row of the stack
            delta = torch.sub(exact(x[s]).reshape(-1), b, out=weighted[i])
            if trims:
                kept = trims[i](delta.view(base[s].shape))  # (the rows of the chunk, for per-row rules)
                if kept.data_ptr() != delta.data_ptr():
                    delta.copy_(kept.reshape(-1))
        weighted.mul_(w)
        if consensus:  # 2. elect sign, disjoint merge (a bool mask multiplies as 0.0 / 1.0)
            mask = sign_agreement_mask(weighted, int8=int8_mask)
            mixed = weighted.mul_(mask).sum(dim=0)
            if normalize:
                divisor = (w * mask).sum(dim=0)
                divisor.add_(divisor == 0)  # 0 -> 1, others + 0.0 (unchanged): faster than masked_fill_
        else:
            mixed = weighted.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1.0
        if normalize:  # 3. weighted mean of what survived
            mixed.div_(divisor)
        if lambda_ != 1.0:  # (x * 1.0 is x)
            mixed.mul_(lambda_)
        torch.add(b, mixed, out=merged[s].view(-1))
    return merged


def task_arithmetic(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, normalize: bool, lambda_: float,
    rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """rescale and int8_mask are accepted as mergekit does; without sparsification
    or sign consensus they change nothing."""
    return combine_task_vectors(tensors, require_base(base, "task_arithmetic"), weight, None, False, normalize, lambda_)


def ties(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, normalize: bool,
    lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    return combine_task_vectors(tensors, require_base(base, "ties"), weight, sparsify.Magnitude(density, rescale),
                                True, normalize, lambda_, int8_mask)


def dare_ties(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, normalize: bool,
    lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    drop = sparsify.RandomDrop(density, rescale, generator)
    return combine_task_vectors(tensors, require_base(base, "dare_ties"), weight, drop, True, normalize, lambda_,
                                int8_mask)


def dare_linear(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, normalize: bool,
    lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """int8_mask is accepted as mergekit does; without sign consensus it changes nothing."""
    drop = sparsify.RandomDrop(density, rescale, generator)
    return combine_task_vectors(tensors, require_base(base, "dare_linear"), weight, drop, False, normalize, lambda_)


def breadcrumbs(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, gamma: Floats,
    normalize: bool, lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """int8_mask is accepted as mergekit does; without sign consensus it changes nothing."""
    crumbs = sparsify.MagnitudeOutliers(density, gamma, rescale)
    return combine_task_vectors(tensors, require_base(base, "breadcrumbs"), weight, crumbs, False, normalize, lambda_)


def breadcrumbs_ties(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, gamma: Floats,
    normalize: bool, lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    crumbs = sparsify.MagnitudeOutliers(density, gamma, rescale)
    return combine_task_vectors(tensors, require_base(base, "breadcrumbs_ties"), weight, crumbs, True, normalize,
                                lambda_, int8_mask)


def della(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, epsilon: Floats,
    normalize: bool, lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    prune = sparsify.RankMagnitudeSampling(density, epsilon, rescale, generator)
    return combine_task_vectors(tensors, require_base(base, "della"), weight, prune, True, normalize, lambda_,
                                int8_mask)


def della_linear(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, density: Floats, epsilon: Floats,
    normalize: bool, lambda_: float, rescale: bool, int8_mask: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """int8_mask is accepted as mergekit does; without sign consensus it changes nothing."""
    prune = sparsify.RankMagnitudeSampling(density, epsilon, rescale, generator)
    return combine_task_vectors(tensors, require_base(base, "della_linear"), weight, prune, False, normalize, lambda_)


def _spec(name: str, fn, params: tuple[ParamSpec, ...], paper: str, description: str, randomized=False):
    return MethodSpec(name=name, fn=fn, params=params, paper=paper, description=description,
                      requires_base=True, randomized=randomized, streams=True)


SPECS = (
    _spec("task_arithmetic", task_arithmetic,
          (WEIGHT_REQUIRED, NORMALIZE_FALSE, LAMBDA, RESCALE_FALSE, INT8_MASK),
          "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
          "base + lambda * sum_i weight_i * (model_i - base)"),
    _spec("ties", ties, (WEIGHT_REQUIRED, DENSITY, NORMALIZE_TRUE, LAMBDA, RESCALE_FALSE, INT8_MASK),
          "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
          "trim task vectors by magnitude, elect sign, disjoint weighted mean"),
    _spec("dare_ties", dare_ties, (WEIGHT_REQUIRED, DENSITY, NORMALIZE_FALSE, LAMBDA, RESCALE_TRUE, INT8_MASK),
          "Yu et al. 2023, Language Models are Super Mario (DARE) (arXiv:2311.03099)",
          "random drop with rescale, then TIES sign consensus", randomized=True),
    _spec("dare_linear", dare_linear, (WEIGHT_REQUIRED, DENSITY, NORMALIZE_FALSE, LAMBDA, RESCALE_TRUE, INT8_MASK),
          "Yu et al. 2023, Language Models are Super Mario (DARE) (arXiv:2311.03099)",
          "random drop with rescale, then weighted sum of task vectors", randomized=True),
    _spec("breadcrumbs", breadcrumbs,
          (WEIGHT_REQUIRED, DENSITY, GAMMA, NORMALIZE_FALSE, LAMBDA, RESCALE_FALSE, INT8_MASK),
          "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)",
          "drop largest (gamma) and smallest entries, weighted sum of task vectors"),
    _spec("breadcrumbs_ties", breadcrumbs_ties,
          (WEIGHT_REQUIRED, DENSITY, GAMMA, NORMALIZE_FALSE, LAMBDA, RESCALE_FALSE, INT8_MASK),
          "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)",
          "breadcrumbs sparsification, then TIES sign consensus"),
    _spec("della", della, (WEIGHT_REQUIRED, DELLA_DENSITY, EPSILON, NORMALIZE_TRUE, LAMBDA, RESCALE_TRUE, INT8_MASK),
          "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
          "magnitude-rank sampled drop (MagPrune), TIES sign consensus", randomized=True),
    _spec("della_linear", della_linear,
          (WEIGHT_REQUIRED, DELLA_DENSITY, EPSILON, NORMALIZE_FALSE, LAMBDA, RESCALE_TRUE, INT8_MASK),
          "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
          "magnitude-rank sampled drop (MagPrune), weighted sum", randomized=True),
)

