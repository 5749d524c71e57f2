"""mergekit-moe's YAML schema (mergekit 0.1.5's MoEMergeConfig) and the checks that need no model.

    base_model: path/to/base            # attention, norms, embeddings and the hidden states of `hidden` gates
    gate_mode: hidden                   # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
    dtype: bfloat16                     # of every output tensor (default: the base's config dtype)
    experts_per_token: 2                # num_experts_per_tok of the output
    architecture: mixtral               # mixtral | qwen | qwen3 (| deepseek: refused): a prefix of the output's name
    experts:
      - source_model: path/to/expert    # its MLP becomes expert 0 of every layer
        positive_prompts: ["..."]       # what the router should send to it (not needed by random gates)
        negative_prompts: ["..."]       # optional: subtracted
        noise_scale: 0.01               # optional: gaussian noise added to its MLP weights
        residual_scale: 1.0             # optional: multiplies its down projection
    shared_experts: [...]               # Qwen2-MoE only: exactly one, same fields

Every problem found is reported together, each with its YAML path (experts[1].positive_prompts).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..config import read_yaml, validation_lines
from ..dtypes import parse_recipe_dtype
from ..errors import RecipeError
from ..reference import normalize_reference

# gate_mode -> what the router weights of each layer are (merge_engine/moe/router.py)
GATE_MODES: dict[str, str] = {
    "hidden": "the base model's hidden state entering the layer at the last token of each positive prompt, "
              "averaged over the prompts, minus the negative prompts', normalised",
    "hidden_last": "the same as hidden",
    "hidden_avg": "as hidden, with the hidden states averaged over the prompt's tokens instead of the last one",
    "cheap_embed": "the sum of the base's input embeddings of the prompts' tokens, normalised, minus the negative "
                   "prompts', normalised; the same for every layer (no forward pass)",
    "random": "standard normal, seeded by --random-seed (default 0)",
    "uniform_random": "uniform in [-1/sqrt(hidden), 1/sqrt(hidden)] (torch.nn.Linear's initialisation), seeded",
}
PROMPT_MODES = frozenset(GATE_MODES) - {"random", "uniform_random"}
HIDDEN_MODES = frozenset({"hidden", "hidden_avg", "hidden_last"})


class Expert(BaseModel):
    """One model whose MLP becomes an expert of every layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    _reference = field_validator("source_model", mode="before")(normalize_reference)

    @field_validator("noise_scale")
    @classmethod
    def _non_negative(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"must be a number >= 0, got {v}")
        return v

    def prompt_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    """A mergekit-moe recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    _reference = field_validator("base_model", mode="before")(normalize_reference)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        return None if v is None else parse_recipe_dtype(v)

    @field_validator("gate_mode")
    @classmethod
    def _known_gate_mode(cls, v: str) -> str:
        if v not in GATE_MODES:
            close = difflib.get_close_matches(v, GATE_MODES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown gate_mode {v!r}; {hint}available: {', '.join(GATE_MODES)}")
        return v

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts, then shared ones: the rows of the gate tensor."""
        return [*self.experts, *(self.shared_experts or [])]

    def problems(self, allow_all_same: bool = False) -> list[str]:
        """What makes the recipe unusable before any model is opened (mergekit's is_bad_config, and more)."""
        out = []
        if not self.experts:
            out.append("experts: empty; list at least one expert (source_model: ...)")
        if self.experts_per_token < 1:
            out.append(f"experts_per_token: {self.experts_per_token}; must be at least 1")
        elif self.experts and self.experts_per_token > len(self.experts):
            out.append(f"experts_per_token: {self.experts_per_token} but only {len(self.experts)} expert(s); "
                       f"use experts_per_token <= {len(self.experts)} or add experts")
        if self.gate_mode in PROMPT_MODES:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    out.append(f"experts[{i}].positive_prompts: required by gate_mode {self.gate_mode} (prompts "
                               "that should be routed to this expert); or use gate_mode: random")
            shared = self.shared_experts or []
            for i, e in enumerate(shared):
                if not e.positive_prompts:
                    out.append(f"shared_experts[{i}].positive_prompts: required by gate_mode {self.gate_mode} (the "
                               "shared expert's gate is computed from them); or use gate_mode: random")
            if len(self.experts) > 1 and all(e.positive_prompts for e in self.experts):
                first = self.experts[0].prompt_key()
                if all(e.prompt_key() == first for e in self.experts[1:]):
                    out.append("experts[*].positive_prompts: identical for every expert, so every router row is "
                               "the same and routing is arbitrary; give each expert prompts of what it should get")
        for where, experts in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
            for i, e in enumerate(experts):
                for field in ("positive_prompts", "negative_prompts"):
                    prompts = getattr(e, field) or []
                    if any(not p for p in prompts):
                        out.append(f"{where}[{i}].{field}: holds an empty prompt; remove it")
        if not allow_all_same and len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            out.append("experts[*].source_model: every expert is the same model, so the output computes the same "
                       "as the dense model with more memory; pass --i-understand-this-is-not-useful-without-training "
                       "if you will train it")
        return out


def parse_moe_config(data: Any, source: str = "<moe config>", allow_all_same: bool = False) -> MoEConfig:
    """The validated recipe; RecipeError listing every problem, on one line, with its YAML path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a mergekit-moe config must be a YAML mapping, got {type(data).__name__}")
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: " + "; ".join(validation_lines(e))) from None
    problems = config.problems(allow_all_same)
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))
    return config


def load_moe_config(path: str | Path, allow_all_same: bool = False) -> MoEConfig:
    path = Path(path)
    return parse_moe_config(read_yaml(path, "mergekit-moe config"), str(path), allow_all_same)
