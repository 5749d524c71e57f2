from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base Llama, two fine-tune-like variants, and tiny models of other architectures."""
    from factory import make_model  # here, not at the top: under xdist the controller loads this file too and
    # would spend seconds importing torch and transformers that only the workers use

    root = tmp_path_factory.mktemp("zoo")
    z = {"base": make_model(root / "base", "llama", seed=0, layers=4)}
    z["a"] = make_model(root / "a", base=z["base"], seed=1)
    z["b"] = make_model(root / "b", base=z["base"], seed=2)
    for arch in ("mistral", "qwen2", "gpt2", "gpt_neox"):
        z[arch] = make_model(root / arch, arch, seed=3)
        z[f"{arch}_ft"] = make_model(root / f"{arch}_ft", base=z[arch], seed=4)
    z["tied"] = make_model(root / "tied", "llama", seed=5, tie=True)
    z["tied_ft"] = make_model(root / "tied_ft", base=z["tied"], seed=6)
    return z


@pytest.fixture(scope="session")
def specialists(tmp_path_factory) -> dict[str, Path]:
    """A base and two specialists trained (seconds) to answer the first 8 fitness documents of evo_addition
    and evo_reversal: models whose scores differ at limit=8 (the random zoo scores 0 on both tasks)."""
    from factory import make_specialists

    return make_specialists(tmp_path_factory.mktemp("specialists"))


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores (not all of them: N workers with N
    threads each only add contention on small tensors). Tests that set torch's threads themselves still do."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
