"""evolve's best_config.yaml runs as it is from any directory and rebuilds the scored model bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factory import MERGEKIT_VENV
from safetensors.torch import load_file

from evolve.config import EvolveConfig, GenomeDefinition, TaskDefinition
from evolve.materialize import OnDiskMaterializer
from evolve.run import RunOptions, evolve
from evolve.scoring import Score
from evolve.search import SearchSettings

ROOT = Path(__file__).resolve().parent.parent
SEED = 3


class WeightFitness:
    """A stand-in scorer: fitness is the first model's weight (the export does not depend on lm-eval)."""

    def evaluate(self, recipes, validation=False):
        def first(v):
            return float(v if not isinstance(v, list) else first(v[0]))
        return [Score(first(r.models[0].parameters["weight"]), {"t": 0.0}) for r in recipes]

    def close(self):
        pass


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory):
    """A dare_ties search run with relative model paths from its own directory."""
    work = tmp_path_factory.mktemp("search_cwd")
    for name in ("base", "a", "b"):
        shutil.copytree(zoo[name], work / "models" / name)
    here = Path.cwd()
    os.chdir(work)
    try:
        config = EvolveConfig(genome=GenomeDefinition(models=["models/a", "models/b"], base_model="models/base",
                                                      merge_method="dare_ties", layer_granularity=2),
                              tasks=[TaskDefinition(name="t")])
        out = evolve(config, RunOptions(storage_path="runs/s", search=SearchSettings(
            max_fevals=4, popsize=4, random_seed=SEED, progress=False)), evaluator=WeightFitness())
        scored = OnDiskMaterializer(work / "scratch", random_seed=SEED).write(out.best.recipe)
        scored_weights = weights(scored)
    finally:
        os.chdir(here)
    return {"work": work, "storage": work / "runs" / "s", "scored": scored_weights}


def test_exported_recipe_is_absolute_seeded_and_typed(exported):
    data = yaml.safe_load((exported["storage"] / "best_config.yaml").read_text())
    paths = [data["base_model"], *(m["model"] for m in data["models"])]
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in paths)
    assert data["random_seed"] == SEED and data["dtype"] == "float32"
    assert (exported["storage"] / "best_config.yaml").read_text().startswith("# mergekit-evolve")


@pytest.mark.slow
def test_exported_recipe_rebuilds_the_scored_model_from_another_directory(exported, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = exported["storage"] / "best_config.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(recipe), "rebuilt", "--no-progress"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rebuilt = weights(elsewhere / "rebuilt")
    assert same(rebuilt, exported["scored"])
    assert same(rebuilt, weights(exported["storage"] / "best_model"))
    # the seed is what makes it identical: another seed builds another model
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "random_seed": SEED + 1}))
    proc = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(other), "other", "--no-progress"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not same(weights(elsewhere / "other"), exported["scored"])


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "python").exists(), reason="mergekit 0.1.5 venv not available")
def test_mergekit_accepts_the_exported_recipe(exported, tmp_path):
    recipe = exported["storage"] / "best_config.yaml"
    check = ("import sys, yaml; from mergekit.config import MergeConfiguration; "
             "c = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))); "
             "print(c.merge_method, c.dtype, len(c.referenced_models()))")
    proc = subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-c", check, str(recipe)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["dare_ties", "float32", "3"]
