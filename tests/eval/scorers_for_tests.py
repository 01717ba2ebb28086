"""Scoring functions for tests/eval/test_scorers.py: `eval.scorers: [tests.eval.scorers_for_tests:NAME]`."""
from unitune.eval.metrics import normalize


def same(prompts, completions, references):
    return [float(normalize(c) == normalize(r)) for c, r in zip(completions, references)]


def first_only(prompts, completions, references):
    """Scores the first answer only (None: does not apply to the others)."""
    return [1.0] + [None] * (len(completions) - 1)


def fails_on_braces(prompts, completions, references):
    for c in completions:
        if "{" in c:
            raise ValueError("no braces")
    return [0.0] * len(completions)
