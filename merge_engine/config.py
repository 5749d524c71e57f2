"""Recipe schema (mergekit-compatible YAML), validated once at the edge.

``load_recipe`` turns a YAML file into a frozen :class:`MergeConfig`; every problem
is reported together, each naming its YAML path (``models[1].parameters.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dtypes import parse_recipe_dtype
from .errors import RecipeError
from .methods import REGISTRY, MethodSpec, get_method
from .reference import normalize_reference

Scalar = bool | int | float | str


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConditionalValue(_Frozen):
    """One entry of a filter list: applies to tensors whose name contains ``filter``
    (no filter, or ``"*"``, matches every tensor)."""

    filter: str | None = None
    value: Scalar | list[float]


def _single_conditional_as_list(value: Any) -> Any:
    """mergekit accepts one ``{filter: ..., value: ...}`` mapping where a filter list may go."""
    return [value] if isinstance(value, dict) else value


ParameterValue = Annotated[Scalar | list[ConditionalValue] | list[float],
                           BeforeValidator(_single_conditional_as_list)]
Parameters = dict[str, ParameterValue]


class InputModel(_Frozen):
    model: str
    parameters: Parameters | None = None

    _reference = field_validator("model", mode="before")(normalize_reference)


class SliceSource(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    _reference = field_validator("model", mode="before")(normalize_reference)

    @field_validator("layer_range")
    @classmethod
    def _range_ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Frozen):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"all sources of a slice must span the same number of layers: {ranges}")
        return self


class OutputModule(_Frozen):
    """One entry of `modules:` (mergekit's OutputModuleDefinition): the models or slices of one part of a
    multi-module model, e.g. a vision-language model's `text_decoder`, `vision_tower`, `multi_modal_projector`
    (architecture.py names them), with parameters between its slices' and the top level's."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> OutputModule:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models:` or `slices:` for this module")
        return self


@dataclass(frozen=True)
class SourceView:
    """One input of an output slice, as the planner sees it (a `models:` entry or a slice source)."""

    model: str
    layer_range: tuple[int, int] | None  # None: every layer of the model (a `models:` entry)
    parameters: Parameters | None
    path: str  # its YAML path: models[1], slices[0].sources[1], modules.text_decoder.models[1]


@dataclass(frozen=True)
class SliceView:
    """One output slice: `models:` recipes are a single slice over every layer of each model."""

    sources: tuple[SourceView, ...]
    base_model: str | None  # the slice's own base_model, else the recipe's
    parameters: Parameters | None
    path: str | None  # slices[0], modules.vision_tower.slices[0]; None for `models:` (of the recipe or a module)
    module: str | None = None  # the `modules:` entry it belongs to; None: the whole model

    @property
    def where(self) -> str:
        """Its YAML path, or that of the `models:` list it stands for."""
        return self.path or (f"modules.{self.module}.models" if self.module else "models")


class ZeroTokenSource(_Frozen):
    """`tokenizer.tokens.<token>.source: {kind: zero}`: an all-zero row."""

    kind: Literal["zero"]


class ModelTokenSource(_Frozen):
    """`{kind: model_token, model: ..., token: ... | token_id: ...}`: the row of a token of a model."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of `token` or `token_id`")
        return self


class TokenEmbeddingConfig(_Frozen):
    """Where the embedding / lm_head row of one output token comes from (merge_engine/tokenizer.py)."""

    source: ZeroTokenSource | ModelTokenSource | str | None = None
    force: bool = False


class TokenizerConfig(_Frozen):
    source: str = "union"  # mergekit's default for a `tokenizer:` block
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(_Frozen):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    # evomerge's own: the --random-seed of randomized methods, so that a recipe (e.g. evolve's exported
    # best_config.yaml) rebuilds the same model; mergekit ignores unknown top-level fields
    random_seed: int | None = None

    _reference = field_validator("base_model", mode="before")(normalize_reference)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        return None if v is None else parse_recipe_dtype(v)

    @model_validator(mode="after")
    def _check_method_and_parameters(self) -> MergeConfig:
        problems = validate_against_method(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ---- views used by the planner -------------------------------------------------
    @cached_property
    def method(self) -> MethodSpec:
        """The merge method's spec, looked up once."""
        return get_method(self.merge_method)

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, in first-mention order."""
        names: list[str] = []
        if self.base_model:
            names.append(self.base_model)
        for m in self.models or []:
            names.append(m.model)
        for slc in self.output_slices:
            names.extend(src.model for src in slc.sources)
            if slc.base_model:
                names.append(slc.base_model)
        return list(dict.fromkeys(names))

    @cached_property
    def output_slices(self) -> tuple[SliceView, ...]:
        """The recipe as output slices, those of each `modules:` entry in turn: the one place `models:`
        becomes a slice."""
        if self.modules is not None:
            return tuple(slc for name, m in self.modules.items()
                         for slc in _slice_views(m.models, m.slices, self.base_model, f"modules.{name}.", name))
        return _slice_views(self.models, self.slices, self.base_model)

    def parameter_levels(self, slc: SliceView, source: SourceView | None) -> list[tuple[str, Parameters]]:
        """Where a parameter is looked up, highest precedence first, as (YAML path, block):
        the slice source (or `models:` entry), the slice, the module, the top-level `parameters:`
        (mergekit's ConfigReader.parameter_sources). `source` None: the levels of a global parameter."""
        levels = [(f"{source.path}.parameters", source.parameters)] if source is not None else []
        levels.append((f"{slc.path}.parameters", slc.parameters))
        if slc.module is not None and self.modules is not None:
            levels.append((f"modules.{slc.module}.parameters", self.modules[slc.module].parameters))
        levels.append(("parameters", self.parameters))
        return [(path, block) for path, block in levels if block]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _slice_views(models: list[InputModel] | None, slices: list[OutputSlice] | None, base_model: str | None,
                 path: str = "", module: str | None = None) -> tuple[SliceView, ...]:
    """`models:` (one slice over every layer of each model) or `slices:` of the recipe or of one module, whose
    YAML paths start with `path`."""
    if slices is None:
        return (SliceView(tuple(SourceView(m.model, None, m.parameters, f"{path}models[{i}]")
                                for i, m in enumerate(models or [])), base_model, None, None, module),)
    return tuple(SliceView(tuple(SourceView(src.model, src.layer_range, src.parameters,
                                            f"{path}slices[{i}].sources[{j}]") for j, src in enumerate(s.sources)),
                           s.base_model or base_model, s.parameters, f"{path}slices[{i}]", module)
                 for i, s in enumerate(slices))


def _param_levels(cfg: MergeConfig) -> list[tuple[str, Parameters, str | None]]:
    """(yaml path, parameters, model or None for slice/module/global level) for every parameter block."""
    levels: list[tuple[str, Parameters, str | None]] = []
    if cfg.parameters:
        levels.append(("parameters", cfg.parameters, None))
    levels += [(f"modules.{name}.parameters", m.parameters, None)
               for name, m in (cfg.modules or {}).items() if m.parameters]
    for slc in cfg.output_slices:
        if slc.parameters:
            levels.append((f"{slc.path}.parameters", slc.parameters, None))
        levels += [(f"{src.path}.parameters", src.parameters, src.model) for src in slc.sources if src.parameters]
    return levels


def _check_value(path: str, spec_kind: str, bounds, value: Any) -> list[str]:
    """Type and range checks for a scalar, gradient or filter-list value."""
    if isinstance(value, list):
        if not value:
            return [f"{path}: empty list"]
        if isinstance(value[0], ConditionalValue):
            out: list[str] = []
            for k, cond in enumerate(value):
                out += _check_value(f"{path}[{k}].value", spec_kind, bounds, cond.value)
            return out
        return [p for k, v in enumerate(value) for p in _check_value(f"{path}[{k}]", spec_kind, bounds, v)]
    if spec_kind == "bool":
        return [] if isinstance(value, bool) else [f"{path}: expected true or false, got {value!r}"]
    if spec_kind == "str":
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [f"{path}: expected a number, got {value!r}"]
    if value != value:
        return [f"{path}: value is NaN"]
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        return [f"{path}: {value} is outside [{bounds[0]}, {bounds[1]}]"]
    return []


def validate_against_method(cfg: MergeConfig) -> list[str]:
    """All problems between the recipe and its method's spec, as 'path: message' lines."""
    if cfg.merge_method not in REGISTRY:
        try:
            get_method(cfg.merge_method)
        except ValueError as e:
            return [f"merge_method: {e}"]
    spec = cfg.method
    problems: list[str] = []
    given = [key for key in ("models", "slices", "modules") if getattr(cfg, key) is not None]
    if len(given) != 1:
        fix = ("; mergekit refuses this too: to merge one module differently, give every module its own `models:` or "
               "`slices:` under `modules:`" if "modules" in given else "")
        problems.append(f"{'/'.join(given) or 'models'}: give exactly one of `models:`, `slices:` or `modules:`{fix}")
        return problems
    if cfg.modules == {}:
        problems.append("modules: empty; give each module of the model its `models:` or `slices:`")
        return problems
    if spec.requires_base:
        lacking = [slc for slc in cfg.output_slices if not slc.base_model]
        if lacking and len(lacking) == len(cfg.output_slices):
            problems.append(f"base_model: merge_method {spec.name!r} needs a base_model")
        else:
            problems += [f"{slc.path}.base_model: merge_method {spec.name!r} needs a base_model (set it here or "
                         "at the top level)" for slc in lacking]
    for path, params, model in _param_levels(cfg):
        for name, value in params.items():
            p = spec.param(name)
            if p is None:
                known = ", ".join(q.name for q in spec.params) or "none"
                problems.append(f"{path}.{name}: {spec.name} has no parameter {name!r} (it takes: {known})")
                continue
            if p.scope == "global" and model is not None:
                problems.append(f"{path}.{name}: {name!r} is a global parameter of {spec.name}; "
                                "set it under the top-level or slice `parameters:`")
            problems += _check_value(f"{path}.{name}", p.kind, p.bounds, value)
    for slc in cfg.output_slices:
        problems += _check_models(spec, cfg, slc)
    return problems


def _check_models(spec: MethodSpec, cfg: MergeConfig, slc: SliceView) -> list[str]:
    """Model counts of one slice, and required parameters set at some level for each model."""
    merged = [src for src in slc.sources if not (spec.uses_base and src.model == slc.base_model)]
    where = slc.where
    problems: list[str] = []
    if len(merged) < spec.min_models:
        problems.append(f"{where}: {spec.name} needs at least {spec.min_models} model(s) besides the base, "
                        f"got {len(merged)}")
    if spec.max_models is not None and len(merged) > spec.max_models:
        problems.append(f"{where}: {spec.name} takes at most {spec.max_models} model(s) besides the base, "
                        f"got {len(merged)}")
    for p in spec.per_model_params:
        if not p.required:
            continue
        for src in merged:
            if not any(p.name in block for _, block in cfg.parameter_levels(slc, src)):
                problems.append(f"{src.path}.parameters.{p.name}: required by {spec.name} "
                                f"(set it here or under the global `parameters:`)")
    for p in spec.global_params:
        if p.required and not any(p.name in block for _, block in cfg.parameter_levels(slc, None)):
            problems.append(f"parameters.{p.name}: required by {spec.name}")
    return problems


def format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "list[", "tuple[", "union[", "bool", "int", "float", "str")):
            out += ("." if out else "") + str(part)
    return out


def validation_lines(e: ValidationError, location: Callable[[tuple[Any, ...]], tuple[Any, ...]] = tuple
                     ) -> list[str]:
    """A schema's errors as `field.path: message` lines, each once (an unknown field says so); `location`
    rewrites an error's location first."""
    lines: list[str] = []
    for err in e.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = format_location(location(err["loc"]))
        for line in msg.split("\n"):
            text = line if (not loc or line.startswith(loc)) else f"{loc}: {line}"
            if err["type"] == "extra_forbidden":
                text = f"{loc}: unknown field (check its spelling)"
            if text not in lines:
                lines.append(text)
    return lines


def parse_recipe(data: Any, source: str = "<recipe>") -> MergeConfig:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(invalid(source, "recipe", validation_lines(e))) from None


def invalid(source: str, what: str, lines: list[str]) -> str:
    """One error on the same line as the file's name; several, one per line below it."""
    if len(lines) == 1:
        return f"{source}: invalid {what}: {lines[0]}"
    return f"{source}: invalid {what}:\n  " + "\n  ".join(lines)


class _Loader(yaml.SafeLoader):
    """safe_load, but `1e-3` is a float (YAML 1.1 wants a dot: `1.0e-3`; YAML 1.2 and users do not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def read_yaml(path: Path, kind: str, documents: bool = False) -> Any:
    """A YAML file's content (with `documents`, the list of its `---`-separated documents); a missing,
    unreadable or broken file is a RecipeError naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{kind} file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"{kind} file {path} is a directory; give the YAML file inside it") from None
    except PermissionError:
        raise RecipeError(f"{kind} file {path} cannot be read: permission denied") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{kind} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{kind} file {path} cannot be read: {e.strerror}") from None
    try:  # _Loader: a SafeLoader subclass
        return list(yaml.load_all(text, Loader=_Loader)) if documents else yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None


def load_recipe(path: str | Path) -> MergeConfig:
    path = Path(path)
    return parse_recipe(read_yaml(path, "recipe"), str(path))
