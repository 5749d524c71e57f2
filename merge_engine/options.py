"""Run options of a merge (what the CLI flags set), separate from the recipe."""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, field_validator


class MergeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "cpu"
    copy_tokenizer: bool = True
    out_shard_size: int = 5 * 1000**3
    allow_crimes: bool = False
    trust_remote_code: bool = False
    random_seed: int | None = None
    lazy_unpickle: bool = False
    allow_pickle: bool = False
    write_model_card: bool = True
    progress: bool = True
    transformers_cache: str | None = None  # hub cache directory for hub ids (default: huggingface_hub's)
    lora_merge_dtype: str | None = None  # dtype a LoRA's base tensors are read as before the update
    lora_merge_cache: str | None = None  # write merged base+LoRA models there (and reuse them) when set
    write_into_existing: bool = False  # write into a non-empty OUT_DIR evomerge did not write (as mergekit)
    # write the shards with O_DIRECT (io/writer.py); False writes through the page cache, for an output that
    # is read straight back (the search's on-disk candidates) and is then read from memory, not from disk
    direct_io: bool = True
    # return the largest freed blocks to the kernel (executor.keep_freed_memory: a peak that does not depend on
    # the order in which threads free them);
    # False keeps every freed block for reuse, for a process that merges again and again (in-memory candidates)
    release_largest_blocks: bool = True
    # provenance for the output, not arithmetic: the recipe as the user wrote it (kept verbatim, comments
    # included, in mergekit_config.yml and the card) and markdown appended to the model card
    recipe_text: str | None = None
    card_extra: str | None = None

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _parse_size(cls, v):
        return parse_size(v) if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _usable_device(cls, v: str) -> str:
        return resolve_device(v)


def parse_size(text: str) -> int:
    """'5B' / '500M' / '2G' / '1024' -> bytes (decimal units, as mergekit)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGbBtT]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use a number with an optional K, M, G or B suffix")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}[m[2].lower()]
    return int(float(m[1]) * scale)


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available (then xpu, mps), else cpu, as mergekit; any other device must exist here,
    so that a missing GPU is an error before any work instead of a failure mid-merge."""
    if name == "auto":
        for kind in ("cuda", "xpu", "mps"):
            backend = getattr(torch, kind, None)
            if backend is not None and backend.is_available():
                return kind
        return "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a torch device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu" or device.type == "meta":
        return name
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        built = f"torch {torch.__version__}"
        raise ValueError(f"--device {name}: no {device.type} device is available here ({built}); "
                         "use --device cpu (or auto) and drop GPU flags, or run where that device exists")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: only {count} {device.type} device(s) here (indices 0..{count - 1})")
    return name
