"""Evaluators turn a batch of recipes into Scores.

`CandidateEvaluator` does one candidate in the current process (merge, then score);
`InProcessEvaluator` runs a batch through one of them (used by tests and --num-workers 0);
`evolve.ray_evaluator.RayEvaluator` spreads a batch over Ray actors, each holding its own
CandidateEvaluator. Search code sees only the `Evaluator` protocol, through
`scores_as_completed`: an evaluator that can hand back each score as it finishes
(`evaluate_iter`) gets every finished candidate recorded at once.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from merge_engine.config import MergeConfig, parse_recipe
from merge_engine.options import MergeOptions

from .config import TaskDefinition
from .fitness import FitnessRule
from .materialize import InMemoryMaterializer, LayerPathMaterializer, OnDiskMaterializer
from .scoring import LmEvalScorer, Score

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """`fraction`: score on that fraction of every task's documents (the first ones), for a screening;
    evaluators that never screen may leave it out of their signature."""

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False) -> list[Score]: ...

    def close(self) -> None: ...


def scores_as_completed(evaluator: Evaluator, recipes: list[MergeConfig], validation: bool = False,
                        fraction: float | None = None) -> Iterator[tuple[int, Score]]:
    """(position in `recipes`, score) pairs in order of completion. Evaluators with `evaluate_iter` yield
    each as it finishes; a plain `evaluate` (e.g. a test's synthetic evaluator) yields after the batch."""
    if not recipes:
        return iter(())
    screening = {} if fraction is None else {"fraction": fraction}
    each = getattr(evaluator, "evaluate_iter", None)
    if each is not None:
        return each(recipes, validation, **screening)
    return enumerate(evaluator.evaluate(recipes, validation, **screening))


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to build its own materializer and scorer (picklable)."""

    tasks: list[TaskDefinition]
    reference_model: str
    tokenizer_source: str | None = None
    task_search_path: list[str] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 32
    in_memory: bool = True
    layer_path: bool = False  # candidates change the depth: in memory, each is a model of its own
    vllm: bool = False
    scratch_dir: str = "/tmp/evomerge-scratch"
    # device and random_seed of every candidate merge, the one settings bag the engine knows (run.merge_options)
    merge: MergeOptions = field(default_factory=lambda: MergeOptions(progress=False, write_model_card=False))
    threads: int | None = None
    shuffle: bool = False  # the search file's shuffle / apply_chat_template / fewshot_as_multiturn
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool | None = None


def make_scorer(settings: WorkerSettings) -> LmEvalScorer:
    """Builds the tasks; ValueError naming an unknown task, metric or filter."""
    return LmEvalScorer(settings.tasks, settings.task_search_path, settings.limit, settings.num_fewshot,
                        settings.batch_size, settings.merge.device,
                        shuffle_seed=(settings.merge.random_seed or 0) if settings.shuffle else None,
                        apply_chat_template=settings.apply_chat_template,
                        fewshot_as_multiturn=settings.fewshot_as_multiturn)


class CandidateEvaluator:
    def __init__(self, settings: WorkerSettings, scorer: LmEvalScorer | None = None):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.scorer = scorer or make_scorer(settings)
        m = settings.merge
        if settings.in_memory and not settings.vllm:
            kind = LayerPathMaterializer if settings.layer_path else InMemoryMaterializer
            self.materializer: Any = kind(settings.reference_model, settings.tokenizer_source, m.device,
                                          m.random_seed, m.trust_remote_code, m.allow_crimes)
        else:
            self.materializer = OnDiskMaterializer(settings.scratch_dir, m.device, m.random_seed,
                                                   m.trust_remote_code, m.allow_crimes)
        self._lm = None

    def _lm_for(self, model, tokenizer):
        if isinstance(self.materializer, InMemoryMaterializer):
            if self._lm is None:  # the resident model is updated in place: one HFLM serves every candidate
                self._lm = self.scorer.make_lm(model, tokenizer)
            return self._lm
        return self.scorer.make_lm(model, tokenizer)

    def evaluate_one(self, recipe: MergeConfig | dict, validation: bool = False,
                     fraction: float | None = None) -> Score:
        config = recipe if isinstance(recipe, MergeConfig) else parse_recipe(recipe)
        start = time.perf_counter()
        try:
            if self.settings.vllm:
                path = self.materializer.write(config)
                merge_s = time.perf_counter() - start
                lm = make_vllm(path, self.settings)
            else:
                model, tok = self.materializer.materialize(config)
                merge_s = time.perf_counter() - start
                lm = self._lm_for(model, tok)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a value, not a crash
            log.warning("warning: candidate failed to merge: %s", str(e).strip().split("\n")[0])
            return Score.failed(f"merge failed: {e}", time.perf_counter() - start)
        t1 = time.perf_counter()
        try:
            with torch.no_grad():
                per_task = self.scorer.score(lm, validation=validation, fraction=fraction)
        except Exception as e:  # noqa: BLE001
            log.warning("warning: candidate failed to score: %s", str(e).strip().split("\n")[0])
            return Score.failed(f"scoring failed: {e}\n{traceback.format_exc(limit=3)}", merge_s,
                                time.perf_counter() - t1)
        finally:
            self.materializer.release()
        plain = FitnessRule({t.name: t.weight for t in self.settings.tasks if t.name in per_task},
                            self.scorer.higher_is_better)  # the search applies the search file's rule
        return Score(plain(per_task), per_task, True, None, merge_s, time.perf_counter() - t1)


def make_vllm(path, settings: WorkerSettings):
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as e:
        raise RuntimeError(f"--vllm needs the vllm package ({e}); install it with `pip install vllm`") from None
    return VLLM(pretrained=str(path), batch_size="auto", dtype="auto")


class InProcessEvaluator:
    def __init__(self, settings: WorkerSettings, scorer: LmEvalScorer | None = None):
        self.worker = CandidateEvaluator(settings, scorer)

    def evaluate_iter(self, recipes: list[MergeConfig], validation: bool = False,
                      fraction: float | None = None) -> Iterator[tuple[int, Score]]:
        for i, recipe in enumerate(recipes):
            yield i, self.worker.evaluate_one(recipe, validation, fraction)

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False,
                 fraction: float | None = None) -> list[Score]:
        return [score for _, score in self.evaluate_iter(recipes, validation, fraction)]

    def close(self) -> None:
        pass
