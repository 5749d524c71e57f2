"""Benchmark: wall time and peak RSS of mergekit-yaml on 3 models of the same width,
12 and 48 layers (~220M and ~680M parameters, bf16). Peak memory should follow the
largest tensor (the 32000 x 1024 embedding), not the model size.

    python bench/merge_memory.py [--workdir /tmp/evomerge-bench] [--layers 12 48]

Writes bench/results/merge_memory.{json,md}. Each merge runs in its own process; its
peak RSS is that process's VmHWM (bench/_peak_rss.py), so nothing else is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from merge_engine.io.loader import ModelSource

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000)


def make_models(root: Path, layers: int) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(3):
        path = root / f"llama-{layers}L-{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, **WIDTH)
            with torch.device("cpu"):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(str(path), safe_serialization=True, max_shard_size="1GB")
            del model
        paths.append(path)
    return paths


def run_merge(recipe: dict, workdir: Path, name: str) -> dict:
    recipe_path = workdir / f"{name}.yml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = workdir / "out" / name
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_peak_rss.py")), str(recipe_path), str(out),
                           "--no-progress", "--random-seed", "0", "--no-copy-tokenizer"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr}")
    peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_kib"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024), "output_gib": round(size / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    ap.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"])
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        t0 = time.perf_counter()
        base, a, b = make_models(args.workdir / "models", layers)
        source = ModelSource(str(base))
        params = sum(math.prod(source.meta(n)[0]) for n in source.tensor_names())
        print(f"{layers} layers: {params / 1e6:.0f}M parameters per model (built in {time.perf_counter() - t0:.0f}s)",
              flush=True)
        for method in args.methods:
            models = [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (a, b)]
            recipe = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "bfloat16"}
            if method == "linear":
                recipe = {"merge_method": "linear", "dtype": "bfloat16",
                          "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, a, b)]}
            result = run_merge(recipe, args.workdir, f"{method}-{layers}L")
            row = {"layers": layers, "params_m": round(params / 1e6), "method": method, **result}
            print(row, flush=True)
            rows.append(row)
    largest = WIDTH["vocab_size"] * WIDTH["hidden_size"]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "largest_tensor": f"{largest / 1e6:.1f}M elements ({largest * 2 / 2**20:.0f} MiB bf16, "
                              f"{largest * 4 / 2**20:.0f} MiB fp32)", "inputs": "3 models, bf16, 1GB shards"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| layers | params/model | method | wall (s) | peak RSS (MiB) | output (GiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['params_m']}M | {r['method']} | {r['wall_s']} | {r['peak_rss_mib']} | "
              f"{r['output_gib']} |" for r in rows]
    (RESULTS / "merge_memory.md").write_text("\n".join(lines) + "\n\n" + json.dumps(meta, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
