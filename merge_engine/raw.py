"""mergekit-pytorch: merge flat state dicts, tensor by tensor, as mergekit 0.1.5's `mergekit-pytorch` does.

The recipe is mergekit-yaml's without slices (`merge_method`, `models:` with per-model `parameters`,
`parameters`, `base_model`, `dtype`, `out_dtype`), and each model is one FILE: a `.safetensors` file, or a
PyTorch pickle read only with --allow-pickle (torch's weights_only unpickler). There is no config.json and no
notion of layers: every tensor name is one job, its parameters resolved against that name (filters apply;
a gradient list takes its first value, as at mergekit's t = 0). The jobs run through the engine's executor into
the sharded safetensors writer, atomically, like any merge.

A tensor some files lack is an error naming it and them, unless --tensor-intersection (skip it) or
--tensor-union (merge it from the files that have it; the base must have it when the method uses one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import safe_open

from .config import Parameters, read_yaml, validation_lines
from .dtypes import ARITHMETIC, BY_NAME, parse_recipe_dtype
from .errors import ModelLoadError, PlanError, RecipeError
from .executor import execute_plan
from .io.loader import ModelSource
from .io.output import check_output, check_space, output_directory
from .io.writer import ShardedSafetensorsWriter, TensorLayout
from .methods import MethodSpec, get_method
from .options import MergeOptions
from .params import resolve_param
from .plan import TensorJob, TensorRef, job_dtypes, job_seed

Missing = Literal["error", "intersection", "union"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RawModel(_Frozen):
    model: str
    parameters: Parameters | None = None


class RawConfig(_Frozen):
    """mergekit's RawPyTorchMergeConfig."""

    merge_method: str
    models: list[RawModel] = Field(min_length=1)
    parameters: Parameters | None = None
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _known(cls, v: str) -> str:
        get_method(v)  # ValueError naming the close ones
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return parse_recipe_dtype(v) if v is not None else None

    @property
    def method(self) -> MethodSpec:
        return get_method(self.merge_method)


def load_raw_config(path: str | Path) -> RawConfig:
    path = Path(path)
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return RawConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: invalid recipe:\n  " + "\n  ".join(validation_lines(e))) from None


class FileSource(ModelSource):
    """One state-dict file seen as the engine's ModelSource (no config.json, one weight file)."""

    def __init__(self, file: str, *, allow_pickle: bool = False):
        path = Path(file)
        if not path.is_file():
            raise ModelLoadError(f"model {file!r}: no such file (mergekit-pytorch's models are state-dict files)")
        self.name, self.path, self.config = file, path.parent, {}
        self._cache, self._meta, self._spans, self._pickled = None, {}, {}, {}
        self.allow_pickle = allow_pickle
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
            except Exception as e:  # noqa: BLE001 - header or size corruption
                raise ModelLoadError(f"model {file!r}: not a readable safetensors file: {e}") from None
        else:
            state = self._load_pickle(path.name)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ModelLoadError(f"model {file!r}: the pickle holds no flat name -> tensor mapping")
            names = list(state)
        self.weight_map = dict.fromkeys(names, path.name)


def plan_raw(config: RawConfig, sources: dict[str, FileSource], missing: Missing = "error",
             random_seed: int | None = None) -> list[TensorJob]:
    spec = config.method
    models = [m.model for m in config.models]
    merged = [m for m in config.models if not (spec.uses_base and m.model == config.base_model)]
    if spec.requires_base and config.base_model is None:
        raise PlanError(f"{spec.name} needs a base_model")
    everyone = list(dict.fromkeys(models + ([config.base_model] if config.base_model else [])))
    input_dtype = BY_NAME[config.dtype] if config.dtype else None
    names = list(dict.fromkeys(n for m in everyone for n in sources[m].tensor_names()))
    jobs = []
    for name in names:
        lacking = [m for m in everyone if not sources[m].has(name)]
        if lacking and missing == "intersection":
            continue
        if lacking and missing == "error":
            raise PlanError(f"tensor {name!r} is missing from {', '.join(lacking)}; pass --tensor-intersection to "
                            "skip such tensors or --tensor-union to merge them from the files that have them")
        base = None
        if spec.uses_base and config.base_model is not None:
            if not sources[config.base_model].has(name):
                raise PlanError(f"tensor {name!r} is missing from the base model {config.base_model}; "
                                f"{spec.name} needs it (--tensor-intersection skips such tensors)")
            base = TensorRef(config.base_model, name)
        present = [m for m in merged if sources[m.model].has(name)]
        if not present:
            continue  # only the base has it: nothing to merge (mergekit skips it too)
        levels_global = [("parameters", config.parameters or {})]
        global_params = {p.name: resolve_param(p, spec.name, name, 0.0, levels_global) for p in spec.global_params}
        per_model = tuple({p.name: resolve_param(p, spec.name, name, 0.0,
                                                 [(f"models[{models.index(m.model)}].parameters", m.parameters or {}),
                                                  *levels_global], m.model)
                           for p in spec.per_model_params} for m in present)
        inputs = tuple(TensorRef(m.model, name) for m in present)
        refs = ([base] if base else []) + list(inputs)
        shapes = {sources[r.model].meta(name)[0] for r in refs}
        if len(shapes) > 1:
            raise PlanError(f"tensor {name!r} has different shapes in the files: {sorted(shapes)}")
        stored = BY_NAME.get(sources[inputs[0].model].meta(name)[1])
        wanted = config.out_dtype or config.dtype
        out = BY_NAME[wanted] if wanted else stored
        out_dtype, job_input = job_dtypes(name, spec, refs, per_model, sources, input_dtype,
                                          out if out in ARITHMETIC else torch.float32)
        jobs.append(TensorJob(name, spec, inputs, base, global_params, per_model, shapes.pop(), out_dtype, job_input,
                              job_seed(random_seed, name) if spec.randomized else None))
    return jobs


def run_raw(config: RawConfig, out_path: str | Path, options: MergeOptions, missing: Missing = "error",
            protect: tuple[Path, ...] = ()) -> Path:
    """Merge the files into out_path (model.safetensors shards + index); the output rules of run_merge."""
    files = list(dict.fromkeys([m.model for m in config.models] + ([config.base_model] if config.base_model else [])))
    sources = {f: FileSource(f, allow_pickle=options.allow_pickle) for f in files}
    target = check_output(out_path, inputs=[Path(f) for f in files], protected=protect,
                          write_into_existing=options.write_into_existing)
    jobs = plan_raw(config, sources, missing, options.random_seed)
    layouts = [TensorLayout(j.output_name, j.shape, j.out_dtype) for j in jobs]
    needed = sum(t.nbytes for t in layouts)
    check_space(target, needed)
    with output_directory(target, needed) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layouts, options.out_shard_size)
        try:
            execute_plan(jobs, sources, writer, options.device, options.progress, options.release_largest_blocks)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
    return Path(out_path)
