"""A PEFT LoRA adapter applied to its base model one tensor at a time (recipes' `base+adapter` references).

For a targeted module the merged weight is what peft's ``merge_and_unload`` computes:

    delta = (B @ A) * scale          B: (out, r), A: (r, in); transposed for fan_in_fan_out (GPT-2 Conv1D)
                                     and for embeddings (A: (r, vocab), B: (dim, r))
    scale = lora_alpha / r           (lora_alpha / sqrt(r) with use_rslora; alpha_pattern overrides lora_alpha)
    W'    = W + delta                delta in float32; the sum is rounded once to the base tensor's dtype
                                     (embeddings: delta rounded to that dtype first, as peft does)

``modules_to_save`` tensors stored in the adapter replace the base's. Nothing is written to disk: the
merged tensor exists only while the job that reads it runs.
"""

from __future__ import annotations

import binascii
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..reference import ModelPath, ModelReference
from .loader import ModelLoadError, ModelSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[^.]+)?(?:\.weight)?$")
_UNSUPPORTED_KEYS = ("lora_magnitude_vector", "lora_bias")


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # (r, in) or (r, vocab) for embeddings
    b: torch.Tensor  # (out, r) or (dim, r)
    scale: float
    transpose: bool  # fan_in_fan_out or an embedding
    embedding: bool  # peft rounds an embedding's delta to the weight's dtype before adding it


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's get_pattern_key: a pattern matches a module name it ends, at a '.' boundary."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


class LoraAdapter:
    """An adapter directory: its config and, per base tensor name, what to apply."""

    def __init__(self, path: Path, label: str, allow_pickle: bool = False):
        self.path = path
        self.label = label
        cfg = self._read_config()
        tensors = self._read_tensors(allow_pickle)
        self.modules: dict[str, LoraModule] = {}  # base tensor name -> low-rank update
        self.replaced: dict[str, torch.Tensor] = {}  # base tensor name -> modules_to_save weight
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        embeddings: set[str] = set()  # modules updated through lora_embedding_A/B
        for key, tensor in tensors.items():
            name = key.removeprefix(_PREFIX)
            if any(part in name for part in _UNSUPPORTED_KEYS):
                raise ModelLoadError(f"LoRA adapter {label!r}: tensor {key!r} belongs to DoRA or a LoRA bias, "
                                     "which evomerge does not apply; merge it with peft first "
                                     "(PeftModel.merge_and_unload) and reference the merged model")
            m = _LORA_KEY.match(name)
            if m is None:  # a modules_to_save weight, or a saved embedding (`.base_layer.`): replaces the base's
                self.replaced[name.replace(".base_layer.", ".")] = tensor
                continue
            if m["part"].startswith("lora_embedding_"):
                embeddings.add(m["module"])
            pairs.setdefault(m["module"], {})[m["part"].replace("embedding_", "")] = tensor
        alpha = float(cfg.get("lora_alpha", 8))
        rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        alpha_pattern = cfg.get("alpha_pattern") or {}
        for module, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise ModelLoadError(f"LoRA adapter {label!r}: module {module!r} has {sorted(parts)}, expected "
                                     "both lora_A and lora_B")
            a, b = parts["lora_A"], parts["lora_B"]
            r = a.shape[0]
            pattern = _pattern_key(alpha_pattern, module)
            module_alpha = float(alpha_pattern[pattern]) if pattern is not None else alpha
            scale = module_alpha / (math.sqrt(r) if rslora else r)
            embedding = module in embeddings
            self.modules[f"{module}.weight"] = LoraModule(a, b, scale, embedding or fan_in_fan_out, embedding)

    def _read_config(self) -> dict:
        path = self.path / ADAPTER_CONFIG
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"LoRA adapter {self.label!r}: no {ADAPTER_CONFIG} in {self.path} (a `base+adapter`"
                                 " reference needs a PEFT adapter directory after the '+')") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"LoRA adapter {self.label!r}: {path} is not valid JSON: {e}") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ModelLoadError(f"LoRA adapter {self.label!r}: peft_type is {cfg.get('peft_type')!r}; only LORA "
                                 "adapters can be applied")
        if cfg.get("use_dora"):
            raise ModelLoadError(f"LoRA adapter {self.label!r}: DoRA adapters (use_dora) are not supported; merge "
                                 "it with peft first (merge_and_unload) and reference the merged model")
        return cfg

    def _read_tensors(self, allow_pickle: bool) -> dict[str, torch.Tensor]:
        safe, pickled = self.path / ADAPTER_SAFE, self.path / ADAPTER_PICKLE
        if safe.exists():
            try:
                return load_file(str(safe))
            except Exception as e:  # noqa: BLE001 - header or size corruption
                raise ModelLoadError(f"LoRA adapter {self.label!r}: {safe} is not a readable safetensors file: "
                                     f"{e}") from None
        if pickled.exists():
            if not allow_pickle:
                raise ModelLoadError(f"LoRA adapter {self.label!r}: weights are a pickle ({pickled}); pickles can "
                                     "run arbitrary code. Convert it to safetensors, or pass --allow-pickle if you "
                                     "trust this file")
            return torch.load(pickled, map_location="cpu", weights_only=True)
        raise ModelLoadError(f"LoRA adapter {self.label!r}: no {ADAPTER_SAFE} in {self.path}")

    def targets(self) -> list[str]:
        return [*self.modules, *self.replaced]

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.replaced:
            weight = self.replaced[name].to(weight.dtype)
        mod = self.modules.get(name)
        if mod is None:
            return weight
        delta = mod.b.to(torch.float32) @ mod.a.to(torch.float32)
        if mod.transpose:
            delta = delta.T
        delta = delta * mod.scale
        if mod.embedding:
            return weight + delta.to(weight.dtype)
        wide = torch.promote_types(weight.dtype, torch.float32)  # as peft's in-place `weight += delta`
        return (weight.to(wide) + delta.to(wide)).to(weight.dtype)


class LoraModelSource(ModelSource):
    """A base model with a LoRA adapter merged in, tensor by tensor, on read."""

    def __init__(self, name: str, base_path: Path, adapter_path: Path, *, allow_pickle: bool = False,
                 cache: bool = False, dtype: str | None = None):
        super().__init__(name, path=base_path, allow_pickle=allow_pickle)
        self.dtype = getattr(torch, dtype) if dtype else None  # --lora-merge-dtype: read the base as this
        self.adapter_path = adapter_path
        self.adapter = LoraAdapter(adapter_path, name, allow_pickle)
        self._merged: dict[str, torch.Tensor] | None = {} if cache else None
        for target in self.adapter.targets():
            if not self.has(target):
                raise ModelLoadError(f"LoRA adapter {name!r} targets {target!r}, which the base model in "
                                     f"{base_path} does not have (is it the adapter of a different model?)")
            shape = self.meta(target)[0]
            mod = self.adapter.modules.get(target)
            if mod is not None:
                out_in = (mod.b.shape[0], mod.a.shape[1])
                want = tuple(reversed(out_in)) if mod.transpose else out_in
                if tuple(shape) != want:
                    raise ModelLoadError(f"LoRA adapter {name!r}: update of {target!r} is {list(want)} but the base "
                                         f"tensor is {list(shape)} (adapter of a different model?)")

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        shape, dtype = super().meta(name)
        if self.dtype is not None and torch.empty(0, dtype=getattr(torch, dtype, torch.uint8)).is_floating_point():
            dtype = str(self.dtype).removeprefix("torch.")
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        if self._merged is not None and name in self._merged:
            return self._merged[name]
        tensor = super().get(name)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = self.adapter.apply(name, tensor)
        if self._merged is not None:
            self._merged[name] = tensor
        return tensor


def cache_name(ref: ModelReference) -> str:
    """mergekit's directory name for a merged base+LoRA in --lora-merge-cache (so its entries are shared)."""
    def unique(p: ModelPath) -> str:
        return os.path.basename(p.path) + "_" + str(binascii.crc32(str(p).encode()))
    assert ref.lora is not None
    return unique(ref.model) + "_" + unique(ref.lora)


def write_merged(source: LoraModelSource, out: Path) -> Path:
    """--lora-merge-cache: write base+adapter as a model directory (tensor by tensor, atomically), with the
    base's config, generation config and tokenizer files. An existing entry is reused, as mergekit does."""
    from .output import check_output, output_directory
    from .writer import ShardedSafetensorsWriter, TensorLayout

    if out.is_dir():
        return out
    names = source.tensor_names()
    layouts = [TensorLayout(n, source.meta(n)[0], getattr(torch, source.meta(n)[1])) for n in names]
    with output_directory(check_output(out)) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layouts, 5 * 1000**3, direct=False)  # read back at once: cached
        try:
            for shard in writer.shards:  # the writer takes tensors in its shard order
                for layout in shard:
                    writer.write(layout.name, source.get(layout.name))
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        for f in source.path.iterdir():  # config, generation config, tokenizer files: not the weights
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
                shutil.copyfile(f, tmp / f.name)
    return out
