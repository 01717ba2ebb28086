"""Replay, a mitigation of forgetting (`data.replay`): a fraction of the training examples comes from data
of what the model should keep doing, so training rehearses it beside the new task.

`data.replay_from` is a data file of instruction or chat rows, or `chat` (unitune/tasks/chat.py: general
prompts disjoint from the `general` retention set). A row without an answer (an instruction without
`output`, a conversation ending with the user) is answered by the base model before the first step: the
model rehearses its own behaviour (self-generated replay), so no outside answers pull it anywhere new. The
answered rows are kept in the run directory as replay.jsonl, read back on resume, and worth a look.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from unitune import atomic, tasks
from unitune.config import Recipe
from unitune.data.build import load_examples
from unitune.data.files import Row, read_rows
from unitune.generation import generate

MAX_NEW_TOKENS = 128  # a self-generated answer longer than this is dropped, not cut (cut answers teach not to stop)
FILE = "replay.jsonl"


def _question(row: Row, system: str | None) -> list[dict] | None:
    """The conversation a row leaves for the model to answer, or None when the row holds its answer."""
    data = row.data
    if "instruction" in data and not str(data.get("output") or "").strip():
        prompt = "\n\n".join(str(data[k]) for k in ("instruction", "input") if data.get(k))
        system = data.get("system") or system
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    turns = data.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user":
        if system and turns[0].get("role") != "system":
            turns = [{"role": "system", "content": system}, *turns]
        return turns
    return None


def answered_rows(recipe: Recipe, tok, base, path: Path) -> list[dict]:
    """The replay rows, each with its answer: the file's own, or the base model's (greedy)."""
    rows = read_rows(path)
    questions = {i: q for i, r in enumerate(rows) if (q := _question(r, recipe.data.system_prompt))}
    answers, dropped = {}, 0
    if questions:
        print(f"unitune: replay: the base model answers {len(questions)} prompts of {path}", flush=True)
        with base() as reference:
            replies = generate(reference, tok, list(questions.values()), MAX_NEW_TOKENS,
                               batch_size=recipe.eval.batch_size, progress=True)
        for i, reply in zip(questions, replies):
            if reply.strip() and len(tok(reply).input_ids) < MAX_NEW_TOKENS - 1:
                answers[i] = reply
            else:
                dropped += 1  # empty, or cut off at the limit
    out = []
    for i, row in enumerate(rows):
        if i not in questions:
            out.append(row.data)
        elif i in answers:
            out.append({"instruction": row.data["instruction"], "output": answers[i]} if "instruction" in row.data
                       else {"messages": [*row.data["messages"], {"role": "assistant", "content": answers[i]}]})
    if dropped:
        print(f"unitune: replay: {dropped} self-generated answers left out (empty, or longer than {MAX_NEW_TOKENS} "
              "tokens)", flush=True)
    return out


def examples(recipe: Recipe, tok, base, to_example, n_train: int, run_dir: Path, stats: dict) -> list:
    """The replay examples to add to `n_train` training examples, so they make up `data.replay` of the whole."""
    kept = run_dir / FILE
    if not kept.is_file():  # a resumed run reads the answers its start generated
        rows = answered_rows(recipe, tok, base, tasks.data_file(recipe.data.replay_from))
        atomic.write_text(kept, "".join(json.dumps(r) + "\n" for r in rows))
    data = recipe.data.model_copy(update={"format": "auto", "max_examples": None})
    pool = load_examples(str(kept), data, tok, to_example, {})
    wanted = round(recipe.data.replay / (1 - recipe.data.replay) * n_train)
    order: list[int] = []
    rng = random.Random(recipe.train.seed)
    while len(order) < wanted:  # every pool example once before any twice
        order += rng.sample(range(len(pool)), len(pool))
    stats.update(replay_examples=wanted, replay_pool=len(pool))
    return [pool[i] for i in order[:wanted]]
