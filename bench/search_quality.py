"""Search quality (issue 9): does the evolved merge keep each specialist's skill, on more than one task
pair, for every seed?

For each task pair (the demo's addition + reversal, and a second pair, subtraction + sorting, trained the
same deterministic way and never used to choose a setting) and each seed, this runs a whole search
(`evolve.run.evolve`, in this process), then scores the exported best_config.yaml, the specialists and the
uniform merges on the held-out test split, and prints:

    pair | seed | evolved / specialist (task 1) | (task 2) | evolved - best uniform (mean) | evals | wall

The same comparison on the validation split (the documents the fitness is computed on) is printed next to
it: settings are chosen on those numbers, the test split is for reporting.

    python bench/search_quality.py [--pairs demo,second] [--seeds 0,1,2] [--max-fevals 100]
        [--aggregate mean|min|harmonic|geometric] [--normalize] [--method task_arithmetic] --tag NAME

Searches are kept under .cache/search_quality/<tag>/<pair>/seed<k> and resumed when run again (same
settings), so a rerun only re-does the held-out table. Results: bench/results/search_quality-<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evolve.config import EvolveConfig, load_search  # noqa: E402
from evolve.demo.__main__ import EVOLVED, baselines, compare, format_table, held_out_table  # noqa: E402
from evolve.demo.build_models import PAIRS, build_models  # noqa: E402
from evolve.run import RunOptions, evolve  # noqa: E402
from evolve.search import SearchSettings  # noqa: E402
from merge_engine import load_recipe  # noqa: E402

CACHES = {"demo": ROOT / ".cache" / "demo_models", "second": ROOT / ".cache" / "second_pair_models"}


def search_config(pair: str, paths: dict[str, Path], args: argparse.Namespace) -> EvolveConfig:
    """configs/search.yml (the demo's search) with the pair's models and tasks and the chosen fitness/method."""
    template = load_search(ROOT / "configs" / "search.yml").model_dump(mode="json")
    tasks = PAIRS[pair][0]
    template["genome"].update(models=[str(paths[t]) for t in tasks], base_model=str(paths["base"]),
                              merge_method=args.method)
    if args.layer_granularity is not None:
        template["genome"]["layer_granularity"] = args.layer_granularity
    if args.ranges:  # weight=0:2,density=0.1:1
        template["genome"]["ranges"] = {k: [float(x) for x in v.split(":")]
                                        for k, v in (item.split("=") for item in args.ranges.split(","))}
    if args.filters is not None:
        template["genome"]["filters"] = [f for f in args.filters.split(",") if f]
    template["tasks"] = [{**template["tasks"][0], "name": f"evo_{t}"} for t in tasks]
    template["fitness"] = {"aggregate": args.aggregate, "normalize": args.normalize}
    return EvolveConfig.model_validate(template)


def run_one(pair: str, seed: int, args: argparse.Namespace) -> dict:
    paths = build_models(CACHES[pair], pair=pair)
    tasks = {t: f"evo_{t}" for t in PAIRS[pair][0]}
    storage = ROOT / ".cache" / "search_quality" / args.tag / pair / f"seed{seed}"
    t0 = time.perf_counter()
    options = RunOptions(storage_path=str(storage), task_search_path=[str(ROOT / "tasks")],
                         num_workers=args.num_workers, batch_size=64, resume=storage.exists(), export_model=False,
                         search=SearchSettings(max_fevals=args.max_fevals, sigma0=args.sigma0, random_seed=seed,
                                               progress=not args.quiet, screen=args.screen,
                                               popsize=args.popsize))
    result = evolve(search_config(pair, paths, args), options)
    search_s = time.perf_counter() - t0
    recipes = baselines(paths, tasks)
    recipes[EVOLVED] = load_recipe(storage / "best_config.yaml").model_dump(mode="json", exclude_none=True)
    rows = held_out_table(recipes, str(paths["base"]), seed, tasks)
    (storage / "held_out.md").write_text(format_table(rows, tasks) + "\n")
    c = compare(rows, tasks)
    # the same comparison on the validation split (the fitness documents): settings are chosen on these
    v = compare(held_out_table(recipes, str(paths["base"]), seed, tasks, split="validation"), tasks)
    return {"pair": pair, "seed": seed, "tasks": list(tasks), "ratios": c["ratios"], "margin": c["margin"],
            "validation_ratios": v["ratios"], "validation_margin": v["margin"],
            "evolved_mean": c["evolved_mean"], "best_uniform": c["best_uniform"],
            "best_uniform_mean": c["best_uniform_mean"], "evaluations": len(result.search.candidates),
            "screened_out": len(result.search.screened_out), "budget_used": round(result.search.spent, 2),
            "best_at": result.best.index if result.best else None, "search_seconds": round(search_s, 1),
            "held_out": rows}


def screening(row: dict) -> str:
    return f" [{row['screened_out']}; {row['budget_used']:g}]" if row.get("screened_out") else ""


def table(rows: list[dict]) -> str:
    lines = ["| pair | seed | evolved / specialist, task 1 | task 2 | evolved minus best uniform (mean, points) "
             "| validation split: task 1, task 2, margin | evaluations (best at) [screened out; budget used] "
             "| search wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t1, t2 = r["tasks"]
        val = r["validation_ratios"]
        lines.append(f"| {r['pair']} ({t1}, {t2}) | {r['seed']} | {r['ratios'][t1]:.1%} | {r['ratios'][t2]:.1%} | "
                     f"{100 * r['margin']:+.1f} (vs {r['best_uniform'].removeprefix('uniform ')}) | "
                     f"{val[t1]:.1%}, {val[t2]:.1%}, {100 * r['validation_margin']:+.1f} | "
                     f"{r['evaluations']} ({r['best_at']}){screening(r)} | {r['search_seconds']:.0f} s |")
    for pair in dict.fromkeys(r["pair"] for r in rows):
        mine = [r for r in rows if r["pair"] == pair]
        means = [100 * r["evolved_mean"] for r in mine]
        worst = min(min(r["ratios"].values()) for r in mine)
        lines.append(f"\n{pair}: worst task ratio over seeds {worst:.1%} (target >= 95%); mean margin "
                     f"{statistics.mean(100 * r['margin'] for r in mine):+.1f} points (target >= +5); spread of the "
                     f"evolved mean over seeds {max(means) - min(means):.1f} points (target <= 2)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="demo,second", help="comma-separated: demo, second")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    ap.add_argument("--max-fevals", type=int, default=100, help="evaluations per search (default 100)")
    ap.add_argument("--sigma0", type=float, default=0.25, help="CMA-ES initial step (the demo's 0.25)")
    ap.add_argument("--screen", type=float, default=None, help="mergekit-evolve --screen FRACTION (default off)")
    ap.add_argument("--popsize", type=int, default=None,
                    help="CMA-ES population (default: CMA-ES's; the demo's 2 Ray workers round it up to even)")
    ap.add_argument("--aggregate", default="mean", choices=["mean", "min", "harmonic", "geometric"],
                    help="fitness.aggregate of the search")
    ap.add_argument("--normalize", action="store_true", help="fitness.normalize: true")
    ap.add_argument("--method", default="task_arithmetic", help="genome.merge_method (default task_arithmetic)")
    ap.add_argument("--layer-granularity", type=int, help="genome.layer_granularity (default: configs/search.yml's)")
    ap.add_argument("--filters", help="genome.filters, comma-separated (default: configs/search.yml's)")
    ap.add_argument("--ranges", help="genome.ranges, e.g. weight=0:2,density=0.1:1 (default: the method's)")
    ap.add_argument("--num-workers", type=int, default=0, help="Ray workers (0 = in this process; default)")
    ap.add_argument("--tag", required=True, help="names the runs and the results file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    rows = []
    for pair in args.pairs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_one(pair, seed, args))
            print(table(rows[-1:]).split("\n")[2], flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("quiet",)}
    text = (f"# Search quality: {args.tag}\n\nsettings: {json.dumps(settings)}\n\n{table(rows)}\n")
    print(text)
    out = ROOT / "bench" / "results" / f"search_quality-{args.tag}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
