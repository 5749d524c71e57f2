"""The search file's `fitness:` rule (evolve/fitness.py): the arithmetic on hand-computed numbers, (the plumbing on
real models is in test_evolve.py: test_normalized_min_fitness_on_real_models)."""

from __future__ import annotations

import math

import pytest

from evolve.config import FitnessDefinition
from evolve.fitness import FitnessRule, best_per_task, check_references
from evolve.scoring import Score

SCORES = {"add": 0.9, "rev": 0.4}
REFS = {"add": 0.95, "rev": 0.8}


def test_normalized_aggregates_on_hand_numbers():
    def rule(aggregate, weights=None):
        return FitnessRule(weights or {"add": 1.0, "rev": 1.0}, {}, aggregate, REFS)

    # 0.9 / 0.95 = 0.947..., 0.4 / 0.8 = 0.5
    assert rule("mean")(SCORES) == pytest.approx((0.9 / 0.95 + 0.5) / 2)
    assert rule("min")(SCORES) == pytest.approx(0.5)
    assert rule("harmonic")(SCORES) == pytest.approx(2 / (0.95 / 0.9 + 0.8 / 0.4))  # 0.6545
    assert rule("geometric")(SCORES) == pytest.approx(math.sqrt(0.9 / 0.95 * 0.5))
    assert rule("mean", {"add": 3.0, "rev": 1.0})(SCORES) == pytest.approx((3 * 0.9 / 0.95 + 0.5) / 4)
    # the plain mean would rank a lopsided candidate first; the harmonic mean of normalized scores does not
    lopsided, balanced = {"add": 0.95, "rev": 0.35}, {"add": 0.7, "rev": 0.55}
    assert FitnessRule({"add": 1, "rev": 1})(lopsided) > FitnessRule({"add": 1, "rev": 1})(balanced)
    assert rule("harmonic")(balanced) > rule("harmonic")(lopsided)


def test_lower_is_better_metrics_enter_negated_or_as_reference_over_value():
    plain = FitnessRule({"acc": 1.0, "ppl": 2.0}, {"acc": True, "ppl": False})
    assert plain({"acc": 0.9, "ppl": 12.5}) == pytest.approx((0.9 - 2 * 12.5) / 3)
    normalized = FitnessRule({"acc": 1.0, "ppl": 1.0}, {"acc": True, "ppl": False}, "min", {"acc": 0.9, "ppl": 10.0})
    assert normalized({"acc": 0.9, "ppl": 12.5}) == pytest.approx(10.0 / 12.5)
    assert best_per_task({"a": {"acc": 0.5, "ppl": 14.0}, "b": {"acc": 0.9, "ppl": 10.0}},
                         {"acc": True, "ppl": False}) == {"acc": 0.9, "ppl": 10.0}


def test_a_failed_score_keeps_its_penalty_and_a_zero_reference_is_refused():
    failed = Score.failed("merge failed: boom")
    assert FitnessRule({"add": 1.0}, {}, "min", {"add": 0.5}).rescore(failed) is failed
    with pytest.raises(ValueError, match="fitness.normalize: the best source model scores 0 on rev"):
        check_references({"add": 0.5, "rev": 0.0}, {})


def test_the_search_file_fitness_section_is_validated():
    with pytest.raises(ValueError, match="aggregate"):
        FitnessDefinition.model_validate({"aggregate": "median"})
    with pytest.raises(ValueError, match="normalise"):
        FitnessDefinition.model_validate({"normalise": True})


def test_the_report_states_each_rule():
    metrics = {"acc": "acc", "ppl": "word_perplexity"}
    plain = FitnessRule({"acc": 1.0, "ppl": 2.0}, {"acc": True, "ppl": False})
    assert plain.describe(metrics) == "(1 * acc/acc - 2 * ppl/word_perplexity) / 3"
    normalized = FitnessRule({"acc": 1.0, "ppl": 2.0}, {"acc": True, "ppl": False}, "harmonic",
                             {"acc": 0.9, "ppl": 10.0})
    assert normalized.describe(metrics) == ("weighted harmonic mean of (acc/acc / 0.9, 10 / ppl/word_perplexity), "
                                            "weights 1, 2")


def test_pareto_front_keeps_the_trade_offs_on_hand_numbers():
    from evolve.fitness import pareto_front

    scores = [{"a": 0.5, "b": 0.9}, {"a": 0.6, "b": 0.8}, {"a": 0.4, "b": 0.95},
              {"a": 0.5, "b": 0.85},  # beaten by the first on b, equal on a
              {"a": 0.6, "b": 0.8},  # the second again: listed once
              {"a": 0.3, "b": 0.7}]  # beaten by all
    assert pareto_front(scores, {"a": True, "b": True}) == [0, 1, 2]
    # a lower-is-better task flips which values win: the lowest b now beats the others on it
    assert pareto_front(scores, {"a": True, "b": False}) == [1, 5]
