"""mergekit-extract-lora: a fine-tuned model's difference from its base as a PEFT LoRA adapter.

Drop-in for mergekit 0.1.5's command (same flags, same adapter layout); streamed one module at a time and
written atomically as mergekit-yaml's output is. The math and the module rules: merge_engine/lowrank.py.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml

from . import interrupts
from .card import hub_ids
from .cli import NO_EFFECT, STOPS, _flag, _interrupted, apply_threads, stopped
from .dtypes import RECIPE_DTYPES
from .io.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    CARD,
    REPORT,
    SpooledSafetensorsWriter,
    model_config,
    write_json,
    write_text,
)
from .io.loader import ModelSource
from .io.output import FLAG, check_collisions, check_output, output_directory
from .io.references import open_model
from .lowrank import (
    ExtractOptions,
    ExtractPlan,
    ModuleReport,
    adapter_config,
    energy_summary,
    module_tree,
    plan_extraction,
    report_table,
    run_extraction,
)
from .options import resolve_device
from .summary import dumps, peak_rss_mib
from .version import evomerge_version

PROG = "mergekit-extract-lora"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Extract a PEFT LoRA adapter from a fine-tuned model: the truncated SVD of each module's "
                    "weight delta (fine-tune - base), one module at a time. Embeddings and undecomposable modules "
                    "(norms) are saved at full rank (modules_to_save) as mergekit does. Writes OUT/"
                    f"{ADAPTER_SAFE}, {ADAPTER_CONFIG}, {REPORT} (kept energy per module) and {CARD}.")
    s = p.add_argument_group("script options (mergekit's)")
    s.add_argument("--model", required=True, help="the fine-tuned model (directory, hub id or base+lora reference)")
    s.add_argument("--base-model", required=True, help="the model it was fine-tuned from")
    s.add_argument("--out-path", required=True, help="output adapter directory: built aside and moved into place "
                                                     "when complete")
    s.add_argument("--max-rank", type=int, default=128,
                   help="largest rank per module (default 128); a module's rank is at most min(out, in)")
    _flag(s, "distribute-scale", "split the singular values between A and B as sqrt(s) each (default); "
                                 "--no-distribute-scale puts them all in A", default=True)
    _flag(s, "embed-lora", "decompose the embeddings (lora_embedding_A/B, lm_head as lora_A/B) instead of saving "
                           "them at full rank in modules_to_save (forced off when the vocabularies differ)")
    s.add_argument("--save-module", dest="modules_to_save", action="append", default=[], metavar="NAME",
                   help="save this module at full rank (a full module name or its last component, e.g. lm_head); "
                        "repeatable")
    s.add_argument("--exclude-regex", "-e", dest="exclude_regexes", action="append", default=[], metavar="REGEX",
                   help="leave out modules whose name matches (re.search); repeatable")
    s.add_argument("--include-regex", "-i", dest="include_regexes", action="append", default=[], metavar="REGEX",
                   help="only decompose modules whose name matches one of these; repeatable")
    s.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="also drop singular values at or below this (default 0: keep up to --max-rank); a module "
                        "left with rank 0 is not in the adapter")
    s.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out modules that are not Linear or Embedding (norms, GPT-2's Conv1D) instead of "
                        "saving them at full rank")
    d = p.add_argument_group("device and performance")
    d.add_argument("--device", default=None, help="torch device for the SVDs: cpu (default), cuda, cuda:N or auto")
    _flag(d, "cuda", "shorthand for --device cuda")
    d.add_argument("--gpu-rich", action="store_true", help="mergekit's alias for --cuda --low-cpu-memory "
                                                            "--read-to-gpu --multi-gpu: here --cuda")
    d.add_argument("--num-threads", "-j", type=int, default=None, help="torch CPU threads (default: torch's)")
    for name, why in NO_EFFECT.items():
        _flag(d, name.replace("_", "-"), f"accepted for mergekit compatibility, no effect: {why}")
    d.add_argument("--write-threads", type=int, default=1, help="accepted for mergekit compatibility, no effect")
    _flag(d, "lazy-unpickle", "accepted for mergekit compatibility: pickles (only with --allow-pickle) are always "
                              "memory-mapped")
    o = p.add_argument_group("output")
    o.add_argument("--out-shard-size", default=None, help="accepted for mergekit compatibility, no effect: peft reads "
                                                          f"one {ADAPTER_SAFE}, never sharded")
    _flag(o, "copy-tokenizer", "accepted for mergekit compatibility, no effect: an adapter carries no tokenizer "
                               "(mergekit writes none either)", default=True)
    _flag(o, "write-model-card", f"write {CARD} describing the extraction (default on)", default=True)
    _flag(o, "safe-serialization", "the adapter is always safetensors: --no-safe-serialization warns and still "
                                   "writes safetensors", default=True)
    st = p.add_argument_group("storage")
    st.add_argument("--transformers-cache", default=None, metavar="DIR",
                    help="Hugging Face hub cache for hub ids (default: huggingface_hub's)")
    st.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                    help="for base+lora references: write the merged model here once and read it from there")
    st.add_argument("--lora-merge-dtype", default=None, choices=sorted(RECIPE_DTYPES),
                    help="dtype a base+lora reference's base is read as before the adapter is added")
    g = p.add_argument_group("dangerous options")
    _flag(g, "allow-crimes", "allow a fine-tune and base of different model_type")
    _flag(g, "trust-remote-code", "let transformers run model-shipped code to build the module tree")
    _flag(g, "unsafe-truncate-embeddings", "accepted for mergekit compatibility, no effect (embeddings of "
                                           "different vocabularies are saved at full rank)")
    p.add_argument("--random-seed", type=int, default=None,
                   help="accepted for mergekit compatibility, no effect: the SVD is deterministic")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin pickles (torch's weights_only unpickler); only for files you trust")
    p.add_argument(FLAG, dest="write_into_existing", action="store_true",
                   help="write into a non-empty OUT that evomerge did not write, as mergekit does (files of the same "
                        "name are replaced, the others kept)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no closing table")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--print-plan", action="store_true",
                   help="print what happens to each module (decomposed, saved, left out) and exit without writing")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout instead of the table (output path, energy, seconds, "
                        "peak memory)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (mergekit's -v, repeatable)")
    p.add_argument("--version", action="version", version=f"%(prog)s {evomerge_version()}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    options = ExtractOptions(
        max_rank=args.max_rank, distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
        modules_to_save=tuple(args.modules_to_save), include_regexes=tuple(args.include_regexes),
        exclude_regexes=tuple(args.exclude_regexes), sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable)
    with interrupts.handled():
        try:
            problems = options.problems()
            if problems:
                raise ValueError("; ".join(problems))
            if not args.safe_serialization:
                logging.warning("--no-safe-serialization: the adapter is written as safetensors anyway")
            device = resolve_device(args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu"))
            apply_threads(args.num_threads)
            model, base = (open_model(ref, allow_pickle=args.allow_pickle, cache_dir=args.transformers_cache,
                                      lora_dtype=args.lora_merge_dtype, lora_merge_cache=args.lora_merge_cache)
                           for ref in (args.model, args.base_model))
            _check_model_types(model, base, args.allow_crimes)
            plan = plan_extraction(module_tree(model_config(model.path, args.trust_remote_code),
                                               args.trust_remote_code), model, base, options)
            for w in plan.warnings:
                logging.warning("warning: %s", w)
            if args.print_plan:
                print(plan.describe())
                return 0
            target = check_output(args.out_path, inputs=_input_paths(model, base),
                                  write_into_existing=args.write_into_existing)
            check_collisions(target, [ADAPTER_SAFE, ADAPTER_CONFIG, REPORT, CARD])
            with output_directory(target) as staging:
                reports = _extract(staging, plan, model, base, options, args, device)
        except STOPS as e:
            return stopped(e, PROG, lambda signum, done: _interrupted(args.out_path, signum, done, PROG, "the adapter"))
    summary = energy_summary(reports)
    if args.json:
        print(dumps({"output_path": str(target.path), **summary, "max_rank": max(r.rank or 0 for r in reports),
                     "seconds": round(time.perf_counter() - started, 3), "peak_rss_mib": peak_rss_mib()}))
    elif not args.quiet:
        print(report_table(reports))
        print(f"LoRA adapter written to {target.path}")
    return 0


def _extract(staging: Path, plan: ExtractPlan, model: ModelSource, base: ModelSource, options: ExtractOptions,
             args: argparse.Namespace, device: str) -> list[ModuleReport]:
    writer = SpooledSafetensorsWriter(staging / ADAPTER_SAFE)
    try:
        reports = run_extraction(plan, model, base, writer, options, device, args.progress and not args.quiet)
        config = adapter_config(plan, reports, args.base_model)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_json(staging / ADAPTER_CONFIG, config)
    write_json(staging / REPORT, {"model": args.model, "base_model": args.base_model,
                                  "options": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in vars(options).items()},
                                  **energy_summary(reports), "modules": [r.to_json() for r in reports]})
    if args.write_model_card:
        write_text(staging / CARD, _card(args, reports, config))
    return reports


def _card(args: argparse.Namespace, reports: list[ModuleReport], config: dict) -> str:
    front = {"base_model": hub_ids([args.base_model]), "library_name": "peft",
             "tags": ["mergekit", "evomerge", "peft", "lora"]}
    if not front["base_model"]:
        del front["base_model"]
    s = energy_summary(reports)
    invocation = shlex.join([PROG, *sys.argv[1:]]) if Path(sys.argv[0]).name == PROG else None
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---",
             f"# {Path(args.out_path).name}", "",
             f"A LoRA adapter extracted with `{PROG}` (evomerge) from `{args.model}`, relative to its base "
             f"`{args.base_model}`: the truncated SVD of each module's weight delta, rank up to {config['r']}.", "",
             f"It keeps {100 * s['kept_fraction']:.2f}% of the delta energy (sum of kept squared singular values "
             f"over the total) of the {s['decomposed_modules']} decomposed modules; {s['saved_modules']} modules are "
             f"saved at full rank ({', '.join(config['modules_to_save']) or 'none'}). Per module: `{REPORT}`.", ""]
    if invocation:
        lines += ["```sh", invocation, "```", ""]
    return "\n".join(lines)


def _check_model_types(model: ModelSource, base: ModelSource, allow_crimes: bool) -> None:
    a, b = model.config.get("model_type"), base.config.get("model_type")
    if a != b and not allow_crimes:
        raise ValueError(f"--model {model.name!r} is a {a!r} model and --base-model {base.name!r} a {b!r} model; "
                         "give the base the model was fine-tuned from (or pass --allow-crimes)")


def _input_paths(*sources: ModelSource) -> list[Path]:
    paths = []
    for s in sources:
        paths.append(s.path)
        adapter = getattr(s, "adapter_path", None)
        if adapter is not None:
            paths.append(adapter)
    return paths


if __name__ == "__main__":
    sys.exit(main())

