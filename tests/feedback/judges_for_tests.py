"""Judges with planted biases for tests/feedback/test_judge.py: `--judge tests.feedback.judges_for_tests:NAME`."""


def always_first(prompt, first: str, second: str) -> str:
    """Pure position bias: whatever is shown first wins."""
    return "first"


def longer(prompt, first: str, second: str) -> str:
    """Pure length bias: the longer answer wins, equal lengths tie."""
    return "first" if len(first) > len(second) else "second" if len(second) > len(first) else "tie"


def knows(prompt, first: str, second: str) -> str:
    """Right on the synthetic set, whose correct answer starts with "right"."""
    return "first" if first.startswith("right") else "second"


def says_a(prompt, first: str, second: str) -> str:
    """Answers as a person would, not as a judge function must."""
    return "A"
