"""The one description of a merge method's parameters.

Config validation, the model card and the evolve genome's dimensions and bounds
all derive from a :class:`MethodSpec`; nothing else keeps a list of a method's
parameters.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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

    ``fn(tensors, base, *, generator, **params)`` receives ``tensors``: list of
    same-shape tensors, one per input model (the base model excluded when
    ``uses_base``); ``base``: the base tensor or None; ``generator``: a seeded
    torch.Generator for methods that sample (else None); and every parameter of
    the spec as a keyword (``kwarg_name``): global ones as values, per-model ones
    as one value per tensor. Defaults live here, in the spec, not in ``fn``'s
    signature: call the spec itself to have them filled in.

    Inputs are float32 unless ``streams``: then they come in their stored dtype
    (bfloat16, float16 or float32) and ``fn`` converts one row chunk at a time, so
    no float32 copy of a whole input exists. Either way ``fn`` never modifies its
    inputs and returns float32.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    paper: str
    description: str
    requires_base: bool = False  # base model must be given
    uses_base: bool = True  # base tensor is handed separately, not as a model
    min_models: int = 1  # non-base models
    max_models: int | None = None
    randomized: bool = False
    streams: bool = False  # fn takes inputs as stored (any float dtype) and computes float32 by chunks (chunks.py)

    def __call__(self, tensors: Tensors, base: torch.Tensor | None, *,
                 generator: torch.Generator | None = None, **params: Any) -> torch.Tensor:
        """Run the method with the spec's defaults for the parameters not given
        (per-model defaults repeated for each tensor). Parameter names as in
        recipes or as keywords (``lambda`` or ``lambda_``)."""
        by_kwarg = {kwarg_name(p.name): p.name for p in self.params}
        given = {by_kwarg.get(k, k): v for k, v in params.items()}
        unknown = sorted(set(given) - set(by_kwarg.values()))
        if unknown:
            raise TypeError(f"{self.name} has no parameter(s) {unknown} "
                            f"(it takes: {', '.join(by_kwarg.values())})")
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.name in given:
                value = given[p.name]
            elif p.required:
                raise TypeError(f"{self.name}: parameter {p.name!r} is required")
            else:
                value = [p.default] * len(tensors) if p.scope == "per_model" else p.default
            kwargs[kwarg_name(p.name)] = value
        return self.fn(tensors, base, generator=generator, **kwargs)

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


def require_base(base: torch.Tensor | None, method: str) -> torch.Tensor:
    """The base tensor of a method that cannot work without one."""
    if base is None:
        raise ValueError(f"{method} needs a base model tensor (set base_model)")
    return base


def kwarg_name(name: str) -> str:
    """The keyword a method function takes a recipe parameter by (``lambda`` -> ``lambda_``)."""
    return f"{name}_" if keyword.iskeyword(name) else name


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
                      help="sign-election scratch as int8 (memory only; no effect without sign consensus)")
_RESCALE_HELP = ("rescale what sparsification keeps: by 1/keep probability when sampled (DARE, DELLA), "
                 "to the task vector's L1 norm when trimmed by magnitude (TIES, breadcrumbs)")
RESCALE_TRUE = ParamSpec("rescale", "global", "bool", default=True, help=_RESCALE_HELP)
RESCALE_FALSE = ParamSpec("rescale", "global", "bool", default=False, help=_RESCALE_HELP)
GAMMA = ParamSpec("gamma", "per_model", default=0.01, bounds=(0.0, 1.0),
                  help="fraction of largest-magnitude entries removed as outliers")
EPSILON = ParamSpec("epsilon", "per_model", default=0.15, bounds=(0.0, 1.0),
                    help="spread of keep probabilities around density by magnitude rank")
T = ParamSpec("t", "global", required=True, search=(0.0, 1.0),
              help="interpolation factor: 0 is the base model, 1 the other (outside [0, 1] extrapolates)")
