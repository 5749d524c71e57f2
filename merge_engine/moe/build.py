"""mergekit-moe's stages: recipe -> plan (every output tensor and its source, every check against the models)
-> router gates -> the tensors streamed one at a time into an output directory switched into place when
complete (io/output.py: nothing half-written, nothing of the user's removed).

Memory: one output tensor at a time (read, noised / scaled, cast, written), plus the gates ([layers, experts,
hidden], float32); the `hidden` gate modes first hold the whole base model in transformers for its forward
passes and free it before the first tensor is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from .. import interrupts
from ..dtypes import ARITHMETIC, BY_NAME, dtype_name
from ..errors import ModelLoadError, PlanError
from ..io.loader import ModelSource
from ..io.moe_files import model_card, output_names, write_moe_files
from ..io.output import check_collisions, check_output, check_space, output_directory
from ..io.preflight import load_tokenizer
from ..io.writer import ShardedSafetensorsWriter, TensorLayout, plan_shards, shard_filenames
from ..merge import open_sources as merge_sources
from ..options import MergeOptions
from .config import HIDDEN_MODES, PROMPT_MODES, MoEConfig
from .layouts import DenseModel, OutputTensor, expected_mlp_shapes, read_dense, select_layout
from .router import compute_gates, degenerate_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEPlan:
    """Everything the writer needs, decided before any tensor data is read."""

    architecture: str
    out_dtype: torch.dtype
    tensors: list[OutputTensor]
    config: Any                 # the output's transformers config
    expert_names: list[str]     # routed experts, then shared ones (rows of the gates)
    layers: int
    hidden: int

    def layouts(self) -> list[TensorLayout]:
        return [TensorLayout(t.name, t.shape, self.out_dtype) for t in self.tensors]

    def describe(self) -> str:
        head = (f"# mergekit-moe plan: {self.architecture}, {len(self.expert_names)} expert(s), {self.layers} layers, "
                f"hidden {self.hidden}, {len(self.tensors)} tensors, dtype {dtype_name(self.out_dtype)}")
        return "\n".join([head, *(t.describe(self.expert_names) for t in self.tensors)])


def _source_of(config: MoEConfig, sources: dict[str, ModelSource], i: int) -> ModelSource:
    return sources[config.all_experts[i].source_model]


def _out_dtype(config: MoEConfig, base: ModelSource) -> torch.dtype:
    """The recipe's dtype, else the base's config dtype (mergekit's select_dtype), else its embedding's."""
    if config.dtype is not None:
        return BY_NAME[config.dtype]
    for key in ("dtype", "torch_dtype"):
        value = base.config.get(key)
        if isinstance(value, str) and BY_NAME.get(value) in ARITHMETIC:
            return BY_NAME[value]
    return BY_NAME[base.meta("model.embed_tokens.weight")[1]]


def plan_moe(config: MoEConfig, sources: dict[str, ModelSource], allow_crimes: bool = False,
             trust_remote_code: bool = False) -> MoEPlan:
    """The output's tensors and config; PlanError naming the model, tensor or field that does not fit."""
    base = sources[config.base_model]
    roles = [("base_model", base)] + [
        (f"{where}[{i}].source_model", sources[e.source_model])
        for where, experts in (("experts", config.experts), ("shared_experts", config.shared_experts or []))
        for i, e in enumerate(experts)]
    types = {role: s.config.get("model_type") for role, s in roles}
    layout = select_layout(config, set(types.values()), types["base_model"])
    for role, t in types.items():
        if t not in layout.model_types:
            raise PlanError(f"{role}: a {t!r} model; the {layout.name} output is built from "
                            f"{' / '.join(layout.model_types)} models")
    if len(set(types.values())) > 1 and not allow_crimes:
        raise PlanError("models of different model_type (" + ", ".join(f"{r}: {t}" for r, t in types.items())
                        + f"); the {layout.name} output needs one architecture (or pass --allow-crimes)")
    try:
        base_config = transformers.AutoConfig.from_pretrained(str(base.path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any config failure, with the model named
        raise ModelLoadError(f"base_model {base.name!r}: transformers cannot read its config.json: {e}") from None
    layers = int(base_config.num_hidden_layers)
    dense: DenseModel = read_dense(base.tensor_names(), lambda n: base.meta(n)[0], layers,
                                   f"base_model {base.name!r}", layout.allowed_in_layer)
    wanted = expected_mlp_shapes(dense)
    for role, s in roles[1:]:
        if s.config.get("num_hidden_layers") != layers:
            raise PlanError(f"{role} {s.name!r}: {s.config.get('num_hidden_layers')} layers, the base has {layers}; "
                            "experts must have the base's architecture")
        for name, shape in wanted.items():
            if not s.has(name):
                raise PlanError(f"{role} {s.name!r}: no tensor {name}; experts must be dense models with the "
                                "base's architecture")
            got = tuple(s.meta(name)[0])
            if got != shape:
                raise PlanError(f"{role} {s.name!r}: {name} has shape {list(got)}, the base's has {list(shape)}; "
                                "experts must have the base's hidden and intermediate sizes")
    out_dtype = _out_dtype(config, base)
    out_config = layout.output_config(base_config, config)
    out_config.dtype = out_dtype
    heads = int(base_config.num_attention_heads)
    kv = int(getattr(base_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(base_config, "head_dim", None) or dense.hidden // heads)
    tensors = layout.tensors(dense, config, (heads, kv, head_dim))
    names = [e.source_model for e in config.all_experts]
    return MoEPlan(layout.name, out_dtype, tensors, out_config, names, layers, dense.hidden)


def open_sources(config: MoEConfig, options: MergeOptions) -> dict[str, ModelSource]:
    """Each distinct model of the recipe, opened once (references as in mergekit-yaml recipes)."""
    fields = [("base_model", config.base_model)] + [
        (f"{where}[{i}].source_model", e.source_model)
        for where, experts in (("experts", config.experts), ("shared_experts", config.shared_experts or []))
        for i, e in enumerate(experts)]
    sources: dict[str, ModelSource] = {}
    for field, ref in fields:
        if ref in sources:
            continue
        try:
            sources.update(merge_sources([ref], options))
        except ModelLoadError as e:
            raise ModelLoadError(f"{field}: {e}") from None
    return sources


def _tokenizer(config: MoEConfig, base: ModelSource, options: MergeOptions) -> Any:
    """The base's tokenizer when the gates need prompts tokenized or it is copied to the output."""
    if config.gate_mode not in PROMPT_MODES and not options.copy_tokenizer:
        return None
    try:
        return load_tokenizer(base.path, base.name, options.trust_remote_code)
    except ModelLoadError as e:
        why = f"gate_mode {config.gate_mode} tokenizes the prompts with it" if config.gate_mode in PROMPT_MODES \
            else "its tokenizer is copied to the output (--no-copy-tokenizer to skip that)"
        raise ModelLoadError(str(e).replace("tokenizer_source ", "base_model ", 1) + f" ({why})") from None


def gates_for(config: MoEConfig, plan: MoEPlan, base: ModelSource, tokenizer: Any, options: MergeOptions,
              generator: torch.Generator) -> torch.Tensor:
    """(layers, gates, hidden) float32 router rows."""
    if config.gate_mode in HIDDEN_MODES and getattr(base, "adapter_path", None) is not None:
        raise PlanError(f"base_model {base.name!r}: gate_mode {config.gate_mode} runs the base in transformers, "
                        "which cannot apply a LoRA reference on the fly; pass --lora-merge-cache DIR (the merged "
                        "base is written there once) or use gate_mode cheap_embed / random")
    gates = compute_gates(config.gate_mode, config.all_experts, layers=plan.layers, hidden=plan.hidden,
                          generator=generator, tokenizer=tokenizer,
                          embed=lambda: base.get("model.embed_tokens.weight"), base_path=base.path,
                          device=options.device, trust_remote_code=options.trust_remote_code,
                          progress=options.progress)
    bad = degenerate_layers(gates)
    if bad:
        log.warning("warning: layer(s) %s have nearly dependent router rows (condition number > 5): your prompts "
                    "may be too similar, and some experts will be chosen rarely", ", ".join(map(str, bad)))
    return gates


def produce(t: OutputTensor, plan: MoEPlan, config: MoEConfig, sources: dict[str, ModelSource],
            gates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One output tensor, in the output dtype."""
    if t.kind == "base":
        assert t.tensor is not None
        return sources[config.base_model].get(t.tensor).to(plan.out_dtype)
    if t.kind == "router":
        assert t.layer is not None and t.rows is not None
        return gates[t.layer, t.rows[0]:t.rows[1]].to(plan.out_dtype)
    if t.kind == "zeros":
        return torch.zeros(t.shape, dtype=plan.out_dtype)
    assert t.tensor is not None and t.expert is not None
    expert = config.all_experts[t.expert]
    x = _source_of(config, sources, t.expert).get(t.tensor)
    if expert.noise_scale is not None:  # in the stored dtype, one draw per tensor in plan order (as mergekit)
        x = x + torch.randn(x.shape, dtype=x.dtype, generator=generator) * expert.noise_scale
    if t.residual and expert.residual_scale is not None:
        x = x * expert.residual_scale
    return x.to(plan.out_dtype)


def write_tensors(staging: Path, plan: MoEPlan, config: MoEConfig, sources: dict[str, ModelSource],
                  gates: torch.Tensor, generator: torch.Generator, options: MergeOptions) -> None:
    writer = ShardedSafetensorsWriter(staging, plan.layouts(), options.out_shard_size)
    try:
        with interrupts.deferred():
            for t in tqdm(plan.tensors, desc="writing", unit="tensor", disable=not options.progress):
                interrupts.check()
                tensor = produce(t, plan, config, sources, gates, generator)
                writer.write(t.name, tensor)
                del tensor
    except BaseException:
        writer.abort()
        raise
    writer.finish()


def shard_names(plan: MoEPlan, max_shard_bytes: int) -> list[str]:
    return shard_filenames(len(plan_shards(plan.layouts(), max_shard_bytes)))


def run_moe(config: MoEConfig, out_path: str | Path, options: MergeOptions, recipe_text: str,
            protect: Sequence[Path] = ()) -> Path:
    """Build the MoE model described by `config` into out_path; nothing is written when anything fails."""
    sources = open_sources(config, options)
    base = sources[config.base_model]
    plan = plan_moe(config, sources, options.allow_crimes, options.trust_remote_code)
    inputs = [s.path for s in sources.values()] + [p for s in sources.values()
                                                   if (p := getattr(s, "adapter_path", None)) is not None]
    target = check_output(out_path, inputs=inputs, protected=protect, write_into_existing=options.write_into_existing)
    check_collisions(target, output_names(base, shard_names(plan, options.out_shard_size), options.copy_tokenizer))
    needed = sum(t.nbytes for t in plan.layouts()) + (1 << 20)
    check_space(target, needed)
    n = len(config.experts)
    if n & (n - 1):
        log.warning("warning: %d experts is not a power of two, which mergekit warns llama.cpp cannot use", n)
    tokenizer = _tokenizer(config, base, options)
    generator = torch.Generator().manual_seed(options.random_seed if options.random_seed is not None else 0)
    gates = gates_for(config, plan, base, tokenizer, options, generator)
    card = (model_card(config.base_model, plan.expert_names, plan.architecture, config.gate_mode, recipe_text)
            if options.write_model_card else None)
    with output_directory(target, needed) as staging:
        write_tensors(staging, plan, config, sources, gates, generator, options)
        write_moe_files(staging, plan.config, base, recipe_text, options.copy_tokenizer, card)
    return target.path
