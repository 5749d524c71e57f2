"""The search needs packages the merge engine does not: the `evolve` extra of pyproject.toml."""

from __future__ import annotations

import importlib.util

# import name -> distribution name, as listed in pyproject.toml's `evolve` extra
EVOLVE_PACKAGES = {"cma": "cma", "lm_eval": "lm-eval", "ray": "ray", "datasets": "datasets",
                   "matplotlib": "matplotlib", "numpy": "numpy", "accelerate": "accelerate"}


def missing_evolve_packages() -> list[str]:
    return [dist for module, dist in EVOLVE_PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_evolve_extra() -> None:
    """Raise ImportError with the install line when the search's packages are not installed."""
    missing = missing_evolve_packages()
    if missing:
        raise ImportError(f"mergekit-evolve needs {', '.join(missing)}, which a plain `pip install evomerge` "
                          "leaves out; install the search's extra: pip install 'evomerge[evolve]'")
