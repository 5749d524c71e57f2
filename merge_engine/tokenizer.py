"""The output tokenizer and the vocabulary of embedding / lm_head rows (mergekit 0.1.5 semantics).

Without a tokenizer source in the recipe, the tokenizer files of the base model (else the first
model) are copied byte for byte and vocabulary-indexed tensors are merged row for row.

With ``tokenizer_source: base | union | <model>`` (or a ``tokenizer:`` block, whose source
defaults to ``union`` as in mergekit), an output vocabulary is built:
  * ``base``: the base model's (else the first model's) tokenizer;
  * a model: that model's tokenizer;
  * ``union``: the base tokenizer plus every other model's tokens it lacks, appended in model order;
  * plus ``tokenizer.tokens`` keys not in it yet.
Each model's embedding and lm_head rows (and lm_head.bias entries: phi, gptj; Architecture.vocabulary_names)
are then mapped to the output vocabulary before merging (:class:`VocabAlignment`, applied when a job's inputs
are read). A token some model lacks gets,
in that model, a default row: the ``tokenizer.tokens`` entry for it if any, else the base model's
row when the base has the token, else the mean of the rows of the models that have it (one model:
its row; none: zeros). ``pad_to_multiple_of`` appends rows, each the mean of the model's token
rows, and the config's ``vocab_size`` becomes the padded size.

Tokenizer files are copied byte for byte from the tokenizer they come from unless the vocabulary
was extended (union, ``tokens``): only then is a tokenizer saved through transformers. A chat
template replaces only the template (``chat_template.jinja``, or the ``chat_template`` field of
``tokenizer_config.json`` where the template lives there).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import MergeConfig, ModelTokenSource, ZeroTokenSource
from .errors import TokenizerError
from .io.loader import ModelSource, resolve_model_path
from .io.preflight import load_tokenizer

# files that make up a tokenizer, copied when present (mergekit copies the same, plus vocab.json,
# vocab.txt and spiece.model, without which some slow tokenizers do not load)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class TokenDefault:
    """A resolved ``tokenizer.tokens`` entry: where the row of one output token comes from."""

    kind: Literal["zero", "model", "model_token"]
    model: str | None = None
    row: int | None = None  # model_token: the row of `model` to copy
    force: bool = False  # use it in every model, also those that have the token


@dataclass(frozen=True, eq=False)
class VocabAlignment:
    """How to build the rows of a vocabulary-indexed tensor ([rows, *rest]) in the output vocabulary."""

    size: int  # output rows, padded to pad_to_multiple_of
    num_tokens: int  # tokens of the output vocabulary; rows num_tokens..size are padding
    rows: Mapping[str, torch.Tensor] = field(repr=False)  # model -> [num_tokens] its row per token, -1: lacks it
    base_model: str | None = None
    token_defaults: Mapping[int, TokenDefault] = field(default_factory=dict)

    def describe(self) -> str:
        missing = {m: int((r < 0).sum()) for m, r in self.rows.items()}
        return (f"vocabulary {self.num_tokens} tokens -> {self.size} rows; tokens missing per model: "
                + ", ".join(f"{m}: {n}" for m, n in missing.items()))

    def align(self, models: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's tensor [model rows, *rest] -> [size, *rest], row i being output token i."""
        rest = tensors[0].shape[1:]
        shape = (self.num_tokens,) + (1,) * len(rest)
        rows = [self.rows[m].to(tensors[0].device) for m in models]
        present = [r >= 0 for r in rows]
        gathered = [t[r.clamp(min=0)] * p.view(shape).to(t.dtype)  # [num_tokens, *rest], zeros where absent
                    for t, r, p in zip(tensors, rows, present, strict=True)]
        count = torch.stack(present).sum(dim=0)
        # default row of a token a model lacks: the base's row, else the mean over the models that have it
        default = torch.zeros_like(gathered[0])
        for g in gathered:  # summed one model at a time: no [n_models, vocab, hidden] stack
            default += g
        default /= count.clamp(min=1).view(shape).to(default.dtype)
        if self.base_model is not None and self.base_model in models:
            b = list(models).index(self.base_model)
            default = torch.where(present[b].view(shape), gathered[b], default)
        forced = torch.zeros(self.num_tokens, dtype=torch.bool, device=default.device)
        for token_id, spec in self.token_defaults.items():
            default[token_id] = self._token_row(spec, token_id, models, tensors, rows)
            forced[token_id] = spec.force
        out = []
        for g, p in zip(gathered, present, strict=True):
            merged_rows = torch.where((p & ~forced).view(shape), g, default)
            full = merged_rows.new_empty((self.size, *rest))
            full[: self.num_tokens] = merged_rows
            if self.size > self.num_tokens:  # padding rows: the mean embedding (as mergekit)
                full[self.num_tokens:] = merged_rows.mean(dim=0)
            out.append(full)
        return out

    @staticmethod
    def _token_row(spec: TokenDefault, token_id: int, models: Sequence[str], tensors: Sequence[torch.Tensor],
                   rows: Sequence[torch.Tensor]) -> torch.Tensor:
        if spec.kind == "zero":
            return tensors[0].new_zeros(tensors[0].shape[1:])
        if spec.model is None or spec.model not in models:
            raise TokenizerError(f"tokenizer.tokens: token {token_id} takes its row from {spec.model!r}, which is "
                                 f"not an input of this tensor (inputs: {', '.join(models)})")
        k = list(models).index(spec.model)
        row = spec.row if spec.kind == "model_token" else int(rows[k][token_id])
        if row is None or row < 0 or row >= tensors[k].shape[0]:
            raise TokenizerError(f"tokenizer.tokens: model {spec.model!r} has no row for token id {token_id}")
        return tensors[k][row]


@dataclass(frozen=True)
class OutputTokenizer:
    """What the output's tokenizer is: files copied from `copy_from`, or `tokenizer` saved when the
    vocabulary was extended; `alignment` maps embedding rows (None: merged row for row)."""

    copy_from: Path | None
    tokenizer: Any = None  # a transformers tokenizer, when copy_from is None
    alignment: VocabAlignment | None = None
    models: tuple[Path, ...] = ()  # every input model directory (for chat_template: auto)


def _tokenizer_settings(config: MergeConfig):
    if config.tokenizer is not None:
        return config.tokenizer.source, config.tokenizer
    return config.tokenizer_source, None


def plan_output_tokenizer(config: MergeConfig, sources: Mapping[str, ModelSource],
                          trust_remote_code: bool = False) -> OutputTokenizer:
    """The output tokenizer of a recipe and, with a tokenizer source, its vocabulary alignment."""
    models = [m for m in config.referenced_models() if m in sources]
    donor = config.base_model or models[0]
    paths = tuple(sources[m].path for m in models)
    source, settings = _tokenizer_settings(config)
    if source is None:
        return OutputTokenizer(sources[donor].path, models=paths)
    toks = {m: _load(sources[m].path, m, trust_remote_code) for m in models}
    vocabs = {m: _model_vocab(toks[m], sources[m]) for m in models}
    tokens_cfg = dict(settings.tokens or {}) if settings is not None else {}
    pad_to = settings.pad_to_multiple_of if settings is not None else None

    copy_from: Path | None
    if source == "base":
        out_tok, copy_from = toks[donor], sources[donor].path
    elif source == "union":
        out_tok, copy_from = _union(donor, models, toks, vocabs, trust_remote_code), sources[donor].path
        if len(out_tok) != len(toks[donor]):
            copy_from = None
    else:
        path = sources[source].path if source in sources else resolve_model_path(source)
        out_tok, copy_from = (toks[source] if source in toks else _load(path, source, trust_remote_code)), path
    new_tokens = [t for t in tokens_cfg if t not in out_tok.get_vocab()]
    if new_tokens:
        out_tok = _copy_of(out_tok, trust_remote_code)
        out_tok.add_tokens(new_tokens)
        copy_from = None

    vocab = out_tok.get_vocab()
    num_tokens = max(len(vocab), max(vocab.values()) + 1)
    size = num_tokens if not pad_to else -(-num_tokens // pad_to) * pad_to
    rows = {}
    for m in models:
        r = torch.full((num_tokens,), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old_id = vocabs[m].get(token)
            if old_id is not None:
                r[new_id] = old_id
        rows[m] = r
    defaults = {vocab[t]: _token_default(t, c, toks, sources) for t, c in tokens_cfg.items()}
    alignment = VocabAlignment(size, num_tokens, rows, donor if config.base_model else None, defaults)
    if not defaults and all(_is_identity(rows[m], sources[m], size) for m in models):
        return OutputTokenizer(copy_from, None if copy_from else out_tok, None, paths)
    return OutputTokenizer(copy_from, None if copy_from else out_tok, alignment, paths)


def _is_identity(rows: torch.Tensor, source: ModelSource, size: int) -> bool:
    n = _embedding_rows(source)
    return n == size == rows.numel() and bool((rows == torch.arange(size)).all())


def _embedding_rows(source: ModelSource) -> int | None:
    for name in source.tensor_names():
        if name.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight")):
            return source.meta(name)[0][0]
    return None


def _load(path: Path, name: str, trust_remote_code: bool) -> Any:
    return load_tokenizer(path, name, trust_remote_code)  # one loader, one set of messages (io/preflight.py)


def _copy_of(tok, trust_remote_code: bool):
    """A fresh tokenizer equal to `tok` (add_tokens must not change the one loaded for a model)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)


def _model_vocab(tok, source: ModelSource) -> dict[str, int]:
    """token -> row of the model, without tokens beyond the model's vocab_size (no embedding row)."""
    limit = source.config.get("vocab_size") or len(tok)
    return {t: i for t, i in tok.get_vocab().items() if i < limit}


def _union(donor: str, models: list[str], toks: Mapping[str, Any], vocabs: Mapping[str, dict[str, int]],
           trust_remote_code: bool):
    """The donor's tokenizer plus the tokens of the other models it lacks (mergekit's build_union_tokenizer):
    ordinary tokens first, by model then by id (mergekit takes them in hash order, which changes from run
    to run), then added tokens with their settings from the first model that has them."""
    base_vocab = toks[donor].get_vocab()
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m in [donor] + [x for x in models if x != donor]:
        added_here = {info.content: info for info in toks[m].added_tokens_decoder.values()
                      if info.content in vocabs[m]}
        for token in sorted(vocabs[m], key=vocabs[m].__getitem__):
            if token not in added_here and token not in added:
                ordinary.setdefault(token, None)
        for token, info in added_here.items():
            added.setdefault(token, info)
    new_ordinary = [t for t in ordinary if t not in base_vocab and t not in added]
    new_added = [info for t, info in added.items() if t not in base_vocab]
    if not new_ordinary and not new_added:
        return toks[donor]
    out = _copy_of(toks[donor], trust_remote_code)
    for token in new_ordinary:
        out.add_tokens(token)
    for info in new_added:
        out.add_tokens(info)
    return out


def _token_default(token: str, cfg, toks: Mapping[str, Any], sources: Mapping[str, ModelSource]) -> TokenDefault:
    src = cfg.source
    if src is None or isinstance(src, ZeroTokenSource):
        return TokenDefault("zero", force=cfg.force)
    if isinstance(src, ModelTokenSource):
        if src.model not in sources:
            raise TokenizerError(f"tokenizer.tokens.{token}.source.model: {src.model!r} is not one of the "
                                 f"recipe's models")
        row = src.token_id
        if row is None:
            row = toks[src.model].get_vocab().get(src.token)
            if row is None:
                raise TokenizerError(f"tokenizer.tokens.{token}.source.token: {src.token!r} is not in the "
                                     f"vocabulary of {src.model!r}")
        return TokenDefault("model_token", src.model, row, cfg.force)
    if src not in sources:
        raise TokenizerError(f"tokenizer.tokens.{token}.source: {src!r} is not one of the recipe's models")
    return TokenDefault("model", src, None, cfg.force)


# ---------------------------------------------------------------- writing
def write_tokenizer(out: Path, plan: OutputTokenizer, chat_template: str | None) -> None:
    """Copy (or save) the output tokenizer into `out`, then set the chat template if one is given."""
    if plan.tokenizer is not None:  # an extended vocabulary
        plan.tokenizer.save_pretrained(str(out))
    elif plan.copy_from is not None and _copyable(plan.copy_from):
        for name in TOKENIZER_FILES:
            if (plan.copy_from / name).is_file():
                shutil.copyfile(plan.copy_from / name, out / name)
    elif plan.copy_from is not None:  # no tokenizer_config.json next to the vocabulary: load and save (as mergekit)
        _load(plan.copy_from, str(plan.copy_from), False).save_pretrained(str(out))
    template = _chosen_template(chat_template, plan.models)
    if template is not None and template != (_read_template(out) or "").strip():
        set_chat_template(out, template)


def _copyable(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() and any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))


def _chosen_template(chat_template: str | None, models: Sequence[Path]) -> str | None:
    """The template to write: None keeps the copied one; `auto` takes the most common template of the
    input models (mergekit), a built-in name or a Jinja string (io/artifacts.py)."""
    from .io.artifacts import resolve_chat_template

    if chat_template != "auto":
        return resolve_chat_template(chat_template)
    templates = [t.strip() for t in (_read_template(p) for p in models) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def _read_template(path: Path) -> str | None:
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text()
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(value, list):  # named templates
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        return value if isinstance(value, str) else None
    return None


def set_chat_template(out: Path, template: str) -> None:
    """Replace only the template: chat_template.jinja, or the tokenizer_config.json field that holds it."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if "chat_template" in cfg and not (out / CHAT_TEMPLATE_FILE).is_file():
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    else:
        (out / CHAT_TEMPLATE_FILE).write_text(template)
