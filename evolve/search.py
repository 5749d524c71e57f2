"""The search: an explicit CMA-ES ask/tell loop.

Resuming needs no optimizer pickle: CMA-ES is deterministic given its seed and the
fitness values it is told, so a resumed run replays the same generations, taking
the scores of candidates already in history.jsonl instead of scoring them again.
Identical recipes are never scored twice, in one run or across resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import cma
import numpy as np
from tqdm.auto import tqdm

from merge_engine.config import MergeConfig

from .evaluator import Evaluator
from .genome import Genome, recipe_key
from .scoring import Score
from .storage import Storage

log = logging.getLogger(__name__)
STALL_GENERATIONS = 3


@dataclass(frozen=True)
class SearchSettings:
    max_fevals: int = 100
    sigma0: float = 0.25
    random_init: bool = False
    popsize: int | None = None
    random_seed: int = 0
    progress: bool = True
    timeout: float | None = None  # seconds; no new generation is started after it (cma's `timeout`)


@dataclass
class Candidate:
    key: str
    recipe: MergeConfig
    genome: list[float]
    score: Score
    generation: int

    def record(self, index: int) -> dict[str, Any]:
        return {"index": index, "generation": self.generation, "recipe_hash": self.key, "genome": self.genome,
                "fitness": self.score.fitness, "scores": self.score.per_task, "ok": self.score.ok,
                "error": self.score.error, "merge_seconds": round(self.score.merge_seconds, 4),
                "score_seconds": round(self.score.score_seconds, 4),
                "recipe": self.recipe.model_dump(mode="json", exclude_none=True)}


def make_optimizer(genome: Genome, settings: SearchSettings) -> cma.CMAEvolutionStrategy:
    rng = np.random.default_rng(settings.random_seed)  # CMA-ES samples only from this generator
    options = {"bounds": [0.0, 1.0], "seed": settings.random_seed + 1, "verbose": -9,
               "randn": lambda *shape: rng.standard_normal(shape),
               # the budget ends the search, not a flat fitness landscape (e.g. every candidate scoring 0
               # early on); convergence is detected below as generations that propose nothing new
               "tolflatfitness": 10**9, "tolfun": 0.0, "tolfunhist": 0.0, "tolstagnation": 10**9}
    if settings.popsize:
        options["popsize"] = settings.popsize
    if settings.timeout is not None:
        options["timeout"] = settings.timeout
    x0 = np.random.default_rng([settings.random_seed, 1]).uniform(size=genome.dimension) if settings.random_init \
        else genome.x0()
    return cma.CMAEvolutionStrategy(x0, settings.sigma0, options)


def run_search(genome: Genome, evaluator: Evaluator, storage: Storage, settings: SearchSettings) -> list[Candidate]:
    """Run (or resume) the search; returns every candidate met, in first-seen order."""
    known: dict[str, dict[str, Any]] = {r["recipe_hash"]: r for r in storage.load_history()}
    seen: dict[str, Candidate] = {}  # candidates met in this run: scored now or replayed from history
    next_index = len(known)
    es = make_optimizer(genome, settings)
    bar = tqdm(total=settings.max_fevals, initial=min(next_index, settings.max_fevals), desc="search",
               unit="candidate", disable=not settings.progress)
    best: Candidate | None = None
    generation = 0
    stalled = 0  # consecutive generations proposing only recipes already met: the search has converged
    while not es.stop() and stalled < STALL_GENERATIONS:
        xs = es.ask()
        recipes = [genome.decode(x) for x in xs]
        keys = [recipe_key(r) for r in recipes]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each distinct recipe
        fresh = [k for k in first if k not in seen]
        todo = [k for k in fresh if k not in known]
        if next_index + len(todo) > settings.max_fevals:
            break
        if todo:
            t0 = time.perf_counter()
            scores = evaluator.evaluate([recipes[first[k]] for k in todo])
            log.info("generation %d: %d candidates in %.1fs", generation, len(todo), time.perf_counter() - t0)
            for k, score in zip(todo, scores):
                cand = Candidate(k, recipes[first[k]], genome.values(xs[first[k]]), score, generation)
                storage.append(cand.record(next_index))
                next_index += 1
                seen[k] = cand
            bar.update(len(todo))
        for k in fresh:
            if k not in seen:  # replayed: take the stored score
                rec = known[k]
                score = Score(rec["fitness"], rec["scores"], rec["ok"], rec["error"], rec["merge_seconds"],
                              rec["score_seconds"])
                seen[k] = Candidate(k, recipes[first[k]], genome.values(xs[first[k]]), score, rec["generation"])
        stalled = 0 if fresh else stalled + 1
        fitness = [-seen[k].score.fitness for k in keys]  # CMA-ES minimises
        for k in keys:
            if best is None or seen[k].score.fitness > best.score.fitness:
                best = seen[k]
        es.tell(xs, fitness)
        storage.write_state({"generation": generation, "evaluations": next_index,
                             "best": best.record(-1) if best else None, "sigma": float(es.sigma)})
        bar.set_postfix(best=f"{best.score.fitness:.4f}" if best else "-", gen=generation)
        generation += 1
    bar.close()
    return list(seen.values())
