"""The search definition (mergekit-evolve's YAML schema), validated at the edge."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from merge_engine.config import RecipeError, invalid, read_yaml, validation_lines
from merge_engine.methods import REGISTRY, get_method
from merge_engine.reference import normalize_reference

# Test sets that searches must not optimise on unless the user insists (--allow-benchmark-test-sets).
PUBLIC_BENCHMARKS = ("mmlu", "mmlu_pro", "hellaswag", "arc_challenge", "arc_easy", "gsm8k", "truthfulqa",
                     "winogrande", "piqa", "boolq", "lambada", "humaneval", "mbpp", "bbh", "gpqa", "ifeval",
                     "minerva_math", "hendrycks_math", "musr", "openbookqa", "sciq", "race", "drop", "triviaqa",
                     "nq_open", "squad", "leaderboard", "agieval", "medqa", "logiqa")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenomeDefinition(_Frozen):
    """Parameter-space genome (mergekit-evolve's): a merge method's numbers per layer group and model."""

    kind: Literal["parameters"] = "parameters"
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(default=0, ge=0)  # layers per gene group; 0 = one group for all layers
    normalize: bool | None = None
    allow_negative_weights: bool = False
    smooth: bool = False
    filters: list[str] = Field(default_factory=list)  # mergekit writes `filters: null` for none
    # evomerge's: a searched parameter's range, overriding the method's (e.g. task_arithmetic weights over [0, 2],
    # whose middle, where the search starts, is the usual weight 1); mergekit has no such field
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @field_validator("models", mode="before")
    @classmethod
    def _references(cls, v):  # strings, or mergekit's structured {model: {path: ...}, lora: ...} references
        return [normalize_reference(m) for m in v] if isinstance(v, list) else v

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_reference(cls, v):
        return normalize_reference(v)

    @field_validator("filters", mode="before")
    @classmethod
    def _no_filters(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def _method_fits(self) -> GenomeDefinition:
        spec = get_method(self.merge_method)
        merged = [m for m in self.models if not (spec.uses_base and m == self.base_model)]
        if spec.requires_base and not self.base_model:
            raise ValueError(f"genome.base_model: {spec.name} needs a base_model")
        if len(merged) < spec.min_models or (spec.max_models is not None and len(merged) > spec.max_models):
            raise ValueError(f"genome.models: {spec.name} merges {spec.min_models}"
                             f"{'' if spec.max_models is None else '..' + str(spec.max_models)} model(s) besides "
                             f"the base, got {len(merged)}")
        if not any(p.search for p in spec.params):
            raise ValueError(f"genome.merge_method: {spec.name} has no searchable parameters; searchable methods: "
                             + ", ".join(sorted(n for n, s in REGISTRY.items() if any(p.search for p in s.params))))
        searched = [p.name for p in spec.params if p.search]
        for name, (low, high) in self.ranges.items():
            p = spec.param(name)
            if p is None or not p.search:
                raise ValueError(f"genome.ranges.{name}: {spec.name} searches {', '.join(searched)}, not {name!r}")
            valid = p.bounds or (-math.inf, math.inf)
            if not valid[0] <= low < high <= valid[1]:
                raise ValueError(f"genome.ranges.{name}: [{low}, {high}] must be an increasing pair"
                                 + (f" within {name}'s valid range [{valid[0]}, {valid[1]}]" if p.bounds else ""))
        return self


RECIPE_SUFFIXES = (".yml", ".yaml")


def is_recipe(model: str) -> bool:
    """A layer-path source given as a merge recipe (hybrid search): built before the search."""
    return model.endswith(RECIPE_SUFFIXES)


class LayerPathDefinition(_Frozen):
    """Layer-path genome (evomerge's; evolve/layer_path.py documents the encoding): which layer of which
    source model comes next, and how the hidden state is rescaled where the path jumps."""

    kind: Literal["layer_path"]
    models: list[str] = Field(min_length=1)  # model references, or recipe files (.yml) built first (hybrid)
    repeats: int = Field(default=2, ge=1)  # the layers of all models are laid out in sequence this many times
    min_layers: int | None = Field(default=None, ge=1)  # output depth bounds; default: 1 .. every position
    max_layers: int | None = Field(default=None, ge=1)
    scales: Literal["transition", "layer", "none"] = "transition"
    scale_range: tuple[float, float] = (0.5, 1.5)
    # scales rounded to multiples of this (0: continuous); 0.05 explored ~40% more distinct paths per 100
    # evaluations on the demo's validation split than continuous scales (bench/results/layer_path.md)
    scale_step: float = Field(default=0.05, ge=0.0)
    tokenizer_source: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _references(cls, v):
        return [m if isinstance(m, str) and is_recipe(m) else normalize_reference(m) for m in v] \
            if isinstance(v, list) else v

    @property
    def base_model(self) -> None:
        """A layer path has no base model (what the parameter-space genome's code reads)."""
        return None

    def recipes(self) -> list[str]:
        return [m for m in self.models if is_recipe(m)]

    @model_validator(mode="after")
    def _bounds(self) -> LayerPathDefinition:
        low, high = self.scale_range
        if not (0 < low <= 1 <= high):
            raise ValueError(f"genome.scale_range: {list(self.scale_range)} must hold 1.0 with a positive lower "
                             "end, e.g. [0.5, 1.5]")
        if self.min_layers and self.max_layers and self.min_layers > self.max_layers:
            raise ValueError(f"genome.min_layers {self.min_layers} is above genome.max_layers {self.max_layers}")
        return self


GENOME_KINDS = ("parameters", "layer_path")


def _genome_kind(v: Any) -> str:
    return str(v.get("kind", "parameters") if isinstance(v, dict) else getattr(v, "kind", "parameters"))


AnyGenome = Annotated[Annotated[GenomeDefinition, Tag("parameters")] | Annotated[LayerPathDefinition,
                                                                                  Tag("layer_path")],
                      Discriminator(_genome_kind)]


class TaskDefinition(_Frozen):
    name: str
    weight: float = 1.0
    metric: str = "acc"  # lm-eval's "acc,none" works too
    validation_split: str | None = None  # re-score the top candidates on this held-out split

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, v):  # mergekit accepts `- task_name` for {name: task_name}
        return {"name": v} if isinstance(v, str) else v


class FitnessDefinition(_Frozen):
    """How per-task scores become one fitness (evolve/fitness.py explains the choices)."""

    aggregate: Literal["mean", "min", "harmonic", "geometric"] = "mean"
    normalize: bool = False  # divide each task's score by the best source model's score on that task


class EvolveConfig(_Frozen):
    genome: AnyGenome
    tasks: list[TaskDefinition] = Field(min_length=1)
    fitness: FitnessDefinition = FitnessDefinition()  # evomerge's; mergekit has no such field
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    random_init: bool = False  # start CMA-ES from a random genome (seeded) instead of the middle of the ranges
    shuffle: bool = False  # shuffle each task's documents (seeded by --random-seed) before `limit` takes the first
    # None: apply the tokenizer's chat template when it has one (mergekit's default true, without failing on
    # base models that have none); true: always (an error for tokenizers without one); false: never
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template; needs the chat template

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> EvolveConfig:
        if self.fewshot_as_multiturn and self.apply_chat_template is False:
            raise ValueError("fewshot_as_multiturn: true needs the chat template; remove apply_chat_template: false "
                             "or set fewshot_as_multiturn: false")
        return self

    def public_benchmarks(self) -> list[str]:
        return [t.name for t in self.tasks
                if any(t.name == b or t.name.startswith(b + "_") for b in PUBLIC_BENCHMARKS)]


def load_search(path: str | Path) -> EvolveConfig:
    path = Path(path)
    data = read_yaml(path, "search")
    try:
        return EvolveConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(invalid(str(path), "search definition", validation_lines(e, _without_kind))) from None


def _without_kind(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """genome.parameters.layer_granularity -> genome.layer_granularity (the union's tag is not a field)."""
    return loc[:1] + loc[2:] if loc[:1] == ("genome",) and len(loc) > 1 and loc[1] in GENOME_KINDS else loc
