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
