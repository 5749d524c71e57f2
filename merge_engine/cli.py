"""mergekit-yaml: merge models as a YAML recipe says."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .config import RecipeError, load_recipe
from .executor import MergeError
from .io.loader import ModelLoadError
from .io.output import FLAG, OutputError, Terminated
from .merge import plan_merge, run_merge
from .methods import REGISTRY
from .options import MergeOptions, parse_size
from .plan import PlanError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-yaml",
        description="Merge Hugging Face models as a mergekit-style YAML recipe describes, streaming one tensor "
                    "at a time. Methods: " + ", ".join(sorted(REGISTRY)) + ".",
    )
    p.add_argument("config_file", help="the merge recipe (YAML)")
    p.add_argument("out_path", help="output model directory: built aside and moved into place when complete; a "
                                    "previous evomerge output there is replaced, other files are kept")
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
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT_DIR that evomerge did not write, as mergekit does: files "
                        "of the same name are replaced (each named in a warning), the others kept")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--print-plan", action="store_true", help="print the per-tensor plan and exit without writing")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


class _Signals:
    """SIGINT and SIGTERM raise (KeyboardInterrupt, Terminated) so that the output's cleanup runs; the
    signal is also recorded, since a library may wrap the exception in its own error on the way up."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _raise(self, signum: int, frame: object) -> None:
        self.received = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def __enter__(self) -> _Signals:  # noqa: PYI034
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._raise)
            except ValueError:  # not the main thread: leave the process's handlers alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = args.device or ("cuda" if args.cuda else "cpu")
    with _Signals() as signals:
        try:
            config = load_recipe(args.config_file)
            options = MergeOptions(
                device=device, copy_tokenizer=args.copy_tokenizer, out_shard_size=args.out_shard_size,
                allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code,
                random_seed=args.random_seed, lazy_unpickle=args.lazy_unpickle, allow_pickle=args.allow_pickle,
                write_model_card=args.write_model_card, progress=args.progress,
                write_into_existing=args.write_into_existing,
            )
            if args.print_plan:
                plan, _ = plan_merge(config, options)
                print(plan.describe())
                return 0
            out = run_merge(config, args.out_path, options, protect=[Path(args.config_file)])
        except KeyboardInterrupt as e:
            return _interrupted(args.out_path, signals.received or signal.SIGINT, getattr(e, "committed", False))
        except (RecipeError, ModelLoadError, PlanError, MergeError, OutputError, ValueError) as e:
            if signals.received is not None:  # a signal that a library turned into its own error
                return _interrupted(args.out_path, signals.received, False)
            return _error(str(e))
        except OSError as e:
            if signals.received is not None:
                return _interrupted(args.out_path, signals.received, False)
            what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
            return _error(f"{what} (check the path and its permissions)")
    print(f"merged model written to {out}")
    return 0


def _interrupted(out_path: str, signum: int, committed: bool) -> int:
    name, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("Ctrl-C", 130)
    if committed:
        return _error(f"interrupted ({name}) just after {out_path} was complete; the new model is in place", code)
    return _error(f"interrupted ({name}); the partial output was removed and {out_path} is as it was before "
                  "this run", code)


def _error(message: str, code: int = 2) -> int:
    print(f"mergekit-yaml: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
