"""Which finished candidate should a search export? (issue 9)

Reads the histories a bench/search_quality.py run kept (.cache/search_quality/<tag>/<pair>/seed<k>) and
scores, on the held-out test split, the merge each rule picks from the same evaluations (no new search):
`best` (the highest validation fitness: what mergekit-evolve exports), `smooth<h>` (the highest fitness after
a Gaussian-kernel average over the candidates within ~h in genome space: less winner's curse), and
`lastgen_mean` (the mean genome of the last generation, scored anew). Only for genomes whose values are the
recipe's weights in the order (model, filter) of configs/search.yml's 6 genes.

    python bench/final_pick.py --tag s19-g0mean

Results: bench/results/final_pick-<tag>.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.demo.__main__ import held_out_table  # noqa: E402
from evolve.demo.build_models import PAIRS  # noqa: E402


def with_genome(recipe: dict, genome: np.ndarray) -> dict:
    """The recipe with the 6-gene genome's values: (attention, MLP, rest) x (model 1, model 2)."""
    out = copy.deepcopy(recipe)
    for (f, m), v in zip([(f, m) for f in range(3) for m in range(2)], genome, strict=True):
        out["models"][m]["parameters"]["weight"][f]["value"] = float(round(v, 4))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="the bench/search_quality.py run whose histories to read")
    args = ap.parse_args()
    res = json.loads((ROOT / "bench" / "results" / f"search_quality-{args.tag}.json").read_text())
    lines = ["| pair | seed | rule | worst test ratio | test margin | validation mean |", "|---|---|---|---|---|---|"]
    summary = collections.defaultdict(list)
    for row in res["rows"]:
        pair, seed = row["pair"], row["seed"]
        tasks = {t: f"evo_{t}" for t in PAIRS[pair][0]}
        path = ROOT / ".cache" / "search_quality" / args.tag / pair / f"seed{seed}" / "history.jsonl"
        hist = [h for h in map(json.loads, path.read_text().splitlines()) if h["ok"] and h.get("fidelity", 1) == 1]
        genomes, fitness = np.array([h["genome"] for h in hist]), np.array([h["fitness"] for h in hist])
        picks = {"best": hist[int(np.argmax(fitness))]["recipe"]}
        d2 = ((genomes[:, None, :] - genomes[None, :, :]) ** 2).sum(-1)
        for h in (0.05, 0.1, 0.2):
            kernel = np.exp(-d2 / (2 * h * h))
            picks[f"smooth{h}"] = hist[int(np.argmax(kernel @ fitness / kernel.sum(1)))]["recipe"]
        last = max(h["generation"] for h in hist)
        picks["lastgen_mean"] = with_genome(hist[0]["recipe"], genomes[[h["generation"] == last for h in hist]].mean(0))
        base = str(hist[0]["recipe"]["base_model"])
        test = held_out_table(picks, base, seed, tasks)
        val = held_out_table(picks, base, seed, tasks, split="validation")
        spec = {t: row["held_out"][f"{t} specialist"][tasks[t]] for t in tasks}
        for rule in picks:
            worst = min(test[rule][tasks[t]] / spec[t] for t in tasks)
            margin = 100 * (sum(test[rule].values()) / 2 - row["best_uniform_mean"])
            val_mean = sum(val[rule].values()) / 2
            lines.append(f"| {pair} | {seed} | {rule} | {worst:.1%} | {margin:+.1f} | {val_mean:.3f} |")
            summary[(pair, rule)].append((worst, margin))
            print(lines[-1], flush=True)
    lines += ["", "| pair | rule | worst test ratio over seeds | mean test margin |", "|---|---|---|---|"]
    lines += [f"| {p} | {r} | {min(w for w, _ in xs):.1%} | {np.mean([m for _, m in xs]):+.1f} |"
              for (p, r), xs in summary.items()]
    out = ROOT / "bench" / "results" / f"final_pick-{args.tag}.md"
    out.write_text(f"# Final pick rules on {args.tag}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines[-len(summary) - 2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
