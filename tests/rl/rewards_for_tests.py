"""Reward functions the GRPO tests name by module:function, as a user's own module would be."""
import math


def letter_e(prompts, completions, **_):
    """Learnable by a tiny random model: the share of characters that are 'e'."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def answer_length(prompts, completions, answer, **_):
    return [float(len(a)) for a in answer]


def raises_on_seven(prompts, completions, answer, **_):
    if any("7" in a for a in answer):
        raise ValueError("cannot score a seven")
    return [0.0] * len(completions)


def nan_on_seven(prompts, completions, answer, **_):
    return [math.nan if "7" in a else 0.0 for a in answer]


def too_few(prompts, completions, **_):
    return [0.0]
