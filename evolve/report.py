"""What a finished search leaves behind for a person: a plot and a short report."""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fitness(records: list[dict[str, Any]], out: Path) -> Path:
    ok = [(r["index"], r["fitness"]) for r in records if r["ok"]]
    best, running = float("-inf"), []
    for r in sorted(records, key=lambda r: r["index"]):
        best = max(best, r["fitness"])
        running.append((r["index"], best))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if ok:
        ax.scatter([i for i, _ in ok], [f for _, f in ok], s=12, alpha=0.6, label="candidate")
    if running:
        ax.step([i for i, _ in running], [f for _, f in running], where="post", color="C3", label="best so far")
    failed = [r["index"] for r in records if not r["ok"]]
    if failed:
        ax.scatter(failed, [min((f for _, f in ok), default=0.0)] * len(failed), marker="x", color="k",
                   label="failed")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.set_title("CMA-ES merge search")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def render_report(records: list[dict[str, Any]], validation: list[dict[str, Any]], best: dict[str, Any],
                  settings: dict[str, Any]) -> str:
    ok = [r for r in records if r["ok"]]
    lines = ["# Merge search report", "",
             f"- evaluations: {len(records)} ({len(records) - len(ok)} failed)",
             f"- best fitness: {best['fitness']:.4f} (evaluation {best['index']}, generation {best['generation']})",
             "- best per-task: " + ", ".join(f"{k} {v:.4f}" for k, v in best["scores"].items()),
             f"- settings: {settings}"]
    if ok:
        lines += [f"- mean time to merge: {mean(r['merge_seconds'] for r in ok):.3f}s, "
                  f"to score: {mean(r['score_seconds'] for r in ok):.3f}s per candidate"]
    if validation:
        lines += ["", "## Held-out validation of the top candidates", "",
                  "| evaluation | fitness | validation | gap (fitness - validation) |", "|---|---|---|---|"]
        for v in validation:
            gap = v["fitness"] - v["validation"] if v["validation"] is not None else float("nan")
            val = f"{v['validation']:.4f}" if v["validation"] is not None else "failed"
            lines.append(f"| {v['index']} | {v['fitness']:.4f} | {val} | {gap:+.4f} |")
    lines += ["", "Files: `best_config.yaml` (run it with `mergekit-yaml best_config.yaml OUT`), `best_model/`, "
              "`history.jsonl`, `fitness.png`.", ""]
    return "\n".join(lines)
