"""The engine's error classes, one per stage; each message names the file, field,
model or tensor at fault and says how to fix it.

All derive from ``ValueError`` (a bad input, not a bug), so a caller can catch
:class:`EngineError` for any of them; ``mergekit-yaml`` turns them into one
``error:`` line and exit status 2.
"""

from __future__ import annotations


class EngineError(ValueError):
    """Base class: a user-fixable problem with a recipe, a model or a merge."""


class RecipeError(EngineError):
    """A recipe that cannot be used; the message lists every problem with its YAML path."""


class ModelLoadError(EngineError):
    """A model directory or weight file that cannot be read."""


class PlanError(EngineError):
    """The recipe is valid but does not fit the models it names (missing tensors, shapes, dtypes)."""


class MergeError(EngineError):
    """A tensor could not be merged (non-finite result, method failure)."""


class TokenizerError(EngineError):
    """The recipe's tokenizer settings do not fit the models (tokenizer.tokens sources, missing rows)."""
