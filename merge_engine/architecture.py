"""What a checkpoint's tensors mean: which belong to which decoder layer, which are
the embeddings, and how many layers the config declares.

Known model types are listed explicitly; anything else falls back to the common
``<prefix>.<layers|h|blocks>.<index>.<rest>`` naming, with a clear error if that fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\b(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# model_type -> (config key holding the layer count, embedding tensor, tied by default)
KNOWN: dict[str, tuple[str, str, bool]] = {
    "llama": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "mistral": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "mixtral": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "qwen2": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "qwen3": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "gemma": ("num_hidden_layers", "model.embed_tokens.weight", True),
    "gemma2": ("num_hidden_layers", "model.embed_tokens.weight", True),
    "gemma3_text": ("num_hidden_layers", "model.embed_tokens.weight", True),
    "phi3": ("num_hidden_layers", "model.embed_tokens.weight", False),
    "gpt2": ("n_layer", "transformer.wte.weight", True),
    "gpt_neox": ("num_hidden_layers", "gpt_neox.embed_in.weight", False),
}
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


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
    embedding_name: str | None
    tied_embeddings: bool

    def is_pre_layer(self, tensor_name: str) -> bool:
        """Tensors before the decoder stack (embeddings): gradient position t = 0."""
        if tensor_name in LM_HEAD_NAMES:
            return False
        return "embed" in tensor_name or tensor_name.endswith(("wte.weight", "wpe.weight"))


def detect_architecture(config: dict, tensor_names: list[str], model: str) -> Architecture:
    model_type = str(config.get("model_type", "unknown"))
    key, embedding, tied_default = KNOWN.get(model_type, (None, None, False))
    if key is None:
        key = next((k for k in NUM_LAYERS_KEYS if k in config), None)
    if key is None or key not in config:
        raise ValueError(f"{model}: config.json has no layer count (looked for {', '.join(NUM_LAYERS_KEYS)})")
    num_layers = int(config[key])
    indices = {ln.index for n in tensor_names if (ln := parse_layer_name(n)) is not None}
    if not indices:
        raise ValueError(f"{model}: no decoder-layer tensors recognised (expected names like "
                         f"'model.layers.0.self_attn.q_proj.weight'); model_type {model_type!r} is not supported")
    if indices != set(range(num_layers)):
        raise ValueError(f"{model}: config.json says {key}={num_layers} but the weights hold layers "
                         f"{min(indices)}..{max(indices)} ({len(indices)} layers)")
    if embedding is None or embedding not in tensor_names:
        embedding = next((n for n in tensor_names if n.endswith(("embed_tokens.weight", "wte.weight",
                                                                   "embed_in.weight"))), None)
    tied = bool(config.get("tie_word_embeddings", tied_default))
    return Architecture(model_type, key, num_layers, embedding, tied)
