"""The engine's entry points.

One path from a recipe to merged tensors, whatever receives them:
:func:`plan_merge` plans the recipe against the opened models (every check that
needs no tensor data happens there, ``--allow-crimes`` included) and
:func:`write_plan` opens a sink for that plan and streams every merged tensor into
it. :func:`run_merge` uses them with a sharded safetensors writer and writes the
rest of a model directory around it; evolve's in-memory materializer uses them with
a sink that copies into a resident model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from .config import MergeConfig
from .dtypes import dtype_name
from .executor import execute_plan
from .io import artifacts
from .io.loader import ModelSource
from .io.output import check_collisions, check_output, check_space, output_directory
from .io.preflight import check_tokenizer, output_bytes
from .io.references import open_model
from .io.writer import ShardedSafetensorsWriter, TensorLayout, TensorSink
from .options import MergeOptions
from .plan import MergePlan, build_plan
from .tokenizer import OutputTokenizer, plan_output_tokenizer, write_tokenizer

log = logging.getLogger(__name__)

SinkOpener = Callable[[MergePlan], contextlib.AbstractContextManager[TensorSink]]
# known before merging; shard and tokenizer names at the end
OUTPUT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "mergekit_config.yml", "README.md", *artifacts.PROCESSOR_FILES)



def open_sources(models: Iterable[str], options: MergeOptions, cache: bool = False,
                 opened: Mapping[str, ModelSource] | None = None) -> dict[str, ModelSource]:
    """A ModelSource for each model reference (directory, hub id, base+LoRA), reusing those in `opened`."""
    opened = opened or {}
    return {m: opened[m] if m in opened else open_model(
                m, allow_pickle=options.allow_pickle, cache=cache, cache_dir=options.transformers_cache,
                lora_dtype=options.lora_merge_dtype, lora_merge_cache=options.lora_merge_cache)
            for m in models}


def plan_merge(config: MergeConfig, options: MergeOptions | None = None,
               sources: Mapping[str, ModelSource] | None = None,
               tokenizer: OutputTokenizer | None = None) -> tuple[MergePlan, Mapping[str, ModelSource]]:
    """The recipe's plan against its models (opened here unless given), with the output
    vocabulary's alignment (planned here unless given)."""
    options = options or MergeOptions()
    if sources is None:
        sources = open_sources(config.referenced_models(), options)
    tokenizer = tokenizer or plan_output_tokenizer(config, sources, options.trust_remote_code)
    seed = options.random_seed if options.random_seed is not None else config.random_seed
    return build_plan(config, sources, seed, options.allow_crimes, tokenizer.alignment), sources


def write_plan(plan: MergePlan, sources: Mapping[str, ModelSource], open_sink: SinkOpener,
               options: MergeOptions) -> None:
    """Open a sink for the plan and write every merged tensor into it."""
    with open_sink(plan) as sink:
        execute_plan(plan.jobs, sources, sink, options.device, options.progress, options.release_largest_blocks)


def safetensors_sink(out_dir: Path, max_shard_bytes: int, direct: bool = True) -> SinkOpener:
    """Opens a sharded safetensors writer into out_dir for a plan (O_DIRECT unless `direct` is False);
    its index is written when every tensor has arrived."""
    @contextlib.contextmanager
    def open_writer(plan: MergePlan) -> Iterator[TensorSink]:
        layouts = [TensorLayout(j.output_name, j.shape, j.out_dtype) for j in plan.jobs]
        writer = ShardedSafetensorsWriter(out_dir, layouts, max_shard_bytes, direct)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.finish()

    return open_writer


def run_merge(config: MergeConfig, out_path: str | Path, options: MergeOptions | None = None, *,
              protect: Sequence[Path] = ()) -> Path:
    """Merge and write the model to out_path (rules: io/output.py). Everything that can be checked
    before the first tensor is read is checked first; on failure out_path is left as it was.
    `protect`: paths out_path must not contain (the recipe file)."""
    options = options or MergeOptions()
    out_path = Path(out_path)
    sources = open_sources(config.referenced_models(), options)
    target = check_output(out_path, inputs=[s.path for s in sources.values()], protected=protect,
                          write_into_existing=options.write_into_existing)
    tokenizer = plan_output_tokenizer(config, sources, options.trust_remote_code)
    plan, _ = plan_merge(config, options, sources, tokenizer)  # fails before anything is created
    copy_tokenizer = options.copy_tokenizer or tokenizer.copy_from is None  # a built vocabulary is always written
    if copy_tokenizer and tokenizer.copy_from is not None:
        check_tokenizer(tokenizer.copy_from, str(tokenizer.copy_from), config.chat_template,
                        options.trust_remote_code)
    check_collisions(target, OUTPUT_FILES)
    needed = output_bytes(sum(TensorLayout(j.output_name, j.shape, j.out_dtype).nbytes for j in plan.jobs),
                          tokenizer.copy_from if copy_tokenizer else None)
    check_space(target, needed)
    with output_directory(target, needed) as tmp:
        write_plan(plan, sources, safetensors_sink(tmp, options.out_shard_size, options.direct_io), options)
        reference = sources[plan.reference_model]
        artifacts.write_config(tmp, reference.config, plan.layer_sources,
                               dtype_name(plan.out_dtype),
                               tokenizer.alignment.size if tokenizer.alignment is not None else None)
        artifacts.copy_generation_config(tmp, reference)
        artifacts.copy_processor_files(tmp, reference)
        if copy_tokenizer:
            write_tokenizer(tmp, tokenizer, config.chat_template)
        artifacts.write_card_and_recipe(tmp, config, options.write_model_card, options.recipe_text,
                                        options.card_extra)
    log.info("wrote %d tensors, %d layers to %s", len(plan.jobs), plan.num_output_layers, out_path)
    return out_path
