"""The non-weight files of an output model: config, tokenizer, generation config,
model card and the resolved recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from ..card import render_model_card
from ..config import MergeConfig
from .loader import ModelSource

CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'user' %}{{'### Instruction:\n' + "
               "message['content'] + '\n\n'}}{% elif message['role'] == 'assistant' %}{{'### Response:\n' + "
               "message['content'] + '\n\n'}}{% else %}{{message['content'] + '\n\n'}}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{'### Response:\n'}}{% endif %}"),
}


def write_config(out: Path, reference_config: dict, num_layers_key: str, layer_sources: Sequence[int],
                 out_dtype: str) -> None:
    """The reference model's config.json with the output's layer count (and per-layer
    `layer_types` following the layers each output layer came from) and dtype."""
    cfg = dict(reference_config)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == cfg.get(num_layers_key):
        cfg["layer_types"] = [layer_types[i] for i in layer_sources]
    cfg[num_layers_key] = len(layer_sources)
    cfg["torch_dtype"] = out_dtype
    if "dtype" in cfg:
        cfg["dtype"] = out_dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def tokenizer_source(config: MergeConfig, reference: str) -> str:
    src = config.tokenizer_source_name
    if src == "base":
        return config.base_model or reference
    if src == "union":
        raise ValueError("tokenizer_source: 'union' (vocabulary merging) is not supported; use 'base' or a "
                         "model path")
    if src not in config.referenced_models():
        raise ValueError(f"tokenizer_source: {src!r} is not one of the recipe's models "
                         f"({', '.join(config.referenced_models())})")
    return src


def write_tokenizer(out: Path, source: ModelSource, chat_template: str | None, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - report any tokenizer load failure with the model named
        raise ValueError(f"tokenizer of {source.name!r} could not be loaded: {e}") from None
    if chat_template:
        if chat_template == "auto":
            pass
        elif chat_template in CHAT_TEMPLATES:
            tok.chat_template = CHAT_TEMPLATES[chat_template]
        elif "{%" in chat_template or "{{" in chat_template:
            tok.chat_template = chat_template
        else:
            raise ValueError(f"chat_template: {chat_template!r} is neither a known template "
                             f"({', '.join(CHAT_TEMPLATES)}, auto) nor a Jinja template")
    tok.save_pretrained(str(out))


def copy_generation_config(out: Path, source: ModelSource) -> None:
    gen = source.path / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")


def write_card_and_recipe(out: Path, config: MergeConfig, write_card: bool) -> None:
    (out / "mergekit_config.yml").write_text(config.to_yaml())
    if write_card:
        (out / "README.md").write_text(render_model_card(config))
