"""How much of each specialist can a task-arithmetic merge keep at all? (issue 9)

bench/search_ceiling.py reads what the searches found; this asks what they could have found. It learns the
merge's coefficients by gradient descent instead of searching them: merged = base + sum_i w_i * (model_i - base)
with one coefficient per model and per group of tensors, trained on the tasks' *train* split (the loss the
specialists were fine-tuned with: answer tokens only), then scored by greedy exact match on the validation split
(the search's fitness documents; the test split is not touched). No search with the same groups can do much
better than this with 100 evaluations, so a ceiling under 95% of a specialist says the target is out of reach of
the merge family, not of the optimizer.

Groups: `tensor` (one coefficient per tensor and model), `module` (per layer: attention, MLP, each norm; the
embeddings, head and final norm each on their own, which is what a genome with layer_granularity 1 and filters
self_attn, mlp, embed_tokens, lm_head comes close to), `global` (one per model: uniform task arithmetic).
`--range low:high` clamps the coefficients (e.g. 0:1, mergekit-evolve's weight range).

    python bench/merge_ceiling.py [--pairs demo,second] [--groups tensor,module,global] [--steps 300]
        [--range 0:1] --tag NAME

Results: bench/results/merge_ceiling-<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.func import functional_call  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from evolve.demo.build_models import PAIRS, batch_tensors, build_models, greedy_accuracy, load_train  # noqa: E402
from evolve.demo.tokenizer import char_tokenizer  # noqa: E402

CACHES = {"demo": ROOT / ".cache" / "demo_models", "second": ROOT / ".cache" / "second_pair_models"}
VALIDATION_PROBLEMS = 200


def group_of(name: str, groups: str) -> str:
    if groups == "tensor":
        return name
    if groups == "global":
        return "all"
    parts = name.split(".")  # module: model.layers.<i>.<self_attn|mlp|input_layernorm|...>.<...>
    if "layers" in parts:
        i = parts.index("layers")
        return f"layer {parts[i + 1]} {parts[i + 2]}"
    return name


def learn(pair: str, groups: str, steps: int, bounds: tuple[float, float] | None, seed: int = 0) -> dict:
    tasks = PAIRS[pair][0]
    paths = build_models(CACHES[pair], pair=pair)
    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(str(paths["base"])).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    base = {k: v.float() for k, v in load_file(str(paths["base"] / "model.safetensors")).items()}
    vectors = []
    for t in tasks:
        tuned = load_file(str(paths[t] / "model.safetensors"))
        vectors.append({k: tuned[k].float() - base[k] for k in base})
    names = sorted({group_of(k, groups) for k in base})
    index = {g: i for i, g in enumerate(names)}
    coef = torch.ones(len(tasks), len(names), requires_grad=True)  # start at uniform task arithmetic (1.0)
    opt = torch.optim.Adam([coef], lr=0.02)
    data = {t: load_train(t) for t in tasks}
    rng = random.Random(seed)

    def merged() -> dict[str, torch.Tensor]:
        return {k: base[k] + sum(coef[i, index[group_of(k, groups)]] * vectors[i][k] for i in range(len(tasks)))
                for k in base}

    t0 = time.perf_counter()
    for _ in range(steps):
        loss = torch.zeros(())
        for t in tasks:
            ids, labels = batch_tensors(tok, rng.sample(data[t], 32))
            loss = loss + functional_call(model, merged(), kwargs={"input_ids": ids, "labels": labels}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bounds is not None:
            with torch.no_grad():
                coef.clamp_(*bounds)
    with torch.no_grad():
        model.load_state_dict(merged(), strict=False)
    scores = {t: greedy_accuracy(model, tok, t, n=VALIDATION_PROBLEMS) for t in tasks}
    specialists = {t: greedy_accuracy(LlamaForCausalLM.from_pretrained(str(paths[t])).eval(), tok, t,
                                      n=VALIDATION_PROBLEMS) for t in tasks}
    return {"pair": pair, "groups": groups, "coefficients": coef.numel(), "steps": steps,
            "range": list(bounds) if bounds else None, "scores": scores, "specialists": specialists,
            "ratios": {t: scores[t] / specialists[t] for t in tasks},
            "coefficient_range": [round(coef.min().item(), 3), round(coef.max().item(), 3)],
            "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| pair | groups | coefficients | range | task 1: merge / specialist | task 2: merge / specialist "
             "| learned coefficients span |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{t} {r['scores'][t]:.3f} / {r['specialists'][t]:.3f} = {r['ratios'][t]:.1%}" for t in r["scores"]]
        span = r["range"] and f"[{r['range'][0]:g}, {r['range'][1]:g}]" or "free"
        lines.append(f"| {r['pair']} | {r['groups']} | {r['coefficients']} | {span} | {cells[0]} | {cells[1]} | "
                     f"{r['coefficient_range'][0]:g} .. {r['coefficient_range'][1]:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="demo,second", help="comma-separated: demo, second")
    ap.add_argument("--groups", default="tensor,module,global", help="comma-separated: tensor, module, global")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps (batch of 32 problems per task)")
    ap.add_argument("--range", help="clamp the coefficients to low:high (default: free)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--tag", required=True, help="names the results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bounds = tuple(float(x) for x in args.range.split(":")) if args.range else None
    rows = []
    for pair in args.pairs.split(","):
        for groups in args.groups.split(","):
            rows.append(learn(pair, groups, args.steps, bounds))  # type: ignore[arg-type]
            print(table(rows[-1:]).split("\n")[2], flush=True)
    text = f"# Merge ceiling: {args.tag}\n\nsettings: {json.dumps(vars(args))}\n\n{table(rows)}\n"
    print(text)
    out = ROOT / "bench" / "results" / f"merge_ceiling-{args.tag}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
