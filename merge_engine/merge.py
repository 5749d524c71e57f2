"""run_merge: recipe + options -> a Hugging Face model directory, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import MergeConfig
from .executor import execute_plan
from .io import artifacts
from .io.loader import ModelSource
from .io.output import atomic_directory, check_not_an_input
from .io.writer import ShardedSafetensorsWriter, TensorLayout
from .options import MergeOptions
from .plan import MergePlan, build_plan

log = logging.getLogger(__name__)


def open_sources(config: MergeConfig, options: MergeOptions, cache: bool = False) -> dict[str, ModelSource]:
    return {m: ModelSource(m, allow_pickle=options.allow_pickle, cache=cache)
            for m in config.referenced_models()}


def plan_merge(config: MergeConfig, options: MergeOptions | None = None,
               sources: dict[str, ModelSource] | None = None) -> tuple[MergePlan, dict[str, ModelSource]]:
    options = options or MergeOptions()
    sources = sources or open_sources(config, options)
    return build_plan(config, sources, options.random_seed, options.allow_crimes), sources


def run_merge(config: MergeConfig, out_path: str | Path, options: MergeOptions | None = None) -> Path:
    """Merge and write the model to out_path. Nothing is left at out_path on failure."""
    options = options or MergeOptions()
    out_path = Path(out_path)
    sources = open_sources(config, options)
    check_not_an_input(out_path, [s.path for s in sources.values()])
    plan, _ = plan_merge(config, options, sources)
    tok_source = artifacts.tokenizer_source(config, plan.reference_model) if options.copy_tokenizer else None
    layouts = [TensorLayout(j.output_name, j.shape, j.out_dtype) for j in plan.jobs]
    with atomic_directory(out_path) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layouts, options.out_shard_size)
        try:
            execute_plan(plan.jobs, sources, writer, options.device, options.progress)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        out_dtype = config.out_dtype or config.dtype or str(plan.jobs[0].out_dtype).removeprefix("torch.")
        artifacts.write_config(tmp, plan.config_json, out_dtype)
        artifacts.copy_generation_config(tmp, sources[plan.reference_model])
        if tok_source is not None:
            artifacts.write_tokenizer(tmp, sources[tok_source], config.chat_template, options.trust_remote_code)
        artifacts.write_card_and_recipe(tmp, config, options.write_model_card, options.recipe_text,
                                         options.card_extra)
    log.info("wrote %d tensors, %d layers to %s", len(plan.jobs), plan.num_output_layers, out_path)
    return out_path
