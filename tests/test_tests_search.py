"""The search's own logic, without models: an Evaluator whose fitness is a quadratic bowl over the genome.

CMA-ES must walk towards the bowl's known optimum, a resumed search must replay the same history, and no
recipe may be scored twice. Each test takes well under a second (no merge, no lm-eval).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from evolve.config import EvolveConfig, GenomeDefinition, TaskDefinition
from evolve.genome import Genome, recipe_key
from evolve.run import _validate_top
from evolve.scoring import Score
from evolve.search import SearchSettings, run_search
from evolve.storage import Storage
from merge_engine.config import MergeConfig

MODELS = ["models/a", "models/b"]  # never opened: the bowl reads the recipe's numbers only
OPTIMUM = np.array([0.2, 0.8, 0.7, 0.3])  # weights of (layers 0-1: a, b), (layers 2-3: a, b)


@pytest.fixture
def tmp_path(tmp_path: Path):
    """Storage in memory where there is a tmpfs: history.jsonl is fsynced after every candidate, and these tests
    are about the search's decisions, not the disk's latency."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="evomerge-test-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bowl_genome() -> Genome:
    definition = GenomeDefinition(models=MODELS, base_model="models/base", merge_method="task_arithmetic",
                                  layer_granularity=2)
    return Genome(definition, num_layers=4)


def recipe_weights(recipe: MergeConfig) -> np.ndarray:
    """The genome's values read back from the recipe, in gene order (group, then model)."""
    per_model = []
    for m in recipe.models or []:
        w = m.parameters["weight"]
        layers = w if isinstance(w, list) else [w] * 4
        per_model.append([layers[0], layers[2]])  # one value per layer group of 2 layers
    return np.array(per_model, dtype=float).T.reshape(-1)


class BowlEvaluator:
    """Fitness = -|weights - OPTIMUM|^2; remembers every recipe it was asked to score."""

    def __init__(self) -> None:
        self.scored: list[str] = []

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False) -> list[Score]:
        self.scored += [recipe_key(r) for r in recipes]
        return [Score(-float(((recipe_weights(r) - OPTIMUM) ** 2).sum()), {"bowl": 0.0}) for r in recipes]

    def close(self) -> None:
        pass


def search(path: Path, max_fevals: int, seed: int = 0, sigma0: float = 0.25,
           evaluator: BowlEvaluator | None = None) -> BowlEvaluator:
    evaluator = evaluator or BowlEvaluator()
    storage = Storage(path)
    path.mkdir(exist_ok=True)
    run_search(bowl_genome(), evaluator, storage,
               SearchSettings(max_fevals=max_fevals, sigma0=sigma0, popsize=6, random_seed=seed, progress=False))
    return evaluator


def history(path: Path) -> list[tuple[str, float]]:
    """(recipe, fitness) of every scored candidate, in scoring order: the search's persistent record."""
    return [(c.key, c.score.fitness) for c in Storage(path).load_history()]


def test_bowl_evaluator_reads_the_genome_back():
    g = bowl_genome()
    x = np.array([0.1, 0.2, 0.3, 0.4])
    assert np.allclose(recipe_weights(g.decode(x)), x)
    assert BowlEvaluator().evaluate([g.decode(OPTIMUM)])[0].fitness == 0.0


def test_cma_es_approaches_the_optimum(tmp_path):
    search(tmp_path, max_fevals=150)
    fitness = [f for _, f in history(tmp_path)]
    start = -float(((bowl_genome().x0() - OPTIMUM) ** 2).sum())  # the middle of the ranges: -0.26
    assert len(fitness) == 150
    assert max(fitness) > -0.002 > start  # within ~0.05 of the optimum in every weight
    first, last = np.mean(fitness[:12]), np.mean(fitness[-12:])
    assert last > first / 10  # the population itself has moved into the bowl, not one lucky sample


def test_resume_replays_the_same_history_and_scores_only_the_rest(tmp_path):
    full = search(tmp_path / "full", max_fevals=60)
    partial = search(tmp_path / "part", max_fevals=24)
    assert history(tmp_path / "part") == history(tmp_path / "full")[:24]
    resumed = search(tmp_path / "part", max_fevals=60)
    assert history(tmp_path / "part") == history(tmp_path / "full")
    assert partial.scored + resumed.scored == full.scored  # the first 24 were replayed from history, not rescored
    search(tmp_path / "other", max_fevals=24, seed=1)
    assert history(tmp_path / "other") != history(tmp_path / "part")[:24]  # the seed matters


def proposed(path: Path, popsize: int = 6) -> int:
    """How many candidates CMA-ES asked for (generations x popsize), duplicates included."""
    return (json.loads((path / "state.json").read_text())["generation"] + 1) * popsize


def test_duplicates_are_never_scored_twice(tmp_path):
    evaluator = search(tmp_path, max_fevals=200, sigma0=3e-5)  # steps below the genome's 4-decimal rounding
    assert proposed(tmp_path) > len(evaluator.scored) + 10  # duplicates were proposed (19) ...
    assert len(evaluator.scored) == len(set(evaluator.scored))  # ... and none was scored twice
    assert [k for k, _ in history(tmp_path)] == evaluator.scored


def test_identical_candidates_are_scored_once_and_the_search_stops(tmp_path):
    evaluator = search(tmp_path, max_fevals=60, sigma0=1e-9)  # every candidate decodes to the middle
    assert evaluator.scored == [recipe_key(bowl_genome().decode(bowl_genome().x0()))]


class LateFirstEvaluator(BowlEvaluator):
    """Hands back held-out scores last-submitted first (as Ray may); the held-out score is the bowl's minus 1."""

    def evaluate_iter(self, recipes: list[MergeConfig], validation: bool = False):
        scores = self.evaluate(recipes, validation)
        for i in reversed(range(len(recipes))):
            yield i, replace(scores[i], fitness=scores[i].fitness - 1.0) if validation else scores[i]


def test_validate_top_shows_a_bar_and_pairs_scores_with_their_candidates(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    result = run_search(bowl_genome(), BowlEvaluator(), Storage(tmp_path),
                        SearchSettings(max_fevals=12, sigma0=0.25, popsize=6, progress=False))
    config = EvolveConfig(genome=bowl_genome().definition,
                          tasks=[TaskDefinition(name="bowl", validation_split="validation")])
    capsys.readouterr()
    validation = _validate_top(result, LateFirstEvaluator(), config, 3, progress=True)
    assert [v.candidate.score.fitness for v in validation] == sorted(
        (c.score.fitness for c in result.candidates), reverse=True)[:3]
    assert all(v.score.fitness == v.candidate.score.fitness - 1.0 for v in validation)
    err = capsys.readouterr().err
    assert "held-out" in err and "3/3" in err
    _validate_top(result, LateFirstEvaluator(), config, 3, progress=False)
    assert capsys.readouterr().err == ""


class ScreenedBowl(BowlEvaluator):
    """The bowl on all documents; a screening (fraction < 1) sees it through noise that depends on the recipe,
    so the screening order and the full order differ. Records (recipe, fraction) of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, float | None]] = []

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False,
                 fraction: float | None = None) -> list[Score]:
        scores = super().evaluate(recipes, validation)
        self.calls += [(recipe_key(r), fraction) for r in recipes]
        if fraction is None:
            return scores
        noise = [int(recipe_key(r)[:8], 16) / 16**8 * 0.2 for r in recipes]
        return [replace(s, fitness=s.fitness + n) for s, n in zip(scores, noise, strict=True)]


def screened_search(path: Path, max_fevals: int) -> tuple[ScreenedBowl, object]:
    evaluator = ScreenedBowl()
    path.mkdir(exist_ok=True)
    result = run_search(bowl_genome(), evaluator, Storage(path), SearchSettings(
        max_fevals=max_fevals, sigma0=0.25, popsize=6, random_seed=0, progress=False, screen=0.25))
    return evaluator, result


def test_screening_promotes_the_better_half_and_costs_its_fraction(tmp_path):
    evaluator, result = screened_search(tmp_path, max_fevals=30)  # a generation: 6 x 0.25 + 3 = 4.5 evaluations
    records = Storage(tmp_path).load_history()
    assert result.generations == 6 and result.spent == pytest.approx(27.0)
    assert sum(c.fidelity for c in records) == pytest.approx(27.0)
    for g in range(result.generations):
        screens = [c for c in records if c.generation == g and c.fidelity == 0.25]
        full = [c for c in records if c.generation == g and c.fidelity == 1.0]
        better_half = sorted(screens, key=lambda c: -c.score.fitness)[:3]
        assert len(screens) == 6 and {c.key for c in full} == {c.key for c in better_half}
        assert all(c.score.fitness < s.score.fitness for c in full for s in screens if s.key == c.key)  # no noise
    assert sorted(c.key for c in result.candidates) == sorted(c.key for c in records if c.fidelity == 1.0)
    assert len(result.screened_out) == 18 and result.best is not None and result.best.fidelity == 1.0
    assert result.best.score.fitness == max(c.score.fitness for c in records if c.fidelity == 1.0)
    assert [f for _, f in evaluator.calls].count(0.25) == 36 and [f for _, f in evaluator.calls].count(None) == 18


def test_screened_search_resumes_to_the_same_history(tmp_path):
    def trail(path: Path) -> list[tuple[str, float, float]]:
        return [(c.key, c.score.fitness, c.fidelity) for c in Storage(path).load_history()]

    full, _ = screened_search(tmp_path / "full", max_fevals=45)
    part, _ = screened_search(tmp_path / "part", max_fevals=18)
    assert trail(tmp_path / "part") == trail(tmp_path / "full")[:len(trail(tmp_path / "part"))]
    # killed after a generation's screenings, before its promoted half was scored in full
    history_file = tmp_path / "part" / "history.jsonl"
    lines = history_file.read_text().splitlines(keepends=True)
    history_file.write_text("".join(lines[:-3]))
    resumed, _ = screened_search(tmp_path / "part", max_fevals=45)
    assert trail(tmp_path / "part") == trail(tmp_path / "full")
    assert len(part.calls) - 3 + len(resumed.calls) == len(full.calls)  # only the cut records scored again


def test_cma_es_is_told_the_promoted_half_above_the_screened_out():
    from evolve.record import Candidate
    from evolve.search import told

    def cand(key: str, fitness: float, fidelity: float, ok: bool = True) -> Candidate:
        recipe = bowl_genome().decode(bowl_genome().x0())
        return Candidate(0, 0, key, recipe, [], Score(fitness, {}, ok), fidelity)

    full = {"a": cand("a", 0.10, 1.0), "b": cand("b", 0.30, 1.0)}
    screens = {k: cand(k, f, 0.25) for k, f in (("a", 0.2), ("b", 0.4), ("c", 0.9), ("d", 0.5))}
    screens["e"] = cand("e", -1.0, 0.25, ok=False)
    values = dict(zip("abcde", told(list("abcde"), full, screens, floor=-5.0), strict=True))
    assert (values["a"], values["b"]) == (0.10, 0.30)  # full scores as they are
    assert values["b"] > values["a"] > values["c"] > values["d"] > values["e"]  # screened out: below, in order
    assert told(list("ab"), full, screens, floor=-5.0) == [0.10, 0.30]
