"""mergekit-evolve's flags and search-file fields (mergekit 0.1.5 scripts/evolve.py, evo/config.py)."""

from __future__ import annotations

import sys
import time
import types
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from evolve import run as run_module
from evolve.cli import build_parser, check_flags, run_options
from evolve.cli import main as evolve_main
from evolve.config import EvolveConfig, GenomeDefinition, TaskDefinition, load_search
from evolve.run import RunOptions, evolve
from evolve.scoring import LmEvalScorer, Score
from evolve.search import SearchSettings

ROOT = Path(__file__).resolve().parent.parent

MERGEKIT_EVOLVE_FLAGS = [  # every option of mergekit 0.1.5's mergekit-evolve
    "--max-fevals", "--vllm", "--no-vllm", "--strategy", "-s", "--in-memory", "--no-in-memory", "--storage-path",
    "--num-gpus", "--merge-cuda", "--no-merge-cuda", "--trust-remote-code", "--no-trust-remote-code",
    "--allow-crimes", "--no-allow-crimes", "--random-seed", "--batch-size", "--sigma0", "--wandb", "--no-wandb",
    "--wandb-project", "--wandb-entity", "--task-search-path",
    "--i-understand-the-depths-of-the-evils-i-am-unleashing", "--save-final-model", "--no-save-final-model",
    "--reshard", "--no-reshard", "--timeout", "--load-in-8bit", "--load-in-4bit", "--force-population-size"]


def parse(*flags: str):
    return build_parser().parse_args(["search.yml", "--storage-path", "s", *flags])


def test_every_mergekit_evolve_flag_is_known():
    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert [f for f in MERGEKIT_EVOLVE_FLAGS if f not in known] == []


def test_flags_map_to_their_meaning():
    a = parse("--force-population-size", "7", "--i-understand-the-depths-of-the-evils-i-am-unleashing",
              "--no-in-memory", "--no-save-final-model", "--task-search-path", "t1", "--task-search-path", "t2",
              "--timeout", "12.5", "--trust-remote-code", "--allow-crimes", "--no-reshard", "--no-vllm",
              "--wandb-project", "p", "--wandb-entity", "e", "--no-merge-cuda")
    assert (a.popsize, a.allow_benchmark_test_sets, a.in_memory, a.export_model) == (7, True, False, False)
    assert (a.task_search_path, a.timeout, a.trust_remote_code, a.allow_crimes) == (["t1", "t2"], 12.5, True, True)
    assert (a.vllm, a.wandb_project, a.wandb_entity) == (False, "p", "e")
    assert check_flags(a) == ("cpu", 1)
    assert parse().sigma0 == pytest.approx(1 / 6)  # mergekit's default
    assert parse("--save-final-model").export_model and not parse("--no-export").export_model


def test_flags_fill_every_run_setting():
    a = parse("--max-fevals", "40", "--sigma0", "0.3", "--popsize", "5", "--random-seed", "9", "--timeout", "60",
              "--resume", "--task-search-path", "t", "--batch-size", "8", "--vllm", "--validate-top", "2",
              "--allow-benchmark-test-sets", "--ray-address", "ray://h:1", "--trust-remote-code", "--allow-crimes",
              "--no-export", "--wandb", "--wandb-project", "p", "--wandb-entity", "e", "--no-progress")
    assert run_options(a, "cuda:1", 3) == RunOptions(
        storage_path="s", search=SearchSettings(max_fevals=40, sigma0=0.3, popsize=5, random_seed=9, progress=False,
                                                timeout=60.0),
        task_search_path=["t"], batch_size=8, in_memory=False, vllm=True, ray_address="ray://h:1", num_workers=3,
        device="cuda:1", resume=True, allow_benchmark_test_sets=True, validate_top=2, export_model=False,
        trust_remote_code=True, allow_crimes=True, wandb=True, wandb_project="p", wandb_entity="e")
    assert run_options(parse("--on-disk"), "cpu", 1).in_memory is False
    assert run_options(parse(), "cpu", 0) == RunOptions(storage_path="s", num_workers=0, search=SearchSettings(
        sigma0=1 / 6))  # the defaults of the flags are the settings' own, but mergekit's sigma0


def test_every_run_setting_has_its_flag():
    dests = {a.dest for a in build_parser()._actions}
    from_search_file = {"random_init"}  # EvolveConfig's, not a flag
    missing = [f.name for cls in (RunOptions, SearchSettings) for f in fields(cls)
               if f.name not in dests | from_search_file | {"search"}]
    assert missing == []  # a new setting needs an add_argument with dest=<field> (run_options fills it)


def test_strategy_and_worker_count():
    assert check_flags(parse("--strategy", "serial"))[1] == 1
    assert check_flags(parse("-s", "buffered", "--num-workers", "3"))[1] == 3
    assert check_flags(parse("--num-workers", "0"))[1] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags", [["--merge-cuda"], ["--num-gpus", "2"], ["--device", "cuda"]])
def test_gpu_flags_without_cuda_fail_before_any_work(tmp_path, capsys, flags):
    rc = evolve_main([str(tmp_path / "missing.yml"), "--storage-path", str(tmp_path / "s"), *flags])
    assert rc == 2 and not (tmp_path / "s").exists()
    assert "no cuda device" in capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [(["--load-in-8bit"], "quantized"), (["--load-in-4bit"], "quantized")])
def test_unsupported_flags_fail_clearly(tmp_path, capsys, flags, needle):
    rc = evolve_main([str(tmp_path / "missing.yml"), "--storage-path", str(tmp_path / "s"), *flags])
    assert rc == 2 and needle in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_search_file_accepts_mergekit_fields(tmp_path):
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump({
        "genome": {"models": ["org/a", {"model": {"path": "org/b", "revision": "v1"}}], "merge_method": "linear",
                   "filters": None, "layer_granularity": 0},
        "tasks": ["evo_addition", {"name": "evo_reversal", "metric": "acc,none", "weight": 2}],
        "limit": 5, "num_fewshot": 0, "shuffle": True, "random_init": False, "apply_chat_template": False,
        "fewshot_as_multiturn": False}))
    cfg = load_search(path)
    assert [t.name for t in cfg.tasks] == ["evo_addition", "evo_reversal"] and cfg.tasks[1].weight == 2
    assert cfg.genome.models == ["org/a", "org/b@v1"] and cfg.genome.filters == []
    assert (cfg.shuffle, cfg.apply_chat_template, cfg.fewshot_as_multiturn) == (True, False, False)


def test_multiturn_without_chat_template_is_an_error(tmp_path, capsys):
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump({"genome": {"models": ["a", "b"], "merge_method": "linear"},
                                    "tasks": ["t"], "apply_chat_template": False, "fewshot_as_multiturn": True}))
    assert evolve_main([str(path), "--storage-path", str(tmp_path / "s")]) == 2
    assert "fewshot_as_multiturn" in capsys.readouterr().err


def scorer(**kw) -> LmEvalScorer:
    return LmEvalScorer([TaskDefinition(name="evo_addition")], [str(ROOT / "tasks")], limit=8, **kw)


def first_docs(s: LmEvalScorer) -> list:
    return list(s._fitness_tasks["evo_addition"].eval_docs)[:8]


def test_shuffle_takes_a_seeded_subset():
    plain, a, b, c = scorer(), scorer(shuffle_seed=0), scorer(shuffle_seed=0), scorer(shuffle_seed=1)
    assert first_docs(a) == first_docs(b)
    assert first_docs(a) != first_docs(plain) and first_docs(a) != first_docs(c)


def test_chat_template_applied_when_the_tokenizer_has_one(zoo):
    from evolve.materialize import load_model

    model, tok = load_model(zoo["base"])
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    contexts = {}
    for setting in (None, False):
        s = scorer(apply_chat_template=setting)
        s.score(s.make_lm(model, tok))
        contexts[setting] = s._fitness_tasks["evo_addition"].instances[0].arguments[0]
    assert contexts[None].startswith("[user]") and not contexts[False].startswith("[user]")


class FakeEvaluator:
    """Scores recipes by their first model weight, slowly (for --timeout)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches = 0

    def evaluate(self, recipes, validation=False):
        self.batches += 1
        time.sleep(self.delay)
        out = []
        for r in recipes:
            w = r.models[0].parameters["weight"]
            w = w if isinstance(w, float) else float(w[0] if isinstance(w, list) else 0.0)
            out.append(Score(w, {"evo_addition": w}))
        return out

    def close(self):
        pass


def small_search(zoo, **kw) -> EvolveConfig:
    return EvolveConfig(genome=GenomeDefinition(models=[str(zoo["a"]), str(zoo["b"])], base_model=str(zoo["base"]),
                                                merge_method="task_arithmetic"),
                        tasks=[TaskDefinition(name="evo_addition")], **kw)


@pytest.mark.slow
def test_timeout_stops_starting_generations(zoo, tmp_path):
    fake = FakeEvaluator(delay=0.4)
    options = RunOptions(storage_path=str(tmp_path / "s"), export_model=False, search=SearchSettings(
        max_fevals=40, popsize=4, timeout=0.6, progress=False))
    evolve(small_search(zoo), options, evaluator=fake)
    assert fake.batches == 2  # 0.4 s, 0.8 s: over the 0.6 s limit, no third generation
    untimed = FakeEvaluator()
    evolve(small_search(zoo), RunOptions(storage_path=str(tmp_path / "t"), export_model=False, search=SearchSettings(
        max_fevals=40, popsize=4, progress=False)), evaluator=untimed)
    assert untimed.batches > 2


def test_wandb_logs_every_candidate(zoo, tmp_path, monkeypatch):
    logged: list[tuple[dict, int]] = []
    run = types.SimpleNamespace(log=lambda m, step: logged.append((m, step)), summary={},
                                finish=lambda: logged.append(({"finished": True}, -1)))
    init_args = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: init_args.update(kw) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    options = RunOptions(storage_path=str(tmp_path / "s"), export_model=False, wandb=True, wandb_project="proj",
                         search=SearchSettings(max_fevals=8, popsize=4, progress=False))
    out = evolve(small_search(zoo), options, evaluator=FakeEvaluator())
    per_candidate = [(m, step) for m, step in logged if "fitness" in m]
    assert [m["fitness"] for m, _ in per_candidate] == [c.score.fitness for c in out.search.candidates]
    assert [step for _, step in per_candidate] == [c.index for c in out.search.candidates]
    assert init_args["project"] == "proj" and "genome" in init_args["config"]
    assert logged[-1][0] == {"finished": True} and "merge_method" in run.summary["best_config"]


def test_run_options_reach_the_workers(zoo, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(run_module, "InProcessEvaluator", lambda settings, scorer: seen.setdefault("s", settings))
    cfg = small_search(zoo, shuffle=True, apply_chat_template=True, fewshot_as_multiturn=False)
    options = RunOptions(storage_path=str(tmp_path), num_workers=0, trust_remote_code=True, allow_crimes=True)
    run_module.make_evaluator(run_module.worker_settings(cfg, options, run_module.merge_options(options)), options)
    s = seen["s"]
    assert (s.shuffle, s.apply_chat_template, s.fewshot_as_multiturn, s.merge.trust_remote_code,
            s.merge.allow_crimes) == (True, True, False, True, True)


@pytest.mark.parametrize("flags,needle", [
    (["--screen", "1.5"], "--screen 1.5: the fraction of the documents"),
    (["--screen", "0"], "--screen 0.0: the fraction of the documents"),
    (["--screen", "0.5", "--popsize", "6", "--max-fevals", "5"], "raise --max-fevals to at least 6")])
def test_bad_screening_fails_before_any_work(zoo, tmp_path, capsys, flags, needle):
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump({"genome": {"models": [str(zoo["a"]), str(zoo["b"])], "base_model": str(zoo["base"]),
                                               "merge_method": "task_arithmetic"}, "tasks": ["evo_addition"]}))
    rc = evolve_main([str(path), "--storage-path", str(tmp_path / "s"), "--num-workers", "0", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and not (tmp_path / "s").exists()
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_a_screening_scores_the_first_documents(specialists):
    """The addition specialist knows the first 8 of the 200 fitness documents: a screening on 4% of them
    (8 documents) finds all of them right, the full evaluation far fewer."""
    from evolve.materialize import load_model

    s = LmEvalScorer([TaskDefinition(name="evo_addition")], [str(ROOT / "tasks")])
    lm = s.make_lm(*load_model(specialists["addition"]))
    screened, full = s.score(lm, fraction=0.04)["evo_addition"], s.score(lm)["evo_addition"]
    assert screened == 1.0 and full < 0.5
    limited = LmEvalScorer([TaskDefinition(name="evo_addition")], [str(ROOT / "tasks")], limit=16)
    assert limited.score(limited.make_lm(*load_model(specialists["addition"])), fraction=0.5)["evo_addition"] == 1.0
