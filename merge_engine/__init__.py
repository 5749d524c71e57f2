"""evomerge's out-of-core merge engine: recipe -> config -> plan -> per-tensor jobs -> writer."""

import os

# OpenMP threads that wait for work sleep instead of spinning. Set before torch is first imported (OpenMP reads
# it when torch loads it), so it reaches the commands and the search's Ray workers, which inherit it; a value
# already in the environment wins. On a busy machine spinning made each 2-thread op cost a scheduler time slice
# (a merge 3-6x slower); on an idle one passive waiting measured no slower (README, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import MergeConfig, RecipeError, load_recipe, parse_recipe  # noqa: E402
from .merge import run_merge  # noqa: E402
from .options import MergeOptions  # noqa: E402

__all__ = ["MergeConfig", "MergeOptions", "RecipeError", "load_recipe", "parse_recipe", "run_merge"]
