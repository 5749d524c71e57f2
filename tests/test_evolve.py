"""The search on real tiny models, real lm-eval tasks (the bundled ones), real cma and Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evolve.config import EvolveConfig, GenomeDefinition, TaskDefinition, load_search
from evolve.evaluator import InProcessEvaluator, WorkerSettings
from evolve.genome import Genome, recipe_key
from evolve.run import RunOptions, evolve
from evolve.search import SearchSettings
from merge_engine import MergeOptions, load_recipe, run_merge
from merge_engine.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
TASKS = [TaskDefinition(name="evo_addition", metric="acc"),
         TaskDefinition(name="evo_reversal", metric="acc", weight=2.0, validation_split="test")]


def definition(zoo, method="task_arithmetic", **kw) -> GenomeDefinition:
    return GenomeDefinition(models=[str(zoo["a"]), str(zoo["b"])], base_model=str(zoo["base"]),
                            merge_method=method, **kw)


def search_config(zoo, **kw) -> EvolveConfig:
    return EvolveConfig(genome=definition(zoo, **kw), tasks=TASKS, limit=8)


def settings(zoo, **kw) -> WorkerSettings:
    return WorkerSettings(tasks=TASKS, reference_model=str(zoo["base"]), task_search_path=[str(ROOT / "tasks")],
                          limit=8, batch_size=16, **kw)


@pytest.fixture(scope="module")
def in_process(zoo):
    return InProcessEvaluator(settings(zoo))


def test_genome_dimensions_come_from_the_method_spec(zoo):
    g = Genome(definition(zoo, layer_granularity=2, filters=["self_attn"]), num_layers=4)
    assert g.dimension == 2 * 2 * 2 * 1  # groups x (filter + catch-all) x models x [weight]
    g = Genome(definition(zoo, method="ties", layer_granularity=2), num_layers=4)
    searchable = [p.name for p in get_method("ties").params if p.search]
    assert searchable == ["weight", "density"] and g.dimension == 2 * 2 * 2
    slerp = GenomeDefinition(models=[str(zoo["base"]), str(zoo["a"])], base_model=str(zoo["base"]),
                             merge_method="slerp", layer_granularity=1)
    assert Genome(slerp, num_layers=4).dimension == 4  # one t per layer
    with pytest.raises(ValueError, match="does not divide"):
        Genome(definition(zoo, layer_granularity=3), num_layers=4)


def test_decoded_genome_is_an_ordinary_recipe(zoo, tmp_path):
    g = Genome(definition(zoo, method="ties", layer_granularity=2, filters=["mlp"], allow_negative_weights=True),
               num_layers=4)
    x = np.linspace(0, 1, g.dimension)
    recipe = g.decode(x)
    weight = recipe.models[0].parameters["weight"]
    assert [c.filter for c in weight] == ["mlp", None]
    assert len(weight[0].value) == 4 and weight[0].value[0] == weight[0].value[1] != weight[0].value[2]
    assert min(g.values(x)) == -1.0  # negative weights allowed
    path = tmp_path / "recipe.yml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    run_merge(load_recipe(path), tmp_path / "out", MergeOptions(progress=False))
    smooth = Genome(definition(zoo, layer_granularity=2, smooth=True), num_layers=4).decode(np.array([0, .2, 1, .6]))
    assert smooth.models[0].parameters["weight"] == [0.0, 1.0]  # a gradient over layer groups


def test_in_memory_and_on_disk_candidates_score_the_same(zoo, in_process, tmp_path):
    recipe = Genome(definition(zoo, method="dare_ties"), 4).decode(np.full(4, 0.7))
    in_mem = in_process.evaluate([recipe])[0]
    on_disk = InProcessEvaluator(settings(zoo, in_memory=False, scratch_dir=str(tmp_path))).evaluate([recipe])[0]
    assert in_mem.ok and on_disk.ok
    assert in_mem.per_task == on_disk.per_task
    assert list(tmp_path.iterdir()) == [] or all(not any(p.iterdir()) for p in tmp_path.iterdir())


def test_failed_candidate_is_a_penalised_score(zoo, in_process, tmp_path):
    bad = GenomeDefinition(models=[str(zoo["a"]), str(tmp_path / "gone")], base_model=str(zoo["base"]),
                           merge_method="linear")
    recipe = Genome(bad, 4).decode(np.full(2, 0.5))
    score = in_process.evaluate([recipe])[0]
    assert not score.ok and score.fitness == -1.0 and "not found" in score.error


def run(zoo, path, in_process, max_fevals, seed=0, sigma0=0.3, resume=False, **kw):
    options = RunOptions(storage_path=str(path), search=SearchSettings(max_fevals=max_fevals, sigma0=sigma0,
                                                                       popsize=4, random_seed=seed, progress=False),
                         task_search_path=[str(ROOT / "tasks")], resume=resume, **kw)
    return evolve(search_config(zoo, layer_granularity=2), options, evaluator=in_process)


def history(path):
    return [(r["recipe_hash"], r["fitness"]) for r in map(json.loads, (path / "history.jsonl").read_text().split("\n")[:-1])]


def test_search_exports_recipe_model_plot_and_report(zoo, in_process, tmp_path):
    out = run(zoo, tmp_path / "s", in_process, max_fevals=8)
    s = tmp_path / "s"
    assert len(history(s)) == 8
    assert {p.name for p in s.iterdir()} >= {"history.jsonl", "state.json", "best_config.yaml", "best_model",
                                            "fitness.png", "report.md", "search.yml"}
    best = max(out.search.candidates, key=lambda c: c.score.fitness)
    assert out.best == best
    assert load_recipe(s / "best_config.yaml") == best.recipe
    assert recipe_key(load_recipe(s / "best_config.yaml")) == best.key
    assert (s / "best_model" / "model.safetensors").exists()
    assert len(out.validation) == 3 and "gap" in out.report
    record = json.loads((s / "history.jsonl").read_text().splitlines()[0])
    assert set(record) >= {"genome", "recipe_hash", "scores", "merge_seconds", "score_seconds", "fitness"}
    res = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(s / "best_config.yaml"),
                          str(tmp_path / "again"), "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_same_seed_same_history_and_resume_continues_without_rescoring(zoo, in_process, tmp_path):
    run(zoo, tmp_path / "full", in_process, max_fevals=16, seed=5, export_model=False)
    run(zoo, tmp_path / "again", in_process, max_fevals=16, seed=5, export_model=False)
    assert history(tmp_path / "full") == history(tmp_path / "again")
    run(zoo, tmp_path / "other", in_process, max_fevals=8, seed=6, export_model=False)
    assert history(tmp_path / "other") != history(tmp_path / "full")[:8]

    run(zoo, tmp_path / "part", in_process, max_fevals=12, seed=5, export_model=False)
    assert len(history(tmp_path / "part")) == 12
    with pytest.raises(ValueError, match="--resume"):
        run(zoo, tmp_path / "part", in_process, max_fevals=12, seed=5)
    with pytest.raises(ValueError, match="differs"):
        run(zoo, tmp_path / "part", in_process, max_fevals=12, seed=7, resume=True)
    run(zoo, tmp_path / "part", in_process, max_fevals=16, seed=5, resume=True, export_model=False)
    assert history(tmp_path / "part") == history(tmp_path / "full")  # 3 generations replayed, none re-scored
    indices = [json.loads(line)["index"] for line in (tmp_path / "part" / "history.jsonl").read_text().splitlines()]
    assert indices == list(range(16))


def test_identical_genomes_are_scored_once_and_convergence_ends_the_search(zoo, in_process, tmp_path):
    out = run(zoo, tmp_path / "s", in_process, max_fevals=40, sigma0=1e-9, export_model=False)
    assert len(history(tmp_path / "s")) == 1  # 4 identical candidates per generation, scored once
    assert json.loads((tmp_path / "s" / "state.json").read_text())["generation"] == 3
    assert out.best.index == 0


def test_public_benchmarks_refused_without_flag(zoo, tmp_path):
    config = EvolveConfig(genome=definition(zoo), tasks=[TaskDefinition(name="mmlu")])
    with pytest.raises(ValueError, match="public benchmark"):
        evolve(config, RunOptions(storage_path=str(tmp_path / "s")), evaluator=object())
    with pytest.raises(ValueError, match="vllm package is not installed"):
        evolve(search_config(zoo), RunOptions(storage_path=str(tmp_path / "s"), vllm=True), evaluator=object())


def test_search_yaml_errors_name_fields(tmp_path):
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump({"genome": {"models": ["a"], "merge_method": "ties", "layer_granularity": -1},
                                    "tasks": [{"name": "x", "wieght": 1}]}))
    with pytest.raises(ValueError) as e:
        load_search(path)
    assert "genome.layer_granularity" in str(e.value) and "tasks[0].wieght" in str(e.value)


def test_ray_workers_score_like_the_in_process_evaluator(zoo, in_process):
    import ray

    from evolve.ray_evaluator import RayEvaluator

    g = Genome(definition(zoo), 4)
    recipes = [g.decode(np.full(2, v)) for v in (0.2, 0.9, 0.5)]
    evaluator = RayEvaluator(settings(zoo), num_workers=2)
    try:
        remote = evaluator.evaluate(recipes)
    finally:
        evaluator.close()
        ray.shutdown()
    local = in_process.evaluate(recipes)
    assert [s.per_task for s in remote] == [s.per_task for s in local]
    assert all(s.ok for s in remote)


def test_cli_killed_mid_search_resumes(zoo, tmp_path):
    search = tmp_path / "search.yml"
    search.write_text(yaml.safe_dump({
        "genome": {"models": [str(zoo["a"]), str(zoo["b"])], "base_model": str(zoo["base"]),
                   "merge_method": "linear", "layer_granularity": 2},
        "tasks": [{"name": "evo_addition"}], "limit": 8}))
    storage = tmp_path / "s"
    cmd = [sys.executable, "-m", "evolve.cli", str(search), "--storage-path", str(storage), "--max-fevals", "40",
           "--popsize", "4", "--num-workers", "0", "--task-search-path", str(ROOT / "tasks"), "--no-progress",
           "--no-export"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    hist = storage / "history.jsonl"
    while time.time() < deadline and not (hist.exists() and len(hist.read_text().splitlines()) >= 9):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(hist.read_text().splitlines())
    assert 9 <= done < 40  # killed after two generations, during or after the third
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in hist.read_text().splitlines()]
    assert len(records) == 40 and len({r["recipe_hash"] for r in records}) == 40
    assert (storage / "best_config.yaml").exists() and "Merge search report" in res.stdout


def test_history_cut_mid_line_is_repaired(zoo, tmp_path):
    from evolve.record import Candidate
    from evolve.scoring import Score
    from evolve.storage import Storage

    recipe = Genome(definition(zoo), 4).decode(np.full(2, 0.5))
    storage = Storage(tmp_path)
    storage.append(Candidate(0, 0, "a", recipe, [0.5, 0.5], Score(0.5, {"evo_addition": 0.5})))
    with open(storage.history_file, "a") as f:
        f.write('{"recipe_hash": "b", "ind')  # killed while writing
    assert [c.key for c in storage.load_history()] == ["a"]
    storage.append(Candidate(1, 0, "c", recipe, [0.5, 0.5], Score(0.25, {"evo_addition": 0.25})))
    assert [c.key for c in storage.load_history()] == ["a", "c"]


def test_reused_requests_score_like_freshly_built_ones(zoo):
    g = Genome(definition(zoo), 4)
    recipes = [g.decode(np.full(2, v)) for v in (0.1, 0.9, 0.1)]
    reused = InProcessEvaluator(settings(zoo)).evaluate(recipes)
    fresh = [InProcessEvaluator(settings(zoo)).evaluate([r])[0] for r in recipes]
    assert [s.per_task for s in reused] == [s.per_task for s in fresh]
    assert reused[0].per_task == reused[2].per_task


def test_random_init_starts_elsewhere_reproducibly(zoo):
    from evolve.search import make_optimizer

    g = Genome(definition(zoo, layer_granularity=2), 4)
    a = make_optimizer(g, SearchSettings(random_init=True, random_seed=3)).mean
    b = make_optimizer(g, SearchSettings(random_init=True, random_seed=3)).mean
    c = make_optimizer(g, SearchSettings(random_seed=3)).mean
    assert np.allclose(a, b) and not np.allclose(a, c) and np.allclose(c, 0.5)
