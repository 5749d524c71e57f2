"""The merge-method registry: one explicit table, one way to look a method up."""

from __future__ import annotations

import difflib

from . import fusion, linear, ram, sce, spherical, task_arithmetic
from .spec import MethodSpec, ParamSpec

REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for module in (linear, task_arithmetic, spherical, sce, fusion, ram)
    for spec in module.SPECS
}


def get_method(name: str) -> MethodSpec:
    """Look a method up by its recipe name; unknown names get suggestions."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"unknown merge_method {name!r}: {hint}available: {', '.join(sorted(REGISTRY))}"
        ) from None


__all__ = ["REGISTRY", "MethodSpec", "ParamSpec", "get_method"]
