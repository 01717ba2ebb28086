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


def test_a_judge_compares_the_tuned_answers_with_the_base_models(tiny_recipe, monkeypatch):
    import unitune.eval.metrics as metrics
    from unitune.cli import main

    run = unitune.train({**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 1}, "eval": {"generate": 0}})
    calls = []

    def answers(model, tok, prompts, *a, **k):  # the base answers short, the tuned model long, but for one prompt
        calls.append(len(calls))
        return ["x" * (i % 5 + 1) for i in range(len(prompts))] if len(calls) == 1 else \
            ["y" * 10 if i else "" for i in range(len(prompts))]

    monkeypatch.setattr(metrics, "generate", answers)
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "generate": 8}}
    results = unitune.evaluate(recipe, run=run.dir, judge="tests.feedback.judges_for_tests:longer")
    j = results["judge"]
    assert j["pairs"] == 8 and j["win_rate"] == 7 / 8 and j["loss_rate"] == 1 / 8 and j["inconsistent_rate"] == 0
    assert j["length"]["longer_wins"] == 1.0 and j["position_bias"]["rate"] == 0.0

    calls.clear()
    biased = unitune.evaluate(recipe, run=run.dir, judge="tests.feedback.judges_for_tests:always_first")["judge"]
    assert biased["inconsistent_rate"] == 1.0 and biased["position_bias"]["first"] == 1.0 and biased["win_rate"] == 0
    with pytest.raises(RecipeError, match="--run"):
        unitune.evaluate(recipe, judge="tests.feedback.judges_for_tests:longer")
    assert main(["eval", str(run.dir / "recipe.yaml"), "--judge", "x:y"]) == 2
