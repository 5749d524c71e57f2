"""Tokenizer handling as mergekit 0.1.5: byte-for-byte copies, chat templates, vocabulary
alignment (tokenizer_source base / union / a model, tokenizer.tokens) and pad_to_multiple_of.

The models are tiny Qwen2s with real byte-level BPE tokenizers trained here (Qwen2Tokenizer,
with vocab.json and merges.txt as real Qwen2 repos ship them); "other" has a tokenizer trained
on other text, so its vocabulary and ids differ from the base's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factory import MERGEKIT_VENV, family_config, run_mergekit_yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2TokenizerFast

from merge_engine import MergeOptions, run_merge
from merge_engine import tokenizer as tokenizer_module
from merge_engine.cli import main as merge_main
from merge_engine.config import parse_recipe
from merge_engine.errors import EngineError, TokenizerError
from merge_engine.io.artifacts import CHAT_TEMPLATES
from merge_engine.plan import PlanError

QUIET = MergeOptions(progress=False)
TEXT_A = ["Merging language models is an evolutionary search over recipes.",
          "Hello world, hello merge! Tokenizers split text into pieces.", "The quick brown fox jumps."]
TEXT_B = ["Zebras quietly paint yellow boxes with vivid jam.", "Hello world, this tokenizer was trained elsewhere."]
SENTENCE = "Hello world, merging models is a search!"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _bpe(texts: list[str], vocab_size: int) -> Qwen2TokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)


def _save(path: Path, tok: Qwen2TokenizerFast, seed: int, like: Path | None = None,
          model_type: str | None = None) -> Path:
    """A tiny Qwen2 (or a tiny `model_type` of factory.FAMILY_CONFIGS) whose vocabulary is `tok`'s; with `like`,
    its weights plus noise (rows of new tokens random)."""
    torch.manual_seed(seed)
    config = family_config(model_type, vocab_size=len(tok)) if model_type else Qwen2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    if like is not None:
        state = load_file(str(like / "model.safetensors"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = state[name]
                rows = min(src.shape[0], p.shape[0]) if name in (EMBED, HEAD) else src.shape[0]
                p[:rows] = src[:rows] + torch.randn_like(src[:rows]) * 0.02
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    tok.backend_tokenizer.model.save(str(path))  # vocab.json + merges.txt
    return path


@pytest.fixture(scope="module")
def tz(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokzoo")
    base_tok = _bpe(TEXT_A, 300)
    z = {"base": _save(root / "base", base_tok, 0)}
    z["ft"] = _save(root / "ft", base_tok, 1, like=z["base"])
    z["other"] = _save(root / "other", _bpe(TEXT_B, 280), 2)
    added_tok = _bpe(TEXT_A, 300)
    added_tok.add_tokens(["<tool>", "<calc>"])
    z["added"] = _save(root / "added", added_tok, 3, like=z["base"])
    return z


def _merge(tmp_path: Path, name: str, **recipe) -> Path:
    return run_merge(parse_recipe(recipe), tmp_path / name, QUIET)


def _linear(*paths: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
            **extra}


def _w(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _vocab(path: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def test_tokenizer_files_are_copied_byte_for_byte(tz, tmp_path):
    out = _merge(tmp_path, "out", **_linear(tz["base"], tz["ft"]))
    files = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
    for f in files:
        assert (out / f).read_bytes() == (tz["base"] / f).read_bytes(), f
    ids = AutoTokenizer.from_pretrained(str(tz["base"]))(SENTENCE)["input_ids"]
    assert len(ids) > 5  # a BPE split, not one id per word
    assert AutoTokenizer.from_pretrained(str(out))(SENTENCE)["input_ids"] == ids


def test_a_chat_template_replaces_only_the_template(tz, tmp_path):
    out = _merge(tmp_path, "out", **_linear(tz["base"], tz["ft"]), chat_template="chatml")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (out / f).read_bytes() == (tz["base"] / f).read_bytes(), f
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATES["chatml"]

    # a tokenizer that keeps its template in tokenizer_config.json: only that field changes
    legacy = tmp_path / "legacy"
    shutil.copytree(tz["base"], legacy)
    cfg = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ 'old' }}"}, indent=2))
    out2 = _merge(tmp_path, "out2", **_linear(legacy, tz["ft"]), chat_template="alpaca")
    written = json.loads((out2 / "tokenizer_config.json").read_text())
    assert written.pop("chat_template") == CHAT_TEMPLATES["alpaca"]
    assert written == cfg and not (out2 / "chat_template.jinja").exists()
    assert (out2 / "tokenizer.json").read_bytes() == (tz["base"] / "tokenizer.json").read_bytes()


def test_chat_template_auto_takes_the_most_common_template_of_the_models(tz, tmp_path):
    with_template = tmp_path / "ft_chat"
    shutil.copytree(tz["ft"], with_template)
    (with_template / "chat_template.jinja").write_text("{{ messages[0]['content'] }} ft's template\n")
    out = _merge(tmp_path, "out", **_linear(tz["base"], with_template), chat_template="auto")
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == "{{ messages[0]['content'] }} ft's template"


def test_union_maps_each_models_rows_token_by_token(tz, tmp_path):
    base, other = tz["base"], tz["other"]
    out = _merge(tmp_path, "out", **_linear(base, other), tokenizer_source="union")
    va, vb, vo = _vocab(base), _vocab(other), _vocab(out)
    assert set(vo) == set(va) | set(vb) and len(vo) > len(va)
    assert all(vo[t] == i for t, i in va.items())  # the base's ids are kept, new tokens appended
    shared = [t for t in vb if t in va and va[t] != vb[t]]
    only_a = [t for t in va if t not in vb]
    only_b = [t for t in vb if t not in va]
    assert shared and only_a and only_b
    wa, wb, wo = _w(base), _w(other), _w(out)
    assert wo[EMBED].shape[0] == len(vo) and json.loads((out / "config.json").read_text())["vocab_size"] == len(vo)
    for name in (EMBED, HEAD):
        for t in shared[:5]:  # both models have it: the mean of their rows (linear, weights 1 and 1)
            torch.testing.assert_close(wo[name][vo[t]], (wa[name][va[t]] + wb[name][vb[t]]) / 2)
        for t in only_a[:5]:  # one model has it: that model's row stands in for the other
            torch.testing.assert_close(wo[name][vo[t]], wa[name][va[t]])
        for t in only_b[:5]:
            torch.testing.assert_close(wo[name][vo[t]], wb[name][vb[t]])
    # the saved (re-serialized) BPE tokenizer still splits text as the base's does
    assert AutoTokenizer.from_pretrained(str(out))(SENTENCE)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(base))(SENTENCE)["input_ids"]


def test_base_or_model_source_with_added_tokens(tz, tmp_path):
    base, added = tz["base"], tz["added"]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(added), "parameters": {"weight": 1.0}}]}
    out = _merge(tmp_path, "out", **recipe, tokenizer_source="base")
    wo, wx = _w(out), _w(added)
    assert wo[EMBED].shape == (300, 16)  # the base vocabulary: added's extra rows are dropped
    torch.testing.assert_close(wo[EMBED], wx[EMBED][:300])  # base + 1 * (added - base), row by row
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()

    out2 = _merge(tmp_path, "out2", **recipe, tokenizer_source=str(added))
    wo2 = _w(out2)
    assert wo2[EMBED].shape == (302, 16)
    vx = _vocab(added)
    # the base lacks <tool>: its stand-in row is added's, so the task vector there is zero
    torch.testing.assert_close(wo2[HEAD][vx["<tool>"]], wx[HEAD][vx["<tool>"]])
    assert (out2 / "tokenizer.json").read_bytes() == (added / "tokenizer.json").read_bytes()
    assert json.loads((out2 / "config.json").read_text())["vocab_size"] == 302


@pytest.mark.parametrize("tokenizer", [{"source": "base", "pad_to_multiple_of": 64}, {"pad_to_multiple_of": 64}])
def test_pad_to_multiple_of(tz, tmp_path, tokenizer):
    out = _merge(tmp_path, "out", **_linear(tz["base"], tz["ft"]), tokenizer=tokenizer)
    wo, wa, wf = _w(out), _w(tz["base"]), _w(tz["ft"])
    for name in (EMBED, HEAD):
        assert wo[name].shape == (320, 16)  # 300 tokens -> 5 x 64 rows
        merged = (wa[name] + wf[name]) / 2
        torch.testing.assert_close(wo[name][:300], merged)
        torch.testing.assert_close(wo[name][300:], merged.mean(dim=0).expand(20, -1))  # padding: the mean row
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    assert (out / "tokenizer.json").read_bytes() == (tz["base"] / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == 320


def test_tokens_set_rows_per_token(tz, tmp_path):
    base, other = tz["base"], tz["other"]
    va, vb = _vocab(base), _vocab(other)
    shared = next(t for t in vb if t in va and va[t] != vb[t])
    out = _merge(tmp_path, "out", **_linear(base, other), tokenizer={"source": "union", "tokens": {
        "<brand_new>": {"source": {"kind": "zero"}},
        shared: {"source": str(other), "force": True},
        "<|im_end|>": {"source": {"kind": "model_token", "model": str(base), "token": "<|im_start|>"},
                       "force": True}}})
    vo, wo, wa, wb = _vocab(out), _w(out), _w(base), _w(other)
    assert "<brand_new>" in vo
    assert torch.count_nonzero(wo[EMBED][vo["<brand_new>"]]) == 0
    torch.testing.assert_close(wo[EMBED][vo[shared]], wb[EMBED][vb[shared]])  # forced: other's row in every model
    torch.testing.assert_close(wo[HEAD][vo["<|im_end|>"]], wa[HEAD][va["<|im_start|>"]])


def test_different_vocabularies_without_a_tokenizer_source_name_the_fix(tz, tmp_path):
    with pytest.raises(PlanError, match="tokenizer_source"):
        _merge(tmp_path, "out", **_linear(tz["base"], tz["other"]))
    assert not (tmp_path / "out").exists()


def test_union_with_a_base_model_uses_the_bases_row_for_missing_tokens(tz, tmp_path):
    base, ft, other = tz["base"], tz["ft"], tz["other"]
    out = _merge(tmp_path, "out", merge_method="task_arithmetic", base_model=str(base), tokenizer_source="union",
                 models=[{"model": str(ft), "parameters": {"weight": 1.0}},
                         {"model": str(other), "parameters": {"weight": 1.0}}])
    va, vb, vo = _vocab(base), _vocab(other), _vocab(out)
    wa, wf, wb, wo = _w(base), _w(ft), _w(other), _w(out)
    only_a = [t for t in va if t not in vb][:5]
    only_b = [t for t in vb if t not in va][:5]
    shared = [t for t in vb if t in va][:5]
    for t in only_a:  # other lacks it: its stand-in is the base's row, so its task vector there is zero
        torch.testing.assert_close(wo[EMBED][vo[t]], wf[EMBED][va[t]])
    for t in only_b:  # base and ft lack it: other's row stands in for both, so base + (other - base) = other
        torch.testing.assert_close(wo[EMBED][vo[t]], wb[EMBED][vb[t]])
    for t in shared:
        torch.testing.assert_close(wo[EMBED][vo[t]], wf[EMBED][va[t]] + wb[EMBED][vb[t]] - wa[EMBED][va[t]])


def test_a_token_source_that_does_not_exist_is_refused_before_writing(tz, tmp_path, capsys):
    recipe = {**_linear(tz["base"], tz["ft"]), "tokenizer": {"source": "union", "tokens": {
        "<x>": {"source": {"kind": "model_token", "model": str(tz["base"]), "token": "<nope>"}}}}}
    with pytest.raises(TokenizerError, match=r"tokenizer.tokens.<x>.source.token: '<nope>' is not in the vocabulary"):
        _merge(tmp_path, "out", **recipe)
    assert not (tmp_path / "out").exists()
    (tmp_path / "recipe.yml").write_text(json.dumps(recipe))  # JSON is YAML
    assert merge_main([str(tmp_path / "recipe.yml"), str(tmp_path / "cli"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [  # one line, exit 2: a user's error, not a crash
        f"mergekit-yaml: error: tokenizer.tokens.<x>.source.token: '<nope>' is not in the vocabulary of "
        f"{str(tz['base'])!r}"]
    assert not (tmp_path / "cli").exists()
    assert issubclass(TokenizerError, EngineError) and TokenizerError is tokenizer_module.TokenizerError


# ---- an output head with a bias (phi, gptj): its entries are rows of the vocabulary too ------------------------

HEAD_BIAS_FAMILIES = ("phi", "gptj")  # the families of factory.FAMILY_CONFIGS whose lm_head has a bias
ALIGNMENTS = {"union": {"source": "union", "pad_to_multiple_of": 64},
              "pad": {"source": "base", "pad_to_multiple_of": 64}}


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """model_type -> (base, a fine-tune of it with the same tokenizer, a model with `other`'s tokenizer)."""
    root = tmp_path_factory.mktemp("biased")
    out = {}
    for mt in HEAD_BIAS_FAMILIES:
        base = _save(root / f"{mt}_base", _bpe(TEXT_A, 300), 4, model_type=mt)
        out[mt] = (base, _save(root / f"{mt}_ft", _bpe(TEXT_A, 300), 5, like=base, model_type=mt),
                   _save(root / f"{mt}_other", _bpe(TEXT_B, 280), 6, model_type=mt))
    return out


def _token_rows(paths: list[Path], out: Path, name: str) -> torch.Tensor:
    """The rows of tensor `name` a linear merge of `paths` (weights 1 and 1, no base) gives each token of `out`'s
    vocabulary, computed from the input files: the mean of the rows of the models that have the token (the one
    model's row where only one has it); then padding rows, each the mean of the token rows."""
    vo = _vocab(out)
    vocabs, tensors = [_vocab(p) for p in paths], [_w(p)[name] for p in paths]
    rows = torch.stack([torch.stack([t[v[tok]] for v, t in zip(vocabs, tensors, strict=True) if tok in v]).mean(0)
                        for tok in sorted(vo, key=vo.__getitem__)])
    size = _w(out)[name].shape[0]
    return torch.cat([rows, rows.mean(0).expand(size - len(rows), *rows.shape[1:])])


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("model_type", HEAD_BIAS_FAMILIES)
def test_head_bias_follows_the_vocabulary(biased, tmp_path, model_type, alignment):
    """`lm_head.bias` is mapped to the output vocabulary as the head's rows are (union: each token's entry from the
    models that have it; pad_to_multiple_of 64: padding entries the mean entry), and the output loads and runs."""
    base, ft, other = biased[model_type]
    paths = [base, other] if alignment == "union" else [base, ft]
    out = _merge(tmp_path, "out", **_linear(*paths), tokenizer=ALIGNMENTS[alignment])
    wo, n = _w(out), len(_vocab(out))
    assert wo["lm_head.bias"].shape == (320,) and (alignment == "pad") == (n == 300), n  # union: 313 tokens
    for name in ("lm_head.bias", "lm_head.weight"):
        torch.testing.assert_close(wo[name], _token_rows(paths, out, name))
    assert (wo["lm_head.bias"][n:] - wo["lm_head.bias"][:n].mean()).abs().max() < 1e-6
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    torch.testing.assert_close(model.get_output_embeddings().bias.detach(), wo["lm_head.bias"])
    with torch.no_grad():
        ids = torch.tensor([AutoTokenizer.from_pretrained(str(out))(SENTENCE)["input_ids"]])
        logits = model.eval()(input_ids=ids).logits
    assert logits.shape[-1] == 320 and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason=f"mergekit 0.1.5 venv not available at {MERGEKIT_VENV} (set EVOMERGE_MERGEKIT_VENV)")
@pytest.mark.parametrize("model_type", HEAD_BIAS_FAMILIES)
def test_head_bias_as_mergekit_aligns_it(biased, tmp_path, model_type):
    """mergekit 0.1.5 gives the output embedding's bias a vocabulary axis (phi's JSON definition; gptj's inferred
    from the transformers model): a union vocabulary padded to 64 gives every token the same embedding, head and
    bias entries in both tools (mergekit orders the new tokens differently, so tokens are compared by text), the
    same padding, and every other tensor equal."""
    base, _, other = biased[model_type]
    recipe = {**_linear(base, other), "dtype": "float32", "tokenizer": ALIGNMENTS["union"]}
    ours = _merge(tmp_path, "ours", **recipe)
    (tmp_path / "recipe.yml").write_text(json.dumps(recipe))
    theirs = run_mergekit_yaml(tmp_path / "recipe.yml", tmp_path / "theirs")
    o, m, vo, vm = _w(ours), _w(theirs), _vocab(ours), _vocab(theirs)
    assert set(o) == set(m) and set(vo) == set(vm) and len(vo) > 300
    by_token = [(vo[t], vm[t]) for t in vo] + list(zip(range(len(vo), 320), range(len(vm), 320), strict=True))
    ids_o, ids_m = (torch.tensor(ids) for ids in zip(*by_token, strict=True))
    vocabulary = {"lm_head.bias", "lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight"}
    for name in o:
        if name in vocabulary:
            assert o[name].shape[0] == 320 and torch.allclose(o[name][ids_o], m[name][ids_m], atol=1e-6), name
        else:
            assert torch.allclose(o[name], m[name], atol=1e-6), name
