"""What a checkpoint's tensors mean: which belong to which decoder layer, which are
the embeddings and the output head, and how many layers the config declares.

Known model types are listed explicitly; anything else falls back to the common
``<prefix>.<layers|h|blocks>.<index>.<rest>`` naming, with a clear error if that fails.

A vision-language model (config.json with a nested ``text_config``: LLaVA, Qwen2-VL, Qwen2.5-VL,
Gemma3, Mistral3) holds several layer stacks, each a :class:`Tower` with its own layer count:
the text decoder's from ``text_config``, the vision encoder's from ``vision_config``. Which
stack a layer prefix belongs to is read from its name (``VISION_PREFIX_WORDS``), since the
names differ by family and by the transformers version that saved the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlanError

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\b(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# model_type -> (config key holding the layer count, input embedding, output head), for the families users merge
# most; names as transformers 5 saves them (MoE experts per expert: `experts.N.w2`, `experts.N.down_proj`). A model
# with tied embeddings stores no head: its embedding stands in (Architecture.tied_alternative)
_DECODER = ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight")
KNOWN: dict[str, tuple[str, str, str]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "phi3", "phi", "olmo", "olmo2", "olmo3", "stablelm", "starcoder2", "cohere",
                     "cohere2", "granite", "smollm3"), _DECODER),
    "gpt2": ("n_layer", "transformer.wte.weight", "lm_head.weight"),
    "gpt_bigcode": ("n_layer", "transformer.wte.weight", "lm_head.weight"),
    "gptj": ("n_layer", "transformer.wte.weight", "lm_head.weight"),
    "falcon": ("num_hidden_layers", "transformer.word_embeddings.weight", "lm_head.weight"),
    "gpt_neox": ("num_hidden_layers", "gpt_neox.embed_in.weight", "embed_out.weight"),
}
# model_type -> the tensors of a layer that write into the residual stream (attention output, MLP down
# projection; every expert's and a shared expert's), as tensor-name filters, for pre-norm architectures (also the
# parallel-residual ones whose attention and MLP read one norm: cohere, phi, falcon, gptj): scaling the stream
# before a layer equals scaling these of that layer and the later ones by the inverse (evolve/layer_path.py).
# Families that normalise after them are left out: gemma2/3 and olmo2/3 (norms on the sublayer outputs).
RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "stablelm", "cohere", "cohere2",
                     "granite", "smollm3"), ("self_attn.o_proj", "mlp.down_proj")),
    **dict.fromkeys(("qwen2_moe", "qwen3_moe"), ("self_attn.o_proj", "down_proj")),  # experts.N., shared_expert.
    # block_sparse_moe.experts.N.w2 as transformers saves Mixtral; mlp.experts.down_proj ([experts, hidden,
    # intermediate]) in a checkpoint of transformers 5's fused in-memory names (the Qwen MoEs' `down_proj` names both)
    "mixtral": ("self_attn.o_proj", ".w2.", "experts.down_proj"),
    "starcoder2": ("self_attn.o_proj", "mlp.c_proj"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "gptj": ("attn.out_proj", "mlp.fc_out"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_bigcode": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense.", "mlp.dense_4h_to_h"),
}
# vision-language models: config keys of the text decoder's and the vision encoder's layer counts (the first
# present), and the words that mark a layer prefix as the vision encoder's (`vision_tower.encoder.layers`,
# `visual.blocks`, `vision_tower.vision_model.encoder.layers`, `vision_tower.transformer.layers`); every
# other layer prefix is the text decoder's (`language_model.model.layers`, `model.language_model.layers`,
# `model.layers`)
TEXT_LAYERS_KEYS = ("text_config.num_hidden_layers",)
VISION_LAYERS_KEYS = ("vision_config.num_hidden_layers", "vision_config.depth")
VISION_PREFIX_WORDS = ("vision", "visual")
# mergekit 0.1.5's module names (`modules:` recipes): a plain model is the one module `default`; a vision-language
# model's are those of mergekit's JSON definitions of qwen2_vl, qwen2_5_vl, gemma3 and mistral3: each tower with the
# tensors outside its layers (embeddings, norms, head; patch embedding, vision norms), and the projector, whose
# tensors are named by PROJECTOR_WORDS (`multi_modal_projector.`, Qwen2-VL's `visual.merger.`)
DEFAULT_MODULE = "default"
TOWER_MODULES = {"text": "text_decoder", "vision": "vision_tower"}
PROJECTOR_MODULE = "multi_modal_projector"
PROJECTOR_WORDS = ("multi_modal_projector", "merger")
NESTED_CONFIGS = ("text_config", "vision_config")  # sub-configs whose dtype / vocab_size keys follow the top level
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")  # output heads of architectures not listed above
PRE_LAYER_WORDS = ("embed", "patch_conv", "pre_layrnorm", "ln_pre")  # CLIP spells its pre-norm `pre_layrnorm`
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    suffix: str

    def with_index(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.suffix}"


def parse_layer_name(tensor_name: str) -> LayerName | None:
    m = LAYER_PATTERN.match(tensor_name)
    if m is None:
        return None
    return LayerName(m["prefix"], int(m["index"]), m["suffix"])


def head_bias_name(head_name: str) -> str:
    """The bias beside an output head (`lm_head.weight` -> `lm_head.bias`), a row per token like the head's."""
    return head_name.removesuffix("weight") + "bias"


def config_value(config: dict, key: str) -> object:
    """`config[key]`, a dotted key reading nested configs (``text_config.num_hidden_layers``); None if absent."""
    value: object = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True)
class Tower:
    """One layer stack of a vision-language model: the tensors named ``<prefix>.<index>.<rest>``."""

    name: str  # "text" or "vision"
    prefix: str  # e.g. "language_model.model.layers", "visual.blocks"
    num_layers_key: str  # dotted config key
    num_layers: int

    @property
    def module(self) -> str:
        return TOWER_MODULES[self.name]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers_key: str  # dotted for a vision-language model's text decoder: text_config.num_hidden_layers
    num_layers: int
    embedding_name: str | None  # the input embedding
    head_name: str  # the output head; a model without one (tied embeddings) reads the embedding
    residual_writers: tuple[str, ...] = ()  # RESIDUAL_WRITERS; empty where unknown
    towers: tuple[Tower, ...] = ()  # a vision-language model's layer stacks, text first; empty for a plain model
    has_projector: bool = False  # a vision-language model with tensors named by PROJECTOR_WORDS

    @property
    def vocabulary_names(self) -> tuple[str, ...]:
        """The tensors indexed by token, whose rows a tokenizer source maps to the output vocabulary: the input
        embedding, the output head and the head's bias where it has one (`lm_head.bias`: phi, gptj), as mergekit
        0.1.5 gives the input and output embeddings' weights and biases a vocabulary axis."""
        return tuple(n for n in (self.embedding_name, self.head_name, head_bias_name(self.head_name)) if n is not None)

    @property
    def multimodal(self) -> bool:
        return bool(self.towers)

    @property
    def modules(self) -> tuple[str, ...]:
        """The names a `modules:` recipe gives the parts of this model, in planning order."""
        if not self.towers:
            return (DEFAULT_MODULE,)
        return tuple(t.module for t in self.towers) + ((PROJECTOR_MODULE,) if self.has_projector else ())

    def module_of(self, tensor_name: str) -> str:
        """The module a tensor belongs to: a layer's is its tower's, a tensor outside the layers goes by its name."""
        if not self.towers:
            return DEFAULT_MODULE
        if (ln := parse_layer_name(tensor_name)) is not None:
            return next((t.module for t in self.towers if t.prefix == ln.prefix), self.towers[0].module)
        if any(w in tensor_name for w in PROJECTOR_WORDS):
            return PROJECTOR_MODULE
        return TOWER_MODULES["vision" if any(w in tensor_name for w in VISION_PREFIX_WORDS) else "text"]

    def layer_stack(self, module: str) -> tuple[str, int] | None:
        """(config key of the layer count, layers) of a module's layer stack; None for the projector."""
        if not self.towers:
            return self.num_layers_key, self.num_layers
        return next(((t.num_layers_key, t.num_layers) for t in self.towers if t.module == module), None)

    def is_pre_layer(self, tensor_name: str) -> bool:
        """Tensors before the layer stack (embeddings; a vision tower's patch embedding and pre-norm); everything
        else outside the layers (final norm, head) comes after it."""
        if tensor_name == self.head_name:
            return False
        return any(w in tensor_name for w in PRE_LAYER_WORDS) or tensor_name.endswith(("wte.weight", "wpe.weight"))

    def tied_alternative(self, tensor_name: str) -> str | None:
        """The tensor a model with tied embeddings stores instead of `tensor_name`, if any
        (mergekit's `tied_names`)."""
        return self.embedding_name if tensor_name == self.head_name else None


def detect_architecture(config: dict, tensor_names: list[str], model: str) -> Architecture:
    model_type = str(config.get("model_type", "unknown"))
    if isinstance(config.get("text_config"), dict):
        return _detect_multimodal(config, tensor_names, model, model_type)
    known = KNOWN.get(model_type)
    key = known[0] if known else next((k for k in NUM_LAYERS_KEYS if k in config), None)
    if key is None or key not in config:
        raise PlanError(f"{model}: config.json has no layer count (looked for {', '.join(NUM_LAYERS_KEYS)})")
    num_layers = int(config[key])
    indices = {ln.index for n in tensor_names if (ln := parse_layer_name(n)) is not None}
    if not indices:
        raise PlanError(f"{model}: no decoder-layer tensors recognised (expected names like "
                         f"'model.layers.0.self_attn.q_proj.weight'); model_type {model_type!r} is not supported")
    if indices != set(range(num_layers)):
        raise PlanError(f"{model}: config.json says {key}={num_layers} but the weights hold layers "
                         f"{min(indices)}..{max(indices)} ({len(indices)} layers)")
    embedding = known[1] if known else None
    if embedding is None or embedding not in tensor_names:
        embedding = next((n for n in tensor_names if n.endswith(EMBEDDING_SUFFIXES)), None)
    head = known[2] if known else next((n for n in HEAD_NAMES if n in tensor_names), HEAD_NAMES[0])
    return Architecture(model_type, key, num_layers, embedding, head, RESIDUAL_WRITERS.get(model_type, ()))


def _detect_multimodal(config: dict, tensor_names: list[str], model: str, model_type: str) -> Architecture:
    """A config with a nested text_config: one Tower per layer prefix, the text decoder's and the
    vision encoder's, each checked against its config's layer count."""
    by_prefix: dict[str, set[int]] = {}
    for n in tensor_names:
        if (ln := parse_layer_name(n)) is not None:
            by_prefix.setdefault(ln.prefix, set()).add(ln.index)
    towers = []
    for prefix, indices in by_prefix.items():
        name = "vision" if any(w in prefix for w in VISION_PREFIX_WORDS) else "text"
        keys = VISION_LAYERS_KEYS if name == "vision" else TEXT_LAYERS_KEYS
        key = next((k for k in keys if config_value(config, k) is not None), None)
        if key is None:
            raise PlanError(f"{model}: config.json has no layer count for the {name} layers {prefix}.N "
                            f"(looked for {', '.join(keys)}); model_type {model_type!r} is not supported")
        n = int(config_value(config, key))  # type: ignore[call-overload]
        if indices != set(range(n)):
            raise PlanError(f"{model}: config.json says {key}={n} but the weights hold {prefix}."
                            f"{min(indices)}..{max(indices)} ({len(indices)} layers)")
        towers.append(Tower(name, prefix, key, n))
    text = [t for t in towers if t.name == "text"]
    if len(text) != 1 or len([t for t in towers if t.name == "vision"]) > 1:
        found = ", ".join(f"{t.prefix} ({t.name})" for t in towers) or "none"
        raise PlanError(f"{model}: a vision-language model ({model_type!r}) needs one text-decoder layer stack and "
                        f"at most one vision-encoder stack; found {found}")
    towers.sort(key=lambda t: t.name != "text")
    embedding = next((n for n in tensor_names if n.endswith("embed_tokens.weight")), None)
    head = next((n for n in tensor_names if n.endswith("lm_head.weight")), None)
    if head is None:  # tied: the head a transformers save would name, next to the embedding
        head = "language_model.lm_head.weight" if (embedding or "").startswith("language_model.") else "lm_head.weight"
    projector = any(w in n for n in tensor_names if parse_layer_name(n) is None for w in PROJECTOR_WORDS)
    return Architecture(model_type, text[0].num_layers_key, text[0].num_layers, embedding, head, (), tuple(towers),
                        projector)
