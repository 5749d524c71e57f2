"""The whole job: search -> validate the top candidates -> export recipe, model, report."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from merge_engine.config import parse_recipe
from merge_engine.merge import run_merge
from merge_engine.options import MergeOptions

from .config import EvolveConfig
from .evaluator import Evaluator, InProcessEvaluator, WorkerSettings
from .genome import Genome
from .html_report import render_html
from .pictures import held_out_points, plot_fitness, plot_gene_spread, plot_genome_heatmap
from .report import render_report, resolved_settings
from .search_card import render_search_section
from .search import SearchSettings, run_search
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


def make_evaluator(config: EvolveConfig, options: RunOptions) -> Evaluator:
    g = config.genome
    settings = WorkerSettings(
        tasks=list(config.tasks), reference_model=g.base_model or g.models[0], tokenizer_source=g.tokenizer_source,
        task_search_path=[str(Path(p).resolve()) for p in options.task_search_path], limit=config.limit,
        num_fewshot=config.num_fewshot, batch_size=options.batch_size, in_memory=options.in_memory,
        vllm=options.vllm, device=options.device, scratch_dir=str(Path(options.storage_path).resolve() / "scratch"),
        random_seed=options.search.random_seed)
    if options.num_workers == 0:
        return InProcessEvaluator(settings)
    from .ray_evaluator import RayEvaluator  # Ray only when asked for

    gpus = 1.0 if options.device.startswith("cuda") else 0.0
    return RayEvaluator(settings, options.num_workers, options.ray_address, gpus)


def check_preconditions(config: EvolveConfig, options: RunOptions) -> None:
    public = config.public_benchmarks()
    if public and not options.allow_benchmark_test_sets:
        raise ValueError(f"tasks: {', '.join(public)} look like public benchmark test sets; optimising on them "
                         "overfits the benchmark and makes its numbers meaningless. Search on your own or a "
                         "validation task, or pass --allow-benchmark-test-sets if you really mean it")
    if options.vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("--vllm: the vllm package is not installed (`pip install vllm`); omit --vllm to "
                             "score with the Hugging Face backend")


def evolve(config: EvolveConfig, options: RunOptions, evaluator: Evaluator | None = None) -> dict[str, Any]:
    check_preconditions(config, options)
    storage = Storage(options.storage_path)
    search_settings = replace(options.search, random_init=config.random_init)
    run_settings = {k: v for k, v in asdict(search_settings).items() if k not in ("progress", "max_fevals")}
    storage.start(config, run_settings, options.resume)
    with log_to_file(storage.path / LOG_FILE):
        return _evolve(config, options, evaluator, storage, search_settings, run_settings)


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
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _evolve(config: EvolveConfig, options: RunOptions, evaluator: Evaluator | None, storage: Storage,
            search_settings: SearchSettings, run_settings: dict[str, Any]) -> dict[str, Any]:
    genome = Genome.for_models(config.genome)
    log.info("genome: %d genes over %d layer group(s)", genome.dimension, genome.num_groups)
    own_evaluator = evaluator is None
    evaluator = evaluator or make_evaluator(config, options)
    try:
        run_search(genome, evaluator, storage, search_settings)
        records = storage.load_history()
        if not records:
            raise RuntimeError("the search scored no candidate (is --max-fevals smaller than one generation?)")
        best = max(records, key=lambda r: r["fitness"])
        validation = _validate_top(records, evaluator, config, options.validate_top)
    finally:
        if own_evaluator:
            evaluator.close()
        shutil.rmtree(storage.path / "scratch", ignore_errors=True)  # on-disk candidates' temp space
    best_recipe = parse_recipe(best["recipe"], "history.jsonl")
    storage.write_text("best_config.yaml", best_recipe.to_yaml())
    held = held_out_points(validation)
    settings = resolved_settings(run_settings, genome.dimension)
    pictures = [(plot_fitness(records, storage.path / "fitness.png", held),
                 "fitness of every candidate, best so far, generations and held-out scores"),
                (plot_genome_heatmap(genome.genes, best["genome"], storage.path / "genome_heatmap.png",
                                     f"best genome (evaluation {best['index']}, fitness {best['fitness']:.4f})"),
                 "best genome: each parameter per layer group and model"),
                (plot_gene_spread(genome.genes, records, storage.path / "gene_spread.png"),
                 "spread of each gene over the last generations")]
    if options.export_model:
        log.info("exporting best_model/")
        out = run_merge(best_recipe, storage.path / "best_model",
                        MergeOptions(random_seed=options.search.random_seed, device=options.device,
                                     progress=options.search.progress,
                                     card_extra=render_search_section(config, records, held, settings,
                                                                      options.search.max_fevals)))
        shutil.copyfile(storage.path / "fitness.png", out / "fitness.png")  # the card shows it
    report = render_report(records, validation, best, settings, exported=options.export_model)
    storage.write_text("report.md", report)
    storage.write_text("report.html", render_html(report, records, held, pictures))
    return {"best": best, "validation": validation, "records": records, "report": report,
            "storage_path": str(storage.path.resolve()), "exported": options.export_model}


def _validate_top(records, evaluator: Evaluator, config: EvolveConfig, top: int) -> list[dict[str, Any]]:
    if not any(t.validation_split for t in config.tasks) or top <= 0:
        return []
    ranked = sorted((r for r in records if r["ok"]), key=lambda r: -r["fitness"])[:top]
    scores = evaluator.evaluate([parse_recipe(r["recipe"]) for r in ranked], validation=True)
    out = []
    for r, s in zip(ranked, scores):
        out.append({"index": r["index"], "recipe_hash": r["recipe_hash"], "fitness": r["fitness"],
                    "validation": s.fitness if s.ok else None, "validation_scores": s.per_task})
    return out
