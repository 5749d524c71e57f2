"""The worked example of docs/writing-tasks.md (tasks/evo_subtraction_choice.yaml) loads with lm-eval
and is scored by the search's own evaluator on a tiny model, on its fitness and held-out splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager, get_task_dict

from evolve.config import TaskDefinition
from evolve.evaluator import InProcessEvaluator, WorkerSettings
from merge_engine import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
TASK = "evo_subtraction_choice"


@pytest.mark.slow  # lm-eval scoring
def test_example_task_loads_with_its_splits_and_choices():
    task = get_task_dict([TASK], TaskManager(include_path=str(ROOT / "tasks")))[TASK]
    # no test_split declared: lm-eval's eval docs (the search's fitness) are the validation split
    assert task.has_validation_docs() and not task.has_test_docs() and not task.has_training_docs()
    assert list(task.eval_docs) == list(task.validation_docs())
    val, test = list(task.validation_docs()), list(task.dataset["test"])  # test: held out, named by the search
    assert len(val) == len(test) == 100
    assert not {d["prompt"] for d in val} & {d["prompt"] for d in test}  # held out means disjoint
    doc = val[0]
    a, b = map(int, doc["prompt"].rstrip("=").split("-"))
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == str(a - b)
    assert task.higher_is_better() == {"acc": True}


@pytest.mark.slow
def test_example_task_is_scored_by_the_search(zoo):
    tasks = [TaskDefinition(name=TASK, metric="acc", validation_split="test")]
    evaluator = InProcessEvaluator(WorkerSettings(tasks=tasks, reference_model=str(zoo["base"]), limit=20,
                                                  task_search_path=[str(ROOT / "tasks")], batch_size=8))
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(zoo["a"])}]})
    fit, held = evaluator.evaluate([recipe]), evaluator.evaluate([recipe], validation=True)
    for score in (fit[0], held[0]):
        assert score.ok, score.error
        acc = score.per_task[TASK]
        assert 0.0 <= acc <= 1.0 and abs(acc * 20 - round(acc * 20)) < 1e-9  # a fraction of the 20 documents


def test_example_data_is_what_the_generator_makes(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "tasks" / "make_subtraction_choice.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "DATA", tmp_path)
    gen.main()
    for split in ("validation", "test"):
        shipped = (ROOT / "tasks" / "data" / f"subtraction_choice.{split}.jsonl").read_text()
        assert (tmp_path / f"subtraction_choice.{split}.jsonl").read_text() == shipped
        assert all(len(json.loads(line)["choices"]) == 3 for line in shipped.splitlines())
