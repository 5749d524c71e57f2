"""mergekit-tokensurgeon: give MODEL the DONOR's tokenizer.

Stages: open both models and tokenizers -> plan (which matrices, the row assignment of each, every check)
-> build the new embedding / head matrices (the only tensors held in memory) -> write the model directory
atomically (io/output.py), every other tensor copied from MODEL one at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import interrupts
from ..architecture import detect_architecture, head_bias_name
from ..dtypes import BY_NAME
from ..errors import EngineError, ModelLoadError
from ..io.loader import ModelSource
from ..io.output import check_collisions, check_output, check_space, output_directory
from ..io.preflight import TOKENIZER_FILES
from ..io.references import open_model
from ..io.surgeon_files import model_card, output_config, output_names, read_json_or_none, write_outputs
from ..io.writer import ShardedSafetensorsWriter, TensorLayout
from ..options import MergeOptions
from .approximate import SHARED_BASIS, Approximation, Method, approximate
from .vocab import RowAssignment, Token, assign_rows, normalized_vocabulary, shared_tokens

log = logging.getLogger(__name__)
MATCH_CHOICES = ("no", "yes", "embed", "lm_head")  # -pm / -bm: which matrices may use the match


class SurgeryError(EngineError):
    """The models cannot be operated on as asked (no embedding, too few shared tokens, ...)."""


@dataclass(frozen=True)
class SurgeryOptions:
    approximation: Approximation = Approximation()
    batch_size: int | None = 512  # new tokens per approximation batch; None or <= 0: all at once
    prefix_match: str = "no"
    byte_match: str = "no"
    seed: int = 0  # randn, john_hewitt, --new-vocab-noise


@dataclass
class Matrix:
    """One vocabulary-indexed matrix of the output: the model's tensor, the donor's, and its rows."""

    name: str  # the model's tensor (and the output's)
    donor_name: str
    is_head: bool
    rows: RowAssignment
    shared_model: list[int]  # the basis of the approximation: shared tokens' rows in the model ...
    shared_donor: list[int]  # ... and in the donor


def _tokenizer(source: ModelSource, role: str, trust_remote_code: bool):
    """The model's transformers tokenizer; ModelLoadError naming MODEL or DONOR when it is missing or fails."""
    if not any((source.path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{role} {source.name!r}: no tokenizer files in {source.path} (expected one of "
                             f"{', '.join(TOKENIZER_FILES)}); tokensurgeon needs the tokenizers of both models")
    tok_config = read_json_or_none(source.path / "tokenizer_config.json")
    if not trust_remote_code and isinstance(tok_config, dict) and tok_config.get("auto_map"):
        raise ModelLoadError(f"{role} {source.name!r}: its tokenizer runs code shipped with the model (auto_map "
                             "in tokenizer_config.json); pass --trust-remote-code if you trust it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any load failure, reported with the model named
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{role} {source.name!r}: the tokenizer in {source.path} does not load: {first}") from None


def _matrix_names(source: ModelSource, role: str) -> tuple[str, str | None]:
    """(input embedding, output head or None when tied) of a model."""
    arch = detect_architecture(source.config, source.tensor_names(), source.name)
    if arch.embedding_name is None or not source.has(arch.embedding_name):
        raise SurgeryError(f"{role} {source.name!r}: no input embedding tensor found (model_type "
                           f"{arch.model_type!r}); tokensurgeon needs one")
    for name in (arch.embedding_name, arch.head_name):
        if source.has(name) and len(source.meta(name)[0]) != 2:
            raise SurgeryError(f"{role} {source.name!r}: {name} has shape {source.meta(name)[0]}, not "
                               "[vocabulary, hidden]")
    return arch.embedding_name, arch.head_name if source.has(arch.head_name) else None


def plan_surgery(model: ModelSource, donor: ModelSource, model_vocab: dict[Token, int],
                 donor_vocab: dict[Token, int], size: int, options: SurgeryOptions) -> list[Matrix]:
    """The matrices to rebuild and where each row comes from; SurgeryError for anything that would fail."""
    embed, head = _matrix_names(model, "MODEL")
    donor_embed, donor_head = _matrix_names(donor, "DONOR")
    wanted = [(embed, donor_embed, False)]
    if head is not None:  # an untied head; a tied donor's head is its embedding (mergekit's tied_names)
        wanted.append((head, donor_head or donor_embed, True))
    approx = options.approximation
    out = []
    for name, donor_name, is_head in wanted:
        which = "lm_head" if is_head else "embed"
        model_rows, donor_rows = model.meta(name)[0][0], donor.meta(donor_name)[0][0]
        rows = assign_rows(model_vocab, donor_vocab, size, model_rows, donor_rows,
                           allow_byte=options.byte_match in ("yes", which),
                           allow_prefix=options.prefix_match in ("yes", which))
        shared_m, shared_d = shared_tokens(model_vocab, donor_vocab, model_rows, donor_rows)
        if rows.approximate and approx.method in SHARED_BASIS:
            if approx.k < 1:
                raise SurgeryError(f"-k {approx.k}: must be at least 1")
            if len(shared_d) < approx.k:
                raise SurgeryError(f"-a {approx.method.value} -k {approx.k}: MODEL and DONOR share only "
                                   f"{len(shared_d)} tokens (with rows in {name}); pass -k {len(shared_d)} or "
                                   "less, or a method that needs no shared tokens (-a mean)")
            width = donor.meta(donor_name)[0][1]
            if approx.method == Method.OMP and approx.k > width:
                raise SurgeryError(f"-a omp -k {approx.k}: DONOR's {donor_name} has only {width} dimensions, and "
                                   "orthogonal matching pursuit cannot use more atoms than dimensions (the fit "
                                   f"becomes singular); pass -k {width} or less")
        out.append(Matrix(name, donor_name, is_head, rows, shared_m, shared_d))
        log.info("%s: %d rows: %s", name, size, rows.describe())
    return out


def build_matrix(m: Matrix, model: ModelSource, donor: ModelSource, options: SurgeryOptions,
                 device: str, generator: torch.Generator) -> torch.Tensor:
    """The new [size, hidden] matrix: copied rows exact, approximated rows in batches, the rest zero."""
    old = model.get(m.name).to(device)
    new = old.new_zeros((m.rows.size, old.shape[1]))
    if m.rows.copy:
        dst, src = zip(*m.rows.copy.items(), strict=True)
        new[torch.tensor(dst, device=device)] = old[torch.tensor(src, device=device)]
    todo = m.rows.approximate
    if todo:
        donor_rows = donor.get(m.donor_name).to(device)
        donor_shared = donor_rows[torch.tensor(m.shared_donor, dtype=torch.long, device=device)]
        model_shared = old[torch.tensor(m.shared_model, dtype=torch.long, device=device)]
        batch = options.batch_size if options.batch_size and options.batch_size > 0 else len(todo)
        for start in range(0, len(todo), batch):
            ids = torch.tensor(todo[start:start + batch], device=device)
            new[ids] = approximate(options.approximation, donor_rows[ids], donor_shared, model_shared, old,
                                   generator)
    return new.cpu()


def run_tokensurgeon(model_ref: str, donor_ref: str, out_path: str | Path, options: SurgeryOptions,
                     merge: MergeOptions | None = None) -> Path:
    """Write MODEL with DONOR's tokenizer to out_path; nothing is written when anything fails."""
    merge = merge or MergeOptions()
    opened = {ref: open_model(ref, allow_pickle=merge.allow_pickle, cache_dir=merge.transformers_cache,
                              lora_dtype=merge.lora_merge_dtype, lora_merge_cache=merge.lora_merge_cache)
              for ref in dict.fromkeys((model_ref, donor_ref))}
    model, donor = opened[model_ref], opened[donor_ref]
    target = check_output(out_path, inputs=[model.path, donor.path], write_into_existing=merge.write_into_existing)
    model_tok = _tokenizer(model, "MODEL", merge.trust_remote_code)
    donor_tok = _tokenizer(donor, "DONOR", merge.trust_remote_code)
    raw = donor_tok.get_vocab()
    size = max(len(raw), max(raw.values()) + 1)
    model_vocab, donor_vocab = normalized_vocabulary(model_tok), normalized_vocabulary(donor_tok)
    matrices = plan_surgery(model, donor, model_vocab, donor_vocab, size, options)
    names = model.tensor_names()
    bias = {head_bias_name(m.name): m for m in matrices if m.is_head}
    layouts = []
    for name in names:
        shape, dtype = model.meta(name)
        if dtype not in BY_NAME:
            raise SurgeryError(f"MODEL {model_ref!r}: tensor {name} has dtype {dtype}, which evomerge cannot write")
        rows_changed = name in bias or any(m.name == name for m in matrices)
        layouts.append(TensorLayout(name, (size, *shape[1:]) if rows_changed else tuple(shape), BY_NAME[dtype]))
    check_collisions(target, output_names(donor.path))
    needed = sum(t.nbytes for t in layouts) + (1 << 20)
    check_space(target, needed)

    generator = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        built = {m.name: build_matrix(m, model, donor, options, merge.device, generator) for m in matrices}
    summary = "; ".join(f"`{m.name}`: {m.rows.describe()}" for m in matrices)
    approx = options.approximation
    summary = (f"Vocabulary: {size} rows. Method `{approx.method.value}`"
               + (f" (k={approx.k})" if approx.method in SHARED_BASIS else "") + f". {summary}.")
    config = output_config(model.config, donor.config, size)
    with output_directory(target, needed) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layouts, merge.out_shard_size)
        try:
            with interrupts.deferred():
                for name in tqdm(names, desc="writing", unit="tensor", disable=not merge.progress):
                    interrupts.check()
                    if name in built:
                        tensor = built.pop(name)
                    elif name in bias:
                        tensor = _remap_rows(model.get(name), bias[name].rows)
                    else:
                        tensor = model.get(name)
                    writer.write(name, tensor)
                    del tensor
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        write_outputs(tmp, model.path, donor.path, config,
                      model_card(model_ref, donor_ref, summary) if merge.write_model_card else None)
    log.info("%s", summary)
    return Path(out_path)


def _remap_rows(old: torch.Tensor, rows: RowAssignment) -> torch.Tensor:
    """A vocabulary-indexed auxiliary tensor (a head bias): the model's value for kept tokens, zero for new."""
    new = old.new_zeros((rows.size, *old.shape[1:]))
    for dst, src in rows.copy.items():
        new[dst] = old[src]
    return new
