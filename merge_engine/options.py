"""Run options of a merge (what the CLI flags set), separate from the recipe."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator


class MergeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "cpu"
    copy_tokenizer: bool = True
    out_shard_size: int = 5 * 1000**3
    allow_crimes: bool = False
    trust_remote_code: bool = False
    random_seed: int | None = None
    lazy_unpickle: bool = False
    allow_pickle: bool = False
    write_model_card: bool = True
    progress: bool = True
    # provenance for the output, not arithmetic: the recipe as the user wrote it (kept verbatim, comments
    # included, in mergekit_config.yml and the card) and markdown appended to the model card
    recipe_text: str | None = None
    card_extra: str | None = None

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _parse_size(cls, v):
        return parse_size(v) if isinstance(v, str) else v


def parse_size(text: str) -> int:
    """'5B' / '500M' / '2G' / '1024' -> bytes (decimal units, as mergekit)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGbBtT]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use a number with an optional K, M, G or B suffix")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}[m[2].lower()]
    return int(float(m[1]) * scale)
