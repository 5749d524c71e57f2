"""The search: an explicit CMA-ES ask/tell loop.

Resuming needs no optimizer pickle: CMA-ES is deterministic given its seed and the
fitness values it is told, so a resumed run replays the same generations, taking
the scores of candidates already in history.jsonl instead of scoring them again.
Identical recipes are never scored twice, in one run or across resumes. Each
candidate is appended to the history the moment it finishes, so a kill inside a
generation loses no finished candidate.

Fitness is maximised. With a FitnessRule (evolve/fitness.py: the search file's `fitness:` section) the
search computes each candidate's fitness from its per-task scores, also for candidates replayed from
history.jsonl; without one, the evaluator's fitness stands.
A failed candidate keeps its error in the history and is never the best; CMA-ES is
told a penalty below every successful candidate met so far.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .evaluator import Evaluator, scores_as_completed
from .fitness import FitnessRule
from .genome import SearchGenome, recipe_key
from .record import Candidate
from .scoring import PENALTY, Score
from .storage import Storage

if TYPE_CHECKING:
    import cma

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


class SearchFailed(RuntimeError):
    """Every candidate of the first generation failed: the cause is almost surely not the genome."""


@dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]  # every candidate met in this run (scored now or replayed), first-seen order
    best: Candidate | None  # the best successful candidate; None when none succeeded
    generations: int
    scored: int  # candidates scored by this run (the rest came from history.jsonl)
    stop_reason: str


def default_popsize(dimension: int, workers: int = 1) -> int:
    """CMA-ES's own default population for `dimension` genes (pycma's `4 + 3 * log(N)`), rounded up to a
    multiple of `workers`: a generation's candidates then keep every worker busy to its end (with 9
    candidates on 2 workers, the ninth would run alone while the other worker idles)."""
    own = int(4 + 3 * math.log(max(dimension, 1)))
    return -(-own // max(workers, 1)) * max(workers, 1)


def make_optimizer(genome: SearchGenome, settings: SearchSettings) -> cma.CMAEvolutionStrategy:
    import cma  # here: importing pycma takes ~1 s, which every `mergekit-evolve --help` would pay

    rng = np.random.default_rng(settings.random_seed)  # CMA-ES samples only from this generator
    options: dict[str, Any] = {
        "bounds": [0.0, 1.0], "seed": settings.random_seed + 1, "verbose": -9,
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


def penalty(met: dict[str, Candidate]) -> float:
    """What CMA-ES is told for a failed candidate: below every successful one met so far (fitness may be
    negative without bound once a perplexity enters it negated). Depends only on what was met, so a
    resumed run replays it exactly."""
    ok = [c.score.fitness for c in met.values() if c.score.ok]
    return min(PENALTY, min(ok) - 1.0) if ok else PENALTY


def run_search(genome: SearchGenome, evaluator: Evaluator, storage: Storage, settings: SearchSettings,
               fitness: FitnessRule | None = None) -> SearchResult:
    """Run (or resume) the search until the budget, CMA-ES's own stop, or convergence."""

    def rescored(score: Score) -> Score:
        return fitness.rescore(score) if fitness is not None else score

    known = {c.key: replace(c, score=rescored(c.score)) for c in storage.load_history()}
    spent = len(known)  # evaluations so far, counted against --max-fevals
    next_index = max((c.index for c in known.values()), default=-1) + 1
    seen: dict[str, Candidate] = {}  # candidates met in this run: scored now or replayed from history
    es = make_optimizer(genome, settings)
    bar = tqdm(total=settings.max_fevals, initial=min(spent, settings.max_fevals), desc="search",
               unit="candidate", disable=not settings.progress)
    best: Candidate | None = None
    shown: float | None = None  # the bar's best so far, candidate by candidate
    generation = scored = stalled = 0  # stalled: generations in a row proposing only recipes already met
    reason = "CMA-ES stopped"
    while not es.stop():
        if stalled >= STALL_GENERATIONS:
            reason = f"converged ({STALL_GENERATIONS} generations proposed nothing new)"
            break
        xs = es.ask()
        recipes = [genome.decode(x) for x in xs]
        keys = [recipe_key(r) for r in recipes]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each distinct recipe
        fresh = [k for k in first if k not in seen]
        todo = [k for k in fresh if k not in known]
        if spent + len(todo) > settings.max_fevals:
            reason = f"budget (--max-fevals {settings.max_fevals})"
            break
        t0 = time.perf_counter()
        for j, score in scores_as_completed(evaluator, [recipes[first[k]] for k in todo]):
            k, score = todo[j], rescored(score)
            cand = Candidate(next_index, generation, k, recipes[first[k]], genome.values(xs[first[k]]), score)
            storage.append(cand)  # on disk before the next candidate is handled
            seen[k] = cand
            next_index, spent, scored = next_index + 1, spent + 1, scored + 1
            if score.ok and (shown is None or score.fitness > shown):
                shown = score.fitness
            bar.set_postfix(best="-" if shown is None else f"{shown:.4f}", gen=generation, refresh=False)
            bar.update(1)
        if todo:
            log.info("generation %d: %d candidates in %.1fs", generation, len(todo), time.perf_counter() - t0)
        for k in fresh:
            if k not in seen:  # replayed: take the stored score
                seen[k] = known[k]
        if generation == 0 and not any(c.score.ok for c in seen.values()):
            failed = sorted(seen.values(), key=lambda c: c.index)
            raise SearchFailed(f"all {len(failed)} candidates of the first generation failed, so the search "
                               f"stopped instead of spending the budget; the first error: "
                               f"{(failed[0].score.error or '').splitlines()[0]}")
        stalled = 0 if fresh else stalled + 1
        floor = penalty(seen)
        es.tell(xs, [-(seen[k].score.fitness if seen[k].score.ok else floor) for k in keys])  # CMA-ES minimises
        for c in sorted((seen[k] for k in first), key=lambda c: c.index):  # ties: the earliest scored
            if c.score.ok and (best is None or c.score.fitness > best.score.fitness):
                best = c
        storage.write_state({"generation": generation, "evaluations": spent,
                             "best": best.to_json() if best else None, "sigma": float(es.sigma)})
        shown = best.score.fitness if best else shown
        bar.set_postfix(best="-" if shown is None else f"{shown:.4f}", gen=generation)
        generation += 1
    bar.close()
    return SearchResult(list(seen.values()), best, generation, scored, reason)
