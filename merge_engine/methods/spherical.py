"""Spherical interpolation: slerp, nuslerp, multislerp, karcher.

Tensors are treated as points on a hypersphere (flattened, or row by row);
the merge interpolates directions along great circles and magnitudes linearly.
"""

from __future__ import annotations

import torch

from .spec import T, WEIGHT, Floats, MethodSpec, ParamSpec, Tensors

DOT_THRESHOLD = 0.9995


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Great-circle interpolation between whole tensors a (t=0) and b (t=1),
    falling back to lerp when they are nearly colinear."""
    ua = a / a.norm().clamp(min=eps)
    ub = b / b.norm().clamp(min=eps)
    dot = (ua * ub).sum().clamp(-1.0, 1.0)
    if dot.abs() > DOT_THRESHOLD:
        return (1.0 - t) * a + t * b
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1.0 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """slerp_tensors applied independently to each row of [rows, cols] tensors."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=eps)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=eps)
    dot = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    colinear = dot.abs() > DOT_THRESHOLD
    s0 = torch.where(colinear, torch.full_like(dot, 1.0 - t), torch.sin((1.0 - t) * theta) / sin_theta)
    s1 = torch.where(colinear, torch.full_like(dot, t), torch.sin(t * theta) / sin_theta)
    return s0 * a + s1 * b


def slerp(
    tensors: Tensors, base: torch.Tensor | None, *, t: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Spherical interpolation from the base model (t=0) to the other model (t=1)."""
    return slerp_tensors(base, tensors[0], t)


def nuslerp(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """slerp between two models (or their task vectors when a base is given)
    with t = weight_1 / (weight_0 + weight_1)."""
    total = weight[0] + weight[1]
    if abs(total) < 1e-8:
        raise ValueError("nuslerp: the two weights sum to zero")
    t = weight[1] / total
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    if nuslerp_flatten or a.dim() < 2:
        merged = slerp_tensors(a, b, t)
    elif nuslerp_row_wise:
        merged = slerp_rows(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), t).reshape(a.shape)
    else:  # column-wise
        merged = slerp_rows(a.transpose(0, -1), b.transpose(0, -1), t).transpose(0, -1)
    return merged if base is None else base + merged


def _log_map(units: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Tangent vectors at `mean` pointing to each unit vector. units: [n, d], mean: [d]."""
    dots = (units * mean).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(dots)
    direction = units - dots * mean
    scale = torch.where(theta > 1e-7, theta / torch.sin(theta).clamp(min=1e-12), torch.ones_like(theta))
    return direction * scale


def _exp_map(mean: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    norm = tangent.norm()
    if norm < 1e-12:
        return mean
    moved = torch.cos(norm) * mean + torch.sin(norm) * tangent / norm
    return moved / moved.norm().clamp(min=1e-12)


def _spherical_mean(tensors: Tensors, weight: Floats, base: torch.Tensor | None, normalize_weights: bool,
                    max_iter: int, tol: float, eps: float) -> torch.Tensor:
    """Weighted Frechet (Karcher) mean of directions, scaled by the weighted mean norm.
    max_iter=1 is one tangent-space step from the normalised Euclidean mean (multislerp)."""
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked = stacked - base
    shape = stacked.shape[1:]
    flat = stacked.reshape(len(tensors), -1)  # [n, d]
    w = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)  # [n, 1]
    units = flat / norms.clamp(min=eps)
    target_norm = (norms.squeeze(-1) * w).sum()
    mean = (units * w[:, None]).sum(dim=0)
    if mean.norm() < eps:  # directions cancel: no defined mean direction
        merged = (flat * w[:, None]).sum(dim=0)
    else:
        mean = mean / mean.norm()
        for _ in range(max_iter):
            step = (_log_map(units, mean) * w[:, None]).sum(dim=0)
            mean = _exp_map(mean, step)
            if step.norm() < tol:
                break
        merged = mean * target_norm
    merged = merged.reshape(shape)
    return merged if base is None else base + merged


def multislerp(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, normalize_weights: bool = True,
    eps: float = 1e-8, generator: torch.Generator | None = None
) -> torch.Tensor:
    return _spherical_mean(tensors, weight, base, normalize_weights, max_iter=1, tol=0.0, eps=eps)


def karcher(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, max_iter: int = 10, tol: float = 1e-5,
    generator: torch.Generator | None = None
) -> torch.Tensor:
    return _spherical_mean(tensors, weight, None, True, max_iter=int(max_iter), tol=tol, eps=1e-8)


SPECS = (
    MethodSpec("slerp", slerp, (T,), "Shoemake 1985, Animating rotation with quaternion curves",
               "spherical interpolation between the base model and one other", requires_base=True,
               min_models=1, max_models=1),
    MethodSpec("nuslerp", nuslerp,
               (WEIGHT,
                ParamSpec("nuslerp_flatten", "global", "bool", default=True, help="slerp whole tensors"),
                ParamSpec("nuslerp_row_wise", "global", "bool", default=False,
                          help="slerp row vectors instead of columns (when not flattened)")),
               "mergekit nuslerp (generalises Shoemake 1985 slerp)",
               "slerp of two models or their task vectors, t from relative weights",
               min_models=2, max_models=2),
    MethodSpec("multislerp", multislerp,
               (WEIGHT,
                ParamSpec("normalize_weights", "global", "bool", default=True, help="weights sum to one"),
                ParamSpec("eps", "global", default=1e-8, bounds=(0.0, 1.0), help="numerical floor")),
               "Buss & Fillmore 2001, Spherical averages and applications",
               "barycentric spherical interpolation of any number of models (task vectors with a base)"),
    MethodSpec("karcher", karcher,
               (WEIGHT,
                ParamSpec("max_iter", "global", "int", default=10, bounds=(1, 1000), help="Riemannian iterations"),
                ParamSpec("tol", "global", default=1e-5, bounds=(0.0, 1.0), help="stop when the step is smaller")),
               "Karcher 1977, Riemannian center of mass and mollifier smoothing",
               "Riemannian (Karcher) mean of the models on the hypersphere", uses_base=False),
)
