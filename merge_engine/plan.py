"""Recipe -> plan: a pure, printable list of per-tensor jobs.

Each :class:`TensorJob` says which tensors of which models go into one output tensor,
with every parameter already resolved (precedence, filters, gradients). Executing a
plan needs nothing else from the recipe. :func:`build_plan` takes these steps, in the
order mergekit 0.1.5's planner does (``mergekit/plan.py``):

1. the recipe's output slices, each source's layer range resolved (``models:`` recipes
   span every layer of each model);
2. the reference model (the base model, else the first source) and its architecture;
   every model must be of the same type unless ``allow_crimes``;
3. the output tensors, in order: the pre-layer tensors (embeddings) from the first
   slice's models at gradient position t = 0, each slice's layers (t from 0 at its first
   layer to 1 at its last), then the post-layer tensors (final norm, output head) from
   the last slice's models, also at t = 0 as mergekit does. Each output tensor is the
   union of what its models hold: a tensor one model has and another lacks is an error
   naming both, never silently dropped (a missing output head of a tied model reads its
   embedding, as mergekit's ``tied_names``);
4. one job per output tensor: shapes and dtypes checked, parameters resolved.

The model is planned module by module, as mergekit 0.1.5 does (:func:`_plan_module`): a plain model is
one module; a vision-language model's text decoder, vision tower and projector are three, each with its own
layers, gradient positions and (in a ``modules:`` recipe) its own models or slices.

Everything that can be checked without reading a tensor is checked here, so a bad
recipe fails before the first tensor is read.
"""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .architecture import DEFAULT_MODULE, Architecture, LayerName, config_value, detect_architecture, parse_layer_name
from .config import MergeConfig, SliceView, SourceView
from .dtypes import ARITHMETIC, BY_NAME, COPYABLE, dtype_name
from .errors import PlanError
from .io.loader import ModelSource
from .methods import MethodSpec
from .params import resolve_param

if TYPE_CHECKING:  # helper "compat"'s vocabulary alignment (merge_engine/tokenizer.py)
    from .tokenizer import VocabAlignment


@dataclass(frozen=True)
class TensorRef:
    model: str
    name: str  # the tensor read (a tied model's embedding where the plan asks for its head)


@dataclass(frozen=True)
class TensorJob:
    output_name: str
    method: MethodSpec
    inputs: tuple[TensorRef, ...]  # one per merged model (the base excluded for base-using methods)
    base: TensorRef | None
    global_params: dict[str, Any]
    per_model_params: tuple[dict[str, Any], ...]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    input_dtype: torch.dtype | None = None  # recipe `dtype:`: every input is rounded to it before the arithmetic
    seed: int | None = None
    vocab: VocabAlignment | None = None  # embedding / head: rows mapped to the output vocabulary on read

    @property
    def copies_input(self) -> bool:
        """The output is the one input tensor as stored, only cast to out_dtype (passthrough at scale 1):
        a resident copy of the input can stand in for it."""
        return (self.method.name == "passthrough" and self.vocab is None and self.input_dtype is None
                and all(p.get("scale", 1.0) == 1.0 for p in self.per_model_params))

    def describe(self) -> str:
        srcs = ", ".join(f"{r.model}:{r.name}" for r in self.inputs)
        base = f" base={self.base.model}:{self.base.name}" if self.base else ""
        per_model = f" {list(self.per_model_params)}" if any(self.per_model_params) else ""
        return (f"{self.output_name} {list(self.shape)} {dtype_name(self.out_dtype)} <- "
                f"{self.method.name}({srcs}){base} {self.global_params}{per_model}")


@dataclass(frozen=True)
class MergePlan:
    jobs: tuple[TensorJob, ...]
    reference_model: str
    architecture: Architecture
    out_dtype: torch.dtype  # of every floating-point output tensor
    # per layer stack, text decoder first: (config key of its layer count, for each output layer the reference
    # layer it came from)
    layer_sources: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def output_layer_sources(self) -> tuple[int, ...]:
        """The text decoder's (a plain model's) output layers, each as the reference layer it came from."""
        return dict(self.layer_sources)[self.architecture.num_layers_key]

    @property
    def num_output_layers(self) -> int:
        return len(self.output_layer_sources)

    def describe(self) -> str:
        towers = self.architecture.towers
        counts = dict(self.layer_sources)
        layers = (" + ".join(f"{len(counts[t.num_layers_key])} {t.name}" for t in towers) + " layers" if towers
                  else f"{self.num_output_layers} layers")
        head = (f"# {len(self.jobs)} tensors, {layers}, {self.architecture.model_type}, "
                f"reference {self.reference_model}, written as {dtype_name(self.out_dtype)}")
        return "\n".join([head] + [j.describe() for j in self.jobs])


@dataclass(frozen=True)
class _Slot:
    """One output tensor before its inputs are checked and its parameters resolved."""

    output_name: str
    t: float  # gradient position
    slice: SliceView
    inputs: tuple[tuple[SourceView, str], ...]  # each source with the name of its input tensor
    base: tuple[str, str] | None  # (base model, tensor name), for methods that take a base


def build_plan(config: MergeConfig, sources: Mapping[str, ModelSource], random_seed: int | None = None,
               allow_crimes: bool = False, vocab: VocabAlignment | None = None) -> MergePlan:
    reference = config.base_model or config.output_slices[0].sources[0].model
    arch = detect_architecture(sources[reference].config, sources[reference].tensor_names(), reference)
    if not allow_crimes:
        _check_same_model_type([sources[m] for m in config.referenced_models()], arch, reference)
    slots: list[_Slot] = []
    layer_sources: dict[str, tuple[int, ...]] = {}
    layers = _LayerIndex(sources)
    for module, module_slices in _modules(config, arch, reference).items():
        stack = arch.layer_stack(module)
        slices = _resolve_layer_ranges(module_slices, sources, module, stack)
        module_slots, module_layers = _plan_module(config.method, module, slices, sources, arch, layers)
        slots += module_slots
        if stack is not None:
            layer_sources[stack[0]] = tuple(module_layers)
    input_dtype = BY_NAME[config.dtype] if config.dtype else None
    out_dtype = _output_dtype(config, sources[reference], reference)
    jobs = tuple(_make_job(config, slot, sources, arch, input_dtype, out_dtype, random_seed, vocab) for slot in slots)
    return MergePlan(jobs, reference, arch, out_dtype, tuple(layer_sources.items()))


# ---- step 1-2: models, modules and slices ------------------------------------------------

def _check_same_model_type(models: list[ModelSource], arch: Architecture, reference: str) -> None:
    for src in models:
        mt = src.config.get("model_type")
        if mt != arch.model_type:
            raise PlanError(f"model {src.name!r} is a {mt!r} model but {reference!r} is {arch.model_type!r}; "
                            "merging different architectures needs --allow-crimes")


def _modules(config: MergeConfig, arch: Architecture, reference: str) -> dict[str, list[SliceView]]:
    """The output slices of each module of the model, in planning order, as mergekit's normalize_config:
    `models:` goes to every module, `slices:` to the one module of a plain model, `modules:` as given
    (every module of the model, nothing else)."""
    slices = config.output_slices
    if config.modules is None:
        if config.slices is not None and len(arch.modules) > 1:
            raise PlanError(_slices_refused(arch, reference))
        return {module: list(slices) for module in arch.modules}
    unknown = [name for name in config.modules if name not in arch.modules]
    missing = [name for name in arch.modules if name not in config.modules]
    problems = [f"modules.{name}: {reference!r} ({arch.model_type!r}) has no module {name!r}"
                f"{_did_you_mean(name, arch.modules)}" for name in unknown]
    if missing:
        problems.append(f"modules: {', '.join(repr(m) for m in missing)} not given (mergekit would leave "
                        f"{'it' if len(missing) == 1 else 'them'} out of the output, a checkpoint that cannot load); "
                        "give every module its `models:` or `slices:`")
    problems += [f"{slc.path}: the {slc.module} has no layer stack for a layer_range to pick from; give it "
                 f"`models:`" for slc in slices if slc.path and slc.module and arch.layer_stack(slc.module) is None]
    if problems:
        raise PlanError("; ".join(problems) + f" (the modules of {reference!r}: {', '.join(arch.modules)})")
    return {module: [slc for slc in slices if slc.module == module] for module in config.modules}


def _did_you_mean(name: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_layer_ranges(slices: list[SliceView], sources: Mapping[str, ModelSource], module: str,
                          stack: tuple[str, int] | None) -> list[SliceView]:
    """Every source with its layer range in the module's layer stack: a `models:` entry spans all of its model's
    layers (none in a module without a stack)."""
    out = []
    for slc in slices:
        resolved = []
        key = stack[0] if stack else ""
        for src in slc.sources:
            n = int(config_value(sources[src.model].config, key) or 0) if key else 0  # type: ignore[call-overload]
            lo, hi = src.layer_range or (0, n)
            if hi > n:
                what = f"{n} layers" if module == DEFAULT_MODULE else f"{n} {module} layers ({key})"
                raise PlanError(f"{src.path}: layer_range [{lo}, {hi}] exceeds the {what} of model {src.model!r}")
            resolved.append(SourceView(src.model, (lo, hi), src.parameters, src.path))
        if len({_span(s)[1] - _span(s)[0] for s in resolved}) > 1:
            spans = ", ".join(f"{s.model} ({_span(s)[1] - _span(s)[0]})" for s in resolved)
            raise PlanError(f"{slc.where}: every model must span the same number of layers, got "
                            f"{spans}; use `slices:` to pick layer ranges")
        out.append(SliceView(tuple(resolved), slc.base_model, slc.parameters, slc.path, slc.module))
    return out


def _span(src: SourceView) -> tuple[int, int]:
    """A source's layer range, once _resolve_layer_ranges has filled it in."""
    if src.layer_range is None:
        raise AssertionError(f"{src.path}: layer range not resolved")
    return src.layer_range


def _slices_refused(arch: Architecture, reference: str) -> str:
    stacks = ", ".join(f"{t.module} {t.prefix}.0..{t.num_layers - 1}" for t in arch.towers)
    return (f"slices: {reference!r} is a vision-language model ({arch.model_type!r}) with {len(arch.towers)} layer "
            f"stacks ({stacks}), and a layer_range cannot say which one it means (mergekit 0.1.5 refuses it too); "
            "give each module its own slices or models under `modules:` (modules: {text_decoder: {slices: ...}, "
            f"...}} with modules {', '.join(arch.modules)}), or use `models:` to merge every tensor of both stacks")


# ---- step 3: output tensors ----------------------------------------------------------

def _plan_module(spec: MethodSpec, module: str, slices: list[SliceView], sources: Mapping[str, ModelSource],
                 arch: Architecture, layers: _LayerIndex) -> tuple[list[_Slot], list[int]]:
    """One module's output tensors in order (mergekit's plan_module), and the reference layer of each of its
    output layers: its tensors before the layers from the first slice's models, each slice's layers (t from 0
    at its first layer to 1 at its last; a module's layers numbered from 0), its tensors after the layers
    from the last slice's models. A plain model is one module of every tensor."""
    slots = _outside_layers(spec, module, slices[0], sources, arch, pre=True)
    layer_sources: list[int] = []
    for slc in slices:
        base_src = next((s for s in slc.sources if s.model == slc.base_model), None)
        length = _span(slc.sources[0])[1] - _span(slc.sources[0])[0]
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            ref_layer = _span(base_src or slc.sources[0])[0] + j
            at = [(s.model, _span(s)[0] + j) for s in slc.sources]
            base = (slc.base_model, ref_layer) if spec.uses_base and slc.base_model else None
            templates = _union([layers.templates(m, i) for m, i in ([base] if base else []) + at])
            for tensor in [ln for ln in templates if arch.module_of(ln.with_index(0)) == module]:
                inputs = tuple((s, tensor.with_index(i)) for s, (_, i) in zip(slc.sources, at, strict=True))
                base_ref = (base[0], tensor.with_index(base[1])) if base else None
                slots.append(_Slot(tensor.with_index(len(layer_sources)), t, slc, inputs, base_ref))
            layer_sources.append(ref_layer)
    slots += _outside_layers(spec, module, slices[-1], sources, arch, pre=False)
    return slots, layer_sources


def _outside_layers(spec: MethodSpec, module: str, slc: SliceView, sources: Mapping[str, ModelSource],
                    arch: Architecture, pre: bool) -> list[_Slot]:
    """A module's tensors outside the layers, before (embeddings) or after them (final norm, head; a
    projector's tensors), from one slice's models, at t = 0."""
    base = slc.base_model if spec.uses_base else None
    models = ([base] if base else []) + [s.model for s in slc.sources]
    names = _union([[n for n in sources[m].tensor_names() if parse_layer_name(n) is None
                     and arch.module_of(n) == module and arch.is_pre_layer(n) == pre] for m in models])
    return [_Slot(n, 0.0, slc, tuple((s, n) for s in slc.sources), (base, n) if base else None) for n in names]


class _LayerIndex:
    """The decoder-layer tensors of each model, per layer, as index-free templates
    (``LayerName(prefix, 0, suffix)``, placed at any layer with ``with_index``)."""

    def __init__(self, sources: Mapping[str, ModelSource]):
        self.sources = sources
        self._index: dict[str, dict[int, list[LayerName]]] = {}

    def templates(self, model: str, layer: int) -> list[LayerName]:
        if model not in self._index:
            by_layer: dict[int, list[LayerName]] = {}
            for n in self.sources[model].tensor_names():
                if (ln := parse_layer_name(n)) is not None:
                    by_layer.setdefault(ln.index, []).append(LayerName(ln.prefix, 0, ln.suffix))
            self._index[model] = by_layer
        return self._index[model].get(layer, [])


def _union(lists: list[list[Any]]) -> list[Any]:
    """Every item of the lists, each once, in first-seen order."""
    return list(dict.fromkeys(item for lst in lists for item in lst))


# ---- step 4: jobs -------------------------------------------------------------------

def _make_job(config: MergeConfig, slot: _Slot, sources: Mapping[str, ModelSource], arch: Architecture,
              input_dtype: torch.dtype | None, out_dtype: torch.dtype, random_seed: int | None,
              vocab: VocabAlignment | None) -> TensorJob:
    spec = config.method
    merged = [(s, n) for s, n in slot.inputs if not (spec.uses_base and s.model == slot.slice.base_model)]
    reads = _tensors_to_read(slot, sources, arch)
    inputs = tuple(reads[(s.model, n)] for s, n in merged)
    base = reads[slot.base] if slot.base else None
    global_params = {p.name: resolve_param(p, spec.name, slot.output_name, slot.t,
                                           config.parameter_levels(slot.slice, None))
                     for p in spec.global_params}
    per_model = tuple({p.name: resolve_param(p, spec.name, name, slot.t, config.parameter_levels(slot.slice, src),
                                             src.model, slot.output_name)
                       for p in spec.per_model_params} for src, name in merged)
    aligned = vocab if vocab is not None and slot.output_name in arch.vocabulary_names else None
    shape = _common_shape(slot.output_name, ([base] if base else []) + list(inputs), sources, aligned is not None)
    if aligned is not None:
        shape = (aligned.size, *shape[1:])
    job_out_dtype, job_input_dtype = job_dtypes(slot.output_name, spec, ([base] if base else []) + list(inputs),
                                                 per_model, sources, input_dtype, out_dtype)
    return TensorJob(slot.output_name, spec, inputs, base, global_params, per_model, shape, job_out_dtype,
                     job_input_dtype, job_seed(random_seed, slot.output_name) if spec.randomized else None, aligned)


def _tensors_to_read(slot: _Slot, sources: Mapping[str, ModelSource],
                     arch: Architecture) -> dict[tuple[str, str], TensorRef]:
    """What to read for each (model, tensor) of a slot: the tensor itself, or the embedding of
    a tied model for its output head. A tensor a model lacks is an error naming every such model."""
    wanted = ([slot.base] if slot.base else []) + [(s.model, n) for s, n in slot.inputs]
    reads: dict[tuple[str, str], TensorRef] = {}
    lacking: list[str] = []
    for model, name in wanted:
        alternative = arch.tied_alternative(name)
        if sources[model].has(name):
            reads[(model, name)] = TensorRef(model, name)
        elif alternative is not None and sources[model].has(alternative):
            reads[(model, name)] = TensorRef(model, alternative)
        elif model not in lacking:
            lacking.append(model)
    if lacking:
        holders = [m for m, n in wanted if (m, n) in reads]
        missing = [n for m, n in wanted if m in lacking]
        who = ", ".join(f"model {m!r}" for m in lacking)
        why = f"model {holders[0]!r} has it" if holders else "no model of the slice has it"
        raise PlanError(f"{who} {'has' if len(lacking) == 1 else 'have'} no tensor {missing[0]!r} ({why}, for "
                        f"output tensor {slot.output_name!r}); every model of a slice must hold the same tensors: "
                        "check that the models are the same architecture and size")
    return reads


def _common_shape(output_name: str, refs: list[TensorRef], sources: Mapping[str, ModelSource],
                  rows_aligned: bool = False) -> tuple[int, ...]:
    """The inputs' shape; with `rows_aligned` (vocabulary rows mapped on read) the row counts may differ."""
    shape = sources[refs[0].model].meta(refs[0].name)[0]
    for r in refs[1:]:
        other = sources[r.model].meta(r.name)[0]
        if (other[1:] != shape[1:]) if rows_aligned else (other != shape):
            raise PlanError(f"tensor {output_name!r}: shape mismatch, {refs[0].model}:{refs[0].name} is "
                            f"{list(shape)} but {r.model}:{r.name} is {list(other)}; these models cannot be "
                            "merged tensor by tensor (different sizes, or vocabularies: set tokenizer_source)")
    return shape


def job_dtypes(output_name: str, spec: MethodSpec, refs: list[TensorRef], per_model: tuple[dict[str, Any], ...],
                sources: Mapping[str, ModelSource], input_dtype: torch.dtype | None,
                out_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(output dtype, input rounding dtype) of one job. Floating-point inputs are merged and
    written as the plan's dtype; integer, bool and float8 tensors (quantized weights,
    buffers) are only copied bit for bit by passthrough, keeping their dtype."""
    dtypes = [(r, BY_NAME.get(sources[r.model].meta(r.name)[1])) for r in refs]
    odd = [(r, dt) for r, dt in dtypes if dt not in ARITHMETIC]
    if not odd:
        return out_dtype, input_dtype
    r, dt = odd[0]
    found = dtype_name(dt) if dt is not None else sources[r.model].meta(r.name)[1]
    if spec.name != "passthrough":
        raise PlanError(f"tensor {r.name!r} of model {r.model!r} is {found}: {spec.name} merges floating-point "
                        f"tensors only ({', '.join(sorted(dtype_name(d) for d in ARITHMETIC))}); dequantize the "
                        "model first, or copy the tensor with merge_method: passthrough")
    if dt not in COPYABLE or per_model[0].get("scale", 1.0) != 1.0:
        raise PlanError(f"tensor {r.name!r} of model {r.model!r} is {found}: passthrough copies such tensors "
                        f"only unscaled and only as {', '.join(sorted(dtype_name(d) for d in COPYABLE))}")
    return dt, None


def _output_dtype(config: MergeConfig, ref: ModelSource, reference: str) -> torch.dtype:
    """The dtype of every floating-point output tensor: out_dtype, else dtype, else the
    reference model's (which must then be one dtype)."""
    name = config.out_dtype or config.dtype
    if name:
        return BY_NAME[name]
    counts = Counter(dt for n in ref.tensor_names() if (dt := BY_NAME.get(ref.meta(n)[1])) in ARITHMETIC)
    if len(counts) > 1:
        found = ", ".join(f"{dtype_name(dt)} ({k} tensors)" for dt, k in counts.most_common())
        raise PlanError(f"reference model {reference!r} stores its tensors in several dtypes ({found}); set "
                        "`out_dtype:` in the recipe to choose the output's")
    return next(iter(counts), torch.float32)


def job_seed(random_seed: int | None, name: str) -> int | None:
    if random_seed is None:
        return None
    digest = hashlib.sha256(f"{random_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
