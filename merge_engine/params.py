"""Resolving a parameter for one tensor: precedence levels, filters and gradients,
as mergekit 0.1.5 does (``mergekit/config.py:evaluate_setting``,
``mergekit/parameter_resolver.py``).

- Filters: an entry applies when it has no ``filter``, when its filter is ``"*"``,
  or when the filter is a substring of the tensor name (no other wildcards: mergekit
  matches ``"self_attn*"`` literally, and so do we). The first matching entry wins.
- The tensor name a per-model parameter is matched against is that model's INPUT
  tensor (``model.layers.2...`` when a slice maps its layers 2-3 to output layers
  0-1); a global parameter is matched against the OUTPUT tensor name.
- Precedence: the first level (highest first, :meth:`MergeConfig.parameter_levels`)
  whose value applies to the tensor; a filter list with no matching entry falls
  through to the next level, then to the method's default; a required parameter
  with no value is a :class:`PlanError` naming the tensor and the YAML paths tried.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .config import ConditionalValue, Parameters
from .errors import PlanError
from .methods import ParamSpec

MISSING = object()


def interpolate_gradient(values: Sequence[float], t: float) -> float:
    """Piecewise-linear value of a gradient list at position t in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    scaled = min(max(t, 0.0), 1.0) * (len(values) - 1)
    lo = min(math.floor(scaled), len(values) - 2)
    frac = scaled - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def filter_matches(filter_: str | None, tensor_name: str) -> bool:
    """mergekit's rule: no filter or "*" matches everything, otherwise a substring test."""
    return filter_ is None or filter_ == "*" or filter_ in tensor_name


def evaluate_value(value: Any, tensor_name: str, t: float) -> Any:
    """A scalar as is; a gradient interpolated at t; a filter list's first entry that
    matches tensor_name (MISSING when none does)."""
    if isinstance(value, ConditionalValue):
        value = [value]
    if isinstance(value, list):
        if value and isinstance(value[0], ConditionalValue):
            for cond in value:
                if filter_matches(cond.filter, tensor_name):
                    return evaluate_value(cond.value, tensor_name, t)
            return MISSING
        return interpolate_gradient(value, t)
    return value


def resolve(name: str, tensor_name: str, t: float, levels: Sequence[Parameters | None]) -> Any:
    """The first level (highest precedence first) that defines `name` for this tensor."""
    for params in levels:
        if params and name in params:
            v = evaluate_value(params[name], tensor_name, t)
            if v is not MISSING:
                return v
    return MISSING


def resolve_param(spec: ParamSpec, method: str, tensor_name: str, t: float,
                  levels: Sequence[tuple[str, Parameters]], model: str | None = None,
                  output_name: str | None = None) -> Any:
    """One parameter's value for one tensor (and model, for per-model parameters), or its
    default; a required parameter without a value is an error naming where it was looked for."""
    value = resolve(spec.name, tensor_name, t, [block for _, block in levels])
    if value is not MISSING:
        return value
    if not spec.required:
        return spec.default
    tried = [f"{path}.{spec.name}" for path, block in levels if spec.name in block]
    whose = f" of model {model!r}" if model is not None else ""
    if output_name is not None and output_name != tensor_name:
        whose = f" (input{whose} for output tensor {output_name!r})"
    where = (f"no entry of {', '.join(tried)} matches it (filters are substrings of the tensor name, or '*'); "
             "add a catch-all `- value: ...` entry" if tried else f"set `{spec.name}` in the recipe")
    raise PlanError(f"tensor {tensor_name!r}{whose}: {method} needs parameter {spec.name!r} but {where}")
