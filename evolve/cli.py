"""mergekit-evolve: search a merge recipe's numbers with CMA-ES, score with lm-eval."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from merge_engine.config import RecipeError
from merge_engine.publish import UploadError, check_upload_target, upload_model
from merge_engine.summary import dumps, peak_rss_mib
from merge_engine.version import evomerge_version

from .config import load_search
from .extra import require_evolve_extra


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-evolve",
        description="Evolve merge parameters (per-layer-group weights, densities, ...) with CMA-ES, scoring each "
                    "candidate merge with lm-eval tasks. Writes history.jsonl, best_config.yaml, best_model/, "
                    "fitness.png and report.md to the storage path.")
    p.add_argument("search_config", help="search definition YAML (genome + tasks), mergekit-evolve's schema")
    p.add_argument("--storage-path", required=True, help="directory for the history, checkpoints and results")
    p.add_argument("--max-fevals", type=int, default=100,
                   help="most candidates to score (whole generations only; cache hits are free); default 100")
    p.add_argument("--sigma0", type=float, default=0.25,
                   help="initial CMA-ES step size in the normalised [0, 1] gene space; default 0.25")
    p.add_argument("--popsize", type=int, default=None, help="CMA-ES population per generation "
                                                             "(default 4 + 3 ln(genes))")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of CMA-ES and of randomized merge methods: same seed, same history; default 0")
    p.add_argument("--task-search-path", action="append", default=[],
                   help="directory of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size; default 32")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-memory", dest="in_memory", action="store_true", default=True,
                      help="merge into a model kept resident in each worker, no disk (default)")
    mode.add_argument("--on-disk", dest="in_memory", action="store_false",
                      help="write each candidate merge to disk and load it (needed for --vllm)")
    p.add_argument("--vllm", action="store_true", help="score with lm-eval's vLLM backend (needs vllm; implies "
                                                       "on-disk candidates)")
    p.add_argument("--ray-address", default=None,
                   help="address of a running Ray cluster (default: start a local one)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray actors scoring candidates in parallel; 0 = no Ray, score in this process; default 1")
    p.add_argument("--device", default="cpu", help="torch device for merging and scoring (cpu, cuda)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in --storage-path, reusing every score already in history.jsonl")
    p.add_argument("--validate-top", type=int, default=3,
                   help="re-score this many best candidates on the tasks' validation_split; default 3")
    p.add_argument("--allow-benchmark-test-sets", action="store_true",
                   help="allow public benchmark tasks (mmlu, gsm8k, ...) as search fitness")
    p.add_argument("--no-export", dest="export_model", action="store_false",
                   help="skip writing best_model/ (best_config.yaml is always written)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--upload", metavar="REPO_ID", default=None,
                   help="push best_model/ to this Hugging Face Hub repo after the search (created if missing)")
    p.add_argument("--private", action="store_true", help="with --upload: create the repo private")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout instead of the report "
                                                       "(best fitness, evaluations, paths, seconds, peak memory)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.upload:
        parser.error("--private only applies with --upload REPO_ID")
    if args.upload and not args.export_model:
        parser.error("--upload pushes best_model/, which --no-export skips; drop one of them")
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    for handler in logging.getLogger().handlers:  # the console keeps its level when evolve.log takes INFO
        handler.setLevel(level)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        require_evolve_extra()
    except ImportError as e:
        print(f"mergekit-evolve: error: {e}", file=sys.stderr)
        return 2
    from .run import RunOptions, evolve  # the search's packages (cma, lm-eval, ray, matplotlib) from here on
    from .search import SearchSettings

    try:
        if args.upload:
            check_upload_target(args.upload)
        config = load_search(args.search_config)
        options = RunOptions(
            storage_path=args.storage_path,
            search=SearchSettings(max_fevals=args.max_fevals, sigma0=args.sigma0, popsize=args.popsize,
                                  random_seed=args.random_seed, progress=args.progress),
            task_search_path=args.task_search_path, batch_size=args.batch_size,
            in_memory=args.in_memory and not args.vllm, vllm=args.vllm, ray_address=args.ray_address,
            num_workers=args.num_workers, device=args.device, resume=args.resume,
            allow_benchmark_test_sets=args.allow_benchmark_test_sets, validate_top=args.validate_top,
            export_model=args.export_model)
        result = evolve(config, options)
    except (RecipeError, UploadError, ValueError) as e:
        print(f"mergekit-evolve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmergekit-evolve: interrupted; continue with --resume --storage-path {args.storage_path}",
              file=sys.stderr)
        return 130
    best_model = Path(result["storage_path"]) / "best_model"
    uploaded = None
    if args.upload:
        try:
            uploaded = upload_model(best_model, args.upload, private=args.private,
                                    commit_message="Upload evolved merge (mergekit-evolve best_model)")
        except UploadError as e:
            print(f"mergekit-evolve: error: {e}", file=sys.stderr)
            return 1
    if args.json:
        best = result["best"]
        storage = Path(result["storage_path"])
        print(dumps({"storage_path": str(storage), "best_fitness": best["fitness"], "best_scores": best["scores"],
                     "best_evaluation": best["index"], "evaluations": len(result["records"]),
                     "failed": sum(not r["ok"] for r in result["records"]),
                     "held_out": {str(v["index"]): v["validation"] for v in result["validation"]},
                     "best_config": str(storage / "best_config.yaml"),
                     "best_model": str(best_model) if result["exported"] else None,
                     "report": str(storage / "report.md"), "report_html": str(storage / "report.html"),
                     "log": str(storage / "evolve.log"), "seconds": round(time.perf_counter() - started, 3),
                     "peak_rss_mib": peak_rss_mib(), "uploaded": uploaded}))
    else:
        print(result["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
