"""Compatibility check against mergekit 0.1.5 (PyPI): the same recipe, tensor by tensor.

    python bench/compat_mergekit.py [--workdir /tmp/evomerge-compat] [--families llama qwen2]
                                    [--groups methods slices tokenizer dtype] [--methods ties ...]
                                    [--mergekit-workers 2] [--name compat_mergekit]

mergekit runs from an isolated venv: $EVOMERGE_MERGEKIT_VENV, else <repo>/.cache/mergekit-0.1.5,
created there when missing (`python -m venv`, `pip install torch==2.13.0`, `pip install
mergekit==0.1.5`). evomerge is the repository this script sits in (PYTHONPATH=<repo>).

Tiny models (bench/compat_models.py: Llama untied and tied, Qwen2 fp32 with biases, Mistral
GQA; 4 layers, hidden 32, a trained BPE tokenizer) are merged by both tools with the same
recipe, for a matrix of every method x {scalar, gradient, filter parameters} x {models:,
slices with remapped layer ranges, slice-level base_model} x tokenizer options x dtype.
Both tools run their `mergekit-yaml` entry point in-process, many recipes per process
(bench/_compat_driver.py; mergekit in --mergekit-workers processes, evomerge in one), side by side,
with --random-seed 0. About 5-15 minutes for the 352 cells on 2 busy cores.

Each cell compares every output tensor (identical bits / within tolerance / differs, with max
abs and relative L2 = |ours - mk| / |mk|), config.json (keys that differ) and the tokenizer
files (byte-identical or not; the encodings of test sentences). Tolerance: allclose with
rtol 1e-5, atol 1e-6 for float32 outputs, rtol 2^-7 (one bf16 step), atol 1e-5 for bfloat16,
rtol 2^-10, atol 1e-6 for float16. Writes bench/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compat_models import FAMILIES, TEST_SENTENCES, build_all  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -7, 1e-5), torch.float16: (2 ** -10, 1e-6)}
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}


# ---------------------------------------------------------------- the mergekit venv
def mergekit_venv() -> Path:
    env = os.environ.get("EVOMERGE_MERGEKIT_VENV")
    venv = Path(env) if env else REPO / ".cache" / f"mergekit-{MERGEKIT_VERSION}"
    if (venv / "bin" / "mergekit-yaml").exists():
        return venv
    if env:
        raise SystemExit(f"error: EVOMERGE_MERGEKIT_VENV={env} has no bin/mergekit-yaml; unset it to build "
                         f"{REPO / '.cache'}/mergekit-{MERGEKIT_VERSION}")
    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return venv


# ---------------------------------------------------------------- the matrix
@dataclass
class MethodCase:
    uses_base: bool
    models: list[str]
    per_model: list[dict[str, Any]]
    glob: dict[str, Any] = field(default_factory=dict)
    vary: str | None = None  # the parameter given as a gradient / filter list


def _w(*ws: float) -> list[dict[str, Any]]:
    return [{"weight": w} for w in ws]


def _wd(ws: tuple[float, ...], ds: tuple[float, ...], **extra: Any) -> list[dict[str, Any]]:
    return [{"weight": w, "density": d, **extra} for w, d in zip(ws, ds, strict=True)]


THREE = ["ft1", "ft2", "ft3"]
METHODS: dict[str, MethodCase] = {
    "linear": MethodCase(False, THREE, _w(0.5, 0.3, 0.2), vary="weight"),
    "task_arithmetic": MethodCase(True, THREE, _w(0.5, 0.3, 0.4), vary="weight"),
    "ties": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.5, 0.7, 0.3)), vary="density"),
    "dare_ties": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.5, 0.7, 0.3)), vary="density"),
    "dare_linear": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.5, 0.7, 0.3)), vary="density"),
    "breadcrumbs": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.8, 0.9, 0.7), gamma=0.05), vary="density"),
    "breadcrumbs_ties": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.8, 0.9, 0.7), gamma=0.05),
                                   vary="density"),
    "della": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.6, 0.7, 0.5), epsilon=0.1), vary="density"),
    "della_linear": MethodCase(True, THREE, _wd((0.5, 0.3, 0.4), (0.6, 0.7, 0.5), epsilon=0.1), vary="density"),
    "sce": MethodCase(True, THREE, [{}, {}, {}], {"select_topk": 0.5}, vary="select_topk"),
    "model_stock": MethodCase(True, THREE, [{}, {}, {}]),
    "karcher": MethodCase(False, THREE, [{}, {}, {}]),
    "multislerp": MethodCase(False, THREE, _w(0.5, 0.3, 0.2), vary="weight"),
    "nearswap": MethodCase(True, ["ft1"], [{}], {"t": 0.02}, vary="t"),
    "nuslerp": MethodCase(False, ["ft1", "ft2"], _w(0.7, 0.3), vary="weight"),
    "slerp": MethodCase(True, ["ft1"], [{}], {"t": 0.3}, vary="t"),
    "passthrough": MethodCase(False, ["ft1"], [{"scale": 0.8}], vary="scale"),
    "arcee_fusion": MethodCase(True, ["ft1"], [{}]),
    # task vectors are dense (randn * 0.01 .. 0.035): epsilon 0.02 leaves a mix of shared and unique entries
    "ram": MethodCase(True, THREE, [{}, {}, {}], {"epsilon": 0.02}, vary="epsilon"),
    "ramplus_tl": MethodCase(True, THREE, [{}, {}, {}], {"r": 0.5, "alpha": 0.5, "epsilon": 0.02}, vary="r"),
}


def _gradient(v: float) -> list[float]:
    return [round(v * 0.5, 4), v, round(min(1.0, v * 1.5), 4)]


def _filtered(v: float) -> list[dict[str, Any]]:
    return [{"filter": "self_attn", "value": round(v * 0.6, 4)}, {"filter": "mlp", "value": _gradient(v)},
            {"value": v}]


def _vary(case: MethodCase, form: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global parameters of a method for one parameter form."""
    per_model = [dict(p) for p in case.per_model]
    glob = dict(case.glob)
    if form not in ("gradient", "filter") or case.vary is None:
        return per_model, glob
    make = _gradient if form == "gradient" else _filtered
    if case.vary in glob:
        glob[case.vary] = make(glob[case.vary])
    for p in per_model:
        if case.vary in p:
            p[case.vary] = make(p[case.vary])
    return per_model, glob


def method_forms(method: str) -> list[str]:
    case = METHODS[method]
    forms = ["scalar"] + (["gradient", "filter"] if case.vary else [])
    return forms


def method_recipe(method: str, paths: dict[str, Path], form: str) -> dict[str, Any]:
    case = METHODS[method]
    per_model, glob = _vary(case, form)
    models = list(case.models)
    extra: dict[str, Any] = {}
    if form == "dense":  # randomized methods at density 1: deterministic
        for p in per_model:
            p["density"] = 1.0
    elif form == "with_base":
        extra["base_model"] = str(paths["base"])
    elif form == "row_wise":
        glob["nuslerp_row_wise"] = True
    elif form == "rescale":
        glob["rescale"] = True
    elif form == "tiny_density":
        for p in per_model:
            p["density"] = 0.01
    elif form == "filter_nomatch":  # a filter list with no catch-all entry
        for p in per_model:
            p["weight"] = [{"filter": "self_attn", "value": p["weight"]}]
    elif form == "defaults":  # the method's own defaults for its global parameters
        glob = {}
    elif form == "filter_star":
        for p in per_model:
            p["weight"] = [{"filter": "*", "value": p["weight"]}]
    recipe: dict[str, Any] = {"merge_method": method}
    if case.uses_base:
        recipe["base_model"] = str(paths["base"])
    recipe.update(extra)
    recipe["models"] = [{"model": str(paths[m]), **({"parameters": p} if p else {})}
                        for m, p in zip(models, per_model, strict=True)]
    if glob:
        recipe["parameters"] = glob
    return recipe


EXTRA_FORMS = {
    "dare_ties": ["dense"], "dare_linear": ["dense"], "della": ["dense"], "della_linear": ["dense"],
    "karcher": ["with_base"], "multislerp": ["with_base"], "nuslerp": ["with_base", "row_wise"],
    "ties": ["rescale", "tiny_density"], "task_arithmetic": ["rescale"], "breadcrumbs": ["rescale"],
    "linear": ["filter_nomatch", "filter_star"], "ram": ["defaults"], "ramplus_tl": ["defaults"],
}


def slice_recipe(method: str, paths: dict[str, Path], form: str) -> dict[str, Any]:
    """Two output slices from remapped layer ranges (4-layer models -> 4 or 6 layers).

    slices_remap: slice 0 takes layers [0, 2) of every model, slice 1 takes [2, 4) of the base
    and the first model but [1, 3) / [0, 2) of the others, with slice-level parameters and a
    filter on an input layer name. slices_base: slice 0 has its own base_model (ft3)."""
    case = METHODS[method]
    per_model, glob = _vary(case, "scalar")
    if method == "passthrough":
        return {"merge_method": method, "slices": [
            {"sources": [{"model": str(paths["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(paths["ft2"]), "layer_range": [1, 4]}],
             "parameters": {"scale": [{"filter": "layers.3.mlp", "value": 0.5}, {"value": 1.0}]}}]}
    names = list(case.models)
    ranges1 = [[2, 4], [1, 3], [0, 2]]
    slices = []
    for k in range(2):
        sources = []
        if case.uses_base:
            base_name = "ft3" if (form == "slices_base" and k == 0) else "base"
            sources.append({"model": str(paths[base_name]), "layer_range": [0, 2] if k == 0 else [2, 4]})
        src_names = names if not (form == "slices_base" and k == 0) else [n if n != "ft3" else "base" for n in names]
        for j, (n, p) in enumerate(zip(src_names, per_model, strict=True)):
            rng = [0, 2] if k == 0 else ranges1[j % 3]
            src: dict[str, Any] = {"model": str(paths[n]), "layer_range": rng}
            if p:
                src["parameters"] = dict(p)
            sources.append(src)
        slc: dict[str, Any] = {"sources": sources}
        if form == "slices_base" and k == 0 and case.uses_base:
            slc["base_model"] = str(paths["ft3"])
        if k == 1 and case.vary and form == "slices_remap":
            v = glob.get(case.vary, per_model[0].get(case.vary))
            slc["parameters"] = {case.vary: [{"filter": "layers.2.", "value": round(v * 0.5, 4)},
                                             {"filter": "layers.1.", "value": round(min(1.0, v * 1.4), 4)},
                                             {"value": v}]}
            for s in sources:
                s.get("parameters", {}).pop(case.vary, None)
                if "parameters" in s and not s["parameters"]:
                    del s["parameters"]
            glob.pop(case.vary, None)
        slices.append(slc)
    recipe: dict[str, Any] = {"merge_method": method}
    if case.uses_base:
        recipe["base_model"] = str(paths["base"])
    recipe["slices"] = slices
    if glob:
        recipe["parameters"] = glob
    if case.vary and case.vary in case.glob and form == "slices_remap":
        recipe["parameters"] = {**glob, case.vary: case.glob[case.vary]}
    return recipe


def tokenizer_recipes(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    b, f1, f2 = str(paths["base"]), str(paths["ft1"]), str(paths["ft2"])
    fx, fv = str(paths["ftx"]), str(paths["ftv"])

    def ta(models: list[str], **top: Any) -> dict[str, Any]:
        return {"merge_method": "task_arithmetic", "base_model": b,
                "models": [{"model": m, "parameters": {"weight": w}}
                           for m, w in zip(models, (0.6, 0.4), strict=True)], **top}

    custom = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    return {
        "default_copy": ta([f1, f2]),
        "source_base": ta([f1, f2], tokenizer_source="base"),
        "source_model": ta([f1, f2], tokenizer_source=f2),
        "source_union": ta([f1, f2], tokenizer_source="union"),
        "linear_union_added": {"merge_method": "linear", "models": [{"model": f1, "parameters": {"weight": 0.5}},
                                                                    {"model": fx, "parameters": {"weight": 0.5}}],
                               "tokenizer_source": "union"},
        "union_added_tokens": ta([f1, fx], tokenizer_source="union"),
        "union_other_vocab": ta([f1, fv], tokenizer_source="union"),
        "base_added_tokens": ta([f1, fx], tokenizer_source="base"),
        "model_added_tokens": ta([f1, fx], tokenizer_source=fx),
        "base_other_vocab": ta([f1, fv], tokenizer_source="base"),
        "pad_base": ta([f1, f2], tokenizer={"source": "base", "pad_to_multiple_of": 48}),
        "pad_only": ta([f1, f2], tokenizer={"pad_to_multiple_of": 48}),
        "pad_union_added": ta([f1, fx], tokenizer={"source": "union", "pad_to_multiple_of": 48}),
        "tokens_zero": ta([f1, fx], tokenizer={"source": "union",
                                                "tokens": {"<extra_0>": {"source": {"kind": "zero"}}}}),
        "tokens_from_model": ta([f1, fx], tokenizer={"source": "union", "tokens": {
            "<extra_1>": {"source": fx}, "Hello": {"source": {"kind": "model_token", "model": fx, "token": "<extra_2>"},
                                                    "force": True}}}),
        "chat_chatml": ta([f1, f2], chat_template="chatml"),
        "chat_llama3": ta([f1, f2], chat_template="llama3"),
        "chat_alpaca": ta([f1, f2], chat_template="alpaca"),
        "chat_custom": ta([f1, f2], chat_template=custom),
        "chat_auto": ta([f1, f2], chat_template="auto"),
        "chat_chatml_source_base": ta([f1, f2], chat_template="chatml", tokenizer_source="base"),
    }


DTYPE_CASES = {
    "dtype_float32": {"dtype": "float32"},
    "dtype_bfloat16": {"dtype": "bfloat16"},
    "dtype_float16": {"dtype": "float16"},
    "out_bfloat16": {"out_dtype": "bfloat16"},
    "f32_out_bf16": {"dtype": "float32", "out_dtype": "bfloat16"},
    "bf16_out_f32": {"dtype": "bfloat16", "out_dtype": "float32"},
}
DTYPE_METHODS = ["linear", "task_arithmetic", "slerp", "arcee_fusion", "ram", "ramplus_tl"]


@dataclass
class Cell:
    id: str
    group: str
    family: str
    method: str
    variant: str
    recipe: dict[str, Any]


def build_matrix(families: dict[str, dict[str, Path]], groups: list[str]) -> list[Cell]:
    cells: list[Cell] = []

    def add(group: str, fam: str, method: str, variant: str, recipe: dict[str, Any]) -> None:
        cells.append(Cell(f"{group}-{fam}-{method}-{variant}", group, fam, method, variant, recipe))

    for fam, paths in families.items():
        if "methods" in groups:
            for method in METHODS:
                for form in method_forms(method):
                    add("methods", fam, method, form, method_recipe(method, paths, form))
                if fam in ("llama", "qwen2"):
                    for form in EXTRA_FORMS.get(method, []):
                        add("methods", fam, method, form, method_recipe(method, paths, form))
        if "slices" in groups and fam in ("llama", "qwen2"):
            for method in METHODS:
                add("slices", fam, method, "slices_remap", slice_recipe(method, paths, "slices_remap"))
                if METHODS[method].uses_base:
                    add("slices", fam, method, "slices_base", slice_recipe(method, paths, "slices_base"))
        if "tokenizer" in groups and "ftx" in paths:
            for variant, recipe in tokenizer_recipes(paths).items():
                add("tokenizer", fam, recipe["merge_method"], variant, recipe)
        if "dtype" in groups and fam in ("llama", "qwen2"):
            for method in DTYPE_METHODS:
                for variant, extra in DTYPE_CASES.items():
                    add("dtype", fam, method, variant, {**method_recipe(method, paths, "scalar"), **extra})
    return cells


# ---------------------------------------------------------------- running
def run_tool(tool: str, python: str, cells: list[Cell], work: Path, env: dict[str, str],
             shard: int = 0) -> subprocess.Popen:
    jobs = [{"id": c.id, "recipe": str(work / "recipes" / f"{c.id}.yml"), "out": str(work / tool / c.id),
             "args": ["--random-seed", "0"] + (["--quiet"] if tool == "mergekit" else ["--no-progress"])}
            for c in cells]
    name = f"{tool}-{shard}"
    (work / f"jobs-{name}.json").write_text(json.dumps(jobs))
    return subprocess.Popen([python, str(REPO / "bench" / "_compat_driver.py"), tool, str(work / f"jobs-{name}.json"),
                             str(work / f"results-{name}.jsonl")], env=env, cwd=str(work),
                            stdout=subprocess.DEVNULL, stderr=open(work / f"driver-{name}.log", "w"))


# ---------------------------------------------------------------- comparing
def _load_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _token_permutation(ours: Path, mk: Path) -> torch.Tensor | None:
    """Where both tokenizers hold the same tokens under different ids: for each of mergekit's ids, our id."""
    from transformers import AutoTokenizer

    try:
        va = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
        vb = AutoTokenizer.from_pretrained(str(mk)).get_vocab()
    except Exception:  # noqa: BLE001 - no tokenizer, no permutation
        return None
    if va == vb or set(va) != set(vb) or sorted(vb.values()) != list(range(len(vb))):
        return None
    return torch.tensor([va[t] for t, _ in sorted(vb.items(), key=lambda kv: kv[1])])


def compare_tensors(ours: Path, mk: Path) -> dict[str, Any]:
    a, b = _load_tensors(ours), _load_tensors(mk)
    perm = _token_permutation(ours, mk)
    res_perm = perm is not None
    if perm is not None:  # compare vocabulary rows token by token (same tokens, other ids)
        a = {n: (t[perm] if t.dim() and t.shape[0] == perm.numel() else t) for n, t in a.items()}
    res: dict[str, Any] = {"only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
                           "identical": 0, "close": 0, "differs": [], "max_abs": 0.0, "max_rel_l2": 0.0}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            res["differs"].append({"name": name, "why": f"shape {list(x.shape)} vs {list(y.shape)}"})
            continue
        if x.dtype != y.dtype:  # still say how far apart the values are
            gap = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            res["max_abs"] = max(res["max_abs"], gap)
            res["differs"].append({"name": name, "max_abs": gap,
                                   "why": f"dtype {x.dtype} vs {y.dtype}, values max abs {gap:.3g}"})
            continue
        if torch.equal(x, y):
            res["identical"] += 1
            continue
        xf, yf = x.double(), y.double()
        max_abs = float((xf - yf).abs().max())
        rel = float((xf - yf).norm() / yf.norm().clamp_min(1e-30))
        res["max_abs"] = max(res["max_abs"], max_abs)
        res["max_rel_l2"] = max(res["max_rel_l2"], rel)
        rtol, atol = TOLERANCE.get(x.dtype, (1e-5, 1e-6))
        if torch.allclose(xf, yf, rtol=rtol, atol=atol):
            res["close"] += 1
        else:
            res["differs"].append({"name": name, "max_abs": max_abs, "rel_l2": rel})
    res["tensor_dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in a.values()})
    res["rows_matched_by_token"] = res_perm
    return res


def compare_config(ours: Path, mk: Path) -> dict[str, Any]:
    a = json.loads((ours / "config.json").read_text())
    b = json.loads((mk / "config.json").read_text())
    diff = {k: [a.get(k, "<absent>"), b.get(k, "<absent>")] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return diff


def compare_tokenizer(ours: Path, mk: Path) -> dict[str, Any]:
    files = {}
    for f in TOKENIZER_FILES:
        pa, pb = ours / f, mk / f
        if not pa.exists() and not pb.exists():
            continue
        if not pa.exists() or not pb.exists():
            files[f] = "only ours" if pa.exists() else "only mergekit"
        else:
            files[f] = "identical" if pa.read_bytes() == pb.read_bytes() else "differs"
    res: dict[str, Any] = {"files": files}
    try:
        from transformers import AutoTokenizer

        ta, tb = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(mk))
        enc_a = [ta(s)["input_ids"] for s in TEST_SENTENCES]
        enc_b = [tb(s)["input_ids"] for s in TEST_SENTENCES]
        res["encodings_agree"] = enc_a == enc_b
        if enc_a != enc_b:
            k = next(i for i in range(len(enc_a)) if enc_a[i] != enc_b[i])
            res["encoding_example"] = {"sentence": TEST_SENTENCES[k], "ours": enc_a[k], "mergekit": enc_b[k]}
        res["len"] = [len(ta), len(tb)]
        res["chat_template_agrees"] = ta.chat_template == tb.chat_template
    except Exception as e:  # noqa: BLE001 - a tokenizer that does not load is a finding
        res["load_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def classify(cell: Cell, ours: dict[str, Any], mk: dict[str, Any], work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {**{k: v for k, v in asdict(cell).items() if k != "recipe"}}
    if not ours["ok"] or not mk["ok"]:
        row["status"] = ("error-both" if not ours["ok"] and not mk["ok"] else
                         "error-ours" if not ours["ok"] else "error-mergekit")
        row["error_ours"] = ours["error"]
        row["error_mergekit"] = mk["error"]
        return row
    out_a, out_b = work / "evomerge" / cell.id, work / "mergekit" / cell.id
    t = compare_tensors(out_a, out_b)
    row["tensors"] = t
    row["config"] = compare_config(out_a, out_b)
    row["tokenizer"] = compare_tokenizer(out_a, out_b) if (out_b / "tokenizer_config.json").exists() or \
        (out_a / "tokenizer_config.json").exists() else {}
    if t["differs"] or t["only_ours"] or t["only_mergekit"]:
        row["status"] = "differs"
    elif t["close"]:
        row["status"] = "close"
    else:
        row["status"] = "identical"
    if mk.get("log"):
        row["mergekit_log"] = mk["log"][-400:]
    return row


# ---------------------------------------------------------------- report
def _fmt_diff(row: dict[str, Any]) -> str:
    if row["status"].startswith("error"):
        return f"ours: {row.get('error_ours')} / mergekit: {row.get('error_mergekit')}"
    t = row["tensors"]
    parts = []
    if t["differs"]:
        worst = max(t["differs"], key=lambda d: d.get("rel_l2", 1e9))
        names = ", ".join(d["name"].replace("model.", "") for d in t["differs"][:3])
        parts.append(f"{len(t['differs'])} tensors differ (max abs {t['max_abs']:.3g}, max rel L2 "
                     f"{t['max_rel_l2']:.3g}; worst {worst['name']}{' ' + worst['why'] if 'why' in worst else ''}; "
                     f"e.g. {names})")
    if t["only_ours"] or t["only_mergekit"]:
        parts.append(f"only ours: {t['only_ours'][:3]} only mergekit: {t['only_mergekit'][:3]}")
    if t["close"]:
        parts.append(f"{t['close']} within tol (max rel L2 {t['max_rel_l2']:.2g})")
    if t.get("rows_matched_by_token"):
        parts.append("same tokens under other ids: embedding rows compared token by token")
    return "; ".join(parts)


def _fmt_side(row: dict[str, Any]) -> str:
    parts = []
    if row.get("config"):
        parts.append("config: " + ", ".join(f"{k}={v[0]!r}/{v[1]!r}" for k, v in row["config"].items()))
    tok = row.get("tokenizer") or {}
    bad = {f: s for f, s in tok.get("files", {}).items() if s != "identical"}
    if bad:
        parts.append("tokenizer files: " + ", ".join(f"{f} {s}" for f, s in bad.items()))
    if tok.get("encodings_agree") is False:
        ex = tok["encoding_example"]
        parts.append(f"encodings differ ({len(ex['ours'])} vs {len(ex['mergekit'])} ids)")
    if "load_error" in tok:
        parts.append("tokenizer load: " + tok["load_error"])
    if tok.get("chat_template_agrees") is False:
        parts.append("chat_template differs")
    if tok.get("len") and tok["len"][0] != tok["len"][1]:
        parts.append(f"vocab {tok['len'][0]} vs {tok['len'][1]}")
    return "; ".join(parts)


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """A cell for the JSON file: the number of differing tensors and the 5 worst, not all of them."""
    row = dict(row)
    if "tensors" in row:
        t = dict(row["tensors"])
        t["n_differs"] = len(t["differs"])
        t["differs"] = sorted(t["differs"], key=lambda d: -d.get("rel_l2", 1e9))[:5]
        row["tensors"] = t
    return row


def write_report(rows: list[dict[str, Any]], name: str, meta: dict[str, Any]) -> str:
    statuses = ["identical", "close", "differs", "error-ours", "error-mergekit", "error-both"]
    by_key: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        key = (r["group"], r["method"])
        d = by_key.setdefault(key, {s: 0 for s in statuses} | {"config": 0, "tok_files": 0, "encodings": 0})
        d[r["status"]] += 1
        if r.get("config"):
            d["config"] += 1
        tok = r.get("tokenizer") or {}
        if any(s != "identical" for s in tok.get("files", {}).values()):
            d["tok_files"] += 1
        if tok.get("encodings_agree") is False or "load_error" in tok:
            d["encodings"] += 1
    totals = {s: sum(1 for r in rows if r["status"] == s) for s in statuses}
    lines = [f"# evomerge vs mergekit {MERGEKIT_VERSION}: tensor-by-tensor compatibility", "",
             f"{len(rows)} cells: " + ", ".join(f"{v} {k}" for k, v in totals.items()) + ".", "",
             f"Run: `{meta['command']}` on {meta['date']} ({meta['platform']}, torch {torch.__version__}, "
             f"{meta['seconds']:.0f} s). evomerge at {meta['evomerge_commit']}.", "",
             "Status per cell: **identical** (every tensor bit-equal, same names, shapes, dtypes), **close** "
             "(all within tolerance: allclose rtol 1e-5 / atol 1e-6 for float32, rtol 2^-7 / atol 1e-5 for "
             "bfloat16, rtol 2^-10 / atol 1e-6 for float16), **differs** (max abs and relative L2 "
             "|ours - mk| / |mk| of the worst tensor), error (the side(s) that failed). `config` = cells whose "
             "config.json differ, `tok files` = tokenizer files not byte-identical, `encodings` = test "
             "sentences encoded differently (or a tokenizer that does not load). Randomized methods "
             "(dare_*, della*) draw different masks in each tool: only their `dense` (density 1) cells are "
             "expected to match.", "",
             "| group | method | cells | identical | close | differs | err ours | err mk | err both | config | "
             "tok files | encodings |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (group, method), d in sorted(by_key.items()):
        n = sum(d[s] for s in statuses)
        lines.append(f"| {group} | {method} | {n} | " + " | ".join(str(d[s]) for s in statuses) +
                     f" | {d['config']} | {d['tok_files']} | {d['encodings']} |")
    lines += ["", "## Cells that are not identical", "",
              "| cell | status | tensors / errors | config, tokenizer |", "|---|---|---|---|"]
    for r in rows:
        side = _fmt_side(r) if not r["status"].startswith("error") else ""
        if r["status"] == "identical" and not side:
            continue
        lines.append(f"| {r['id']} | {r['status']} | {_fmt_diff(r)} | {side} |".replace("\n", " "))
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "cells": [_compact(r) for r in rows]},
                                                     indent=0, default=str))
    return "\n".join(lines[: 10 + len(by_key)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-compat"))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--groups", nargs="+", default=["methods", "slices", "tokenizer", "dtype"],
                    choices=["methods", "slices", "tokenizer", "dtype"])
    ap.add_argument("--methods", nargs="+", default=None, help="only these merge methods")
    ap.add_argument("--name", default="compat_mergekit", help="results file name under bench/results/")
    ap.add_argument("--mergekit-workers", type=int, default=2, help="mergekit processes (default 2)")
    args = ap.parse_args()
    start = time.perf_counter()
    venv = mergekit_venv()
    work = args.workdir.resolve()
    families = build_all(work / "models", args.families)
    cells = build_matrix(families, args.groups)
    if args.methods:
        cells = [c for c in cells if c.method in args.methods]
    for tool in ("mergekit", "evomerge"):
        d = work / tool
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
    (work / "recipes").mkdir(exist_ok=True)
    for c in cells:
        (work / "recipes" / f"{c.id}.yml").write_text(yaml.safe_dump(c.recipe, sort_keys=False))
    print(f"{len(cells)} cells; mergekit from {venv}; evomerge from {REPO}", flush=True)
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base_env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # mergekit takes about twice evomerge's time per cell: it gets `--mergekit-workers` processes
    procs = {f"mergekit-{k}": run_tool("mergekit", str(venv / "bin" / "python"), cells[k::args.mergekit_workers],
                                       work, base_env, k) for k in range(args.mergekit_workers)}
    procs["evomerge-0"] = run_tool("evomerge", sys.executable, cells, work, {**base_env, "PYTHONPATH": str(REPO)})
    for name, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"error: the {name} driver failed; see {work}/driver-{name}.log")
    results: dict[str, dict[str, Any]] = {"mergekit": {}, "evomerge": {}}
    for name in procs:
        for line in (work / f"results-{name}.jsonl").read_text().splitlines():
            results[name.split("-")[0]][json.loads(line)["id"]] = json.loads(line)
    rows = [classify(c, results["evomerge"][c.id], results["mergekit"][c.id], work) for c in cells]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"command": "python bench/compat_mergekit.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "platform": f"{platform.machine()}, {os.cpu_count()} cores",
            "seconds": time.perf_counter() - start, "evomerge_commit": commit,
            "seconds_mergekit": sum(r["seconds"] for r in results["mergekit"].values()),
            "seconds_evomerge": sum(r["seconds"] for r in results["evomerge"].values())}
    print(write_report(rows, args.name, meta))
    print(f"wrote {RESULTS / args.name}.md and .json")


if __name__ == "__main__":
    main()
