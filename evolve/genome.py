"""Genome <-> recipe. A genome is a vector in [0, 1]^d; its genes and their ranges come
from the merge method's spec (parameters with a `search` range), so no second list
of a method's parameters exists here.

Layout: for each layer group, for each filter (then the catch-all), the searchable
per-model parameters of every merged model, then the searchable global parameters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from merge_engine.architecture import Architecture, detect_architecture, parse_layer_name
from merge_engine.config import MergeConfig, parse_recipe
from merge_engine.io.references import open_model
from merge_engine.methods import MethodSpec, ParamSpec, get_method
from merge_engine.params import filter_matches

from .config import GenomeDefinition

DECIMALS = 4


@dataclass(frozen=True)
class Gene:
    group: int  # layer group
    filter: str | None  # tensor-name filter, None = catch-all
    param: str
    model: str | None  # None for global parameters
    low: float
    high: float


def gene_values(genes: tuple[Gene, ...], x: np.ndarray) -> list[float]:
    """A vector in [0, 1]^d (clipped) as each gene's value in its range, rounded to DECIMALS."""
    x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
    return [round(float(g.low + xi * (g.high - g.low)), DECIMALS) for g, xi in zip(genes, x, strict=True)]


class SearchGenome(Protocol):
    """What the search needs of a genome: this module's parameter-space Genome, or layer_path's."""

    genes: tuple[Gene, ...]

    @property
    def dimension(self) -> int: ...

    def summary(self) -> str: ...

    def x0(self) -> np.ndarray: ...

    def values(self, x: np.ndarray) -> list[float]: ...

    def decode(self, x: np.ndarray) -> MergeConfig: ...


def text_only(arch: Architecture, ref: str) -> Architecture:
    """A search scores causal language models (lm-eval through AutoModelForCausalLM): a vision-language model
    (mergekit-yaml merges those with `models:` recipes) is refused before anything runs."""
    if arch.multimodal:
        raise ValueError(f"genome: {ref!r} is a vision-language model ({arch.model_type!r}); mergekit-evolve "
                         "searches causal language models only: merge it with a mergekit-yaml `models:` recipe")
    return arch


class Genome:
    """`outside_filters`: the filters that match only tensors outside the layers (embeddings, output head, final
    norm). The merge reads one value for those (at gradient position 0), so each gets one gene per model rather
    than one per layer group, which would leave all but the first group's genes without effect."""

    def __init__(self, definition: GenomeDefinition, num_layers: int, outside_filters: Collection[str] = ()):
        self.definition = definition
        self.outside_filters = frozenset(outside_filters)
        self.spec: MethodSpec = get_method(definition.merge_method)
        self.num_layers = num_layers
        gran = definition.layer_granularity or num_layers
        if num_layers % gran:
            raise ValueError(f"genome.layer_granularity: {gran} does not divide the models' {num_layers} layers")
        self.num_groups = num_layers // gran
        self.merged_models = [m for m in definition.models
                              if not (self.spec.uses_base and m == definition.base_model)]
        filters: list[str | None] = [*definition.filters, None]
        genes = []
        for g in range(self.num_groups):
            for f in filters:
                if g > 0 and f in self.outside_filters:
                    continue
                for model in self.merged_models:
                    for p in self.spec.per_model_params:
                        if p.search:
                            genes.append(Gene(g, f, p.name, model, *self._range(p)))
                for p in self.spec.global_params:
                    if p.search:
                        genes.append(Gene(g, f, p.name, None, *self._range(p)))
        self.genes: tuple[Gene, ...] = tuple(genes)

    @classmethod
    def for_models(cls, definition: GenomeDefinition) -> Genome:
        ref = definition.base_model or definition.models[0]
        source = open_model(ref)
        names = source.tensor_names()
        arch = text_only(detect_architecture(source.config, names, ref), ref)
        outside = [f for f in definition.filters if any(filter_matches(f, n) for n in names)
                   and not any(filter_matches(f, n) for n in names if parse_layer_name(n) is not None)]
        return cls(definition, arch.num_layers, outside)

    def _range(self, p: ParamSpec) -> tuple[float, float]:
        assert p.search is not None  # genes are made only for parameters with a search range
        if p.name in self.definition.ranges:
            return self.definition.ranges[p.name]
        low, high = p.search
        if p.name == "weight" and self.definition.allow_negative_weights:
            low = -high
        return low, high

    @property
    def dimension(self) -> int:
        return len(self.genes)

    def summary(self) -> str:
        return f"{self.dimension} genes ({self.num_groups} layer group(s))"

    def x0(self) -> np.ndarray:
        return np.full(self.dimension, 0.5)

    def values(self, x: np.ndarray) -> list[float]:
        return gene_values(self.genes, x)

    def _layer_values(self, per_group: list[float]) -> list[float] | float:
        if len(set(per_group)) == 1:
            return per_group[0]
        if self.definition.smooth:
            return per_group  # a gradient interpolated across the layers
        size = self.num_layers // self.num_groups
        return [per_group[i // size] for i in range(self.num_layers)]  # one value per layer

    def decode(self, x: np.ndarray) -> MergeConfig:
        values = self.values(x)
        table: dict[tuple[str | None, str, str | None], list[float]] = {}
        for gene, v in zip(self.genes, values, strict=True):
            groups = 1 if gene.filter in self.outside_filters else self.num_groups
            table.setdefault((gene.model, gene.param, gene.filter), [0.0] * groups)[gene.group] = v

        def setting(model: str | None, param: str) -> Any:
            entries = [(f, self._layer_values(table[(model, param, f)]))
                       for f in [*self.definition.filters, None] if (model, param, f) in table]
            if len(entries) == 1:
                return entries[0][1]
            return [({"filter": f, "value": v} if f is not None else {"value": v}) for f, v in entries]

        models = []
        for m in self.definition.models:
            params = {p.name: setting(m, p.name) for p in self.spec.per_model_params
                      if (m, p.name, None) in table}
            models.append({"model": m, **({"parameters": params} if params else {})})
        global_params = {p.name: setting(None, p.name) for p in self.spec.global_params
                         if (None, p.name, None) in table}
        if self.definition.normalize is not None and self.spec.param("normalize"):
            global_params["normalize"] = self.definition.normalize
        recipe: dict[str, Any] = {"merge_method": self.spec.name, "models": models}
        if self.definition.base_model:
            recipe["base_model"] = self.definition.base_model
        if global_params:
            recipe["parameters"] = global_params
        if self.definition.tokenizer_source:
            recipe["tokenizer_source"] = self.definition.tokenizer_source
        return parse_recipe(recipe, "<genome>")


def recipe_key(config: MergeConfig) -> str:
    """Identity of a candidate: identical recipes are never scored twice."""
    canonical = json.dumps(config.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
