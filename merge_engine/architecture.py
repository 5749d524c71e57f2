"""What a checkpoint's tensors mean: which belong to which decoder layer, which are
the embeddings and the output head, and how many layers the config declares.

Known model types are listed explicitly; anything else falls back to the common
``<prefix>.<layers|h|blocks>.<index>.<rest>`` naming, with a clear error if that fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlanError

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\b(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# model_type -> (config key holding the layer count, input embedding, output head)
KNOWN: dict[str, tuple[str, str, str]] = {
    "llama": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "mistral": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "mixtral": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "qwen2": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "qwen3": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "gemma": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "gemma2": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "gemma3_text": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "phi3": ("num_hidden_layers", "model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("n_layer", "transformer.wte.weight", "lm_head.weight"),
    "gpt_neox": ("num_hidden_layers", "gpt_neox.embed_in.weight", "embed_out.weight"),
}
# model_type -> the tensors of a layer that write into the residual stream (attention output, MLP down
# projection), as tensor-name filters, for pre-norm architectures: scaling the stream before a layer equals
# scaling these of that layer and the later ones by the inverse (evolve/layer_path.py). Post-norm families
# (gemma2/3 normalise after them) and fused experts are left out.
RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), ("self_attn.o_proj", "mlp.down_proj")),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense.", "mlp.dense_4h_to_h"),
}
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")  # output heads of architectures not listed above
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight")


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


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers_key: str
    num_layers: int
    embedding_name: str | None  # the input embedding
    head_name: str  # the output head; a model without one (tied embeddings) reads the embedding
    residual_writers: tuple[str, ...] = ()  # RESIDUAL_WRITERS; empty where unknown

    def is_pre_layer(self, tensor_name: str) -> bool:
        """Tensors before the decoder stack (embeddings); everything else outside the layers
        (final norm, head) comes after it."""
        if tensor_name == self.head_name:
            return False
        return "embed" in tensor_name or tensor_name.endswith(("wte.weight", "wpe.weight"))

    def tied_alternative(self, tensor_name: str) -> str | None:
        """The tensor a model with tied embeddings stores instead of `tensor_name`, if any
        (mergekit's `tied_names`)."""
        return self.embedding_name if tensor_name == self.head_name else None


def detect_architecture(config: dict, tensor_names: list[str], model: str) -> Architecture:
    model_type = str(config.get("model_type", "unknown"))
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
