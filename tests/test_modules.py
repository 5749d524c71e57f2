"""`modules:` recipes (mergekit 0.1.5's multi-module syntax): each module of a vision-language model (text_decoder,
vision_tower, multi_modal_projector) gets its own models or slices, parameters and layer stack; a plain model is
the one module `default`.

Expected tensors are computed here from the input safetensors files with torch arithmetic, never by the engine;
which module a tensor belongs to is read from its name by this file's own table (MODULE_PREFIXES).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from factory import MERGEKIT_VENV, VLM_FAMILIES, make_model, make_vlm, run_mergekit_yaml, vlm_prompt
from safetensors.torch import load_file

from merge_engine.cli import main as cli_main

# the tensor-name prefixes of each module, as transformers 5 saves the tiny models (tests/factory.py)
MODULE_PREFIXES = {
    "llava": {"text_decoder": ("language_model.",), "vision_tower": ("vision_tower.",),
              "multi_modal_projector": ("multi_modal_projector.",)},
    "qwen2_vl": {"text_decoder": ("model.", "lm_head."), "vision_tower": ("visual.blocks.", "visual.patch_embed."),
                 "multi_modal_projector": ("visual.merger.",)},
    "gemma3": {"text_decoder": ("language_model.",), "vision_tower": ("vision_tower.",),
               "multi_modal_projector": ("multi_modal_projector.",)},
}
MODULE_PREFIXES["qwen2_5_vl"] = MODULE_PREFIXES["qwen2_vl"]
MODULE_PREFIXES["mistral3"] = MODULE_PREFIXES["llava"]  # vision_tower.patch_conv, .ln_pre, .transformer.layers
TEXT_LAYERS = {"llava": "language_model.model.layers", "qwen2_vl": "model.layers", "qwen2_5_vl": "model.layers",
               "gemma3": "language_model.model.layers", "mistral3": "language_model.model.layers"}
VISION_LAYERS = {"llava": "vision_tower.encoder.layers", "qwen2_vl": "visual.blocks", "qwen2_5_vl": "visual.blocks",
                 "gemma3": "vision_tower.encoder.layers", "mistral3": "vision_tower.transformer.layers"}
VISION_DEPTH_KEY = {"llava": "num_hidden_layers", "qwen2_vl": "depth", "qwen2_5_vl": "depth",
                    "gemma3": "num_hidden_layers", "mistral3": "num_hidden_layers"}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for i, family in enumerate(VLM_FAMILIES):
        base = make_vlm(root / family, family, seed=40 + i)
        out[family] = (base, make_vlm(root / f"{family}_ft", family, seed=50 + i, base=base, noise=0.05))
    return out


def merge(tmp_path, recipe: dict, name: str = "out"):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / name
    return cli_main([str(path), str(out), "--no-progress", "--quiet"]), out


def module_of(family: str, name: str) -> str:
    return next(m for m, prefixes in MODULE_PREFIXES[family].items() if name.startswith(prefixes))


def tensors(*dirs):
    return [load_file(d / "model.safetensors") for d in dirs]


def load_and_run(out, family: str):
    """The output loaded by transformers with no missing or unexpected weight, run on factory.vlm_prompt's prompt
    (an image in it except for Gemma3)."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model.eval()(**vlm_prompt(family, model.config)).logits
    assert torch.isfinite(logits).all()
    return model


def pair(base, ft, wb: float | None, wf: float | None) -> list[dict]:
    return [{"model": str(m), **({"parameters": {"weight": w}} if w is not None else {})}
            for m, w in ((base, wb), (ft, wf))]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_each_module_merged_with_its_own_weights(vlms, tmp_path, family):
    """text_decoder 0.3/0.7, vision_tower 0.9/0.1, multi_modal_projector 1/3 from the module's `parameters:` over
    the top level's 100 (linear normalizes: 0.25/0.75)."""
    base, ft = vlms[family]
    rc, out = merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 100.0}, "modules": {
        "text_decoder": {"models": pair(base, ft, 0.3, 0.7)},
        "vision_tower": {"models": pair(base, ft, 0.9, 0.1)},
        "multi_modal_projector": {"models": pair(base, ft, None, 3.0), "parameters": {"weight": 1.0}}}})
    assert rc == 0
    b, f, o = tensors(base, ft, out)
    assert set(o) == set(b)
    weights = {"text_decoder": 0.3, "vision_tower": 0.9, "multi_modal_projector": 0.25}  # base's share
    seen = {m: 0 for m in weights}
    for name in o:
        module = module_of(family, name)
        wb = weights[module]
        expected = wb * b[name] + (1 - wb) * f[name]
        assert (f[name] - b[name]).abs().max() > 1e-3, name  # the weights show in every tensor
        assert torch.allclose(o[name], expected, atol=1e-6), (name, module)
        seen[module] += 1
    assert all(seen.values()), seen
    emb = next(n for n in o if n.endswith("embed_tokens.weight"))
    model = load_and_run(out, family)
    assert torch.allclose(model.get_input_embeddings().weight, 0.3 * b[emb] + 0.7 * f[emb], atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_modules_each_given_the_recipes_models_write_the_same_model(vlms, tmp_path, family):
    """A `models:` recipe is every module given those models (mergekit's normalize_config): the same bytes, a
    per-layer gradient included (each module's t over its own layers)."""
    base, ft = vlms[family]
    models = [{"model": str(ft), "parameters": {"weight": [0.2, 1.0]}}]
    common = {"merge_method": "task_arithmetic", "base_model": str(base)}
    rc1, plain = merge(tmp_path, {**common, "models": models}, "plain")
    rc2, moduled = merge(tmp_path, {**common, "modules": {m: {"models": models} for m in MODULE_PREFIXES[family]}},
                         "moduled")
    assert rc1 == rc2 == 0
    assert (plain / "model.safetensors").read_bytes() == (moduled / "model.safetensors").read_bytes()
    assert (plain / "config.json").read_text() == (moduled / "config.json").read_text()
    b, f, o = tensors(base, ft, plain)
    name = f"{VISION_LAYERS[family]}.1.mlp.fc1.weight"
    assert torch.allclose(o[name], b[name] + 0.6 * (f[name] - b[name]), atol=1e-6)  # vision layer 1 of 3: t = 0.5


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_module_slices_restack_each_tower(vlms, tmp_path, family):
    """text_decoder: layers 0-1 mixed 0.3/0.7, then the fine-tune's layer 1 again (3 layers; its norm and head from
    the last slice's model, as mergekit); vision_tower: base layers 1-2 with fine-tune layers 0-1, 0.25/0.75
    (2 layers). The config's layer counts follow each tower."""
    base, ft = vlms[family]
    text_slices = [{"sources": [{"model": str(base), "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                                {"model": str(ft), "layer_range": [0, 2], "parameters": {"weight": 0.7}}]},
                   {"sources": [{"model": str(ft), "layer_range": [1, 2]}]}]
    vision_slices = [{"sources": [{"model": str(base), "layer_range": [1, 3]},
                                  {"model": str(ft), "layer_range": [0, 2]}],
                      "parameters": {"weight": [0.25, 0.25]}}]
    rc, out = merge(tmp_path, {"merge_method": "linear", "modules": {
        "text_decoder": {"slices": text_slices},
        "vision_tower": {"slices": vision_slices, "parameters": {"weight": 0.75}},  # slice's weight wins
        "multi_modal_projector": {"models": pair(base, ft, 0.5, 0.5)}}})
    assert rc == 0
    b, f, o = tensors(base, ft, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3 and cfg["vision_config"][VISION_DEPTH_KEY[family]] == 2
    text, vision = TEXT_LAYERS[family] + ".", VISION_LAYERS[family] + "."

    def expected(name: str) -> torch.Tensor:
        if name.startswith(text):
            i, rest = name[len(text):].split(".", 1)
            src = f"{text}{min(int(i), 1)}.{rest}"
            return f[src] if int(i) == 2 else 0.3 * b[src] + 0.7 * f[src]
        if name.startswith(vision):
            i, rest = name[len(vision):].split(".", 1)
            return 0.5 * b[f"{vision}{int(i) + 1}.{rest}"] + 0.5 * f[f"{vision}{i}.{rest}"]
        module = module_of(family, name)
        if module == "text_decoder":  # embeddings from the first slice, norm and head from the last
            return 0.3 * b[name] + 0.7 * f[name] if "embed_tokens" in name else f[name]
        return 0.5 * b[name] + 0.5 * f[name]

    layer0 = {n[len(text) + 2:] for n in b if n.startswith(text + "0.")}  # the tensors of text layer 0
    assert {n[len(text):] for n in o if n.startswith(text)} == {f"{i}.{rest}" for i in range(3) for rest in layer0}
    assert {n[len(vision):].split(".")[0] for n in o if n.startswith(vision)} == {"0", "1"}
    for name in o:
        assert torch.allclose(o[name], expected(name), atol=1e-6), name
    assert not torch.allclose(o[f"{text}2.mlp.down_proj.weight"], o[f"{text}1.mlp.down_proj.weight"])
    model = load_and_run(out, family)
    assert model.config.get_text_config().num_hidden_layers == 3


def test_plain_model_default_module_is_its_slices(tmp_path):
    """A plain model is the one module `default`: its slices and parameters (below the slices', above the top
    level's) as a `slices:` recipe with the same values."""
    base = make_model(tmp_path / "base", "llama", seed=7)
    ft = make_model(tmp_path / "ft", base=base, seed=8, noise=0.05)
    slices = [{"sources": [{"model": str(base), "layer_range": [0, 2]},
                           {"model": str(ft), "layer_range": [0, 2], "parameters": {"weight": 0.8}}]},
              {"sources": [{"model": str(base), "layer_range": [1, 2]}, {"model": str(ft), "layer_range": [1, 2]}]}]
    rc1, moduled = merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 5.0},
                                    "modules": {"default": {"slices": slices, "parameters": {"weight": 0.2}}}},
                         "moduled")
    rc2, plain = merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 0.2}, "slices": slices}, "plain")
    assert rc1 == rc2 == 0
    assert (plain / "model.safetensors").read_bytes() == (moduled / "model.safetensors").read_bytes()
    b, f, o = tensors(base, ft, moduled)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(o[name], 0.2 * b[name] + 0.8 * f[name], atol=1e-6)
    name = "model.layers.2.mlp.down_proj.weight"  # second slice: 0.2 / 0.2 from the module
    src = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(o[name], 0.5 * b[src] + 0.5 * f[src], atol=1e-6)
    assert json.loads((moduled / "config.json").read_text())["num_hidden_layers"] == 3


def _qwen_modules(base, ft) -> dict:
    return {m: {"models": pair(base, ft, 0.5, 0.5)} for m in MODULE_PREFIXES["qwen2_vl"]}


BAD_RECIPES = {
    # what is wrong -> (recipe edit on the qwen2_vl pair, the text the one error line holds)
    "unknown module": (lambda b, f, mods: {"modules": {("vision" if k == "vision_tower" else k): v
                                                       for k, v in mods.items()}},
                       ["modules.vision: ", "has no module 'vision' (did you mean 'vision_tower'?)",
                        "'vision_tower' not given", "text_decoder, vision_tower, multi_modal_projector"]),
    "layer range beyond the tower": (
        lambda b, f, mods: {"modules": {**mods, "vision_tower": {"slices": [{"sources": [
            {"model": str(b), "layer_range": [0, 4]}, {"model": str(f), "layer_range": [0, 4]}]}]}}},
        ["modules.vision_tower.slices[0].sources[0]: layer_range [0, 4] exceeds the 3 vision_tower layers "
         "(vision_config.depth)"]),
    "models next to modules": (lambda b, f, mods: {"modules": mods, "models": pair(b, f, 0.5, 0.5)},
                               ["models/modules: give exactly one of `models:`, `slices:` or `modules:`",
                                "under `modules:`"]),
    "a module left out": (lambda b, f, mods: {"modules": {k: v for k, v in mods.items()
                                                          if k != "multi_modal_projector"}},
                          ["modules: 'multi_modal_projector' not given", "give every module its `models:`"]),
    "slices of the projector": (
        lambda b, f, mods: {"modules": {**mods, "multi_modal_projector": {"slices": [{"sources": [
            {"model": str(b), "layer_range": [0, 1]}]}]}}},
        ["modules.multi_modal_projector.slices[0]: the multi_modal_projector has no layer stack"]),
    "models and slices in one module": (
        lambda b, f, mods: {"modules": {**mods, "text_decoder": {"models": pair(b, f, 0.5, 0.5), "slices": [
            {"sources": [{"model": str(b), "layer_range": [0, 1]}]}]}}},
        ["modules.text_decoder: give exactly one of `models:` or `slices:` for this module"]),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_bad_modules_are_one_error_and_nothing_is_written(vlms, tmp_path, capsys, case):
    base, ft = vlms["qwen2_vl"]
    edit, needles = BAD_RECIPES[case]
    rc, out = merge(tmp_path, {"merge_method": "linear", **edit(base, ft, _qwen_modules(base, ft))})
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.yml"]


def test_plain_model_has_only_the_default_module(tmp_path, capsys):
    base = make_model(tmp_path / "base", "llama", seed=7)
    rc, out = merge(tmp_path, {"merge_method": "linear",
                               "modules": {"text_decoder": {"models": [{"model": str(base)}]}}})
    err = capsys.readouterr().err
    assert rc == 2 and "modules.text_decoder: " in err and "has no module 'text_decoder'" in err, err
    assert "'default' not given" in err and "(the modules of " in err and ": default)" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason=f"mergekit 0.1.5 venv not available at {MERGEKIT_VENV} (set EVOMERGE_MERGEKIT_VENV)")
def test_default_module_as_mergekit_writes_it(tmp_path):
    """mergekit 0.1.5 accepts `modules: {default: ...}` for a plain Llama (its vision-language definitions do not
    fit transformers 5 checkpoints, README "Differences from mergekit"): the same tensors, module parameters and
    a gradient over each slice included."""
    base = make_model(tmp_path / "base", "llama", seed=7)
    ft = make_model(tmp_path / "ft", base=base, seed=8, noise=0.05)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "modules": {"default": {"parameters": {"weight": [0.1, 0.9]}, "slices": [
                  {"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(ft), "layer_range": [0, 2]}]},
                  {"sources": [{"model": str(base), "layer_range": [1, 2]},
                               {"model": str(ft), "layer_range": [1, 2], "parameters": {"weight": 0.5}}]}]}}}
    rc, ours = merge(tmp_path, recipe)
    assert rc == 0
    theirs = run_mergekit_yaml(tmp_path / "out.yml", tmp_path / "theirs", "--no-copy-tokenizer")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert json.loads((theirs / "config.json").read_text())["num_hidden_layers"] == 3
