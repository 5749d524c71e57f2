"""mergekit-evolve under faults and bad input (issue 7, search side): real processes, real
signals, real Ray workers, real lm-eval tasks on tiny models whose scores differ.

Each test asserts the message the user sees and what is left in the storage path."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factory import make_model

from evolve.config import EvolveConfig, GenomeDefinition, TaskDefinition
from evolve.evaluator import InProcessEvaluator, WorkerSettings
from evolve.genome import Genome
from evolve.record import Candidate
from evolve.run import RunOptions, evolve
from evolve.scoring import Score
from evolve.search import SearchFailed, SearchSettings
from evolve.storage import Storage
from merge_engine import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = str(ROOT / "tasks")
TEXT = ["13+72=85 5+58=63 agubog>gobuga mzy>yzm", "40+2=42 hello>olleh 7+7=14 abc>cba",
        "the quick brown fox jumps over the lazy dog", "21+21=42 zyx>xyz 9+1=10 merge>egrem"]


def train(out: Path, base: Path, steps: int = 40, seed: int = 0) -> Path:
    """A few seconds of training on TEXT: the result's perplexity on TEXT is far below the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok(TEXT, return_tensors="pt", padding=True)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids.masked_fill(ids == tok.pad_token_id, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A base and two untrained variants: enough for every check that fails before a candidate is scored."""
    root = tmp_path_factory.mktemp("faults")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    return {"base": base, "first": make_model(root / "first", base=base, seed=1, noise=0.05),
            "other": make_model(root / "other", base=base, seed=3, noise=0.05)}


@pytest.fixture(scope="module")
def models(sources, tmp_path_factory) -> dict[str, Path]:
    """`sources` with "first" trained on TEXT (seconds): searches whose candidates score differently."""
    return sources | {"first": train(tmp_path_factory.mktemp("trained") / "trained", sources["base"])}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """evo_ppl: rolling log-likelihood over TEXT (word_perplexity: lower is better, from lm-eval's defaults);
    evo_boom: a task whose scoring always raises (a broken task, found only once a candidate is scored)."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (d / "evo_ppl.yaml").write_text(yaml.safe_dump({
        "task": "evo_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(d / "ppl.jsonl")}},
        "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
        "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0}}))
    (d / "boom.py").write_text("def process_results(doc, results):\n"
                               "    raise RuntimeError('boom: this task cannot score anything')\n")
    (d / "evo_boom.yaml").write_text((d / "evo_ppl.yaml").read_text().replace("task: evo_ppl", "task: evo_boom")
                                     + "process_results: !function boom.process_results\n")
    # evo_spy: addition scored by log-likelihood, and each scored document noted in the file $EVO_SPY: a
    # record of which candidates finished, kept apart from the history the search writes
    (d / "spy.jsonl").write_text("".join((ROOT / "tasks" / "data" / "addition.validation.jsonl").read_text()
                                         .splitlines(keepends=True)[:4]))
    (d / "spy.py").write_text("import os\n\n\ndef process_results(doc, results):\n"
                              "    with open(os.environ['EVO_SPY'], 'a') as f:\n        f.write('doc\\n')\n"
                              "    return {'acc': float(results[0][1])}\n")
    (d / "evo_spy.yaml").write_text(yaml.safe_dump({
        "task": "evo_spy", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(d / "spy.jsonl")}},
        "output_type": "loglikelihood", "test_split": "test", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}", "target_delimiter": "", "process_results": "PROCESS",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}).replace("PROCESS", "!function spy.process_results"))
    return d


def genome(models, method="linear") -> GenomeDefinition:
    return GenomeDefinition(models=[str(models["first"]), str(models["other"])], merge_method=method)


def write_search(path: Path, models, tasks: list[dict], **extra) -> Path:
    path.write_text(yaml.safe_dump({"genome": {"models": [str(models["first"]), str(models["other"])],
                                               "merge_method": "linear", "layer_granularity": 1},
                                    "tasks": tasks, "limit": 8, **extra}))
    return path


def cli(search: Path, storage: Path, task_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evolve.cli", str(search), "--storage-path", str(storage), "--task-search-path",
            TASKS_DIR, "--task-search-path", str(task_dir), "--no-progress", "--no-export", *extra]


def lines(storage: Path) -> list[str]:
    hist = storage / "history.jsonl"
    return hist.read_text().splitlines() if hist.exists() else []


def wait_for_lines(storage: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        count = len(lines(storage))
        if count >= n:
            return count
        time.sleep(0.01)
    raise AssertionError(f"history never reached {n} lines (exit {proc.poll()}): {proc.stderr and proc.stderr.read()}")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# --- metric direction ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lower_is_better_metric_exports_the_lowest_perplexity(models, task_dir, tmp_path):
    tasks = [TaskDefinition(name="evo_ppl", metric="word_perplexity")]
    config = EvolveConfig(genome=genome(models), tasks=tasks, limit=4)
    options = RunOptions(storage_path=str(tmp_path / "s"), task_search_path=[str(task_dir)], num_workers=0,
                         search=SearchSettings(max_fevals=8, popsize=4, sigma0=0.4, progress=False),
                         export_model=False)
    out = evolve(config, options)
    ppl = {c.key: c.score.per_task["evo_ppl"] for c in out.search.candidates}
    assert len(set(ppl.values())) == len(ppl) == 8  # candidates differ
    assert max(ppl.values()) > 1.2 * min(ppl.values())
    assert out.best.score.per_task["evo_ppl"] == min(ppl.values())
    assert out.best.score.fitness == -min(ppl.values())  # enters the fitness negated
    exported = load_recipe(tmp_path / "s" / "best_config.yaml")  # plus the dtype and seed it was built with
    assert exported.model_copy(update={"dtype": None, "random_seed": None}) == out.best.recipe
    report = (tmp_path / "s" / "report.md").read_text()
    assert "(- 1 * evo_ppl/word_perplexity) / 1" in report
    assert "evo_ppl/word_perplexity lower is better" in report


# --- preflight: nothing spent, nothing written -------------------------------------------------------------

UNKNOWN_TASK = ("unknown task", {"tasks": [{"name": "evo_nope"}]})  # indexes all of lm-eval's tasks: slow
BAD_INPUT = [
    ("unknown metric", {"tasks": [{"name": "evo_addition", "metric": "accuracy"}]},
     r"tasks\[0\]\.metric: task 'evo_addition' has no metric 'accuracy'; it reports: acc"),
    ("unknown filter", {"tasks": [{"name": "evo_addition", "metric": "acc,strict"}]},
     r"tasks\[0\]\.metric: task 'evo_addition' has no filter 'strict'"),
    ("weights 0/0", {"tasks": [{"name": "evo_addition", "weight": 0}, {"name": "evo_ppl", "weight": 0}]},
     "every task weight is 0"),
    ("weight NaN", {"tasks": [{"name": "evo_addition", "weight": float("nan")}]}, r"tasks\[0\]\.weight: nan"),
    ("negative weight", {"tasks": [{"name": "evo_ppl", "metric": "word_perplexity", "weight": -1}]},
     "no negative weight is needed"),
    ("missing model", {"genome": {"models": ["/nonexistent/model", "B"], "merge_method": "linear"}},
     r"genome\.models\[0\]: cannot open '/nonexistent/model'"),
    ("budget below a generation", {"argv": ["--max-fevals", "3"]},
     r"--max-fevals 3 is less than one generation \(8 candidates, CMA-ES's default for 4 genes\)"),
    ("range of an unsearched parameter", {"genome+": {"ranges": {"density": [0.1, 1]}}},
     r"genome\.ranges\.density: linear searches weight, not 'density'"),
    ("empty range", {"genome+": {"ranges": {"weight": [1, 1]}}},
     r"genome\.ranges\.weight: \[1\.0, 1\.0\] must be an increasing pair"),
    ("popsize 1", {"argv": ["--popsize", "1"]}, "--popsize 1: CMA-ES needs at least 2 candidates"),
    ("sigma0 0", {"argv": ["--sigma0", "0"]}, "--sigma0 0.0: the step size must be a positive number"),
]


def bad_search(models, tmp_path: Path, case: str, change: dict) -> tuple[Path, list[str]]:
    search = {"genome": {"models": [str(models["first"]), str(models["other"])], "merge_method": "linear",
                         "layer_granularity": 1}, "tasks": [{"name": "evo_addition"}], "limit": 4}
    search.update({k: v for k, v in change.items() if k not in ("argv", "genome+")})
    search["genome"].update(change.get("genome+", {}))
    if case == "missing model":
        search["genome"]["models"][1] = str(models["other"])
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(search))
    return path, ["--max-fevals", "12", "--num-workers", "0", *change.get("argv", [])]


@pytest.mark.parametrize("case, change, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_error_line_before_anything_is_spent(sources, task_dir, tmp_path, capsys, case, change,
                                                             message):
    import re

    from evolve.cli import main

    path, argv = bad_search(sources, tmp_path, case, change)
    code = main(cli(path, tmp_path / "s", task_dir, *argv)[3:])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("mergekit-evolve: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "s").exists()  # nothing written, nothing scored


@pytest.mark.slow
def test_bad_input_in_a_real_process_is_one_line_and_exit_2(models, task_dir, tmp_path):
    path, argv = bad_search(models, tmp_path, *UNKNOWN_TASK)
    res = subprocess.run(cli(path, tmp_path / "s", task_dir, *argv, "--num-workers", "1"), capture_output=True,
                         text=True, env=env())
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("mergekit-evolve: error: tasks: unknown lm-eval task(s) evo_nope (task directories: ")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_model_needing_remote_code_is_refused_without_a_prompt(sources, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(sources["other"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="evo_custom", auto_map={"AutoConfig": "configuration_evo.EvoConfig",
                                                  "AutoModelForCausalLM": "modeling_evo.EvoModel"})
    (custom / "config.json").write_text(json.dumps(cfg))
    config = EvolveConfig(genome=GenomeDefinition(models=[str(custom), str(sources["other"])],
                                                  merge_method="linear"), tasks=[TaskDefinition(name="evo_addition")])
    t0 = time.time()
    with pytest.raises(ValueError, match="needs custom code from the model directory, which a search never runs"):
        evolve(config, RunOptions(storage_path=str(tmp_path / "s"), num_workers=0), evaluator=object())
    assert time.time() - t0 < 10 and not (tmp_path / "s").exists()


# --- history ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_damaged_history_lines_are_skipped_with_their_line_numbers(models, task_dir, tmp_path, caplog):
    config = EvolveConfig(genome=genome(models), tasks=[TaskDefinition(name="evo_ppl", metric="word_perplexity")],
                          limit=2)
    settings = WorkerSettings(tasks=list(config.tasks), reference_model=str(models["first"]),
                              task_search_path=[str(task_dir)], limit=2)
    evaluator = InProcessEvaluator(settings)
    calls: list[int] = []
    evaluate_iter = evaluator.evaluate_iter

    def counting(recipes, validation=False):
        calls.append(len(recipes))
        return evaluate_iter(recipes, validation)

    evaluator.evaluate_iter = counting  # type: ignore[method-assign]

    def run(resume: bool):
        options = RunOptions(storage_path=str(tmp_path / "s"), resume=resume, export_model=False,
                             search=SearchSettings(max_fevals=8, popsize=4, progress=False))
        return evolve(config, options, evaluator=evaluator)

    run(False)
    original = lines(tmp_path / "s")
    assert len(original) == 8 and sum(calls) == 8
    damaged = list(original)
    damaged[2] = damaged[2][:40] + "}{garbage"  # corrupt JSON in the middle
    damaged[4] = "{}"
    record = json.loads(damaged[5])
    del record["recipe"]
    damaged[5] = json.dumps(record)
    (tmp_path / "s" / "history.jsonl").write_text("\n".join(damaged) + "\n")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="evolve.storage"):
        out = run(True)
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [m.split("history.jsonl ")[1].split(" skipped")[0] for m in warned] == ["line 3", "line 5", "line 6"]
    assert "missing key(s) index" in warned[1] and "missing key(s) recipe" in warned[2]
    after = lines(tmp_path / "s")
    assert after[:8] == damaged  # nothing truncated or rewritten
    rescored = [json.loads(line)["recipe_hash"] for line in after[8:]]
    assert sum(calls) == 3 and sorted(rescored) == sorted(json.loads(original[i])["recipe_hash"] for i in (2, 4, 5))
    assert {c.key for c in out.search.candidates} == {json.loads(line)["recipe_hash"] for line in original}


def test_typed_record_round_trips_and_rejects_incomplete_ones(sources):
    from evolve.record import RecordError

    recipe = Genome(genome(sources), 2).decode(np.full(2, 0.3))
    cand = Candidate(3, 1, "abc", recipe, [0.3, 0.3], Score(-12.5, {"evo_ppl": 12.5}, merge_seconds=0.25))
    assert Candidate.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    for bad, why in (([], "expected a JSON object"), ({}, "missing key(s) index"),
                     (cand.to_json() | {"scores": {"x": "high"}}, "malformed record"),
                     (cand.to_json() | {"fitness": math.nan}, "not finite")):
        with pytest.raises(RecordError, match=why.replace("(", r"\(").replace(")", r"\)")):
            Candidate.from_json(bad)


def test_failed_candidate_is_never_the_best_even_below_the_penalty(sources):
    from evolve.search import penalty

    recipe = Genome(genome(sources), 2).decode(np.full(2, 0.3))
    ok = Candidate(0, 0, "a", recipe, [0.3], Score(-40.0, {"evo_ppl": 40.0}))
    failed = Candidate(1, 0, "b", recipe, [0.3], Score.failed("merge failed: x"))
    assert penalty({"a": ok, "b": failed}) == -41.0 < ok.score.fitness < failed.score.fitness


# --- processes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_inside_a_generation_loses_no_finished_candidate(models, task_dir, tmp_path):
    search = write_search(tmp_path / "search.yml", models, [{"name": "evo_spy"}])
    storage, spy = tmp_path / "s", tmp_path / "scored_docs"
    cmd = cli(search, storage, task_dir, "--max-fevals", "12", "--popsize", "6", "--num-workers", "0", "--on-disk")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env() | {"EVO_SPY": str(spy)})
    wait_for_lines(storage, 2, proc)
    proc.kill()
    proc.wait()
    before = lines(storage)
    finished = len(spy.read_text().splitlines()) // 4  # candidates whose 4 documents were all scored
    assert 2 <= len(before) < 6  # killed inside the first generation
    assert len(before) >= finished - 1  # at most the candidate being recorded at the kill is lost
    assert (storage / "scratch").exists()  # the killed run's on-disk candidate space
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env())
    assert res.returncode == 0, res.stderr
    after = lines(storage)
    assert after[:len(before)] == before and len(after) == 12
    hashes = [json.loads(line)["recipe_hash"] for line in after]
    assert len(set(hashes)) == 12  # no finished candidate scored twice
    assert not (storage / "scratch").exists() and (storage / "best_config.yaml").exists()


@pytest.mark.slow
def test_sigterm_ends_like_ctrl_c_and_a_second_search_on_the_path_is_refused(models, task_dir, tmp_path):
    search = write_search(tmp_path / "search.yml", models, [{"name": "evo_ppl", "metric": "word_perplexity"}])
    storage = tmp_path / "s"
    cmd = cli(search, storage, task_dir, "--max-fevals", "40", "--popsize", "4", "--num-workers", "0", "--on-disk")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    wait_for_lines(storage, 1, proc)
    proc.send_signal(signal.SIGSTOP)  # keep it inside the search (and holding the lock) while the second starts
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env())
    proc.send_signal(signal.SIGCONT)
    assert proc.poll() is None and second.returncode == 2
    assert second.stderr.strip().startswith(f"mergekit-evolve: error: --storage-path {storage} is in use by another "
                                            f"mergekit-evolve (pid {proc.pid} on ")
    assert len(second.stderr.strip().splitlines()) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"mergekit-evolve: terminated (SIGTERM); every finished candidate is in the history; continue with --resume "
        f"--storage-path {storage}"]
    records = [json.loads(line) for line in lines(storage)]  # every line whole
    assert records and all(r["ok"] for r in records)
    assert not (storage / "scratch").exists()
    assert (storage / ".evomerge.lock").read_text() == ""  # released


@pytest.mark.slow
def test_all_failing_first_generation_stops_with_the_first_error(models, task_dir, tmp_path):
    search = write_search(tmp_path / "search.yml", models, [{"name": "evo_boom", "metric": "word_perplexity"}])
    storage = tmp_path / "s"
    res = subprocess.run(cli(search, storage, task_dir, "--max-fevals", "40", "--popsize", "4", "--num-workers", "0"),
                         capture_output=True, text=True, env=env())
    assert res.returncode == 1, res.stderr
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert err[-1] == ("mergekit-evolve: error: all 4 candidates of the first generation failed, so the search "
                       "stopped instead of spending the budget; the first error: scoring failed: boom: this task "
                       "cannot score anything"), res.stderr
    assert err[:-1] == ["warning: candidate failed to score: boom: this task cannot score anything"] * 4
    assert len(lines(storage)) == 4  # one generation, not the budget of 40
    assert not (storage / "best_config.yaml").exists() and not (storage / "best_model").exists()


def test_search_failed_is_raised_in_process_too(sources, task_dir, tmp_path):
    config = EvolveConfig(genome=genome(sources), tasks=[TaskDefinition(name="evo_boom", metric="word_perplexity")],
                          limit=2)
    options = RunOptions(storage_path=str(tmp_path / "s"), task_search_path=[str(task_dir)], num_workers=0,
                         search=SearchSettings(max_fevals=20, popsize=2, progress=False))
    with pytest.raises(SearchFailed, match="all 2 candidates of the first generation failed"):
        evolve(config, options)
    assert len(lines(tmp_path / "s")) == 2 and Storage(tmp_path / "s").load_history()[0].score.ok is False
