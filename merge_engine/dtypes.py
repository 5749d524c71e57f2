"""The one dtype table: the dtypes a checkpoint may hold, their safetensors codes,
which of them merge methods compute on, and the names a recipe may use."""

from __future__ import annotations

import torch

# torch dtype -> safetensors header code, for every dtype the engine reads or writes
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS_CODE: dict[str, torch.dtype] = {code: dt for dt, code in SAFETENSORS_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name used in config.json, recipes and plans."""
    return str(dtype).removeprefix("torch.")


BY_NAME: dict[str, torch.dtype] = {dtype_name(dt): dt for dt in SAFETENSORS_CODES}

# What merge methods compute on. Other dtypes (integers, bool, float8) are quantized or
# bookkeeping tensors: only `passthrough` copies them, bit for bit.
ARITHMETIC: frozenset[torch.dtype] = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})

# `dtype:` / `out_dtype:` in a recipe
RECIPE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
RECIPE_ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                                  "float": "float32", "fp64": "float64", "double": "float64"}


def parse_recipe_dtype(text: str) -> str:
    """A recipe's dtype name, aliases resolved; ValueError for anything else."""
    name = RECIPE_ALIASES.get(text, text)
    if name not in RECIPE_DTYPES:
        raise ValueError(f"unknown dtype {text!r}: expected one of {', '.join(RECIPE_DTYPES)}")
    return name


# Non-arithmetic dtypes whose every value survives a round trip through float32: the
# executor computes in float32, so passthrough copies these bit for bit.
COPYABLE: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.int16, torch.int8,
                                              torch.uint8, torch.bool})
