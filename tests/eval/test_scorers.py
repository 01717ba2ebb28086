"""eval.scorers: Python scoring functions of the generated answers, called as RL reward functions are."""
from __future__ import annotations

import pytest

import unitune
from unitune.config import RecipeError
from unitune.rl.rewards import RewardError

SCORERS = "tests.eval.scorers_for_tests"


def _recipe(tiny_recipe, scorers):
    return {**tiny_recipe, "eval": {**tiny_recipe["eval"], "generate": 6, "scorers": scorers}}


def test_a_scorer_gets_the_answers_and_their_references(tiny_recipe):
    recipe = _recipe(tiny_recipe, [f"{SCORERS}:same", f"{SCORERS}:first_only"])
    base = unitune.evaluate(recipe)["base"]
    assert base["score_same"] == base["exact_match"]  # the same judgement, made by the user's function
    assert base["score_first_only"] == 1.0  # the mean over the answers it scored, not over all six


def test_a_scorer_that_fails_names_the_row_and_a_missing_one_fails_first(tiny_recipe, monkeypatch):
    import unitune.eval.metrics as metrics

    monkeypatch.setattr(metrics, "generate", lambda model, tok, prompts, *a, **k: ["ok"] * (len(prompts) - 1) + ["{x}"])
    with pytest.raises(RewardError, match=r"scorer .*fails_on_braces raised ValueError: no braces on .*val.jsonl:\d+"):
        unitune.evaluate(_recipe(tiny_recipe, [f"{SCORERS}:fails_on_braces"]))
    with pytest.raises(RecipeError, match="eval.scorers function 'tests.eval.scorers_for_tests:nope' cannot be loaded"):
        unitune.train(_recipe(tiny_recipe, [f"{SCORERS}:nope"]))
