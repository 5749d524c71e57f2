"""mergekit-moe: the Mixtral (and Qwen2-MoE, Qwen3-MoE) output loads in transformers and generates, every
expert tensor is its source's MLP tensor and every other tensor the base's, the router rows of each gate mode
match an independent computation (hidden states captured with forward hooks, embeddings by one-hot products,
mergekit's global-RNG draws), the routers prefer each expert on its own prompts, a one-expert MoE computes
exactly the dense model with that expert's MLP, and bad input writes nothing."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from factory import MERGEKIT_VENV
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evolve.demo.tokenizer import BOS_ID, CHARS, SPECIALS
from merge_engine.moe.cli import build_parser, main

PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
PROMPTS = {  # characters of the demo's character tokenizer only
    "a": (["12+34=", "5+6=", "77+8="], ["abc"]),
    "b": (["olleh>", "dlrow>", "abc>"], None),
}
LAYERS = 4  # the zoo's llama base


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def experts_of(zoo, names=("a", "b"), prompts=True, **extra) -> list[dict]:
    out = []
    for n in names:
        e: dict = {"source_model": str(zoo[n])}
        if prompts:
            pos, neg = PROMPTS[n]
            e["positive_prompts"] = pos
            if neg:
                e["negative_prompts"] = neg
        out.append({**e, **extra.get(n, {})})
    return out


def moe(config: Path, out: Path, *args: str) -> int:
    return main([str(config), str(out), "--quiet", *args])


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def char_ids(prompt: str) -> list[int]:
    """What mergekit feeds the model: BOS, then the prompt's characters (built here from the vocabulary list,
    not with the tokenizer)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    return [BOS_ID] + [vocab[c] for c in prompt]


@pytest.fixture(scope="module")
def random_moe(zoo, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_random")
    cfg = write_config(root / "moe.yml", base_model=str(zoo["base"]), gate_mode="random", experts_per_token=2,
                       experts=experts_of(zoo, prompts=False))
    assert moe(cfg, root / "out", "--random-seed", "7") == 0
    return root / "out"


@pytest.fixture(scope="module")
def hidden_moe(zoo, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_hidden")
    cfg = write_config(root / "moe.yml", base_model=str(zoo["base"]), gate_mode="hidden", experts_per_token=1,
                       experts=experts_of(zoo))
    assert moe(cfg, root / "out") == 0
    return root / "out"


# --- layout and provenance of every tensor ---------------------------------------------------------------


def test_mixtral_tensors_are_the_experts_and_the_base(zoo, random_moe):
    out = tensors(random_moe)
    base = load_file(str(zoo["base"] / "model.safetensors"))
    experts = [load_file(str(zoo[n] / "model.safetensors")) for n in ("a", "b")]
    seen = set()
    for name, t in base.items():
        if ".mlp." in name:
            continue
        assert torch.equal(out[name], t), name
        seen.add(name)
    for layer in range(LAYERS):
        for e, src in enumerate(experts):
            for w, proj in PROJ.items():
                name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                mlp = src[f"model.layers.{layer}.mlp.{proj}.weight"]
                assert torch.equal(out[name], mlp), name
                assert not torch.equal(mlp, base[f"model.layers.{layer}.mlp.{proj}.weight"])  # really the expert's
                seen.add(name)
        gate = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (2, 32) and gate.dtype == torch.float32
        seen.add(f"model.layers.{layer}.block_sparse_moe.gate.weight")
    assert set(out) == seen  # nothing else


def test_random_gates_are_mergekits_draws(random_moe):
    """mergekit: transformers' set_seed(7), then torch.randn((layers, experts, hidden)) from the global RNG."""
    out = tensors(random_moe)
    torch.manual_seed(7)
    expected = torch.randn((LAYERS, 2, 32))
    for layer in range(LAYERS):
        assert torch.equal(out[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected[layer])


def test_mixtral_config_tokenizer_and_files(zoo, random_moe, hidden_moe):
    cfg = json.loads((random_moe / "config.json").read_text())
    base_cfg = json.loads((zoo["base"] / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 2
    assert json.loads((hidden_moe / "config.json").read_text())["num_experts_per_tok"] == 1  # not Mixtral's default
    assert cfg["sliding_window"] is None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps"):
        assert cfg[key] == base_cfg[key], key
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (random_moe / f).read_bytes() == (zoo["base"] / f).read_bytes()
    assert yaml.safe_load((random_moe / "mergekit_moe_config.yml").read_text())["gate_mode"] == "random"
    assert (random_moe / "README.md").is_file()
    assert not list(random_moe.parent.glob(".*partial*"))


def test_mixtral_loads_and_generates(zoo, random_moe):
    model = AutoModelForCausalLM.from_pretrained(str(random_moe))
    assert type(model).__name__ == "MixtralForCausalLM"
    src = [load_file(str(zoo[n] / "model.safetensors")) for n in ("a", "b")]
    experts = model.model.layers[1].mlp.experts  # transformers fuses w1 and w3 into gate_up_proj on load
    for e in range(2):
        gate_up = experts.gate_up_proj[e]
        assert torch.equal(gate_up[:64], src[e]["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(gate_up[64:], src[e]["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], src[e]["model.layers.1.mlp.down_proj.weight"])
    ids = torch.tensor([char_ids("12+3=")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)
    assert torch.isfinite(model(ids).logits).all()


def test_one_expert_moe_is_the_dense_model_with_that_mlp(zoo, tmp_path):
    """With a single expert (experts_per_token 1) the router weight is softmax over one logit = 1, so the MoE
    computes the base's attention with expert a's MLP: the dense model holding those tensors, to float rounding."""
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random", experts_per_token=1,
                       experts=experts_of(zoo, ["a"], prompts=False))
    assert moe(cfg, tmp_path / "out") == 0
    dense = AutoModelForCausalLM.from_pretrained(str(zoo["base"]))
    a = load_file(str(zoo["a"] / "model.safetensors"))
    dense.load_state_dict({**dense.state_dict(), **{k: v for k, v in a.items() if ".mlp." in k}})
    mixtral = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = torch.tensor([char_ids("olleh>dlrow"), char_ids("12+34=46 ab")])
    with torch.no_grad():
        want, got = dense(ids).logits, mixtral(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(str(zoo["base"]))
    with torch.no_grad():
        assert (plain(ids).logits - want).abs().max() > 1e-3  # the expert's MLP matters
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


# --- gate modes against independent computations ------------------------------------------------------------


@functools.cache
def dense_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def layer_inputs(model_dir: Path, prompt: str, tokens: slice = slice(-1, None)) -> torch.Tensor:
    """(layers, hidden): the hidden state entering each decoder layer, at the prompt's last token (or averaged over
    `tokens`), captured by forward pre-hooks on the layers (not output_hidden_states)."""
    model = dense_model(model_dir)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(
        (args[0] if args else kwargs["hidden_states"])[0, tokens].double().mean(dim=0)), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([char_ids(prompt)]))
    for h in hooks:
        h.remove()
    return torch.stack(captured)


@pytest.mark.parametrize("mode", ["hidden", pytest.param("hidden_avg", marks=pytest.mark.slow)])  # ~5 s: a merge
def test_hidden_gates_match_hooked_hidden_states(zoo, hidden_moe, tmp_path, mode):
    """Row e of layer l = normalize(mean over positive prompts of the last-token (hidden_avg: token-mean) input
    of layer l - the same over negative prompts), computed here in float64 from hooked activations."""
    if mode == "hidden":
        out = tensors(hidden_moe)
    else:
        cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode=mode, experts=experts_of(zoo))
        assert moe(cfg, tmp_path / "out") == 0
        out = tensors(tmp_path / "out")
    token = slice(None) if mode == "hidden_avg" else slice(-1, None)
    for e, name in enumerate(("a", "b")):
        pos, neg = PROMPTS[name]
        v = torch.stack([layer_inputs(zoo["base"], p, token) for p in pos]).mean(dim=0)
        if neg:
            v = v - torch.stack([layer_inputs(zoo["base"], p, token) for p in neg]).mean(dim=0)
        want = v / v.norm(dim=-1, keepdim=True)  # (layers, hidden)
        for layer in range(LAYERS):
            got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e].double()
            assert torch.allclose(got, want[layer], atol=1e-5), (name, layer, (got - want[layer]).abs().max())


def test_hidden_router_prefers_each_expert_on_its_prompts(zoo, hidden_moe):
    """Router logits (the loaded MoE's router weights applied to each expert's positive prompts' hidden states,
    averaged over the prompts) are highest for that expert, at every layer."""
    model = AutoModelForCausalLM.from_pretrained(str(hidden_moe)).eval()
    for e, name in enumerate(("a", "b")):
        h = torch.stack([layer_inputs(zoo["base"], p) for p in PROMPTS[name][0]]).mean(dim=0)
        for layer in range(LAYERS):
            logits = model.model.layers[layer].mlp.gate.weight.double() @ h[layer]
            assert int(logits.argmax()) == e, (name, layer, logits)


def test_uniform_random_gates_are_mergekits_draws(zoo, tmp_path):
    """mergekit: torch.rand((layers, experts, hidden)) * 2 * scale - scale, scale = sqrt(1 / hidden), after set_seed."""
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="uniform_random",
                       experts=experts_of(zoo, prompts=False))
    assert moe(cfg, tmp_path / "out", "--random-seed", "11") == 0
    out = tensors(tmp_path / "out")
    torch.manual_seed(11)
    scale = (1 / 32) ** 0.5
    expected = torch.rand((LAYERS, 2, 32)) * 2 * scale - scale
    for layer in range(LAYERS):
        got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert torch.equal(got, expected[layer]) and got.abs().max() <= scale


def test_lora_base_in_hidden_mode_needs_a_merge_cache(zoo, tmp_path, capsys):
    """transformers cannot run a base+adapter reference: an error naming --lora-merge-cache, nothing written;
    with the cache the merged base is written there and used."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(zoo["base"])),
                                LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    cfg = write_config(tmp_path / "moe.yml", base_model=f"{zoo['base']}+{tmp_path / 'adapter'}", gate_mode="hidden",
                       experts=experts_of(zoo))
    assert moe(cfg, tmp_path / "out") == 2
    assert "--lora-merge-cache" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert moe(cfg, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "cache")) == 0
    out = tensors(tmp_path / "out")
    base = load_file(str(zoo["base"] / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(out[q], base[q])  # the adapter's update is in the attention taken from the base
    merged = load_file(str(next((tmp_path / "cache").iterdir()) / "model.safetensors"))
    assert torch.equal(out[q], merged[q])


def test_cheap_embed_gates_are_the_prompts_embeddings(zoo, tmp_path):
    """mergekit's formula: one_hot(tokens) @ embed, summed over tokens and prompts, normalised; positive minus
    negative, normalised again; the same row in every layer."""
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="cheap_embed",
                       experts=experts_of(zoo))
    assert moe(cfg, tmp_path / "out") == 0
    out = tensors(tmp_path / "out")
    embed = load_file(str(zoo["base"] / "model.safetensors"))["model.embed_tokens.weight"].double()

    def unit_sum(prompts: list[str]) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(torch.tensor([t for p in prompts for t in char_ids(p)]),
                                             embed.shape[0]).double()
        s = (onehot @ embed).sum(dim=0)
        return s / s.norm()

    for e, name in enumerate(("a", "b")):
        pos, neg = PROMPTS[name]
        v = unit_sum(pos) - (unit_sum(neg) if neg else 0)
        want = v / v.norm()
        for layer in range(LAYERS):
            got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e].double()
            assert torch.allclose(got, want, atol=1e-6), (name, layer)


def test_noise_and_residual_scale(zoo, tmp_path):
    """noise_scale adds gaussian noise of that std to the expert's MLP (reproducible by seed), residual_scale
    multiplies its down projection only."""
    experts = experts_of(zoo, prompts=False, a={"noise_scale": 0.5}, b={"residual_scale": 0.25})
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random", experts=experts)
    for run in ("one", "two"):
        assert moe(cfg, tmp_path / run, "--random-seed", "3") == 0
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    a, b = (load_file(str(zoo[n] / "model.safetensors")) for n in ("a", "b"))
    noise = torch.cat([(one[f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight"]
                        - a[f"model.layers.{i}.mlp.{p}.weight"]).flatten()
                       for i in range(LAYERS) for w, p in PROJ.items()])
    assert noise.std().item() == pytest.approx(0.5, rel=0.05) and abs(noise.mean().item()) < 0.02
    assert all(torch.equal(one[k], two[k]) for k in one)
    for i in range(LAYERS):
        pre = f"model.layers.{i}.block_sparse_moe.experts.1"
        assert torch.equal(one[f"{pre}.w2.weight"], b[f"model.layers.{i}.mlp.down_proj.weight"] * 0.25)
        assert torch.equal(one[f"{pre}.w1.weight"], b[f"model.layers.{i}.mlp.gate_proj.weight"])


def test_dtype_field_casts_every_tensor_and_files_follow_the_flags(zoo, tmp_path):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random", dtype="bfloat16",
                       experts=experts_of(zoo, prompts=False))
    assert moe(cfg, tmp_path / "out", "--no-copy-tokenizer", "--no-write-model-card") == 0
    out = tensors(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"}.isdisjoint(names)
    assert "mergekit_moe_config.yml" in names
    a = load_file(str(zoo["a"] / "model.safetensors"))
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
                       a["model.layers.0.mlp.gate_proj.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("dtype") == "bfloat16"


# --- bad input: one error line, nothing written ----------------------------------------------------------------


def bad_cases(zoo) -> dict[str, tuple[dict, list[str], str]]:
    base = str(zoo["base"])
    two = experts_of(zoo)
    return {
        "unknown gate_mode": ({"base_model": base, "gate_mode": "hiden", "experts": two}, [], "did you mean 'hidden'"),
        "no experts": ({"base_model": base, "gate_mode": "random", "experts": []}, [], "experts: empty"),
        "experts_per_token too large": ({"base_model": base, "experts_per_token": 3, "experts": two}, [],
                                        "experts_per_token: 3 but only 2"),
        "missing prompts": ({"base_model": base, "gate_mode": "cheap_embed",
                             "experts": [two[0], {"source_model": str(zoo["b"])}]}, [], "experts[1].positive_prompts"),
        "unknown field": ({"base_model": base, "experts": [{**two[0], "postive_prompts": ["x"]}, two[1]]}, [],
                          "experts[0].postive_prompts: unknown field"),
        "same prompts": ({"base_model": base, "experts": [two[0], {**two[0], "source_model": str(zoo["b"])}]}, [],
                         "identical for every expert"),
        "all same model": ({"base_model": base, "gate_mode": "random",
                            "experts": experts_of(zoo, ["a", "a"], prompts=False)}, [], ALL_SAME_FLAG),
        "other architecture": ({"base_model": base, "gate_mode": "random",
                                "experts": [{"source_model": str(zoo["gpt2"])}, two[1]]}, [],
                               "experts[0].source_model: a 'gpt2' model"),
        "other layer count": ({"base_model": base, "gate_mode": "random", "experts": [
            {"source_model": str(zoo["mistral"])}, two[1]]}, ["--allow-crimes"], "experts[0].source_model"),
        "mixed types": ({"base_model": base, "gate_mode": "random",
                         "experts": [{"source_model": str(zoo["mistral"])}, two[1]]}, [], "different model_type"),
        "shared experts on mixtral": ({"base_model": base, "gate_mode": "random", "experts": two,
                                       "architecture": "mixtral", "shared_experts": [two[0]]}, [], "shared_experts"),
        "mergekit would build deepseek": ({"base_model": base, "gate_mode": "random", "experts": two,
                                           "shared_experts": [{"source_model": base}]}, [], "trust_remote_code"),
        "deepseek refused": ({"base_model": base, "gate_mode": "random", "experts": two, "architecture": "deepseek"},
                             [], "architecture: 'deepseek': mergekit 0.1.5 builds a DeepSeek-MoE model"),
        "unknown architecture": ({"base_model": base, "gate_mode": "random", "experts": two, "architecture": "gemma"},
                                 [], "architecture: 'gemma' matches no output architecture"),
        "qwen3 output from llama": ({"base_model": base, "gate_mode": "random", "experts": two,
                                     "architecture": "qwen3"}, [], "base_model: a 'llama' model; the Qwen3 MoE"),
        "shared experts on qwen3": ({"base_model": base, "gate_mode": "random", "experts": two, "architecture": "qwen3",
                                     "shared_experts": [{"source_model": base}]}, [], "Qwen3-MoE output has no shared"),
        "bad dtype": ({"base_model": base, "gate_mode": "random", "experts": two, "dtype": "float12"}, [],
                      "dtype"),
        "missing base": ({"base_model": base + "-missing", "gate_mode": "random", "experts": two}, [],
                         "base-missing"),
        "4bit": ({"base_model": base, "experts": two}, ["--load-in-4bit"], "--load-in-4bit is not supported"),
        "no such device": ({"base_model": base, "experts": two}, ["--device", "cuda:99"], "--device cuda:99"),
    }


ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


def test_bad_input_is_one_error_line_and_writes_nothing(zoo, tmp_path, capsys):
    for case, (fields, args, expected) in bad_cases(zoo).items():
        cfg = write_config(tmp_path / "moe.yml", **fields)
        out = tmp_path / "out"
        code = moe(cfg, out, *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(err) == 1 and err[0].startswith("mergekit-moe: error: "), (case, err)
        assert expected in err[0], (case, err[0])
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"], case


def test_all_same_experts_pass_with_the_flag(zoo, tmp_path):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random",
                       experts=experts_of(zoo, ["a", "a"], prompts=False))
    assert moe(cfg, tmp_path / "out", ALL_SAME_FLAG) == 0
    out = tensors(tmp_path / "out")
    assert torch.equal(out["model.layers.2.block_sparse_moe.experts.0.w3.weight"],
                       out["model.layers.2.block_sparse_moe.experts.1.w3.weight"])


def test_existing_user_directory_is_kept(zoo, tmp_path, capsys):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random",
                       experts=experts_of(zoo, prompts=False))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert moe(cfg, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # with the flag it is written into, as mergekit does, and the user's file stays
    assert moe(cfg, out, "--write-into-existing") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    # a previous evomerge output is replaced
    fresh = tmp_path / "fresh"
    assert moe(cfg, fresh) == 0
    assert moe(cfg, fresh, "--random-seed", "1") == 0
    assert not list(tmp_path.glob(".*partial*"))


def test_corrupt_expert_writes_nothing(zoo, tmp_path, capsys):
    """An expert whose weight file is cut short: an error naming it, and no output or partial directory."""
    broken = tmp_path / "broken"
    shutil.copytree(zoo["b"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 4096])
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="random",
                       experts=[{"source_model": str(zoo["a"])}, {"source_model": str(broken)}])
    code = moe(cfg, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and "broken" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_print_plan_writes_nothing(zoo, tmp_path, capsys):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="hidden",
                       experts=experts_of(zoo))
    assert main([str(cfg), str(tmp_path / "out"), "--print-plan"]) == 0
    text = capsys.readouterr().out
    assert "Mixtral, 2 expert(s), 4 layers" in text
    assert "model.layers.3.block_sparse_moe.experts.1.w2.weight" in text and "down_proj" in text
    assert not (tmp_path / "out").exists()


def test_every_option_has_help():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings or action.dest
    text = parser.format_help()
    for flag in ("--i-understand-this-is-not-useful-without-training", "--load-in-4bit", "--load-in-8bit",
                 "--device", "--copy-tokenizer", "--no-copy-tokenizer", "--trust-remote-code", "--allow-crimes",
                 "--lazy-unpickle", "--random-seed", "--out-shard-size"):
        assert flag in text, flag


# --- mergekit 0.1.5 -------------------------------------------------------------------------------------------


def mergekit_moe(config: Path, out: Path, *args: str) -> None:
    exe = MERGEKIT_VENV / "bin" / "mergekit-moe"
    subprocess.run([str(exe), str(config), str(out), *args], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow  # a subprocess importing mergekit: ~10 s each
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-moe").exists(), reason="mergekit 0.1.5 venv not present")
@pytest.mark.parametrize("gate_mode", ["random", "cheap_embed", "hidden", "qwen"])
def test_same_model_as_mergekit(zoo, tmp_path, gate_mode):
    """mergekit 0.1.5 writes transformers 5's fused expert tensors; loaded in transformers, both outputs hold the
    same parameters and config.json is the same: random gates bit for bit with the same seed, cheap_embed to float
    rounding, hidden to bfloat16 rounding (mergekit runs the base in bfloat16, evomerge in its float32). qwen:
    Qwen2-MoE from Llama with random gates (the shared expert is the base: mergekit 0.1.5 opens no loader for a
    shared expert that is not the base or a routed expert, and fails)."""
    fields: dict = {}
    if gate_mode == "qwen":
        gate_mode, fields = "random", {"architecture": "qwen", "shared_experts": [{"source_model": str(zoo["base"])}]}
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode=gate_mode,
                       experts=experts_of(zoo, prompts=gate_mode != "random"), **fields)
    assert_same_as_mergekit(cfg, tmp_path, gate_mode)


def assert_same_as_mergekit(cfg: Path, tmp_path: Path, gate_mode: str) -> None:
    """Both tools on the same config and seed: the same config.json and, loaded in transformers, the same
    parameters (router rows to float rounding for cheap_embed, cosine > 0.99 for hidden)."""
    assert moe(cfg, tmp_path / "ours", "--random-seed", "5") == 0
    mergekit_moe(cfg, tmp_path / "theirs", "--random-seed", "5")
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == \
        json.loads((tmp_path / "theirs" / "config.json").read_text())
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "theirs")).state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        if gate_mode == "cheap_embed" and k.endswith("mlp.gate.weight"):
            assert torch.allclose(ours[k], theirs[k], atol=1e-6), k
        elif gate_mode == "hidden" and k.endswith("mlp.gate.weight"):
            cos = torch.nn.functional.cosine_similarity(ours[k], theirs[k], dim=-1)
            assert (cos > 0.99).all(), (k, cos)
        else:
            assert torch.equal(ours[k], theirs[k]), k


# --- Qwen2-MoE ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_zoo(zoo, tmp_path_factory) -> dict[str, Path]:
    from factory import make_model

    root = tmp_path_factory.mktemp("qwen_experts")
    return {"base": zoo["qwen2"], "x": zoo["qwen2_ft"], "y": make_model(root / "y", base=zoo["qwen2"], seed=9),
            "shared": make_model(root / "shared", base=zoo["qwen2"], seed=10)}


def test_qwen2_moe_from_qwen2_experts(qwen_zoo, tmp_path):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(qwen_zoo["base"]), gate_mode="random",
                       architecture="qwen", experts_per_token=1,
                       experts=[{"source_model": str(qwen_zoo["x"])}, {"source_model": str(qwen_zoo["y"])}],
                       shared_experts=[{"source_model": str(qwen_zoo["shared"])}])
    assert moe(cfg, tmp_path / "out", "--random-seed", "2") == 0
    out = tensors(tmp_path / "out")
    src = {k: load_file(str(p / "model.safetensors")) for k, p in qwen_zoo.items()}
    torch.manual_seed(2)
    gates = torch.randn((2, 3, 32))  # mergekit: routed and shared rows drawn together
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp"
        for p in ("gate_proj", "up_proj", "down_proj"):
            for e, name in enumerate(("x", "y")):
                assert torch.equal(out[f"{pre}.experts.{e}.{p}.weight"], src[name][f"{pre}.{p}.weight"])
            assert torch.equal(out[f"{pre}.shared_expert.{p}.weight"], src["shared"][f"{pre}.{p}.weight"])
        assert torch.equal(out[f"{pre}.gate.weight"], gates[layer, :2])
        assert torch.equal(out[f"{pre}.shared_expert_gate.weight"], gates[layer, 2:])
    for name, t in src["base"].items():
        if ".mlp." not in name:
            assert torch.equal(out[name], t), name
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["architectures"] == ["Qwen2MoeForCausalLM"] and cfg_out["model_type"] == "qwen2_moe"
    assert cfg_out["num_experts"] == 2 and cfg_out["num_experts_per_tok"] == 1
    assert cfg_out["shared_expert_intermediate_size"] == cfg_out["moe_intermediate_size"] == 64
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor([char_ids("12+3=")])
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_qwen2_moe_from_llama_gets_zero_attention_biases(zoo, tmp_path):
    cfg = write_config(tmp_path / "moe.yml", base_model=str(zoo["base"]), gate_mode="cheap_embed",
                       experts=experts_of(zoo), shared_experts=[{"source_model": str(zoo["a"]),
                                                                 "positive_prompts": ["hello"]}])
    assert moe(cfg, tmp_path / "out") == 0
    out = tensors(tmp_path / "out")
    assert out["model.layers.0.self_attn.q_proj.bias"].shape == (32,)
    assert out["model.layers.0.self_attn.k_proj.bias"].shape == (16,)  # 2 key/value heads of 8
    assert all(not out[f"model.layers.{i}.self_attn.{p}_proj.bias"].any() for i in range(LAYERS) for p in "qkv")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert torch.isfinite(model(torch.tensor([char_ids("abc")])).logits).all()


# --- Qwen3-MoE ------------------------------------------------------------------------------------------------

QWEN3_LAYERS = 2


@pytest.fixture(scope="module")
def qwen3_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 base (q_norm / k_norm, head_dim 8) and two perturbed copies of it."""
    from factory import make_model

    root = tmp_path_factory.mktemp("qwen3_experts")
    base = make_model(root / "base", "qwen3", seed=20, layers=QWEN3_LAYERS)
    return {"base": base, "a": make_model(root / "a", base=base, seed=21),
            "b": make_model(root / "b", base=base, seed=22)}


@pytest.fixture(scope="module")
def qwen3_moe(qwen3_zoo, tmp_path_factory) -> Path:
    """hidden gates, no `architecture`: Qwen3 inputs without shared experts get Qwen3-MoE (mergekit's rule)."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    cfg = write_config(root / "moe.yml", base_model=str(qwen3_zoo["base"]), gate_mode="hidden", experts_per_token=1,
                       experts=experts_of(qwen3_zoo))
    assert moe(cfg, root / "out") == 0
    return root / "out"


def test_qwen3_moe_tensors_are_the_experts_and_the_base(qwen3_zoo, qwen3_moe):
    out = tensors(qwen3_moe)
    base = load_file(str(qwen3_zoo["base"] / "model.safetensors"))
    src = [load_file(str(qwen3_zoo[n] / "model.safetensors")) for n in ("a", "b")]
    seen = set()
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], t), name
            seen.add(name)
    assert "model.layers.1.self_attn.q_norm.weight" in seen and "model.layers.1.self_attn.k_norm.weight" in seen
    for layer in range(QWEN3_LAYERS):
        pre = f"model.layers.{layer}.mlp"
        for e in range(2):
            for p in ("gate_proj", "up_proj", "down_proj"):
                mlp = src[e][f"{pre}.{p}.weight"]
                assert torch.equal(out[f"{pre}.experts.{e}.{p}.weight"], mlp)
                assert not torch.equal(mlp, base[f"{pre}.{p}.weight"])  # really the expert's
                seen.add(f"{pre}.experts.{e}.{p}.weight")
        assert out[f"{pre}.gate.weight"].shape == (2, 32)
        seen.add(f"{pre}.gate.weight")
    assert set(out) == seen  # nothing else: no shared expert


def test_qwen3_moe_config_loads_and_generates(qwen3_zoo, qwen3_moe):
    cfg = json.loads((qwen3_moe / "config.json").read_text())
    base_cfg = json.loads((qwen3_zoo["base"] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert cfg["num_experts_per_tok"] == 1 and cfg["decoder_sparse_step"] == 1 and cfg["norm_topk_prob"] is True
    assert cfg["moe_intermediate_size"] == base_cfg["intermediate_size"] == 64
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rms_norm_eps"):
        assert cfg[key] == base_cfg[key], key
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_moe))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.num_experts == 2 and model.config.mlp_only_layers == []
    src = [load_file(str(qwen3_zoo[n] / "model.safetensors")) for n in ("a", "b")]
    experts = model.model.layers[1].mlp.experts  # transformers fuses gate_proj and up_proj on load
    for e in range(2):
        assert torch.equal(experts.gate_up_proj[e][:64], src[e]["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[e][64:], src[e]["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], src[e]["model.layers.1.mlp.down_proj.weight"])
    ids = torch.tensor([char_ids("12+3=")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6) and torch.isfinite(model(ids).logits).all()


def test_qwen3_hidden_router_sends_each_experts_prompts_to_it(qwen3_zoo, qwen3_moe):
    """Run the loaded Qwen3-MoE on each expert's positive prompts: at the last token, the router of every layer
    picks that expert (its top-1 index, captured from the router's own output), and the router rows applied to
    the base's hidden states entering each layer rank that expert first."""
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_moe)).eval()
    picked: list[int] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _args, out: picked.append(int(out[2][-1, 0])))
             for layer in model.model.layers]
    try:
        for e, name in enumerate(("a", "b")):
            for prompt in PROMPTS[name][0]:
                picked.clear()
                with torch.no_grad():
                    model(torch.tensor([char_ids(prompt)]))
                assert picked == [e] * QWEN3_LAYERS, (name, prompt, picked)
                h = layer_inputs(qwen3_zoo["base"], prompt)
                for layer in range(QWEN3_LAYERS):
                    logits = model.model.layers[layer].mlp.gate.weight.double() @ h[layer]
                    assert int(logits.argmax()) == e, (name, prompt, layer, logits)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("architecture", [None, "qwen", "qwen3", "Qwen3"])
def test_qwen3_inputs_select_qwen3_moe(qwen3_zoo, tmp_path, capsys, architecture):
    """mergekit's rule: `architecture` is a prefix of the output's name ("qwen" matches Qwen MoE and Qwen3 MoE;
    Qwen MoE needs a shared expert, so Qwen3 MoE is left), and without it the one that takes Qwen3 models."""
    fields = {"architecture": architecture} if architecture else {}
    cfg = write_config(tmp_path / "moe.yml", base_model=str(qwen3_zoo["base"]), gate_mode="random",
                       experts=experts_of(qwen3_zoo, prompts=False), **fields)
    assert main([str(cfg), str(tmp_path / "out"), "--print-plan"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# mergekit-moe plan: Qwen3 MoE, 2 expert(s), 2 layers")
    assert "model.layers.1.mlp.experts.1.down_proj.weight" in text and "shared_expert" not in text


def test_qwen3_moe_refuses_other_inputs(qwen3_zoo, zoo, tmp_path, capsys):
    """Qwen3 base with a Llama expert, and Qwen3 models for the Qwen2-MoE output: one error line naming the model."""
    cases = [({"experts": [{"source_model": str(qwen3_zoo["a"])}, {"source_model": str(zoo["a"])}]},
              "experts[1].source_model: a 'llama' model; the Qwen3 MoE output is built from qwen3 models"),
             ({"architecture": "qwen", "experts": experts_of(qwen3_zoo, prompts=False),
               "shared_experts": [{"source_model": str(qwen3_zoo["base"])}]},
              "base_model: a 'qwen3' model; the Qwen MoE output is built from llama / mistral / qwen2 models")]
    for fields, expected in cases:
        cfg = write_config(tmp_path / "moe.yml", base_model=str(qwen3_zoo["base"]), gate_mode="random", **fields)
        assert moe(cfg, tmp_path / "out") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess importing mergekit: ~10 s each
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-moe").exists(), reason="mergekit 0.1.5 venv not present")
@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_qwen3_same_model_as_mergekit(qwen3_zoo, tmp_path, gate_mode):
    """mergekit 0.1.5's Qwen3-MoE output (fused gate_up_proj / down_proj tensors) and ours, loaded in
    transformers: the same parameters and config.json; with random gates also noise_scale and residual_scale
    bit for bit (the same seed, the same draw order: layer by layer, expert by expert, gate, up, down)."""
    scales = {"a": {"noise_scale": 0.1}, "b": {"residual_scale": 0.5}} if gate_mode == "random" else {}
    cfg = write_config(tmp_path / "moe.yml", base_model=str(qwen3_zoo["base"]), gate_mode=gate_mode,
                       experts=experts_of(qwen3_zoo, prompts=gate_mode != "random", **scales))
    assert_same_as_mergekit(cfg, tmp_path, gate_mode)


def test_every_option_and_gate_mode_is_documented():
    from merge_engine.moe.config import GATE_MODES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## mergekit-moe", 1)[1].split("\n## ", 1)[0]
    for action in build_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}" in section, opt
    for mode in GATE_MODES:
        assert f"`{mode}`" in section, mode
