"""How far could the searches of bench/search_quality.py have gone? Reads their history.jsonl files (no
model is scored) and prints, per run tag and pair, the best "worst task ratio" any evaluated candidate
reached on the validation split: min over tasks of score / best source model's score (from the
references.json of a run with --normalize, or the one given with --references).

    python bench/search_ceiling.py [--tags before-demo harmonic-demo ...]

A ceiling well under 95% says the genome cannot keep both skills for these models, whatever the
search does with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".cache" / "search_quality"


def references(pair: str) -> dict[str, float] | None:
    for path in sorted(ROOT.glob(f"*/{pair}/seed*/references.json")):
        table = json.loads(path.read_text())["fitness"]
        tasks = next(iter(table.values())).keys()
        return {t: max(row[t] for row in table.values()) for t in tasks}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tags", nargs="*", help="run tags (default: every tag under .cache/search_quality)")
    args = ap.parse_args()
    tags = args.tags or sorted(p.name for p in ROOT.iterdir() if p.is_dir())
    print("| tag | pair | candidates | best worst-task ratio (validation) | its scores |")
    print("|---|---|---|---|---|")
    for tag in tags:
        for pair_dir in sorted((ROOT / tag).iterdir()):
            refs = references(pair_dir.name)
            if refs is None:
                continue
            best: tuple[float, dict] = (-1.0, {})
            n = 0
            for history in sorted(pair_dir.glob("seed*/history.jsonl")):
                for line in history.read_text().splitlines():
                    record = json.loads(line)
                    if record["ok"]:
                        n += 1
                        ratio = min(record["scores"][t] / refs[t] for t in refs)
                        best = max(best, (ratio, record["scores"]), key=lambda b: b[0])
            scores = ", ".join(f"{t} {v:.3f}" for t, v in best[1].items())
            print(f"| {tag} | {pair_dir.name} | {n} | {best[0]:.1%} | {scores} |")


if __name__ == "__main__":
    main()
