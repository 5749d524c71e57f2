"""Per-task scores -> one fitness to maximise.

The plain rule is the weighted mean of the tasks' metric values, a lower-is-better metric (perplexity)
entering negated. That mean lets a search trade the harder task for the easier one: +10 points of a
task every source model already does well make up for -10 of the task only one specialist can do.
Two settings in the search file's `fitness:` section protect every task:

- `normalize: true` divides each task's value by a reference: the best score any source model (the
  genome's models and its base) gets on that task, measured once before the search and kept in
  `references.json`. 1.0 then means "as good as the best source model" on every task, whatever the
  task's scale. A lower-is-better metric enters as reference / value, so the same holds.
- `aggregate` combines the (normalized) values: `mean` (weighted), `min` (the worst task; weights
  only say which tasks count), `harmonic` or `geometric` (weighted; both punish one weak task more
  than the mean does and less than `min`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from merge_engine.config import MergeConfig, parse_recipe

from .config import EvolveConfig
from .scoring import Score

Aggregate = Literal["mean", "min", "harmonic", "geometric"]
FLOOR = 1e-6  # harmonic and geometric means of a task value at or below zero


@dataclass(frozen=True)
class FitnessRule:
    weights: dict[str, float]  # task name -> weight (the search file's order)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    aggregate: Aggregate = "mean"
    references: dict[str, float] | None = None  # task -> best source model's value; None: not normalized

    @classmethod
    def of(cls, config: EvolveConfig, higher_is_better: Mapping[str, bool],
           references: Mapping[str, float] | None = None) -> FitnessRule:
        return cls({t.name: t.weight for t in config.tasks}, dict(higher_is_better), config.fitness.aggregate,
                   dict(references) if references is not None else None)

    def task_values(self, per_task: Mapping[str, float]) -> dict[str, float]:
        """Each task's contribution, oriented so that higher is better (and divided by its reference)."""
        out = {}
        for name in self.weights:
            v, up = per_task[name], self.higher_is_better.get(name, True)
            if self.references is None:
                out[name] = v if up else -v
            else:
                ref = self.references[name]
                out[name] = v / ref if up else (ref / v if v > 0 else 0.0)
        return out

    def __call__(self, per_task: Mapping[str, float]) -> float:
        x = self.task_values(per_task)
        w = {k: v for k, v in self.weights.items() if v > 0} or self.weights
        total = sum(w.values()) or 1.0
        if self.aggregate == "min":
            return min(x[k] for k in w)
        if self.aggregate == "harmonic":
            return total / sum(wk / max(x[k], FLOOR) for k, wk in w.items())
        if self.aggregate == "geometric":
            return math.exp(sum(wk * math.log(max(x[k], FLOOR)) for k, wk in w.items()) / total)
        return sum(wk * x[k] for k, wk in w.items()) / total

    def rescore(self, score: Score) -> Score:
        """The score with its fitness computed by this rule (a failed score is returned as it is)."""
        return replace(score, fitness=self(score.per_task)) if score.ok else score

    def describe(self, metrics: Mapping[str, str]) -> str:
        """The plain rule as its formula, e.g. `(1 * evo_addition/acc - 2 * evo_ppl/word_perplexity) / 3` (a
        lower-is-better metric enters negated); any other as e.g. `weighted harmonic mean of
        (evo_addition/acc / 0.94, evo_reversal/acc / 0.81), weights 1, 1`."""
        if self.references is None and self.aggregate == "mean":
            signed = " ".join(f"{'+' if self.higher_is_better.get(name, True) else '-'} {w:g} * {name}/{metrics[name]}"
                              for name, w in self.weights.items())
            return f"({signed.removeprefix('+ ')}) / {sum(self.weights.values()) or 1.0:g}"
        terms = []
        for name in self.weights:
            up = self.higher_is_better.get(name, True)
            term = f"{name}/{metrics[name]}"
            if self.references is not None:
                ref = self.references[name]
                term = f"{term} / {ref:.4g}" if up else f"{ref:.4g} / {term}"
            elif not up:
                term = f"-{term}"
            terms.append(term)
        weights = ", ".join(f"{w:g}" for w in self.weights.values())
        what = {"mean": "weighted mean", "min": "minimum", "harmonic": "weighted harmonic mean",
                "geometric": "weighted geometric mean"}[self.aggregate]
        return f"{what} of ({', '.join(terms)}), weights {weights}"


def pareto_front(per_task: Sequence[Mapping[str, float]], higher_is_better: Mapping[str, bool]) -> list[int]:
    """Positions of the score sets no other one beats on every task (at least as good on all, better on one):
    the trade-offs between tasks a single fitness rule chooses among. Equal score sets: the first stands."""
    oriented = [tuple(v if higher_is_better.get(t, True) else -v for t, v in sorted(s.items())) for s in per_task]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    front = []
    for i, a in enumerate(oriented):
        if not any(dominates(b, a) for b in oriented) and a not in oriented[:i]:
            front.append(i)
    return front


def source_recipes(config: EvolveConfig) -> dict[str, MergeConfig]:
    """Each source model (the genome's models, then its base) alone, as a recipe the evaluator can score."""
    g = config.genome
    models = dict.fromkeys([*g.models, *([g.base_model] if g.base_model else [])])
    return {m: parse_recipe({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}],
                             **({"tokenizer_source": g.tokenizer_source} if g.tokenizer_source else {})},
                            "<source model>") for m in models}


def best_per_task(table: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """Per task, the best value any source model got: the references of `normalize: true`."""
    tasks = next(iter(table.values())).keys()
    pick = {t: max if higher_is_better.get(t, True) else min for t in tasks}
    return {t: pick[t](row[t] for row in table.values()) for t in tasks}


def check_references(references: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> None:
    for task, ref in references.items():
        if ref <= 0:
            best = "best" if higher_is_better.get(task, True) else "lowest"
            raise ValueError(f"fitness.normalize: the {best} source model scores {ref:g} on {task}, so scores cannot "
                             "be divided by it; drop the task, or set fitness.normalize: false")
