"""One scored candidate: the search's unit of work and the line format of history.jsonl.

`Candidate.to_json` / `Candidate.from_json` are the only place that knows the record's
keys; search, resume, report and export all go through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from merge_engine.config import MergeConfig, parse_recipe

from .scoring import Score

FIELDS = ("index", "generation", "recipe_hash", "genome", "fitness", "scores", "ok", "error", "merge_seconds",
          "score_seconds", "recipe")


class RecordError(ValueError):
    """A history line that is not a complete candidate record."""


@dataclass(frozen=True)
class Candidate:
    index: int  # position in history.jsonl (order of completion)
    generation: int
    key: str  # recipe_key(recipe): identical recipes are scored once
    recipe: MergeConfig
    genome: list[float]
    score: Score
    fidelity: float = 1.0  # fraction of every task's documents scored: < 1 for a screening (search --screen)

    def to_json(self) -> dict[str, Any]:
        s = self.score
        record = {"index": self.index, "generation": self.generation, "recipe_hash": self.key, "genome": self.genome,
                  "fitness": s.fitness, "scores": s.per_task, "ok": s.ok, "error": s.error,
                  "merge_seconds": round(s.merge_seconds, 4), "score_seconds": round(s.score_seconds, 4),
                  "recipe": self.recipe.model_dump(mode="json", exclude_none=True)}
        if self.fidelity != 1.0:  # full evaluations keep the record mergekit-era readers know
            record["fidelity"] = self.fidelity
        return record

    @classmethod
    def from_json(cls, data: Any) -> Candidate:
        """Raises RecordError naming what is wrong (a line that is not an object, missing keys, bad types)."""
        if not isinstance(data, dict):
            raise RecordError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in FIELDS if k not in data]
        if missing:
            raise RecordError(f"missing key(s) {', '.join(missing)}")
        try:
            fitness = float(data["fitness"])
            scores = {str(k): float(v) for k, v in data["scores"].items()}
            score = Score(fitness, scores, bool(data["ok"]), data["error"], float(data["merge_seconds"]),
                          float(data["score_seconds"]))
            candidate = cls(int(data["index"]), int(data["generation"]), str(data["recipe_hash"]),
                            parse_recipe(data["recipe"], "history record"), [float(v) for v in data["genome"]],
                            score, float(data.get("fidelity", 1.0)))
        except (TypeError, ValueError, AttributeError) as e:
            raise RecordError(f"malformed record ({str(e).splitlines()[0]})") from None
        if score.ok and not math.isfinite(fitness):
            raise RecordError(f"fitness {fitness} of a successful candidate is not finite")
        if not 0 < candidate.fidelity <= 1:
            raise RecordError(f"fidelity {candidate.fidelity} is not a fraction of the documents in (0, 1]")
        return candidate
