"""The non-weight files of an output model: config, tokenizer, generation config,
model card and the resolved recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..card import render_model_card
from ..config import MergeConfig
from .chat_templates import CHAT_TEMPLATES
from .loader import ModelSource


def write_config(out: Path, config_json: dict, out_dtype: str | None) -> None:
    cfg = dict(config_json)
    if out_dtype:
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


RESOLVED_RECIPE = "mergekit_config.resolved.yml"


def write_card_and_recipe(out: Path, config: MergeConfig, write_card: bool, recipe_text: str | None = None,
                          card_extra: str | None = None) -> None:
    """mergekit_config.yml: the recipe text as written when there is one (comments kept), else the resolved
    recipe; when the text means something other than its resolved form (aliases, defaults filled in), the
    resolved form goes beside it in mergekit_config.resolved.yml."""
    resolved = config.to_yaml()
    if recipe_text is None:
        (out / "mergekit_config.yml").write_text(resolved)
    else:
        (out / "mergekit_config.yml").write_text(recipe_text)
        if yaml.safe_load(recipe_text) != yaml.safe_load(resolved):
            (out / RESOLVED_RECIPE).write_text(
                "# the recipe of mergekit_config.yml as evomerge resolved it (aliases and defaults spelled out)\n"
                + resolved)
    if write_card:
        (out / "README.md").write_text(render_model_card(config, recipe_text, card_extra))
