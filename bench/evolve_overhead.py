"""Benchmark: per-candidate cost of the search, in-memory vs on-disk.

For each mode, N candidates (random genomes of the demo search) are merged and scored
in this process; for each we record the time to materialize the merge, the time to
score, and how much of the scoring time is spent outside the model's forward passes
(lm-eval request building, tokenization, batching, metric aggregation).

    python bench/evolve_overhead.py [--candidates 20] [--limit 100]

Run it with OMP_NUM_THREADS=1 on an idle machine (a search's worker has one thread per core it is given).

Needs the demo models (python -m evolve.demo.build_models). Writes bench/results/evolve_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


class ForwardTimer:
    """Wraps a model's forward to accumulate the time spent in it."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, model) -> None:
        if getattr(model, "_bench_wrapped", False):
            return
        inner = model.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        model.forward = timed
        model._bench_wrapped = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    os.chdir(ROOT)
    from evolve.config import load_search
    from evolve.demo.build_models import build_models
    from evolve.evaluator import CandidateEvaluator, WorkerSettings
    from evolve.genome import Genome

    build_models()
    config = load_search(ROOT / "configs" / "search.yml")
    genome = Genome.for_models(config.genome)
    rng = np.random.default_rng(0)
    recipes = [genome.decode(rng.uniform(size=genome.dimension)) for _ in range(args.candidates)]
    rows = {}
    for mode in ("in-memory", "on-disk"):
        settings = WorkerSettings(tasks=list(config.tasks), reference_model=config.genome.base_model,
                                  task_search_path=[str(ROOT / "tasks")], limit=args.limit, batch_size=64,
                                  in_memory=mode == "in-memory", scratch_dir="/tmp/evomerge-bench-scratch")
        t0 = time.perf_counter()
        worker = CandidateEvaluator(settings)
        setup = time.perf_counter() - t0
        timer = ForwardTimer()
        if mode == "in-memory":
            timer.wrap(worker.materializer.model)
        else:  # wrap each freshly loaded model
            original = worker.materializer.materialize

            def materialize(cfg, _orig=original, _timer=timer):
                model, tok = _orig(cfg)
                _timer.wrap(model)
                return model, tok

            worker.materializer.materialize = materialize
        merge, score, forward = [], [], []
        worker.evaluate_one(recipes[0])  # warm-up (first tensor reads, lazy imports)
        for recipe in recipes:
            timer.seconds = 0.0
            s = worker.evaluate_one(recipe)
            assert s.ok, s.error
            merge.append(s.merge_seconds)
            score.append(s.score_seconds)
            forward.append(timer.seconds)
        overhead = [s - f for s, f in zip(score, forward, strict=False)]
        rows[mode] = {"setup_s": round(setup, 2), "merge_ms": round(1000 * statistics.mean(merge), 1),
                      "score_ms": round(1000 * statistics.mean(score), 1),
                      "forward_ms": round(1000 * statistics.mean(forward), 1),
                      "overhead_outside_forward_ms": round(1000 * statistics.mean(overhead), 1),
                      "candidate_total_ms": round(1000 * (statistics.mean(merge) + statistics.mean(score)), 1)}
        total = statistics.mean(merge) + statistics.mean(score)
        rows[mode]["outside_forward_share"] = round(100 * statistics.mean(overhead) / total, 1)
        rows[mode]["not_forward_share"] = round(100 * (total - statistics.mean(forward)) / total, 1)
        print(mode, rows[mode], flush=True)
    meta = {"candidates": args.candidates, "limit_per_task": args.limit, "tasks": [t.name for t in config.tasks],
            "model": "demo base (4 layers, hidden 128)", "cores": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evolve_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| mode | merge (ms) | score (ms) | in forward (ms) | scoring outside forward (ms) | per candidate (ms) | "
             "scoring outside forward, share of candidate | merge + scoring outside forward, share | "
             "worker setup (s) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {r['merge_ms']} | {r['score_ms']} | {r['forward_ms']} | {r['overhead_outside_forward_ms']} | "
              f"{r['candidate_total_ms']} | {r['outside_forward_share']}% | {r['not_forward_share']}% | "
              f"{r['setup_s']} |" for m, r in rows.items()]
    (RESULTS / "evolve_overhead.md").write_text("\n".join(lines) + "\n\n" + json.dumps(meta, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
