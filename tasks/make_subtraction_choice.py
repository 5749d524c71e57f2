"""Data of the worked example in docs/writing-tasks.md: three-way multiple choice on 2-digit
subtraction (`75-23=` -> one of `52`, `42`, `53`). Deterministic; run from anywhere:

    python tasks/make_subtraction_choice.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"
SIZES = {"validation": 100, "test": 100}  # validation: the search's fitness; test: held out


def problems(rng: random.Random) -> list[dict]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, a + 1) if a - b >= 11]
    rng.shuffle(pairs)
    out = []
    for a, b in pairs[:sum(SIZES.values())]:
        right = a - b
        choices = [str(right), str(right - 10), str(right + 1)]  # a tens slip and an off-by-one
        rng.shuffle(choices)
        out.append({"prompt": f"{a}-{b}=", "choices": choices, "label": choices.index(str(right))})
    return out


def main() -> None:
    rows = problems(random.Random(11))
    start = 0
    for split, size in SIZES.items():
        path = DATA / f"subtraction_choice.{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        start += size
        print(f"wrote {size} problems to {path}")


if __name__ == "__main__":
    main()
