"""report.md: what a finished search leaves behind for a person (the pictures are in pictures.py)."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Any


def resolved_settings(settings: dict[str, Any], dimension: int) -> dict[str, Any]:
    """The run settings as they took effect: a popsize left to CMA-ES is its default for this many genes."""
    out = dict(settings)
    if out.get("popsize") is None:
        out["popsize"] = 4 + int(3 * math.log(dimension))  # cma's default, as the search used it
    return out


def render_report(records: list[dict[str, Any]], validation: list[dict[str, Any]], best: dict[str, Any],
                  settings: dict[str, Any], exported: bool = True) -> str:
    ok = [r for r in records if r["ok"]]
    lines = ["# Merge search report", "",
             f"- evaluations: {len(records)} ({len(records) - len(ok)} failed)",
             f"- best fitness: {best['fitness']:.4f} (evaluation {best['index']}, generation {best['generation']})",
             "- best per-task: " + ", ".join(f"{k} {v:.4f}" for k, v in best["scores"].items()),
             "- settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)]
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
    files = ["`best_config.yaml` (run it with `mergekit-yaml best_config.yaml OUT`)"]
    files += ["`best_model/` (with a model card describing this search)"] if exported else []
    files += ["`history.jsonl`", "`evolve.log`", "`report.html` (this report with the pictures and a sortable "
              "history)", "`fitness.png`", "`genome_heatmap.png`", "`gene_spread.png`"]
    lines += ["", "Files: " + ", ".join(files) + ".", ""]
    return "\n".join(lines)
