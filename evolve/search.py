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

Screening (`screen`, successive halving with one rung): each new candidate of a generation is first
scored on that fraction of every task's documents (the first ones); the better half, by that score,
is then scored on all of them. CMA-ES ranks the promoted half by their full scores above the rest by
their screening scores; only fully scored candidates can be the best. Each screening is a history
record of its own (`fidelity` < 1), so a resumed run replays the same promotions. The budget counts
documents: a screening costs its fraction of an evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
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

    from merge_engine.config import MergeConfig

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
    screen: float | None = None  # fraction of the documents a new candidate is first scored on (module docstring)


class SearchFailed(RuntimeError):
    """Every candidate of the first generation failed: the cause is almost surely not the genome."""


@dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]  # every fully scored candidate met in this run (scored now or replayed)
    best: Candidate | None  # the best successful candidate; None when none succeeded
    generations: int
    scored: int  # evaluations run by this run, screenings included (the rest came from history.jsonl)
    stop_reason: str
    screened_out: list[Candidate] = field(default_factory=list)  # screenings of candidates never promoted
    spent: float = 0.0  # the budget used, in full evaluations (a screening counts its fraction)


def default_popsize(dimension: int) -> int:
    """CMA-ES's own default population for `dimension` genes (pycma's `4 + 3 * log(N)`). Rounding it to a
    multiple of the workers (no worker idle at a generation's end) searched worse within 100 evaluations
    (README, "Search quality on two task pairs"), so a worker may idle for a generation's last candidate."""
    return int(4 + 3 * math.log(max(dimension, 1)))


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


def promotions(screened: int) -> int:
    """How many of a generation's `screened` candidates are scored in full: the better half, rounded up."""
    return math.ceil(screened / 2)


def promoted(screened: list[Candidate]) -> set[str]:
    """The better half of a generation's screenings, ties to the earlier; failures never."""
    ranked = sorted((c for c in screened if c.score.ok), key=lambda c: -c.score.fitness)
    return {c.key for c in ranked[:promotions(len(screened))]}


def generation_cost(fresh: int, screen: float | None, to_screen: int | None = None,
                    to_score: int | None = None) -> float:
    """Most budget a generation of `fresh` new candidates can take. Without screening, each not yet scored
    (`to_score`, default all) costs one evaluation; with it, each not yet screened (`to_screen`) costs
    `screen`, and the promoted half at most one evaluation each (never more than `to_score`)."""
    to_score = fresh if to_score is None else to_score
    if screen is None:
        return float(to_score)
    return (fresh if to_screen is None else to_screen) * screen + min(to_score, promotions(fresh))


def run_search(genome: SearchGenome, evaluator: Evaluator, storage: Storage, settings: SearchSettings,
               fitness: FitnessRule | None = None) -> SearchResult:
    """Run (or resume) the search until the budget, CMA-ES's own stop, or convergence."""

    def rescored(score: Score) -> Score:
        return fitness.rescore(score) if fitness is not None else score

    history = [replace(c, score=rescored(c.score)) for c in storage.load_history()]
    known = {c.key: c for c in history if c.fidelity == 1.0}
    known_screens = {c.key: c for c in history if c.fidelity < 1.0}
    spent = sum(c.fidelity for c in history)  # counted against --max-fevals, in full evaluations
    next_index = max((c.index for c in history), default=-1) + 1
    seen: dict[str, Candidate] = {}  # fully scored candidates met in this run: scored now or replayed
    screens: dict[str, Candidate] = {}  # screenings met in this run
    es = make_optimizer(genome, settings)
    bar = tqdm(total=settings.max_fevals, initial=min(round(spent, 6), settings.max_fevals), desc="search",
               unit="evaluation", disable=not settings.progress)
    best: Candidate | None = None
    shown: float | None = None  # the bar's best so far, candidate by candidate
    generation = scored = stalled = 0  # stalled: generations in a row proposing only recipes already met
    reason = "CMA-ES stopped"

    def score(keys: list[str], recipes: dict[str, MergeConfig], genomes: dict[str, list[float]],
              fidelity: float, replay: dict[str, Candidate], met: dict[str, Candidate]) -> None:
        """Score `keys` at `fidelity` into `met`, each recorded the moment it finishes; those in `replay`
        (history.jsonl) are taken from there."""
        nonlocal next_index, spent, scored, shown
        todo = [k for k in keys if k not in replay]
        fraction = None if fidelity == 1.0 else fidelity
        for j, result in scores_as_completed(evaluator, [recipes[k] for k in todo], fraction=fraction):
            k, result = todo[j], rescored(result)
            cand = Candidate(next_index, generation, k, recipes[k], genomes[k], result, fidelity)
            storage.append(cand)  # on disk before the next candidate is handled
            met[k] = cand
            next_index, spent, scored = next_index + 1, spent + fidelity, scored + 1
            if fidelity == 1.0 and result.ok and (shown is None or result.fitness > shown):
                shown = result.fitness
            bar.set_postfix(best="-" if shown is None else f"{shown:.4f}", gen=generation, refresh=False)
            bar.update(1 if fidelity == 1.0 else fidelity)
        for k in keys:
            if k not in met:
                met[k] = replay[k]

    while not es.stop():
        if stalled >= STALL_GENERATIONS:
            reason = f"converged ({STALL_GENERATIONS} generations proposed nothing new)"
            break
        xs = es.ask()
        decoded = [genome.decode(x) for x in xs]
        keys = [recipe_key(r) for r in decoded]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each distinct recipe
        recipes = {k: decoded[i] for k, i in first.items()}
        genomes = {k: genome.values(xs[i]) for k, i in first.items()}
        fresh = [k for k in first if k not in seen and k not in screens]
        cost = generation_cost(len(fresh), settings.screen,  # replayed scores are free
                               to_screen=len([k for k in fresh if k not in known_screens]),
                               to_score=len([k for k in fresh if k not in known]))
        if spent + cost > settings.max_fevals + 1e-9:
            reason = f"budget (--max-fevals {settings.max_fevals})"
            break
        t0 = time.perf_counter()
        if settings.screen is None:
            score(fresh, recipes, genomes, 1.0, known, seen)
        else:
            score(fresh, recipes, genomes, settings.screen, known_screens, screens)
            chosen = promoted([screens[k] for k in fresh])
            score([k for k in fresh if k in chosen], recipes, genomes, 1.0, known, seen)
        if fresh:
            log.info("generation %d: %d candidates in %.1fs", generation, len(fresh), time.perf_counter() - t0)
        met = {**screens, **seen}  # a key's full score, where it has one, over its screening
        if generation == 0 and not any(c.score.ok for c in met.values()):
            failed = sorted(met.values(), key=lambda c: c.index)
            raise SearchFailed(f"all {len(failed)} candidates of the first generation failed, so the search "
                               f"stopped instead of spending the budget; the first error: "
                               f"{(failed[0].score.error or '').splitlines()[0]}")
        stalled = 0 if fresh else stalled + 1
        es.tell(xs, [-v for v in told(keys, seen, screens, penalty(met))])  # CMA-ES minimises
        for c in sorted((seen[k] for k in first if k in seen), key=lambda c: c.index):  # ties: the earliest
            if c.score.ok and (best is None or c.score.fitness > best.score.fitness):
                best = c
        storage.write_state({"generation": generation, "evaluations": round(spent, 6),
                             "best": best.to_json() if best else None, "sigma": float(es.sigma)})
        shown = best.score.fitness if best else shown
        bar.set_postfix(best="-" if shown is None else f"{shown:.4f}", gen=generation)
        generation += 1
    bar.close()
    out = [c for c in screens.values() if c.key not in seen]
    return SearchResult(list(seen.values()), best, generation, scored, reason, out, spent)


def told(keys: list[str], full: dict[str, Candidate], screens: dict[str, Candidate], floor: float) -> list[float]:
    """Fitness per proposal as CMA-ES ranks it: full scores, then screened-out candidates below every
    fully scored one of the generation (in the order of their screening scores), failures at `floor`."""
    def value(c: Candidate) -> float:
        return c.score.fitness if c.score.ok else floor

    ranked = [value(full[k]) for k in keys if k in full]
    screened = [value(screens[k]) for k in keys if k not in full]
    shift = max(0.0, max(screened) - min(ranked) + 1e-6) if ranked and screened else 0.0
    return [value(full[k]) if k in full else value(screens[k]) - shift for k in keys]
