"""mergekit-yaml: merge models as a YAML recipe says."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import interrupts
from .config import load_recipe
from .dtypes import RECIPE_DTYPES
from .errors import EngineError
from .io.output import FLAG, OutputError
from .merge import plan_merge, run_merge
from .methods import REGISTRY
from .options import MergeOptions, parse_size, resolve_device
from .publish import UploadError, check_upload_target, upload_model
from .summary import dumps, model_summary, peak_rss_mib
from .version import evomerge_version

# mergekit-yaml flags that change nothing here, and why (also shown in --help).
NO_EFFECT = {
    "low_cpu_memory": "tensors are streamed one at a time anyway; results stay on the merge device only while "
                      "their job runs",
    "clone_tensors": "every output tensor is a fresh tensor already (a layer used twice is merged twice)",
    "read_to_gpu": "inputs are read to CPU and moved to --device per tensor",
    "multi_gpu": "one device per merge; use --device to pick it",
    "async_write": "shards are written as their tensors complete",
}


def _flag(p: argparse._ActionsContainer, name: str, help: str, default: bool = False) -> None:
    """A mergekit-style boolean: --name / --no-name."""
    p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help)


def add_merge_options(p: argparse.ArgumentParser) -> None:
    """The options of every merge (mergekit's add_merge_options): mergekit-yaml's and mergekit-multi's."""
    g = p.add_argument_group("device and performance")
    g.add_argument("--device", default=None, help="torch device for the arithmetic: cpu (default), cuda, cuda:N, "
                                                  "or auto (cuda when available, else cpu); an unavailable device "
                                                  "is an error before any work")
    _flag(g, "cuda", "shorthand for --device cuda")
    g.add_argument("--gpu-rich", action="store_true",
                   help="mergekit's alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu: here --cuda")
    g.add_argument("--num-threads", "-j", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads and interop threads); default: torch's")
    for name, why in NO_EFFECT.items():
        _flag(g, name.replace("_", "-"), f"accepted for mergekit compatibility, no effect: {why}")
    g.add_argument("--write-threads", type=int, default=1,
                   help=f"accepted for mergekit compatibility, no effect: {NO_EFFECT['async_write']}")
    _flag(g, "lazy-unpickle", "accepted for mergekit compatibility: pickles (read only with --allow-pickle) "
                              "are always memory-mapped")
    o = p.add_argument_group("output")
    _flag(o, "copy-tokenizer", "write the tokenizer of tokenizer_source (default: base model) to the output",
          default=True)
    o.add_argument("--out-shard-size", default="5B", type=parse_size,
                   help="largest output shard, e.g. 500M, 2G, 5B (billions of bytes); default 5B")
    _flag(o, "write-model-card", "write README.md with the recipe and method (default on)", default=True)
    _flag(o, "safe-serialization", "output is always safetensors: --no-safe-serialization (pickled "
                                   "pytorch_model.bin) is accepted with a warning and still writes safetensors",
          default=True)
    s = p.add_argument_group("storage")
    s.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="Hugging Face hub cache for hub ids (default: huggingface_hub's, HF_HOME/HF_HUB_CACHE)")
    s.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                   help="write each base+adapter reference, merged, to a model directory here (mergekit's "
                        "naming) and reuse it on later runs; without it adapters are applied tensor by tensor "
                        "while merging and no merged copy is written")
    s.add_argument("--lora-merge-dtype", default=None, choices=sorted(RECIPE_DTYPES),
                   help="dtype a LoRA's base tensors are read as before the adapter update (default: as stored)")
    d = p.add_argument_group("dangerous options")
    _flag(d, "allow-crimes", "allow merging models of different architectures (model_type)")
    _flag(d, "trust-remote-code", "let transformers run code shipped with a model when loading its tokenizer")
    _flag(d, "unsafe-truncate-embeddings", "not supported: refused with an error (models with different "
                                           "vocabularies need a tokenizer_source)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin pickles (with torch's weights_only unpickler); only for files you "
                        "trust. By default only safetensors are read")
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed for randomized methods (dare_*, della*, arcee_fusion above 1M entries): same seed, "
                        "same output; overrides the recipe's random_seed")


def merge_options(args: argparse.Namespace, recipe_text: str | None = None, progress: bool = True) -> MergeOptions:
    """MergeOptions from add_merge_options' flags; ValueError for an unavailable device or thread count."""
    if args.unsafe_truncate_embeddings:
        raise ValueError("--unsafe-truncate-embeddings is not supported; merge models with the same "
                         "vocabulary, or pick the vocabulary with tokenizer_source")
    if not args.safe_serialization:
        logging.warning("--no-safe-serialization: output is written as safetensors anyway (pickles can "
                        "run arbitrary code when loaded)")
    device = resolve_device(args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu"))
    apply_threads(args.num_threads)
    return MergeOptions(
        device=device, copy_tokenizer=args.copy_tokenizer, out_shard_size=args.out_shard_size,
        allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code,
        random_seed=args.random_seed, lazy_unpickle=args.lazy_unpickle, allow_pickle=args.allow_pickle,
        write_model_card=args.write_model_card, progress=progress,
        transformers_cache=args.transformers_cache, lora_merge_dtype=args.lora_merge_dtype,
        lora_merge_cache=args.lora_merge_cache, recipe_text=recipe_text,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-yaml",
        description="Merge Hugging Face models as a mergekit-style YAML recipe describes, streaming one tensor "
                    "at a time. Models are local directories, hub ids (org/name[@revision], through the "
                    "huggingface_hub cache) or base+lora_adapter references. Methods: "
                    + ", ".join(sorted(REGISTRY)) + ".",
    )
    p.add_argument("config_file", help="the merge recipe (YAML)")
    p.add_argument("out_path", help="output model directory: built aside and moved into place when complete; a "
                                    "previous evomerge output there is replaced, other files are kept")
    add_merge_options(p)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no closing message")
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT_DIR that evomerge did not write, as mergekit does: files "
                        "of the same name are replaced (each named in a warning), the others kept")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--print-plan", action="store_true", help="print the per-tensor plan and exit without writing")
    p.add_argument("--upload", metavar="REPO_ID", default=None,
                   help="after merging, push the model to this Hugging Face Hub repo (created if missing; token "
                        "from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --upload: create the repo private")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout (output path, tensors, bytes, seconds, peak memory)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (mergekit's -v, repeatable)")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def apply_threads(num_threads: int | None) -> None:
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"--num-threads {num_threads}: must be at least 1")
    torch.set_num_threads(num_threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work; harmless to skip later
        torch.set_num_interop_threads(num_threads)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process is this command (mergekit-yaml, python -m merge_engine.cli), not a caller's
        # The objects made by importing torch (~0.5M) live until exit; frozen, the collector never walks them
        # again, which saves the full collection at interpreter exit (~0.25 s on the bench machine). A caller
        # that passes argv keeps its collector as it was (frozen garbage would never be freed).
        gc.freeze()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.upload:
        parser.error("--private only applies with --upload REPO_ID")
    started = time.perf_counter()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: where a slow merge is
        with contextlib.suppress(AttributeError, ValueError, OSError):  # stderr without a file (captured)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with interrupts.handled():
        try:
            if args.upload:
                check_upload_target(args.upload)
            config = load_recipe(args.config_file)
            options = merge_options(args, Path(args.config_file).read_text(), args.progress and not args.quiet)
            options = options.model_copy(update={"write_into_existing": args.write_into_existing})
            if args.print_plan:
                plan, _ = plan_merge(config, options)
                print(plan.describe())
                return 0
            out = run_merge(config, args.out_path, options, protect=[Path(args.config_file)])
        except (*STOPS, UploadError) as e:
            return stopped(e, "mergekit-yaml", lambda signum, done: _interrupted(args.out_path, signum, done))
    seconds = time.perf_counter() - started
    uploaded = None
    if args.upload:
        try:
            uploaded = upload_model(out, args.upload, private=args.private)
        except UploadError as e:
            return _error(str(e), 1)
    if args.json:
        print(dumps({**model_summary(out), "seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib(),
                     "uploaded": uploaded}))
    elif not args.quiet:
        print(f"merged model written to {out}" + (f"; uploaded to {args.upload} ({uploaded})" if uploaded else ""))
    return 0


def build_multi_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-multi",
        description="Run a set of merge recipes that build on each other: CONFIG_FILE holds several YAML "
                    "documents (separated by ---), each a recipe; `name: X` makes a stage written to "
                    "INTERMEDIATE_DIR/X that other documents may name as a model; the one document without a "
                    "name is the final merge, written to --out-path. Stages run in dependency order, each "
                    "written atomically; a stage already built from the same recipe and inputs is re-used.")
    p.add_argument("config_file", help="multi-document YAML: one recipe per stage")
    p.add_argument("--out-path", default=None, help="where the final (unnamed) merge goes; required when the file "
                                                    "has one")
    p.add_argument("--intermediate-dir", "-I", required=True,
                   help="directory for the named stages' outputs (INTERMEDIATE_DIR/NAME)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="re-use stages already built from the same recipe and inputs (default); --no-lazy "
                        "merges every stage again")
    add_merge_options(p)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars and no stage messages")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def multi_main(argv: list[str] | None = None) -> int:
    """mergekit-multi."""
    from .multi import load_stages, run_stages

    args = build_multi_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    report = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    with interrupts.handled():
        try:
            options = merge_options(args, progress=args.progress and not args.quiet)
            stages = load_stages(args.config_file, args.intermediate_dir)
            if any(s.name is None for s in stages) and not args.out_path:
                raise ValueError(f"{args.config_file} has a final merge (a document without a name): give "
                                 "--out-path for it")
            done = run_stages(stages, args.intermediate_dir, args.out_path, options, args.lazy,
                              protect=(Path(args.config_file),), report=report)
        except STOPS as e:
            return stopped(e, "mergekit-multi", _stage_interrupted)
    if not args.quiet:
        final = done.get(None)
        print(f"{len(done)} stage(s) done" + (f"; final merge in {final}" if final else ""))
    return 0


def _stage_interrupted(signum: int, committed: bool) -> int:
    name, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("Ctrl-C", 130)
    where = "just after a stage was complete (it is in place)" if committed else \
        "the stage being merged was removed and its directory is as it was before this run"
    return _error(f"interrupted ({name}): {where}; the stages completed before it are kept and are re-used by the "
                  "next run", code, "mergekit-multi")


SURGEON = "mergekit-tokensurgeon"


def build_surgeon_parser() -> argparse.ArgumentParser:
    from .surgeon.approximate import UNSUPPORTED, WEIGHT_SCHEMES, Method
    from .surgeon.surgery import MATCH_CHOICES

    p = argparse.ArgumentParser(
        prog=SURGEON,
        description="Give MODEL the tokenizer of DONOR: rows of the input embedding (and of an untied output "
                    "head) for tokens both vocabularies share are MODEL's own, matched by token text whatever "
                    "their ids; rows of the DONOR's other tokens are approximated from the shared ones. Only the "
                    "embedding and head matrices are held in memory; the output is written atomically.")
    p.add_argument("model", help="the model to operate on (directory, hub id, base+lora)")
    p.add_argument("donor", help="the model whose tokenizer the output gets")
    p.add_argument("out_path", help="output model directory (built aside, moved into place when complete)")
    g = p.add_argument_group("approximation")
    g.add_argument("-a", "--approximation-method", default="omp", choices=[m.value for m in Method] + list(UNSUPPORTED),
                   help="how rows of new tokens are made: omp (orthogonal matching pursuit over the shared tokens, "
                        "default), common_interpolation (k nearest shared tokens), mean (the mean row), zero, randn, "
                        "john_hewitt (samples of the rows' mean and covariance). "
                        + ", ".join(UNSUPPORTED) + ": not supported (an error)")
    g.add_argument("-k", "--k", type=int, default=64,
                   help="shared tokens per new token for omp and common_interpolation (default 64)")
    g.add_argument("-c", "--cosine-similarity", dest="cosine_similarity", action="store_true", default=False,
                   help="common_interpolation: nearest tokens by cosine similarity")
    g.add_argument("-nc", "--no-cosine-similarity", dest="cosine_similarity", action="store_false",
                   help="common_interpolation: nearest tokens by euclidean distance (default)")
    g.add_argument("-w", "--weight-scheme", default="distance_proportional", choices=WEIGHT_SCHEMES,
                   help="common_interpolation: weights of the neighbours (default distance_proportional)")
    g.add_argument("-s", "--subword-method", default="mean", choices=["mean", "sum", "weighted_mean", "first_last"],
                   help="accepted for mergekit compatibility, no effect: only -a subword uses it, which is not "
                        "supported")
    g.add_argument("--batch-size", type=int, default=512,
                   help="new tokens approximated per batch (default 512); -1: all at once")
    g.add_argument("-pm", "--prefix-match", default="no", choices=MATCH_CHOICES,
                   help="give a new token the row of its longest prefix MODEL has, in both matrices (yes), only "
                        "the input embedding (embed) or only the head (lm_head); default no")
    g.add_argument("-bm", "--byte-match", default="no", choices=MATCH_CHOICES,
                   help="give a character the row of MODEL's byte token for it (and the reverse: <0x61> <-> a), "
                        "in yes/embed/lm_head as --prefix-match; default no")
    _flag(g, "magikarp", "filter out poorly trained tokens: not supported, --magikarp is an error")
    g.add_argument("-nvn", "--new-vocab-noise", type=float, default=None,
                   help="add gaussian noise of this standard deviation to new rows (seeded by --random-seed)")
    g.add_argument("-nvs", "--new-vocab-scale", type=float, default=None, help="multiply new rows by this factor")
    add_merge_options(p)
    helps = {
        "copy_tokenizer": "the output always has DONOR's tokenizer: --no-copy-tokenizer is an error",
        "allow_crimes": "accepted for mergekit compatibility, no effect: MODEL and DONOR may differ in "
                        "architecture and width anyway (only DONOR's embeddings are read)",
        "random_seed": "seed of randn, john_hewitt and --new-vocab-noise (default 0: runs are reproducible)",
        "write_model_card": "write README.md naming MODEL, DONOR and the method (default on)",
        "device": "torch device for the approximation: cpu (default), cuda, cuda:N, or auto",
    }
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no closing message")
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT_PATH that evomerge did not write, as mergekit does")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (the token breakdown)")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def surgeon_options(args: argparse.Namespace):
    """SurgeryOptions from the command's flags; ValueError for what is not supported."""
    from .surgeon.approximate import UNSUPPORTED, Approximation, Method
    from .surgeon.surgery import SurgeryOptions

    method = args.approximation_method
    if method in UNSUPPORTED:
        raise ValueError(f"-a {method} is not supported ({UNSUPPORTED[method]}); use one of "
                         + ", ".join(m.value for m in Method))
    if args.magikarp:
        raise ValueError("--magikarp is not supported; run without it")
    if not args.copy_tokenizer:
        raise ValueError("--no-copy-tokenizer: the output's vocabulary is DONOR's, so its tokenizer is always "
                         "written; run without the flag")
    approx = Approximation(Method(method), args.k, args.cosine_similarity, args.weight_scheme,
                           args.new_vocab_noise, args.new_vocab_scale)
    return SurgeryOptions(approx, args.batch_size if args.batch_size > 0 else None, args.prefix_match,
                          args.byte_match, args.random_seed if args.random_seed is not None else 0)


def surgeon_main(argv: list[str] | None = None) -> int:
    """mergekit-tokensurgeon."""
    from .surgeon import run_tokensurgeon

    args = build_surgeon_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with interrupts.handled():
        try:
            surgery = surgeon_options(args)
            options = merge_options(args, progress=args.progress and not args.quiet)
            options = options.model_copy(update={"write_into_existing": args.write_into_existing})
            out = run_tokensurgeon(args.model, args.donor, args.out_path, surgery, options)
        except STOPS as e:
            return stopped(e, SURGEON, lambda signum, done: _interrupted(args.out_path, signum, done, SURGEON))
    if not args.quiet:
        print(f"{args.model} with the tokenizer of {args.donor} written to {out}")
    return 0


def build_pytorch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-pytorch",
        description="Merge flat PyTorch state dicts (one .safetensors file, or a pickle with --allow-pickle, per "
                    "model) as a mergekit-style recipe without slices says, tensor by tensor, into OUT_PATH.")
    p.add_argument("config_file", help="the recipe: merge_method, models (state-dict files), parameters, "
                                       "base_model, dtype, out_dtype")
    p.add_argument("out_path", help="output directory (safetensors shards and index), built aside and moved into "
                                    "place when complete")
    missing = p.add_mutually_exclusive_group()
    missing.add_argument("--tensor-intersection", "-i", action="store_true",
                         help="only merge tensors present in every file")
    missing.add_argument("--tensor-union", "-u", action="store_true",
                         help="merge every tensor present in any file, from the files that have it")
    add_merge_options(p)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT_PATH that evomerge did not write, as mergekit does")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def pytorch_main(argv: list[str] | None = None) -> int:
    """mergekit-pytorch."""
    from .raw import Missing, load_raw_config, run_raw

    args = build_pytorch_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with interrupts.handled():
        try:
            options = merge_options(args, progress=args.progress and not args.quiet)
            options = options.model_copy(update={"write_into_existing": args.write_into_existing})
            config = load_raw_config(args.config_file)
            missing: Missing = "intersection" if args.tensor_intersection else \
                "union" if args.tensor_union else "error"
            out = run_raw(config, args.out_path, options, missing, protect=(Path(args.config_file),))
        except STOPS as e:
            return stopped(e, "mergekit-pytorch",
                           lambda signum, done: _interrupted(args.out_path, signum, done, "mergekit-pytorch"))
    if not args.quiet:
        print(f"merged state dict written to {out}")
    return 0


# what a command stops on with one `PROG: error:` line: user-fixable problems (exit 2) and interrupts
STOPS = (KeyboardInterrupt, EngineError, OutputError, ValueError, OSError)


def stopped(e: BaseException, prog: str, interrupted: Callable[[int, bool], int]) -> int:
    """The exit code and one error line for an exception in STOPS: an interrupt, or a signal a library turned
    into its own error, goes to `interrupted(signum, committed)` (130 / 143); anything else is exit 2."""
    signum = interrupts.received()
    if isinstance(e, KeyboardInterrupt) or signum is not None:
        return interrupted(signum or signal.SIGINT, isinstance(e, KeyboardInterrupt) and getattr(e, "committed", False))
    if isinstance(e, OSError):
        what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        return _error(f"{what} (check the path and its permissions)", prog=prog)
    return _error(str(e), prog=prog)


def _interrupted(out_path: str, signum: int, committed: bool, prog: str = "mergekit-yaml",
                 result: str = "the new model") -> int:
    name, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("Ctrl-C", 130)
    if committed:
        return _error(f"interrupted ({name}) just after {out_path} was complete; {result} is in place", code, prog)
    return _error(f"interrupted ({name}); the partial output was removed and {out_path} is as it was before "
                  "this run", code, prog)


def _error(message: str, code: int = 2, prog: str = "mergekit-yaml") -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
