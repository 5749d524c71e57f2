"""Every family of merge_engine/architecture.py's KNOWN table on a tiny random model built by transformers
(tests/factory.py's FAMILY_CONFIGS: 2 layers, hidden size 32): detected as this file's own table says, merged
through the CLI, checked tensor by tensor against a hand computation from the input files, loaded back by
transformers and run; and, where RESIDUAL_WRITERS lists the family, its writers checked against the algebra
evolve/layer_path.py relies on.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from factory import FAMILY_CONFIGS, MOE_FAMILIES, fuse_experts, make_family
from safetensors.torch import load_file, save_file

from merge_engine.architecture import KNOWN, RESIDUAL_WRITERS, detect_architecture
from merge_engine.cli import main as cli_main

GPT = ("transformer.wte.weight", "lm_head.weight")
# model_type -> (input embedding, output head), as the checkpoints transformers 5 saves name them
EXPECTED = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "phi3", "phi", "olmo", "olmo2", "olmo3", "stablelm", "starcoder2", "cohere",
                     "cohere2", "granite", "smollm3"), ("model.embed_tokens.weight", "lm_head.weight")),
    "gpt2": GPT, "gpt_bigcode": GPT, "gptj": GPT,
    "falcon": ("transformer.word_embeddings.weight", "lm_head.weight"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
}
LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def test_every_known_family_is_built_and_expected_here():
    assert set(EXPECTED) == set(KNOWN) == set(FAMILY_CONFIGS)
    assert set(RESIDUAL_WRITERS) <= set(KNOWN)


def load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.get_decoder()
    return inner.layers if hasattr(inner, "layers") else inner.h


@pytest.mark.parametrize("model_type", sorted(KNOWN))
def test_family_detected_merged_and_loaded(tmp_path, model_type):
    base = make_family(tmp_path / "base", model_type, seed=3)
    ft = make_family(tmp_path / "ft", model_type, seed=4, base=base, noise=0.05)
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", False)

    arch = detect_architecture(cfg, list(b), model_type)
    embedding, head = EXPECTED[model_type]
    assert (arch.num_layers, arch.embedding_name, arch.head_name) == (2, embedding, head)
    assert embedding in b and (head not in b) == bool(tied), (sorted(b), tied)
    assert {int(m[1]) for n in b if (m := LAYER_INDEX.search(n))} == {0, 1}

    recipe = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert cli_main([str(tmp_path / "recipe.yml"), str(tmp_path / "out"), "--no-progress", "--quiet"]) == 0
    o = load_file(tmp_path / "out" / "model.safetensors")
    assert set(o) == set(b)  # a tied model stays tied: no head written
    changed = [n for n in o if (f[n] - b[n]).abs().max() > 1e-3]
    assert len(changed) > len(o) // 2  # the perturbation shows: the weights are tested, not just copies
    for name in o:
        assert torch.allclose(o[name], 0.3 * b[name] + 0.7 * f[name], atol=1e-6), name

    model = load(tmp_path / "out")
    assert torch.allclose(model.get_input_embeddings().weight, 0.3 * b[embedding] + 0.7 * f[embedding], atol=1e-6)
    assert len(decoder_layers(model)) == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7, 8]])).logits
    assert logits.shape == (1, 5, cfg["vocab_size"]) and torch.isfinite(logits).all()


# filters of RESIDUAL_WRITERS that name no tensor of one checkpoint layout (per expert, as transformers saves MoEs, or
# fused, factory.fuse_experts) and all of them in the other
NOT_IN_LAYOUT = {("mixtral", False): {"experts.down_proj"}, ("mixtral", True): {".w2."}}


@pytest.mark.parametrize(("model_type", "fused"), [(mt, False) for mt in sorted(RESIDUAL_WRITERS)]
                         + [(mt, True) for mt in MOE_FAMILIES])
def test_residual_writers_carry_a_scale_of_the_stream(tmp_path, model_type, fused):
    """Multiplying the writers of layer 1 by 1/s in the checkpoint gives the logits of the original model with the
    residual stream multiplied by s before layer 1 (the final norm removes the overall factor). So that only the
    algebra is left, norm epsilons are set to 1e-12 and the embedding (hence the stream) is scaled up by 30: the
    random tiny models' hidden states are small (std ~0.02), and OLMo's epsilon is fixed at 1e-5."""
    src = make_family(tmp_path / "src", model_type, seed=5)
    if fused:
        fuse_experts(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({k: 1e-12 for k in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon") if k in cfg})
    tensors = load_file(src / "model.safetensors")
    tensors[EXPECTED[model_type][0]] *= 30
    for d in (src, tmp_path / "scaled"):
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    scaled = tmp_path / "scaled"
    s = 2.5
    writers = RESIDUAL_WRITERS[model_type]
    hit = {w: 0 for w in writers}
    for name in tensors:
        m = LAYER_INDEX.search(name)
        for w in writers:
            if m and int(m[1]) >= 1 and w in name:
                tensors[name] = tensors[name] / s
                hit[w] += 1
                break
    unused = NOT_IN_LAYOUT.get((model_type, fused), set())
    assert {w for w, n in hit.items() if not n} == unused, hit  # every other filter names tensors of this layout
    save_file(tensors, str(scaled / "model.safetensors"), metadata={"format": "pt"})

    original, rescaled = load(src), load(scaled)

    def scale_input(module, args, kwargs):
        if args:
            return (args[0] * s, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = original(ids).logits
        decoder_layers(original)[1].register_forward_pre_hook(scale_input, with_kwargs=True)
        intended, got = original(ids).logits, rescaled(ids).logits
    assert not torch.allclose(intended, plain, atol=1e-4)  # the scale changes the model
    torch.testing.assert_close(got, intended, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_fused_experts_checkpoint_merged_and_loaded(tmp_path, model_type):
    """A MoE checkpoint under transformers 5's fused names (factory.fuse_experts: `mlp.experts.down_proj`
    [experts, hidden, intermediate], `mlp.experts.gate_up_proj`): merged 0.3/0.7 tensor by tensor under its own
    names, loaded by transformers and run."""
    base = fuse_experts(make_family(tmp_path / "base", model_type, seed=3))
    ft = fuse_experts(make_family(tmp_path / "ft", model_type, seed=4, base=base, noise=0.05))
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    assert b["model.layers.1.mlp.experts.down_proj"].shape[0] == 2 and not any(".experts.0." in n for n in b)
    recipe = {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert cli_main([str(tmp_path / "recipe.yml"), str(tmp_path / "out"), "--no-progress", "--quiet"]) == 0
    o = load_file(tmp_path / "out" / "model.safetensors")
    assert set(o) == set(b)
    for name in o:
        assert torch.allclose(o[name], 0.3 * b[name] + 0.7 * f[name], atol=1e-6), name
    with torch.no_grad():
        logits = load(tmp_path / "out")(input_ids=torch.tensor([[1, 5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
