"""The search needs packages the merge engine does not: the `evolve` extra of pyproject.toml."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

# the distributions of pyproject.toml's `evolve` extra
EVOLVE_PACKAGES = ("cma", "lm-eval", "ray", "datasets", "matplotlib", "numpy", "accelerate")


def installed(dist: str) -> bool:
    """Whether a distribution is installed (its metadata, not a same-named directory such as /tmp/ray on
    the import path)."""
    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


def missing_evolve_packages() -> list[str]:
    return [dist for dist in EVOLVE_PACKAGES if not installed(dist)]


def require_evolve_extra() -> None:
    """Raise ImportError with the install line when the search's packages are not installed."""
    missing = missing_evolve_packages()
    if missing:
        raise ImportError(f"mergekit-evolve needs {', '.join(missing)}, which a plain `pip install evomerge` "
                          "leaves out; install the search's extra: pip install 'evomerge[evolve]'")
