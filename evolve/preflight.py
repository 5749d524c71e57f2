"""Everything that can be checked before any budget is spent, checked then.

Each failure is a ValueError whose message names the field or flag and says how to fix
it (the CLI prints it as one `mergekit-evolve: error:` line and exits 2). Nothing here
writes to disk.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from merge_engine.config import load_recipe
from merge_engine.io.loader import ModelSource
from merge_engine.merge import plan_merge

from .config import EvolveConfig, LayerPathDefinition, is_recipe
from .genome import Genome
from .layer_path import LayerPathGenome
from .search import SearchSettings, default_popsize, generation_cost

TOKENIZER_KEYWORDS = ("base", "union")  # mergekit's tokenizer_source values that are not a model


@dataclass(frozen=True)
class Checked:
    genome: Genome | LayerPathGenome
    popsize: int


def check_policy(config: EvolveConfig, allow_benchmark_test_sets: bool, vllm: bool) -> None:
    public = config.public_benchmarks()
    if public and not allow_benchmark_test_sets:
        raise ValueError(f"tasks: {', '.join(public)} look like public benchmark test sets; optimising on them "
                         "overfits the benchmark and makes its numbers meaningless. Search on your own or a "
                         "validation task, or pass --allow-benchmark-test-sets if you really mean it")
    if vllm and importlib.util.find_spec("vllm") is None:
        raise ValueError("--vllm: the vllm package is not installed (`pip install vllm`); omit --vllm to "
                         "score with the Hugging Face backend")


def check_weights(config: EvolveConfig) -> None:
    for i, t in enumerate(config.tasks):
        if not math.isfinite(t.weight) or t.weight < 0:
            raise ValueError(f"tasks[{i}].weight: {t.weight} for {t.name!r}; use a finite weight >= 0 (a "
                             "lower-is-better metric such as perplexity is minimised by itself, from lm-eval's "
                             "higher_is_better: no negative weight is needed)")
    if not any(t.weight > 0 for t in config.tasks):
        raise ValueError("tasks: every task weight is 0, so every candidate would score the same; give at least "
                         "one task a weight > 0")


def check_search(settings: SearchSettings, dimension: int) -> int:
    """The population size CMA-ES will use; ValueError when the settings cannot run one generation."""
    if not (math.isfinite(settings.sigma0) and settings.sigma0 > 0):
        raise ValueError(f"--sigma0 {settings.sigma0}: the step size must be a positive number, e.g. 0.25")
    if settings.popsize is not None and settings.popsize < 2:
        raise ValueError(f"--popsize {settings.popsize}: CMA-ES needs at least 2 candidates per generation")
    if settings.screen is not None and not (math.isfinite(settings.screen) and 0 < settings.screen < 1):
        raise ValueError(f"--screen {settings.screen}: the fraction of the documents to screen candidates on must "
                         "be between 0 and 1, e.g. 0.25; leave it out to score every candidate on all of them")
    popsize = settings.popsize or default_popsize(dimension)
    cost = generation_cost(popsize, settings.screen)
    if settings.max_fevals < cost:
        source = "--popsize" if settings.popsize else f"CMA-ES's default for {dimension} genes"
        screened = f", screened on {settings.screen:g} of the documents: {cost:g} evaluations" \
            if settings.screen is not None else ""
        raise ValueError(f"--max-fevals {settings.max_fevals} is less than one generation ({popsize} candidates, "
                         f"{source}{screened}); raise --max-fevals to at least {math.ceil(cost)} or lower --popsize")
    return popsize


def check_models(config: EvolveConfig) -> None:
    """Every model opens with the engine's loader; the reference model and tokenizer load without running
    code from the model directory (transformers would otherwise stop to ask `[y/N]`)."""
    g = config.genome
    named = [(f"genome.models[{i}]", m) for i, m in enumerate(g.models)]
    if g.base_model:
        named.append(("genome.base_model", g.base_model))
    for field, model in named:
        if is_recipe(model):  # a layer path's recipe source (hybrid search): plannable now, built later
            try:
                plan_merge(load_recipe(model))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{field}: the recipe {model!r} cannot be merged: {str(e).splitlines()[0]}") \
                    from None
            continue
        try:
            ModelSource(model)
        except Exception as e:  # noqa: BLE001 - any reason it cannot be opened is the user's to fix
            raise ValueError(f"{field}: cannot open {model!r}: {str(e).splitlines()[0]}") from None
    reference = g.base_model or next((m for m in g.models if not is_recipe(m)), None)
    if reference is None:  # every source is a recipe: its models were checked by planning it
        return
    tokenizer = g.tokenizer_source if g.tokenizer_source not in (None, *TOKENIZER_KEYWORDS) else reference
    _check_loads_without_remote_code(reference, tokenizer)


def _check_loads_without_remote_code(model: str, tokenizer: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    for what, path, load in (("model", model, AutoConfig.from_pretrained),
                             ("tokenizer", tokenizer, AutoTokenizer.from_pretrained)):
        try:
            load(path, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ("it needs custom code from the model directory, which a search never runs; use a model "
                    "whose architecture transformers knows") if "custom code" in str(e) else \
                "check the files in that directory"
            raise ValueError(f"genome: transformers cannot load the {what} {path!r} ({first}); {hint}") from None


def preflight(config: EvolveConfig, settings: SearchSettings, allow_benchmark_test_sets: bool = False,
              vllm: bool = False) -> Checked:
    """Policy, weights, models, genome and budget. Tasks, metrics and filters are checked by building the
    scorer (evaluator.make_scorer), which run.py does next, before the storage path is touched."""
    check_policy(config, allow_benchmark_test_sets, vllm)
    check_weights(config)
    check_models(config)
    genome = LayerPathGenome.for_models(config.genome) if isinstance(config.genome, LayerPathDefinition) \
        else Genome.for_models(config.genome)
    return Checked(genome, check_search(settings, genome.dimension))
