"""Recipe -> plan: a pure, printable list of per-tensor jobs.

Each :class:`TensorJob` says which tensors of which models go into one output tensor,
with every parameter already resolved (precedence, filters, gradients). Executing a
plan needs nothing else from the recipe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .architecture import LM_HEAD_NAMES, Architecture, detect_architecture, parse_layer_name
from .config import MergeConfig, OutputSlice, SliceSource
from .io.loader import ModelSource
from .methods import MethodSpec
from .params import MISSING, resolve

if TYPE_CHECKING:
    from .tokenizer import VocabAlignment

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


@dataclass(frozen=True)
class TensorRef:
    model: str
    name: str


@dataclass(frozen=True)
class TensorJob:
    output_name: str
    method: str
    inputs: tuple[TensorRef, ...]  # one per merged model (the base excluded for base-using methods)
    base: TensorRef | None
    global_params: dict[str, Any]
    per_model_params: tuple[dict[str, Any], ...]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    seed: int | None = None
    vocab: VocabAlignment | None = None  # embedding / lm_head: rows mapped to the output vocabulary on read


    def describe(self) -> str:
        srcs = ", ".join(f"{r.model}:{r.name}" for r in self.inputs)
        base = f" base={self.base.model}" if self.base else ""
        return f"{self.output_name} <- {self.method}({srcs}){base} {self.global_params} {list(self.per_model_params)}"


@dataclass(frozen=True)
class MergePlan:
    jobs: tuple[TensorJob, ...]
    reference_model: str
    architecture: Architecture
    num_output_layers: int
    output_layer_sources: tuple[int, ...]  # for each output layer, the reference model's layer it came from
    config_json: dict[str, Any] = field(hash=False, compare=False)

    def describe(self) -> str:
        return "\n".join(j.describe() for j in self.jobs)


class PlanError(ValueError):
    """The recipe is valid but does not fit the models it names."""


def _seed(random_seed: int | None, name: str) -> int | None:
    if random_seed is None:
        return None
    digest = hashlib.sha256(f"{random_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _resolve_all(spec: MethodSpec, tensor_name: str, t: float, sources: list[SliceSource],
                 model_params: dict[str, Any], slice_params, global_params) -> tuple[dict, tuple[dict, ...]]:
    globals_: dict[str, Any] = {}
    for p in spec.global_params:
        v = resolve(p.name, tensor_name, t, [slice_params, global_params])
        if v is MISSING:
            if p.required:
                raise PlanError(f"tensor {tensor_name!r}: parameter {p.name!r} of {spec.name} matches no filter")
            v = p.default
        globals_[p.name] = v
    per_model = []
    for src in sources:
        values = {}
        for p in spec.per_model_params:
            v = resolve(p.name, tensor_name, t, [src.parameters, slice_params, model_params.get(src.model),
                                                 global_params])
            if v is MISSING:
                if p.required:
                    raise PlanError(f"tensor {tensor_name!r}: no value of {p.name!r} for model {src.model!r} "
                                    "(is a filter list missing a catch-all `- value:` entry?)")
                v = p.default
            values[p.name] = v
        per_model.append(values)
    return globals_, tuple(per_model)


def build_plan(config: MergeConfig, sources: dict[str, ModelSource], random_seed: int | None = None,
               allow_crimes: bool = False, vocab: VocabAlignment | None = None) -> MergePlan:
    spec = config.method
    base_name = config.base_model
    slices = config.as_slices()
    reference = base_name or slices[0].sources[0].model
    ref = sources[reference]
    arch = detect_architecture(ref.config, ref.tensor_names(), reference)
    if not allow_crimes:
        for name, src in sources.items():
            mt = src.config.get("model_type")
            if mt != arch.model_type:
                raise PlanError(f"model {name!r} is a {mt!r} model but {reference!r} is {arch.model_type!r}; "
                                "merging different architectures needs --allow-crimes")
    if config.models is not None:  # fill in the full layer range of models: recipes
        slices = [OutputSlice.model_construct(
            sources=[SliceSource.model_construct(model=s.model, layer_range=(0, arch.num_layers),
                                                 parameters=s.parameters) for s in slices[0].sources],
            base_model=None, parameters=None)]
    model_params = {m.model: m.parameters for m in config.models or []}
    dtype_in = config.dtype
    out_dtype_name = config.out_dtype or dtype_in

    def out_dtype_for(ref_name: str) -> torch.dtype:
        if out_dtype_name:
            return TORCH_DTYPES[out_dtype_name]
        return TORCH_DTYPES.get(ref.meta(ref_name)[1], torch.float32)

    def make_job(out_name: str, refs: list[tuple[SliceSource, str]], base_ref: TensorRef | None,
                 t: float, slice_params) -> TensorJob:
        merged = [(s, n) for s, n in refs if not (spec.uses_base and s.model == base_name)]
        inputs = tuple(TensorRef(s.model, _available_name(sources[s.model], n, arch, s.model)) for s, n in merged)
        if base_ref is not None:
            base_ref = TensorRef(base_ref.model, _available_name(sources[base_ref.model], base_ref.name, arch,
                                                                 base_ref.model))
        globals_, per_model = _resolve_all(spec, out_name, t, [s for s, _ in merged], model_params,
                                           slice_params, config.parameters)
        shape_ref = base_ref or inputs[0]
        shape = sources[shape_ref.model].meta(shape_ref.name)[0]
        aligned = vocab if vocab is not None and out_name in (arch.embedding_name, *LM_HEAD_NAMES) else None
        for r in inputs:
            other = sources[r.model].meta(r.name)[0]
            if (other[1:] != shape[1:]) if aligned else (other != shape):
                raise PlanError(f"tensor {out_name!r}: shape mismatch, {shape_ref.model}:{shape_ref.name} is "
                                f"{list(shape)} but {r.model}:{r.name} is {list(other)}; these models cannot be "
                                "merged tensor by tensor (different sizes, or vocabularies: set tokenizer_source)")
        if aligned:
            shape = (aligned.size, *shape[1:])
        return TensorJob(out_name, spec.name, inputs, base_ref if spec.uses_base else None, globals_, per_model,
                         shape, out_dtype_for(shape_ref.name),
                         _seed(random_seed, out_name) if spec.randomized else None, aligned)

    jobs: list[TensorJob] = []
    non_layer = [n for n in ref.tensor_names() if parse_layer_name(n) is None]
    pre = [n for n in non_layer if arch.is_pre_layer(n)]
    post = [n for n in non_layer if not arch.is_pre_layer(n)]

    def non_layer_jobs(names: list[str], slc: OutputSlice, t: float) -> None:
        for name in names:
            refs = [(s, name) for s in slc.sources]
            base_ref = TensorRef(base_name, name) if (spec.uses_base and base_name) else None
            jobs.append(make_job(name, refs, base_ref, t, slc.parameters))

    non_layer_jobs(pre, slices[0], 0.0)
    out_layer = 0
    layer_sources: list[int] = []
    layer_suffixes = _layer_tensors(ref.tensor_names())
    for slc in slices:
        start, end = slc.sources[0].layer_range
        length = end - start
        for src in slc.sources:
            n = _num_layers(sources[src.model], arch)
            if src.layer_range[1] > n:
                raise PlanError(f"slice source {src.model!r}: layer_range {list(src.layer_range)} exceeds its "
                                f"{n} layers")
        base_src = next((s for s in slc.sources if s.model == base_name), None)
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            ref_layer = (base_src or slc.sources[0]).layer_range[0] + j
            layer_sources.append(ref_layer)
            for prefix, suffix in layer_suffixes.get(ref_layer, layer_suffixes[0]):
                out_name = f"{prefix}.{out_layer}.{suffix}"
                refs = [(s, f"{prefix}.{s.layer_range[0] + j}.{suffix}") for s in slc.sources]
                base_ref = None
                if spec.uses_base and base_name:
                    base_layer = base_src.layer_range[0] + j if base_src else ref_layer
                    base_ref = TensorRef(base_name, f"{prefix}.{base_layer}.{suffix}")
                jobs.append(make_job(out_name, refs, base_ref, t, slc.parameters))
            out_layer += 1
    non_layer_jobs(post, slices[-1], 1.0)
    config_json = dict(ref.config)
    config_json[arch.num_layers_key] = out_layer
    if vocab is not None and "vocab_size" in config_json:
        config_json["vocab_size"] = vocab.size
    if isinstance(config_json.get("layer_types"), list) and len(config_json["layer_types"]) == arch.num_layers:
        config_json["layer_types"] = [config_json["layer_types"][i] for i in layer_sources]
    return MergePlan(tuple(jobs), reference, arch, out_layer, tuple(layer_sources), config_json)


def _layer_tensors(names: list[str]) -> dict[int, list[tuple[str, str]]]:
    by_layer: dict[int, list[tuple[str, str]]] = {}
    for n in names:
        ln = parse_layer_name(n)
        if ln is not None:
            by_layer.setdefault(ln.index, []).append((ln.prefix, ln.suffix))
    return by_layer


def _num_layers(src: ModelSource, arch: Architecture) -> int:
    return int(src.config.get(arch.num_layers_key, 0))


def _available_name(src: ModelSource, name: str, arch: Architecture, model: str) -> str:
    """The tensor to read for `name`; a missing lm_head of a tied model reads the embedding."""
    if src.has(name):
        return name
    if name in ("lm_head.weight",) and arch.embedding_name and src.has(arch.embedding_name):
        return arch.embedding_name
    raise PlanError(f"model {model!r} has no tensor {name!r} (is it the same architecture and size as "
                    f"the others?)")
