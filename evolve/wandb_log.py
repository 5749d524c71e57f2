"""Optional Weights & Biases logging (`--wandb`, `pip install 'evomerge[wandb]'`): every scored candidate's
fitness and per-task scores, as it is appended to history.jsonl. wandb is imported only when asked for."""

from __future__ import annotations

from typing import Any

from .record import Candidate
from .storage import Storage


def start_run(project: str | None, entity: str | None, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb: the wandb package is not installed; `pip install 'evomerge[wandb]'` "
                         "(or omit --wandb)") from None
    return wandb.init(project=project or "mergekit-evolve", entity=entity, config=config)


class WandbStorage:
    """A Storage that also logs each appended candidate record to a wandb run."""

    def __init__(self, storage: Storage, run: Any):
        self._storage = storage
        self.run = run
        self._best: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def append(self, candidate: Candidate) -> None:
        self._storage.append(candidate)
        score = candidate.score
        if score.ok:
            self._best = score.fitness if self._best is None else max(self._best, score.fitness)
        metrics = {"fitness": score.fitness, "generation": candidate.generation, "ok": int(score.ok),
                   "merge_seconds": score.merge_seconds, "score_seconds": score.score_seconds}
        if self._best is not None:
            metrics["best_fitness"] = self._best
        metrics.update({f"scores/{task}": value for task, value in (score.per_task or {}).items()})
        self.run.log(metrics, step=candidate.index)

    def finish(self, best_config_path: str | None = None) -> None:
        if best_config_path is not None:
            self.run.summary["best_config"] = open(best_config_path).read()
        self.run.finish()
