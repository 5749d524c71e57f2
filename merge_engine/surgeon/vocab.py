"""Which token of the donor's vocabulary is which token of the model's (mergekit 0.1.5's normalization).

Tokens are compared after normalization, so that tokenizers of different families still match:

* a word-start token (``Ġhello`` in GPT-2-style byte-level vocabularies, ``▁hello`` in SentencePiece ones)
  becomes ("word_start", "hello");
* a special token with a role (bos, eos, unk, sep, pad, cls, mask) becomes ("special", role): the model's
  ``<s>`` takes the place of the donor's ``<|begin_of_text|>``;
* anything else, extra special tokens included, is compared as its text.

Extra special tokens are matched by their text. (mergekit does so under transformers 5; under transformers 4,
whose special_tokens_map lists them, it normalizes them all to one key and all but one get zero rows.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import transformers

Token = str | tuple[str, str]  # the text, or (marker, text)
ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GPT2_STYLE = ("GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
               "Qwen2Tokenizer", "Qwen2TokenizerFast")
_SENTENCEPIECE_STYLE = ("LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast",
                        "GemmaTokenizer", "GemmaTokenizerFast")


def _classes(names: tuple[str, ...]) -> tuple[type, ...]:
    return tuple(c for n in names if isinstance(c := getattr(transformers, n, None), type))


def word_start_prefix(tokenizer: Any) -> str:
    """The marker of a word's first piece: "▁" for SentencePiece-style tokenizers, "Ġ" otherwise (mergekit's
    rule: by tokenizer class; a deepseek-style Llama tokenizer with "Ġhello" in its vocabulary is "Ġ")."""
    deepseek_like = "Ġhello" in tokenizer.get_vocab()
    if isinstance(tokenizer, _classes(_GPT2_STYLE)):
        return "Ġ"
    if isinstance(tokenizer, _classes(_SENTENCEPIECE_STYLE)) and not deepseek_like:
        return "▁"
    return "Ġ"


def normalized_vocabulary(tokenizer: Any) -> dict[Token, int]:
    """normalized token -> id, for every token of the tokenizer (added tokens included). Where two tokens
    normalize alike the one with the higher id is kept."""
    prefix = word_start_prefix(tokenizer)
    special = tokenizer.special_tokens_map
    roles: dict[str, str] = {}
    for role in ROLES:
        value = special.get(role)
        if isinstance(value, str):
            roles.setdefault(value, role)
    out: dict[Token, int] = {}
    for text, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        key: Token
        if text.startswith(prefix):
            key = ("word_start", text[len(prefix):])
        elif text in roles:
            key = ("special", roles[text])
        else:
            key = text
        out[key] = i
    return out


def token_prefixes(token: Token) -> Iterator[Token]:
    """Shorter and shorter prefixes of a token (none for special tokens, none that are only whitespace)."""
    marker, text = token if isinstance(token, tuple) else (None, token)
    if marker == "special":
        return
    for i in range(len(text) - 1, 0, -1):
        prefix = text[:i]
        if not prefix.strip():
            break
        yield (marker, prefix) if marker is not None else prefix


def byte_token_match(token: Token, vocab: Mapping[Token, int]) -> int | None:
    """The row of the same byte spelled the other way: "a" <-> "<0x61>" (byte-fallback vocabularies)."""
    if not isinstance(token, str):
        return None
    if len(token) == 1 and ord(token) < 256:
        return vocab.get(f"<0x{ord(token):02X}>")
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        try:
            return vocab.get(chr(int(token[3:-1], 16)))
        except ValueError:
            return None
    return None


def prefix_match(token: Token, vocab: Mapping[Token, int]) -> int | None:
    for prefix in token_prefixes(token):
        if prefix in vocab:
            return vocab[prefix]
    return None


@dataclass
class RowAssignment:
    """Where each row of a new matrix comes from: copied from a model row, approximated, or zero."""

    size: int  # rows of the new matrix
    copy: dict[int, int] = field(default_factory=dict)  # new row -> model row (exact, byte or prefix match)
    approximate: list[int] = field(default_factory=list)  # new rows to approximate (donor ids), in donor order
    exact: int = 0
    byte: int = 0
    prefix: int = 0
    zero: list[int] = field(default_factory=list)  # donor tokens without a donor row: zeros

    def describe(self) -> str:
        parts = [f"{self.exact} exact"]
        parts += [f"{n} {what} matches" for n, what in ((self.byte, "byte"), (self.prefix, "prefix")) if n]
        parts.append(f"{len(self.approximate)} approximated")
        if self.zero:
            parts.append(f"{len(self.zero)} zero (no donor row)")
        return ", ".join(parts)


def assign_rows(model_vocab: Mapping[Token, int], donor_vocab: Mapping[Token, int], size: int, model_rows: int,
                donor_rows: int, allow_byte: bool = False, allow_prefix: bool = False) -> RowAssignment:
    """The row assignment of one matrix: every donor token the model shares keeps the model's row; the others
    are approximated (or zero when the donor matrix has no row for them)."""
    model_vocab = {t: i for t, i in model_vocab.items() if i < model_rows}
    out = RowAssignment(size)
    for token, new in sorted(donor_vocab.items(), key=lambda kv: kv[1]):
        if token in model_vocab:
            out.copy[new] = model_vocab[token]
            out.exact += 1
        elif allow_byte and (old := byte_token_match(token, model_vocab)) is not None:
            out.copy[new] = old
            out.byte += 1
        elif allow_prefix and (old := prefix_match(token, model_vocab)) is not None:
            out.copy[new] = old
            out.prefix += 1
        elif new >= donor_rows:
            out.zero.append(new)
        else:
            out.approximate.append(new)
    return out


def shared_tokens(model_vocab: Mapping[Token, int], donor_vocab: Mapping[Token, int], model_rows: int,
                  donor_rows: int) -> tuple[list[int], list[int]]:
    """(model rows, donor rows) of the tokens both have rows for, in donor-id order: the basis new tokens are
    expressed in."""
    pairs = sorted((d, model_vocab[t]) for t, d in donor_vocab.items()
                   if t in model_vocab and d < donor_rows and model_vocab[t] < model_rows)
    return [m for _, m in pairs], [d for d, _ in pairs]
