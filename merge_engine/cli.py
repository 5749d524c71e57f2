"""mergekit-yaml: merge models as a YAML recipe says."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .config import RecipeError, load_recipe
from .executor import MergeError
from .io.loader import ModelLoadError
from .merge import plan_merge, run_merge
from .methods import REGISTRY
from .options import MergeOptions, parse_size
from .plan import PlanError
from .publish import UploadError, check_upload_target, upload_model
from .summary import dumps, model_summary, peak_rss_mib
from .version import evomerge_version


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-yaml",
        description="Merge Hugging Face models as a mergekit-style YAML recipe describes, streaming one tensor "
                    "at a time. Methods: " + ", ".join(sorted(REGISTRY)) + ".",
    )
    p.add_argument("config_file", help="the merge recipe (YAML)")
    p.add_argument("out_path", help="output model directory (written atomically; replaced if it exists)")
    p.add_argument("--device", default=None, help="torch device for the arithmetic, e.g. cpu, cuda, cuda:1 "
                                                  "(default cpu)")
    p.add_argument("--cuda", action="store_true", help="shorthand for --device cuda")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="write the tokenizer of tokenizer_source (default: base model) to the output")
    p.add_argument("--out-shard-size", default="5B", type=parse_size,
                   help="largest output shard, e.g. 500M, 2G, 5B (billions of bytes); default 5B")
    p.add_argument("--allow-crimes", action="store_true",
                   help="allow merging models of different architectures (model_type)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run code shipped with a model when loading its tokenizer")
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed for randomized methods (dare_*, della*): same seed, same output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin pickles (with torch's weights_only unpickler); only for files you "
                        "trust. By default only safetensors are read")
    p.add_argument("--lazy-unpickle", action="store_true",
                   help="accepted for mergekit compatibility: pickles are always memory-mapped; implies nothing "
                        "without --allow-pickle")
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md with the recipe and method (default on)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--print-plan", action="store_true", help="print the per-tensor plan and exit without writing")
    p.add_argument("--upload", metavar="REPO_ID", default=None,
                   help="after merging, push the model to this Hugging Face Hub repo (created if missing; token "
                        "from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --upload: create the repo private")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout (output path, tensors, bytes, seconds, peak memory)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.upload:
        parser.error("--private only applies with --upload REPO_ID")
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = args.device or ("cuda" if args.cuda else "cpu")
    try:
        if args.upload:
            check_upload_target(args.upload)
        config = load_recipe(args.config_file)
        recipe_text = Path(args.config_file).read_text()
        options = MergeOptions(
            device=device, copy_tokenizer=args.copy_tokenizer, out_shard_size=args.out_shard_size,
            allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code,
            random_seed=args.random_seed, lazy_unpickle=args.lazy_unpickle, allow_pickle=args.allow_pickle,
            write_model_card=args.write_model_card, progress=args.progress,
            recipe_text=recipe_text,
        )
        if args.print_plan:
            plan, _ = plan_merge(config, options)
            print(plan.describe())
            return 0
        out = run_merge(config, args.out_path, options)
    except (RecipeError, ModelLoadError, PlanError, MergeError, UploadError, ValueError) as e:
        print(f"mergekit-yaml: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    uploaded = None
    if args.upload:
        try:
            uploaded = upload_model(out, args.upload, private=args.private)
        except UploadError as e:
            print(f"mergekit-yaml: error: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(dumps({**model_summary(out), "seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib(),
                     "uploaded": uploaded}))
    else:
        print(f"merged model written to {out}" + (f"; uploaded to {args.upload} ({uploaded})" if uploaded else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
