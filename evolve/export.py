"""The exported recipe (best_config.yaml): the scored recipe, made to rebuild the scored model anywhere.

- local model paths become absolute (they were relative to the directory the search ran in); hub ids stay;
- `random_seed` (evomerge's recipe field; mergekit ignores unknown fields) carries the seed randomized
  methods (dare_*, della*, ...) were scored with, so `mergekit-yaml best_config.yaml OUT` needs no flag;
- `dtype` pins the precision the candidates were built in when every input stores one float dtype (with
  mixed dtypes the recipe is left as scored: each output tensor takes the reference model's dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge_engine.config import MergeConfig, parse_recipe
from merge_engine.dtypes import RECIPE_DTYPES
from merge_engine.io.references import open_model
from merge_engine.reference import ModelPath, ModelReference, parse_reference


def absolute_reference(ref: str) -> str:
    """Local parts of a reference made absolute; hub ids unchanged."""
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser().resolve())
    parsed = parse_reference(ref)

    def fix(p: ModelPath) -> ModelPath:
        if not Path(p.path).expanduser().exists():
            return p
        return ModelPath(str(Path(p.path).expanduser().resolve()), p.revision)

    return str(ModelReference(fix(parsed.model), fix(parsed.lora) if parsed.lora is not None else None))


def _map_models(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    def ref(x: Any) -> Any:
        return absolute_reference(x) if isinstance(x, str) and x in known else x

    out = dict(data)
    for key in ("base_model", "tokenizer_source"):
        out[key] = ref(out.get(key))
    out["models"] = [{**m, "model": ref(m["model"])} for m in data.get("models") or []] or data.get("models")
    if data.get("slices"):
        out["slices"] = [{**s, "base_model": ref(s.get("base_model")),
                          "sources": [{**src, "model": ref(src["model"])} for src in s["sources"]]}
                         for s in data["slices"]]
    if out.get("tokenizer"):
        out["tokenizer"] = {**out["tokenizer"], "source": ref(out["tokenizer"].get("source"))}
    return {k: v for k, v in out.items() if v is not None}


def _float_dtypes(ref: str) -> set[str]:
    source = open_model(ref)
    return {source.meta(n)[1] for n in source.tensor_names()} & set(RECIPE_DTYPES)


def export_recipe(recipe: MergeConfig, random_seed: int | None) -> MergeConfig:
    data = recipe.model_dump(mode="json", exclude_none=True)
    data = _map_models(data, set(recipe.referenced_models()))
    if random_seed is not None and recipe.method.randomized and recipe.random_seed is None:
        data["random_seed"] = random_seed
    if recipe.dtype is None and recipe.out_dtype is None:
        per_model = [_float_dtypes(m) for m in recipe.referenced_models()]
        everywhere = set.union(*per_model) if per_model else set()
        if len(everywhere) == 1:
            data["dtype"] = everywhere.pop()
    return parse_recipe(data, "<exported recipe>")


def exported_yaml(recipe: MergeConfig, header: str) -> str:
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    body = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return comment + body
