"""The --json summary of a finished command: what was written, how big, how long, how much memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def model_summary(out: Path) -> dict[str, Any]:
    """Tensor count and bytes of the safetensors shards in a model directory."""
    shards = sorted(out.glob("*.safetensors"))
    tensors = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors += len(list(f.keys()))
    return {"output_path": str(out.resolve()), "tensors": tensors, "shards": len(shards),
            "bytes": sum(s.stat().st_size for s in shards)}


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
