"""Ray at the edge: the only module that imports ray.

Each actor builds one CandidateEvaluator (resident model, built tasks) and keeps it
across candidates. A batch is handed out one candidate per idle actor and each score
is handed back the moment it arrives (`ray.wait`), so the search records it at once.
An actor that dies (killed, out of memory) is replaced by a fresh one and its
candidate is tried once more, then penalised; the search goes on.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from merge_engine.config import MergeConfig

from .evaluator import CandidateEvaluator, WorkerSettings
from .scoring import Score

log = logging.getLogger(__name__)
ATTEMPTS = 2  # a candidate whose worker dies is tried on a fresh worker once more, then penalised
READY_NOTICE_S = 30.0  # while workers wait for cluster resources, say so this often
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class WorkerSetupError(ValueError):
    """A worker could not build its tasks or model (the same checks the driver ran, on the worker's side)."""


@ray.remote
class _Worker:
    def __init__(self, settings: WorkerSettings):
        self.error: str | None = None
        try:
            self.evaluator = CandidateEvaluator(settings)
        except Exception as e:  # noqa: BLE001 - reported by ready() as one line, not an actor traceback
            self.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"

    def ready(self) -> tuple[int, str | None]:
        return os.getpid(), self.error

    def evaluate(self, recipe: dict, validation: bool, fraction: float | None = None) -> Score:
        return self.evaluator.evaluate_one(recipe, validation, fraction)


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_NOTICE)


@contextmanager
def _quiet_default_token_auth() -> Iterator[None]:
    """Recent Ray turns on token authentication for every new local cluster and says so on stderr at each
    start ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out").
    For the private cluster this run starts, that is Ray working as intended: the notice is dropped while
    our own ray.init runs, and nothing else (the warning that auth is *disabled* still shows)."""
    logger, notice = logging.getLogger(TOKEN_AUTH_LOGGER), _DropTokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class RayEvaluator:
    def __init__(self, settings: WorkerSettings, num_workers: int, address: str | None = None,
                 gpus_per_worker: float = 0.0):
        if num_workers < 1:
            raise ValueError(f"--num-workers {num_workers}: use 1 or more Ray workers, or 0 to score in this process")
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            handler = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit; keep the CLI's
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                cpus = os.cpu_count() or 1
                with _quiet_default_token_auth():
                    ray.init(num_cpus=max(cpus, num_workers), include_dashboard=False,
                             object_store_memory=256 * 1024**2, log_to_driver=True)
            if callable(handler):
                signal.signal(signal.SIGTERM, handler)
        self._check_cluster(num_workers, gpus_per_worker, address)
        threads = settings.threads or max(1, (os.cpu_count() or 1) // max(num_workers, 1))
        self.settings = replace(settings, threads=threads)
        self.gpus = gpus_per_worker
        self.actors: list[Any] = []
        try:
            self.actors = self._start(num_workers)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_cluster(num_workers: int, gpus: float, address: str | None) -> None:
        total = ray.cluster_resources()
        where = f"the Ray cluster at {address}" if address else "the Ray cluster"
        if total.get("CPU", 0) < num_workers:
            raise ValueError(f"--num-workers {num_workers} needs {num_workers} CPUs, {where} has "
                             f"{total.get('CPU', 0):g}; lower --num-workers or add nodes")
        if gpus and total.get("GPU", 0) < gpus * num_workers:
            raise ValueError(f"--num-workers {num_workers} with --device cuda needs {gpus * num_workers:g} GPUs, "
                             f"{where} has {total.get('GPU', 0):g}; lower --num-workers or use --device cpu")

    def _start(self, count: int) -> list[Any]:
        """Start `count` actors and wait until each has built its tasks and model."""
        actors = [_Worker.options(num_cpus=1, num_gpus=self.gpus).remote(self.settings)  # type: ignore[attr-defined]
                  for _ in range(count)]
        pending = {a.ready.remote(): a for a in actors}
        waited = 0.0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=READY_NOTICE_S)
            for ref in done:
                pending.pop(ref)
                try:
                    _, error = ray.get(ref)
                except RayError as e:
                    error = f"the worker process died while starting ({_first_line(e)})"
                if error:
                    for a in actors:
                        ray.kill(a, no_restart=True)
                    raise WorkerSetupError(f"a Ray worker could not start: {error}")
            if pending:
                waited += READY_NOTICE_S
                free = ray.available_resources().get("CPU", 0)
                log.warning("waiting for %d Ray worker(s) to start (%.0fs so far; %g CPUs free in the cluster, "
                            "other jobs may hold the rest)", len(pending), waited, free)
        return actors

    def _replace(self, dead: Any) -> Any:
        ray.kill(dead, no_restart=True)
        fresh = self._start(1)[0]
        self.actors = [fresh if a is dead else a for a in self.actors]
        return fresh

    def evaluate_iter(self, recipes: list[MergeConfig], validation: bool = False,
                      fraction: float | None = None) -> Iterator[tuple[int, Score]]:
        payloads = [r.model_dump(mode="json", exclude_none=True) for r in recipes]
        queue = deque(range(len(payloads)))
        attempts = [0] * len(payloads)
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and idle:
                i, actor = queue.popleft(), idle.pop()
                running[actor.evaluate.remote(payloads[i], validation, fraction)] = (actor, i)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                score = ray.get(ref)
                idle.append(actor)
            except RayActorError as e:  # the worker process died (killed, out of memory, node lost)
                attempts[i] += 1
                idle.append(self._replace(actor))
                if attempts[i] < ATTEMPTS:
                    log.warning("warning: a Ray worker died while scoring candidate %d (%s); retrying it on a "
                                "fresh worker", i, _first_line(e))
                    queue.appendleft(i)
                    continue
                score = Score.failed(f"the Ray worker died {attempts[i]} times while scoring this candidate "
                                     f"({_first_line(e)})")
            except RayTaskError as e:  # evaluate_one raised despite catching: a bug, kept as this candidate's
                idle.append(actor)
                score = Score.failed(f"worker error: {_first_line(e.cause if e.cause else e)}")
            yield i, score

    def evaluate(self, recipes: list[MergeConfig], validation: bool = False,
                 fraction: float | None = None) -> list[Score]:
        scores: list[Score | None] = [None] * len(recipes)
        for i, score in self.evaluate_iter(recipes, validation, fraction):
            scores[i] = score
        return [s for s in scores if s is not None]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._own_ray and ray.is_initialized():
            ray.shutdown()
