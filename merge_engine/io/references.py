"""A recipe's model reference -> an open ModelSource: a local directory, a hub snapshot, or a base model
with a LoRA adapter applied on read. The only place references become paths."""

from __future__ import annotations

from pathlib import Path

from ..reference import parse_reference
from .hub import resolve_model_dir
from .loader import ModelLoadError, ModelSource
from .lora import LoraModelSource, cache_name, write_merged


def open_model(ref: str, *, allow_pickle: bool = False, cache: bool = False,
               cache_dir: str | None = None, lora_dtype: str | None = None,
               lora_merge_cache: str | None = None) -> ModelSource:
    """Open `ref` ('dir', 'org/name@rev', 'base+adapter'). cache_dir: hub cache (--transformers-cache);
    lora_dtype: dtype a LoRA's base is read as (--lora-merge-dtype); lora_merge_cache: write (or reuse) the
    merged base+adapter there as a model directory instead of applying the adapter on every read."""
    local = Path(ref).expanduser()
    if local.is_dir():  # an existing directory wins, even if its name contains '@' or '+'
        return ModelSource(ref, path=local, allow_pickle=allow_pickle, cache=cache)
    try:
        parsed = parse_reference(ref)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    what = "base model" if parsed.lora else "model"
    base = resolve_model_dir(parsed.model, cache_dir=cache_dir, allow_pickle=allow_pickle, what=what)
    if parsed.lora is None:
        return ModelSource(ref, path=base, allow_pickle=allow_pickle, cache=cache)
    adapter = resolve_model_dir(parsed.lora, cache_dir=cache_dir, allow_pickle=allow_pickle, what="LoRA adapter")
    source = LoraModelSource(ref, base, adapter, allow_pickle=allow_pickle, cache=cache, dtype=lora_dtype)
    if lora_merge_cache is None:
        return source
    merged = write_merged(source, Path(lora_merge_cache).expanduser() / cache_name(parsed))
    return ModelSource(ref, path=merged, cache=cache)
