"""Ray at the edge: the only module that imports ray.

Each actor builds one CandidateEvaluator (resident model, built tasks) and keeps it
across candidates; a batch of recipes is spread over the actors with an ActorPool,
results coming back in input order.
"""

from __future__ import annotations

import os
from dataclasses import replace

import ray
from ray.util import ActorPool

from merge_engine.config import MergeConfig

from .evaluator import CandidateEvaluator, WorkerSettings
from .scoring import Score


@ray.remote
class _Worker:
    def __init__(self, settings: WorkerSettings):
        self.evaluator = CandidateEvaluator(settings)

    def evaluate(self, recipe: dict, validation: bool) -> Score:
        return self.evaluator.evaluate_one(recipe, validation)


class RayEvaluator:
    def __init__(self, settings: WorkerSettings, num_workers: int, address: str | None = None,
                 gpus_per_worker: float = 0.0):
        if not ray.is_initialized():
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
            else:
                cpus = os.cpu_count() or 1
                ray.init(num_cpus=max(cpus, num_workers), include_dashboard=False, ignore_reinit_error=True,
                         object_store_memory=256 * 1024**2, log_to_driver=True)
        threads = settings.threads or max(1, (os.cpu_count() or 1) // max(num_workers, 1))
        worker_settings = replace(settings, threads=threads)
        self.actors = [_Worker.options(num_cpus=1, num_gpus=gpus_per_worker).remote(worker_settings)
                       for _ in range(num_workers)]
        self.pool = ActorPool(self.actors)

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False) -> list[Score]:
        payloads = [r.model_dump(mode="json", exclude_none=True) for r in recipes]
        return list(self.pool.map(lambda actor, p: actor.evaluate.remote(p, validation), payloads))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
