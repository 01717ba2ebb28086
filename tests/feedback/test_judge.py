"""`unitune judge`: planted biases (tests/feedback/judges_for_tests.py) recovered by the report, Cohen's kappa
against hand-computed values, the LLM judge's verdict read from its next-token log-probabilities, a reward
model as judge, and the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from unitune import api
from unitune.cli import main
from unitune.data.files import Row
from unitune.data.preference import to_pair
from unitune.feedback import judge
from unitune.feedback.judge import cohen_kappa, question

JUDGES = "tests.feedback.judges_for_tests"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _pairs_load(path: Path) -> list[dict]:
    """OUT's rows, each one the preference reader accepts."""
    rows = _lines(path)
    for n, r in enumerate(rows, 1):
        to_pair(Row(r, f"{path}:{n}"))
    return rows


def test_cohen_kappa_hand_computed():
    # 50 items: both "yes" 20, both "no" 15, disagreeing 5 + 10. p_o = 35/50 = 0.7; rater 1 says yes 25/50,
    # rater 2 30/50, so p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 and kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    x = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    y = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance explains everything: undefined
    assert cohen_kappa([], []) is None


def test_always_first_judge_is_all_position_bias(tmp_path):
    rows = [{"prompt": f"q{i}", "a": "x" * (i + 1), "b": "y" * (5 - i)} for i in range(5)]
    out = tmp_path / "out.jsonl"
    rep = judge.run(_write(tmp_path / "pairs.jsonl", rows), f"{JUDGES}:always_first", out, inconsistent="mark",
                    progress=False)
    assert rep["pairs"] == 5 and rep["agreement"] == 0.0
    assert rep["position_bias"] == {"rate": 1.0, "first": 1.0, "second": 0.0, "direction": "first"}
    assert rep["length"] == {"longer_wins": None, "correlation": None}  # no verdict to relate to length
    assert out.read_text() == ""  # nothing consistent to learn from
    marked = _lines(tmp_path / "out.inconsistent.jsonl")
    assert [r["index"] for r in marked] == list(range(5))
    assert all(r["label"] == "inconsistent" and [(o["first"], o["verdict"]) for o in r["orders"]]
               == [("a", "first"), ("b", "first")] for r in marked)
    assert (marked[2]["prompt"], marked[2]["a"], marked[2]["b"]) == ("q2", "xxx", "yyy")  # an INPUT file again
    assert (tmp_path / "out.skipped.jsonl").read_text() == ""


def test_longer_judge_is_all_length_bias(tmp_path):
    rows = [{"prompt": "q0", "a": "a long answer", "b": "short"},
            {"prompt": "q1", "a": "short", "b": "a long answer"},
            {"prompt": MESSAGES, "a": "Blue.", "b": "Blue, like the sky."},
            # the preference layout, re-judged: its `rejected` is the longer, so it wins
            {"prompt": "q3", "chosen": "tiny", "rejected": "much longer"},
            {"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "Red, as roses are."}],
             "rejected": [{"role": "assistant", "content": "Red."}]},
            {"prompt": "q5", "a": "same", "b": "also"},  # equal lengths: a tie
            {"prompt": "q6", "a": "same", "b": " same"}]  # one answer twice: not judged
    out = tmp_path / "out.jsonl"
    rep = judge.run(_write(tmp_path / "pairs.jsonl", rows), f"{JUDGES}:longer", out, with_report=True,
                    progress=False)
    assert rep["pairs"] == 6 and rep["agreement"] == 1.0
    assert rep["position_bias"]["rate"] == 0.0 and rep["position_bias"]["direction"] == "none"
    assert rep["length"] == {"longer_wins": 1.0, "correlation": pytest.approx(1.0)}
    assert rep["outcomes"] == {"a": 2, "b": 3, "tie": 1, "inconsistent": 0}
    assert json.loads((tmp_path / "out.report.json").read_text()) == rep

    pairs = _pairs_load(out)
    assert [(p["index"], p["winner"]) for p in pairs] == [(0, "a"), (1, "b"), (2, "b"), (3, "b"), (4, "a")]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("a long answer", "short")
    assert pairs[0]["judge"] == f"{JUDGES}:longer"
    assert pairs[2]["prompt"] == MESSAGES
    assert pairs[2]["chosen"] == [{"role": "assistant", "content": "Blue, like the sky."}]
    assert (pairs[3]["chosen"], pairs[3]["rejected"]) == ("much longer", "tiny")
    assert pairs[4]["chosen"] == [{"role": "assistant", "content": "Red, as roses are."}]
    assert pairs[1]["orders"] == [{"first": "a", "verdict": "second"}, {"first": "b", "verdict": "first"}]
    skipped = _lines(tmp_path / "out.skipped.jsonl")
    assert [(r["index"], r["label"]) for r in skipped] == [(5, "tie"), (6, "skip")]
    assert not (tmp_path / "out.inconsistent.jsonl").exists()  # dropped by default, and there were none


def test_agreement_with_human_labels(tmp_path):
    # Eight pairs, the right answer in `a` for rows 0-5 and in `b` for rows 6-7; the judge knows which.
    rows = [{"prompt": f"question {i}", "a": f"right {i}" if i < 6 else f"wrong {i}",
             "b": f"wrong {i}" if i < 6 else f"right {i}"} for i in range(8)]
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    people = [{"prompt": f"question {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(8)]
    same = judge.run(pairs, f"{JUDGES}:knows", tmp_path / "o1.jsonl",
                     human=_write(tmp_path / "same.jsonl", people[::-1]), progress=False)["human"]
    assert same == {"matched": 8, "decided": 8, "agreement": 1.0, "kappa": pytest.approx(1.0)}

    # People flip rows 0 and 6, and write their file in the conversational layout (it matches all the same).
    # Judge: a a a a a a b b; people: b a a a a a a b. p_o = 6/8; both say "a" 6 times in 8, so
    # p_e = (6*6 + 2*2) / 64 = 0.625 and kappa = (0.75 - 0.625) / (1 - 0.625) = 1/3.
    flipped = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["rejected" if i in (0, 6) else "chosen"]}],
                "rejected": [{"role": "assistant", "content": p["chosen" if i in (0, 6) else "rejected"]}]}
               for i, p in enumerate(people)]
    other = judge.run(pairs, f"{JUDGES}:knows", tmp_path / "o2.jsonl",
                      human=_write(tmp_path / "flipped.jsonl", flipped[:7]), progress=False)["human"]
    # Row 7 unmatched: over rows 0-6 the judge says a*6 b*1, people b a a a a a a (a*6 b*1), agreeing on 5.
    # p_o = 5/7 = 35/49, p_e = (6*6 + 1*1) / 49 = 37/49: kappa = (35 - 37) / (49 - 37) = -1/6, worse than chance.
    assert other == {"matched": 7, "decided": 7, "agreement": pytest.approx(5 / 7), "kappa": pytest.approx(-1 / 6)}
    full = judge.run(pairs, f"{JUDGES}:knows", tmp_path / "o3.jsonl",
                     human=_write(tmp_path / "flipped.jsonl", flipped), progress=False)["human"]
    assert full == {"matched": 8, "decided": 8, "agreement": 0.75, "kappa": pytest.approx(1 / 3)}


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])  # GPT-2: absolute positions, shifted by bad padding
def test_llm_judge_reads_the_next_token_of_each_order(tmp_path, family, request, tokenizer):
    model_dir = request.getfixturevalue(family)
    rows = [{"prompt": "What is two plus two?", "a": "Four.", "b": "It is four, I am fine."},
            {"prompt": MESSAGES, "a": "Blue.", "b": "Hello"},
            {"prompt": "Hello, how are you?", "a": "I am fine. How are you?", "b": "Fine."}]
    out = tmp_path / "out.jsonl"
    # Batches of two pairs (four orders of different lengths): padding must not change a verdict.
    judge.run(_write(tmp_path / "pairs.jsonl", rows), str(model_dir), out, inconsistent="mark", batch_size=2,
              device="cpu", progress=False)
    records = {r["index"]: r for name in ("out.jsonl", "out.skipped.jsonl", "out.inconsistent.jsonl")
               for r in _lines(tmp_path / name)}
    assert sorted(records) == [0, 1, 2]  # each pair in exactly one file
    _pairs_load(out)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    vocab = tokenizer.get_vocab()
    letters = [[vocab[t] for t in (x, "Ġ" + x) if t in vocab] for x in "AB"]  # byte-level BPE spells " A" as "ĠA"
    for i, row in enumerate(rows):
        orders = records[i]["orders"]
        assert [o["first"] for o in orders] == ["a", "b"]
        for o, (first, second) in zip(orders, [(row["a"], row["b"]), (row["b"], row["a"])]):
            text = tokenizer.apply_chat_template(question(row["prompt"], first, second, judge.RUBRIC), tokenize=False,
                                                 add_generation_prompt=True)
            assert "[Answer A]\n" + first in text and "[Answer B]\n" + second in text
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = model(ids).logits[0, -1].log_softmax(-1)
            a, b = (logp[ids_].logsumexp(0).item() for ids_ in letters)
            assert o["verdict"] == ("first" if a > b else "second")
            p_a = math.exp(a) / (math.exp(a) + math.exp(b))
            assert o["confidence"] == pytest.approx(abs(2 * p_a - 1), abs=1e-4)


class FakeRewardModel:
    """Scores an answer by its length, except "meh" answers, which all score 1."""
    calls: list = []

    def __init__(self, target, device="cpu", batch_size=16):
        self.target = target

    def __call__(self, prompts, completions):
        FakeRewardModel.calls.append((self.target, prompts, completions))
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [1.0 if t.startswith("meh") else float(len(t)) for t in texts]


def test_reward_model_judge(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "RewardModel", FakeRewardModel)
    FakeRewardModel.calls = []
    rows = [{"prompt": "q0", "a": "short", "b": "a longer one"},
            {"prompt": MESSAGES, "a": "Blue, like the sky.", "b": "Blue."},
            {"prompt": "q2", "a": "meh one", "b": "meh two"}]
    out = tmp_path / "out.jsonl"
    rep = judge.run(_write(tmp_path / "pairs.jsonl", rows), "reward:some/run", out, device="cpu", progress=False)
    (target, prompts, completions), = FakeRewardModel.calls  # one call for the batch
    assert target == "some/run"
    assert len(completions) == 6  # each answer once, though shown in two orders
    assert [MESSAGES, [{"role": "assistant", "content": "Blue."}]] == [prompts[3], completions[3]]
    assert rep["agreement"] == 1.0 and rep["position_bias"]["rate"] == 0.0
    pairs = _pairs_load(out)
    assert [(p["index"], p["winner"]) for p in pairs] == [(0, "b"), (1, "a")]
    assert [o["confidence"] for o in pairs[0]["orders"]] == [7.0, 7.0]  # the score gap
    assert [r["label"] for r in _lines(tmp_path / "out.skipped.jsonl")] == ["tie"]  # equal scores
    with pytest.raises(ValueError, match="--rubric is what an LLM judge is asked"):
        judge.run(tmp_path / "pairs.jsonl", "reward:some/run", out, rubric="be kind", progress=False)


def test_cli_writes_the_files_and_prints_the_report(tmp_path, capsys):
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "a": f"a{i}", "b": f"bb{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    assert main(["judge", str(pairs), "--judge", f"{JUDGES}:always_first", "-o", str(out), "--report"]) == 0
    printed = capsys.readouterr()
    assert "position bias" in printed.out and "1.000 (first)" in printed.out
    assert "0 preference pairs" in printed.err and "4 inconsistent (dropped)" in printed.err
    assert out.read_text() == "" and not (tmp_path / "out.inconsistent.jsonl").exists()
    assert json.loads((tmp_path / "out.report.json").read_text())["position_bias"]["rate"] == 1.0
    # No -o: beside INPUT.
    assert main(["judge", str(pairs), "--judge", f"{JUDGES}:longer"]) == 0
    assert len(_pairs_load(tmp_path / "pairs.judged.jsonl")) == 4


@pytest.mark.parametrize("line, judge_, says", [
    ('{"prompt": "q", "a": "x"}', "always_first", "pairs.jsonl:2: missing 'b'"),
    ('{"prompt": "q", "a": "x", "b": 3}', "always_first", "pairs.jsonl:2: 'b' is a int"),
    ('{"prompt": "q", "a": "x", "b": "y"}', "says_a", f"pairs.jsonl:1 (a first): --judge {JUDGES}:says_a returned 'A'"),
])
def test_cli_errors_are_one_line_naming_the_row(tmp_path, capsys, line, judge_, says):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "a": "x", "b": "yy"}\n' + line + "\n")
    assert main(["judge", str(tmp_path / "pairs.jsonl"), "--judge", f"{JUDGES}:{judge_}",
                 "-o", str(tmp_path / "out.jsonl")]) == 2
    errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("unitune:")]  # beside tqdm's bar
    assert len(errors) == 1 and says in errors[0]
    assert not (tmp_path / "out.jsonl").exists()
