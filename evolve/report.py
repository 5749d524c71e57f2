"""What a finished search leaves behind for a person: a plot and a short report."""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import EvolveConfig  # noqa: E402
from .record import Candidate  # noqa: E402

if TYPE_CHECKING:
    from .run import Validation
    from .search import SearchResult


def plot_fitness(candidates: list[Candidate], out: Path) -> Path:
    ordered = sorted(candidates, key=lambda c: c.index)
    ok = [(c.index, c.score.fitness) for c in ordered if c.score.ok]
    best, running = float("-inf"), []
    for i, f in ok:
        best = max(best, f)
        running.append((i, best))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if ok:
        ax.scatter([i for i, _ in ok], [f for _, f in ok], s=12, alpha=0.6, label="candidate")
        ax.step([i for i, _ in running], [f for _, f in running], where="post", color="C3", label="best so far")
    failed = [c.index for c in ordered if not c.score.ok]
    if failed:
        ax.scatter(failed, [min((f for _, f in ok), default=0.0)] * len(failed), marker="x", color="k",
                   label="failed")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.set_title("CMA-ES merge search")
    ax.grid(alpha=0.3)
    if ok or failed:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def fitness_formula(config: EvolveConfig, higher_is_better: dict[str, bool]) -> str:
    """How the per-task metrics enter the fitness, e.g. `(1.0 * evo_addition/acc - 2.0 * evo_ppl/word_perplexity)
    / 3.0`: a lower-is-better metric enters negated."""
    total = sum(t.weight for t in config.tasks) or 1.0
    terms = []
    for t in config.tasks:
        sign = "-" if not higher_is_better.get(t.name, True) else "+"
        terms.append(f"{sign} {t.weight:g} * {t.name}/{t.metric}")
    text = " ".join(terms).removeprefix("+ ")
    return f"({text}) / {total:g}"


def render_report(result: SearchResult, validation: list[Validation], config: EvolveConfig,
                  higher_is_better: dict[str, bool], settings: dict[str, Any]) -> str:
    candidates = result.candidates
    ok = [c for c in candidates if c.score.ok]
    best = result.best
    lines = ["# Merge search report", "",
             f"- evaluations: {len(candidates)} ({len(candidates) - len(ok)} failed), {result.generations} "
             f"generations; stopped by {result.stop_reason}",
             f"- fitness (maximised): {fitness_formula(config, higher_is_better)}"]
    if higher_is_better:
        lines.append("- metric directions (from lm-eval's higher_is_better): " + ", ".join(
            f"{t.name}/{t.metric} {'higher' if higher_is_better.get(t.name, True) else 'lower'} is better"
            for t in config.tasks))
    if best is None:
        lines.append("- best: none (no candidate merged and scored; see the `error` field in history.jsonl)")
    else:
        lines += [f"- best fitness: {best.score.fitness:.4f} (evaluation {best.index}, generation {best.generation})",
                  "- best per-task: " + ", ".join(f"{k} {v:.4f}" for k, v in best.score.per_task.items())]
    lines.append(f"- settings: {settings}")
    if ok:
        lines += [f"- mean time to merge: {mean(c.score.merge_seconds for c in ok):.3f}s, "
                  f"to score: {mean(c.score.score_seconds for c in ok):.3f}s per candidate"]
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
        lines += ["", "Files: `best_config.yaml` (run it with `mergekit-yaml best_config.yaml OUT`), `best_model/`, "
                  "`history.jsonl`, `fitness.png`.", ""]
    return "\n".join(lines)
