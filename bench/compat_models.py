"""Tiny model families for bench/compat_mergekit.py: a base and fine-tunes with non-zero,
different deltas, saved as safetensors with a real (trained) BPE tokenizer.

Families: llama (untied, bf16), llama_tied (tied embeddings, bf16), qwen2 (fp32, q/k/v
biases, Qwen2Tokenizer with vocab.json + merges.txt), mistral (GQA 4:1, bf16, Metaspace
BPE as LlamaTokenizerFast). Every family has `base`, `ft1`, `ft2` (its tokenizer carries a
chat template) and `ft3`; llama and qwen2 also have `ftx` (the base vocabulary plus added
tokens) and `ftv` (a different BPE vocabulary of another size), for the tokenizer cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging language models is an evolutionary search over recipes.",
    "Hello world, hello merge! Tokenizers split text into pieces.",
    "Numbers like 12345 and 678 are split too; so are symbols: {x: [1, 2]}.",
    "A base model and its fine-tunes share most of their weights.",
]
OTHER_CORPUS = [
    "Completely different sentences give another vocabulary.",
    "Zebras quietly paint yellow boxes with vivid jam.",
    "Hello world, this tokenizer was trained elsewhere.",
]
# sentences whose encodings are compared between the two outputs
TEST_SENTENCES = [
    "Hello world, merging models!",
    "The quick brown fox jumps over the lazy dog. 12345",
    "Zebras paint boxes <extra_0> with <extra_2> jam.",
]
ADDED_TOKENS = ["<extra_0>", "<extra_1>", "<extra_2>", "<extra_3>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    arch: str
    tie: bool
    dtype: torch.dtype
    kv_heads: int
    vocab: int
    extra_models: bool  # ftx / ftv for tokenizer cells


FAMILIES = {
    "llama": Family("llama", "llama", False, torch.bfloat16, 4, 320, True),
    "llama_tied": Family("llama_tied", "llama", True, torch.bfloat16, 4, 320, False),
    "qwen2": Family("qwen2", "qwen2", False, torch.float32, 2, 320, True),
    "mistral": Family("mistral", "mistral", False, torch.bfloat16, 1, 320, False),
}
LAYERS = 4
HIDDEN = 32
# fine-tune name -> (seed, delta scale)
FINE_TUNES = {"ft1": (11, 0.02), "ft2": (12, 0.035), "ft3": (13, 0.01), "ftx": (14, 0.025), "ftv": (15, 0.025)}


def _train_bpe(corpus: list[str], vocab: int, specials: list[str], metaspace: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet: list[str] = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    return tok


def build_tokenizer(family: Family, other: bool = False):
    """A transformers fast tokenizer of the family's style (not saved)."""
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast, Qwen2TokenizerFast

    corpus = OTHER_CORPUS + CORPUS[:1] if other else CORPUS
    vocab = family.vocab - 40 if other else family.vocab
    if family.arch == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _train_bpe(corpus, vocab, specials, metaspace=False)
        return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token=None, bos_token=None), tok
    if family.arch == "mistral":
        specials = ["<unk>", "<s>", "</s>"]
        tok = _train_bpe(corpus, vocab, specials, metaspace=True)
        return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"), tok
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = _train_bpe(corpus, vocab, specials, metaspace=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>"), tok


def _config(family: Family, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family.arch]
    return cls(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=family.kv_heads, max_position_embeddings=64,
               tie_word_embeddings=family.tie, bos_token_id=0, eos_token_id=1, pad_token_id=None)


def _save(model, hf_tok, raw_tok: Tokenizer, path: Path, family: Family, chat_template: str | None = None) -> None:
    model.to(family.dtype).save_pretrained(str(path), safe_serialization=True)
    if chat_template:
        hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(str(path))
    hf_tok.chat_template = None
    if family.arch == "qwen2":  # real Qwen2 repos also ship the slow tokenizer's files
        raw_tok.model.save(str(path))


def build_family(root: Path, family: Family) -> dict[str, Path]:
    """Build (or reuse) the family's models under root/<family>/; returns name -> path."""
    from transformers import AutoModelForCausalLM

    out = root / family.name
    names = ["base", "ft1", "ft2", "ft3"] + (["ftx", "ftv"] if family.extra_models else [])
    paths = {n: out / n for n in names}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    hf_tok, raw_tok = build_tokenizer(family)
    vocab_size = len(hf_tok)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(family, vocab_size))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias") or "norm" in name:  # non-trivial biases and norms
                p.add_(torch.randn_like(p) * 0.05)
    _save(base, hf_tok, raw_tok, paths["base"], family)
    base_state = {k: v.float().clone() for k, v in base.state_dict().items()}
    base_vocab = hf_tok.get_vocab()

    for name in names[1:]:
        seed, scale = FINE_TUNES[name]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(family, vocab_size))
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        tok, raw = hf_tok, raw_tok
        if name == "ftx":  # base vocabulary + added tokens, new rows random
            tok, raw = build_tokenizer(family)
            tok.add_tokens(ADDED_TOKENS)
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            _fill_new_rows(model, {}, vocab_size)
        elif name == "ftv":  # another vocabulary: rows of shared tokens come from the base
            tok, raw = build_tokenizer(family, other=True)
            old_in = model.get_input_embeddings().weight.detach().clone()
            old_out = None if family.tie else model.get_output_embeddings().weight.detach().clone()
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            mapping = {i: base_vocab[t] for t, i in tok.get_vocab().items() if t in base_vocab}
            with torch.no_grad():
                emb = model.get_input_embeddings().weight
                emb.normal_(0, 0.02)
                for new, old in mapping.items():
                    emb[new] = old_in[old]
                if old_out is not None:
                    head = model.get_output_embeddings().weight
                    head.normal_(0, 0.02)
                    for new, old in mapping.items():
                        head[new] = old_out[old]
        _save(model, tok, raw, paths[name], family, chat_template=CHATML if name == "ft2" else None)
    return paths


def _fill_new_rows(model, mapping: dict[int, int], old_size: int) -> None:
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[old_size:].normal_(0, 0.02)


def build_all(root: Path, families: list[str]) -> dict[str, dict[str, Path]]:
    return {f: build_family(root, FAMILIES[f]) for f in families}


if __name__ == "__main__":
    import sys

    paths = build_all(Path(sys.argv[1]), list(FAMILIES))
    print(json.dumps({f: {n: str(p) for n, p in ps.items()} for f, ps in paths.items()}, indent=1))
