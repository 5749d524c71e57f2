"""Parameter and plan semantics, as mergekit 0.1.5 defines them, checked against merged
tensors computed by hand from the input models (non-zero task vectors throughout).

Each test names the mergekit code it follows: ``config.py:evaluate_setting`` (filters,
gradients), ``parameter_resolver.py`` (input vs output names), ``plan.py`` (t of the
pre/post-layer tensors, slice base models), ``io/tasks.py:LoadTensor`` (dtype casts).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine import MergeOptions, parse_recipe, run_merge
from merge_engine.cli import main as cli_main
from merge_engine.errors import PlanError, RecipeError
from merge_engine.io.loader import ModelSource
from merge_engine.merge import plan_merge

QUIET = MergeOptions(progress=False)
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def edited(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None],
           config: dict | None = None) -> Path:
    """A copy of model `src` at `dst` with its tensors (and config.json keys) changed."""
    shutil.copytree(src, dst)
    w = weights(dst)
    edit(w)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def m(zoo) -> dict[str, dict[str, torch.Tensor]]:
    return {k: weights(zoo[k]) for k in ("base", "a", "b")}


def layer(i: int, suffix: str = "mlp.up_proj.weight") -> str:
    return f"model.layers.{i}.{suffix}"


def test_task_vectors_are_not_zero(m):
    for name in (EMBED, NORM, HEAD, layer(0), layer(3)):
        assert (m["a"][name] - m["base"][name]).abs().max() > 1e-3
        assert (m["b"][name] - m["base"][name]).abs().max() > 1e-3


# ---- filters ------------------------------------------------------------------------

def test_star_filter_matches_every_tensor_and_other_wildcards_are_literal(zoo, m, tmp_path):
    """evaluate_setting: `filter: "*"` matches everything; other filters are substrings,
    so "self_attn*" matches nothing and the catch-all applies."""
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "*", "value": 0.3}]}},
                   {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "self_attn*", "value": 1.0},
                                                                      {"value": 0.6}]}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, a, b = m["base"], m["a"], m["b"]
    assert out.keys() == base.keys()
    for name, tensor in out.items():
        expected = base[name] + 0.3 * (a[name] - base[name]) + 0.6 * (b[name] - base[name])
        assert torch.allclose(tensor, expected, atol=1e-6), name


def test_unmatched_filter_of_a_required_parameter_names_tensor_and_yaml_path(zoo, tmp_path):
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
                   {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]}}]})
    with pytest.raises(PlanError, match=r"'model\.embed_tokens\.weight' of model '.*/b'.*'weight'.*"
                                        r"models\[1\]\.parameters\.weight.*catch-all"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


def test_unmatched_filter_falls_through_to_the_next_level(zoo, m, tmp_path):
    """parameter_resolver: a filter list with no matching entry yields no value, so the
    next level (here the global `parameters:`) decides."""
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"weight": 0.2},
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.7}]}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, a = m["base"], m["a"]
    for name in (layer(1), layer(2, "self_attn.q_proj.weight"), EMBED):
        w = 0.7 if "mlp" in name else 0.2
        assert torch.allclose(out[name], base[name] + w * (a[name] - base[name]), atol=1e-6), name


def test_single_conditional_mapping_is_accepted_like_a_one_entry_list(zoo, m, tmp_path):
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"weight": 0.1},
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": {"filter": "self_attn", "value": 0.8}}},
                   {"model": str(zoo["b"]), "parameters": {"weight": {"value": [0.0, 0.9]}}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, a, b = m["base"], m["a"], m["b"]
    for i, name in [(2, layer(2, "self_attn.k_proj.weight")), (3, layer(3))]:
        wa = 0.8 if "self_attn" in name else 0.1
        wb = 0.9 * i / 3
        expected = base[name] + wa * (a[name] - base[name]) + wb * (b[name] - base[name])
        assert torch.allclose(out[name], expected, atol=1e-6), name
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight\[0\]\.value: expected a number"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": {"value": "x"}}}]})


def test_filters_match_the_input_tensor_name_when_a_slice_remaps_layers(zoo, m, tmp_path):
    """parameter_resolver: per-model parameters are matched against each model's INPUT
    tensor (layers 2-3 here), global ones against the OUTPUT tensor (layers 0-1)."""
    base_path, a_path = str(zoo["base"]), str(zoo["a"])
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": base_path,
        "parameters": {"lambda": [{"filter": "layers.1.", "value": 3.0}, {"value": 1.0}]},
        "slices": [{"sources": [
            {"model": base_path, "layer_range": [2, 4]},
            {"model": a_path, "layer_range": [2, 4],
             "parameters": {"weight": [{"filter": "layers.2.", "value": 1.0}, {"value": 0.5}]}}]}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, a = m["base"], m["a"]
    assert torch.allclose(out[layer(0)], a[layer(2)], atol=1e-6)  # input layer 2: weight 1, lambda 1
    expected = base[layer(3)] + 3.0 * 0.5 * (a[layer(3)] - base[layer(3)])  # output layer 1: lambda 3
    assert torch.allclose(out[layer(1)], expected, atol=1e-6)
    assert torch.allclose(out[EMBED], base[EMBED] + 0.5 * (a[EMBED] - base[EMBED]), atol=1e-6)


# ---- gradients -----------------------------------------------------------------------

def test_gradient_takes_embeddings_final_norm_and_lm_head_at_t0(zoo, m, tmp_path):
    """mergekit/plan.py plan_module: pre- and post-layer tensors use a ConfigReader at t = 0."""
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["b"]), "parameters": {"weight": [0.2, 0.5, 0.9]}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    base, b = m["base"], m["b"]
    for name, w in [(EMBED, 0.2), (NORM, 0.2), (HEAD, 0.2), (layer(0), 0.2), (layer(3), 0.9),
                    (layer(1), 0.2 + (0.5 - 0.2) * 2 / 3)]:  # layer 1 of 4: t = 1/3 -> 2/3 of the first segment
        assert torch.allclose(out[name], base[name] + w * (b[name] - base[name]), atol=1e-6), name


# ---- base models ---------------------------------------------------------------------

def test_slice_level_base_model_is_honoured(zoo, m, tmp_path):
    """ConfigReader.base_model: a slice's own base_model wins over the top-level one; the
    pre-layer tensors use the first slice's, the post-layer tensors the last slice's."""
    a_path, b_path = str(zoo["a"]), str(zoo["b"])
    cfg = parse_recipe({
        "merge_method": "task_arithmetic", "parameters": {"weight": 0.25},
        "slices": [{"base_model": a_path, "sources": [{"model": a_path, "layer_range": [0, 2]},
                                                      {"model": b_path, "layer_range": [0, 2]}]},
                   {"base_model": b_path, "sources": [{"model": a_path, "layer_range": [2, 4]},
                                                      {"model": b_path, "layer_range": [2, 4]}]}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    a, b = m["a"], m["b"]
    for name in (layer(0), layer(1, "self_attn.o_proj.weight"), EMBED):
        assert torch.allclose(out[name], a[name] + 0.25 * (b[name] - a[name]), atol=1e-6), name
    for name in (layer(2), layer(3, "input_layernorm.weight"), NORM, HEAD):
        assert torch.allclose(out[name], b[name] + 0.25 * (a[name] - b[name]), atol=1e-6), name


def test_method_needing_a_base_accepts_slice_bases_and_names_a_slice_without_one(zoo):
    a_path, b_path = str(zoo["a"]), str(zoo["b"])
    src = [{"model": a_path, "layer_range": [0, 2]}, {"model": b_path, "layer_range": [0, 2]}]
    parse_recipe({"merge_method": "ties", "parameters": {"weight": 0.5},
                  "slices": [{"base_model": a_path, "sources": src}]})
    with pytest.raises(RecipeError, match=r"slices\[1\]\.base_model: merge_method 'ties' needs a base_model"):
        parse_recipe({"merge_method": "ties", "parameters": {"weight": 0.5},
                      "slices": [{"base_model": a_path, "sources": src}, {"sources": src}]})


# ---- dtype ---------------------------------------------------------------------------

def test_dtype_rounds_every_input_and_the_result(zoo, m, tmp_path):
    """LoadTensor casts each input to `dtype` and mergekit's methods return that dtype; our
    float32 accumulation sees the rounded inputs and its result is rounded to `dtype` before
    `out_dtype` (mergekit 0.1.5 gives bit-identical float32 tensors for this recipe)."""
    cfg = parse_recipe({"merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float32",
                        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
                                   {"model": str(zoo["b"]), "parameters": {"weight": 0.5}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    a, b = m["a"], m["b"]
    for name in (EMBED, layer(1), HEAD):
        expected = ((a[name].bfloat16().float() + b[name].bfloat16().float()) / 2).bfloat16().float()
        inputs_not_rounded = ((a[name] + b[name]) / 2).bfloat16().float()
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], expected), name
        assert not torch.equal(out[name], inputs_not_rounded), name
        assert not torch.equal(out[name], (a[name].bfloat16().float() + b[name].bfloat16().float()) / 2), name


# ---- tensors a model lacks or has in addition -----------------------------------------

def test_tensor_missing_from_the_reference_is_an_error_before_any_read(zoo, tmp_path, monkeypatch):
    missing = layer(1)
    base = edited(zoo["base"], tmp_path / "base_missing", lambda w: w.pop(missing))
    reads: list[str] = []
    real_get = ModelSource.get
    monkeypatch.setattr(ModelSource, "get", lambda self, name: reads.append(name) or real_get(self, name))
    cfg = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5}}]})
    with pytest.raises(PlanError, match=rf"model '.*base_missing' has no tensor '{missing}' \(model '.*/a' has it"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert reads == [] and not (tmp_path / "out").exists()


def test_missing_tensor_via_the_cli_is_one_error_line_and_exit_2(zoo, tmp_path, capsys):
    missing = layer(2, "self_attn.v_proj.weight")
    a = edited(zoo["a"], tmp_path / "a_missing", lambda w: w.pop(missing))
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(zoo["b"])}, {"model": str(a)}]}))
    assert cli_main([str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergekit-yaml: error: model ") and missing in err[0]
    assert not (tmp_path / "out").exists()


def test_tensor_only_another_model_has_is_an_error_naming_both(zoo, tmp_path):
    extra = layer(0, "mlp.extra_scale.weight")
    b = edited(zoo["b"], tmp_path / "b_extra", lambda w: w.__setitem__(extra, torch.ones(4)))
    cfg = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
                                   {"model": str(b), "parameters": {"weight": 0.5}}]})
    with pytest.raises(PlanError, match=rf"model '.*/base', model '.*/a' have no tensor '{extra}' \(model '.*b_extra' "
                                        "has it"):
        plan_merge(cfg, QUIET)


def test_head_of_a_tied_reference_is_merged_from_its_embedding(zoo, tmp_path):
    """mergekit's lm_head is optional with tied_names: planned when any model has it, read
    from the embedding of a model that lacks it."""
    tied, tied_ft = weights(zoo["tied"]), weights(zoo["tied_ft"])
    assert HEAD not in tied
    torch.manual_seed(0)
    head = tied_ft[EMBED] + 0.05 * torch.randn_like(tied_ft[EMBED])
    untied = edited(zoo["tied_ft"], tmp_path / "untied", lambda w: w.__setitem__(HEAD, head),
                    {"tie_word_embeddings": False})
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["tied"]), "parameters": {"weight": 0.3}},
                                                             {"model": str(untied), "parameters": {"weight": 0.7}}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    assert torch.allclose(out[HEAD], 0.3 * tied[EMBED] + 0.7 * head, atol=1e-6)
    assert torch.allclose(out[EMBED], 0.3 * tied[EMBED] + 0.7 * tied_ft[EMBED], atol=1e-6)


# ---- non-float tensors and output dtypes -----------------------------------------------

QUANT = layer(0, "mlp.up_proj.qweight")
FP8 = layer(1, "mlp.up_proj.fp8_weight")


@pytest.fixture(scope="module")
def quantized(zoo, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantized")
    g = torch.Generator().manual_seed(0)

    def add(w: dict[str, torch.Tensor]) -> None:
        w[QUANT] = torch.randint(-128, 128, (8, 4), dtype=torch.int8, generator=g)
        w[FP8] = (torch.randn(8, 4, generator=g) * 3).to(torch.float8_e4m3fn)

    return edited(zoo["a"], root / "qa", add), edited(zoo["b"], root / "qb", add)


def test_passthrough_copies_int8_and_float8_tensors_exactly(quantized, tmp_path):
    qa, _ = quantized
    cfg = parse_recipe({"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(qa), "layer_range": [0, 2]}]}]})
    out = weights(run_merge(cfg, tmp_path / "out", QUIET))
    src = weights(qa)
    assert out[QUANT].dtype == torch.int8 and torch.equal(out[QUANT], src[QUANT])
    assert out[FP8].dtype == torch.float8_e4m3fn and torch.equal(out[FP8].view(torch.uint8), src[FP8].view(torch.uint8))
    assert {t.dtype for n, t in out.items() if n not in (QUANT, FP8)} == {torch.bfloat16}


def test_int8_tensors_are_an_error_for_arithmetic_methods(quantized, tmp_path):
    qa, qb = quantized
    cfg = parse_recipe({"merge_method": "linear", "models": [{"model": str(qa)}, {"model": str(qb)}]})
    with pytest.raises(PlanError, match=rf"tensor '{QUANT}' of model '.*qa' is int8: linear merges floating-point"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


def test_output_dtype_is_one_dtype(zoo, tmp_path):
    mixed = edited(zoo["a"], tmp_path / "mixed", lambda w: w.__setitem__(NORM, w[NORM].bfloat16()))
    cfg = {"merge_method": "linear", "models": [{"model": str(mixed)}, {"model": str(zoo["b"])}]}
    with pytest.raises(PlanError, match=r"several dtypes \(float32 \(\d+ tensors\), bfloat16 \(1 tensors\)\)"
                                        ".*out_dtype"):
        plan_merge(parse_recipe(cfg), QUIET)
    out = weights(run_merge(parse_recipe({**cfg, "out_dtype": "float16"}), tmp_path / "out", QUIET))
    assert {t.dtype for t in out.values()} == {torch.float16}


# ---- the plan as printed ----------------------------------------------------------------

def test_print_plan_lists_every_tensor_with_its_inputs(zoo, tmp_path, capsys):
    a_path, b_path = str(zoo["a"]), str(zoo["b"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": a_path, "layer_range": [2, 4]}]},
        {"sources": [{"model": b_path, "layer_range": [0, 1]}]}]}))
    assert cli_main([str(recipe), str(tmp_path / "out"), "--print-plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n_tensors = len(weights(zoo["a"])) - 9  # 4 layers of 9 tensors become 3
    assert lines[0].startswith(f"# {n_tensors} tensors, 3 layers, llama, reference {a_path}, written as bfloat16")
    assert len(lines) == 1 + n_tensors
    assert any(line.startswith(f"model.layers.0.mlp.up_proj.weight [64, 32] bfloat16 <- passthrough({a_path}:"
                               "model.layers.2.mlp.up_proj.weight)") for line in lines)
    assert any(line.startswith(f"model.layers.2.self_attn.q_proj.weight [32, 32] bfloat16 <- passthrough({b_path}:"
                               "model.layers.0.self_attn.q_proj.weight)") for line in lines)
    assert any(line.startswith("lm_head.weight [") and f"({b_path}:lm_head.weight)" in line for line in lines)
    assert not (tmp_path / "out").exists()


# ---- one path for every sink --------------------------------------------------------------

def test_in_memory_candidate_equals_the_written_model_and_checks_allow_crimes(zoo, tmp_path):
    from evolve.materialize import InMemoryMaterializer

    recipe = {"merge_method": "ties", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": str(zoo["b"]), "parameters": {"weight": [0.2, 0.9], "density": 0.8}}]}
    mat = InMemoryMaterializer(str(zoo["base"]))
    model, _ = mat.materialize(parse_recipe(recipe))
    state = model.state_dict()
    written = weights(run_merge(parse_recipe(recipe), tmp_path / "out", QUIET))
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    crimes = {"merge_method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(zoo["mistral"])}]}
    with pytest.raises(PlanError, match="--allow-crimes"):
        mat.materialize(parse_recipe(crimes))


def test_one_in_memory_materializer_follows_changes_of_models_base_and_method(zoo, tmp_path):
    """The materializer keeps sources, vocabulary plans and the resident model between candidates: each
    candidate must still equal its own written merge when the model set, the base or the method changes
    (nothing cached for one recipe may leak into the next, and every parameter is overwritten)."""
    from evolve.materialize import InMemoryMaterializer

    a, b, base = str(zoo["a"]), str(zoo["b"]), str(zoo["base"])
    recipes = [
        {"merge_method": "ties", "base_model": base,
         "models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                    {"model": b, "parameters": {"weight": 0.4, "density": 0.8}}]},
        {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}},
                                              {"model": base, "parameters": {"weight": 0.7}}]},
        {"merge_method": "task_arithmetic", "base_model": b, "models": [{"model": a, "parameters": {"weight": 0.6}}]},
        {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": b}],
         "parameters": {"t": [0.1, 0.9]}},
    ]
    mat = InMemoryMaterializer(base)
    previous = None
    for i, recipe in enumerate(recipes):
        state = {k: v.clone() for k, v in mat.materialize(parse_recipe(recipe))[0].state_dict().items()}
        written = weights(run_merge(parse_recipe(recipe), tmp_path / f"out{i}", QUIET))
        for name, tensor in written.items():
            assert torch.equal(state[name], tensor), (recipe["merge_method"], name)
        if previous is not None:  # the candidates really differ, so a stale tensor would be caught
            assert any(not torch.equal(previous[k], state[k]) for k in written), recipe["merge_method"]
        previous = state
