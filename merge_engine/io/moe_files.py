"""The non-weight files of a mergekit-moe output: config.json, the base's generation config and tokenizer,
the recipe as written (mergekit_moe_config.yml, mergekit's name) and a short model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..card import hub_ids
from ..tokenizer import TOKENIZER_FILES, OutputTokenizer, write_tokenizer
from .artifacts import copy_generation_config
from .loader import ModelSource

RECIPE = "mergekit_moe_config.yml"
CARD = "README.md"
OUTPUT_FILES = ("config.json", "generation_config.json", RECIPE, CARD, "model.safetensors.index.json")


def output_names(base: ModelSource, shard_names: list[str], copy_tokenizer: bool) -> list[str]:
    """Every file name the output may have (for the collision check before writing)."""
    tokenizer = [f for f in TOKENIZER_FILES if (base.path / f).is_file()] if copy_tokenizer else []
    return [*shard_names, *OUTPUT_FILES, *tokenizer]


def write_moe_files(out: Path, config: Any, base: ModelSource, recipe_text: str, copy_tokenizer: bool,
                    card: str | None) -> None:
    """config (a transformers config) as config.json, the base's generation_config.json and tokenizer files
    (byte for byte), the recipe text, and README.md unless card is None."""
    config.to_json_file(str(out / "config.json"))  # as save_pretrained writes it (mergekit)
    copy_generation_config(out, base)
    if copy_tokenizer:
        write_tokenizer(out, OutputTokenizer(base.path, models=(base.path,)), None)
    (out / RECIPE).write_text(recipe_text)
    if card is not None:
        (out / CARD).write_text(card, encoding="utf-8")


def model_card(base_model: str, experts: list[str], architecture: str, gate_mode: str, recipe_text: str) -> str:
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["mergekit", "evomerge", "moe", "merge"]}
    ids = [m for m in hub_ids([base_model, *experts]) if not Path(m).expanduser().is_dir()]  # zoo/a may be local
    if ids:
        front = {"base_model": ids, **front}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {architecture} mixture of experts",
             "", f"Assembled by evomerge's `mergekit-moe` from the dense model `{base_model}` (attention, norms, "
             f"embeddings) and {len(experts)} experts (their MLPs), with `{gate_mode}` router weights. It is "
             "untrained: the routers only know the prompts below.", "", "Experts:", ""]
    lines += [f"- `{e}`" for e in experts]
    lines += ["", "## Configuration", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
