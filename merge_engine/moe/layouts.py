"""Output layouts of mergekit-moe: which tensors each output architecture has, where each comes from, and which
architecture a recipe gets (mergekit 0.1.5's list and selection rules).

Inputs are dense checkpoints (Llama / Mistral; Qwen2 for Qwen2-MoE; Qwen3 for Qwen3-MoE). Per decoder layer l,
with E routed experts of MLP width I and hidden size H:

Mixtral (MixtralForCausalLM; the per-expert checkpoint names every transformers version and vLLM load):
    model.layers.l.block_sparse_moe.gate.weight           [E, H]  router rows 0..E-1 of layer l
    model.layers.l.block_sparse_moe.experts.e.w1.weight   [I, H]  expert e's mlp.gate_proj
    model.layers.l.block_sparse_moe.experts.e.w2.weight   [H, I]  expert e's mlp.down_proj
    model.layers.l.block_sparse_moe.experts.e.w3.weight   [I, H]  expert e's mlp.up_proj
Qwen2-MoE (Qwen2MoeForCausalLM; one shared expert S):
    model.layers.l.mlp.gate.weight                        [E, H]  router rows 0..E-1
    model.layers.l.mlp.shared_expert_gate.weight          [1, H]  router row E (the shared expert's gate)
    model.layers.l.mlp.experts.e.{gate,up,down}_proj.weight       expert e's mlp.{gate,up,down}_proj
    model.layers.l.mlp.shared_expert.{gate,up,down}_proj.weight   S's
    model.layers.l.self_attn.{q,k,v}_proj.bias                    the base's, zeros where it has none
Qwen3-MoE (Qwen3MoeForCausalLM; no shared expert; the per-expert names transformers 5 saves and fuses on load):
    model.layers.l.mlp.gate.weight                        [E, H]  router rows 0..E-1
    model.layers.l.mlp.experts.e.{gate,up,down}_proj.weight       expert e's mlp.{gate,up,down}_proj
    model.layers.l.self_attn.{q,k}_norm.weight                    the base's (Qwen3's per-head norms)
DeepSeek-MoE (mergekit writes model_type "deepseek", DeepseekForCausalLM): transformers has no such model (only
the remote code of deepseek-ai/deepseek-moe-16b-base runs it), so a recipe that gets it is refused.
Everything else (embeddings, attention, norms, head) is the base model's tensor of the same name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import transformers

from ..errors import PlanError
from .config import MoEConfig

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DENSE_LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                       "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
OUTSIDE_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Kind = Literal["base", "expert", "router", "zeros"]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and where it comes from."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    tensor: str | None = None                 # base / expert: the input tensor's name
    expert: int | None = None                 # expert: index into MoEConfig.all_experts (routed, then shared)
    layer: int | None = None                  # router: the layer of the gates
    rows: tuple[int, int] | None = None       # router: the gate rows [start, end) of that layer
    residual: bool = False                    # a down projection: the expert's residual_scale applies

    def describe(self, expert_names: Sequence[str]) -> str:
        if self.kind == "base":
            src = f"base {self.tensor}"
        elif self.kind == "expert":
            assert self.expert is not None
            src = f"expert {self.expert} ({expert_names[self.expert]}) {self.tensor}"
        elif self.kind == "router":
            src = f"gates of layer {self.layer}, rows {self.rows}"
        else:
            src = "zeros"
        return f"{self.name:<60} {list(self.shape)!s:<14} {src}"


@dataclass(frozen=True)
class DenseModel:
    """What the base checkpoint holds: the tensors outside the MLPs by layer, and the MLP shapes."""

    layers: int
    hidden: int
    intermediate: int
    pre: list[str]                      # before the layers (embedding)
    per_layer: list[list[str]]          # non-MLP tensors of each layer, in a fixed order
    post: list[str]                     # after them (final norm, head)
    shapes: dict[str, tuple[int, ...]]


def read_dense(names: Sequence[str], shape: Callable[[str], tuple[int, ...]], layers: int, what: str,
               allowed_in_layer: Sequence[str]) -> DenseModel:
    """Classify a dense checkpoint's tensors; PlanError naming any tensor the output has no place for."""
    shapes = {n: shape(n) for n in names}
    per_layer: list[list[str]] = [[] for _ in range(layers)]
    pre, post, stray = [], [], []
    for n in names:
        m = LAYER.match(n)
        if m is not None:
            layer, rest = int(m[1]), m[2]
            if layer >= layers:
                stray.append(n)
            elif MLP.match(n) is None:
                (per_layer[layer] if rest in allowed_in_layer else stray).append(n)
        elif n == OUTSIDE_LAYERS[0]:
            pre.append(n)
        elif n in OUTSIDE_LAYERS:
            post.append(n)
        else:
            stray.append(n)
    if stray:
        raise PlanError(f"{what}: tensor(s) {', '.join(stray[:5])}{', ...' if len(stray) > 5 else ''} have no place "
                        "in the MoE output (a dense Llama/Mistral/Qwen2/Qwen3 model has only embeddings, attention, "
                        "norms, MLP and head); use a base without them")
    missing = [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in PROJECTIONS
               if f"model.layers.{i}.mlp.{p}.weight" not in shapes]
    if missing:
        raise PlanError(f"{what}: no MLP tensor {missing[0]} (a Llama/Mistral/Qwen MLP has gate_proj, up_proj "
                        "and down_proj in every layer)")
    if OUTSIDE_LAYERS[0] not in shapes:
        raise PlanError(f"{what}: no input embedding {OUTSIDE_LAYERS[0]}")
    order = {t: i for i, t in enumerate(allowed_in_layer)}
    per_layer = [sorted(ts, key=lambda n: order[n.split(".", 3)[3]]) for ts in per_layer]
    intermediate, hidden = shapes["model.layers.0.mlp.gate_proj.weight"]
    post.sort(key=OUTSIDE_LAYERS.index)
    return DenseModel(layers, hidden, intermediate, pre, per_layer, post, shapes)


def expected_mlp_shapes(base: DenseModel) -> dict[str, tuple[int, ...]]:
    """The MLP tensors every expert must have, with the base's shapes."""
    return {f"model.layers.{i}.mlp.{p}.weight": base.shapes[f"model.layers.{i}.mlp.{p}.weight"]
            for i in range(base.layers) for p in PROJECTIONS}


def _experts(layer: int, config: MoEConfig, out: Callable[[int, str], str], proj_order: Sequence[str],
             base: DenseModel, expert_major: bool, shared: bool) -> list[OutputTensor]:
    """Expert tensors of one layer: expert-major (e: gate, down, up; Mixtral's draw order) or projection-major
    (proj: every expert, then the shared one; Qwen's)."""
    indices = list(range(len(config.experts))) + ([len(config.experts)] if shared else [])
    pairs = ([(e, p) for e in indices for p in proj_order] if expert_major else
             [(e, p) for p in proj_order for e in indices])
    result = []
    for e, p in pairs:
        src = f"model.layers.{layer}.mlp.{p}.weight"
        result.append(OutputTensor(out(e, p), base.shapes[src], "expert", tensor=src, expert=e,
                                   residual=p == "down_proj"))
    return result


def _copied(base: DenseModel, names: Sequence[str]) -> list[OutputTensor]:
    """The base's tensors, written as they are."""
    return [OutputTensor(n, base.shapes[n], "base", tensor=n) for n in names]


def _router(prefix: str, layer: int, experts: int, base: DenseModel) -> OutputTensor:
    """A layer's router over the routed experts (rows 0..experts of the gate matrix)."""
    return OutputTensor(f"{prefix}.gate.weight", (experts, base.hidden), "router", layer=layer, rows=(0, experts))


def _qwen_sparse(out: Any, config: MoEConfig) -> Any:
    """mergekit's Qwen2/Qwen3-MoE settings: every layer sparse, top-k probabilities renormalised, the routed
    experts as wide as the base's MLP."""
    out.num_experts = len(config.experts)
    out.num_experts_per_tok = config.experts_per_token
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.moe_intermediate_size = out.intermediate_size
    return out


class Mixtral:
    """Mixtral output: routed experts only; Llama or Mistral inputs."""

    name = "Mixtral"
    model_types = ("llama", "mistral")
    allowed_in_layer = DENSE_LAYER_TENSORS
    W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

    def problems(self, config: MoEConfig) -> list[str]:
        if config.shared_experts:
            return ["shared_experts: the Mixtral output has no shared experts; remove them, or set "
                    "architecture: qwen for a Qwen2-MoE output"]
        return []

    def output_config(self, base_config: transformers.PretrainedConfig, config: MoEConfig) -> Any:
        """mergekit's: the base's settings as a MistralConfig (sliding_window None), then as a MixtralConfig."""
        if not isinstance(base_config, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_config.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_config.max_position_embeddings
            base_config = mistral
        out = transformers.MixtralConfig(**base_config.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = len(config.experts)
        out.num_experts_per_tok = config.experts_per_token
        out.sliding_window = None
        return out

    def tensors(self, base: DenseModel, config: MoEConfig, heads: tuple[int, int, int] = (0, 0, 0)
                ) -> list[OutputTensor]:
        out = _copied(base, base.pre)
        experts = len(config.experts)
        for i in range(base.layers):
            out += _copied(base, base.per_layer[i])
            prefix = f"model.layers.{i}.block_sparse_moe"
            out.append(_router(prefix, i, experts, base))

            def expert_name(e: int, p: str, prefix: str = prefix) -> str:
                return f"{prefix}.experts.{e}.{self.W[p]}.weight"

            out += _experts(i, config, expert_name, ("gate_proj", "down_proj", "up_proj"), base, expert_major=True,
                            shared=False)
        return out + _copied(base, base.post)


class QwenMoE:
    """Qwen2-MoE output: routed experts and exactly one shared expert; Llama, Mistral or Qwen2 inputs."""

    name = "Qwen MoE"
    model_types = ("llama", "mistral", "qwen2")
    allowed_in_layer = DENSE_LAYER_TENSORS + QKV_BIASES

    def problems(self, config: MoEConfig) -> list[str]:
        if len(config.shared_experts or []) != 1:
            return [f"shared_experts: the Qwen2-MoE output needs exactly one shared expert, got "
                    f"{len(config.shared_experts or [])}"]
        return []

    def output_config(self, base_config: transformers.PretrainedConfig, config: MoEConfig) -> Any:
        """mergekit's: the base's settings as a Qwen2MoeConfig, every layer sparse, top-k probabilities
        renormalised, both expert widths the base's MLP width."""
        out = _qwen_sparse(transformers.Qwen2MoeConfig(**base_config.to_dict()), config)
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        return out

    def tensors(self, base: DenseModel, config: MoEConfig, heads: tuple[int, int, int] = (0, 0, 0)
                ) -> list[OutputTensor]:
        """heads: (attention heads, key/value heads, head dim) for the zero biases a Llama base lacks."""
        out = _copied(base, base.pre)
        experts = len(config.experts)
        n_heads, n_kv, head_dim = heads
        for i in range(base.layers):
            present = set(base.per_layer[i])
            out += _copied(base, base.per_layer[i])
            for b in QKV_BIASES:
                name = f"model.layers.{i}.{b}"
                if name not in present:
                    rows = (n_heads if b.startswith("self_attn.q") else n_kv) * head_dim
                    out.append(OutputTensor(name, (rows,), "zeros"))
            prefix = f"model.layers.{i}.mlp"

            def expert_name(e: int, p: str, prefix: str = prefix) -> str:
                return f"{prefix}.shared_expert.{p}.weight" if e == experts else f"{prefix}.experts.{e}.{p}.weight"

            out += _experts(i, config, expert_name, ("down_proj", "gate_proj", "up_proj"), base, expert_major=False,
                            shared=True)
            out.append(_router(prefix, i, experts, base))
            out.append(OutputTensor(f"{prefix}.shared_expert_gate.weight", (1, base.hidden), "router", layer=i,
                                    rows=(experts, experts + 1)))
        return out + _copied(base, base.post)


class Qwen3MoE:
    """Qwen3-MoE output: routed experts only; Qwen3 inputs (their q_norm / k_norm come from the base)."""

    name = "Qwen3 MoE"
    model_types = ("qwen3",)
    allowed_in_layer = DENSE_LAYER_TENSORS + QK_NORMS

    def problems(self, config: MoEConfig) -> list[str]:
        if config.shared_experts:
            return ["shared_experts: the Qwen3-MoE output has no shared experts; remove them (Qwen2-MoE, "
                    "architecture: qwen, has one but is built from Llama, Mistral or Qwen2 models)"]
        return []

    def output_config(self, base_config: transformers.PretrainedConfig, config: MoEConfig) -> Any:
        """mergekit's: the base's settings as a Qwen3MoeConfig, every layer sparse, top-k probabilities
        renormalised, the expert width the base's MLP width."""
        out = _qwen_sparse(transformers.Qwen3MoeConfig(**base_config.to_dict()), config)
        out.architectures = ["Qwen3MoeForCausalLM"]
        return out

    def tensors(self, base: DenseModel, config: MoEConfig, heads: tuple[int, int, int] = (0, 0, 0)
                ) -> list[OutputTensor]:
        out = _copied(base, base.pre)
        experts = len(config.experts)
        for i in range(base.layers):
            out += _copied(base, base.per_layer[i])
            prefix = f"model.layers.{i}.mlp"

            def expert_name(e: int, p: str, prefix: str = prefix) -> str:
                return f"{prefix}.experts.{e}.{p}.weight"

            # mergekit's order (and so its noise draws): per expert gate, up, down
            out += _experts(i, config, expert_name, PROJECTIONS, base, expert_major=True, shared=False)
            out.append(_router(prefix, i, experts, base))
        return out + _copied(base, base.post)


class DeepSeekMoE:
    """mergekit's DeepSeek-MoE output, here only to be chosen where mergekit chooses it and then refused: its
    config.json (model_type "deepseek", auto_map to deepseek-ai/deepseek-moe-16b-base's code) loads in no
    transformers without trust_remote_code and that repository's code, so nothing here could test it."""

    name = "DeepSeek MoE"
    model_types = ("llama", "mistral")

    def problems(self, config: MoEConfig) -> list[str]:
        shared = config.shared_experts or []
        if len(shared) > 1:
            return [f"shared_experts: the DeepSeek-MoE output has at most one shared expert, got {len(shared)}"]
        if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return ["shared_experts[0]: the DeepSeek-MoE output's shared expert has no gate, so no prompts"]
        return []

    def refusal(self, chosen_by: str) -> str:
        return (f"{chosen_by} mergekit 0.1.5 builds a DeepSeek-MoE model (DeepseekForCausalLM, model_type "
                "'deepseek'), which transformers cannot load without trust_remote_code and the remote code of "
                "deepseek-ai/deepseek-moe-16b-base, so evomerge does not write it; for a shared expert use "
                "architecture: qwen (Qwen2-MoE; the shared expert then needs positive_prompts unless gate_mode is "
                "random), or remove shared_experts for a Mixtral output")


Layout = Mixtral | QwenMoE | Qwen3MoE
# mergekit 0.1.5's ALL_OUTPUT_ARCHITECTURES, in its order (the order decides between candidates)
LAYOUTS: tuple[Layout | DeepSeekMoE, ...] = (Mixtral(), DeepSeekMoE(), QwenMoE(), Qwen3MoE())


def select_layout(config: MoEConfig, model_types: set[str | None], base_type: str | None = None) -> Layout:
    """mergekit 0.1.5's choice: the candidates are the architectures whose name starts with `architecture`
    (all without it); of those whose shared-expert rules the recipe meets and that take every model's type,
    Mixtral if it is one, else the first. A recipe that gets DeepSeek-MoE is refused (DeepSeekMoE's docstring).
    When no candidate takes the models' types, the first that takes the base's (else the first whose rules the
    recipe meets) is returned and plan_moe names the model that does not fit. PlanError when none fits."""
    names = ", ".join(lay.name.split()[0].lower() for lay in LAYOUTS)
    candidates = list(LAYOUTS)
    chosen_by = "shared_experts without architecture:"
    if config.architecture is not None:
        candidates = [lay for lay in LAYOUTS if lay.name.lower().startswith(config.architecture.lower())]
        chosen_by = f"architecture: {config.architecture!r}:"
        if not candidates:
            raise PlanError(f"architecture: {config.architecture!r} matches no output architecture (a prefix of "
                            f"one of: {names})")
    shaped = [lay for lay in candidates if not lay.problems(config)]
    fitting = [lay for lay in shaped if model_types <= set(lay.model_types)]
    if all(isinstance(lay, DeepSeekMoE) for lay in candidates):
        layout = candidates[0]
    elif fitting:
        layout = next((lay for lay in fitting if isinstance(lay, Mixtral)), fitting[0])
    elif shaped:
        layout = next((lay for lay in shaped if base_type in lay.model_types), shaped[0])
    else:
        raise PlanError("; ".join(candidates[0].problems(config)))
    if isinstance(layout, DeepSeekMoE):
        raise PlanError(layout.refusal(chosen_by))
    return layout
