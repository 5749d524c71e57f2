"""Recipe -> candidate model, in memory or on disk.

In memory: one model stays resident; every merged tensor is copied into its
parameters (the input models' tensors are cached after the first candidate), so a
candidate costs the merge arithmetic and nothing else. On disk: the merge is
written with run_merge and loaded back, as a user's final model would be.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from merge_engine.config import MergeConfig
from merge_engine.executor import execute_plan
from merge_engine.io.loader import ModelSource
from merge_engine.merge import run_merge
from merge_engine.options import MergeOptions
from merge_engine.plan import build_plan


class ModelSink:
    """A TensorSink that writes merged tensors into a loaded model's parameters."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        target = self.state.get(name)
        if target is None:
            raise ValueError(f"in-memory merge: the resident model has no tensor {name!r}")
        if target.shape != tensor.shape:
            raise ValueError(f"in-memory merge: {name!r} has shape {tuple(tensor.shape)}, the resident model "
                             f"{tuple(target.shape)} (recipes that change the layer count need --on-disk)")
        with torch.no_grad():
            target.copy_(tensor)


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per candidate would drown the search's own
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


class InMemoryMaterializer:
    def __init__(self, reference_model: str, tokenizer_source: str | None = None, device: str = "cpu",
                 random_seed: int | None = None):
        self.model, self.tokenizer = load_model(reference_model, device)
        if tokenizer_source and tokenizer_source != reference_model:
            _, self.tokenizer = load_model(tokenizer_source, device)
        self.device = device
        self.random_seed = random_seed
        self._sources: dict[str, ModelSource] = {}
        self._sink = ModelSink(self.model)

    def materialize(self, config: MergeConfig) -> tuple[Any, Any]:
        for m in config.referenced_models():
            if m not in self._sources:
                self._sources[m] = ModelSource(m, cache=True)
        plan = build_plan(config, self._sources, self.random_seed)
        execute_plan(plan.jobs, self._sources, self._sink, self.device, progress=False)
        return self.model, self.tokenizer

    def release(self) -> None:
        pass


class OnDiskMaterializer:
    def __init__(self, scratch_dir: str | Path, device: str = "cpu", random_seed: int | None = None):
        self.scratch = Path(scratch_dir)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.random_seed = random_seed
        self._current: Path | None = None

    def write(self, config: MergeConfig) -> Path:
        self.release()
        self._current = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.scratch)) / "model"
        run_merge(config, self._current, MergeOptions(progress=False, random_seed=self.random_seed,
                                                      device=self.device, write_model_card=False))
        return self._current

    def materialize(self, config: MergeConfig) -> tuple[Any, Any]:
        return load_model(self.write(config), self.device)

    def release(self) -> None:
        if self._current is not None:
            shutil.rmtree(self._current.parent, ignore_errors=True)
            self._current = None
