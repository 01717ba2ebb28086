"""Prompts for the online RL tests: a number to say something about, and its answer column."""
import json

import pytest


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": f"Say something about the number {i}.", "answer": str(i)} for i in range(24)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (out / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return out
