"""The engine's parts on their own, against hand-computed values: merged tensors (and the logits of the merged
model) for every architecture the factory builds, the sharded writer's files byte for byte, --print-plan,
and gradient interpolation."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merge_engine import MergeOptions, parse_recipe, run_merge
from merge_engine.cli import main as cli_main
from merge_engine.io import writer as writer_module
from merge_engine.io.writer import ShardedSafetensorsWriter, TensorLayout, plan_shards
from merge_engine.merge import plan_merge
from merge_engine.params import interpolate_gradient

QUIET = MergeOptions(progress=False)


def weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---- every architecture: merged tensors and logits against hand-computed ones ------------------------------

ARCHS = {  # zoo key -> what it exercises
    "base": "Llama, untied head, GQA (4 query / 2 key-value heads)",
    "tied": "Llama, tied head: no lm_head tensor",
    "mistral": "Mistral, GQA",
    "qwen2": "Qwen2, q/k/v biases, GQA",
    "gpt2": "GPT-2, Conv1D weights, biases, tied head",
    "gpt_neox": "GPT-NeoX, separate embed_out head, biases",
}
FINETUNE = {"base": "a", "tied": "tied_ft"}


def logits(path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_tensors_and_logits_match_hand_computation(zoo, tmp_path, arch):
    """base + 0.6 * (fine-tune - base), tensor by tensor, and the logits of the model transformers loads."""
    base, ft = zoo[arch], zoo[FINETUNE.get(arch, f"{arch}_ft")]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(ft), "parameters": {"weight": 0.6}}]}
    combine = lambda b, f: b + 0.6 * (f - b)  # noqa: E731
    out = run_merge(parse_recipe(recipe), tmp_path / "out", QUIET)
    merged, wb, wf = weights(out), weights(base), weights(ft)
    assert merged.keys() == wb.keys(), "the merged model keeps the base's tensor names (tied: no lm_head)"
    for name, tensor in merged.items():
        expected = combine(wb[name], wf[name])
        assert tensor.dtype == wb[name].dtype and tensor.shape == wb[name].shape, name
        assert torch.allclose(tensor, expected, atol=1e-6), name
        assert not torch.equal(tensor, wb[name]) or torch.equal(wb[name], wf[name]), f"{name}: base copied"
    if "model.layers.0.self_attn.k_proj.weight" in merged:  # GQA: 4 query heads, 2 key-value heads of 8
        assert merged["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    config, base_config = (json.loads((p / "config.json").read_text()) for p in (out, base))
    assert config.get("tie_word_embeddings") == base_config.get("tie_word_embeddings")
    # the merged model, as transformers loads it, computes what the hand-merged weights compute: nothing was
    # dropped (transformers would initialise a missing tensor at random) and a tied head stays tied
    hand = tmp_path / "hand"  # the base's files with the hand-merged tensors, written by safetensors itself
    shutil.copytree(base, hand)
    save_file({k: combine(wb[k], wf[k]) for k in wb}, str(hand / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([[1, 5, 17, 9, 30, 12, 6]])
    got, want = logits(out, ids), logits(hand, ids)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, logits(base, ids), atol=1e-3)  # the merge changed the model's outputs


# ---- the sharded writer -----------------------------------------------------------------------------------

def layouts_and_tensors() -> tuple[list[TensorLayout], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 4, generator=g),  # 48 bytes
        "b.bf16": torch.randn(8, generator=g).to(torch.bfloat16),  # 16
        "c.f16": torch.randn(2, 2, generator=g).to(torch.float16),  # 8
        "d.big": torch.randn(30, generator=g),  # 120: over the limit, alone in its shard
        "e.i64": torch.arange(5),  # 40
        "f.scalar": torch.tensor(2.5),  # 4, a 0-d tensor
        "g.f32": torch.randn(6, generator=g),  # 24
    }
    return [TensorLayout(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], tensors


def test_shard_plan_fills_up_to_the_limit_and_isolates_oversized_tensors():
    layouts, _ = layouts_and_tensors()
    shards = plan_shards(layouts, 64)
    assert [[t.name for t in s] for s in shards] == [["a.f32", "b.bf16"], ["c.f16"], ["d.big"],
                                                    ["e.i64", "f.scalar"], ["g.f32"]]
    assert [[t.name for t in s] for s in plan_shards(layouts, 72)] == [["a.f32", "b.bf16", "c.f16"], ["d.big"],
                                                                      ["e.i64", "f.scalar", "g.f32"]]
    assert len(plan_shards(layouts, 10**9)) == 1


def test_writer_shards_read_back_tensor_for_tensor_with_index(tmp_path):
    layouts, tensors = layouts_and_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, layouts, 64)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.finish()
    assert [f.name for f in files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name for f in files]
                                                                + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    read_back = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            names = list(sf.keys())
            for name in names:
                assert index["weight_map"][name] == f.name
                read_back[name] = sf.get_tensor(name)
        data = sum(read_back[n].numel() * read_back[n].element_size() for n in names)
        assert data <= 64 or len(names) == 1, f"{f.name} exceeds the limit with {names}"
        raw = f.read_bytes()  # [u64 header length][header json][data]: nothing more, nothing less
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert len(raw) == 8 + header_len + data and header_len % 8 == 0
        assert json.loads(raw[8:8 + header_len])["__metadata__"] == {"format": "pt"}
    assert index["weight_map"].keys() == tensors.keys() == read_back.keys()
    for name, tensor in tensors.items():
        assert read_back[name].dtype == tensor.dtype and torch.equal(read_back[name], tensor), name


def test_writer_single_shard_is_model_safetensors_without_index(tmp_path):
    layouts, tensors = layouts_and_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, layouts, 10**9)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    assert [f.name for f in writer.finish()] == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_direct_and_buffered_files_are_the_same_across_buffer_flushes(tmp_path, monkeypatch):
    """Tensors longer than the write buffer and a last block that O_DIRECT pads (cut back to the file's
    length on close): the direct and the buffered writes give the same bytes, read back tensor for tensor."""
    monkeypatch.setattr(writer_module, "BUFFER_BYTES", 8192)
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(5001, generator=g), "odd": torch.randn(5, generator=g).to(torch.bfloat16),
               "exact": torch.randn(2048, generator=g)}
    layouts = [TensorLayout(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    files = {}
    for direct in (True, False):
        out = tmp_path / f"direct-{direct}"
        out.mkdir()
        writer = ShardedSafetensorsWriter(out, layouts, 10**9, direct=direct)
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        (path,) = writer.finish()
        files[direct] = path.read_bytes()
        back = load_file(str(path))
        assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    (header_len,) = struct.unpack("<Q", files[True][:8])
    assert len(files[True]) == 8 + header_len + sum(t.numel() * t.element_size() for t in tensors.values())
    assert files[True] == files[False]


@pytest.mark.parametrize("refuses", ["open", "write"])
def test_writer_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path, monkeypatch, refuses):
    """A file system without O_DIRECT refuses it at open or at the first write (EINVAL): the file is
    written buffered instead, the same bytes."""
    import errno
    import os

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here: every write is buffered")
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds = set()

    def fake_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT and refuses == "open":
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        fd = real_open(path, flags, mode)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # fd numbers are reused
        return fd

    tried_direct = False

    def fake_pwrite(fd, data, offset):
        nonlocal tried_direct
        if fd in direct_fds:
            tried_direct = True
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "open", fake_open)
    monkeypatch.setattr(writer_module.os, "pwrite", fake_pwrite)
    layouts, tensors = layouts_and_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, layouts, 10**9)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    monkeypatch.undo()
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    assert tried_direct == (refuses == "write")


def test_writer_refuses_what_the_plan_did_not_announce(tmp_path):
    layouts, tensors = layouts_and_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, layouts, 64)
    with pytest.raises((RuntimeError, ValueError), match="b.bf16"):
        writer.write("b.bf16", tensors["b.bf16"])  # out of plan order
    with pytest.raises(ValueError, match="a.f32"):
        writer.write("a.f32", tensors["a.f32"].double())  # wrong dtype
    writer.write("a.f32", tensors["a.f32"])
    with pytest.raises(RuntimeError, match="1 of 7"):
        writer.finish()


def test_direct_and_buffered_merges_write_the_same_files(zoo, tmp_path, monkeypatch):
    """MergeOptions.direct_io reaches the writer (O_DIRECT or buffered) and changes no byte."""
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]})
    opened = []
    real = writer_module._ShardFile.__init__

    def spy(self, path, buffer, direct):
        opened.append(direct)
        real(self, path, buffer, direct)

    monkeypatch.setattr(writer_module._ShardFile, "__init__", spy)
    out = {d: run_merge(recipe, tmp_path / f"direct-{d}", MergeOptions(progress=False, direct_io=d))
           for d in (True, False)}
    assert opened == [True, False]
    assert (out[True] / "model.safetensors").read_bytes() == (out[False] / "model.safetensors").read_bytes()


def test_merged_model_shards_respect_the_limit(zoo, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    out = run_merge(parse_recipe(recipe), tmp_path / "out", MergeOptions(progress=False, out_shard_size="20K"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged, a, b = weights(out), weights(zoo["a"]), weights(zoo["b"])
    assert set(index["weight_map"]) == set(merged) == set(a)
    for shard in sorted(out.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118 (safe_open has no __iter__)
        assert sum(sizes) <= 20_000 or len(sizes) == 1, shard.name
    for name, tensor in merged.items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2, atol=1e-6), name


# ---- --print-plan -----------------------------------------------------------------------------------------

def test_print_plan_lists_every_tensor_with_resolved_parameters_and_writes_nothing(zoo, tmp_path, capsys):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": [0.0, 0.9]}},
                         {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.25},
                                                                            {"value": 0.5}]}}]}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main([str(path), str(tmp_path / "out"), "--print-plan"]) == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if not line.startswith("#")]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no temp dir
    names = set(weights(zoo["base"]))
    by_tensor = {line.split()[0]: line for line in lines}
    assert len(lines) == len(names) and by_tensor.keys() == names  # one line per output tensor
    line = by_tensor["model.layers.2.mlp.up_proj.weight"]
    assert "task_arithmetic" in line and str(zoo["a"]) in line and str(zoo["b"]) in line
    assert "0.6" in line and "0.25" in line  # a's gradient at layer 2 of 4 (0.9 * 2/3); b's mlp filter
    assert "0.5" in by_tensor["model.layers.2.self_attn.q_proj.weight"]  # b's catch-all
    assert "0.25" not in by_tensor["model.layers.2.self_attn.q_proj.weight"]


# ---- gradients --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "t", "expected"), [
    ([2.0], 0.7, 2.0),  # one value: constant
    ([0.0, 1.0], 0.0, 0.0), ([0.0, 1.0], 0.25, 0.25), ([0.0, 1.0], 1.0, 1.0),
    ([0.0, 1.0, 0.0], 0.25, 0.5), ([0.0, 1.0, 0.0], 0.5, 1.0), ([0.0, 1.0, 0.0], 0.75, 0.5),
    ([0.0, 10.0, 20.0, 40.0], 1 / 3, 10.0), ([0.0, 10.0, 20.0, 40.0], 0.5, 15.0),
    ([0.0, 10.0, 20.0, 40.0], 5 / 6, 30.0),  # halfway between the last two anchors
    ([1.0, 3.0], -0.5, 1.0), ([1.0, 3.0], 1.5, 3.0),  # clamped to the ends
])
def test_interpolate_gradient(values, t, expected):
    assert interpolate_gradient(values, t) == pytest.approx(expected, abs=1e-12)


def test_gradient_over_layers_in_the_plan(zoo):
    """A 3-anchor gradient over 4 layers: layer i sits at t = i / 3."""
    cfg = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": [0.0, 1.0, 0.0]}},
        {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}]})
    plan, _ = plan_merge(cfg)
    weight = {j.output_name: j.per_model_params[0]["weight"] for j in plan.jobs}
    assert [weight[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == \
        pytest.approx([0.0, 2 / 3, 2 / 3, 0.0])
    assert weight["model.embed_tokens.weight"] == 0.0  # embeddings sit at t = 0


def test_gradient_post_layer_tensors_at_t_zero(zoo):
    cfg = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": [0.2, 1.0]}},
        {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}]})
    plan, _ = plan_merge(cfg)
    weight = {j.output_name: j.per_model_params[0]["weight"] for j in plan.jobs}
    assert weight["lm_head.weight"] == pytest.approx(0.2) and weight["model.norm.weight"] == pytest.approx(0.2)
