"""evomerge's out-of-core merge engine: recipe -> config -> plan -> per-tensor jobs -> writer."""

from .config import MergeConfig, RecipeError, load_recipe, parse_recipe
from .merge import run_merge
from .options import MergeOptions

__all__ = ["MergeConfig", "MergeOptions", "RecipeError", "load_recipe", "parse_recipe", "run_merge"]
