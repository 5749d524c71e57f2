"""The one description of a merge method's parameters.

Config validation, the model card and the evolve genome's dimensions and bounds
all derive from a :class:`MethodSpec`; nothing else keeps a list of a method's
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

Tensors = Sequence[torch.Tensor]  # one tensor per merged model, all the same shape
Floats = Sequence[float]  # one value per merged model
ParamScope = Literal["per_model", "global"]
ParamKind = Literal["float", "bool", "int", "str"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method, as it appears in a recipe."""

    name: str
    scope: ParamScope
    kind: ParamKind = "float"
    default: float | bool | int | str | None = None
    required: bool = False
    bounds: tuple[float, float] | None = None  # inclusive valid range, checked in recipes
    search: tuple[float, float] | None = None  # evolve makes genes for it within this range
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its pure tensor function and the parameters it takes.

    ``fn(tensors, base, params, per_model, generator)`` receives
    ``tensors``: list of same-shape tensors, one per input model (the base model
    excluded when ``uses_base``); ``base``: the base tensor or None;
    ``params``: resolved global parameters; ``per_model``: one dict of resolved
    per-model parameters for each tensor; ``generator``: a seeded torch.Generator
    for methods that sample.
    """

    name: str
    fn: Callable[..., "object"]
    params: tuple[ParamSpec, ...]
    paper: str
    description: str
    requires_base: bool = False  # base model must be given
    uses_base: bool = True  # base tensor is handed separately, not as a model
    min_models: int = 1  # non-base models
    max_models: int | None = None
    randomized: bool = False
    aliases: tuple[str, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "per_model")

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")


# Shared parameter definitions: methods compose these instead of re-declaring.
WEIGHT = ParamSpec("weight", "per_model", default=1.0, search=(0.0, 1.0),
                   help="scale of this model's contribution")
WEIGHT_REQUIRED = ParamSpec("weight", "per_model", required=True, search=(0.0, 1.0),
                            help="scale of this model's task vector")
DENSITY = ParamSpec("density", "per_model", default=1.0, bounds=(0.0, 1.0), search=(0.05, 1.0),
                    help="fraction of the task vector kept")
NORMALIZE_TRUE = ParamSpec("normalize", "global", "bool", default=True,
                           help="divide by the sum of weights")
NORMALIZE_FALSE = ParamSpec("normalize", "global", "bool", default=False,
                            help="divide by the sum of weights")
LAMBDA = ParamSpec("lambda", "global", default=1.0,
                   help="scale of the merged task vector")
INT8_MASK = ParamSpec("int8_mask", "global", "bool", default=False,
                      help="store sign masks as int8 (memory only; results are identical)")
RESCALE_TRUE = ParamSpec("rescale", "global", "bool", default=True,
                         help="divide kept entries by their keep probability")
GAMMA = ParamSpec("gamma", "per_model", default=0.01, bounds=(0.0, 1.0),
                  help="fraction of largest-magnitude entries removed as outliers")
EPSILON = ParamSpec("epsilon", "per_model", default=0.15, bounds=(0.0, 1.0),
                    help="spread of keep probabilities around density by magnitude rank")
T = ParamSpec("t", "global", required=True, bounds=(0.0, 1.0), search=(0.0, 1.0),
              help="interpolation factor: 0 is the base model, 1 the other")
