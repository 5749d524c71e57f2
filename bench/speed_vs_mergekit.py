"""Benchmark: evomerge vs mergekit 0.1.5 (PyPI) on three 374M-parameter Llama models.

Three models (24 layers, hidden 1024, vocab 32000, bf16, 0.71 GB each: a base and two
fine-tunes = base + small noise) are built once under .cache/bench-models/. For each method
the two tools run in pairs, A B A B (evomerge, then mergekit), each in its own process, with
the inputs in the page cache; we report the median and min-max of the per-pair speed-up
(mergekit wall / evomerge wall) and each process's peak RSS (VmHWM, bench/_peak_rss.py).
Every pair is followed by the I/O floor on the same machine at the same moment: `dd` reading the
method's input files from the warm cache, plus `dd` writing the output's size with fdatasync, and
evomerge's start-up (`mergekit-yaml --version`: interpreter and imports). Start-up plus the write
floor bounds any merge that writes its output durably: nothing is computed before start-up ends, and
the command returns after its output is on disk (mergekit 0.1.5 does not fsync, so its time may end
with the output still in the page cache). Optional: peak RSS of evomerge at 12 vs 48 layers (flat in
depth), and the search's in-memory vs on-disk candidate materialization (--materialize).

    python bench/speed_vs_mergekit.py [--methods linear ties] [--repeats 2] [--flatness] [--materialize]

mergekit runs from an isolated venv: $EVOMERGE_MERGEKIT_VENV if set, else .cache/mergekit-0.1.5
(created with `pip install mergekit==0.1.5` when missing; never the system Python). evomerge
runs from --evomerge-root (default: this checkout); --baseline-root adds an older checkout to every run
(before, evomerge, mergekit), so "before" and "after" share the machine's state.
Writes bench/results/speed_vs_mergekit{-TAG}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PEAK_RSS = Path(__file__).resolve().with_name("_peak_rss.py")
MERGEKIT_VERSION = "0.1.5"
WIDTH = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000)
SHARD_BYTES = 1_000_000_000
ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp", "nuslerp",
               "model_stock"]


# ----------------------------------------------------------------------------- models

def _llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["vocab_size"]
    names = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_model(path: Path, layers: int, seed: int) -> None:
    """A Llama checkpoint written straight as safetensors shards: seed 0 is the base,
    other seeds are the base plus noise 10x smaller (a fine-tune's task vector)."""
    import torch
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base_gen, tune_gen = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in _llama_tensors(layers):
        if len(shape) == 1:
            t = 1.0 + 0.05 * torch.randn(shape, generator=base_gen)
        else:
            t = 0.02 * torch.randn(shape, generator=base_gen)
        if seed:
            t += 0.002 * torch.randn(shape, generator=tune_gen)
        t = t.to(torch.bfloat16)
        if shards[-1] and size + t.numel() * 2 > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    n = len(shards)
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    for f, shard in zip(files, shards, strict=False):
        save_file(shard, str(tmp / f), metadata={"format": "pt"})
        weight_map.update({name: f for name in shard})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, **WIDTH}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path)


def models(cache: Path, layers: int) -> list[Path]:
    paths = [cache.resolve() / f"llama-{layers}L-{seed}" for seed in range(3)]
    for seed, p in enumerate(paths):
        if not (p / "config.json").exists():
            t0 = time.perf_counter()
            build_model(p, layers, seed)
            print(f"built {p} in {time.perf_counter() - t0:.0f}s", flush=True)
    return paths


def count_params(path: Path) -> int:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index["metadata"]["total_size"] // 2


# ----------------------------------------------------------------------------- recipes

def recipe(method: str, base: Path, a: Path, b: Path) -> dict:
    """One recipe per method, the same file for both tools."""
    def models_with(**params):
        return [{"model": str(m), "parameters": dict(params)} for m in (a, b)]

    r: dict = {"merge_method": method, "dtype": "bfloat16"}
    if method == "linear":
        r["models"] = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, a, b)]
    elif method == "task_arithmetic":
        r |= {"base_model": str(base), "models": models_with(weight=0.5)}
    elif method in ("ties", "dare_ties"):
        r |= {"base_model": str(base), "models": models_with(weight=0.5, density=0.5)}
    elif method == "della":
        r |= {"base_model": str(base), "models": models_with(weight=0.5, density=0.5, epsilon=0.1)}
    elif method == "breadcrumbs":
        r |= {"base_model": str(base), "models": models_with(weight=0.5, density=0.5, gamma=0.01)}
    elif method == "slerp":
        r |= {"base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}],
              "parameters": {"t": 0.5}}
    elif method == "nuslerp":
        r["models"] = [{"model": str(m), "parameters": {"weight": w}} for m, w in ((a, 0.5), (b, 0.5))]
    elif method == "model_stock":
        r |= {"base_model": str(base), "models": [{"model": str(a)}, {"model": str(b)}]}
    else:
        raise SystemExit(f"no benchmark recipe for {method!r}")
    return r


def recipe_inputs(r: dict) -> list[Path]:
    paths = {m["model"] for m in r["models"]} | ({r["base_model"]} if "base_model" in r else set())
    return sorted(f for p in paths for f in Path(p).glob("*.safetensors"))


# ----------------------------------------------------------------------------- tools

def mergekit_python() -> Path:
    """The venv python that has mergekit 0.1.5; created under .cache/ when missing."""
    venv = Path(os.environ.get("EVOMERGE_MERGEKIT_VENV") or ROOT / ".cache" / f"mergekit-{MERGEKIT_VERSION}")
    python = venv / "bin" / "python"
    if not python.exists():
        import torch

        print(f"creating {venv} (pip install mergekit=={MERGEKIT_VERSION}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}",
                        f"torch=={torch.__version__.split('+')[0]}"], check=True)
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != MERGEKIT_VERSION:
        raise SystemExit(f"error: {venv} has mergekit {probe.stdout.strip() or '(none)'} {probe.stderr[-300:]}; "
                         f"expected {MERGEKIT_VERSION}. Point EVOMERGE_MERGEKIT_VENV at a venv with "
                         f"mergekit=={MERGEKIT_VERSION} or remove {venv} to recreate it.")
    return python


def run_tool(tool: str, recipe_path: Path, out: Path, evomerge_root: Path, mk_python: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    common = [str(recipe_path), str(out), "--random-seed", "0", "--no-copy-tokenizer"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tool == "evomerge":
        cmd = [sys.executable, str(PEAK_RSS), *common, "--no-progress"]
        env["PYTHONPATH"] = str(evomerge_root)
    else:
        cmd = [str(mk_python), str(PEAK_RSS), "--mergekit", *common, "--quiet"]
    start, cpu_start = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=str(evomerge_root if tool == "evomerge" else recipe_path.parent))
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {recipe_path.name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_kib"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 1024, "output_bytes": size}


def _children_cpu() -> float:
    """User + system CPU seconds of finished children (less sensitive to a loaded machine than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """dd: read every input from the (warm) page cache, then write out_bytes with fdatasync."""
    for f in inputs:  # warm the cache first, so the measured read is the warm one
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
    t0 = time.perf_counter()
    for f in inputs:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
    read = time.perf_counter() - t0
    target = scratch / "dd-floor.bin"
    count = -(-out_bytes // 2**24)
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fdatasync"],
                   capture_output=True, check=True)
    write = time.perf_counter() - t0
    target.unlink()
    return {"read_s": read, "write_s": write, "floor_s": read + write}


def startup(evomerge_root: Path) -> float:
    """Wall time of `mergekit-yaml --version` (the interpreter, `import torch` and the engine's imports):
    no output byte can be computed, so none written, before it is over."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(evomerge_root)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "merge_engine.cli", "--version"], capture_output=True, check=True,
                   env=env, cwd=str(evomerge_root))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- runs

def compare(method: str, paths: list[Path], work: Path, repeats: int, evomerge_root: Path,
            mk_python: Path, baseline_root: Path | None = None) -> dict:
    r = recipe(method, *paths)
    recipe_path = work / f"{method}.yml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(r))
    inputs = recipe_inputs(r)
    pairs = []
    for k in range(repeats):
        for f in inputs:  # page cache warm for both tools
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
        before = (run_tool("evomerge", recipe_path, work / "out-before", baseline_root, mk_python)
                  if baseline_root else None)
        evo = run_tool("evomerge", recipe_path, work / "out-evomerge", evomerge_root, mk_python)
        mk = run_tool("mergekit", recipe_path, work / "out-mergekit", evomerge_root, mk_python)
        floor = io_floor(inputs, evo["output_bytes"], work) | {"startup_s": startup(evomerge_root)}
        pair = {"evomerge": evo, "mergekit": mk, "io": floor, "speedup": mk["wall_s"] / evo["wall_s"]}
        if before:
            pair |= {"before": before, "speedup_before": mk["wall_s"] / before["wall_s"]}
            print(f"  {method} before: {before['wall_s']:.1f}s (cpu {before['cpu_s']:.1f}s) "
                  f"{before['peak_rss_mib']:.0f}MiB | x{pair['speedup_before']:.2f}", flush=True)
        print(f"  {method} pair {k + 1}: evomerge {evo['wall_s']:.1f}s (cpu {evo['cpu_s']:.1f}s) "
              f"{evo['peak_rss_mib']:.0f}MiB | mergekit {mk['wall_s']:.1f}s (cpu {mk['cpu_s']:.1f}s) "
              f"{mk['peak_rss_mib']:.0f}MiB | x{pair['speedup']:.2f} | "
              f"floor {floor['read_s']:.1f}+{floor['write_s']:.1f}s | start-up {floor['startup_s']:.2f}s",
              flush=True)
        pairs.append(pair)
    med = statistics.median
    summary = {}
    if baseline_root:
        summary = {"before_s": med(p["before"]["wall_s"] for p in pairs),
                   "before_rss_mib": max(p["before"]["peak_rss_mib"] for p in pairs),
                   "speedup_before": med(p["speedup_before"] for p in pairs),
                   "speedup_before_min": min(p["speedup_before"] for p in pairs),
                   "speedup_before_max": max(p["speedup_before"] for p in pairs)}
    return summary | {"method": method, "pairs": pairs,
            "evomerge_s": med(p["evomerge"]["wall_s"] for p in pairs),
            "mergekit_s": med(p["mergekit"]["wall_s"] for p in pairs),
            "speedup": med(p["speedup"] for p in pairs),
            "speedup_min": min(p["speedup"] for p in pairs), "speedup_max": max(p["speedup"] for p in pairs),
            "evomerge_rss_mib": max(p["evomerge"]["peak_rss_mib"] for p in pairs),
            "mergekit_rss_mib": max(p["mergekit"]["peak_rss_mib"] for p in pairs),
            "floor_read_s": med(p["io"]["read_s"] for p in pairs),
            "floor_write_s": med(p["io"]["write_s"] for p in pairs),
            "floor_s": med(p["io"]["floor_s"] for p in pairs),
            "vs_floor": med(p["evomerge"]["wall_s"] / p["io"]["floor_s"] for p in pairs),
            # a merge that writes its output durably cannot end before start-up plus the write floor
            "startup_s": med(p["io"]["startup_s"] for p in pairs),
            "bound_s": med(p["io"]["startup_s"] + p["io"]["write_s"] for p in pairs),
            "vs_bound": med(p["evomerge"]["wall_s"] / (p["io"]["startup_s"] + p["io"]["write_s"]) for p in pairs),
            "max_speedup": med(p["mergekit"]["wall_s"] / (p["io"]["startup_s"] + p["io"]["write_s"])
                               for p in pairs)}


def flatness(cache: Path, work: Path, layers: list[int], methods: list[str], evomerge_root: Path,
             repeats: int = 1) -> list[dict]:
    """evomerge's peak RSS per method at each depth (same width, so the same largest tensor): the median
    and range of `repeats` runs, the depths alternating (one run's peak varies with what is in flight)."""
    import yaml

    paths = {n: models(cache, n) for n in layers}
    runs: dict[tuple[int, str], list[dict]] = {}
    for method in methods:
        for _ in range(repeats):
            for n in layers:
                recipe_path = work / f"{method}-{n}L.yml"
                recipe_path.write_text(yaml.safe_dump(recipe(method, *paths[n])))
                res = run_tool("evomerge", recipe_path, work / "out-evomerge", evomerge_root, Path())
                runs.setdefault((n, method), []).append(res)
                print(f"  flatness {n}L {method}: {res['wall_s']:.1f}s {res['peak_rss_mib']:.0f}MiB", flush=True)
    return [{"layers": n, "params_m": round(count_params(paths[n][0]) / 1e6), "method": method,
             "wall_s": statistics.median(r["wall_s"] for r in rs),
             "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
             "peak_rss_range_mib": [min(r["peak_rss_mib"] for r in rs), max(r["peak_rss_mib"] for r in rs)]}
            for (n, method), rs in sorted(runs.items())]


def materialize(paths: list[Path], roots: dict[str, Path], repeats: int, threads: int) -> dict:
    """In-memory vs on-disk candidate materialization through the search's public API, in a child
    process per checkout and mode (so each one's RSS is its own); `roots` maps a label ("before",
    "after") to a checkout, all measured in the same run."""
    from evolve.demo.tokenizer import char_tokenizer

    for path in paths:  # loading a model for scoring needs a tokenizer; the merge does not
        if not (path / "tokenizer_config.json").exists():
            char_tokenizer().save_pretrained(str(path))
    out: dict = {"threads": threads}
    for label, root in roots.items():
        for mode in ("in-memory", "on-disk"):
            code = MATERIALIZE_CHILD.format(mode=mode, repeats=repeats, threads=threads,
                                            base=str(paths[0]), a=str(paths[1]), b=str(paths[2]))
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(root)}
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                  cwd=str(root))
            if proc.returncode != 0:
                raise RuntimeError(f"materialize {label} {mode} failed:\n{proc.stderr[-3000:]}")
            out[f"{label} {mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  materialize {label} {mode}: {out[f'{label} {mode}']}", flush=True)
        out[f"{label} speedup"] = out[f"{label} on-disk"]["median_s"] / out[f"{label} in-memory"]["median_s"]
    return out


MATERIALIZE_CHILD = r"""
import json, statistics, tempfile, time
import torch
torch.set_num_threads({threads})
from merge_engine.config import MergeConfig
from evolve import materialize
def rss(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
recipes = [MergeConfig.model_validate({{"merge_method": "task_arithmetic", "base_model": "{base}", "dtype": "bfloat16",
           "models": [{{"model": "{a}", "parameters": {{"weight": w}}}},
                      {{"model": "{b}", "parameters": {{"weight": 1 - w}}}}]}})
           for w in (0.3, 0.5, 0.7, 0.4, 0.6, 0.2, 0.8)]
t0 = time.perf_counter()
if "{mode}" == "in-memory":
    m = materialize.InMemoryMaterializer("{base}")
else:
    m = materialize.OnDiskMaterializer(tempfile.mkdtemp(prefix="evomerge-bench-"))
setup = time.perf_counter() - t0
m.materialize(recipes[0])  # warm-up: first reads of the inputs
times = []
for r in recipes[1:1 + {repeats}]:
    t0 = time.perf_counter()
    model, tok = m.materialize(r)
    times.append(time.perf_counter() - t0)
    del model
m.release()
print(json.dumps({{"setup_s": setup, "times_s": times, "median_s": statistics.median(times),
                  "rss_now_mib": rss("VmRSS:"), "peak_rss_mib": rss("VmHWM:")}}))
"""


# ----------------------------------------------------------------------------- report

def table(rows: list[dict]) -> list[str]:
    before = all("before_s" in r for r in rows)
    head = "| method | evomerge (s) | mergekit (s) | speed-up median (min-max) | evomerge RSS (MiB) | " \
           "mergekit RSS (MiB) | I/O floor read+write (s) | evomerge / floor | start-up (s) | " \
           "bound: start-up + write (s) | evomerge / bound | most speed-up over mergekit a bound allows |"
    if before:
        head += " before (s) | before speed-up median (min-max) | before RSS (MiB) |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        line = (f"| {r['method']} | {r['evomerge_s']:.1f} | {r['mergekit_s']:.1f} | {r['speedup']:.2f}x "
                f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['evomerge_rss_mib']:.0f} | "
                f"{r['mergekit_rss_mib']:.0f} | {r['floor_read_s']:.1f}+{r['floor_write_s']:.1f}"
                f"={r['floor_s']:.1f} | {r['vs_floor']:.2f} | {r['startup_s']:.2f} | {r['bound_s']:.2f} | "
                f"{r['vs_bound']:.2f} | {r['max_speedup']:.2f}x |")
        if before:
            line += (f" {r['before_s']:.1f} | {r['speedup_before']:.2f}x ({r['speedup_before_min']:.2f}-"
                     f"{r['speedup_before_max']:.2f}) | {r['before_rss_mib']:.0f} |")
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=ALL_METHODS, choices=ALL_METHODS)
    ap.add_argument("--repeats", type=int, default=2, help="pairs (evomerge, mergekit) per method")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--flatness", action="store_true", help="also evomerge's peak RSS at 12 vs 48 layers")
    ap.add_argument("--flat-layers", type=int, nargs=2, default=[12, 48])
    ap.add_argument("--flat-repeats", type=int, default=1, help="runs per depth and method (median and range)")
    ap.add_argument("--flat-methods", nargs="+", default=["linear", "ties", "dare_ties", "della", "breadcrumbs"],
                    choices=ALL_METHODS)
    ap.add_argument("--materialize", action="store_true", help="also the search's candidate materialization")
    ap.add_argument("--materialize-repeats", type=int, default=3, help="candidates timed per mode")
    ap.add_argument("--materialize-threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads in each materialization child (a single search worker gets all cores)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-models")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-speed-bench"))
    ap.add_argument("--evomerge-root", type=Path, default=ROOT, help="checkout whose evomerge is measured")
    ap.add_argument("--baseline-root", type=Path, default=None,
                    help="an older checkout (e.g. a git worktree) also measured in every run, before evomerge "
                         "and mergekit: the 'before' columns")
    ap.add_argument("--tag", default="", help="results file suffix, e.g. 'before'")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = models(args.cache, args.layers)
    params = count_params(paths[0])
    mk_python = mergekit_python() if args.methods else Path()
    print(f"{len(paths)} models of {params / 1e6:.0f}M parameters; evomerge from {args.evomerge_root}", flush=True)
    rows, failed = [], {}
    for m in args.methods:
        try:
            rows.append(compare(m, paths, args.workdir, args.repeats, args.evomerge_root.resolve(), mk_python,
                                args.baseline_root.resolve() if args.baseline_root else None))
        except RuntimeError as e:  # one tool failing on one method must not lose the other rows
            print(f"  {m}: {e}", flush=True)
            failed[m] = str(e)[-2000:]
    flat = (flatness(args.cache, args.workdir, args.flat_layers, args.flat_methods, args.evomerge_root.resolve(),
                     args.flat_repeats) if args.flatness else [])
    roots = {"after": args.evomerge_root.resolve()}
    if args.baseline_root:
        roots = {"before": args.baseline_root.resolve()} | roots
    mat = materialize(paths, roots, args.materialize_repeats, args.materialize_threads) if args.materialize else None
    commit = subprocess.run(["git", "-C", str(args.evomerge_root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    baseline = (subprocess.run(["git", "-C", str(args.baseline_root), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True).stdout.strip() if args.baseline_root else None)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_at_end": os.getloadavg(),
            "evomerge_commit": commit, "baseline_commit": baseline, "mergekit": MERGEKIT_VERSION,
            "params_per_model": params,
            "layers": args.layers, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [f"evomerge {commit} vs mergekit {MERGEKIT_VERSION}, 3 Llama models of {params / 1e6:.0f}M parameters "
             f"(bf16), {args.repeats} paired run(s) per method, {meta['machine']}, {meta['date']}"
             + (f"; before = evomerge {baseline}, run first in each pair" if baseline else ""), ""]
    lines += table(rows) if rows else []
    lines += [f"- {m} failed: {e.strip().splitlines()[-1]}" for m, e in failed.items()]
    if flat:
        lines += ["", "| layers | params/model | method | evomerge wall (s) | evomerge peak RSS (MiB), median "
                  "(min-max) |", "|---|---|---|---|---|"]
        lines += [f"| {r['layers']} | {r['params_m']}M | {r['method']} | {r['wall_s']:.1f} | "
                  f"{r['peak_rss_mib']:.0f} ({r['peak_rss_range_mib'][0]:.0f}-{r['peak_rss_range_mib'][1]:.0f}) |"
                  for r in flat]
    if mat:
        lines += ["", f"| candidate materialization (task_arithmetic of 2 + base, {mat['threads']} torch threads) | "
                  "median (s) | times (s) | peak RSS (MiB) | RSS held (MiB) |", "|---|---|---|---|---|"]
        for label in [k.removesuffix(" speedup") for k in mat if k.endswith(" speedup")]:
            for mode in ("in-memory", "on-disk"):
                r = mat[f"{label} {mode}"]
                lines.append(f"| {label}: {mode} | {r['median_s']:.2f} | "
                             f"{', '.join(f'{t:.2f}' for t in r['times_s'])} | {r['peak_rss_mib']:.0f} | "
                             f"{r['rss_now_mib']:.0f} |")
            lines.append(f"| {label}: in-memory speed-up | {mat[label + ' speedup']:.1f}x | | | |")
    suffix = f"-{args.tag}" if args.tag else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"speed_vs_mergekit{suffix}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "failed": failed, "flatness": flat, "materialize": mat}, indent=2))
    (RESULTS / f"speed_vs_mergekit{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
