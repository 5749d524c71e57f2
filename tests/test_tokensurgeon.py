"""mergekit-tokensurgeon: a donor's tokenizer transplanted onto a model.

Two tiny Llamas with word-level tokenizers over overlapping vocabularies, in different orders (shared tokens
have different ids), special tokens spelled differently (matched by role). The model's embedding rows are a
fixed linear map of the donor's plus small noise, so the model's "true" rows of tokens it lacks are known:
those held-out tokens measure how well a method approximates new tokens.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from factory import MERGEKIT_VENV
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from merge_engine.cli import surgeon_main

PROG = "mergekit-tokensurgeon"
WORDS = [f"w{i:03d}" for i in range(160)]
SHARED = WORDS[:100]  # in both vocabularies
HELD_OUT = WORDS[100:]  # only the donor's: approximated; their true model rows are known
OWN = [f"m{i:03d}" for i in range(20)]  # only the model's: dropped
DONOR_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
MODEL_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DONOR_HIDDEN, MODEL_HIDDEN, LATENT = 96, 64, 40


def word_tokenizer(specials: list[str], words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2], unk_token=specials[3], model_max_length=64)


def save_model(path: Path, tok: PreTrainedTokenizerFast, hidden: int, embed: torch.Tensor, head: torch.Tensor | None,
               seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=head is None, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed)
        if head is not None:
            model.lm_head.weight.copy_(head)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_pair(root: Path, tie: bool = False) -> dict:
    """A donor and a model; truth[matrix][word] is the model's true row of a word (known for held-out ones)."""
    g = torch.Generator().manual_seed(0)
    donor_words = list(WORDS)
    model_words = SHARED + OWN
    random.Random(1).shuffle(model_words)  # shared tokens get other ids than in the donor
    donor_tok = word_tokenizer(DONOR_SPECIALS, donor_words)
    model_tok = word_tokenizer(MODEL_SPECIALS, model_words)
    n_donor = len(donor_tok)
    out: dict = {"truth": {}}
    rows = {}
    for matrix in ("embed", "head"):
        # donor rows: structured (rank LATENT) plus full-rank noise, as trained embeddings are
        donor = (torch.randn(n_donor, LATENT, generator=g) @ torch.randn(LATENT, DONOR_HIDDEN, generator=g)
                 / LATENT**0.5 + 0.05 * torch.randn(n_donor, DONOR_HIDDEN, generator=g))
        w = torch.randn(DONOR_HIDDEN, MODEL_HIDDEN, generator=g) / DONOR_HIDDEN**0.5
        truth = donor @ w + 0.01 * torch.randn(n_donor, MODEL_HIDDEN, generator=g)  # indexed by donor id
        model = torch.randn(len(model_tok), MODEL_HIDDEN, generator=g)  # own words: unrelated rows
        donor_vocab, model_vocab = donor_tok.get_vocab(), model_tok.get_vocab()
        for m_sp, d_sp in zip(MODEL_SPECIALS, DONOR_SPECIALS, strict=True):
            model[model_vocab[m_sp]] = truth[donor_vocab[d_sp]]
        for word in SHARED:
            model[model_vocab[word]] = truth[donor_vocab[word]]
        rows[matrix] = (donor, model)
        out["truth"][matrix] = {t: truth[i] for t, i in donor_vocab.items()}
    out["donor"] = save_model(root / "donor", donor_tok, DONOR_HIDDEN, rows["embed"][0], rows["head"][0], seed=2)
    out["model"] = save_model(root / "model", model_tok, MODEL_HIDDEN, rows["embed"][1],
                              None if tie else rows["head"][1], seed=3)
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 - safe_open is no dict
    return out


def surgeon(*args: str | Path) -> int:
    return surgeon_main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    return make_pair(tmp_path_factory.mktemp("surgeon"))


@pytest.fixture(scope="module")
def outputs(pair, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("surgeon_out")
    out = {}
    for method in ("omp", "mean", "common_interpolation", "zero"):
        out[method] = root / method
        assert surgeon(pair["model"], pair["donor"], out[method], "-a", method, "--quiet") == 0
    return out


def held_out_error(pair: dict, out: Path, matrix: str) -> float:
    """Mean relative error of the held-out tokens' rows against the model's true rows."""
    name = "model.embed_tokens.weight" if matrix == "embed" else "lm_head.weight"
    rows = tensors(out)[name]
    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    errs = [(rows[vocab[w]] - pair["truth"][matrix][w]).norm() / pair["truth"][matrix][w].norm() for w in HELD_OUT]
    return float(torch.stack(errs).mean())


def test_shared_tokens_keep_the_models_rows_exactly(pair, outputs):
    model, out = tensors(pair["model"]), tensors(outputs["omp"])
    model_vocab = AutoTokenizer.from_pretrained(str(pair["model"])).get_vocab()
    out_vocab = AutoTokenizer.from_pretrained(str(outputs["omp"])).get_vocab()
    assert sum(model_vocab[w] != out_vocab[w] for w in SHARED) > 90  # the ids differ: matched by text
    pairs = [(w, w) for w in SHARED] + list(zip(MODEL_SPECIALS, DONOR_SPECIALS, strict=True))  # specials by role
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (len(out_vocab), MODEL_HIDDEN)
        for m, d in pairs:
            assert torch.equal(out[name][out_vocab[d]], model[name][model_vocab[m]]), (name, m)
    # every other tensor is the model's, bit for bit
    for name, t in model.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(out[name], t), name


def test_omp_approximates_new_tokens_better_than_the_mean(pair, outputs):
    errors = {m: {x: held_out_error(pair, outputs[m], x) for x in ("embed", "head")}
              for m in ("omp", "common_interpolation", "mean")}
    print("held-out relative error:", json.dumps(errors))
    for matrix in ("embed", "head"):
        assert errors["omp"][matrix] < 0.25 * errors["mean"][matrix], errors
        assert errors["omp"][matrix] < 0.2, errors
        assert errors["common_interpolation"][matrix] < errors["mean"][matrix], errors
    zero = tensors(outputs["zero"])["model.embed_tokens.weight"]
    vocab = AutoTokenizer.from_pretrained(str(outputs["zero"])).get_vocab()
    assert not zero[[vocab[w] for w in HELD_OUT]].any()


def test_output_loads_with_the_donors_tokenizer_and_generates(pair, outputs):
    out = outputs["omp"]
    tok, donor_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(pair["donor"]))
    assert tok.get_vocab() == donor_tok.get_vocab()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == len(donor_tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == donor_tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("w001 w150 w042", return_tensors="pt").input_ids
    assert ids.tolist() == donor_tok("w001 w150 w042", return_tensors="pt").input_ids.tolist()
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4)
    assert (out / "README.md").is_file() and "omp" in (out / "README.md").read_text()


def test_tied_model_keeps_tied_embeddings(tmp_path):
    pair = make_pair(tmp_path, tie=True)
    assert surgeon(pair["model"], pair["donor"], tmp_path / "out", "-k", "32", "--quiet") == 0
    out = tensors(tmp_path / "out")
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape == (164, MODEL_HIDDEN)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("args, message", [
    (["-a", "subword"], "-a subword is not supported"),
    (["-k", "500"], "share only 104 tokens"),
    (["-k", "97"], "only 96 dimensions"),
    (["--magikarp"], "--magikarp is not supported"),
    (["--no-copy-tokenizer"], "--no-copy-tokenizer"),
    (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings is not supported"),
])
def test_bad_options_exit_2_with_one_line_and_write_nothing(pair, tmp_path, capsys, args, message):
    assert surgeon(pair["model"], pair["donor"], tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error:") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_bad_models_exit_2_with_one_line_and_write_nothing(pair, tmp_path, capsys):
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((pair["donor"] / f).read_bytes())
    cases = [(no_tok, pair["donor"], tmp_path / "out", "MODEL"),
             (pair["model"], no_tok, tmp_path / "out", "DONOR"),
             (pair["model"], tmp_path / "missing", tmp_path / "out", "missing"),
             (pair["model"], pair["donor"], pair["model"] / "out", "overlaps input model")]
    before = sorted(p.name for p in pair["model"].iterdir())
    for model, donor, out, message in cases:
        assert surgeon(model, donor, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{PROG}: error:") and message in err[0], err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_tok"]
    assert sorted(p.name for p in pair["model"].iterdir()) == before


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-tokensurgeon").exists(),
                    reason="mergekit 0.1.5 venv not available (set EVOMERGE_MERGEKIT_VENV)")
@pytest.mark.parametrize("method", ["omp", "common_interpolation", "mean"])
def test_same_rows_as_mergekit(pair, outputs, tmp_path, method):
    theirs = tmp_path / "mergekit"
    proc = subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-tokensurgeon"), str(pair["model"]),
                           str(pair["donor"]), str(theirs), "-a", method, "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = tensors(outputs[method]), tensors(theirs)
    assert ours.keys() == ref.keys()
    for name in ours:
        diff = float((ours[name] - ref[name]).abs().max())
        print(f"{method} {name}: max |evomerge - mergekit| = {diff:.3g}")
        assert torch.allclose(ours[name], ref[name], atol=1e-6, rtol=1e-5), (name, diff)
    cfg, ref_cfg = (json.loads((p / "config.json").read_text()) for p in (outputs[method], theirs))
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref_cfg[key], key
