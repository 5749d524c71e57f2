"""The search on real tiny models, real lm-eval tasks (the bundled ones), real cma and Ray.

The models are `specialists` (conftest): a base and two fine-tunes trained to answer the 8 scored documents of
evo_addition and evo_reversal, so candidates score differently and a wrong merge or a stale score shows."""

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
import torch
import yaml
from safetensors.torch import load_file

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
def trained(specialists):
    """The zoo's names for the trained models: base, a (the addition specialist), b (the reversal specialist).
    Tests that score use these; tests that only build genomes or recipes use the (cheaper) untrained zoo."""
    return {"base": specialists["base"], "a": specialists["addition"], "b": specialists["reversal"]}


@pytest.fixture(scope="module")
def in_process(trained):
    return InProcessEvaluator(settings(trained))


def weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def distinct(scores) -> bool:
    return len({tuple(sorted(s.per_task.items())) for s in scores}) == len(scores)


def specialist_recipes(zoo):
    """task_arithmetic candidates: the addition specialist, the reversal specialist, and half of each."""
    g = Genome(definition(zoo), 4)
    return [g.decode(np.array(x)) for x in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5])]


@pytest.mark.slow
def test_specialists_score_differently(trained, in_process):
    addition, reversal, _ = in_process.evaluate(specialist_recipes(trained))
    assert addition.per_task == {"evo_addition": 1.0, "evo_reversal": 0.0}
    assert reversal.per_task == {"evo_addition": 0.0, "evo_reversal": 1.0}


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


def test_genome_ranges_override_the_methods_search_range(zoo):
    """task_arithmetic weights over [0, 2]: the search starts in the middle, at the usual weight 1."""
    wide = Genome(definition(zoo, ranges={"weight": [0.0, 2.0]}), num_layers=4)
    assert wide.values(wide.x0()) == [1.0, 1.0] and wide.values(np.array([0.0, 1.0])) == [0.0, 2.0]
    start = wide.decode(wide.x0())
    assert [m.parameters["weight"] for m in start.models] == [1.0, 1.0]
    plain = Genome(definition(zoo), num_layers=4)  # mergekit's [0, 1]
    assert plain.values(plain.x0()) == [0.5, 0.5]


def test_filters_outside_the_layers_get_one_gene_each_and_set_those_tensors(zoo, tmp_path):
    """Per-layer genes for attention, one gene per model for the embeddings and the head (the merge reads one
    value for tensors outside the layers): every gene must move the tensors it names, and only those."""
    g = Genome.for_models(definition(zoo, layer_granularity=1, filters=["self_attn", "embed_tokens", "lm_head"]))
    assert g.outside_filters == {"embed_tokens", "lm_head"}
    assert g.dimension == 2 * (4 * 2 + 2)  # models x (4 layer groups x (self_attn + catch-all) + embeddings + head)
    x = np.linspace(0.05, 0.95, g.dimension)
    values = {(gene.group, gene.filter, gene.model): v for gene, v in zip(g.genes, g.values(x), strict=True)}
    run_merge(g.decode(x), tmp_path / "out", MergeOptions(progress=False))
    merged, base = weights(tmp_path / "out"), weights(zoo["base"])
    a, b = weights(zoo["a"]), weights(zoo["b"])
    for name, group, filt in [("model.embed_tokens.weight", 0, "embed_tokens"), ("lm_head.weight", 0, "lm_head"),
                              ("model.layers.2.self_attn.q_proj.weight", 2, "self_attn"),
                              ("model.layers.3.mlp.up_proj.weight", 3, None)]:
        wa, wb = values[(group, filt, str(zoo["a"]))], values[(group, filt, str(zoo["b"]))]
        b0 = base[name].float()
        expected = b0 + wa * (a[name].float() - b0) + wb * (b[name].float() - b0)
        assert (a[name] != base[name]).any() and torch.allclose(merged[name].float(), expected, atol=1e-2), name


@pytest.mark.slow
def test_in_memory_and_on_disk_candidates_score_the_same(trained, tmp_path):
    dare = Genome(definition(trained, method="dare_ties"), 4).decode(np.full(4, 0.7))  # seeded random drops
    recipes = [*specialist_recipes(trained)[:2], dare]
    seeded = MergeOptions(random_seed=3, progress=False, write_model_card=False)
    in_mem = InProcessEvaluator(settings(trained, merge=seeded)).evaluate(recipes)
    on_disk = InProcessEvaluator(settings(trained, in_memory=False, scratch_dir=str(tmp_path),
                                          merge=seeded)).evaluate(recipes)
    assert all(s.ok for s in in_mem + on_disk)
    assert distinct(in_mem)
    assert [s.per_task for s in in_mem] == [s.per_task for s in on_disk]
    assert all(not any(p.iterdir()) for p in tmp_path.iterdir())  # candidates' scratch space is cleaned up


@pytest.mark.slow
def test_failed_candidate_is_a_penalised_score(trained, in_process, tmp_path):
    bad = GenomeDefinition(models=[str(trained["a"]), str(tmp_path / "gone")], base_model=str(trained["base"]),
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
    lines = (path / "history.jsonl").read_text().splitlines()
    return [(r["recipe_hash"], r["fitness"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_search_exports_recipe_model_plot_and_report(trained, in_process, tmp_path):
    out = run(trained, tmp_path / "s", in_process, max_fevals=8)
    s = tmp_path / "s"
    assert len(history(s)) == 8
    assert {p.name for p in s.iterdir()} >= {"history.jsonl", "state.json", "best_config.yaml", "best_model",
                                            "fitness.png", "report.md", "search.yml"}
    best = max(out.search.candidates, key=lambda c: c.score.fitness)
    assert out.best == best
    assert best.score.fitness > min(c.score.fitness for c in out.search.candidates)  # "best" means something
    exported = load_recipe(s / "best_config.yaml")  # the scored recipe plus the dtype and seed it was built with
    assert exported.dtype == "float32"
    scored = exported.model_copy(update={"dtype": None, "random_seed": None})
    assert scored == best.recipe and recipe_key(scored) == best.key
    assert (s / "best_model" / "model.safetensors").exists()
    assert len(out.validation) == 3 and "gap" in out.report
    record = json.loads((s / "history.jsonl").read_text().splitlines()[0])
    assert set(record) >= {"genome", "recipe_hash", "scores", "merge_seconds", "score_seconds", "fitness"}
    res = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(s / "best_config.yaml"),
                          str(tmp_path / "again"), "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    again, scored = weights(tmp_path / "again"), weights(s / "best_model")
    assert again.keys() == scored.keys() and all(torch.equal(again[k], scored[k]) for k in scored)


@pytest.mark.slow
def test_same_seed_same_history_and_resume_continues_without_rescoring(trained, in_process, tmp_path):
    """End to end with real scores (the search logic itself: tests/test_tests_search.py)."""
    run(trained, tmp_path / "full", in_process, max_fevals=12, seed=5, export_model=False)
    run(trained, tmp_path / "again", in_process, max_fevals=12, seed=5, export_model=False)
    assert history(tmp_path / "full") == history(tmp_path / "again")
    assert len({f for _, f in history(tmp_path / "full")}) > 1  # real, differing scores
    run(trained, tmp_path / "other", in_process, max_fevals=4, seed=6, export_model=False)
    assert history(tmp_path / "other") != history(tmp_path / "full")[:4]

    run(trained, tmp_path / "part", in_process, max_fevals=8, seed=5, export_model=False)
    assert len(history(tmp_path / "part")) == 8
    with pytest.raises(ValueError, match="--resume"):
        run(trained, tmp_path / "part", in_process, max_fevals=8, seed=5)
    with pytest.raises(ValueError, match="differs"):
        run(trained, tmp_path / "part", in_process, max_fevals=8, seed=7, resume=True)
    stored = yaml.safe_load((tmp_path / "part" / "search.yml").read_text())
    del stored["search"]["genome"]["ranges"]  # as a version without genome.ranges wrote it: still this search
    (tmp_path / "part" / "search.yml").write_text(yaml.safe_dump(stored, sort_keys=False))
    run(trained, tmp_path / "part", in_process, max_fevals=12, seed=5, resume=True, export_model=False)
    assert history(tmp_path / "part") == history(tmp_path / "full")  # 2 generations replayed, none re-scored
    indices = [json.loads(line)["index"] for line in (tmp_path / "part" / "history.jsonl").read_text().splitlines()]
    assert indices == list(range(12))


@pytest.mark.slow
def test_identical_genomes_are_scored_once_and_convergence_ends_the_search(trained, in_process, tmp_path):
    out = run(trained, tmp_path / "s", in_process, max_fevals=40, sigma0=1e-9, export_model=False)
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


@pytest.mark.slow
def test_ray_workers_score_like_the_in_process_evaluator(trained, in_process):
    import ray

    from evolve.ray_evaluator import RayEvaluator

    recipes = specialist_recipes(trained)[:2]
    evaluator = RayEvaluator(settings(trained), num_workers=1)
    try:
        remote = evaluator.evaluate(recipes)
    finally:
        evaluator.close()
        ray.shutdown()
    local = in_process.evaluate(recipes)
    assert all(s.ok for s in remote) and distinct(remote)
    assert [s.per_task for s in remote] == [s.per_task for s in local]


@pytest.mark.slow
def test_cli_killed_mid_search_resumes(trained, tmp_path):
    search = tmp_path / "search.yml"
    search.write_text(yaml.safe_dump({
        "genome": {"models": [str(trained["a"]), str(trained["b"])], "base_model": str(trained["base"]),
                   "merge_method": "linear", "layer_granularity": 2},
        "tasks": [{"name": "evo_addition"}], "limit": 8}))
    storage = tmp_path / "s"
    cmd = [sys.executable, "-m", "evolve.cli", str(search), "--storage-path", str(storage), "--max-fevals", "16",
           "--popsize", "4", "--num-workers", "0", "--task-search-path", str(ROOT / "tasks"), "--no-progress",
           "--no-export"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    hist = storage / "history.jsonl"
    while time.time() < deadline and not (hist.exists() and len(hist.read_text().splitlines()) >= 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(hist.read_text().splitlines())
    assert 5 <= done < 16  # killed after the first generation, during or after the second
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in hist.read_text().splitlines()]
    assert len(records) == 16 and len({r["recipe_hash"] for r in records}) == 16
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


@pytest.mark.slow
def test_reused_requests_score_like_freshly_built_ones(trained):
    addition, reversal, _ = specialist_recipes(trained)
    recipes = [addition, reversal, addition]
    reused = InProcessEvaluator(settings(trained)).evaluate(recipes)
    fresh = [InProcessEvaluator(settings(trained)).evaluate([r])[0] for r in recipes[:2]]
    assert distinct(reused[:2])  # stale responses from the first candidate would score the second like it
    assert [s.per_task for s in reused] == [s.per_task for s in fresh + fresh[:1]]


def test_random_init_starts_elsewhere_reproducibly(zoo):
    from evolve.search import make_optimizer

    g = Genome(definition(zoo, layer_granularity=2), 4)
    a = make_optimizer(g, SearchSettings(random_init=True, random_seed=3)).mean
    b = make_optimizer(g, SearchSettings(random_init=True, random_seed=3)).mean
    c = make_optimizer(g, SearchSettings(random_seed=3)).mean
    assert np.allclose(a, b) and not np.allclose(a, c) and np.allclose(c, 0.5)


@pytest.mark.slow
def test_normalized_min_fitness_on_real_models(trained, in_process, tmp_path):
    config = search_config(trained, layer_granularity=2)
    config = EvolveConfig.model_validate({**config.model_dump(), "fitness": {"normalize": True, "aggregate": "min"}})
    options = RunOptions(storage_path=str(tmp_path / "run"), export_model=False, validate_top=0,
                         search=SearchSettings(max_fevals=8, popsize=4, progress=False, random_seed=1))
    result = evolve(config, options, evaluator=in_process)

    refs = json.loads((tmp_path / "run" / "references.json").read_text())
    sources = refs["fitness"]  # each source model scored alone, on the fitness split
    assert sources[str(trained["a"])] == {"evo_addition": 1.0, "evo_reversal": 0.0}
    assert sources[str(trained["b"])] == {"evo_addition": 0.0, "evo_reversal": 1.0}
    assert set(sources) == {str(trained["a"]), str(trained["b"]), str(trained["base"])}
    ok = [c for c in result.search.candidates if c.score.ok]
    assert any(len(set(c.score.per_task.values())) > 1 for c in ok)  # the minimum differs from the mean
    for c in ok:
        assert c.score.fitness == pytest.approx(min(c.score.per_task.values()))
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["fitness"] for h in history] == pytest.approx([c.score.fitness for c in result.search.candidates])
    assert "minimum of (evo_addition/acc / 1, evo_reversal/acc / 1)" in result.report
