"""Hub ids through a real huggingface_hub cache layout (offline) and base+LoRA references against peft."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factory import make_model
from safetensors.torch import load_file

from merge_engine.cli import main as merge_main
from merge_engine.io.hub import download_command
from merge_engine.io.references import open_model

REPO = Path(__file__).resolve().parents[1]


def add_snapshot(cache: Path, repo_id: str, model_dir: Path, sha: str, refs: tuple[str, ...] = ()) -> None:
    """Lay model_dir out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<name>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    a = make_model(root / "a", seed=11, layers=2)
    b = make_model(root / "b", base=a, seed=12, noise=0.05)
    cache = root / "cache"
    sha_a, sha_b = "1" * 40, "2" * 40
    add_snapshot(cache, "org/tiny", a, sha_a, refs=("main",))
    add_snapshot(cache, "org/tiny", b, sha_b, refs=("v1",))
    return {"root": root, "cache": cache, "a": a, "b": b, "sha_a": sha_a, "sha_b": sha_b}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def merge_one(tmp: Path, model: object, *flags: str) -> tuple[int, Path]:
    """mergekit-yaml on `linear` of one model at weight 1: the output is that model's tensors."""
    recipe = tmp / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": model,
                                                                           "parameters": {"weight": 1.0}}]}))
    out = tmp / "out"
    return merge_main([str(recipe), str(out), "--no-progress", "--no-copy-tokenizer", *flags]), out


def assert_same(out_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = weights(out_dir)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("rev,expect", [("", "a"), ("@v1", "b"), ("@" + "1" * 40, "a"), ("@" + "2" * 40, "b")])
def test_hub_id_resolves_from_offline_cache_by_ref_and_commit(hub, tmp_path, rev, expect):
    rc, out = merge_one(tmp_path, f"org/tiny{rev}", "--transformers-cache", str(hub["cache"]))
    assert rc == 0
    assert_same(out, weights(hub[expect]))
    assert not torch.equal(weights(hub["a"])["model.norm.weight"], weights(hub["b"])["model.norm.weight"])


def test_hub_id_structured_reference_with_revision(hub, tmp_path):
    rc, out = merge_one(tmp_path, {"model": {"path": "org/tiny", "revision": "v1"}},
                        "--transformers-cache", str(hub["cache"]))
    assert rc == 0
    assert_same(out, weights(hub["b"]))


@pytest.mark.slow
def test_hub_id_honours_hf_home(hub, tmp_path):
    home = tmp_path / "hf_home"
    shutil.copytree(hub["cache"], home / "hub", symlinks=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/tiny@v1\n    parameters: {weight: 1.0}\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(recipe), str(tmp_path / "out"),
                           "--no-progress"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same(tmp_path / "out", weights(hub["b"]))


def test_hub_id_missing_offline_names_a_real_command(hub, tmp_path):
    rc, out = merge_one(tmp_path, "org/tiny@v9", "--transformers-cache", str(hub["cache"]))
    assert rc == 2
    assert not out.exists()
    with pytest.raises(Exception) as e:
        open_model("org/tiny@v9", cache_dir=str(hub["cache"]))
    msg = str(e.value)
    cmd = download_command("org/tiny", "v9", str(hub["cache"]))
    assert f"`{cmd}`" in msg and "HF_HUB_OFFLINE" in msg
    exe = shutil.which(cmd.split()[0])
    assert exe is not None, f"{cmd.split()[0]} is not installed"
    help_text = subprocess.run([exe, *cmd.split()[1:2], "--help"], capture_output=True, text=True).stdout
    assert "--revision" in help_text and "--cache-dir" in help_text


def test_local_typo_is_not_sent_to_the_hub(tmp_path):
    rc, out = merge_one(tmp_path, "./no/such/model")
    assert rc == 2 and not out.exists()


# ---- LoRA ---------------------------------------------------------------------------------------------------

LORA_CASES = {
    # embedding LoRA (saved with the embedding), rsLoRA, a per-module alpha, a modules_to_save head
    "llama": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True, alpha_pattern={"v_proj": 3},
                  modules_to_save=["lm_head"]),
    "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True),  # Conv1D: transposed update
}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for arch, kwargs in LORA_CASES.items():
        base = make_model(root / f"base_{arch}", arch, seed=21, layers=2)
        torch.manual_seed(22)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                    peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **kwargs))
        if "modules_to_save" in kwargs:
            with torch.no_grad():
                model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
        adapter = root / f"adapter_{arch}"
        model.save_pretrained(str(adapter))
        out[arch] = (base, adapter)
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


@pytest.mark.parametrize("arch", sorted(LORA_CASES))
def test_lora_streamed_equals_peft_merge_and_unload(lora, arch):
    base, adapter = lora[arch]
    expected = peft_merged(base, adapter)
    source = open_model(f"{base}+{adapter}")
    plain = open_model(str(base))
    changed = 0
    for name in source.tensor_names():
        got = source.get(name)
        assert torch.equal(got, expected[name]), name
        changed += not torch.equal(got, plain.get(name))
    assert changed >= 2  # the targeted modules of both layers moved


@pytest.mark.parametrize("form", ["string", "structured"])
def test_lora_reference_in_a_recipe(lora, tmp_path, form):
    base, adapter = lora["llama"]
    model = f"{base}+{adapter}" if form == "string" else {"model": {"path": str(base)}, "lora": {"path": str(adapter)}}
    rc, out = merge_one(tmp_path, model)
    assert rc == 0
    assert_same(out, peft_merged(base, adapter))
    assert {p.name for p in out.iterdir()}.isdisjoint({"adapter_config.json", "adapter_model.safetensors"})


def test_lora_merge_dtype_reads_the_base_as_asked(lora, tmp_path):
    base, adapter = lora["llama"]
    rc, out = merge_one(tmp_path, f"{base}+{adapter}", "--lora-merge-dtype", "bfloat16")
    assert rc == 0
    got = weights(out)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert_same(out, peft_merged(base, adapter, torch.bfloat16))


def test_lora_of_another_model_is_refused(lora, tmp_path):
    base, _ = lora["llama"]
    _, gpt2_adapter = lora["gpt2"]
    rc, out = merge_one(tmp_path, f"{base}+{gpt2_adapter}")
    assert rc == 2 and not out.exists()


def test_lora_merge_cache_writes_the_merged_model_once(lora, tmp_path):
    base, adapter = lora["llama"]
    cache = tmp_path / "lora_cache"
    rc, out = merge_one(tmp_path, f"{base}+{adapter}", "--lora-merge-cache", str(cache))
    assert rc == 0
    expected = peft_merged(base, adapter)
    assert_same(out, expected)
    (entry,) = cache.iterdir()
    assert entry.name.startswith(f"{base.name}_") and f"_{adapter.name}_" in entry.name
    assert_same(entry, expected)
    assert (entry / "config.json").exists() and (entry / "tokenizer.json").exists()
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out)
    rc, out = merge_one(tmp_path, f"{base}+{adapter}", "--lora-merge-cache", str(cache))
    assert rc == 0 and (entry / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert_same(out, expected)
