"""The README's main command: build the demo models, evolve a merge, compare on held-out data.

    python -m evolve.demo [--max-fevals 100] [--random-seed 0] [--storage-path runs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from evolve.config import LayerPathDefinition, TaskDefinition, load_search
from evolve.evaluator import InProcessEvaluator, WorkerSettings
from evolve.run import RunOptions, evolve
from evolve.search import SearchSettings
from merge_engine import MergeOptions, load_recipe, parse_recipe

from .build_models import DEFAULT_CACHE, build_models

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/, tasks/
TASKS = {"addition": "evo_addition", "reversal": "evo_reversal"}  # the demo's pair: short name -> lm-eval task


def baselines(paths: dict[str, Path], tasks: dict[str, str] = TASKS) -> dict[str, dict]:
    """The recipes the evolved merge is compared with: the base, each specialist, and uniform merges."""
    first, second = tasks
    base, a, b = str(paths["base"]), str(paths[first]), str(paths[second])

    def single(model: str) -> dict:
        return {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]}

    def pair(method: str, **params) -> dict:
        recipe = {"merge_method": method, "models": [{"model": m, "parameters": dict(params)} for m in (a, b)]}
        if method != "linear":
            recipe["base_model"] = base
        return recipe

    return {
        "base": single(base), f"{first} specialist": single(a), f"{second} specialist": single(b),
        "uniform linear (0.5/0.5)": pair("linear", weight=0.5),
        "uniform task_arithmetic (1.0/1.0)": pair("task_arithmetic", weight=1.0),
        "uniform task_arithmetic (0.5/0.5)": pair("task_arithmetic", weight=0.5),
        "uniform ties (1.0, density 0.5)": pair("ties", weight=1.0, density=0.5),
        "uniform dare_ties (1.0, density 0.5)": pair("dare_ties", weight=1.0, density=0.5),
    }


def held_out_table(recipes: dict[str, dict], reference: str, seed: int, tasks: dict[str, str] = TASKS,
                   split: str = "test", layer_path: bool = False) -> dict[str, dict[str, float]]:
    """Each recipe's per-task accuracy on the test split (the search never saw it), or on another split.
    `layer_path`: some recipes change the depth (each candidate gets a model of its own)."""
    definitions = [TaskDefinition(name=t, metric="acc", validation_split=split) for t in tasks.values()]
    evaluator = InProcessEvaluator(WorkerSettings(tasks=definitions, reference_model=reference, batch_size=64,
                                                  task_search_path=[str(ROOT / "tasks")], layer_path=layer_path,
                                                  merge=MergeOptions(random_seed=seed, progress=False)))
    scores = evaluator.evaluate([parse_recipe(r) for r in recipes.values()], validation=True)
    for name, s in zip(recipes, scores, strict=False):
        if not s.ok:
            raise RuntimeError(f"{name}: {s.error}")
    return {name: s.per_task for name, s in zip(recipes, scores, strict=False)}


def format_table(rows: dict[str, dict[str, float]], tasks: dict[str, str] = TASKS) -> str:
    first, second = tasks
    header = f"| {'model (held-out test split, 300 problems each)':46s} | {first:>8s} | {second:>8s} | mean  |"
    lines = [header, "|" + "-" * 48 + "|----------|----------|-------|"]
    for name, s in rows.items():
        a, b = s[tasks[first]], s[tasks[second]]
        lines.append(f"| {name:46s} | {a:8.3f} | {b:8.3f} | {(a + b) / 2:.3f} |")
    return "\n".join(lines)


EVOLVED = "evolved merge (best_config.yaml)"


def compare(rows: dict[str, dict[str, float]], tasks: dict[str, str] = TASKS) -> dict[str, Any]:
    """What the issue's table reports: evolved / specialist on its own task, and the evolved mean minus the
    best uniform merge's mean."""
    mean = {k: sum(v.values()) / len(v) for k, v in rows.items()}
    best_uniform = max((k for k in rows if k.startswith("uniform")), key=lambda k: mean[k])
    ratios = {t: rows[EVOLVED][tasks[t]] / max(rows[f"{t} specialist"][tasks[t]], 1e-9) for t in tasks}
    return {"ratios": ratios, "evolved_mean": mean[EVOLVED], "best_uniform": best_uniform,
            "best_uniform_mean": mean[best_uniform], "margin": mean[EVOLVED] - mean[best_uniform]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evolve.demo",
                                 description="Run the bundled benchmark: build the tiny base and specialists, "
                                             "evolve a merge of them, and compare on the held-out test split.")
    ap.add_argument("--search", type=Path, default=ROOT / "configs" / "search.yml", help="search definition")
    ap.add_argument("--storage-path", type=Path, default=Path("runs") / "demo", help="where results go")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the demo models are kept")
    ap.add_argument("--max-fevals", type=int, default=100, help="search budget (candidates); default 100")
    ap.add_argument("--popsize", type=int, default=None, help="CMA-ES population (default from the gene count)")
    ap.add_argument("--sigma0", type=float, default=0.25, help="initial CMA-ES step size; default 0.25")
    ap.add_argument("--random-seed", type=int, default=0, help="seed of the search; default 0")
    ap.add_argument("--num-workers", type=int, default=2, help="Ray actors (0 = in process); default 2")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.time()
    os.chdir(ROOT)  # the search and recipes name the models relative to the repository root
    print("[1/3] demo models", flush=True)
    paths = build_models(args.cache_dir)
    print(f"[2/3] evolving a merge ({args.max_fevals} evaluations at most)", flush=True)
    options = RunOptions(storage_path=str(args.storage_path),
                         search=SearchSettings(max_fevals=args.max_fevals, sigma0=args.sigma0, popsize=args.popsize,
                                               random_seed=args.random_seed),
                         task_search_path=[str(ROOT / "tasks")], num_workers=args.num_workers, batch_size=64,
                         resume=True)
    try:
        config = load_search(args.search)
        result = evolve(config, options)
    except ValueError as e:  # bad input (RecipeError is one): one line, as mergekit-evolve prints it
        hint = " (configs/search_hybrid.yml reads the main demo's result: run `bash scripts/demo.sh` first)" \
            if "runs/demo/best_config.yaml" in str(e) else ""
        print(f"python -m evolve.demo: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return 2
    print(result.report)
    print("[3/3] held-out comparison", flush=True)
    recipes = baselines(paths)
    recipes[EVOLVED] = load_recipe(args.storage_path / "best_config.yaml").model_dump(
        mode="json", exclude_none=True)
    rows = held_out_table(recipes, str(paths["base"]), args.random_seed,
                          layer_path=isinstance(config.genome, LayerPathDefinition))
    table = format_table(rows)
    c = compare(rows)
    summary = (f"evolved / specialist on its own task: addition {c['ratios']['addition']:.1%}, reversal "
               f"{c['ratios']['reversal']:.1%} (target >= 95%)\n"
               f"evolved mean {c['evolved_mean']:.3f} vs best uniform merge ({c['best_uniform']}) "
               f"{c['best_uniform_mean']:.3f}: {c['margin']:+.3f}\n"
               f"seed {args.random_seed}, {len(result.search.candidates)} evaluations, "
               f"{time.time() - t0:.0f}s in all")
    print(table)
    print(summary)
    (args.storage_path / "held_out.md").write_text(table + "\n\n" + summary + "\n")
    (args.storage_path / "held_out.json").write_text(json.dumps(rows, indent=2))
    print(f"results in {args.storage_path}: best_config.yaml, best_model/, report.md, fitness.png, held_out.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
