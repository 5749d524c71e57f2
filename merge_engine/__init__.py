"""evomerge's out-of-core merge engine: recipe -> config -> plan -> per-tensor jobs -> writer."""

import os

# OpenMP threads that wait for work sleep instead of spinning. Set before torch is first imported (OpenMP reads
# it when torch loads it), so it reaches the commands and the search's Ray workers, which inherit it; a value
# already in the environment wins. On a busy machine spinning made each 2-thread op cost a scheduler time slice
# (a merge 3-6x slower); on an idle one passive waiting measured no slower (README, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy (imported by torch) starts an OpenBLAS thread per core that spins a while on start-up; nothing here
# uses numpy's BLAS (torch has its own), and without the pool `import merge_engine.cli` measured ~0.1 s faster
# on the 2-core bench machine. Same rule as above: set before the first import, a value already set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .config import MergeConfig, RecipeError, load_recipe, parse_recipe  # noqa: E402
from .merge import run_merge  # noqa: E402
from .options import MergeOptions  # noqa: E402

__all__ = ["MergeConfig", "MergeOptions", "RecipeError", "load_recipe", "parse_recipe", "run_merge"]
