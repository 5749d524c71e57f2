"""Vision-language models (config.json nests text_config / vision_config): `models:` recipes merge every
tensor (text decoder, vision encoder, projector, embeddings) and a gradient runs over each tower's own layers,
as mergekit 0.1.5 plans its modules; `slices:` is refused.

Expected tensors are computed here from the input safetensors files with torch arithmetic, never by the engine.
The tiny models (tests/factory.py) have 2 text layers and 3 vision layers, so a gradient taken over the wrong
tower's depth lands on other values (vision layer 1: t = 0.5, not 1).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from factory import (
    MERGEKIT_VENV,
    VLM_FAMILIES,
    VLM_TEXT_LAYERS,
    VLM_VISION_LAYERS,
    make_vlm,
    run_mergekit_yaml,
    vlm_prompt,
)
from safetensors.torch import load_file, save_file

from merge_engine.architecture import detect_architecture
from merge_engine.cli import main as cli_main
from merge_engine.errors import PlanError

# where each family's layers live in a checkpoint saved by transformers 5 (its legacy checkpoint names)
TEXT_PREFIX = {"llava": "language_model.model.layers", "qwen2_vl": "model.layers", "qwen2_5_vl": "model.layers",
               "gemma3": "language_model.model.layers", "mistral3": "language_model.model.layers"}
VISION_PREFIX = {"llava": "vision_tower.encoder.layers", "qwen2_vl": "visual.blocks", "qwen2_5_vl": "visual.blocks",
                 "gemma3": "vision_tower.encoder.layers", "mistral3": "vision_tower.transformer.layers"}
PROJECTOR = {"llava": "multi_modal_projector.linear_1.weight", "qwen2_vl": "visual.merger.mlp.0.weight",
             "qwen2_5_vl": "visual.merger.mlp.0.weight", "gemma3": "multi_modal_projector.mm_input_projection_weight",
             "mistral3": "multi_modal_projector.patch_merger.merging_layer.weight"}
VISION_DEPTH_KEY = {"qwen2_vl": "depth", "qwen2_5_vl": "depth"}  # else num_hidden_layers


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for i, family in enumerate(VLM_FAMILIES):
        base = make_vlm(root / family, family, seed=20 + i)
        out[family] = (base, make_vlm(root / f"{family}_ft", family, seed=30 + i, base=base))
    return out


def merge(tmp_path, recipe: dict, *flags: str):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    return cli_main([str(path), str(out), "--no-progress", "--quiet", *flags]), out


def tower_t(family: str, name: str) -> float | None:
    """The gradient position of a layer tensor in its own tower (None outside the layers)."""
    for prefix, n in ((TEXT_PREFIX[family], VLM_TEXT_LAYERS), (VISION_PREFIX[family], VLM_VISION_LAYERS)):
        if m := re.match(re.escape(prefix) + r"\.(\d+)\.", name):
            return int(m[1]) / (n - 1)
    return None


def load_output(family: str, out):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def forward(family: str, model, seed: int = 0) -> torch.Tensor:
    """Logits of factory.vlm_prompt's prompt: with one random image, text only for Gemma3."""
    with torch.no_grad():
        return model(**vlm_prompt(family, model.config, seed)).logits


def gradient_merge(tmp_path, base, ft):
    """task_arithmetic of `ft` on `base` with weight [0.2, 1.0] (a per-layer gradient): the output directory and
    the tensors of base, fine-tune and output, which hold the same names."""
    rc, out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(ft), "parameters": {"weight": [0.2, 1.0]}}]})
    assert rc == 0
    b, f, o = (load_file(d / "model.safetensors") for d in (base, ft, out))
    assert set(o) == set(b)  # the checkpoint's own names, nothing dropped
    return out, b, f, o


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_linear_merges_every_tensor_and_loads(vlms, tmp_path, family):
    base, ft = vlms[family]
    rc, out = merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]})
    assert rc == 0
    b, f, o = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors"), load_file(
        out / "model.safetensors")
    assert set(o) == set(b)  # the checkpoint's own names, nothing dropped
    for name in o:
        assert torch.allclose(o[name], 0.3 * b[name] + 0.7 * f[name], atol=1e-6), name
    groups = {"text": [n for n in o if n.startswith(TEXT_PREFIX[family] + ".")],
              "vision": [n for n in o if n.startswith(VISION_PREFIX[family] + ".")],
              "projector": [PROJECTOR[family]], "embedding": [n for n in o if n.endswith("embed_tokens.weight")]}
    assert all(groups.values()), groups  # each part of the model was checked above
    assert {int(n.split(".")[len(VISION_PREFIX[family].split("."))]) for n in groups["vision"]} == {0, 1, 2}
    model = load_output(family, out)
    emb = next(n for n in groups["embedding"])
    assert torch.allclose(model.get_input_embeddings().weight, 0.3 * b[emb] + 0.7 * f[emb], atol=1e-6)
    logits = forward(family, model)
    assert logits.shape[-1] == model.config.get_text_config().vocab_size and torch.isfinite(logits).all()
    if family != "gemma3":  # the merged vision tower and projector reach the logits
        assert not torch.allclose(logits, forward(family, model, seed=1), atol=1e-3)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_task_arithmetic_gradient_runs_over_each_towers_own_layers(vlms, tmp_path, family):
    base, ft = vlms[family]
    out, b, f, o = gradient_merge(tmp_path, base, ft)
    seen = set()
    for name in o:
        t = tower_t(family, name)
        weight = 0.2 + 0.8 * (t if t is not None else 0.0)  # outside the layers: t = 0, as mergekit
        seen.add(round(weight, 3))
        assert torch.allclose(o[name], b[name] + weight * (f[name] - b[name]), atol=1e-6), (name, weight)
    assert seen == {0.2, 0.6, 1.0}  # text layers 0.2, 1.0; vision layers 0.2, 0.6, 1.0
    assert torch.isfinite(forward(family, load_output(family, out))).all()


def test_towers_detected_from_nested_config(vlms):
    for family in VLM_FAMILIES:
        base = vlms[family][0]
        cfg = json.loads((base / "config.json").read_text())
        arch = detect_architecture(cfg, list(load_file(base / "model.safetensors")), family)
        assert [(t.name, t.prefix, t.num_layers) for t in arch.towers] == [
            ("text", TEXT_PREFIX[family], VLM_TEXT_LAYERS), ("vision", VISION_PREFIX[family], VLM_VISION_LAYERS)]
        assert arch.num_layers_key == "text_config.num_hidden_layers"
        cfg["vision_config"][VISION_DEPTH_KEY.get(family, "num_hidden_layers")] = 5
        with pytest.raises(PlanError, match=r"=5 but the weights hold .*0\.\.2 \(3 layers\)"):
            detect_architecture(cfg, list(load_file(base / "model.safetensors")), family)


def test_output_config_and_processor_files_come_from_the_base(vlms, tmp_path):
    base, ft = vlms["llava"]
    rc, out = merge(tmp_path, {"merge_method": "linear", "base_model": str(base), "out_dtype": "bfloat16",
                               "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                          {"model": str(ft), "parameters": {"weight": 0.5}}]})
    assert rc == 0
    expected = json.loads((base / "config.json").read_text())
    expected["dtype"] = "bfloat16"
    assert json.loads((out / "config.json").read_text()) == expected  # nested configs as the base's
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert load_output("llava", out).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_slices_are_refused_and_nothing_is_written(vlms, tmp_path, capsys, family):
    base, ft = vlms[family]
    rc, out = merge(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(ft), "layer_range": [1, 2]}]}]})
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mergekit-yaml: error: slices:"), err
    assert "vision-language model" in err[0] and "use `models:`" in err[0] and TEXT_PREFIX[family] in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


def test_layer_count_mismatch_is_an_error_and_nothing_is_written(vlms, tmp_path, capsys):
    base, ft = vlms["gemma3"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in ft.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 4
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, out = merge(tmp_path, {"merge_method": "linear", "base_model": str(broken),
                               "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                          {"model": str(broken), "parameters": {"weight": 0.5}}]})
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vision_config.num_hidden_layers=4" in err[0], err
    assert not out.exists()


def test_padded_vocabulary_sets_the_nested_vocab_size(vlms, tmp_path):
    base, ft = vlms["llava"]
    rc, out = merge(tmp_path, {"merge_method": "linear", "base_model": str(base),
                               "tokenizer": {"source": "base", "pad_to_multiple_of": 64},
                               "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                          {"model": str(ft), "parameters": {"weight": 0.5}}]})
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == 64
    b, f, o = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors"), load_file(
        out / "model.safetensors")
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        merged = 0.5 * b[name] + 0.5 * f[name]
        assert o[name].shape == (64, 32) and torch.allclose(o[name][: len(merged)], merged, atol=1e-6)
        assert torch.allclose(o[name][len(merged):], merged.mean(0).expand(64 - len(merged), -1), atol=1e-6)
    assert forward("llava", load_output("llava", out)).shape[-1] == 64


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason=f"mergekit 0.1.5 venv not available at {MERGEKIT_VENV} (set EVOMERGE_MERGEKIT_VENV)")
def test_vision_tower_and_projector_as_mergekit_writes_them(vlms, tmp_path):
    """mergekit 0.1.5 (with transformers 5) plans a LLaVA checkpoint from the transformers model's own names
    (no JSON definition: `model.vision_tower...`, `model.multi_modal_projector...`), per module as we do; it
    writes no text-decoder tensor at all (README "Differences from mergekit"). The tensors it writes must equal
    ours under the checkpoint's names."""
    base, ft = vlms["llava"]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(ft), "parameters": {"weight": [0.2, 1.0]}}]}
    rc, ours = merge(tmp_path, recipe)
    assert rc == 0
    theirs = run_mergekit_yaml(tmp_path / "recipe.yml", tmp_path / "theirs", "--no-copy-tokenizer")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    renamed = {k.removeprefix("model."): v for k, v in b.items()}
    assert set(renamed) == {n for n in a if n.startswith(("vision_tower.", "multi_modal_projector."))}
    for name, tensor in renamed.items():
        assert torch.allclose(a[name], tensor, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason=f"mergekit 0.1.5 venv not available at {MERGEKIT_VENV} (set EVOMERGE_MERGEKIT_VENV)")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "mistral3"])
def test_every_tensor_as_mergekit_writes_it(vlms, tmp_path, family):
    """mergekit 0.1.5's JSON definitions of Qwen2.5-VL and Mistral3 name the tensors as transformers 5 saves them:
    it writes every tensor, under the same names, and with a per-layer gradient they equal ours, except
    Qwen2.5-VL's `visual.merger.mlp.*`, which its definition plans as a 2-"layer" module without layer indices:
    written at t = 0 and again at t = 1, the t = 1 value stays (README "Differences from mergekit")."""
    base, ft = vlms[family]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(ft), "parameters": {"weight": [0.2, 1.0]}}]}
    rc, ours = merge(tmp_path, recipe)
    assert rc == 0
    theirs = run_mergekit_yaml(tmp_path / "recipe.yml", tmp_path / "theirs", "--no-copy-tokenizer")
    a, m = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    assert set(a) == set(m)
    merger = [n for n in a if n.startswith("visual.merger.mlp.")]
    assert bool(merger) == (family == "qwen2_5_vl")
    for name in a:
        if name in merger:
            assert torch.allclose(a[name], b[name] + 0.2 * (f[name] - b[name]), atol=1e-6), name  # ours: t = 0
            assert torch.allclose(m[name], f[name], atol=1e-6), name  # mergekit's: t = 1
        else:
            assert torch.allclose(a[name], m[name], atol=1e-6), name


def test_print_plan_names_both_towers_and_writes_nothing(vlms, tmp_path, capsys):
    base, ft = vlms["qwen2_vl"]
    rc, out = merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]},
        "--print-plan")
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and not out.exists()
    assert lines[0].startswith(f"# {len(lines) - 1} tensors, 2 text + 3 vision layers, qwen2_vl, reference ")
    assert any(ln.startswith("visual.blocks.2.attn.qkv.weight [96, 32] float32 <- linear(") for ln in lines), lines


def with_model_prefix(src, dst):
    """`src` re-saved under the names transformers 4.5x wrote for LLaVA (its model's own attribute paths):
    model.language_model.layers.N., model.vision_tower..., model.multi_modal_projector..., lm_head."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    renamed = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith("language_model."):
            name = name.removeprefix("language_model.")
        else:
            name = "model." + name
        renamed[name] = tensor
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_llava_saved_with_model_prefixed_names(vlms, tmp_path):
    base, ft = (with_model_prefix(p, tmp_path / p.name) for p in vlms["llava"])
    out, b, f, o = gradient_merge(tmp_path, base, ft)
    for name in o:
        m = re.match(r"model\.(language_model|vision_tower\.encoder)\.layers\.(\d+)\.", name)
        t = int(m[2]) / ((VLM_TEXT_LAYERS if m[1] == "language_model" else VLM_VISION_LAYERS) - 1) if m else 0.0
        assert torch.allclose(o[name], b[name] + (0.2 + 0.8 * t) * (f[name] - b[name]), atol=1e-6), name
    assert torch.isfinite(forward("llava", load_output("llava", out))).all()


def test_evolve_refuses_vision_language_models(vlms):
    from evolve.config import GenomeDefinition, LayerPathDefinition
    from evolve.genome import Genome
    from evolve.layer_path import LayerPathGenome

    base, ft = (str(p) for p in vlms["gemma3"])
    with pytest.raises(ValueError, match=r"genome: .* is a vision-language model \('gemma3'\); mergekit-evolve"):
        Genome.for_models(GenomeDefinition(models=[ft], base_model=base, merge_method="task_arithmetic"))
    with pytest.raises(ValueError, match="is a vision-language model"):
        LayerPathGenome.for_models(LayerPathDefinition(kind="layer_path", models=[base, ft], scales="none"))
