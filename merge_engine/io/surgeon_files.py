"""The non-weight files of a mergekit-tokensurgeon output: config.json and generation_config.json with the
donor's vocabulary size and special token ids, the donor's tokenizer, and a short model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..card import hub_ids
from ..tokenizer import TOKENIZER_FILES, OutputTokenizer, write_tokenizer

# config keys that name tokens of the vocabulary (mergekit's list): they follow the donor
TOKEN_ID_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id", "padding_side")
GENERATION_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
OUTPUT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "README.md")


def read_json_or_none(path: Path) -> Any:
    """The JSON in `path`; None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    data = read_json_or_none(path)
    return data if isinstance(data, dict) else {}


def output_config(model_config: dict, donor_config: dict, vocab_size: int) -> dict:
    """The model's config with the new vocab_size and the donor's special token ids (a key the donor lacks
    becomes null: the model's id would name another token of the new vocabulary)."""
    cfg = dict(model_config)
    text = cfg.get("text_config")
    if "vocab_size" in cfg or not isinstance(text, dict):
        cfg["vocab_size"] = vocab_size
    else:  # multimodal configs keep the language model's settings in text_config
        cfg["text_config"] = {**text, "vocab_size": vocab_size}
    for key in TOKEN_ID_KEYS:
        if key in cfg or key in donor_config:
            cfg[key] = donor_config.get(key)
    return cfg


def write_outputs(out: Path, model_path: Path, donor_path: Path, config: dict, card: str | None) -> None:
    """config.json, generation_config.json (the model's, with the donor's token ids), the donor's tokenizer
    files and README.md (unless card is None)."""
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = read_json(model_path / "generation_config.json")
    donor_gen = read_json(donor_path / "generation_config.json")
    for key in GENERATION_TOKEN_KEYS:
        value = donor_gen.get(key, config.get(key))
        if key in gen or value is not None:
            gen[key] = value
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(out, OutputTokenizer(donor_path, models=(donor_path,)), None)
    if card is not None:
        (out / "README.md").write_text(card)


def output_names(donor_path: Path) -> list[str]:
    """Every file name the output may have (for the collision check before writing)."""
    return list(OUTPUT_FILES) + [f for f in TOKENIZER_FILES if (donor_path / f).is_file()]


def model_card(model: str, donor: str, summary: str) -> str:
    front = {"library_name": "transformers", "tags": ["mergekit", "evomerge", "tokensurgeon"]}
    if hub_ids([model]):
        front = {"base_model": hub_ids([model]), **front}
    return "\n".join(["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {Path(model).name} "
                      f"with the tokenizer of {Path(donor).name}", "",
                      f"`{model}` with the tokenizer of `{donor}`, transplanted by evomerge's "
                      "`mergekit-tokensurgeon`: rows of tokens the two vocabularies share are the model's own, "
                      "the others are approximated from them.", "", summary, ""])
