"""ResidentLM gives lm-eval's HFLM answers, call after call, while the model's weights change in place."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def requests(task: str, n: int = 40) -> list[SimpleNamespace]:
    """Log-likelihood requests (context, continuation) of a bundled task's fitness documents: lm-eval's
    loglikelihood() reads only each request's args."""
    from evolve.config import TaskDefinition
    from evolve.scoring import LmEvalScorer

    t = LmEvalScorer([TaskDefinition(name=task)], [str(ROOT / "tasks")])._fitness_tasks[task]
    out = []
    for doc in list(t.eval_docs)[:n]:
        context = t.doc_to_text(doc)
        choices = t.doc_to_choice(doc) if t.OUTPUT_TYPE == "multiple_choice" else [t.doc_to_target(doc)]
        out += [SimpleNamespace(args=(context, t.config.target_delimiter + str(c))) for c in choices]
    return out


def both(model, tok, **kw):
    from lm_eval.models.huggingface import HFLM

    from evolve.resident_lm import ResidentLM

    return ResidentLM(pretrained=model, tokenizer=tok, **kw), HFLM(pretrained=model, tokenizer=tok, **kw)


def assert_same(ours: list[tuple[float, bool]], theirs: list[tuple[float, bool]]) -> None:
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("task", ["evo_addition", "evo_subtraction_choice"])
def test_same_answers_as_lm_eval_while_the_weights_change(specialists, task):
    """Multi-token continuations (addition) and one-token choices that share a context (lm-eval reuses one
    model row for them), over several batches of different padding; the cached plan must not cache answers."""
    from evolve.materialize import load_model

    model, tok = load_model(specialists["addition"])
    other, _ = load_model(specialists["reversal"])
    reqs = requests(task)
    ours, theirs = both(model, tok, batch_size=7)
    first = ours.loglikelihood(reqs)
    assert_same(first, theirs.loglikelihood(reqs))
    if task == "evo_addition":  # the specialist knows the first 8 documents and not the rest
        assert any(g for _, g in first) and not all(g for _, g in first)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    second = ours.loglikelihood(reqs)
    assert_same(second, theirs.loglikelihood(reqs))
    assert [ll for ll, _ in second] != pytest.approx([ll for ll, _ in first], rel=1e-3)


def test_truncation_from_the_left_as_lm_eval(specialists):
    from evolve.materialize import load_model

    model, tok = load_model(specialists["addition"])
    reqs = requests("evo_addition", 12)
    ours, theirs = both(model, tok, batch_size=5, max_length=6)
    assert_same(ours.loglikelihood(reqs), theirs.loglikelihood(reqs))


def test_continuations_of_different_lengths_sharing_a_model_row(specialists):
    """lm-eval groups requests whose context + continuation[:-1] agree and scores all of them from one row,
    reading log-probabilities from the start of that row's window; the plan reproduces that exactly."""
    from evolve.materialize import load_model

    model, tok = load_model(specialists["addition"])
    ours, theirs = both(model, tok, batch_size=4)
    context = [5, 6, 7]
    with torch.no_grad():  # the model's own greedy continuation of two tokens, so that greediness varies
        g1 = int(model(torch.tensor([context])).logits[0, -1].argmax())
        g2 = int(model(torch.tensor([context + [g1]])).logits[0, -1].argmax())
    other = next(t for t in range(3, 20) if t not in (g1, g2))
    token_requests = [(("a", "b"), context, [g1, g2]), (("c", "d"), context + [g1], [g2]),
                      (("e", "f"), context + [g1], [other]), (("g", "h"), [11, 12], [13, 14, 15]),
                      (("i", "j"), [4], [3])]
    got = ours._loglikelihood_tokens(list(token_requests))
    assert_same(got, theirs._loglikelihood_tokens(list(token_requests)))
    assert [g for _, g in got[:3]] == [True, True, False]


GENERATE_TASK = """task: evo_addition_gen
custom_dataset: !function utils.load_addition
output_type: generate_until
validation_split: validation
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["="]
  max_gen_toks: 3
  do_sample: false
filter_list:
  - name: digits
    filter:
      - function: regex
        regex_pattern: "^(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_generation_tasks_score_as_with_lm_eval(specialists, tmp_path):
    """A generate_until task (greedy answers, a regex filter) goes through lm-eval's own generation, untouched
    (the remembered tokenizations serve only its ordering by length there): the same score as stock HFLM's,
    call after call, for models that score apart."""
    from lm_eval.models.huggingface import HFLM

    from evolve.config import TaskDefinition
    from evolve.materialize import load_model
    from evolve.scoring import LmEvalScorer

    (tmp_path / "gen.yaml").write_text(GENERATE_TASK)
    (tmp_path / "utils.py").write_text(  # the bundled loader, from next to the task as lm-eval expects
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('bundled_task_utils', {str(ROOT / 'tasks' / 'utils.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
        "load_addition = module.load_addition\n")
    scores = {}
    for name in ("addition", "base"):
        model, tok = load_model(specialists[name])
        scorer = LmEvalScorer([TaskDefinition(name="evo_addition_gen", metric="exact_match,digits")], [str(tmp_path)],
                              limit=16)
        lm = scorer.make_lm(model, tok)
        scores[name] = [scorer.score(lm)["evo_addition_gen"] for _ in range(2)]
        stock = HFLM(pretrained=model, tokenizer=tok, batch_size=32)
        assert scores[name] == [scorer.score(stock)["evo_addition_gen"]] * 2
    assert scores["addition"][0] == 0.5 and scores["base"][0] == 0.0  # knows the first 8 of the 16 problems


def test_tokenizations_remembered_per_special_tokens_setting(specialists):
    """With a tokenizer that adds BOS, the same text is encoded with it (a context) and without it (the
    continuation of an empty context): both remembered apart, as lm-eval encodes them."""
    from tokenizers import processors

    from evolve.materialize import load_model

    model, tok = load_model(specialists["addition"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    ours, theirs = both(model, tok, batch_size=4)
    reqs = [SimpleNamespace(args=args) for args in (("", "12+3="), ("12+3=", "15"), ("", "15"), ("4+4=", "8"))]
    assert ours.tok_encode("12+3=")[0] == tok.bos_token_id != ours.tok_encode("12+3=", add_special_tokens=False)[0]
    assert_same(ours.loglikelihood(reqs), theirs.loglikelihood(reqs))
