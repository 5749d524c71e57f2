"""The overlapped executor and the chunked task-vector methods give bit-identical results
to a straightforward computation, and failures in the reader or writer thread surface as
the same errors, with nothing left at the output path."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_engine import MergeOptions, executor, parse_recipe, run_merge
from merge_engine.executor import MergeError, execute_plan
from merge_engine.io.loader import ModelLoadError, ModelSource
from merge_engine.merge import plan_merge
from merge_engine.methods import REGISTRY, chunks, consensus, sparsify, task_arithmetic
from merge_engine.plan import TensorJob

QUIET = MergeOptions(progress=False, random_seed=7)
PER_MODEL = {"weight": [0.7, 0.45], "density": [0.5, 0.3], "gamma": [0.1, 0.05], "epsilon": [0.1, 0.05],
             "scale": [1.0, 1.0]}
GLOBAL = {"t": 0.3, "select_topk": 0.5}
CHUNKED = task_arithmetic.combine_task_vectors


def recipe_for(method: str, zoo: dict[str, Path]) -> dict:
    spec = REGISTRY[method]
    n = 1 if spec.max_models == 1 else 2
    models = [{"model": str(zoo[m]), "parameters": {}} for m in ("a", "b")[:n]]
    for p in spec.per_model_params:
        if p.name in PER_MODEL:
            for i, m in enumerate(models):
                m["parameters"][p.name] = PER_MODEL[p.name][i]
    recipe = {"merge_method": method, "models": models, "dtype": "bfloat16",
              "parameters": {p.name: GLOBAL[p.name] for p in spec.global_params if p.name in GLOBAL}}
    if method == "nearswap":  # t is a distance there: below the fine-tunes' noise, so both models count
        recipe["parameters"]["t"] = 0.005
    if spec.requires_base or (spec.uses_base and method not in ("nuslerp", "multislerp")):
        recipe["base_model"] = str(zoo["base"])
    return recipe


def stacked_task_vectors(tensors, base, weights, sparsifier, consensus_, normalize, lambda_, int8_mask=False):
    """The reference: every step on the whole [n, *shape] stack at once (plain task arithmetic
    keeps its running sum, which is not chunked)."""
    if sparsifier is None and not consensus_:
        return CHUNKED(tensors, base, weights, sparsifier, consensus_, normalize, lambda_, int8_mask)
    deltas = torch.stack([t - base for t in tensors])
    if sparsifier is not None:
        deltas = torch.stack([sparsify.sparsify_whole(sparsifier, d, i) for i, d in enumerate(deltas)])
    w = torch.tensor(list(weights), dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if consensus_:
        mask = consensus.sign_agreement_mask(weighted, int8=int8_mask).to(deltas.dtype)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def reference_merge(job: TensorJob, sources: dict[str, ModelSource]) -> torch.Tensor:
    """One job, the plain way: read, round to the recipe's dtype, cast to float32, merge, round, cast."""
    spec = job.method  # the plan carries the spec

    def read(model: str, name: str) -> torch.Tensor:
        t = sources[model].get(name)
        return (t.to(job.input_dtype) if job.input_dtype is not None else t).to(torch.float32)

    tensors = [read(r.model, r.name) for r in job.inputs]
    base = read(job.base.model, job.base.name) if job.base else None
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in job.global_params.items()}
    for p in spec.per_model_params:
        kwargs[p.name] = [m[p.name] for m in job.per_model_params]
    generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
    merged = spec(tensors, base, generator=generator, **kwargs)
    assert torch.isfinite(merged).all()
    if job.input_dtype is not None:
        merged = merged.to(job.input_dtype)
    return merged.to(job.out_dtype)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks far smaller than the tensors, so every tensor is merged in many slices
    (including a ragged last one)."""
    monkeypatch.setattr(chunks, "CHUNK", 37)


@pytest.fixture
def split_prefetch(monkeypatch):
    """The reader converts the zoo's jobs of tensors up to 4 KiB (float32) and leaves the larger ones to the
    compute thread: one merge takes both paths."""
    monkeypatch.setattr(executor, "PREFETCH_CONVERT_BYTES", 4096)
    paths = []
    real = executor.prefetch

    def spy(*args):
        fetched = real(*args)
        paths.append(fetched.converted)
        return fetched

    monkeypatch.setattr(executor, "prefetch", spy)
    return paths


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_executor_output_is_bit_identical_to_reference(method, zoo, tmp_path, monkeypatch, tiny_chunks,
                                                       split_prefetch):
    config = parse_recipe(recipe_for(method, zoo))
    plan, sources = plan_merge(config, QUIET)
    out = run_merge(config, tmp_path / "out", QUIET)
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(f)))
    monkeypatch.setattr(task_arithmetic, "combine_task_vectors", stacked_task_vectors)
    changed = 0
    for job in plan.jobs:
        expected = reference_merge(job, sources)
        assert written[job.output_name].dtype == expected.dtype
        assert torch.equal(written[job.output_name], expected), job.output_name
        source = sources[job.inputs[0].model].get(job.inputs[0].name)
        changed += not torch.equal(expected, source.to(expected.dtype))
    assert changed > 0 or method == "passthrough", "the merge must actually change the tensors"
    assert set(split_prefetch) == {True, False}  # inputs converted by the reader and by the compute thread


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "dare_linear"])
def test_chunked_task_vectors_match_stacked_on_large_tensors(method):
    """Big enough for several real (default-size) chunks and a ragged end."""
    gen = torch.Generator().manual_seed(0)
    shape = (3 * chunks.CHUNK // 1000 + 1, 1000)
    base = torch.randn(shape, generator=gen)
    tensors = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(3)]
    fn = REGISTRY[method]  # the spec fills in the global defaults
    kwargs = {p.name: PER_MODEL[p.name] + [PER_MODEL[p.name][0]] for p in REGISTRY[method].per_model_params}
    chunked = fn(tensors, base, generator=torch.Generator().manual_seed(1), **kwargs)
    try:
        task_arithmetic.combine_task_vectors = stacked_task_vectors
        stacked = fn(tensors, base, generator=torch.Generator().manual_seed(1), **kwargs)
    finally:
        task_arithmetic.combine_task_vectors = CHUNKED
    assert torch.equal(chunked, stacked)
    assert not torch.equal(chunked, base)


def test_dare_mask_is_the_same_for_a_seed(zoo, tmp_path, tiny_chunks):
    config = parse_recipe(recipe_for("dare_ties", zoo))
    first = load_file(str(run_merge(config, tmp_path / "one", QUIET) / "model.safetensors"))
    second = load_file(str(run_merge(config, tmp_path / "two", QUIET) / "model.safetensors"))
    other = load_file(str(run_merge(config, tmp_path / "three", MergeOptions(progress=False, random_seed=8))
                          / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_reader_error_surfaces_unchanged_and_leaves_no_output(zoo, tmp_path, monkeypatch):
    config = parse_recipe(recipe_for("ties", zoo))
    real_get = ModelSource.get
    failing = "model.layers.1.mlp.down_proj.weight"

    def get(self, name):
        if name == failing and threading.current_thread() is not threading.main_thread():
            raise ModelLoadError(f"model {self.name!r}: cannot read tensor {name!r} (truncated or corrupt?)")
        return real_get(self, name)

    monkeypatch.setattr(ModelSource, "get", get)
    with pytest.raises(ModelLoadError, match=f"cannot read tensor '{failing}'"):
        run_merge(config, tmp_path / "out", QUIET)
    assert list(tmp_path.iterdir()) == []


class FailingSink:
    def __init__(self, fail_at: int):
        self.fail_at, self.names = fail_at, []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if len(self.names) == self.fail_at:
            raise OSError(28, f"No space left on device while writing {name}")
        self.names.append(name)


def test_writer_error_surfaces_unchanged_and_stops_the_merge(zoo):
    config = parse_recipe(recipe_for("task_arithmetic", zoo))
    plan, sources = plan_merge(config, QUIET)
    sink = FailingSink(fail_at=3)
    with pytest.raises(OSError, match=f"No space left on device while writing {plan.jobs[3].output_name}"):
        execute_plan(plan.jobs, sources, sink, progress=False)
    assert sink.names == [j.output_name for j in plan.jobs[:3]]
    assert not any(t.name.startswith("merge-") for t in threading.enumerate()), "threads left running"


def test_method_error_after_writes_started_leaves_no_output(zoo, tmp_path):
    base = str(zoo["base"])
    config = parse_recipe({"merge_method": "linear", "models": [
        {"model": base, "parameters": {"weight": [{"filter": "layers.1.", "value": 1.0}, {"value": 0.5}]}},
        {"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "layers.1.", "value": -1.0},
                                                           {"value": 0.5}]}}]})
    with pytest.raises(MergeError, match=r"model.layers.1.*weights sum to zero"):
        run_merge(config, tmp_path / "out", QUIET)
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_check_names_the_bad_input(zoo):
    config = parse_recipe(recipe_for("linear", zoo))
    plan, sources = plan_merge(config, QUIET)
    job = plan.jobs[2]
    real_get = sources[str(zoo["b"])].get

    def get(name):
        t = real_get(name).clone()
        if name == job.inputs[1].name:
            t.view(-1)[-1] = float("inf")
        return t

    sources[str(zoo["b"])].get = get
    with pytest.raises(MergeError, match=rf"{job.output_name}.*not finite.*{zoo['b']}:{job.inputs[1].name}"):
        execute_plan(plan.jobs, sources, FailingSink(fail_at=10**6), progress=False)


FREED_MEMORY_PROBE = r"""
import json, torch
from merge_engine.executor import keep_freed_memory

def rss_mib():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024

out = {}
# the plan's largest float32 tensor: 256 MiB (blocks from 64 MiB up mapped on their own), or None (keep all)
for largest in (256 << 20, None):
    keep_freed_memory(largest)
    for name, mib in (("largest class", 128), ("below it", 48)):
        x = torch.ones(mib << 18)  # float32: mib MiB, every page touched
        held = rss_mib()
        del x
        out[f"{name}, {largest}"] = held - rss_mib()  # MiB returned to the kernel by the free
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not sys.platform.startswith("linux"),
                    reason="glibc's mallopt and /proc RSS")
def test_the_largest_blocks_return_to_the_kernel_and_the_others_are_kept():
    """keep_freed_memory: blocks of the plan's largest size class are mapped on their own, so freeing
    them lowers RSS (they cannot fragment the arena and raise the peak from run to run); smaller
    blocks stay in the arena for the next job to reuse without page faults; with None every block
    stays. In a child process: the allocator settings are process-wide."""
    proc = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[1]), check=True)
    returned = json.loads(proc.stdout.strip().splitlines()[-1])
    assert returned[f"largest class, {256 << 20}"] > 120, returned
    assert returned[f"below it, {256 << 20}"] < 4, returned
    # release_largest_blocks=False (the search's in-memory candidates): the largest blocks are kept too
    assert returned["largest class, None"] < 4, returned
