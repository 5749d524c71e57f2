"""Layer-path search (evolve/layer_path.py): the encoding, the checkpoint-level scaling, the in-memory
materializer against the engine's on-disk merge, and whole searches (plain and hybrid) on the trained
tiny specialists (conftest `specialists`), whose candidates score differently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factory import MERGEKIT_VENV, run_mergekit_yaml

from evolve.config import EvolveConfig, LayerPathDefinition, TaskDefinition, load_search
from evolve.evaluator import InProcessEvaluator, WorkerSettings
from evolve.layer_path import LayerPathGenome, Step, path_recipe, recipe_path
from evolve.materialize import LayerPathMaterializer, load_model
from evolve.run import RunOptions, evolve
from evolve.search import SearchSettings
from merge_engine import MergeOptions, load_recipe, run_merge
from merge_engine.architecture import Architecture
from merge_engine.config import RecipeError

ROOT = Path(__file__).resolve().parent.parent
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
LLAMA = Architecture("llama", "num_hidden_layers", 3, "model.embed_tokens.weight", "lm_head.weight", WRITERS)
TASKS = [TaskDefinition(name="evo_addition", metric="acc", validation_split="test"),
         TaskDefinition(name="evo_reversal", metric="acc", validation_split="test")]


def genome(scales="transition", repeats=1, **kw) -> LayerPathGenome:
    d = LayerPathDefinition(kind="layer_path", models=["a", "b"], repeats=repeats, scales=scales, **kw)
    return LayerPathGenome(d, {"a": 3, "b": 3}, LLAMA)


def vector(g: LayerPathGenome, on: list[int], scales: dict[int, float] | None = None) -> np.ndarray:
    """Inclusion genes: 0.9 at `on`, 0.1 elsewhere; scale genes at the values given (default 1.0), in [0, 1]."""
    x = np.array([0.9 if k in on else 0.1 for k in range(len(g.positions))] + [0.5] * (g.dimension - len(g.positions)))
    low, high = g.definition.scale_range
    for k, v in (scales or {}).items():
        x[len(g.positions) + k] = (v - low) / (high - low)
    return x


def slices(g: LayerPathGenome, x: np.ndarray) -> list[dict]:
    return g.decode(x).model_dump(mode="json", exclude_none=True)["slices"]


def scaled(model: str, start: int, end: int, factor: float) -> dict:
    return {"sources": [{"model": model, "layer_range": [start, end],
                         "parameters": {"scale": [{"filter": w, "value": factor} for w in WRITERS]}}]}


def plain(model: str, start: int, end: int) -> dict:
    return {"sources": [{"model": model, "layer_range": [start, end]}]}


# ---- the encoding: hand-made vectors, hand-computed recipes -------------------------------------

def test_start_vector_is_the_first_model_unchanged():
    g = genome(repeats=2)
    assert g.dimension == 2 * 6 + 4  # 12 inclusion genes, a 2x2 transition matrix
    assert slices(g, g.x0()) == [plain("a", 0, 3)]


def test_jumps_carry_the_inverse_of_the_scales_so_far():
    g = genome()  # positions: a0 a1 a2 b0 b1 b2; scale genes W[a,a] W[a,b] W[b,a] W[b,b]
    # a0 a1 -> b1 b2 (jump a->b, 1.25): the b layers' writers times 1 / 1.25
    assert slices(g, vector(g, [0, 1, 4, 5], {1: 1.25})) == [plain("a", 0, 2), scaled("b", 1, 3, 0.8)]
    # a0 -> a2 (jump a->a, 0.5) -> b0 (jump a->b, 1.25): 1 / 0.5 = 2, then 1 / (0.5 * 1.25) = 1.6
    assert slices(g, vector(g, [0, 2, 3], {0: 0.5, 1: 1.25})) == [plain("a", 0, 1), scaled("a", 2, 3, 2.0),
                                                                  scaled("b", 0, 1, 1.6)]
    # a model's next layer is not a jump: a0 a1 a2 b0 b1 b2 with W[b,b] = 0.7 is two slices, one scaled
    assert slices(g, vector(g, [0, 1, 2, 3, 4, 5], {1: 1.5, 3: 0.7})) == [plain("a", 0, 3),
                                                                           scaled("b", 0, 3, 0.666667)]


def test_repeats_revisit_layers_and_scale_per_layer():
    g = genome(scales="layer", repeats=2)  # positions: a0 a1 a2 b0 b1 b2 | a0 a1 a2 b0 b1 b2
    assert g.dimension == 12 + 12
    x = vector(g, [0, 1, 2, 7, 8], {7: 1.25})  # a0 a1 a2, then a1 a2 again; the scale of position 7 (a1, r1)
    assert slices(g, x) == [plain("a", 0, 3), scaled("a", 1, 3, 0.8)]
    assert recipe_path(g.decode(x)) == [("a", 0), ("a", 1), ("a", 2), ("a", 1), ("a", 2)]


def test_scales_on_the_grid():
    on_grid, continuous = genome(), genome(scale_step=0)
    x = vector(on_grid, [0, 1, 4, 5], {1: 1.23})
    assert slices(on_grid, x) == [plain("a", 0, 2), scaled("b", 1, 3, 0.8)]  # 1.23 -> 1.25 -> 1 / 1.25
    assert slices(continuous, x) == [plain("a", 0, 2), scaled("b", 1, 3, 0.813008)]  # 1 / 1.23
    near = vector(on_grid, [0, 1, 4, 5], {1: 1.24})
    assert on_grid.decode(near) == on_grid.decode(x) and continuous.decode(near) != continuous.decode(x)


def test_no_scales_and_depth_repair():
    g = genome(scales="none", min_layers=3, max_layers=4)
    assert g.dimension == 6
    x = np.array([0.9, 0.2, 0.1, 0.3, 0.1, 0.1])  # one layer on: the two strongest others join (a1, b0)
    assert slices(g, x) == [plain("a", 0, 2), plain("b", 0, 1)]
    x = np.array([0.6, 0.9, 0.7, 0.8, 0.6, 0.95])  # six on, four kept: the strongest (ties: earlier)
    assert recipe_path(g.decode(x)) == [("a", 1), ("a", 2), ("b", 0), ("b", 2)]


def test_definition_errors_name_the_field(tmp_path):
    bad = {"genome": {"kind": "layer_path", "models": ["a", "b"], "scale_range": [1.2, 2.0], "min_layers": 5,
                      "max_layers": 2}, "tasks": ["evo_addition"]}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match=r"genome.scale_range: \[1.2, 2.0\] must hold 1.0"):
        load_search(tmp_path / "s.yml")
    bad["genome"] = {"kind": "layers", "models": ["a"]}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="'layers'.*'parameters', 'layer_path'"):
        load_search(tmp_path / "s.yml")
    post_norm = Architecture("gemma2", "num_hidden_layers", 3, "model.embed_tokens.weight", "lm_head.weight")
    with pytest.raises(ValueError, match="genome.scales: .*gemma2.*scales: none"):
        LayerPathGenome(LayerPathDefinition(kind="layer_path", models=["a"]), {"a": 3}, post_norm)
    with pytest.raises(ValueError, match="genome.min_layers: 9 is more than the 6 positions"):
        genome(min_layers=9)


# ---- checkpoint-level scaling == hidden-state scaling ------------------------------------------

PATH = [(0, 1.0), (1, 1.0), (3, 1.4), (2, 0.6), (3, 1.0)]  # (source layer, scale before it); 3 jumps


def _layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None) or getattr(model, "transformer", None) or model.gpt_neox
    return inner.layers if hasattr(inner, "layers") else inner.h


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_checkpoint_scaling_equals_scaling_the_hidden_state(tmp_path, arch):
    """The recipe's scaled writers give the logits of the unscaled path with the residual stream multiplied
    by each scale before its layer (forward pre-hooks), up to the norms' epsilon; and that scaling matters.
    The random tiny models' hidden states are small (std ~0.02), where an epsilon of 1e-5 is not negligible,
    so the norms' epsilon is set to 1e-12 here: what is left is the algebra."""
    from factory import make_model

    from merge_engine.architecture import RESIDUAL_WRITERS
    from merge_engine.io.references import open_model
    from merge_engine.plan import build_plan

    src = make_model(tmp_path / arch, arch, seed=7, layers=4)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({k: 1e-12 for k in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps") if k in cfg})
    (src / "config.json").write_text(json.dumps(cfg))
    src = str(src)
    writers = RESIDUAL_WRITERS[arch]
    steps = [Step(src, layer, s) for layer, s in PATH]
    run_merge(path_recipe(steps, writers), tmp_path / "scaled", MergeOptions(progress=False))
    run_merge(path_recipe([Step(src, layer) for layer, _ in PATH], writers), tmp_path / "plain",
              MergeOptions(progress=False))
    scaled_model, _ = load_model(tmp_path / "scaled")
    plain_model, _ = load_model(tmp_path / "plain")
    assert len(_layers(scaled_model)) == len(PATH)
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))

    def scale_input(factor):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * factor, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * factor}
        return hook

    with torch.no_grad():
        unscaled = plain_model(ids).logits
        for layer, (_, s) in zip(_layers(plain_model), PATH, strict=True):
            if s != 1.0:
                layer.register_forward_pre_hook(scale_input(s), with_kwargs=True)
        intended, got = plain_model(ids).logits, scaled_model(ids).logits
    assert not torch.allclose(intended, unscaled, atol=1e-3)  # the scales change the model
    torch.testing.assert_close(got, intended, atol=2e-4, rtol=1e-4)
    plan = build_plan(load_recipe(tmp_path / "scaled" / "mergekit_config.yml"),
                      {src: open_model(src)})  # the writers are the only tensors scaled
    assert {j.output_name.split(".", 3)[-1] for j in plan.jobs if not j.copies_input} <= \
        {n.split(".", 3)[-1] for n in (j.output_name for j in plan.jobs) if any(w in n for w in writers)}


# ---- in memory == on disk, bit for bit; nothing copied ----------------------------------------

def test_in_memory_path_equals_the_engine_merge_and_shares_the_sources(trained_pair, tmp_path):
    a, b = trained_pair
    recipe = path_recipe([Step(a, 0), Step(a, 1), Step(b, 1, 1.3), Step(b, 2), Step(a, 3, 0.7)], WRITERS)
    materializer = LayerPathMaterializer(a)
    model, _ = materializer.materialize(recipe)
    run_merge(recipe, tmp_path / "out", MergeOptions(progress=False))
    disk, _ = load_model(tmp_path / "out")
    mine, theirs = model.state_dict(), disk.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    resident = {t.data_ptr() for t in materializer._resident.values()}
    shared = [n for n, p in model.named_parameters() if p.data_ptr() in resident]
    new = [n for n, p in model.named_parameters() if p.data_ptr() not in resident]
    assert new and all(any(w in n for w in WRITERS) and n.startswith(("model.layers.2.", "model.layers.3.",
                                                                       "model.layers.4."))
                       for n in new)  # only the writers after the scaled jumps are new tensors
    assert len(shared) == len(mine) - len(new)
    again, _ = materializer.materialize(recipe)  # a second candidate reuses the same resident tensors
    assert again.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def trained_pair(specialists) -> tuple[str, str]:
    return str(specialists["addition"]), str(specialists["reversal"])


# ---- whole searches -------------------------------------------------------------------------------

def path_search(models: list[str], **kw) -> EvolveConfig:
    return EvolveConfig(genome=LayerPathDefinition(kind="layer_path", models=models, min_layers=3, max_layers=8, **kw),
                        tasks=TASKS, limit=8)


def run(config: EvolveConfig, storage: Path, max_fevals=16, **kw):
    search = SearchSettings(max_fevals=max_fevals, popsize=8, sigma0=0.3, random_seed=3, progress=False)
    options = RunOptions(storage_path=str(storage), num_workers=0, batch_size=16,
                         task_search_path=[str(ROOT / "tasks")], search=search, **kw)
    return evolve(config, options)


@pytest.mark.slow
def test_layer_path_search_is_deterministic_and_its_recipe_rebuilds_the_scored_model(trained_pair, tmp_path):
    config = path_search(list(trained_pair))
    first = run(config, tmp_path / "one")
    second = run(config, tmp_path / "two")
    fits = [c.score.fitness for c in first.search.candidates]
    assert [c.key for c in first.search.candidates] == [c.key for c in second.search.candidates]
    assert fits == [c.score.fitness for c in second.search.candidates]
    assert len(set(fits)) > 2  # candidates score differently: the paths matter
    depths = {len(recipe_path(c.recipe)) for c in first.search.candidates}
    assert len(depths) > 1 and min(depths) >= 3 and max(depths) <= 8
    store = tmp_path / "one"
    assert (store / "layer_path.png").stat().st_size > 0 and "layer_path.png" in first.report
    # the exported recipe, built by mergekit-yaml alone, is the model that was scored, bit for bit
    subprocess.run([sys.executable, "-m", "merge_engine.cli", str(store / "best_config.yaml"), str(tmp_path / "re")],
                   check=True, capture_output=True)
    rebuilt, _ = load_model(tmp_path / "re")
    scored, _ = LayerPathMaterializer(trained_pair[0]).materialize(first.best.recipe)
    mine, theirs = scored.state_dict(), rebuilt.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # and scores as it did in the search
    settings = WorkerSettings(tasks=TASKS, reference_model=trained_pair[0], task_search_path=[str(ROOT / "tasks")],
                              limit=8, batch_size=16, in_memory=False)
    on_disk = InProcessEvaluator(settings).evaluate([load_recipe(store / "best_config.yaml")])[0]
    assert on_disk.per_task == first.best.score.per_task
    # a resumed search with a larger budget replays the first 16 candidates without scoring them
    resumed = run(config, store, max_fevals=24, resume=True)
    assert resumed.search.scored == len(resumed.search.candidates) - 16


@pytest.mark.slow
def test_hybrid_search_builds_the_recipe_source_once(trained_pair, specialists, tmp_path):
    a, b = trained_pair
    recipe = tmp_path / "ta.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(specialists["base"]),
                                      "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                 {"model": b, "parameters": {"weight": 1.0}}]}))
    config = path_search([str(recipe), a, b], repeats=1)
    result = run(config, tmp_path / "store", max_fevals=8)
    built = tmp_path / "store" / "sources" / "ta"
    assert (built / "mergekit_config.yml").read_text() == recipe.read_text()
    assert result.search.candidates[0].recipe.slices[0].sources[0].model == str(built)  # x0: the merge itself
    assert {s.sources[0].model for c in result.search.candidates for s in c.recipe.slices} >= {str(built)}
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    run(config, tmp_path / "store", max_fevals=8, resume=True)
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    recipe.write_text(recipe.read_text().replace("weight: 1.0", "weight: 0.5"))
    with pytest.raises(ValueError, match="built from another recipe"):
        run(config, tmp_path / "store", max_fevals=8, resume=True)




@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason="mergekit 0.1.5 venv not available (EVOMERGE_MERGEKIT_VENV)")
def test_mergekit_builds_a_scaled_path_recipe_the_same(trained_pair, tmp_path):
    from safetensors.torch import load_file

    a, b = trained_pair
    recipe = path_recipe([Step(a, 0), Step(b, 1, 1.3), Step(b, 2), Step(a, 2, 0.6), Step(a, 3)], WRITERS)
    (tmp_path / "r.yml").write_text(recipe.to_yaml())
    run_merge(recipe, tmp_path / "ours", MergeOptions(progress=False))
    run_mergekit_yaml(tmp_path / "r.yml", tmp_path / "theirs")

    def weights(out: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["model.layers.1.mlp.down_proj.weight"],
                           weights(Path(b))["model.layers.1.mlp.down_proj.weight"])  # the scale was applied
