"""mergekit-evolve: search a merge recipe's numbers with CMA-ES, score with lm-eval."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_engine.config import RecipeError
from merge_engine.publish import UploadError, check_upload_target, upload_model
from merge_engine.summary import dumps, peak_rss_mib
from merge_engine.version import evomerge_version

from .config import load_search
from .extra import require_evolve_extra

if TYPE_CHECKING:  # the search's packages load only once the evolve extra is checked (main)
    from .run import RunOptions


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: history stays intact, the run ends with one line."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


STRATEGIES = ("pool", "buffered", "serial")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-evolve",
        description="Evolve merge parameters (per-layer-group weights, densities, ...) with CMA-ES, scoring each "
                    "candidate merge with lm-eval tasks. Writes history.jsonl, best_config.yaml, best_model/, "
                    "fitness.png and report.md to the storage path. Takes mergekit-evolve's flags.")
    p.add_argument("search_config", help="search definition YAML (genome + tasks), mergekit-evolve's schema")
    p.add_argument("--storage-path", required=True, help="directory for the history, checkpoints and results")
    s = p.add_argument_group("search")
    s.add_argument("--max-fevals", type=int, default=100,
                   help="most candidates to score (whole generations only; cache hits are free); default 100")
    s.add_argument("--sigma0", type=float, default=1 / 6,
                   help="initial CMA-ES step size in the normalised [0, 1] gene space; default 1/6 (mergekit's)")
    s.add_argument("--popsize", "--force-population-size", dest="popsize", type=int, default=None,
                   help="CMA-ES population per generation (default 4 + 3 ln(genes))")
    s.add_argument("--screen", type=float, default=None, metavar="FRACTION",
                   help="score each new candidate on this fraction of every task's documents first, and only the "
                        "better half of each generation on all of them (successive halving); the budget counts a "
                        "screening as that fraction of an evaluation. Default: every candidate on all documents")
    s.add_argument("--random-seed", type=int, default=0,
                   help="seed of CMA-ES and of randomized merge methods: same seed, same history; default 0")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="start no new generation after this many seconds (the run then exports as usual)")
    s.add_argument("--resume", action="store_true",
                   help="continue the search in --storage-path, reusing every score already in history.jsonl")
    e = p.add_argument_group("scoring")
    e.add_argument("--task-search-path", action="append", default=[],
                   help="directory of extra lm-eval task YAMLs (repeatable)")
    e.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size; default 32")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--in-memory", dest="in_memory", action="store_true", default=True,
                      help="merge into a model kept resident in each worker, no disk (default; mergekit's default "
                           "is on-disk)")
    mode.add_argument("--on-disk", "--no-in-memory", dest="in_memory", action="store_false",
                      help="write each candidate merge to disk and load it (needed for --vllm)")
    e.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=False,
                   help="score with lm-eval's vLLM backend (needs vllm; implies on-disk candidates)")
    e.add_argument("--validate-top", type=int, default=3,
                   help="re-score this many best candidates on the tasks' validation_split; default 3")
    e.add_argument("--allow-benchmark-test-sets", "--i-understand-the-depths-of-the-evils-i-am-unleashing",
                   dest="allow_benchmark_test_sets", action="store_true",
                   help="allow public benchmark tasks (mmlu, gsm8k, ...) as search fitness")
    e.add_argument("--load-in-8bit", action="store_true",
                   help="not supported: refused with an error (candidates are scored in float32, or by vLLM)")
    e.add_argument("--load-in-4bit", action="store_true", help="not supported, as --load-in-8bit")
    w = p.add_argument_group("workers and devices")
    w.add_argument("--ray-address", default=None,
                   help="address of a running Ray cluster (default: start a local one)")
    w.add_argument("--num-workers", type=int, default=None,
                   help="Ray actors scoring candidates in parallel; 0 = no Ray, score in this process; default 1 "
                        "(--num-gpus N: N)")
    w.add_argument("--num-gpus", type=int, default=None,
                   help="mergekit's GPU count: N Ray workers with one GPU each, merging and scoring on cuda")
    w.add_argument("--strategy", "-s", choices=STRATEGIES, default="pool",
                   help="mergekit's scheduling: pool and buffered both use evomerge's actor pool (--num-workers "
                        "actors, each merging and scoring its candidates); serial = one worker")
    w.add_argument("--device", default="cpu", help="torch device for merging and scoring (cpu, cuda)")
    w.add_argument("--merge-cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="merge on cuda (mergekit's default); here merging follows --device, and --merge-cuda "
                        "without CUDA is an error")
    d = p.add_argument_group("models")
    d.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="let transformers run model-shipped code when loading candidates and tokenizers")
    d.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="allow merging models of different architectures (model_type)")
    d.add_argument("--reshard", action=argparse.BooleanOptionalAction, default=True,
                   help="accepted for mergekit compatibility, no effect: inputs are read tensor by tensor from "
                        "their own shards, never rewritten")
    o = p.add_argument_group("output and logging")
    o.add_argument("--save-final-model", "--export", dest="export_model", action=argparse.BooleanOptionalAction,
                   default=True, help="write best_model/ (mergekit's final_model/); best_config.yaml is always "
                                      "written (--no-export = --no-save-final-model)")
    o.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                   help="log every scored candidate (fitness, per-task scores, timings) to Weights & Biases; "
                        "needs `pip install 'evomerge[wandb]'`")
    o.add_argument("--wandb-project", default=None, help="wandb project (default mergekit-evolve)")
    o.add_argument("--wandb-entity", default=None, help="wandb entity (team or user)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    o.add_argument("--upload", metavar="REPO_ID", default=None,
                   help="push best_model/ to this Hugging Face Hub repo after the search (created if missing)")
    o.add_argument("--private", action="store_true", help="with --upload: create the repo private")
    o.add_argument("--json", action="store_true", help="print a JSON summary on stdout instead of the report "
                                                       "(best fitness, evaluations, paths, seconds, peak memory)")
    o.add_argument("-v", "--verbose", action="store_true", help="log more")
    o.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def check_flags(args: argparse.Namespace) -> tuple[str, int]:
    """Flag combinations that cannot work, refused before any work; returns (device, workers)."""
    from merge_engine.options import resolve_device

    if args.load_in_8bit or args.load_in_4bit:
        raise ValueError("--load-in-8bit/--load-in-4bit: quantized scoring is not supported; candidates are "
                         "scored in float32 (or by --vllm). Omit the flag")
    if args.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb: the wandb package is not installed; `pip install 'evomerge[wandb]'` "
                             "(or omit --wandb)")
    device = args.device
    if args.merge_cuda or args.num_gpus:
        device = "cuda" if device == "cpu" else device
    if args.ray_address is None:  # a remote cluster's GPUs cannot be checked from here
        device = resolve_device(device)
    workers = args.num_workers
    if workers is None:
        workers = args.num_gpus or 1
        if args.strategy == "serial":
            workers = 1
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ValueError(f"--num-gpus {args.num_gpus}: must be at least 1")
    return device, workers


def run_options(args: argparse.Namespace, device: str, workers: int) -> RunOptions:
    """The parsed flags as the run's settings, in one place: every flag whose dest is named as a field of
    RunOptions or SearchSettings fills that field, so a new setting is its field plus its add_argument. The
    values that depend on other flags (check_flags' device and worker count, on-disk for --vllm) are given
    here; the search file's settings (random_init) come from the search file."""
    from .run import RunOptions
    from .search import SearchSettings

    given = vars(args) | {"device": device, "num_workers": workers, "in_memory": args.in_memory and not args.vllm}

    def fill(cls: type) -> dict[str, Any]:
        return {f.name: given[f.name] for f in fields(cls) if f.name in given}

    return RunOptions(**fill(RunOptions), search=SearchSettings(**fill(SearchSettings)))


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
    from .run import NoSuccessfulCandidate, evolve  # the search's packages from here on
    from .search import SearchFailed

    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # noqa: SIM115 - closed in finally; nothing may stop a search to ask (transformers' [y/N])
    try:
        if args.upload:
            check_upload_target(args.upload)
        device, workers = check_flags(args)
        config = load_search(args.search_config)
        result = evolve(config, run_options(args, device, workers))
    except (RecipeError, UploadError, ValueError) as e:
        print(f"mergekit-evolve: error: {e}", file=sys.stderr)
        return 2
    except (SearchFailed, NoSuccessfulCandidate) as e:
        print(f"mergekit-evolve: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\nmergekit-evolve: {what}; every finished candidate is in the history; continue with --resume "
              f"--storage-path {args.storage_path}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        sys.stdin.close()
        sys.stdin = stdin
    storage = Path(args.storage_path)
    best_model = storage / "best_model"
    uploaded = None
    if args.upload:
        try:
            uploaded = upload_model(best_model, args.upload, private=args.private,
                                    commit_message="Upload evolved merge (mergekit-evolve best_model)")
        except UploadError as e:
            print(f"mergekit-evolve: error: {e}", file=sys.stderr)
            return 1
    if args.json:
        best, candidates = result.best, result.search.candidates
        print(dumps({"storage_path": str(storage), "best_fitness": best.score.fitness,
                     "best_scores": best.score.per_task, "best_evaluation": best.index,
                     "evaluations": len(candidates), "failed": sum(not c.score.ok for c in candidates),
                     "held_out": {str(v.candidate.index): v.score.fitness if v.score.ok else None
                                  for v in result.validation},
                     "best_config": str(storage / "best_config.yaml"),
                     "best_model": str(best_model) if args.export_model else None,
                     "report": str(storage / "report.md"), "report_html": str(storage / "report.html"),
                     "log": str(storage / "evolve.log"), "seconds": round(time.perf_counter() - started, 3),
                     "peak_rss_mib": peak_rss_mib(), "uploaded": uploaded}))
    else:
        print(result.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
