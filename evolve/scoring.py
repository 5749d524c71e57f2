"""Scoring a candidate model with lm-eval tasks.

Tasks are built once per scorer (task indexing and data loading are not repeated per
candidate); each call runs lm-eval's evaluator on an already-loaded model object.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TaskDefinition

PENALTY = -1.0  # stored fitness of a failed candidate; the search tells CMA-ES something lower still (search.py)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    """What one candidate scored. A failed candidate is a Score too (ok=False, the
    penalty fitness and the error), never None or NaN."""

    fitness: float
    per_task: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    merge_seconds: float = 0.0
    score_seconds: float = 0.0

    @classmethod
    def failed(cls, error: str, merge_seconds: float = 0.0, score_seconds: float = 0.0) -> Score:
        return cls(PENALTY, {}, False, error, merge_seconds, score_seconds)


def reuse_requests(task: Any) -> Any:
    """Build a task's requests once and hand the same ones to every later evaluate() call.

    lm-eval rebuilds every request from the documents on each call (rendering, and compiling anew, a Jinja
    template per document): two thirds of a tiny candidate's scoring time. Documents, prompts and few-shot
    contexts never change between candidates, so only the responses are cleared between calls."""
    build = task.build_all_requests
    built: dict[str, list] = {}

    def build_all_requests(*args: Any, **kwargs: Any) -> None:
        key = repr((args, sorted(kwargs.items())))
        if key not in built:
            build(*args, **kwargs)
            built[key] = task._instances
        for instance in built[key]:
            instance.resps.clear()
            instance.filtered_resps.clear()
        task._instances = built[key]

    task.build_all_requests = build_all_requests
    return task


def shuffle_documents(task: Any, seed: int) -> None:
    """Put every split of a task's dataset in a seeded random order (mergekit shuffles unseeded)."""
    dataset = getattr(task, "dataset", None)
    if dataset is None:
        return
    for split in list(dataset.keys()):
        dataset[split] = dataset[split].shuffle(seed=seed)


def split_metric(metric: str) -> tuple[str, str]:
    """'acc' / 'acc,none' (mergekit's spelling) -> (metric, filter)."""
    name, _, filter_name = metric.partition(",")
    return name.strip(), filter_name.strip() or "none"


class LmEvalScorer:
    """Runs the search's lm-eval tasks on a model object (HF backend) or a path (vLLM)."""

    def __init__(self, tasks: list[TaskDefinition], task_search_path: list[str] | None = None,
                 limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 32,
                 device: str = "cpu", shuffle_seed: int | None = None, apply_chat_template: bool | None = None,
                 fewshot_as_multiturn: bool | None = None):
        import datasets
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        datasets.disable_progress_bars()  # a bar per task and worker would drown the search's own
        self.tasks = tasks
        self.limit = limit
        self.batch_size = batch_size
        self.device = device
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = fewshot_as_multiturn
        paths = [str(Path(p).resolve()) for p in task_search_path or []]
        names = [t.name for t in tasks]
        manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
        if manager is None or not all(n in manager.all_tasks for n in names):
            manager = TaskManager(include_path=paths or None)  # fall back to lm-eval's bundled tasks
        missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            where = ", ".join(paths) or "none given"
            raise ValueError(f"tasks: unknown lm-eval task(s) {', '.join(missing)} (task directories: {where}); "
                             "check the name, or add the task's directory with --task-search-path")
        loaded = manager.load(names)["tasks"]
        self._fitness_tasks = {}
        self._validation_tasks = {}
        self.higher_is_better: dict[str, bool] = {}  # per task, from lm-eval's metric_list for the chosen metric
        for i, t in enumerate(tasks):
            if t.name not in loaded:
                raise ValueError(f"tasks[{i}].name: {t.name!r} is an lm-eval group, not a task; list its tasks "
                                 f"one by one ({', '.join(sorted(loaded)[:8])}, ...)")
            task = loaded[t.name]
            self.higher_is_better[t.name] = metric_direction(task, t.metric, f"tasks[{i}]")
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            if shuffle_seed is not None:  # the search file's `shuffle`: `limit` then takes a seeded random subset
                shuffle_documents(task, shuffle_seed)
            if t.validation_split:
                held_out = copy.deepcopy(task)
                held_out.config.test_split = t.validation_split
                self._validation_tasks[t.name] = reuse_requests(held_out)
            self._fitness_tasks[t.name] = reuse_requests(task)

    def make_lm(self, model: Any, tokenizer: Any):
        from .resident_lm import ResidentLM

        return ResidentLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=self.device)

    def score(self, lm: Any, validation: bool = False, fraction: float | None = None) -> dict[str, float]:
        """Per-task metric values. validation=True uses each task's validation_split
        (tasks without one are skipped); `fraction` scores only that share of the documents (the first
        ones: a screening's documents are a prefix of the full evaluation's)."""
        from lm_eval.evaluator import evaluate

        chosen = self._validation_tasks if validation else self._fitness_tasks
        if not chosen:
            return {}
        task_dict = {"tasks": dict(chosen), "groups": {}, "group_map": {}}
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's per-call progress bars
            chat = self.apply_chat_template
            if chat is None:  # mergekit applies it by default; only tokenizers that have one can
                chat = bool(getattr(getattr(lm, "tokenizer", None), "chat_template", None))
            multiturn = chat if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn
            limit = self.limit if fraction is None else (  # lm-eval reads a limit below 1 as a fraction
                fraction if self.limit is None else max(1, math.ceil(fraction * self.limit)))
            results = evaluate(lm=lm, task_dict=task_dict, limit=limit, log_samples=False,
                               bootstrap_iters=0, verbosity="ERROR", apply_chat_template=chat,
                               fewshot_as_multiturn=multiturn)["results"]
        out = {}
        for t in self.tasks:
            if t.name not in chosen:
                continue
            metrics = results[t.name]
            key = ",".join(split_metric(t.metric))
            if key not in metrics:
                raise ValueError(f"task {t.name!r} has no metric {t.metric!r}; it reports: "
                                 + ", ".join(k for k in metrics if k != "alias"))
            value = float(metrics[key])
            if not math.isfinite(value):
                raise ValueError(f"task {t.name!r}: metric {t.metric!r} is {value}")
            out[t.name] = value
        return out



def metric_direction(task: Any, metric: str, where: str) -> bool:
    """lm-eval's `higher_is_better` for one task's metric; ValueError when the task has no such metric or
    filter (checked before any candidate is scored)."""
    name, filter_name = split_metric(metric)
    directions = task.higher_is_better() or {}
    if name not in directions:
        raise ValueError(f"{where}.metric: task {task.config.task!r} has no metric {name!r}; it reports: "
                         + (", ".join(directions) or "nothing"))
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    if filter_name not in filters:
        raise ValueError(f"{where}.metric: task {task.config.task!r} has no filter {filter_name!r} for "
                         f"{name!r}; its filters: {', '.join(filters)}")
    direction = directions[name]
    return True if direction is None else bool(direction)
