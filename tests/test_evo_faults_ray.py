"""mergekit-evolve's Ray workers under faults: a worker killed mid-search, workers that cannot start or do not fit,
Ray's token-auth notice. Split from test_evo_faults.py (its models and tasks are imported from there) so that
pytest-xdist's --dist loadfile can run the two halves on different workers.

Each test asserts the message the user sees and what is left in the storage path."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from test_evo_faults import cli, env, lines, models, sources, task_dir, wait_for_lines, write_search  # noqa: F401

from evolve.config import TaskDefinition
from evolve.evaluator import WorkerSettings


@pytest.mark.slow
def test_killed_ray_worker_is_replaced_and_its_candidate_retried(models, task_dir, tmp_path):
    import psutil

    search = write_search(tmp_path / "search.yml", models, [{"name": "evo_ppl", "metric": "word_perplexity"}],
                          limit=4)
    storage = tmp_path / "s"
    cmd = cli(search, storage, task_dir, "--max-fevals", "8", "--popsize", "4", "--num-workers", "2")
    unset = {k: v for k, v in env().items() if k != "RAY_AUTH_MODE"}  # Ray's default mode, with its notice
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=unset)
    wait_for_lines(storage, 1, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "_Worker" in " ".join(p.cmdline() or [p.name()])]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Token authentication" not in err
    assert "a Ray worker died while scoring candidate" in err and "retrying it on a fresh worker" in err
    records = [json.loads(line) for line in lines(storage)]
    assert len(records) == 8 and len({r["recipe_hash"] for r in records}) == 8
    assert all(r["ok"] for r in records)  # the retried candidate scored on the fresh worker
    assert (storage / "best_config.yaml").exists()



@pytest.mark.slow
def test_screening_reaches_the_ray_workers(models, task_dir, tmp_path):
    """--screen through the CLI and Ray: each generation's 4 candidates scored on half of the documents, the better
    2 then on all of them, by the workers (a screening's score differs from the same candidate's full score)."""
    search = write_search(tmp_path / "search.yml", models, [{"name": "evo_ppl", "metric": "word_perplexity"}],
                          limit=4)
    storage = tmp_path / "s"
    cmd = cli(search, storage, task_dir, "--max-fevals", "8", "--popsize", "4", "--num-workers", "2", "--screen", "0.5")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in lines(storage)]
    screens = {r["recipe_hash"]: r for r in records if r.get("fidelity") == 0.5}
    full = {r["recipe_hash"]: r for r in records if "fidelity" not in r}
    assert (len(screens), len(full)) == (8, 4) and set(full) <= set(screens)
    assert all(full[k]["fitness"] != screens[k]["fitness"] for k in full)
    assert "screening: 8 candidates" in (storage / "report.md").read_text()

class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rays_default_token_auth_notice_is_dropped_while_we_start_our_own_cluster():
    from evolve.ray_evaluator import TOKEN_AUTH_LOGGER, _quiet_default_token_auth

    ray_log = logging.getLogger(TOKEN_AUTH_LOGGER)  # what Ray's ray.init logs it with ("ray" does not propagate)
    enabled = ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For "
               "more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html")
    disabled = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    seen = _Collect()
    ray_log.addHandler(seen)
    try:
        with _quiet_default_token_auth():
            ray_log.warning(enabled)
            ray_log.warning(disabled)  # actionable: never hidden
        ray_log.warning(enabled)  # the user's own ray.init, later: Ray's notice as Ray wrote it
    finally:
        ray_log.removeHandler(seen)
    assert seen.messages == [disabled, enabled]


@pytest.mark.slow
def test_ray_workers_that_cannot_start_or_do_not_fit_give_an_error(models, task_dir):
    import ray

    from evolve.ray_evaluator import RayEvaluator, WorkerSetupError

    settings = WorkerSettings(tasks=[TaskDefinition(name="evo_nope")], reference_model=str(models["first"]),
                              task_search_path=[str(task_dir)])
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=128 * 1024**2)
    try:
        with pytest.raises(ValueError, match=r"--num-workers 2 needs 2 CPUs, the Ray cluster has 1; lower "):
            RayEvaluator(settings, num_workers=2)
        with pytest.raises(WorkerSetupError, match=r"a Ray worker could not start: tasks: unknown lm-eval task\(s\) "
                                                   r"evo_nope"):
            RayEvaluator(settings, num_workers=1)
    finally:
        ray.shutdown()
