"""Plan -> tensors: run each job's merge method and hand the result to a sink.

Three stages overlap, each on its own thread, with at most one job of slack between them:
  read     a prefetch thread reads the next job's input tensors (storage dtype, e.g. bf16) and, for
           jobs of small tensors on CPU, already makes the compute step's float32 copies;
  compute  this thread rounds the inputs to the recipe's `dtype` if it gives one (as
           mergekit casts its inputs; compute_inputs), casts them to float32 on the compute device
           (half-precision arithmetic on CPU is slow and lossy), runs the method, checks
           the result is finite, rounds it to `dtype` again (mergekit's methods return
           their inputs' dtype) and casts it to the job's output dtype;
  write    a writer thread hands results to the sink in plan order (bounded queue).
An error in any stage stops the others and is raised here, unchanged, from execute_plan.
Only the current job's tensors, the next job's inputs and a few results waiting to be
written are alive at a time.
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import interrupts
from .errors import MergeError
from .io.loader import ModelSource
from .io.writer import TensorSink
from .methods.spec import kwarg_name
from .plan import TensorJob

WRITE_QUEUE = 2  # merged tensors waiting for the writer before compute waits for it
# jobs whose every input is at most this big in float32 are converted by the reader thread, one job ahead
# (the copies overlap the arithmetic; the large embeddings are converted on the compute thread, so the
# one job of look-ahead never holds their float32 copies)
PREFETCH_CONVERT_BYTES = 32 << 20

__all__ = ["MergeError", "execute_job", "execute_plan"]


def read_inputs(job: TensorJob, sources: Mapping[str, ModelSource]) -> list[torch.Tensor | None]:
    """[base or None, input 0, input 1, ...] as stored: no dtype conversion, no device move."""
    base = sources[job.base.model].get(job.base.name) if job.base else None
    return [base, *(sources[r.model].get(r.name) for r in job.inputs)]


def _float32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy on `device` that the method may not share with the caller's cache."""
    out = torch.empty(t.shape, dtype=torch.float32, device=device)
    return out.copy_(t)


def streams(job: TensorJob) -> bool:
    """The method converts its inputs chunk by chunk itself (MethodSpec.streams); vocabulary alignment
    (new rows averaged from old ones) works on float32 copies, so aligned jobs never stream."""
    return job.method.streams and job.vocab is None


def compute_inputs(job: TensorJob, stored: list[torch.Tensor | None],
                   device: torch.device) -> list[torch.Tensor | None]:
    """The stored inputs as the method sees them: rounded to the recipe's `dtype` (if it gives one), then
    float32 copies on `device`, or, for a streaming method, on `device` as they are. `stored` is
    emptied: each stored tensor is freed once its copy exists."""
    convert = (lambda t: t.to(device)) if streams(job) else (lambda t: _float32(t, device))
    converted = []
    while stored:
        t = stored.pop(0)
        if t is not None and job.input_dtype is not None:
            t = t.to(job.input_dtype)
        converted.append(convert(t) if t is not None else None)
        del t
    return converted


@dataclass
class Prefetched:
    """A job's inputs from the reader thread: as stored, or already converted by compute_inputs (small
    CPU jobs: the conversion then overlaps the previous job's arithmetic)."""

    tensors: list[torch.Tensor | None]
    converted: bool


def prefetch(job: TensorJob, sources: Mapping[str, ModelSource], device: torch.device) -> Prefetched:
    stored = read_inputs(job, sources)
    small = all(t is None or t.numel() * 4 <= PREFETCH_CONVERT_BYTES for t in stored)
    if device.type == "cpu" and small:
        return Prefetched(compute_inputs(job, stored, device), True)
    return Prefetched(stored, False)


def _is_finite(t: torch.Tensor) -> bool:
    """One reduction: a NaN or inf anywhere makes the sum non-finite. A finite tensor
    whose sum overflows is confirmed with the elementwise check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def merge_tensors(job: TensorJob, stored: list[torch.Tensor | None], sources: Mapping[str, ModelSource],
                  device: torch.device, ready: bool = False) -> torch.Tensor:
    """Run the job's method on its inputs as read (read_inputs), or as compute_inputs made them
    (ready=True); returns the result in the output dtype. `stored` is emptied."""
    spec = job.method
    if ready:  # prefetch already made the float32 copies: take them over
        converted = stored[:]
        stored.clear()
    else:
        converted = compute_inputs(job, stored, device)
    base = converted[0]
    tensors: list[torch.Tensor] = [t for t in converted[1:] if t is not None]  # inputs are never None
    del converted
    if job.vocab is not None:  # embedding / lm_head rows -> the output vocabulary (merge_engine/tokenizer.py)
        models = [r.model for r in job.inputs] + ([job.base.model] if job.base else [])
        aligned = job.vocab.align(models, tensors + ([base] if base is not None else []))
        tensors, base = aligned[: len(job.inputs)], (aligned[-1] if base is not None else None)
    kwargs = {kwarg_name(k): v for k, v in job.global_params.items()}
    for p in spec.per_model_params:
        kwargs[kwarg_name(p.name)] = [m[p.name] for m in job.per_model_params]
    generator = None
    if job.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(job.seed)
    try:
        merged = spec.fn(tensors, base, generator=generator, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise MergeError(f"tensor {job.output_name!r}: {spec.name} failed: {e}") from None
    del tensors, base
    if not _is_finite(merged):
        refs = [job.base, *job.inputs]
        bad_inputs = [f"{r.model}:{r.name}" for r, t in zip(refs, read_inputs(job, sources), strict=True)
                      if r is not None and t is not None and t.is_floating_point() and not _is_finite(t)]
        why = (f"input(s) contain NaN/inf: {', '.join(bad_inputs)}" if bad_inputs else
               f"the parameters {job.global_params} {list(job.per_model_params)} produce NaN/inf "
               "(e.g. weights that sum to zero with normalize)")
        raise MergeError(f"tensor {job.output_name!r}: merged result is not finite; {why}")
    if job.input_dtype is not None:  # mergekit's methods return their inputs' dtype: round the result to it too
        merged = merged.to(job.input_dtype)
    return merged.to(job.out_dtype)


def execute_job(job: TensorJob, sources: Mapping[str, ModelSource], device: torch.device) -> torch.Tensor:
    """One job, start to end, on this thread."""
    return merge_tensors(job, read_inputs(job, sources), sources, device)


# blocks of at least this many bytes are always mapped on their own (glibc's largest dynamic threshold)
MMAP_AT_LEAST = 32 << 20


def keep_freed_memory(largest: int | None) -> None:
    """Let glibc keep freed blocks for reuse instead of returning them to the kernel, except the
    largest ones. `largest`: bytes of the plan's largest float32 tensor; None keeps every block (a
    process that merges again and again, such as the search's in-memory candidates, reuses them
    without faults, and its peak is the resident model's anyway).

    Every job allocates tensors of the same few sizes; by default glibc maps each block over
    its (moving) mmap threshold on its own and unmaps it when freed, so the next job's pages
    fault in again. Blocks below the threshold set here stay in one arena (one, so blocks
    freed by the reader and writer threads are reused too) and are reused without faults.

    The largest blocks (a quarter of the largest tensor in float32 and up: the embedding and
    lm_head jobs' inputs, results and copies, where the peak is) are still mapped on their own.
    Kept in the arena, they fragmented it: whether a freed embedding-sized hole could take the
    next one depended on the order in which the three threads had freed their blocks, and one
    run in three peaked 125 MiB higher than the next (24-layer bench models). Mapped on their own,
    they are returned when freed, so the peak follows the memory alive at the largest jobs: on the
    bench models the median of 3 runs is within 4% at 12 and 48 layers (single runs of the TIES
    family still differ by what else is in flight). The price: those blocks fault in again at every
    largest job (about 0.2 s per merge of the bench models). No-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_threshold, 1 << 30 if largest is None else max(MMAP_AT_LEAST, largest // 4))
    libc.mallopt(m_trim_threshold, 1 << 30)


def _raise_first_error(futures: Sequence[Future]) -> None:
    for f in futures:
        error = f.exception() if f.done() else None
        if error is not None:
            raise error


def execute_plan(jobs: Iterable[TensorJob], sources: Mapping[str, ModelSource], sink: TensorSink,
                 device: str | torch.device = "cpu", progress: bool = True, release_largest: bool = True) -> None:
    """Merge every job and write the results to `sink` in plan order.

    Reads run one job ahead of the arithmetic, writes run behind it; the first error of
    any stage is raised as is, after the other threads have stopped (no write starts
    after it is raised, so the caller can abort the sink). `release_largest`: keep_freed_memory."""
    device = torch.device(device)
    jobs = list(jobs)
    if not jobs:
        return
    keep_freed_memory(max(math.prod(job.shape) for job in jobs) * 4 if release_largest else None)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write")
    pending: deque[Future] = deque()
    try:
        with torch.no_grad(), interrupts.deferred():  # Ctrl-C/SIGTERM stop it between tensors, never mid-bookkeeping
            next_inputs = reader.submit(prefetch, jobs[0], sources, device)
            for i, job in enumerate(tqdm(jobs, desc="merging", unit="tensor", disable=not progress)):
                interrupts.check()
                inputs = next_inputs.result()  # re-raises the reader's error
                if i + 1 < len(jobs):
                    next_inputs = reader.submit(prefetch, jobs[i + 1], sources, device)
                merged = merge_tensors(job, inputs.tensors, sources, device, inputs.converted)
                del inputs
                _raise_first_error(pending)
                while len(pending) >= WRITE_QUEUE:
                    pending.popleft().result()  # re-raises the writer's error
                pending.append(writer.submit(sink.write, job.output_name, merged))
                del merged
            while pending:
                interrupts.check()
                pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
