"""Deterministically generate the bundled tasks' data (run from anywhere):

    python tasks/generate_data.py

Each task gets train (fine-tuning), validation (search fitness) and test (held-out)
splits; a problem appears in exactly one split.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

DATA = Path(__file__).parent / "data"
SIZES = {"validation": 200, "test": 300}
TRAIN_SIZE = 6000
SEED = 20261123


def addition_problems(rng: random.Random) -> list[dict]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def reversal_problems(rng: random.Random) -> list[dict]:
    seen: set[str] = set()
    out = []
    while len(out) < TRAIN_SIZE + sum(SIZES.values()):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word not in seen:
            seen.add(word)
            out.append({"prompt": f"{word}>", "answer": word[::-1]})
    return out


def subtraction_problems(rng: random.Random) -> list[dict]:
    pairs = [(a, b) for a in range(100) for b in range(a + 1)]
    rng.shuffle(pairs)
    return [{"prompt": f"{a}-{b}=", "answer": str(a - b)} for a, b in pairs]


def sorting_problems(rng: random.Random) -> list[dict]:
    seen: set[str] = set()
    out = []
    while len(out) < TRAIN_SIZE + sum(SIZES.values()):
        word = "".join(rng.sample(string.ascii_lowercase, rng.randint(3, 6)))
        if word not in seen:
            seen.add(word)
            out.append({"prompt": f"{word}=", "answer": "".join(sorted(word))})
    return out


def split(problems: list[dict]) -> dict[str, list[dict]]:
    v, t = SIZES["validation"], SIZES["test"]
    return {"validation": problems[:v], "test": problems[v:v + t], "train": problems[v + t:v + t + TRAIN_SIZE]}


def main() -> None:
    DATA.mkdir(exist_ok=True)
    tasks = (("addition", addition_problems), ("reversal", reversal_problems),  # the demo's pair
             ("subtraction", subtraction_problems), ("sorting", sorting_problems))  # bench/search_quality.py's second
    for name, make in tasks:
        splits = split(make(random.Random(f"{SEED}-{name}")))
        prompts = [{d["prompt"] for d in docs} for docs in splits.values()]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
        for split_name, docs in splits.items():
            with open(DATA / f"{name}.{split_name}.jsonl", "w") as f:
                for d in docs:
                    f.write(json.dumps(d) + "\n")
        print(name, {k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
