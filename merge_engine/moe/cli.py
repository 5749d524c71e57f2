"""mergekit-moe: assemble a Mixtral, Qwen2-MoE or Qwen3-MoE model from dense experts sharing a base."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .. import interrupts
from ..cli import STOPS, _interrupted, add_merge_options, merge_options, stopped
from ..io.output import FLAG
from ..summary import dumps, model_summary, peak_rss_mib
from ..version import evomerge_version
from .build import open_sources, plan_moe, run_moe
from .config import GATE_MODES, load_moe_config

PROG = "mergekit-moe"
ALL_SAME = "--i-understand-this-is-not-useful-without-training"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Create a mixture-of-experts model from dense models sharing a base: attention, norms and "
                    "embeddings from base_model, each expert's MLP from its source_model, and a router per layer "
                    "from gate_mode. Output: Mixtral (default, from Llama / Mistral), Qwen2-MoE (architecture: "
                    "qwen, one shared expert) or Qwen3-MoE (from Qwen3 models); DeepSeek-MoE is refused (it needs "
                    "remote code). Streamed one tensor at a time and moved into place when complete. Gate modes: "
                    + "; ".join(f"{k}: {v}" for k, v in GATE_MODES.items()) + ".")
    p.add_argument("config_file", help="the mergekit-moe YAML (base_model, gate_mode, dtype, experts_per_token, "
                                       "experts: [{source_model, positive_prompts, negative_prompts, noise_scale, "
                                       "residual_scale}], shared_experts, architecture)")
    p.add_argument("out_path", help="output model directory: built aside and moved into place when complete; a "
                                    "previous evomerge output there is replaced, other files are kept")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="not supported (refused with an error): the hidden-state passes run in the base's dtype")
    p.add_argument("--load-in-8bit", action="store_true",
                   help="not supported (refused with an error): the hidden-state passes run in the base's dtype")
    p.add_argument(ALL_SAME, dest="allow_all_same", action="store_true",
                   help="allow every expert to be the same model (useful only as a start for training)")
    add_merge_options(p)
    helps = {
        "device": "torch device for the hidden-state forward passes of the hidden gate modes: cpu (default), cuda, "
                  "cuda:N or auto; tensors are copied on the CPU",
        "copy_tokenizer": "copy the base model's tokenizer files to the output (default on)",
        "out_shard_size": "largest output shard, e.g. 500M, 2G, 5B (billions of bytes); default 5B",
        "write_model_card": "write README.md naming the base, the experts and the recipe (default on); the recipe "
                            "is always kept in mergekit_moe_config.yml",
        "allow_crimes": "allow Llama and Mistral models to be mixed (same shapes); shapes are always checked",
        "trust_remote_code": "let transformers run model-shipped code (tokenizer, config, the base's forward pass)",
        "random_seed": "seed of the random and uniform_random gates and of experts' noise_scale (default 0: "
                       "reproducible; with the same seed the random gates are mergekit's)",
        "unsafe_truncate_embeddings": "not supported: refused with an error (the embeddings are the base's)",
        "lora_merge_dtype": "dtype a base+lora reference's base tensors are read as before the adapter update",
    }
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no closing message")
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT_PATH that evomerge did not write, as mergekit does: files of the "
                        "same name are replaced (each named in a warning), the others kept")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--print-plan", action="store_true",
                   help="print every output tensor and its source, and exit without computing gates or writing")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout (output path, tensors, bytes, seconds, peak memory)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (mergekit's -v, repeatable)")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with interrupts.handled():
        try:
            if args.load_in_4bit or args.load_in_8bit:
                flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
                raise ValueError(f"{flag} is not supported (no bitsandbytes quantisation here): the hidden-state "
                                 "passes run in the base model's stored dtype; run without it, or use gate_mode "
                                 "cheap_embed, which runs no forward pass")
            options = merge_options(args, progress=args.progress and not args.quiet)
            options = options.model_copy(update={"write_into_existing": args.write_into_existing})
            config = load_moe_config(args.config_file, args.allow_all_same)
            if args.print_plan:
                print(plan_moe(config, open_sources(config, options), options.allow_crimes,
                               options.trust_remote_code).describe())
                return 0
            text = Path(args.config_file).read_text()
            out = run_moe(config, args.out_path, options, text, protect=[Path(args.config_file)])
        except STOPS as e:
            return stopped(e, PROG, lambda signum, done: _interrupted(args.out_path, signum, done, PROG))
    if args.json:
        print(dumps({**model_summary(out), "seconds": round(time.perf_counter() - started, 3),
                     "peak_rss_mib": peak_rss_mib()}))
    elif not args.quiet:
        print(f"mixture-of-experts model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
