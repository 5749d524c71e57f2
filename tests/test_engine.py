"""End-to-end merges through run_merge and the mergekit-yaml CLI on real tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_engine import MergeOptions, RecipeError, load_recipe, parse_recipe, run_merge
from merge_engine.cli import main as cli_main
from merge_engine.executor import MergeError
from merge_engine.io.loader import ModelLoadError
from merge_engine.merge import plan_merge
from merge_engine.plan import PlanError

QUIET = MergeOptions(progress=False)


def weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def loads_cleanly(path) -> None:
    """transformers loads the merged model with every tensor from the files (none missing, so none initialised
    at random, none of the wrong shape) and it computes finite logits. What the tensors hold is checked against
    hand-computed values per architecture in test_tests_engine.py."""
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        assert torch.isfinite(model(tok("12+3=", return_tensors="pt").input_ids).logits).all()


def test_one_model_linear_is_that_model(zoo, tmp_path):
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1}}]})
    out = run_merge(cfg, tmp_path / "out", QUIET)
    assert weights(out).keys() == weights(zoo["a"]).keys()
    for k, v in weights(zoo["a"]).items():
        assert torch.equal(weights(out)[k], v), k
    loads_cleanly(out)
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()
    assert load_recipe(out / "mergekit_config.yml") == cfg


def test_task_arithmetic_matches_hand_computation_per_tensor(zoo, tmp_path):
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
                   {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.0},
                                                                      {"value": [0.0, 1.0]}]}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, a, b = weights(zoo["base"]), weights(zoo["a"]), weights(zoo["b"])
    for name, tensor in out.items():
        if "mlp" in name:
            wb = 0.0
        elif ".layers." in name:
            wb = int(name.split(".")[2]) / 3  # gradient [0, 1] over 4 layers
        else:
            wb = 0.0  # embeddings, final norm and lm_head at t = 0, as mergekit 0.1.5
        expected = base[name] + 0.5 * (a[name] - base[name]) + wb * (b[name] - base[name])
        assert torch.allclose(tensor, expected, atol=1e-6), name


def test_parameter_precedence_slice_source_over_slice_over_global(zoo, tmp_path):
    base = str(zoo["base"])
    cfg = parse_recipe({
        "merge_method": "linear", "parameters": {"weight": 1.0, "normalize": False},
        "slices": [{"sources": [{"model": str(zoo["a"]), "layer_range": [0, 2], "parameters": {"weight": 0.25}},
                                {"model": base, "layer_range": [0, 2]}],
                    "parameters": {"weight": 0.5}}]})
    plan, _ = plan_merge(cfg)
    job = next(j for j in plan.jobs if j.output_name == "model.layers.1.mlp.up_proj.weight")
    assert [p["weight"] for p in job.per_model_params] == [0.25, 0.5]
    assert plan.num_output_layers == 2


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt2", "gpt_neox", "tied"])
def test_architectures_merge_and_load(zoo, tmp_path, arch):
    cfg = parse_recipe({"merge_method": "slerp", "base_model": str(zoo[arch]),
                        "models": [{"model": str(zoo[arch])}, {"model": str(zoo[f"{arch}_ft"])}],
                        "parameters": {"t": [0.0, 0.5, 1.0]}, "dtype": "bfloat16"})
    out = run_merge(cfg, tmp_path / "out", QUIET)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["dtype"] == "bfloat16" and "torch_dtype" not in cfg_json  # the key the inputs use (as mergekit)
    names = set(weights(out))
    assert names == set(weights(zoo[arch])), "tied models keep their tied layout"
    loads_cleanly(out)


def test_frankenmerge_slices_repeat_layers_and_adjust_config(zoo, tmp_path):
    cfg = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(zoo["b"]), "layer_range": [1, 4]}]}]})
    out = run_merge(cfg, tmp_path / "out", QUIET)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["num_hidden_layers"] == 6
    w, a, b = weights(out), weights(zoo["a"]), weights(zoo["b"])
    assert torch.equal(w["model.layers.2.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(w["model.layers.3.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(w["model.layers.5.mlp.down_proj.weight"], b["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(w["lm_head.weight"], b["lm_head.weight"])  # post weights from the last slice
    assert torch.equal(w["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    loads_cleanly(out)


def test_sharding_writes_index_and_loads(zoo, tmp_path):
    cfg = parse_recipe({"merge_method": "ties", "base_model": str(zoo["base"]),
                        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1, "density": 0.5}},
                                   {"model": str(zoo["b"]), "parameters": {"weight": 1, "density": 0.5}}]})
    out = run_merge(cfg, tmp_path / "out", MergeOptions(progress=False, out_shard_size="10K"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert index["weight_map"][k] == shard.name
    loads_cleanly(out)


def test_dare_is_reproducible_with_seed(zoo, tmp_path):
    recipe = {"merge_method": "dare_ties", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5, "density": 0.3}},
                         {"model": str(zoo["b"]), "parameters": {"weight": 0.5, "density": 0.3}}]}
    cfg = parse_recipe(recipe)
    w1 = weights(run_merge(cfg, tmp_path / "o1", MergeOptions(progress=False, random_seed=11)))
    w2 = weights(run_merge(cfg, tmp_path / "o2", MergeOptions(progress=False, random_seed=11)))
    w3 = weights(run_merge(cfg, tmp_path / "o3", MergeOptions(progress=False, random_seed=12)))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w1[name], w2[name]) and not torch.equal(w1[name], w3[name])


# ---- bad input --------------------------------------------------------------------

def write_recipe(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
    return str(path)


def test_cli_reports_all_recipe_problems_with_paths(tmp_path, zoo, capsys):
    recipe = {"merge_method": "ties", "models": [{"model": str(zoo["a"]), "parameters": {"density": 1.5}},
                                                  {"model": str(zoo["b"]), "parameters": {"wieght": 1}}]}
    rc = cli_main([write_recipe(tmp_path, recipe), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "base_model: merge_method 'ties' needs a base_model" in err
    assert "models[0].parameters.density: 1.5 is outside [0.0, 1.0]" in err
    assert "models[1].parameters.wieght: ties has no parameter 'wieght'" in err
    assert "models[0].parameters.weight: required by ties" in err
    assert not (tmp_path / "out").exists()


def test_broken_yaml_and_unknown_method(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path, "merge_method: [linear\nmodels: -"))
    with pytest.raises(RecipeError, match="did you mean 'slerp'"):
        parse_recipe({"merge_method": "slerpp", "models": [{"model": "x"}]})


def test_missing_model_and_hub_id(tmp_path):
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": "meta-llama/Llama-3-8B"}]})
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE=1 forbids"):
        run_merge(cfg, tmp_path / "out", QUIET)
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(tmp_path / "nope")}]})
    with pytest.raises(ModelLoadError, match="not found"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_models(zoo, tmp_path):
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["base"])},
                                                             {"model": str(zoo["mistral"])}]})
    with pytest.raises(PlanError, match="mistral.*llama|llama.*mistral|--allow-crimes"):
        run_merge(cfg, tmp_path / "out", QUIET)
    other = tmp_path / "wide"
    shutil.copytree(zoo["a"], other)
    w = weights(other)
    w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(other)}]})
    with pytest.raises(PlanError, match="model.layers.0.mlp.up_proj.weight.*shape mismatch"):
        run_merge(cfg, tmp_path / "out", QUIET)


def test_nan_weights_fail_cleanly_and_keep_existing_output(zoo, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(zoo["a"], bad)
    w = weights(bad)
    w["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(bad)}]})
    with pytest.raises(MergeError, match=r"model.layers.1.self_attn.v_proj.weight.*not finite.*bad"):
        run_merge(cfg, out, MergeOptions(progress=False, write_into_existing=True))
    assert (out / "keep.txt").read_text() == "previous result"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_truncated_safetensors_is_reported(zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(zoo["a"], broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(broken)}]})
    with pytest.raises(ModelLoadError, match="model.safetensors.*(truncated or corrupt)"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


class Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_refused_without_opt_in_and_malicious_pickle_never_runs(zoo, tmp_path, capfd):
    plain = tmp_path / "pickled"
    shutil.copytree(zoo["a"], plain)
    torch.save(weights(plain), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(plain)}]})
    with pytest.raises(ModelLoadError, match="pickle.*--allow-pickle"):
        run_merge(cfg, tmp_path / "out", QUIET)
    out = run_merge(cfg, tmp_path / "out", MergeOptions(progress=False, allow_pickle=True))
    assert torch.equal(weights(out)["lm_head.weight"], weights(zoo["a"])["lm_head.weight"])

    evil = tmp_path / "evil"
    shutil.copytree(plain, evil)
    torch.save({"lm_head.weight": Boom()}, evil / "pytorch_model.bin")
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(evil)}]})
    with pytest.raises(ModelLoadError, match="refused to load"):
        run_merge(cfg, tmp_path / "out2", MergeOptions(progress=False, allow_pickle=True))
    assert "pickle code ran" not in capfd.readouterr().out


def test_output_inside_input_is_refused(zoo, tmp_path):
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}]})
    with pytest.raises(ValueError, match="overlaps input model"):
        run_merge(cfg, zoo["a"] / "merged", QUIET)


@pytest.mark.slow
def test_cli_end_to_end_subprocess_and_help(zoo, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "della", "base_model": str(zoo["base"]),
                                     "models": [{"model": str(zoo["a"]),
                                                 "parameters": {"weight": 0.5, "density": 0.7}},
                                                {"model": str(zoo["b"]),
                                                 "parameters": {"weight": 0.5, "density": 0.7}}],
                                     "parameters": {"epsilon": 0.1}, "chat_template": "chatml"})
    res = subprocess.run([sys.executable, "-m", "merge_engine.cli", recipe, str(tmp_path / "out"),
                          "--random-seed", "3", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert "<|im_start|>" in tok.chat_template
    loads_cleanly(tmp_path / "out")
    help_text = subprocess.run([sys.executable, "-m", "merge_engine.cli", "--help"], capture_output=True,
                               text=True).stdout
    for flag in ("--cuda", "--device", "--copy-tokenizer", "--out-shard-size", "--allow-crimes",
                 "--trust-remote-code", "--random-seed", "--lazy-unpickle", "--write-model-card", "--allow-pickle"):
        assert flag in help_text


@pytest.mark.slow
def test_every_example_recipe_runs(tmp_path, monkeypatch):
    """configs/recipes/*.yml name .cache/demo_models/...: stand in tiny models there."""
    from pathlib import Path

    from factory import make_model

    root = Path(__file__).resolve().parent.parent
    models = tmp_path / ".cache" / "demo_models"
    make_model(models / "base", layers=4)
    make_model(models / "addition", base=models / "base", seed=1)
    make_model(models / "reversal", base=models / "base", seed=2)
    monkeypatch.chdir(tmp_path)
    recipes = sorted((root / "configs" / "recipes").glob("*.yml"))
    from merge_engine.methods import REGISTRY

    assert {load_recipe(r).merge_method for r in recipes} == set(REGISTRY)
    for recipe in recipes:
        out = run_merge(load_recipe(recipe), tmp_path / "out" / recipe.stem,
                        MergeOptions(progress=False, random_seed=0))
        loads_cleanly(out)


def test_gpt_neox_output_head_is_a_post_layer_tensor(zoo):
    cfg = parse_recipe({"merge_method": "linear", "slices": [
        {"sources": [{"model": str(zoo["gpt_neox"]), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(zoo["gpt_neox_ft"]), "layer_range": [1, 2]}]}]})
    plan, _ = plan_merge(cfg)
    head = next(j for j in plan.jobs if j.output_name == "embed_out.weight")
    embed = next(j for j in plan.jobs if j.output_name == "gpt_neox.embed_in.weight")
    assert head.inputs[0].model == str(zoo["gpt_neox_ft"]) and embed.inputs[0].model == str(zoo["gpt_neox"])
    assert plan.jobs[-1].output_name in ("embed_out.weight", "gpt_neox.final_layer_norm.bias",
                                         "gpt_neox.final_layer_norm.weight")


def test_tokenizer_from_a_named_model_and_out_dtype(zoo, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(zoo["b"], donor)
    tok = AutoTokenizer.from_pretrained(str(donor))
    tok.chat_template = "{{ messages[0]['content'] }} from the donor"
    tok.save_pretrained(str(donor))
    for source in ({"tokenizer_source": str(donor)}, {"tokenizer": {"source": str(donor)}}):
        cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(donor)}],
                            "out_dtype": "float16", **source})
        out = run_merge(cfg, tmp_path / "out", QUIET)
        assert "from the donor" in AutoTokenizer.from_pretrained(str(out)).chat_template
        assert all(t.dtype == torch.float16 for t in weights(out).values())
    # as in mergekit, the tokenizer may come from a model the recipe does not merge
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}],
                        "tokenizer_source": str(donor)})
    out = run_merge(cfg, tmp_path / "out2", QUIET)
    assert "from the donor" in AutoTokenizer.from_pretrained(str(out)).chat_template


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    """Set before torch loads OpenMP (which reads it then): importing the engine is the first thing every
    command does, and a child process (a Ray worker) inherits it."""
    code = ("import sys, merge_engine, os; assert 'torch' in sys.modules; import subprocess; "
            "print(os.environ['OMP_WAIT_POLICY'], subprocess.run([sys.executable, '-c', "
            "'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'], capture_output=True, text=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["PASSIVE", "PASSIVE"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split() == ["ACTIVE", "ACTIVE"], out.stderr
