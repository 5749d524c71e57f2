"""The part of an evolved model's card that describes the search that found its recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import EvolveConfig, GenomeDefinition, LayerPathDefinition
from .pictures import HeldOut, as_record


def render_search_section(config: EvolveConfig, records: Sequence[Any], held_out: Sequence[HeldOut],
                          settings: dict[str, Any], max_fevals: int, plot: str | None = "fitness.png") -> str:
    recs = [as_record(r) for r in records]
    ok = [r for r in recs if r["ok"]]
    best = max(ok, key=lambda r: r["fitness"])
    g = config.genome
    what = f"this `{g.merge_method}` recipe" if isinstance(g, GenomeDefinition) else \
        "this layer path (a `passthrough` recipe of slices)"
    shots = f"{config.num_fewshot}-shot |" if config.num_fewshot is not None else "each task's own few-shot setting |"
    lines = ["## How this recipe was found", "",
             (f"The numbers of {what} were searched with CMA-ES by `mergekit-evolve` "
              "(evomerge): every candidate recipe was merged and scored with lm-eval, and the best one is this "
              "model."), "",
             "| | |", "|---|---|",
             "| tasks (metric, weight) | " + ", ".join(f"`{t.name}` ({t.metric}, {t.weight:g})" for t in config.tasks)
             + " |",
             f"| documents per task | {config.limit if config.limit is not None else 'all'}, " + shots,
             (f"| budget | {max_fevals} evaluations; {len(recs)} scored ({len(recs) - len(ok)} failed) over "
              f"{len({r['generation'] for r in recs})} generations |"),
             f"| search | sigma0 {settings.get('sigma0')}, popsize {settings.get('popsize')}, seed "
             f"{settings.get('random_seed')}, " + _genome_line(g) + " |",
             f"| best fitness | {best['fitness']:.4f} (evaluation {best['index']}, generation "
             f"{best['generation']}): " + ", ".join(f"{k} {v:.4f}" for k, v in best["scores"].items()) + " |"]
    mine = next((h for h in held_out if h.index == best["index"]), None)
    if mine is not None:
        splits = ", ".join(f"`{t.name}`: {t.validation_split}" for t in config.tasks if t.validation_split)
        score = "failed" if mine.validation is None else f"{mine.validation:.4f}"
        lines.append(f"| held-out score | {score} (re-scored on the held-out split, {splits}) |")
    lines.append("")
    if plot:
        lines += [f"![fitness over the search]({plot})", ""]
    lines.append("The fitness is the weighted mean of the task metrics on the search split; a held-out score "
                 "well below it means the search overfitted that split.")
    return "\n".join(lines)


def _genome_line(g: GenomeDefinition | LayerPathDefinition) -> str:
    if isinstance(g, LayerPathDefinition):
        return (f"layer path over {len(g.models)} model(s) x {g.repeats} repeat(s), scales per {g.scales}"
                + (f", depth {g.min_layers or 1}-{g.max_layers or 'all'}" if g.min_layers or g.max_layers else ""))
    return (f"layer groups of {g.layer_granularity or 'all'} layer(s)"
            + (f", filters {', '.join(g.filters)}" if g.filters else ""))
