"""Materializers: recipe -> candidate model, in memory or on disk.

All go through the engine's one path (``merge_engine.merge``: plan_merge, then
write_plan into a sink). In memory: one model stays resident and the sink copies
every merged tensor into its parameters (the input models' tensors are cached after
the first candidate), so a candidate costs the merge arithmetic and nothing else.
A layer path (a passthrough recipe, evolve/layer_path.py) changes the depth, so it gets a model of its
own: LayerPathMaterializer assembles it from resident float32 copies of the source tensors, shared by
every candidate, and only the tensors the recipe rescales are computed (by the engine) and new.
On disk: the merge is written with run_merge and loaded back, as a user's final
model would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from merge_engine.config import MergeConfig
from merge_engine.dtypes import dtype_name
from merge_engine.errors import PlanError
from merge_engine.io.artifacts import output_config
from merge_engine.io.loader import ModelSource
from merge_engine.io.references import open_model
from merge_engine.merge import open_sources, plan_merge, run_merge, write_plan
from merge_engine.options import MergeOptions
from merge_engine.plan import MergePlan, TensorJob
from merge_engine.tokenizer import OutputTokenizer, plan_output_tokenizer


class ModelSink:
    """A TensorSink that writes merged tensors into a loaded model's parameters."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()

    @contextlib.contextmanager
    def open(self, plan: MergePlan) -> Iterator[ModelSink]:
        """Check that every planned tensor fits the resident model, before any is merged."""
        for job in plan.jobs:
            target = self.state.get(job.output_name)
            if target is None:
                raise PlanError(f"in-memory merge: the resident model has no tensor {job.output_name!r} "
                                "(recipes that change the layer count or the tensors need --on-disk)")
            if tuple(target.shape) != job.shape:
                raise PlanError(f"in-memory merge: {job.output_name!r} has shape {list(job.shape)}, the resident "
                                f"model {list(target.shape)} (recipes that change the shapes need --on-disk)")
        yield self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.state[name].copy_(tensor)


def load_model(path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per candidate would drown the search's own
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to's argument as a model
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer


def planned_tokenizer(cache: dict[str, OutputTokenizer], config: MergeConfig, sources: dict[str, ModelSource],
                      trust_remote_code: bool) -> OutputTokenizer:
    """The output vocabulary's alignment for a recipe, planned once per model set (planning reads tokenizers)."""
    key = repr((config.referenced_models(), config.base_model, config.tokenizer_source, config.tokenizer))
    if key not in cache:
        cache[key] = plan_output_tokenizer(config, sources, trust_remote_code)
    return cache[key]


class InMemoryMaterializer:
    def __init__(self, reference_model: str, tokenizer_source: str | None = None, device: str = "cpu",
                 random_seed: int | None = None, trust_remote_code: bool = False, allow_crimes: bool = False):
        # hub ids and base+LoRA references load from their resolved base directory (weights are overwritten)
        self.model, self.tokenizer = load_model(open_model(reference_model).path, device, trust_remote_code)
        if tokenizer_source and tokenizer_source != reference_model:
            _, self.tokenizer = load_model(open_model(tokenizer_source).path, device, trust_remote_code)
        self.options = MergeOptions(device=device, random_seed=random_seed, allow_crimes=allow_crimes,
                                    trust_remote_code=trust_remote_code, progress=False,
                                    release_largest_blocks=False)  # a merge per candidate: reuse every block
        self._sources: dict[str, ModelSource] = {}
        self._tokenizers: dict[str, OutputTokenizer] = {}  # vocabulary alignments, planned once per model set
        self._sink = ModelSink(self.model)

    def materialize(self, config: MergeConfig) -> tuple[Any, Any]:
        self._sources = open_sources(config.referenced_models(), self.options, cache=True, opened=self._sources)
        tokenizer = planned_tokenizer(self._tokenizers, config, self._sources, self.options.trust_remote_code)
        plan, _ = plan_merge(config, self.options, self._sources, tokenizer)
        write_plan(plan, self._sources, self._sink.open, self.options)
        return self.model, self.tokenizer

    def release(self) -> None:
        pass


class DictSink:
    """A TensorSink that collects merged tensors as float32 on `device` (what load_model would load)."""

    def __init__(self, device: str):
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def open(self, plan: MergePlan) -> Iterator[DictSink]:
        yield self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.to(self.device, torch.float32)


class LayerPathMaterializer:
    """In memory, for recipes that change the layer count (layer paths): each candidate is a new model
    whose parameters are resident float32 tensors of the sources (one per source tensor and output
    dtype, shared by every candidate that uses it), except the tensors the plan computes (scaled
    ones), which the engine merges as for any recipe. The numbers equal loading the on-disk merge in
    float32: a resident tensor is the stored one cast to the output dtype, then to float32."""

    def __init__(self, reference_model: str, tokenizer_source: str | None = None, device: str = "cpu",
                 random_seed: int | None = None, trust_remote_code: bool = False, allow_crimes: bool = False):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        path = open_model(reference_model).path  # its config and tokenizer only: the weights are the sources'
        self.config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        self.generation_config = GenerationConfig.from_pretrained(str(path)) \
            if (path / "generation_config.json").exists() else None
        named = tokenizer_source not in (None, "base", "union")  # mergekit's keywords mean the reference's here
        tokenizer_path = open_model(str(tokenizer_source)).path if named else path
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=trust_remote_code)
        self.options = MergeOptions(device=device, random_seed=random_seed, allow_crimes=allow_crimes,
                                    trust_remote_code=trust_remote_code, progress=False,
                                    release_largest_blocks=False)  # a merge per candidate: reuse every block
        self._sources: dict[str, ModelSource] = {}
        self._tokenizers: dict[str, OutputTokenizer] = {}
        self._resident: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self.model: Any = None

    def _resident_copy(self, job: TensorJob) -> torch.Tensor:
        ref = job.inputs[0]
        key = (ref.model, ref.name, job.out_dtype)
        if key not in self._resident:
            stored = self._sources[ref.model].get(ref.name)
            self._resident[key] = stored.to(torch.float32).to(job.out_dtype).to(self.options.device, torch.float32)
        return self._resident[key]

    def materialize(self, config: MergeConfig) -> tuple[Any, Any]:
        self.release()
        self._sources = open_sources(config.referenced_models(), self.options, opened=self._sources)
        tokenizer = planned_tokenizer(self._tokenizers, config, self._sources, self.options.trust_remote_code)
        plan, _ = plan_merge(config, self.options, self._sources, tokenizer)
        sink = DictSink(self.options.device)
        computed = tuple(j for j in plan.jobs if not j.copies_input)
        write_plan(dataclasses.replace(plan, jobs=computed), self._sources, sink.open, self.options)
        state = {j.output_name: self._resident_copy(j) for j in plan.jobs if j.copies_input} | sink.tensors
        vocab = tokenizer.alignment.size if tokenizer.alignment is not None else None
        self.model = assemble_model(self.config, self.generation_config, plan, state, vocab, self.options.device)
        return self.model, self.tokenizer

    def release(self) -> None:
        self.model = None


def assemble_model(reference_config: Any, generation_config: Any, plan: MergePlan, state: dict[str, torch.Tensor],
                   vocab_size: int | None, device: str) -> Any:
    """A transformers model of the plan's shape (its layer count) whose parameters ARE the given tensors
    (no copy). Buffers (rotary frequencies) are computed by the model's own constructor."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = output_config(reference_config.to_dict(), plan.layer_sources, dtype_name(torch.float32), vocab_size)
    config = type(reference_config).from_dict(cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or left:
        raise PlanError(f"in-memory layer path: the assembled {type(model).__name__} does not match the plan "
                        f"(no tensor for {left[:3]}, unused {result.unexpected_keys[:3]}); use --no-in-memory")
    if generation_config is not None:
        model.generation_config = generation_config
    return model.to(device).eval()


class OnDiskMaterializer:
    def __init__(self, scratch_dir: str | Path, device: str = "cpu", random_seed: int | None = None,
                 trust_remote_code: bool = False, allow_crimes: bool = False):
        self.scratch = Path(scratch_dir)
        self.scratch.mkdir(parents=True, exist_ok=True)
        # direct_io=False: the candidate is loaded straight back, from the page cache (written with O_DIRECT it
        # is read from disk: the 24-layer bench model's 0.71 GB took 1.17 s instead of 0.05 s on the bench machine);
        # release_largest_blocks=False: a merge and a load per candidate reuse every freed block
        self.options = MergeOptions(progress=False, random_seed=random_seed, device=device, allow_crimes=allow_crimes,
                                    trust_remote_code=trust_remote_code, write_model_card=False, direct_io=False,
                                    release_largest_blocks=False)
        self.device = device
        self._current: Path | None = None

    def write(self, config: MergeConfig) -> Path:
        self.release()
        self._current = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.scratch)) / "model"
        run_merge(config, self._current, self.options)
        return self._current

    def materialize(self, config: MergeConfig) -> tuple[Any, Any]:
        return load_model(self.write(config), self.device, self.options.trust_remote_code)

    def release(self) -> None:
        if self._current is not None:
            shutil.rmtree(self._current.parent, ignore_errors=True)
            self._current = None
