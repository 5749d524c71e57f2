"""Layer-path and hybrid search against the parameter-space search (issue 13), on the demo models and tasks.

For each seed this runs, in this process with the demo's settings (2 Ray workers, 100 evaluations at most):

1. the parameter-space search, configs/search.yml (task_arithmetic weights per model for attention, MLP and the rest);
2. the layer-path search, configs/search_layer_path.yml (which layer of which specialist comes next);
3. the hybrid search, configs/search_hybrid.yml with this seed's parameter-space result (1.) as the first
   source of the path;

then scores every exported best_config.yaml and the source models on the held-out test split, and prints
one table per seed: held-out accuracy per task, their mean, the search's best fitness (validation split),
evaluations used, wall time of the search and the depth of the result.

    python bench/layer_path.py [--seeds 0,1,2] [--max-fevals 100] [--num-workers 2]

Searches are kept under .cache/layer_path_bench/seed<k>/<kind> with their wall time (timing.json): a rerun
re-does only the held-out table. Results: bench/results/layer_path.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evolve.config import EvolveConfig, load_search  # noqa: E402
from evolve.demo.__main__ import held_out_table  # noqa: E402
from evolve.demo.build_models import build_models  # noqa: E402
from evolve.layer_path import recipe_path  # noqa: E402
from evolve.run import RunOptions, evolve  # noqa: E402
from evolve.search import SearchSettings  # noqa: E402
from merge_engine import load_recipe  # noqa: E402

STORE = ROOT / ".cache" / "layer_path_bench"
KINDS = {"parameters": "parameter-space (task_arithmetic)", "layer_path": "layer path",
         "hybrid": "hybrid (parameter-space result + specialists)"}


def config_for(kind: str, seed_dir: Path) -> EvolveConfig:
    if kind == "parameters":
        return load_search(ROOT / "configs" / "search.yml")
    if kind == "layer_path":
        return load_search(ROOT / "configs" / "search_layer_path.yml")
    hybrid = load_search(ROOT / "configs" / "search_hybrid.yml")
    models = [str(seed_dir / "parameters" / "best_config.yaml"), *hybrid.genome.models[1:]]
    return hybrid.model_copy(update={"genome": hybrid.genome.model_copy(update={"models": models})})


def run_search(kind: str, seed: int, args: argparse.Namespace) -> dict:
    store = STORE / f"seed{seed}" / kind
    timing = store / "timing.json"
    if timing.exists():
        return json.loads(timing.read_text())
    options = RunOptions(storage_path=str(store), num_workers=args.num_workers, batch_size=64, resume=True,
                         task_search_path=[str(ROOT / "tasks")],
                         search=SearchSettings(max_fevals=args.max_fevals, sigma0=0.25, random_seed=seed))
    t0 = time.perf_counter()
    result = evolve(config_for(kind, store.parent), options)
    out = {"wall_s": round(time.perf_counter() - t0, 1), "evaluations": len(result.search.candidates),
           "best_fitness": result.best.score.fitness}
    timing.write_text(json.dumps(out))
    return out


def depth(recipe_file: Path) -> int:
    recipe = load_recipe(recipe_file)
    return len(recipe_path(recipe)) if recipe.slices else 4  # the demo models' 4 layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated search seeds; default 0")
    ap.add_argument("--max-fevals", type=int, default=100)
    ap.add_argument("--num-workers", type=int, default=2, help="Ray workers per search (0: in this process)")
    args = ap.parse_args()
    os.chdir(ROOT)  # the search files name the demo models relative to the repository
    paths = build_models()
    results, lines = {}, []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {kind: run_search(kind, seed, args) for kind in KINDS}
        single = {"merge_method": "linear"}
        recipes = {name: {**single, "models": [{"model": str(paths[m]), "parameters": {"weight": 1.0}}]}
                   for name, m in (("base", "base"), ("addition specialist", "addition"),
                                   ("reversal specialist", "reversal"))}
        for kind in KINDS:
            recipes[KINDS[kind]] = load_recipe(STORE / f"seed{seed}" / kind / "best_config.yaml").model_dump(
                mode="json", exclude_none=True)
        rows = held_out_table(recipes, str(paths["base"]), seed, layer_path=True)
        results[seed] = {"held_out": rows, "runs": runs}
        lines += [f"### seed {seed}", "",
                  "| model | addition (test) | reversal (test) | mean | best fitness (validation) | evaluations "
                  "| search wall time | depth |", "|---|---|---|---|---|---|---|---|"]
        for name, scores in rows.items():
            a, r = scores["evo_addition"], scores["evo_reversal"]
            kind = next((k for k, v in KINDS.items() if v == name), None)
            run = runs.get(kind, {}) if kind else {}
            d = depth(STORE / f"seed{seed}" / kind / "best_config.yaml") if kind else 4
            lines.append(f"| {name} | {a:.3f} | {r:.3f} | {(a + r) / 2:.3f} | "
                         + (f"{run['best_fitness']:.3f} | {run['evaluations']} | {run['wall_s']:.0f} s | "
                            if run else "- | - | - | ") + f"{d} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    out = ROOT / "bench" / "results"
    header = ["# Layer-path and hybrid search vs parameter-space search (bench/layer_path.py)", "",
              f"Demo models and tasks, {args.max_fevals} evaluations at most, {args.num_workers} Ray worker(s); "
              "accuracy on the held-out test split (300 problems per task); best fitness on the validation split "
              "the searches optimise; depth: layers of the result. Wall times depend on what else the machine "
              "runs.", ""]
    (out / "layer_path.md").write_text("\n".join(header + lines))
    (out / "layer_path.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'layer_path.md'}")


if __name__ == "__main__":
    main()
