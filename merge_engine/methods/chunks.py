"""Row chunks: how the streaming methods walk a tensor.

A method whose spec says ``streams=True`` receives its inputs as stored (bfloat16, float16 or
float32, on the compute device) and computes in float32 one chunk of rows at a time, so its
scratch memory is a few chunks, not float32 copies of every input. Chunks split dim 0 (a 1-D
tensor is one chunk: methods with per-row rules, such as DELLA, treat it as one row) and are
visited in order, so a chunked elementwise computation gives the same bits as the whole-tensor
one, and random draws made chunk by chunk follow one generator stream in the same order.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 20  # elements per chunk (4 MiB of float32); tests make it tiny to exercise many chunks


def row_chunks(shape: torch.Size | tuple[int, ...]) -> list[slice]:
    """Slices of dim 0 covering the tensor in order, each about CHUNK elements (at least one row)."""
    if len(shape) < 2:
        return [slice(None)]
    row = 1
    for d in shape[1:]:
        row *= d
    step = max(1, CHUNK // max(row, 1))
    return [slice(s, min(s + step, shape[0])) for s in range(0, shape[0], step)] or [slice(None)]


HALF_OR_SINGLE = (torch.bfloat16, torch.float16, torch.float32)  # convert to float32 exactly


def float32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy the caller owns (inputs may be shared with a cache: never modified in place)."""
    return t.to(torch.float32, copy=True)


def exact(t: torch.Tensor) -> torch.Tensor:
    """t itself where torch's type promotion against a float32 tensor (of at least one dim) reads it as
    its exact float32 value (bfloat16, float16, float32): `torch.sub(exact(x), b)` then computes
    float32(x) - b without the conversion copy. Other dtypes (float64) get their float32 copy, so the
    arithmetic stays in float32 as on float32 copies."""
    return t if t.dtype in HALF_OR_SINGLE else float32(t)


def task_vectors(models: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """model - base in float32 for each model, whole (for methods that reduce over them), converted by row
    chunks; each chunk of the base is converted once for all models."""
    deltas = [torch.empty(base.shape, dtype=torch.float32, device=base.device) for _ in models]
    for s in row_chunks(base.shape):
        b = float32(base[s])
        for model, delta in zip(models, deltas, strict=True):
            torch.sub(exact(model[s]), b, out=delta[s])
    return deltas
