"""The whole job: preflight -> search -> validate the top candidates -> export recipe, model, report."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from merge_engine.merge import run_merge
from merge_engine.options import MergeOptions

from .config import EvolveConfig, FitnessDefinition, LayerPathDefinition
from .evaluator import Evaluator, InProcessEvaluator, WorkerSettings, make_scorer, scores_as_completed
from .export import export_recipe, exported_yaml
from .fitness import FitnessRule, best_per_task, check_references, source_recipes
from .html_report import render_html
from .layer_path import LayerPathGenome, build_recipe_sources, recipe_path
from .pictures import held_out_points, plot_fitness, plot_gene_spread, plot_genome_heatmap, plot_layer_path
from .preflight import preflight
from .record import Candidate
from .report import render_report, resolved_settings
from .scoring import LmEvalScorer, Score
from .search import SearchResult, SearchSettings, run_search
from .search_card import render_search_section
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    storage_path: str
    search: SearchSettings = field(default_factory=SearchSettings)
    task_search_path: list[str] = field(default_factory=list)
    batch_size: int = 32
    in_memory: bool = True
    vllm: bool = False
    ray_address: str | None = None
    num_workers: int = 1  # 0 = evaluate in this process, without Ray
    device: str = "cpu"
    resume: bool = False
    allow_benchmark_test_sets: bool = False
    validate_top: int = 3
    export_model: bool = True
    trust_remote_code: bool = False
    allow_crimes: bool = False
    wandb: bool = False  # log every scored candidate to Weights & Biases (evomerge[wandb])
    wandb_project: str | None = None
    wandb_entity: str | None = None


class NoSuccessfulCandidate(RuntimeError):
    """The search ended without one candidate that merged and scored: nothing to export."""


@dataclass(frozen=True)
class Validation:
    """A top candidate re-scored on the tasks' held-out `validation_split`."""

    candidate: Candidate
    score: Score


@dataclass(frozen=True)
class EvolveResult:
    search: SearchResult
    best: Candidate
    validation: list[Validation]
    report: str


def merge_options(options: RunOptions) -> MergeOptions:
    """The run's one MergeOptions: every candidate merge (in the workers) and the export use it."""
    return MergeOptions(random_seed=options.search.random_seed, device=options.device, progress=False,
                        write_model_card=False, trust_remote_code=options.trust_remote_code,
                        allow_crimes=options.allow_crimes)


def worker_settings(config: EvolveConfig, options: RunOptions, merge: MergeOptions) -> WorkerSettings:
    g = config.genome
    return WorkerSettings(
        tasks=list(config.tasks), reference_model=g.base_model or g.models[0], tokenizer_source=g.tokenizer_source,
        layer_path=isinstance(g, LayerPathDefinition),
        task_search_path=[str(Path(p).resolve()) for p in options.task_search_path], limit=config.limit,
        num_fewshot=config.num_fewshot, batch_size=options.batch_size, in_memory=options.in_memory,
        vllm=options.vllm, merge=merge, scratch_dir=str(Path(options.storage_path).resolve() / "scratch"),
        shuffle=config.shuffle, apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn)


def make_evaluator(settings: WorkerSettings, options: RunOptions, scorer: LmEvalScorer | None = None) -> Evaluator:
    if options.num_workers == 0:
        return InProcessEvaluator(settings, scorer)
    from .ray_evaluator import RayEvaluator  # Ray only when asked for

    gpus = 1.0 if settings.merge.device.startswith("cuda") else 0.0
    return RayEvaluator(settings, options.num_workers, options.ray_address, gpus)


def evolve(config: EvolveConfig, options: RunOptions, evaluator: Evaluator | None = None) -> EvolveResult:
    """Raises ValueError for bad input (before anything is spent or written), SearchFailed when the whole
    first generation fails, NoSuccessfulCandidate when nothing merged and scored."""
    search_settings = replace(options.search, random_init=config.random_init)
    checked = preflight(config, search_settings, options.allow_benchmark_test_sets, options.vllm)
    merge = merge_options(options)
    settings = worker_settings(config, options, merge)
    scorer = make_scorer(settings) if evaluator is None else None  # unknown task / metric / filter: ValueError
    directions = scorer.higher_is_better if scorer else {}
    run_settings = {k: v for k, v in asdict(search_settings).items() if k not in ("progress", "max_fevals", "timeout")
                    and not (k == "screen" and v is None)}  # searches stored before --screen existed resume
    with Storage(options.storage_path).open(config, run_settings, options.resume) as storage, \
            log_to_file(storage.path / LOG_FILE):
        genome = checked.genome
        if isinstance(config.genome, LayerPathDefinition) and config.genome.recipes():
            # hybrid: the recipe sources are built into the storage path, and candidates name those models
            built = build_recipe_sources(config.genome, storage.path, merge)
            config, genome = config.model_copy(update={"genome": built}), LayerPathGenome.for_models(built)
            settings = worker_settings(config, options, merge)
        log.info("genome: %s, %d candidates per generation", genome.summary(), checked.popsize)
        if search_settings.progress:  # what is about to run, before the first bar
            workers = f"{options.num_workers} Ray worker(s)" if options.num_workers else "in this process"
            print(f"mergekit-evolve: {genome.summary()}, popsize {checked.popsize}, up to "
                  f"{search_settings.max_fevals // checked.popsize} generations "
                  f"({search_settings.max_fevals} evaluations), {workers}, tasks: "
                  + ", ".join(f"{t.name}/{t.metric}" for t in config.tasks), file=sys.stderr)
        wandb = None
        if options.wandb:
            from .wandb_log import WandbLogger

            wandb = WandbLogger(options.wandb_project, options.wandb_entity, config.model_dump(mode="json"))
            storage.listeners.append(wandb.log_candidate)
        own_evaluator = evaluator is None
        evaluator = evaluator or make_evaluator(settings, options, scorer)
        try:
            rule = None
            if config.fitness != FitnessDefinition():
                rule = _fitness_rule(config, directions, evaluator, storage, validation=False)
                log.info("fitness: %s", rule.describe({t.name: t.metric for t in config.tasks}))
            result = run_search(genome, evaluator, storage, search_settings, rule)
            validation = _validate_top(result, evaluator, config, options.validate_top,
                                       search_settings.progress)
            if rule is not None and validation and all(t.validation_split for t in config.tasks):
                held_rule = _fitness_rule(config, directions, evaluator, storage, validation=True)
                validation = [Validation(v.candidate, held_rule.rescore(v.score)) for v in validation]
        finally:
            if own_evaluator:
                evaluator.close()
        held = held_out_points(validation)
        as_run = resolved_settings(run_settings, genome.dimension)
        pictures = [(plot_fitness(result.candidates, storage.path / "fitness.png", held),
                     "fitness of every candidate, best so far, generations and held-out scores")]
        if result.best is not None:
            title = f"best genome (evaluation {result.best.index}, fitness {result.best.score.fitness:.4f})"
            if isinstance(genome, LayerPathGenome):
                pictures.append((plot_layer_path(recipe_path(result.best.recipe), genome.models,
                                                 storage.path / "layer_path.png", title.replace("genome", "path")),
                                 "best path: which model's layer at each depth"))
            else:
                pictures.append((plot_genome_heatmap(genome.genes, result.best.genome,
                                                     storage.path / "genome_heatmap.png", title),
                                 "best genome: each parameter per layer group and model"))
            pictures.append((plot_gene_spread(genome.genes, result.candidates, storage.path / "gene_spread.png",
                                              labels=getattr(genome, "labels", None)),
                             "spread of each gene over the last generations"))
        report = render_report(result, validation, config, directions, as_run, rule,
                               exported=options.export_model and result.best is not None,
                               pictures=[p.name for p, _ in pictures])
        storage.write_text("report.md", report)
        storage.write_text("report.html", render_html(report, result.candidates, held, pictures))
        if result.best is None:
            raise NoSuccessfulCandidate(
                f"no candidate merged and scored ({len(result.candidates)} failed; see the `error` field in "
                f"{storage.history_file}); nothing exported")
        best_recipe = export_recipe(result.best.recipe, options.search.random_seed)
        storage.write_text("best_config.yaml", exported_yaml(best_recipe, (
            f"mergekit-evolve (evomerge): the best of {len(result.candidates)} candidates, fitness "
            f"{result.best.score.fitness:.6g}\n"
            "Runs from any directory: model paths are absolute. random_seed (evomerge's field; mergekit ignores it)\n"
            "is the seed randomized methods were scored with; mergekit-yaml --random-seed overrides it.")))
        if options.export_model:
            log.info("exporting best_model/")
            card = render_search_section(config, result.candidates, held, as_run, options.search.max_fevals)
            out = run_merge(best_recipe, storage.path / "best_model",
                            merge.model_copy(update={"progress": search_settings.progress, "write_model_card": True,
                                                     "card_extra": card}))
            shutil.copyfile(storage.path / "fitness.png", out / "fitness.png")  # the card shows it
        if wandb is not None:
            wandb.finish(storage.path / "best_config.yaml")
    return EvolveResult(result, result.best, validation, report)


LOG_FILE = "evolve.log"


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Everything evolve and the merge engine log at INFO and above also goes to `path` (appended, so a
    resumed search continues the same log)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("evolve", "merge_engine")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(min(lg.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _validate_top(result: SearchResult, evaluator: Evaluator, config: EvolveConfig, top: int,
                  progress: bool) -> list[Validation]:
    if not any(t.validation_split for t in config.tasks) or top <= 0:
        return []
    ranked = sorted((c for c in result.candidates if c.score.ok), key=lambda c: -c.score.fitness)[:top]
    if not ranked:
        return []
    scores: dict[int, Score] = {}
    with tqdm(total=len(ranked), desc="held-out", unit="candidate", disable=not progress) as bar:
        for i, score in scores_as_completed(evaluator, [c.recipe for c in ranked], validation=True):
            scores[i] = score
            bar.update(1)
    return [Validation(c, scores[i]) for i, c in enumerate(ranked)]


REFERENCES = "references.json"


def _fitness_rule(config: EvolveConfig, directions: dict[str, bool], evaluator: Evaluator, storage: Storage,
                  validation: bool) -> FitnessRule:
    """The search file's fitness rule; with `normalize: true`, the source models are scored first (once per
    storage path and split: references.json) and the best value per task becomes that task's reference."""
    if config.fitness.aggregate in ("harmonic", "geometric") and not config.fitness.normalize:
        lower = [t.name for t in config.tasks if not directions.get(t.name, True)]
        if lower:
            raise ValueError(f"fitness.aggregate: a {config.fitness.aggregate} mean needs positive task values, and "
                             f"{', '.join(lower)} is lower-is-better (it enters negated); set fitness.normalize: true")
    if not config.fitness.normalize:
        return FitnessRule.of(config, directions)
    references = best_per_task(_source_scores(config, evaluator, storage, validation), directions)
    check_references(references, directions)
    return FitnessRule.of(config, directions, references)


def _source_scores(config: EvolveConfig, evaluator: Evaluator, storage: Storage,
                   validation: bool) -> dict[str, dict[str, float]]:
    """Per source model, its per-task scores on the fitness split (or the held-out split), cached."""
    split = "held_out" if validation else "fitness"
    recipes = source_recipes(config)
    key = {"models": list(recipes), "tasks": [t.model_dump() for t in config.tasks], "limit": config.limit,
           "num_fewshot": config.num_fewshot, "shuffle": config.shuffle}
    path = storage.path / REFERENCES
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("key") != key:
        cached = {"key": key}
    if split in cached:
        return cached[split]
    log.info("scoring the %d source models on the %s split (fitness.normalize)", len(recipes), split)
    scores = evaluator.evaluate(list(recipes.values()), validation=validation)
    for model, score in zip(recipes, scores, strict=True):
        if not score.ok:
            raise ValueError(f"fitness.normalize: source model {model} could not be scored: "
                             f"{(score.error or '').splitlines()[0]}")
    cached[split] = {m: s.per_task for m, s in zip(recipes, scores, strict=True)}
    storage.write_text(REFERENCES, json.dumps(cached, indent=2))
    return cached[split]
