"""The non-weight files of an output model: config, generation config, model card and the
resolved recipe (the tokenizer: merge_engine/tokenizer.py), and the built-in chat templates."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..architecture import NESTED_CONFIGS
from ..card import render_model_card
from ..config import MergeConfig
from .chat_templates import CHAT_TEMPLATES
from .loader import ModelSource


def output_config(reference_config: dict, layer_sources: Sequence[tuple[str, Sequence[int]]], out_dtype: str,
                  vocab_size: int | None = None) -> dict:
    """The reference model's config with the output's layer counts (and per-layer `layer_types`
    following the layers each output layer came from), dtype and, when the vocabulary was aligned,
    vocabulary size. `layer_sources`: per layer stack (MergePlan.layer_sources), the config key of its
    layer count, dotted for a nested config (``text_config.num_hidden_layers``, ``vision_config.depth``),
    and the reference layer of each output layer. The dtype and vocabulary size keys a nested text/vision
    config holds are set too."""
    cfg = copy.deepcopy(reference_config)  # nested configs are edited
    for num_layers_key, sources in layer_sources:
        *parents, leaf = num_layers_key.split(".")
        layers_cfg = cfg
        for part in parents:
            layers_cfg = layers_cfg[part]
        layer_types = layers_cfg.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == layers_cfg.get(leaf):
            layers_cfg["layer_types"] = [layer_types[i] for i in sources]
        layers_cfg[leaf] = len(sources)
    nested = [c for k in NESTED_CONFIGS if isinstance(c := cfg.get(k), dict)]
    if vocab_size is not None:
        for c in (cfg, cfg.get("text_config") or {}):
            if "vocab_size" in c:
                c["vocab_size"] = vocab_size
    # the key(s) the input config uses; transformers >= 4.56 reads `dtype`
    for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]:
        cfg[key] = out_dtype
    for c in nested:
        for key in ("torch_dtype", "dtype"):
            if key in c and c[key] is not None:
                c[key] = out_dtype
    return cfg


def write_config(out: Path, reference_config: dict, layer_sources: Sequence[tuple[str, Sequence[int]]],
                 out_dtype: str, vocab_size: int | None = None) -> None:
    """config.json of the output model (output_config)."""
    cfg = output_config(reference_config, layer_sources, out_dtype, vocab_size)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def resolve_chat_template(chat_template: str | None) -> str | None:
    """The Jinja template a recipe's `chat_template` names; None (or `auto`, resolved by the caller) keeps
    the tokenizer's own."""
    if not chat_template or chat_template == "auto":
        return None
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    raise ValueError(f"chat_template: {chat_template!r} is neither a known template "
                     f"({', '.join(CHAT_TEMPLATES)}, auto) nor a Jinja template")


def copy_generation_config(out: Path, source: ModelSource) -> None:
    gen = source.path / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")


# a vision-language model's image / video preprocessing, copied from the reference model when present whether or not
# the tokenizer is (mergekit's `tagalong_files`); chat_template.json goes with the tokenizer (TOKENIZER_FILES)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_processor_files(out: Path, source: ModelSource) -> None:
    for name in PROCESSOR_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)


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
