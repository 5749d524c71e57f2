"""mergekit-extract-lora's engine: a fine-tune's weight deltas as a PEFT LoRA adapter on its base.

Per module, the delta D = W_ft - W_base (float32; an embedding's (vocab, dim) transposed to (dim, vocab),
the layout of peft's lora_embedding) is factored by truncated SVD:

    D = U diag(s) Vh                     U: (out, k), s: (k,) descending, Vh: (k, in), k = min(out, in)
    r = min(max_rank, k, #{s > sv_epsilon})       (the epsilon only when > 0)
    A = diag(sqrt s_r) Vh_r  (r, in),  B = U_r diag(sqrt s_r)  (out, r)    distribute_scale (default)
    A = diag(s_r) Vh_r,                B = U_r                              --no-distribute-scale
    kept energy = sum(s_r^2) / sum(s^2) = 1 - ||D - B A||_F^2 / ||D||_F^2   (Eckart-Young)

peft adds (lora_alpha / r) B A with lora_alpha = r for every module (r, alpha_pattern), i.e. exactly B A.

Which module becomes what follows mergekit 0.1.5 (scripts/extract_lora.py), walking the fine-tune's
module tree (built on the meta device, no weights):

- input / output embeddings and every nn.Embedding: saved at full rank (modules_to_save), unless
  ``embed_lora`` (then decomposed; forced off when the vocabularies differ) or an exclude regex matches;
- a module named by ``modules_to_save`` (full name or last component): the fine-tune's weight and bias;
- else, unless include/exclude regexes leave it out: nn.Linear -> lora_A/lora_B, nn.Embedding ->
  lora_embedding_A/B, a bias -> its delta as lora_B.bias; any other module with a weight (norms, GPT-2's
  Conv1D, convolutions) is undecomposable: saved at full rank, or left out with ``skip_undecomposable``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from . import interrupts
from .errors import MergeError, PlanError
from .io.loader import ModelSource
from .io.writer import TensorSink

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
Kind = Literal["lora", "lora_embedding", "save", "skip", "exclude"]


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options that shape the adapter (the CLI flags of the same names)."""

    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    include_regexes: tuple[str, ...] = ()
    exclude_regexes: tuple[str, ...] = ()
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.max_rank < 1:
            out.append(f"--max-rank {self.max_rank}: must be at least 1")
        if not math.isfinite(self.sv_epsilon) or self.sv_epsilon < 0:
            out.append(f"--sv-epsilon {self.sv_epsilon}: must be a finite number >= 0")
        for flag, patterns in (("--include-regex", self.include_regexes), ("--exclude-regex", self.exclude_regexes)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    out.append(f"{flag} {p!r}: not a valid regular expression ({e})")
        return out


# --- the module tree --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the model that has a weight: what kind, and whether it is an embedding."""

    name: str
    kind: Literal["linear", "embedding", "other"]
    type_name: str
    input_embedding: bool = False
    output_embedding: bool = False
    tied_to_input: bool = False  # an output head sharing the input embedding's weight


def module_tree(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> list[ModuleInfo]:
    """The modules with a weight, in the model's order, from its class built on the meta device
    (mergekit's _make_dummy_model: the architecture's class by name, else AutoModelForCausalLM)."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        try:
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, ImportError, KeyError, TypeError) as e:
            raise PlanError(f"cannot build the module tree of a {config.model_type!r} model ({arch}) with "
                            f"transformers {transformers.__version__}: {e}") from None
    embed_in = model.get_input_embeddings()
    embed_out = model.get_output_embeddings()
    infos = []
    for name, module in model.named_modules():
        if not name or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        kind: Literal["linear", "embedding", "other"] = (
            "embedding" if isinstance(module, nn.Embedding) else "linear" if type(module) is nn.Linear
            or isinstance(module, nn.Linear) else "other")
        tied = module is embed_out and embed_in is not None and module.weight is embed_in.weight
        infos.append(ModuleInfo(name, kind, type(module).__name__, module is embed_in, module is embed_out, tied))
    return infos


# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleJob:
    """What happens to one module: decomposed (lora, lora_embedding), saved at full rank (save), or left
    out of the adapter (skip: undecomposable with --skip-undecomposable; exclude: by the regexes)."""

    module: str
    kind: Kind
    weight: str | None            # the fine-tune's tensor (the input embedding's for a tied head)
    base_weight: str | None       # the base's tensor, for decomposed modules
    shape: tuple[int, ...]
    bias: str | None = None       # a bias saved (save) or whose delta is saved (lora)
    why: str = ""

    def describe(self) -> str:
        src = (self.weight or "-") + (f" - base {self.base_weight}" if self.base_weight else "")
        extra = (f" + bias {self.bias}" if self.bias else "") + (f"  ({self.why})" if self.why else "")
        return f"{self.module:<48} {self.kind:<15} {list(self.shape)!s:<14} {src}{extra}"


@dataclass(frozen=True)
class ExtractPlan:
    jobs: tuple[ModuleJob, ...]
    modules_to_save: tuple[str, ...]   # adapter_config's, in mergekit's order (the user's, then those added)
    embed_lora: bool                   # after the vocabulary check
    unused_tensors: tuple[str, ...]    # fine-tune tensors no job reads (deltas the adapter cannot carry)
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        head = (f"# {len(self.jobs)} modules: " + ", ".join(
            f"{sum(j.kind == k for j in self.jobs)} {k}" for k in ("lora", "lora_embedding", "save", "skip", "exclude")
            if any(j.kind == k for j in self.jobs)))
        return "\n".join([head, *(j.describe() for j in self.jobs)])


def plan_extraction(modules: Sequence[ModuleInfo], model: ModelSource, base: ModelSource,
                    options: ExtractOptions) -> ExtractPlan:
    """Every module's job, checked against both checkpoints before any tensor is read; every problem
    (a tensor missing from the base, different shapes) is reported together in one PlanError."""
    warnings: list[str] = []
    embed_in = next((m for m in modules if m.input_embedding), None)
    embed_in_weight = f"{embed_in.name}.weight" if embed_in else None
    embed_lora = options.embed_lora
    if embed_lora and embed_in_weight and model.has(embed_in_weight) and base.has(embed_in_weight):
        ft_vocab, base_vocab = model.meta(embed_in_weight)[0][0], base.meta(embed_in_weight)[0][0]
        if ft_vocab != base_vocab:
            warnings.append(f"vocabulary sizes differ (fine-tune {ft_vocab} tokens, base {base_vocab}): embeddings "
                            "are saved at full rank (modules_to_save), --embed-lora ignored, as mergekit does")
            embed_lora = False

    def tensor(source: ModelSource, m: ModuleInfo) -> str | None:
        name = f"{m.name}.weight"
        if source.has(name):
            return name
        if m.tied_to_input and embed_in_weight and source.has(embed_in_weight):
            return embed_in_weight  # a tied head is the input embedding (mergekit's tied_names)
        return None

    def matches(patterns: Sequence[str], name: str) -> bool:
        return any(re.search(p, name) for p in patterns)

    to_save = list(options.modules_to_save)
    jobs: list[ModuleJob] = []
    problems: list[str] = []
    for m in modules:
        weight = tensor(model, m)
        if weight is None:
            log.info("%s (%s) has no weight in the fine-tune's checkpoint; left out", m.name, m.type_name)
            continue
        bias = f"{m.name}.bias" if model.has(f"{m.name}.bias") else None
        key = m.name.rsplit(".", 1)[-1]
        shape = tuple(model.meta(weight)[0])
        is_embedding = m.input_embedding or m.output_embedding or m.kind == "embedding"
        if not embed_lora and is_embedding and not matches(options.exclude_regexes, m.name) and key not in to_save:
            to_save.append(key)  # mergekit: "Adding {key} to modules_to_save"
        if m.name in to_save or key in to_save:
            jobs.append(ModuleJob(m.name, "save", weight, None, shape, bias, "modules_to_save"))
            continue
        if (options.include_regexes and not matches(options.include_regexes, m.name)) or \
                matches(options.exclude_regexes, m.name):
            jobs.append(ModuleJob(m.name, "exclude", None, None, shape, None, "include/exclude regexes"))
            continue
        if m.kind == "other" or len(shape) != 2:
            why = f"undecomposable {m.type_name}"
            if options.skip_undecomposable:
                jobs.append(ModuleJob(m.name, "skip", None, None, shape, None, why))
                continue
            if key not in to_save:
                to_save.append(key)
                warnings.append(f"{key}: {why}, saved at full rank (modules_to_save); --skip-undecomposable "
                                "leaves such modules out")
            jobs.append(ModuleJob(m.name, "save", weight, None, shape, bias, why))
            continue
        base_weight = tensor(base, m)
        if base_weight is None:
            problems.append(f"{m.name}: the base model has no {m.name}.weight")
            continue
        base_shape = tuple(base.meta(base_weight)[0])
        if base_shape != shape:
            problems.append(f"{m.name}: fine-tune {weight} is {list(shape)}, base {base_weight} is {list(base_shape)}")
            continue
        if bias is not None:
            if not base.has(bias):
                problems.append(f"{m.name}: the base model has no {bias}")
            elif tuple(base.meta(bias)[0]) != tuple(model.meta(bias)[0]):
                problems.append(f"{m.name}: bias shapes differ, fine-tune {list(model.meta(bias)[0])}, "
                                f"base {list(base.meta(bias)[0])}")
        kind: Kind = "lora_embedding" if m.kind == "embedding" else "lora"
        jobs.append(ModuleJob(m.name, kind, weight, base_weight, shape, bias))
    if problems:
        raise PlanError(f"the fine-tune {model.name!r} does not fit the base {base.name!r} ({len(problems)} "
                        "problem(s)): " + "; ".join(problems) + ". Is the base the model this one was fine-tuned "
                        "from? (Vocabulary size differences are allowed only for embeddings not decomposed)")
    read = {t for j in jobs for t in (j.weight, j.bias) if t}
    unused = tuple(n for n in model.tensor_names() if n not in read and not any(
        n in (f"{j.module}.weight", f"{j.module}.bias") for j in jobs if j.kind in ("skip", "exclude")))
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        warnings.append(f"{len(unused)} tensor(s) of the fine-tune belong to no module weight or bias and are not in "
                        f"the adapter (as in mergekit): {shown}")
    for name in options.modules_to_save:
        if not any(j.module == name or j.module.rsplit(".", 1)[-1] == name for j in jobs):
            warnings.append(f"--save-module {name}: no module of the model has that name or last component")
    return ExtractPlan(tuple(jobs), tuple(to_save), embed_lora, unused, tuple(warnings))


# --- the decomposition ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    a: torch.Tensor       # (r, in)
    b: torch.Tensor       # (out, r)
    rank: int
    energy: float         # sum of all s^2 = ||D||_F^2
    kept: float           # sum of the kept s^2


def decompose(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0,
              distribute_scale: bool = True) -> LowRank:
    """Truncated SVD of a 2-D delta (out, in) into B (out, r) @ A (r, in); float32 in and out."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(rank, int((s > sv_epsilon).sum().item()))
    s_r = s[:rank]
    if distribute_scale:
        root = s_r.sqrt()
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    else:
        a, b = s_r[:, None] * vh[:rank], u[:, :rank]
    energy = s.double().square().sum().item()
    return LowRank(a, b, rank, energy, s_r.double().square().sum().item())


# --- running it -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleReport:
    module: str
    kind: Kind
    shape: tuple[int, ...]
    rank: int | None = None           # decomposed modules
    energy: float | None = None       # ||delta||_F^2
    kept: float | None = None         # kept part of it

    @property
    def kept_fraction(self) -> float | None:
        if self.energy is None or self.kept is None:
            return None
        return 1.0 if self.energy == 0 else self.kept / self.energy

    def to_json(self) -> dict:
        return {"module": self.module, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
                "delta_energy": self.energy, "kept_energy": self.kept, "kept_fraction": self.kept_fraction}


def run_extraction(plan: ExtractPlan, model: ModelSource, base: ModelSource, sink: TensorSink,
                   options: ExtractOptions, device: str = "cpu", progress: bool = True) -> list[ModuleReport]:
    """Read, subtract, decompose and write one module at a time, in plan order."""
    reports = []
    with interrupts.deferred():  # Ctrl-C / SIGTERM land between modules
        for job in tqdm(plan.jobs, desc="extracting", unit="module", disable=not progress):
            interrupts.check()
            reports.append(_run_job(job, model, base, sink, options, device))
    return reports


def _run_job(job: ModuleJob, model: ModelSource, base: ModelSource, sink: TensorSink, options: ExtractOptions,
             device: str) -> ModuleReport:
    if job.kind in ("skip", "exclude"):
        return ModuleReport(job.module, job.kind, job.shape)
    assert job.weight is not None  # decomposed and saved jobs read the fine-tune's weight
    if job.kind == "save":
        sink.write(f"{PREFIX}{job.module}.weight", model.get(job.weight))
        if job.bias:
            sink.write(f"{PREFIX}{job.module}.bias", model.get(job.bias))
        return ModuleReport(job.module, job.kind, job.shape)
    assert job.base_weight is not None
    ft = model.get(job.weight)
    delta = ft.to(device, torch.float32) - base.get(job.base_weight).to(device, torch.float32)
    if not torch.isfinite(delta).all():
        raise MergeError(f"{job.module}: the delta {job.weight} (fine-tune - base) has NaN or inf entries; "
                         "check both checkpoints")
    embedding = job.kind == "lora_embedding"
    low = decompose(delta.T if embedding else delta, options.max_rank, options.sv_epsilon,
                    options.distribute_scale)
    del delta
    if low.rank > 0:
        part = "lora_embedding" if embedding else "lora"
        suffix = "" if embedding else ".weight"
        sink.write(f"{PREFIX}{job.module}.{part}_A{suffix}", low.a.to("cpu", ft.dtype).contiguous())
        sink.write(f"{PREFIX}{job.module}.{part}_B{suffix}", low.b.to("cpu", ft.dtype).contiguous())
        if job.bias:
            ft_bias = model.get(job.bias)
            bias_delta = ft_bias.float() - base.get(job.bias).float()
            sink.write(f"{PREFIX}{job.module}.lora_B.bias", bias_delta.to(ft_bias.dtype))
    return ModuleReport(job.module, job.kind, job.shape, low.rank, low.energy, low.kept)


def adapter_config(plan: ExtractPlan, reports: Sequence[ModuleReport], base_model: str) -> dict:
    """adapter_config.json as mergekit writes it: r = lora_alpha = the largest rank, rank_pattern and
    alpha_pattern equal for every other module (so each module's scale alpha / r is 1); lora_bias when a
    bias delta was written (mergekit writes the tensors without it, and peft then drops them)."""
    ranks = {r.module: r.rank for r in reports if r.rank}
    if not ranks:
        raise MergeError("no module has a delta to decompose (every singular value is at or below --sv-epsilon, "
                         "or the regexes and --save-module leave nothing); lower --sv-epsilon or check the regexes")
    top = max(ranks.values())
    other = {k: v for k, v in ranks.items() if v != top}
    config = {
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in ranks}),
        "modules_to_save": list(plan.modules_to_save),
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if any(j.bias and j.kind in ("lora", "lora_embedding") and ranks.get(j.module) for j in plan.jobs):
        config["lora_bias"] = True
    return config


def energy_summary(reports: Sequence[ModuleReport]) -> dict:
    decomposed = [r for r in reports if r.energy is not None]
    energy = sum(r.energy or 0.0 for r in decomposed)
    kept = sum(r.kept or 0.0 for r in decomposed)
    return {"decomposed_modules": len(decomposed),
            "saved_modules": sum(r.kind == "save" for r in reports),
            "left_out_modules": sum(r.kind in ("skip", "exclude") for r in reports),
            "delta_energy": energy, "kept_energy": kept, "kept_fraction": 1.0 if energy == 0 else kept / energy,
            "min_kept_fraction": min((r.kept_fraction for r in decomposed if r.kept_fraction is not None),
                                     default=None)}


def report_table(reports: Sequence[ModuleReport]) -> str:
    """One line per module: kind, shape, rank and the kept fraction of the delta's energy."""
    lines = [f"{'module':<48} {'kind':<15} {'shape':<14} {'rank':>5} {'kept energy':>12}"]
    for r in reports:
        frac = r.kept_fraction
        kept = f"{100 * frac:11.2f}%" if frac is not None else {"save": "full", "skip": "skipped",
                                                                 "exclude": "excluded"}.get(r.kind, "-")
        lines.append(f"{r.module:<48} {r.kind:<15} {str(list(r.shape)):<14} "
                     f"{r.rank if r.rank is not None else '-':>5} {kept:>12}")
    s = energy_summary(reports)
    lines.append(f"total: {s['decomposed_modules']} decomposed modules keep {100 * s['kept_fraction']:.2f}% of the "
                 f"delta energy (lowest module {100 * (s['min_kept_fraction'] or 1.0):.2f}%); {s['saved_modules']} "
                 f"saved at full rank, {s['left_out_modules']} left out")
    return "\n".join(lines)
