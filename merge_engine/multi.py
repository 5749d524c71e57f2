"""mergekit-multi: staged merges, one multi-document YAML file, one command.

Each document is a recipe; a document with `name: X` is a stage whose output goes to
INTERMEDIATE_DIR/X, and any later (or earlier) document may name X where it names a model. The one
document without a name, if any, is the final merge, written to --out-path. Stages run in
dependency order (a cycle, a duplicate name or two unnamed documents is an error before anything is
merged), each through `run_merge`, so each stage's output is atomic.

Lazy re-use (`--lazy`, the default, as mergekit): a stage whose output directory carries the stamp of
the same recipe and the same inputs (STAMP, written after the stage is complete) is not merged again,
so a run stopped between stages resumes where it stopped. Unlike mergekit, which re-uses any directory
that holds a model, a stage whose recipe changed, or that reads a stage rebuilt since, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MergeConfig, RecipeError, parse_recipe, read_yaml
from .merge import run_merge
from .options import MergeOptions
from .reference import ModelPath, ModelReference, parse_reference

log = logging.getLogger(__name__)
STAMP = "mergekit_multi.json"
REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")  # where a recipe names a model


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the final, unnamed merge
    config: MergeConfig  # stage names replaced by their output directories
    needs: tuple[str, ...]  # the stages it reads
    key: str  # identity of the recipe and, recursively, of the stages it reads


def _substitute(value: Any, outputs: dict[str, str], used: set[str], key: str | None = None) -> Any:
    """A recipe document with every model reference to a stage name pointed at that stage's output."""
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, used, key) for v in value]
    if isinstance(value, str) and key in REFERENCE_KEYS:
        try:
            ref = parse_reference(value)
        except ValueError:
            return value  # the recipe schema reports it
        if ref.model.path in outputs:
            used.add(ref.model.path)
            return str(ModelReference(ModelPath(outputs[ref.model.path], ref.model.revision), ref.lora))
    return value


def load_stages(path: str | Path, intermediate_dir: str | Path) -> list[Stage]:
    """The stages of a multi-document recipe file, in the order they must run; RecipeError naming the
    document for a bad recipe, a duplicate name, two unnamed documents or a cycle."""
    path = Path(path)
    docs = [d for d in read_yaml(path, "recipe", documents=True) if d is not None]
    if not docs:
        raise RecipeError(f"{path}: no recipe documents (separate the stages with ---)")
    named: dict[str | None, dict] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RecipeError(f"{path}: document {i + 1} is not a recipe mapping")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
            raise RecipeError(f"{path}: document {i + 1}: name {name!r} must be a plain directory name")
        if name in named:
            raise RecipeError(f"{path}: document {i + 1}: " + (f"a second stage named {name!r}" if name else
                                                                 "a second document without a name; only the final "
                                                                 "merge may be unnamed"))
        named[name] = doc
    outputs = {n: str(Path(intermediate_dir) / n) for n in named if n is not None}
    configs: dict[str | None, MergeConfig] = {}
    needs: dict[str | None, tuple[str, ...]] = {}
    for name, doc in named.items():
        used: set[str] = set()
        configs[name] = parse_recipe(_substitute(doc, outputs, used), f"{path} [{name or 'final merge'}]")
        needs[name] = tuple(sorted(used))
    order: list[str | None] = []
    keys: dict[str | None, str] = {}

    def visit(name: str | None, chain: tuple[str | None, ...]) -> None:
        if name in keys:
            return
        if name in chain:
            cycle = " -> ".join(str(n) for n in (*chain[chain.index(name):], name))
            raise RecipeError(f"{path}: the stages read each other in a cycle: {cycle}")
        for dep in needs[name]:
            visit(dep, (*chain, name))
        text = configs[name].to_yaml() + "".join(keys[d] for d in needs[name])
        keys[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        order.append(name)

    for name in named:
        visit(name, ())
    return [Stage(n, configs[n], needs[n], keys[n]) for n in order]


def _stamped(out: Path, key: str) -> bool:
    try:
        return json.loads((out / STAMP).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _stamp(out: Path, stage: Stage) -> None:
    tmp = out / f".{STAMP}.tmp"
    tmp.write_text(json.dumps({"stage": stage.name, "key": stage.key, "needs": list(stage.needs)}) + "\n")
    os.replace(tmp, out / STAMP)


def run_stages(stages: list[Stage], intermediate_dir: str | Path, out_path: str | Path | None,
               options: MergeOptions, lazy: bool = True, protect: tuple[Path, ...] = (),
               report: Callable[[str], None] = log.info) -> dict[str | None, Path]:
    """Merge every stage not already built (lazy); returns each stage's output directory."""
    done: dict[str | None, Path] = {}
    rebuilt: set[str | None] = set()
    for i, stage in enumerate(stages, 1):
        if stage.name is None and out_path is None:
            raise ValueError("--out-path is required: the file has a final merge (a document without a name)")
        out = Path(intermediate_dir) / stage.name if stage.name is not None else Path(str(out_path))
        label = f"[{i}/{len(stages)}] {stage.name or 'final merge'}"
        if lazy and _stamped(out, stage.key) and not rebuilt.intersection(stage.needs):
            report(f"{label}: built already from this recipe, re-used ({out})")
            done[stage.name] = out
            continue
        started = time.perf_counter()
        run_merge(stage.config, out, options.model_copy(update={"recipe_text": None}), protect=protect)
        _stamp(out, stage)
        rebuilt.add(stage.name)
        done[stage.name] = out
        report(f"{label}: merged in {time.perf_counter() - started:.1f}s -> {out}")
    return done
