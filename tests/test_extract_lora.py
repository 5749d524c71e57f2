"""mergekit-extract-lora: the adapter loads with peft onto the base and reproduces the fine-tune at full rank,
degrades with the rank as the reported kept energy says, has peft's tensor names and shapes, matches mergekit
0.1.5's adapter, and bad input writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from factory import MERGEKIT_VENV, make_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evolve.demo.tokenizer import VOCAB_SIZE
from merge_engine.extract_lora import main
from merge_engine.lowrank import decompose

IDS = torch.randint(0, VOCAB_SIZE, (8, 32), generator=torch.Generator().manual_seed(0))
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def extract(model: Path, base: Path, out: Path, *args: str) -> int:
    return main(["--model", str(model), "--base-model", str(base), "--out-path", str(out), "--quiet", *args])


def peft_model() -> type:
    """peft's PeftModel, imported by the tests that load an adapter rather than when the file is collected
    (about 1 s, which every pytest-xdist worker would pay)."""
    from peft import PeftModel

    return PeftModel


def logits(model: Path, adapter: Path | None = None) -> torch.Tensor:
    m = AutoModelForCausalLM.from_pretrained(str(model))
    if adapter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on tied weights and bias-less layers
            m = peft_model().from_pretrained(m, str(adapter))
    m.eval()
    with torch.no_grad():
        return m(IDS).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rms_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


def report(out: Path) -> dict:
    return json.loads((out / "extraction_report.json").read_text())


@pytest.fixture(scope="module")
def ft_logits(zoo):
    return logits(zoo["a"])


def test_full_rank_reproduces_the_finetune(zoo, tmp_path, ft_logits):
    out = tmp_path / "lora"
    assert extract(zoo["a"], zoo["base"], out, "--max-rank", "64") == 0
    r = report(out)
    assert r["kept_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert all(m["rank"] == min(m["shape"]) for m in r["modules"] if m["kind"] == "lora")
    base_gap = max_diff(logits(zoo["base"]), ft_logits)
    gap = max_diff(logits(zoo["base"], out), ft_logits)
    assert base_gap > 0.1 and gap < 1e-4, (base_gap, gap)


@pytest.mark.slow  # six extractions and peft loads: ~15 s
def test_lower_rank_degrades_as_the_kept_energy_says(zoo, tmp_path, ft_logits):
    """Per module, ||D - B A||^2 / ||D||^2 read back from the adapter is 1 - the reported kept fraction
    (Eckart-Young); the total kept energy rises and the RMS logit gap to the fine-tune falls with the rank (the
    largest single logit error is too noisy to be monotone: 0.50 at rank 1, 0.54 at rank 2 on the zoo)."""
    base_t, ft_t = load_file(str(zoo["base"] / "model.safetensors")), load_file(str(zoo["a"] / "model.safetensors"))
    gaps, kept = [], []
    for rank in (1, 4, 8, 16, 32):
        out = tmp_path / f"r{rank}"
        assert extract(zoo["a"], zoo["base"], out, "--max-rank", str(rank)) == 0
        r, adapter = report(out), load_file(str(out / "adapter_model.safetensors"))
        for m in r["modules"]:
            if m["kind"] != "lora":
                continue
            name, key = m["module"], f"base_model.model.{m['module']}"
            delta = ft_t[f"{name}.weight"] - base_t[f"{name}.weight"]
            residual = delta - adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]
            lost = residual.square().sum().item() / delta.square().sum().item()
            assert m["rank"] == min(rank, *m["shape"])
            assert lost == pytest.approx(1 - m["kept_fraction"], abs=1e-5), (rank, name)
        kept.append(r["kept_fraction"])
        gaps.append(rms_diff(logits(zoo["base"], out), ft_logits))
    assert kept == sorted(kept) and kept[0] < 0.5 and kept[-1] == pytest.approx(1.0, abs=1e-6), kept
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4 < gaps[0], gaps


def test_adapter_layout_is_what_peft_expects(zoo, tmp_path):
    out = tmp_path / "lora"
    assert extract(zoo["a"], zoo["base"], out, "--max-rank", "8") == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                               "extraction_report.json", ".evomerge-manifest.json"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {}
    assert sorted(cfg["target_modules"]) == sorted(LINEARS)
    assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    ft = load_file(str(zoo["a"] / "model.safetensors"))
    expected = set()
    for name, w in ft.items():
        module, last = name.removesuffix(".weight"), name.split(".")[-2]
        if last in LINEARS:
            a, b = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
            assert tensors[a].shape == (8, w.shape[1]) and tensors[b].shape == (w.shape[0], 8), name
            expected |= {a, b}
        else:  # embeddings, norms, head: the fine-tune's own tensor, as peft's modules_to_save stores it
            assert torch.equal(tensors[f"base_model.model.{name}"], ft[name]), name
            expected.add(f"base_model.model.{name}")
    assert set(tensors) == expected
    base = AutoModelForCausalLM.from_pretrained(str(zoo["base"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model().from_pretrained(base, str(out))
    assert not [w for w in caught if "missing adapter keys" in str(w.message) or "unexpected" in str(w.message)]


def test_embeddings_tied_heads_and_biases(zoo, tmp_path):
    """--embed-lora (lora_embedding_A/B, no .weight suffix), a tied model, and qwen2's q/k/v biases (lora_B.bias
    with lora_bias) all reproduce the fine-tune at full rank."""
    out = tmp_path / "embed"
    assert extract(zoo["a"], zoo["base"], out, "--max-rank", "64", "--embed-lora") == 0
    t = load_file(str(out / "adapter_model.safetensors"))
    assert t["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (32, VOCAB_SIZE)
    assert t["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 32)
    assert t["base_model.model.lm_head.lora_A.weight"].shape == (32, 32)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"]) and "lm_head" not in cfg["modules_to_save"]
    assert max_diff(logits(zoo["base"], out), logits(zoo["a"])) < 1e-4
    for model, base in (("tied_ft", "tied"), ("qwen2_ft", "qwen2")):
        out = tmp_path / model
        assert extract(zoo[model], zoo[base], out, "--max-rank", "64") == 0
        assert max_diff(logits(zoo[base], out), logits(zoo[model])) < 1e-4, model
    cfg = json.loads((out / "adapter_config.json").read_text())
    t = load_file(str(out / "adapter_model.safetensors"))
    assert cfg["lora_bias"] is True and "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in t


def test_module_selection_options(zoo, tmp_path):
    def run(*args: str) -> tuple[dict, dict, dict]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert extract(zoo["a"], zoo["base"], out, *args) == 0
        return (load_file(str(out / "adapter_model.safetensors")),
                json.loads((out / "adapter_config.json").read_text()), report(out))

    t, cfg, _ = run("--max-rank", "4", "--skip-undecomposable")
    assert not any("norm" in k for k in t) and cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    t, cfg, _ = run("--max-rank", "4", "-e", r"mlp\.", "--exclude-regex", "layers\\.1\\.")
    lora = [k for k in t if "lora" in k]  # (norms stay in modules_to_save by their last name, as in mergekit)
    assert not any("mlp" in k or "layers.1." in k for k in lora) and "q_proj" in cfg["target_modules"]
    t, cfg, _ = run("--max-rank", "4", "-i", "self_attn", "--save-module", "model.layers.0.self_attn.q_proj")
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight" in t
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not any("mlp" in k for k in t)
    t, cfg, r = run("--max-rank", "64", "--sv-epsilon", "0.15")
    ranks = {m["module"]: m["rank"] for m in r["modules"] if m["kind"] == "lora"}
    assert len(set(ranks.values())) > 1 and cfg["r"] == max(ranks.values())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {k: v for k, v in ranks.items() if v != cfg["r"]}
    t, _, _ = run("--max-rank", "4", "--no-distribute-scale")
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-5)  # B = U_r, the singular values all in A


def test_decompose_degenerate_deltas():
    zero = decompose(torch.zeros(5, 3), max_rank=8)
    assert zero.rank == 3 and zero.energy == 0 and not zero.a.any() and not zero.b.any()
    assert decompose(torch.zeros(5, 3), max_rank=8, sv_epsilon=1e-6).rank == 0
    one = decompose(torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5])), max_rank=2)
    assert one.kept == pytest.approx(one.energy) and torch.allclose(one.b @ one.a, torch.outer(
        torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5])), atol=1e-5)


def test_bad_input_exits_2_and_writes_nothing(zoo, tmp_path, capsys):
    small = make_model(tmp_path / "small", "llama", seed=0, layers=4, hidden=16)
    out = tmp_path / "out"
    cases = [
        (zoo["a"], tmp_path / "missing", ["--max-rank", "4"], "no such"),
        (zoo["a"], zoo["base"], ["--max-rank", "0"], "--max-rank 0"),
        (zoo["a"], zoo["base"], ["--sv-epsilon", "-1"], "--sv-epsilon"),
        (zoo["a"], zoo["base"], ["-e", "("], "regular expression"),
        (zoo["a"], small, ["--max-rank", "4"], "does not fit the base"),
        (zoo["mistral_ft"], zoo["base"], ["--max-rank", "4"], "allow-crimes"),
    ]
    for model, base, args, words in cases:
        capsys.readouterr()
        assert extract(model, base, out, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mergekit-extract-lora: error:") and words in err[0], err
        assert not out.exists() and not list(tmp_path.glob(".out*")), args
    nan = tmp_path / "nan"  # fails mid-extraction, after the output directory was begun: rolled back
    shutil.copytree(zoo["a"], nan)
    t = load_file(str(nan / "model.safetensors"))
    t["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(t, str(nan / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert extract(nan, zoo["base"], out, "--max-rank", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.3.mlp.down_proj" in err[0] and "NaN" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert extract(zoo["a"], zoo["base"], foreign, "--max-rank", "4") == 2
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-extract-lora").exists(),
                    reason=f"mergekit 0.1.5 venv not available at {MERGEKIT_VENV} (set EVOMERGE_MERGEKIT_VENV)")
@pytest.mark.parametrize("args", [["--max-rank", "8"], ["--max-rank", "64", "--embed-lora", "--no-distribute-scale"],
                                  ["--max-rank", "16", "--sv-epsilon", "0.1", "--skip-undecomposable", "-e", "k_proj"]])
def test_same_adapter_as_mergekit(zoo, tmp_path, args):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert extract(zoo["a"], zoo["base"], ours, *args) == 0
    cmd = [str(MERGEKIT_VENV / "bin" / "mergekit-extract-lora"), "--model", str(zoo["a"]), "--base-model",
           str(zoo["base"]), "--out-path", str(theirs), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ours, theirs))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if ("lora_B" in k or "lora_embedding_B" in k) and not k.endswith(".bias"):
            continue  # compared through B @ A with its A
        if "lora_A" in k or "lora_embedding_A" in k:
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            assert torch.allclose(a[kb] @ a[k], b[kb] @ b[k], atol=1e-5, rtol=1e-4), k  # SVD signs may differ
        else:
            assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, theirs))
    for c in (ca, cb):
        c["target_modules"] = sorted(c["target_modules"])
    assert ca == cb
