"""Resolving a parameter for one tensor: precedence levels, filters and gradients."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .config import ConditionalValue, Parameters

MISSING = object()


def interpolate_gradient(values: Sequence[float], t: float) -> float:
    """Piecewise-linear value of a gradient list at position t in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    scaled = min(max(t, 0.0), 1.0) * (len(values) - 1)
    lo = min(int(math.floor(scaled)), len(values) - 2)
    frac = scaled - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def evaluate_value(value: Any, tensor_name: str, t: float) -> Any:
    """A scalar as is; a gradient interpolated at t; a filter list's first entry whose
    filter is a substring of tensor_name (an entry without filter matches all)."""
    if isinstance(value, list):
        if value and isinstance(value[0], ConditionalValue):
            for cond in value:
                if cond.filter is None or cond.filter in tensor_name:
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
