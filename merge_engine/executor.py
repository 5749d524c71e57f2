"""Plan -> tensors: run each job's merge method and hand the result to a sink.

Inputs are read lazily, rounded to the recipe's `dtype` if it gives one (as mergekit
casts its inputs), then cast to float32 on the compute device (half-precision
arithmetic on CPU is slow and lossy), merged, checked for NaN/inf, rounded to `dtype`
again (mergekit's methods return their inputs' dtype) and cast to the job's output
dtype. Only one job's tensors are alive at a time.
"""

from __future__ import annotations

import keyword
from typing import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .io.loader import ModelSource
from .errors import MergeError
from .io.writer import TensorSink
from .plan import TensorJob, TensorRef

__all__ = ["MergeError", "execute_job", "execute_plan"]


def _kwarg(name: str) -> str:
    return f"{name}_" if keyword.iskeyword(name) else name


def execute_job(job: TensorJob, sources: Mapping[str, ModelSource], device: torch.device) -> torch.Tensor:
    spec = job.method

    def read(ref: TensorRef) -> torch.Tensor:
        tensor = sources[ref.model].get(ref.name)
        if job.input_dtype is not None:
            tensor = tensor.to(job.input_dtype)
        return tensor.to(device=device, dtype=torch.float32)

    tensors = [read(r) for r in job.inputs]
    base = read(job.base) if job.base else None
    if job.vocab is not None:  # embedding / lm_head rows -> the output vocabulary (merge_engine/tokenizer.py)
        models = [r.model for r in job.inputs] + ([job.base.model] if job.base else [])
        aligned = job.vocab.align(models, tensors + ([base] if base is not None else []))
        tensors, base = aligned[: len(job.inputs)], (aligned[-1] if base is not None else None)
    kwargs = {_kwarg(k): v for k, v in job.global_params.items()}
    for p in spec.per_model_params:
        kwargs[_kwarg(p.name)] = [m[p.name] for m in job.per_model_params]
    generator = None
    if job.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(job.seed)
    try:
        merged = spec.fn(tensors, base, generator=generator, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise MergeError(f"tensor {job.output_name!r}: {spec.name} failed: {e}") from None
    if not torch.isfinite(merged).all():
        bad_inputs = [f"{r.model}:{r.name}" for r, t in zip(job.inputs, tensors) if not torch.isfinite(t).all()]
        if base is not None and not torch.isfinite(base).all():
            bad_inputs.append(f"{job.base.model}:{job.base.name}")
        why = (f"input(s) contain NaN/inf: {', '.join(bad_inputs)}" if bad_inputs else
               f"the parameters {job.global_params} {list(job.per_model_params)} produce NaN/inf "
               "(e.g. weights that sum to zero with normalize)")
        raise MergeError(f"tensor {job.output_name!r}: merged result is not finite; {why}")
    if job.input_dtype is not None:  # mergekit's methods return their inputs' dtype: round the result to it too
        merged = merged.to(job.input_dtype)
    return merged.to(job.out_dtype)


def execute_plan(jobs: Iterable[TensorJob], sources: Mapping[str, ModelSource], sink: TensorSink,
                 device: str | torch.device = "cpu", progress: bool = True) -> None:
    device = torch.device(device)
    jobs = list(jobs)
    with torch.no_grad():
        for job in tqdm(jobs, desc="merging", unit="tensor", disable=not progress):
            sink.write(job.output_name, execute_job(job, sources, device))
