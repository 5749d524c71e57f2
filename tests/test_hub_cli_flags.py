"""Every mergekit-yaml flag of mergekit 0.1.5 is accepted; the ones with a meaning here act."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_engine.cli import NO_EFFECT, build_parser
from merge_engine.cli import main as merge_main


@pytest.fixture(scope="module")
def recipe(zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flags") / "recipe.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(zoo["b"]), "parameters": {"weight": 0.4, "density": 0.5}}]}))
    return path


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def run(recipe: Path, out: Path, *flags: str) -> int:
    return merge_main([str(recipe), str(out), "--random-seed", "1", "--no-progress", *flags])


def same(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


NO_OP_FLAGS = [[f"--{n.replace('_', '-')}"] for n in NO_EFFECT] + [
    [f"--no-{n.replace('_', '-')}"] for n in NO_EFFECT] + [
    ["--write-threads", "4"], ["--lazy-unpickle"], ["--no-lazy-unpickle"], ["--no-cuda"], ["--device", "cpu"],
    ["--lora-merge-cache", "unused-dir"], ["--safe-serialization"], ["--no-allow-crimes"],
    ["--no-trust-remote-code"], ["--no-unsafe-truncate-embeddings"], ["-v"], ["-vv"]]


@pytest.fixture(scope="module")
def plain(recipe) -> Path:
    out = recipe.parent / "plain"
    assert run(recipe, out) == 0
    return out


@pytest.mark.parametrize("flags", NO_OP_FLAGS, ids=lambda f: " ".join(f))
def test_compat_flag_is_accepted_and_changes_nothing(recipe, plain, tmp_path, flags, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(recipe, tmp_path / "flagged", *flags) == 0
    assert same(plain, tmp_path / "flagged")
    assert not (tmp_path / "unused-dir").exists()


def test_every_mergekit_option_is_known():
    """The option names of mergekit 0.1.5's MergeOptions (options.py), each as --name (and -j)."""
    mergekit = ["allow_crimes", "unsafe_truncate_embeddings", "transformers_cache", "lora_merge_cache",
                "lora_merge_dtype", "cuda", "device", "low_cpu_memory", "out_shard_size", "copy_tokenizer",
                "clone_tensors", "trust_remote_code", "random_seed", "lazy_unpickle", "write_model_card",
                "safe_serialization", "quiet", "read_to_gpu", "multi_gpu", "num_threads", "gpu_rich", "async_write",
                "write_threads"]
    known = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [n for n in mergekit if f"--{n.replace('_', '-')}" not in known]
    assert missing == [] and "-j" in known and "-v" in known


def test_num_threads_sets_torch_threads(recipe, tmp_path):
    before = torch.get_num_threads()
    try:
        assert run(recipe, tmp_path / "o", "-j", "1") == 0
        assert torch.get_num_threads() == 1
        assert run(recipe, tmp_path / "o2", "--num-threads", "2") == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert run(recipe, tmp_path / "o3", "--num-threads", "0") == 2


def test_quiet_hides_progress_and_messages(recipe, tmp_path, capsys):
    assert merge_main([str(recipe), str(tmp_path / "loud"), "--random-seed", "1"]) == 0
    loud = capsys.readouterr()
    assert "merging" in loud.err and "written to" in loud.out
    assert merge_main([str(recipe), str(tmp_path / "quiet"), "--random-seed", "1", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert "merging" not in quiet.err and quiet.out == ""
    assert same(tmp_path / "loud", tmp_path / "quiet")


def test_no_safe_serialization_still_writes_safetensors(recipe, tmp_path, caplog):
    assert run(recipe, tmp_path / "o", "--no-safe-serialization") == 0
    files = {p.name for p in (tmp_path / "o").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert "safetensors anyway" in caplog.text


def test_unsafe_truncate_embeddings_is_refused(recipe, tmp_path, capsys):
    assert run(recipe, tmp_path / "o", "--unsafe-truncate-embeddings") == 2
    assert "--unsafe-truncate-embeddings" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda"], ["--device", "cuda:0"], ["--gpu-rich"]])
def test_cuda_without_cuda_errors_before_any_work(recipe, tmp_path, capsys, flags):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(recipe, tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "cuda" in err and "--device cpu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a partial dir


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_auto_falls_back_to_cpu(recipe, tmp_path):
    assert run(recipe, tmp_path / "auto", "--device", "auto") == 0
    assert run(recipe, tmp_path / "cpu") == 0
    assert same(tmp_path / "auto", tmp_path / "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_auto_picks_cuda():
    from merge_engine.options import resolve_device

    assert resolve_device("auto") == "cuda"


def test_bad_device_name_is_an_error(recipe, tmp_path, capsys):
    assert run(recipe, tmp_path / "o", "--device", "gpu0") == 2
    assert "not a torch device" in capsys.readouterr().err


def test_recipe_random_seed_is_used_and_the_flag_overrides_it(recipe, tmp_path):
    data = yaml.safe_load(recipe.read_text())
    seeded = tmp_path / "seeded.yml"
    seeded.write_text(yaml.safe_dump({**data, "random_seed": 1}))
    assert merge_main([str(seeded), str(tmp_path / "from_recipe"), "--no-progress"]) == 0
    assert run(recipe, tmp_path / "from_flag") == 0  # --random-seed 1
    assert same(tmp_path / "from_recipe", tmp_path / "from_flag")
    assert merge_main([str(seeded), str(tmp_path / "override"), "--no-progress", "--random-seed", "2"]) == 0
    assert not same(tmp_path / "from_recipe", tmp_path / "override")
