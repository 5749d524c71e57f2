"""mergekit-multi (merge_engine/multi.py): staged merges from one multi-document file, on real tiny models.

The stages' outputs are compared with the same recipes merged one by one with mergekit-yaml; lazy re-use,
rebuilding after a change, bad files and a SIGTERM between stages run through the real command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from factory import make_model
from safetensors.torch import load_file

from merge_engine import MergeOptions, parse_recipe, run_merge
from merge_engine.cli import multi_main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def models(zoo) -> dict[str, Path]:
    return {k: zoo[k] for k in ("base", "a", "b")}


def stages(models, ta_weight: float = 1.0) -> list[dict]:
    """Stage `ta` (task arithmetic of a and b), stage `mix` (ta halfway to a, reading ta), and the final merge
    (a quarter of mix, three quarters of base), unnamed."""
    m = {k: str(v) for k, v in models.items()}
    return [
        {"name": "mix", "merge_method": "linear",
         "models": [{"model": "ta", "parameters": {"weight": 0.5}}, {"model": m["a"], "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear", "models": [{"model": "mix", "parameters": {"weight": 0.25}},
                                              {"model": m["base"], "parameters": {"weight": 0.75}}]},
        {"name": "ta", "merge_method": "task_arithmetic", "base_model": m["base"],
         "models": [{"model": m["a"], "parameters": {"weight": ta_weight}},
                    {"model": m["b"], "parameters": {"weight": 0.5}}]},
    ]  # listed out of order on purpose: the dependencies decide the order


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


@pytest.fixture
def run(capsys):
    """mergekit-multi in this process (the subprocess and its signals: the SIGTERM test)."""
    def run(*args) -> tuple[int, str]:
        code = multi_main([*map(str, args)])
        return code, capsys.readouterr().err
    return run


def test_stages_equal_the_recipes_merged_one_by_one(models, tmp_path, run):
    config = write(tmp_path / "multi.yml", stages(models))
    code, err = run(config, "-I", tmp_path / "stages", "--out-path", tmp_path / "final", "--no-progress")
    assert code == 0, err
    assert [ln.split("]")[1].split(":")[0].strip() for ln in err.splitlines() if ln.startswith("[")] == \
        ["ta", "mix", "final merge"]
    # the same three recipes by hand, each naming the previous output
    by_hand = tmp_path / "by_hand"
    docs = stages(models)
    ta = {k: v for k, v in docs[2].items() if k != "name"}
    run_merge(parse_recipe(ta), by_hand / "ta", MergeOptions(progress=False))
    mix = {k: v for k, v in docs[0].items() if k != "name"}
    mix["models"][0]["model"] = str(by_hand / "ta")
    run_merge(parse_recipe(mix), by_hand / "mix", MergeOptions(progress=False))
    final = dict(docs[1])
    final["models"][0]["model"] = str(by_hand / "mix")
    run_merge(parse_recipe(final), by_hand / "final", MergeOptions(progress=False))
    for mine, theirs in ((tmp_path / "stages" / "ta", by_hand / "ta"), (tmp_path / "stages" / "mix", by_hand / "mix"),
                         (tmp_path / "final", by_hand / "final")):
        a, b = weights(mine), weights(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base, final_w = weights(models["base"]), weights(tmp_path / "final")
    assert not torch.equal(final_w["lm_head.weight"], base["lm_head.weight"])  # the stages mattered


def test_lazy_reuse_and_rebuild_after_a_change(models, tmp_path, run):
    config = write(tmp_path / "multi.yml", stages(models))
    args = [config, "-I", tmp_path / "stages", "--out-path", tmp_path / "final", "--no-progress"]
    assert run(*args)[0] == 0
    stamp = {n: (tmp_path / "stages" / n / "model.safetensors").stat().st_mtime_ns for n in ("ta", "mix")}
    code, err = run(*args)
    assert code == 0 and err.count("re-used") == 3, err
    assert stamp == {n: (tmp_path / "stages" / n / "model.safetensors").stat().st_mtime_ns for n in ("ta", "mix")}
    before = weights(tmp_path / "final")["lm_head.weight"]
    write(config, stages(models, ta_weight=0.3))  # stage ta changes: ta, mix (reads ta) and the final rebuild
    code, err = run(*args)
    assert code == 0 and "re-used" not in err, err
    assert not torch.equal(weights(tmp_path / "final")["lm_head.weight"], before)
    code, err = run(*args, "--no-lazy")
    assert code == 0 and "re-used" not in err and err.count("merged in") == 3, err


@pytest.mark.parametrize("docs, needle", [
    (lambda m: [{"name": "x", "merge_method": "linear", "models": [{"model": "y"}]},
                {"name": "y", "merge_method": "linear", "models": [{"model": "x"}]}], "cycle: x -> y -> x"),
    (lambda m: [{"name": "x", "merge_method": "linear", "models": [{"model": str(m["a"])}]},
                {"name": "x", "merge_method": "linear", "models": [{"model": str(m["b"])}]}],
     "a second stage named 'x'"),
    (lambda m: [{"merge_method": "linear", "models": [{"model": str(m["a"])}]},
                {"merge_method": "linear", "models": [{"model": str(m["b"])}]}], "a second document without a name"),
    (lambda m: [{"name": "x", "merge_method": "lineer", "models": [{"model": str(m["a"])}]}], "unknown merge_method"),
    (lambda m: [{"merge_method": "linear", "models": [{"model": str(m["a"])}]}], "give --out-path"),
])
def test_bad_files_fail_before_anything_is_written(models, tmp_path, capsys, docs, needle):
    config = write(tmp_path / "multi.yml", docs(models))
    assert multi_main([str(config), "-I", str(tmp_path / "stages"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mergekit-multi: error:")]
    assert len(lines) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


@pytest.mark.slow
def test_sigterm_keeps_finished_stages_and_the_next_run_reuses_them(models, tmp_path, run):
    big = make_model(tmp_path / "big", "llama", seed=5, layers=6, hidden=256)
    big_ft = make_model(tmp_path / "big_ft", base=big, seed=6)
    docs = [{"name": "small", "merge_method": "linear", "models": [{"model": str(models["a"])},
                                                                   {"model": str(models["b"])}]},
            {"name": "big", "merge_method": "linear", "models": [{"model": str(big)}, {"model": str(big_ft)}]}]
    config = write(tmp_path / "multi.yml", docs)
    args = [config, "-I", tmp_path / "stages", "--no-progress", "--out-shard-size", "100K"]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from merge_engine.cli import multi_main; "
                             "sys.exit(multi_main(sys.argv[1:]))", *map(str, args)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not list((tmp_path / "stages").glob(".big.partial-*/model-*.safetensors")):
        assert proc.poll() is None and time.monotonic() < end, "the merge ended before the second stage was caught"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "completed before it are kept" in err
    small = tmp_path / "stages" / "small"  # complete: its weights (sharded at 100K) and its stamp
    assert list(small.glob("model*.safetensors")) and (small / "mergekit_multi.json").exists()
    assert not (tmp_path / "stages" / "big").exists() and not list((tmp_path / "stages").glob(".big.partial-*"))
    code, err = run(*args)
    assert code == 0 and "small: built already from this recipe, re-used" in err and "big: merged" in err, err


def test_numbers_read_as_in_mergekit_yaml(models, tmp_path, run):
    """`5e-1` is a number in a stage as in a recipe (YAML 1.1's safe_load would read a string)."""
    m = {k: str(v) for k, v in models.items()}
    config = tmp_path / "multi.yml"
    config.write_text("name: half\nmerge_method: linear\nmodels:\n"
                      f"  - model: {m['a']}\n    parameters: {{weight: 5e-1}}\n"
                      f"  - model: {m['b']}\n    parameters: {{weight: 5e-1}}\n")
    code, err = run(config, "-I", tmp_path / "stages", "--no-progress")
    assert code == 0, err
    a, b, out = weights(models["a"]), weights(models["b"]), weights(tmp_path / "stages" / "half")
    torch.testing.assert_close(out["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)
