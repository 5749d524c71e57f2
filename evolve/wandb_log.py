"""Optional Weights & Biases logging (`--wandb`, `pip install 'evomerge[wandb]'`): every scored candidate's
fitness and per-task scores, as it is appended to history.jsonl. wandb is imported only when asked for."""

from __future__ import annotations

from typing import Any

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

    def append(self, record: dict[str, Any]) -> None:
        self._storage.append(record)
        fitness = record["fitness"]
        self._best = fitness if self._best is None else max(self._best, fitness)
        metrics = {"fitness": fitness, "best_fitness": self._best, "generation": record["generation"],
                   "ok": int(bool(record["ok"])), "merge_seconds": record["merge_seconds"],
                   "score_seconds": record["score_seconds"]}
        metrics.update({f"scores/{task}": value for task, value in (record.get("scores") or {}).items()})
        self.run.log(metrics, step=record["index"])

    def finish(self, best_config_path: str | None = None) -> None:
        if best_config_path is not None:
            self.run.summary["best_config"] = open(best_config_path).read()
        self.run.finish()
