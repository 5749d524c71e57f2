"""Spherical interpolation: slerp, nuslerp, multislerp, karcher.

Tensors are treated as points on a hypersphere (flattened, or vector by vector);
the merge interpolates directions along great circles and magnitudes linearly.
Each function restates mergekit 0.1.5's arithmetic, thresholds and eps included
(mergekit/merge_methods/{slerp,nuslerp,multislerp,karcher}.py).
"""

from __future__ import annotations

import torch

from .chunks import exact, float32, row_chunks, task_vectors
from .spec import WEIGHT, Floats, MethodSpec, ParamSpec, T, Tensors, require_base

SLERP_DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly
SLERP_EPS = 1e-8  # slerp: norms at or below this count as 1 (zero tensors stay zero)
NUSLERP_NORM_EPS = 1e-7  # nuslerp: norms are clamped to at least this
NUSLERP_EPS = 1e-8  # nuslerp: colinear (lerp) when 1 - cos^2 <= NUSLERP_EPS^2
NUSLERP_T_EPS = 1e-6  # nuslerp: weights summing to less than this give t = 0.5


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Great-circle interpolation between whole tensors a (t=0) and b (t=1); t outside
    [0, 1] extrapolates. Nearly colinear or antipodal inputs interpolate linearly.

    a and b may be stored bfloat16/float16 (streaming, chunks.py): the two norms and the dot
    product are reductions over the whole tensors in float32 (as on float32 copies: the same
    sums), everything else runs by row chunks; the result is float32."""
    norm_a = torch.linalg.vector_norm(a, dtype=torch.float32)  # == a.float().norm()
    norm_b = torch.linalg.vector_norm(b, dtype=torch.float32)
    divisor_a = torch.where(norm_a > SLERP_EPS, norm_a, 1.0)
    divisor_b = torch.where(norm_b > SLERP_EPS, norm_b, 1.0)
    slices = row_chunks(a.shape)
    products = torch.empty(a.shape, dtype=torch.float32, device=a.device)  # ua * ub, summed once as a whole
    for s in slices:  # ua = a / divisor_a computed in place in products, a converted as it is copied in
        products[s].copy_(a[s]).div_(divisor_a).mul_(float32(b[s]).div_(divisor_b))
    dot = products.sum().clamp(-1.0, 1.0)  # float32: 0.9995 rounds to 1.0 in bf16
    del products
    if dot.abs() > SLERP_DOT_THRESHOLD:
        weight_a, weight_b = torch.tensor(1.0 - t), torch.tensor(t)
    else:
        theta = torch.arccos(dot)
        sin_theta = torch.sin(theta)
        weight_a, weight_b = torch.sin((1.0 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    merged = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    for s in slices:
        merged[s].copy_(a[s]).mul_(weight_a).add_(float32(b[s]).mul_(weight_b))
    return merged


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """nuslerp's slerp of each vector along the last dim of a and b ([..., d])."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = ua.mul_(ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)  # [..., 1]
    del ua, ub  # (temporaries are reused in place below: the same operations, fewer full-size copies)
    colinear = (1.0 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.arccos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1.0 - t) * theta) * a).add_(torch.sin(t * theta) * b).div_(sin_theta)
    if not bool(colinear.any()):
        return spherical
    return torch.where(colinear, ((1.0 - t) * a).add_(t * b), spherical)


def slerp(
    tensors: Tensors, base: torch.Tensor | None, *, t: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Spherical interpolation from the base model (t=0) to the other model (t=1)."""
    return slerp_tensors(require_base(base, "slerp"), tensors[0], t)


def nuslerp(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, nuslerp_flatten: bool,
    nuslerp_row_wise: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """slerp between two models (or their task vectors when a base is given) with
    t = weight_1 / (weight_0 + weight_1), or 0.5 when the weights sum to ~0.

    Unflattened, vectors lie along the last dim (the rows of a matrix); with
    nuslerp_row_wise along dim 0 (the columns). That is mergekit's code, which is
    the opposite of its documentation; recipes tuned on mergekit mean the same here.
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < NUSLERP_T_EPS else weight[1] / total
    a, b = tensors
    if base is not None:
        a, b = task_vectors([a, b], base)
    if nuslerp_flatten:
        merged = slerp_flat(a, b, t)
    elif nuslerp_row_wise:
        merged = slerp_vectors(float32(a).transpose(0, -1), float32(b).transpose(0, -1), t).transpose(0, -1)
    else:
        merged = slerp_vectors(float32(a), float32(b), t)
    if base is not None:  # base + merged
        for s in row_chunks(merged.shape):
            torch.add(exact(base[s]), merged[s], out=merged[s])
    return merged


def slerp_flat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp_vectors of the flattened tensors, streaming (chunks.py): the norms and the dot
    product are whole-tensor float32 reductions (the same sums), the rest runs by row chunks."""
    norm_a = torch.linalg.vector_norm(a.reshape(-1), dim=-1, keepdim=True, dtype=torch.float32)
    norm_b = torch.linalg.vector_norm(b.reshape(-1), dim=-1, keepdim=True, dtype=torch.float32)
    norm_a, norm_b = norm_a.clamp(min=NUSLERP_NORM_EPS), norm_b.clamp(min=NUSLERP_NORM_EPS)
    slices = row_chunks(a.shape)
    # norm_a, norm_b and the sines below are [1] float32 tensors, not 0-dim: dividing or multiplying
    # a bfloat16 chunk by one computes in float32 (type promotion) without a float32 copy of the chunk
    products = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    for s in slices:  # (a / norm_a) * (b / norm_b), the first factor computed in place in products
        torch.div(exact(a[s]), norm_a, out=products[s]).mul_(torch.div(exact(b[s]), norm_b))
    cos = products.reshape(-1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)  # [1]
    del products
    colinear = bool(((1.0 - cos.square()) <= NUSLERP_EPS**2).item())
    theta = torch.arccos(torch.zeros_like(cos) if colinear else cos)
    sin_theta = torch.sin(theta)
    sin_a, sin_b = torch.sin((1.0 - t) * theta), torch.sin(t * theta)  # [1]
    merged = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    for s in slices:
        if colinear:
            torch.add((1.0 - t) * float32(a[s]), t * float32(b[s]), out=merged[s])
        else:
            torch.mul(exact(a[s]), sin_a, out=merged[s]).add_(torch.mul(exact(b[s]), sin_b)).div_(sin_theta)
    return merged


def multislerp(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, normalize_weights: bool, eps: float,
    generator: torch.Generator | None
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (of task vectors with a base):
    project the unit vectors onto the tangent space at their weighted mean direction
    m (u - (u.m) m), average there, map back with the exponential map, and scale by
    the weighted mean norm. Two inputs whose directions cancel, or inputs that are all
    zero (task vectors of unchanged tensors), are combined linearly."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))  # [n, *shape]
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(tensors), -1)  # [n, d]
    w = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)  # [n, 1]
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)  # [d]
    mean_norm = mean.norm()
    if mean_norm < eps:  # directions cancel: no mean direction
        if len(tensors) != 2 and bool((norms > eps).any()):
            raise ValueError("multislerp: the weighted mean direction is zero (antipodal inputs whose weights "
                             "balance out); change the weights")
        merged = (flat * w[:, None]).sum(dim=0).reshape(stacked.shape[1:])  # fall back to lerp
        return merged if base is None else merged + base
    mean = mean / mean_norm
    dots = (units * mean).sum(dim=-1, keepdim=True)  # [n, 1]
    tangent = ((units - dots * mean) * w[:, None]).sum(dim=0)  # project, average: [d]
    tangent_norm = tangent.norm() + eps
    direction = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    merged = (direction * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return merged if base is None else merged + base


def karcher(
    tensors: Tensors, base: torch.Tensor | None, *, weight: Floats, max_iter: int, tol: float,
    generator: torch.Generator | None
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the directions of the models, the base
    model included with weight 1, scaled by the weighted mean norm. Directions of
    norm <= tol take no part in the mean (but count in the norm)."""
    if base is not None:
        tensors, weight = [*tensors, base], [*weight, 1.0]
    if len(tensors) == 1:
        return tensors[0]
    total = float(sum(weight))
    if total == 0.0:
        raise ValueError("karcher: the weights sum to zero; give the models weights with a non-zero sum")
    alphas = [float(w) / total for w in weight]
    norms = [x.norm() for x in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    valid_total = sum(alphas[i] for i in valid)
    if valid_total == 0.0:
        raise ValueError("karcher: the models with non-zero tensors have weights summing to zero")
    units = [(tensors[i] / norms[i]).reshape(-1) for i in valid]  # [d] each
    coeffs = [alphas[i] / valid_total for i in valid]
    mean = sum(a * u for a, u in zip(coeffs, units, strict=True))
    mean_norm = mean.norm()
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)  # weighted log map of the units at mean
        for a, u in zip(coeffs, units, strict=True):
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = tangent.norm()
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)  # exp map
        unit_norm = mean.norm()
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(tensors[0].shape)


_RELATIVE_WEIGHT = ParamSpec("weight", "per_model", required=True, search=(0.0, 1.0),
                             help="this model's weight (relative to the others')")

SPECS = (
    MethodSpec("slerp", slerp, (T,), "Shoemake 1985, Animating rotation with quaternion curves",
               "spherical interpolation between the base model and one other", requires_base=True,
               min_models=1, max_models=1, streams=True),
    MethodSpec("nuslerp", nuslerp,
               (_RELATIVE_WEIGHT,
                ParamSpec("nuslerp_flatten", "global", "bool", default=True, help="slerp whole tensors"),
                ParamSpec("nuslerp_row_wise", "global", "bool", default=False,
                          help="when not flattened, slerp column vectors (dim 0) instead of rows, "
                               "as mergekit's code does")),
               "mergekit nuslerp (generalises Shoemake 1985 slerp)",
               "slerp of two models or their task vectors, t from relative weights",
               min_models=2, max_models=2, streams=True),
    MethodSpec("multislerp", multislerp,
               (_RELATIVE_WEIGHT,
                ParamSpec("normalize_weights", "global", "bool", default=True, help="weights sum to one"),
                ParamSpec("eps", "global", default=1e-8, bounds=(0.0, 1.0), help="numerical floor")),
               "Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); Buss & Fillmore 2001",
               "barycentric spherical interpolation of any number of models (task vectors with a base)"),
    MethodSpec("karcher", karcher,
               (WEIGHT,
                ParamSpec("max_iter", "global", "int", default=10, bounds=(0, 1000), help="Riemannian iterations"),
                ParamSpec("tol", "global", default=1e-5, bounds=(0.0, 1.0), help="stop when the step is smaller")),
               "Karcher 1977, Riemannian center of mass and mollifier smoothing",
               "Riemannian (Karcher) mean of the models on the hypersphere, the base model included"),
)
