"""Rewards for online RL from any mix of sources, each with a weight: a Python function
(`module:function`, e.g. an answer checked by code) or a trained reward model (objective.name=reward).

A function is called as TRL calls its reward functions: `fn(prompts=[...], completions=[...], **columns)`
where each column of the data rows (an `answer`, say) comes as a list aligned with the completions;
prompts are as the rows give them (a string or messages), completions are strings. It returns one
float per completion, or None where it does not apply (that source then adds nothing for the row).
A function that raises, returns the wrong number of values, or a NaN/inf stops the run naming the
row (file:line) it failed on.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import model_validator

from unitune.config import RecipeError, Section


class RewardError(RuntimeError):
    """A reward source failed on a row: the run stops, naming it."""


class RewardSource(Section):
    function: str | None = None   # module:function
    model: str | None = None      # a reward model: a run directory (objective.name=reward) or its adapter
    weight: float = 1.0
    name: str | None = None       # how its figures are logged (default: the function's or model's name)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.function is None) == (self.model is None):
            raise ValueError("a reward source names exactly one of 'function' (module:function) or 'model' "
                             "(a reward model's run directory)")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.function.rsplit(":", 1)[-1] if self.function else Path(self.model).name)


def load_function(spec: str, what: str = "reward function") -> Callable:
    """`module:function`, imported; the module must be importable (installed, or on PYTHONPATH)."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise RecipeError(f"{what} '{spec}': write it as module:function (e.g. mypkg.rewards:exact)")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"{what} '{spec}' cannot be loaded: {err} (the module must be importable: installed, "
                          "or on PYTHONPATH)") from None
    if not callable(fn):
        raise RecipeError(f"{what} '{spec}' is a {type(fn).__name__}, not a function")
    return fn


class Rewards:
    """The weighted sum of every source's rewards, and each source's own values for the logs."""

    def __init__(self, sources: list[RewardSource], device: torch.device | str = "cpu"):
        if not sources:
            raise RecipeError("objective.rewards is empty: name at least one, e.g. rewards: [{function: "
                              "mypkg.rewards:correct}] or [{model: runs/reward}]")
        self.sources = sources
        self.fns: list[Callable] = []
        for s in sources:
            self.fns.append(load_function(s.function) if s.function else _reward_model(s.model, device))

    def __call__(self, prompts: list, completions: list[str], rows: list[dict], where: list[str]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros(len(completions))
        each = {}
        for source, fn in zip(self.sources, self.fns):
            values = call(source, fn, prompts, completions, rows, where)
            each[source.label] = values
            total += source.weight * torch.nan_to_num(values, nan=0.0)  # None: adds nothing
        return total, each


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = [k for k in rows[0] if k not in ("prompt", "completion", "completions", "prompts")]
    return {k: [r.get(k) for r in rows] for k in keys}


def call(source: RewardSource, fn: Callable, prompts, completions, rows, where, kind: str = "reward") -> torch.Tensor:
    """fn's value for each completion (NaN where it returned None), its failures named by row."""
    what = f"{kind} {source.function or source.model}"
    try:
        values = fn(prompts=prompts, completions=completions, **_columns(rows))
    except Exception as err:  # name the first row it fails on, calling it row by row
        for i in range(len(completions)):
            try:
                fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **_columns(rows[i : i + 1]))
            except Exception as one:
                raise RewardError(f"{what} raised {type(one).__name__}: {one} on {where[i]} "
                                  f"(completion {completions[i][:80]!r})") from one
        raise RewardError(f"{what} raised {type(err).__name__}: {err} on a batch of {len(completions)}") from err
    values = list(values)
    if len(values) != len(completions):
        raise RewardError(f"{what} returned {len(values)} values for {len(completions)} completions; return one "
                          "float (or None) per completion")
    out = torch.full((len(values),), float("nan"))
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{what} returned {v!r} for {where[i]}; return a float (or None)") from None
        if not math.isfinite(v):
            raise RewardError(f"{what} returned {v} for {where[i]} (completion {completions[i][:80]!r}); "
                              "a reward must be a finite number, or None where it does not apply")
        out[i] = v
    return out


def _reward_model(path: str, device) -> Callable:
    from unitune.api import RewardModel

    model = RewardModel(path, device)
    return lambda prompts, completions, **_: model(prompts, completions)
