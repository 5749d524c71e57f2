"""report.md: what a finished search leaves behind for a person (the pictures are in pictures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import TYPE_CHECKING, Any

from .config import EvolveConfig
from .fitness import FitnessRule, pareto_front
from .search import default_popsize

if TYPE_CHECKING:
    from .run import Validation
    from .search import SearchResult


def resolved_settings(settings: dict[str, Any], dimension: int) -> dict[str, Any]:
    """The run settings as they took effect: a popsize left to CMA-ES is its default for this many genes."""
    out = dict(settings)
    if out.get("popsize") is None:
        out["popsize"] = default_popsize(dimension)  # as the search used it
    return out


def render_report(result: SearchResult, validation: list[Validation], config: EvolveConfig,
                  higher_is_better: dict[str, bool], settings: dict[str, Any], rule: FitnessRule | None = None,
                  exported: bool = True, pictures: Sequence[str] = ("fitness.png", "genome_heatmap.png",
                                                                     "gene_spread.png")) -> str:
    candidates = result.candidates
    ok = [c for c in candidates if c.score.ok]
    best = result.best
    lines = ["# Merge search report", "",
             f"- evaluations: {len(candidates)} ({len(candidates) - len(ok)} failed), {result.generations} "
             f"generations; stopped by {result.stop_reason}",
             "- fitness (maximised): " + (rule or FitnessRule.of(config, higher_is_better)).describe(
                 {t.name: t.metric for t in config.tasks})]
    if result.screened_out or settings.get("screen"):
        screened = len(result.screened_out) + len(candidates)
        lines.append(f"- screening: {screened} candidates scored first on {settings.get('screen'):g} of the documents, "
                     f"{len(candidates)} of them then on all (the better half of each generation); budget used "
                     f"{result.spent:.1f} evaluations, {screened - result.spent:.1f} fewer than scoring each in full")
    if higher_is_better:
        lines.append("- metric directions (from lm-eval's higher_is_better): " + ", ".join(
            f"{t.name}/{t.metric} {'higher' if higher_is_better.get(t.name, True) else 'lower'} is better"
            for t in config.tasks))
    if best is None:
        lines.append("- best: none (no candidate merged and scored; see the `error` field in history.jsonl)")
    else:
        lines += [f"- best fitness: {best.score.fitness:.4f} (evaluation {best.index}, generation {best.generation})",
                  "- best per-task: " + ", ".join(f"{k} {v:.4f}" for k, v in best.score.per_task.items())]
    lines.append("- settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None))
    if ok:
        lines += [f"- mean time to merge: {mean(c.score.merge_seconds for c in ok):.3f}s, "
                  f"to score: {mean(c.score.score_seconds for c in ok):.3f}s per candidate"]
    if len(config.tasks) > 1 and ok:
        lines += ["", *trade_offs(ok, config, higher_is_better)]
    if validation:
        lines += ["", "## Held-out validation of the top candidates", "",
                  "Re-scored on each task's `validation_split` from the search file (a split the fitness never "
                  "saw).", "",
                  "| evaluation | fitness | validation | gap (fitness - validation) |", "|---|---|---|---|"]
        for v in validation:
            fit = v.candidate.score.fitness
            if v.score.ok:
                lines.append(f"| {v.candidate.index} | {fit:.4f} | {v.score.fitness:.4f} | "
                             f"{fit - v.score.fitness:+.4f} |")
            else:
                lines.append(f"| {v.candidate.index} | {fit:.4f} | failed | - |")
    if best is not None:
        files = ["`best_config.yaml` (run it with `mergekit-yaml best_config.yaml OUT`)"]
        files += ["`best_model/` (with a model card describing this search)"] if exported else []
        files += ["`history.jsonl`", "`evolve.log`", "`report.html` (this report with the pictures and a sortable "
                  "history)", *(f"`{p}`" for p in pictures)]
        lines += ["", "Files: " + ", ".join(files) + ".", ""]
    return "\n".join(lines)


def trade_offs(ok: Sequence[Any], config: EvolveConfig, higher_is_better: dict[str, bool],
               rows: int = 12) -> list[str]:
    """The Pareto front of the tasks: candidates no other beats on every task, best fitness first."""
    front = [ok[i] for i in pareto_front([c.score.per_task for c in ok], higher_is_better)]
    front.sort(key=lambda c: -c.score.fitness)
    names = [t.name for t in config.tasks]
    lines = ["## Trade-offs between the tasks (Pareto front)", "",
             f"{len(front)} candidate(s) that no other candidate beats on every task"
             + (f"; the {rows} fittest shown" if len(front) > rows else "")
             + ". Another trade-off than the fitness rule's: take that evaluation's recipe from history.jsonl.", "",
             "| evaluation | fitness | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for c in front[:rows]:
        lines.append(f"| {c.index} | {c.score.fitness:.4f} | "
                     + " | ".join(f"{c.score.per_task[n]:.4f}" for n in names) + " |")
    return lines
