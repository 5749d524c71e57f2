"""Layer-path genome <-> passthrough recipe: evolve the path a token takes through the layers of
several models (a frankenmerge), in the encoding of the data-flow-space search of Akiba et al.,
"Evolutionary Optimization of Model Merging Recipes" (Nature Machine Intelligence 2025,
arXiv:2403.13187, section 3.2), which was published without code.

Encoding. The layers of the N source models are laid out in sequence (every layer of model 1,
then of model 2, ...) and the sequence is repeated `repeats` times: T positions. The genome is a
vector in [0, 1]^d as for the parameter-space genome:

- one inclusion gene per position: the layer is on the path when its gene is above 0.5. The path
  visits the included positions in order. Depth bounds repair a path: below `min_layers` the
  excluded positions with the highest genes join it, above `max_layers` only the highest genes
  stay (ties: the earlier position), so every vector decodes to a path of allowed depth;
- scale genes (`scales:`): where the path jumps (any step other than a model's layer i to its own
  layer i + 1) the hidden state is multiplied by a scale. `transition`: one scale per kind of jump,
  from model i to model j (the paper's N x N matrix W); `layer`: one per position, applied when the
  path jumps to it; `none`: no scaling. Scale genes span `scale_range` (default 0.5-1.5) on a grid of
  `scale_step` (default 0.05; 0: continuous), so candidates differing by a hair of scale are one recipe,
  scored once.

The start vector decodes to the first model unchanged (its positions in the first repeat at 0.75,
every other inclusion gene at 0.25, the scales at 1.0); put a parameter-space merge first to search
around it (hybrid mode).

Decoding gives an ordinary recipe: `merge_method: passthrough` with one slice per run of
consecutive layers. Scaling the residual stream by s before layer k is, in a pre-norm model, the
same up to the norms' epsilon as multiplying the residual-writing projections (attention output,
MLP down projection: `Architecture.residual_writers`) of layer k and every later layer by 1/s (the
final norm removes the overall factor). So a slice whose layers follow jumps with scales
s_1 ... s_m carries `parameters: {scale: [{filter: <writer>, value: 1 / (s_1 ... s_m)}]}` and the
result is a plain checkpoint that loads in transformers and vLLM without custom code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_engine.architecture import Architecture, detect_architecture
from merge_engine.config import MergeConfig, load_recipe, parse_recipe
from merge_engine.io.references import open_model
from merge_engine.merge import plan_merge, run_merge
from merge_engine.options import MergeOptions

from .config import LayerPathDefinition, is_recipe
from .genome import DECIMALS, Gene, gene_values, text_only

INCLUDED = 0.5  # an inclusion gene above this puts its layer on the path
START_ON, START_OFF = 0.75, 0.25  # the start vector: the first model's layers on, the rest off
SCALE_DECIMALS = 6  # of the per-slice factors written into the recipe


@dataclass(frozen=True)
class Position:
    repeat: int
    model: int  # index into the definition's models
    layer: int


@dataclass(frozen=True)
class Step:
    """One layer of a decoded path: which model's layer, and the residual-stream scale applied
    before it (1.0 where the path does not jump)."""

    model: str
    layer: int
    scale: float = 1.0


class LayerPathGenome:
    def __init__(self, definition: LayerPathDefinition, layers: dict[str, int], architecture: Architecture,
                 models: list[str] | None = None):
        """`layers`: each source's layer count, keyed by definition.models; `models`: the references the
        recipes name (the built directories of recipe sources), default definition.models."""
        self.definition = definition
        self.models = list(models or definition.models)
        self.architecture = architecture
        self.positions = tuple(Position(r, m, i) for r in range(definition.repeats)
                               for m, name in enumerate(definition.models) for i in range(layers[name]))
        total = len(self.positions)
        self.min_layers = definition.min_layers or 1
        self.max_layers = min(definition.max_layers or total, total)
        if self.min_layers > total:
            raise ValueError(f"genome.min_layers: {self.min_layers} is more than the {total} positions "
                             f"({definition.repeats} repeat(s) of {total // definition.repeats} layers)")
        if definition.scales != "none" and not architecture.residual_writers:
            raise ValueError(f"genome.scales: the residual-writing tensors of {architecture.model_type!r} models "
                             "are not known (or the model normalises after them), so a scale cannot be written "
                             "into the checkpoint; set genome.scales: none")
        low, high = definition.scale_range
        names = [_short(m) for m in definition.models]
        genes = [Gene(k, None, "include", self.models[p.model], 0.0, 1.0) for k, p in enumerate(self.positions)]
        self.labels = [f"{names[p.model]} L{p.layer}" + (f" r{p.repeat}" if definition.repeats > 1 else "")
                       for p in self.positions]
        if definition.scales == "transition":
            for i, j in itertools.product(range(len(self.models)), repeat=2):
                genes.append(Gene(0, None, "scale", f"{self.models[i]}->{self.models[j]}", low, high))
                self.labels.append(f"scale {names[i]}->{names[j]}")
        elif definition.scales == "layer":
            for k, p in enumerate(self.positions):
                genes.append(Gene(k, None, "scale", self.models[p.model], low, high))
                self.labels.append(f"scale into {self.labels[k]}")
        self.genes: tuple[Gene, ...] = tuple(genes)

    @classmethod
    def for_models(cls, definition: LayerPathDefinition, models: list[str] | None = None) -> LayerPathGenome:
        """Opens each source for its layer count and architecture; `models` as in __init__ (the built
        directories of recipe sources, which must exist)."""
        refs = list(models or definition.models)
        layers, archs = {}, []
        for name, ref in zip(definition.models, refs, strict=True):
            if is_recipe(ref):  # not built yet (preflight): its plan knows the depth
                plan, _ = plan_merge(load_recipe(ref))
                layers[name] = plan.num_output_layers
                archs.append(text_only(plan.architecture, ref))
                continue
            source = open_model(ref)
            arch = text_only(detect_architecture(source.config, source.tensor_names(), ref), ref)
            layers[name] = arch.num_layers
            archs.append(arch)
        writers = {a.residual_writers for a in archs}
        if len(writers) > 1 and definition.scales != "none":
            raise ValueError("genome.models: the sources are of different architectures ("
                             + ", ".join(sorted({a.model_type for a in archs})) + "); scales need one family")
        return cls(definition, layers, archs[0], refs)

    @property
    def dimension(self) -> int:
        return len(self.genes)

    def summary(self) -> str:
        return (f"{self.dimension} genes (layer path over {len(self.positions)} positions, depth "
                f"{self.min_layers}-{self.max_layers}, scales per {self.definition.scales})")

    def x0(self) -> np.ndarray:
        x = np.array([START_ON if p.repeat == 0 and p.model == 0 else START_OFF for p in self.positions]
                     + [0.0] * (self.dimension - len(self.positions)))
        low, high = self.definition.scale_range
        x[len(self.positions):] = (1.0 - low) / (high - low)
        return x

    def values(self, x: np.ndarray) -> list[float]:
        out = gene_values(self.genes, x)
        step = self.definition.scale_step
        if step:  # scales on a grid: paths that differ only by a hair of scale are one recipe, scored once
            out[len(self.positions):] = [round(round(v / step) * step, DECIMALS) for v in out[len(self.positions):]]
        return out

    def included(self, x: np.ndarray) -> list[int]:
        """The positions on the path, in order, after the depth repair."""
        values = self.values(x)[:len(self.positions)]
        on = [k for k, v in enumerate(values) if v > INCLUDED]
        by_gene = sorted(range(len(values)), key=lambda k: (-values[k], k))  # strongest first, ties: earlier
        if len(on) < self.min_layers:
            on += [k for k in by_gene if k not in on][:self.min_layers - len(on)]
        elif len(on) > self.max_layers:
            on = [k for k in by_gene if k in on][:self.max_layers]
        return sorted(on)

    def path(self, x: np.ndarray) -> list[Step]:
        values = self.values(x)
        scales = values[len(self.positions):]
        n = len(self.models)
        steps: list[Step] = []
        previous: Position | None = None
        for k in self.included(x):
            p = self.positions[k]
            scale = 1.0
            if previous is not None and not (p.model == previous.model and p.layer == previous.layer + 1):
                if self.definition.scales == "transition":
                    scale = scales[previous.model * n + p.model]
                elif self.definition.scales == "layer":
                    scale = scales[k]
            steps.append(Step(self.models[p.model], p.layer, float(scale)))
            previous = p
        return steps

    def decode(self, x: np.ndarray) -> MergeConfig:
        return path_recipe(self.path(x), self.architecture.residual_writers, self.definition.tokenizer_source)


def path_recipe(path: list[Step], residual_writers: tuple[str, ...], tokenizer_source: str | None = None
                ) -> MergeConfig:
    """A passthrough recipe building `path`: one slice per run of consecutive layers of one model, the
    residual writers of every layer after a scaled jump multiplied by the inverse of the scales so far."""
    slices: list[dict[str, Any]] = []
    factor = 1.0  # product of the scales applied before the current layer
    start = 0
    for k in range(1, len(path) + 1):
        if k < len(path) and path[k].model == path[k - 1].model and path[k].layer == path[k - 1].layer + 1 \
                and path[k].scale == 1.0:
            continue  # the run goes on
        factor *= path[start].scale
        source: dict[str, Any] = {"model": path[start].model,
                                  "layer_range": [path[start].layer, path[k - 1].layer + 1]}
        inverse = round(1.0 / factor, SCALE_DECIMALS)
        if inverse != 1.0:
            source["parameters"] = {"scale": [{"filter": w, "value": inverse} for w in residual_writers]}
        slices.append({"sources": [source]})
        start = k
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if tokenizer_source:
        recipe["tokenizer_source"] = tokenizer_source
    return parse_recipe(recipe, "<layer path>")


SOURCES_DIR = "sources"


def build_recipe_sources(definition: LayerPathDefinition, storage_dir: Path, options: MergeOptions
                         ) -> LayerPathDefinition:
    """Hybrid search: each recipe among the sources is merged once into STORAGE/sources/<recipe name>
    (atomically, by the engine) and the definition names that directory instead. A directory already
    built from the same recipe text is reused (resume); one built from another text is an error, since
    the scores in the history were measured on it."""
    if len({Path(m).stem for m in definition.recipes()}) < len(definition.recipes()):
        raise ValueError("genome.models: two recipes have the same file name; rename one")
    models = []
    for m in definition.models:
        if not is_recipe(m):
            models.append(m)
            continue
        out = (storage_dir / SOURCES_DIR / Path(m).stem).resolve()
        text = Path(m).read_text()
        if out.exists():
            built = out / "mergekit_config.yml"
            if not built.exists() or built.read_text() != text:
                raise ValueError(f"genome.models: {out} was built from another recipe than {m}; restore the "
                                 "recipe, or search into a new --storage-path")
        else:
            run_merge(load_recipe(m), out, options.model_copy(update={"recipe_text": text}))
        models.append(str(out))
    return definition.model_copy(update={"models": models})


def recipe_path(recipe: MergeConfig) -> list[tuple[str, int]]:
    """(model, layer) at each depth of a passthrough recipe's output: the path, for pictures."""
    return [(s.sources[0].model, layer) for s in recipe.slices or []
            for layer in range(*s.sources[0].layer_range)]


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1] or model
