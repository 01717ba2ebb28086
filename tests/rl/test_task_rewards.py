"""The built-in tasks' code-checked rewards give what their docstrings say."""
import json
import random

from unitune.tasks import arithmetic, orders


def test_arithmetic_rows_and_rewards(tmp_path):
    arithmetic.write(tmp_path, n_train=50, n_val=10)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for r in rows:  # every answer is what the question asks
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
    answers = ["48"] * 5
    said = ["48", "73 - 25 = 48", "The answer is 47.", "48 apples, or 49", "no number"]
    assert arithmetic.correct(None, said, answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert arithmetic.exact(None, ["48", " 48.", "73 - 25 = 48", "480", ""], answers) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_order_field_reward_gives_partial_credit():
    truth = orders.make_row(random.Random(0), False)["output"]
    want = json.loads(truth)
    half = json.dumps({**want, "qty": want["qty"] + 1, "city": "Nowhere"})
    said = [truth, f"Here it is: {truth}", half, "{not json", "Sure!"]
    assert orders.field_reward(None, said, [truth] * 5) == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert orders.exact_reward(None, said, [truth] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
