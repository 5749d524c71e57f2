"""The installed evomerge version, read from the package metadata (pyproject.toml is the one place it is set)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def evomerge_version() -> str:
    try:
        return version("evomerge")
    except PackageNotFoundError:  # running from a source tree that was never pip-installed
        return "unknown (not installed; pip install -e .)"
