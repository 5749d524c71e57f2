"""Optional Weights & Biases logging (`--wandb`, `pip install 'evomerge[wandb]'`): every scored candidate's
fitness and per-task scores, as it is appended to history.jsonl. wandb is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .record import Candidate


class WandbLogger:
    """A wandb run that logs each candidate as the storage appends it (Storage.listeners)."""

    def __init__(self, project: str | None, entity: str | None, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb: the wandb package is not installed; `pip install 'evomerge[wandb]'` "
                             "(or omit --wandb)") from None
        self.run = wandb.init(project=project or "mergekit-evolve", entity=entity, config=config)
        self._best: float | None = None

    def log_candidate(self, candidate: Candidate) -> None:
        score = candidate.score
        if score.ok:
            self._best = score.fitness if self._best is None else max(self._best, score.fitness)
        metrics: dict[str, Any] = {"fitness": score.fitness, "generation": candidate.generation,
                                   "ok": int(score.ok), "merge_seconds": score.merge_seconds,
                                   "score_seconds": score.score_seconds}
        if self._best is not None:
            metrics["best_fitness"] = self._best
        metrics.update({f"scores/{task}": value for task, value in (score.per_task or {}).items()})
        self.run.log(metrics, step=candidate.index)

    def finish(self, best_config: Path | None = None) -> None:
        if best_config is not None:
            self.run.summary["best_config"] = best_config.read_text()
        self.run.finish()
