"""`unitune label`: the session state machine, its files, and the real CLI driven through a pseudo-terminal,
killed midway and resumed."""
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from unitune.cli import main
from unitune.config import DataConfig
from unitune.data.build import build_data
from unitune.data.files import DataError
from unitune.feedback.label import Pair, Session, Store, arrange, shown
from unitune.objectives import pairs

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["What is two plus two?", MESSAGES, "Hello, how are you?"]


def _pair(i: int, left: str = "A", right: str = "B") -> Pair:
    return Pair(i, PROMPTS[i], left, right, f"{left} answers {i}", f"{right} answers {i}")


def _t(n: int) -> str:
    return f"2026-01-01T00:00:{n:02d}.000000+00:00"


def test_left_and_right_choose_the_answer_shown_there():
    s = Session(3, [])
    left = s.press("1", _pair(0, "A", "B"), _t(0)).record
    assert (left["chosen"], left["rejected"], left["chosen_model"], left["rejected_model"], left["left"]) == \
        ("A answers 0", "B answers 0", "A", "B", "A")
    # Shown the other way round, the right arrow picks what is on the right: B's answer, B on the left.
    right = s.press("\x1b[C", _pair(1, "B", "A"), _t(1)).record
    assert (right["chosen_model"], right["left"]) == ("A", "B")
    # A prompt given as messages gives TRL's conversational layout.
    assert right["prompt"] == MESSAGES and right["chosen"] == [{"role": "assistant", "content": "A answers 1"}]
    assert s.current() == 2


def test_tie_skip_undo_and_refusals():
    s = Session(3, [])
    tie = s.press("t", _pair(0), _t(0))
    assert tie.kind == "write" and tie.record["label"] == "tie" and "chosen" not in tie.record
    assert s.press("s", _pair(1), _t(1)).record["label"] == "skip"
    assert s.press("x", _pair(2), _t(2)).kind == "refuse" and s.current() == 2
    same = Pair(2, PROMPTS[2], "A", "B", "same", " same ")
    assert s.press("1", same, _t(2)).kind == "refuse"  # no preference to learn from identical answers
    undo = s.press("u", same, _t(3))
    assert undo.kind == "unwrite" and undo.record["label"] == "skip" and s.current() == 1
    assert s.press("u", _pair(1), _t(4)).record["label"] == "tie" and s.current() == 0
    assert s.press("u", _pair(0), _t(5)).kind == "refuse"  # nothing left to undo
    assert s.press("q", _pair(0), _t(5)).kind == "quit"


def test_undo_shows_the_pair_again_in_the_order_it_was_shown():
    s = Session(3, [])
    first = _pair(0, "B", "A")  # randomised: B on the left
    s.press("2", first, _t(0))
    s.press("u", _pair(1), _t(1))
    assert s.current() == 0 and s.replay(0) == first
    redo = s.press("1", s.replay(0), _t(2)).record
    assert (redo["chosen_model"], redo["left"]) == ("B", "B") and s.replay(0) is None
    s.press("u", _pair(1), _t(3))
    tie = s.press("t", s.replay(0), _t(4)).record  # ties keep the order too
    assert shown(tie) == first == shown(redo)


def test_position_is_random_per_prompt_seeded_and_recorded():
    answers = {"A": "a", "B": "b"}
    lefts = [arrange(i, "p", answers, seed=0).left for i in range(400)]
    assert 150 < lefts.count("A") < 250  # both orders, about as often
    assert lefts == [arrange(i, "p", answers, seed=0).left for i in range(400)]  # the same after a restart
    assert lefts != [arrange(i, "p", answers, seed=1).left for i in range(400)]
    p = arrange(7, "p", answers, seed=0)
    assert {p.left: p.left_text, p.right: p.right_text} == answers


def test_store_resumes_and_undoes_across_a_restart(tmp_path):
    out = tmp_path / "labels.jsonl"
    store, s = Store(out), Session(3, [])
    for key, i in (("1", 0), ("t", 1)):
        store.append(s.press(key, _pair(i), _t(i)).record)
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0]  # pairs only in OUT
    assert json.loads((tmp_path / "labels.skipped.jsonl").read_text())["label"] == "tie"

    again = Session(3, Store(out).load(PROMPTS))  # a new process
    assert again.current() == 2
    store.remove(again.press("u", _pair(2), _t(5)).record)  # undo reaches back past the restart: the tie
    assert (tmp_path / "labels.skipped.jsonl").read_text() == "" and again.current() == 1
    assert again.replay(1) == _pair(1)
    store.remove(again.press("u", _pair(1), _t(6)).record)
    assert out.read_text() == "" and Store(out).load(PROMPTS) == []


def test_store_refuses_other_prompts_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "labels.jsonl"
    Store(out).append(Session(3, []).press("1", _pair(0), _t(0)).record)
    with pytest.raises(DataError, match=r"labels.jsonl:1: judged prompt row 0 is not row 0 of PROMPTS"):
        Store(out).load(["another question"] + PROMPTS[1:])
    with out.open("a") as f:
        f.write('{"prompt": "Hello, how')  # what a crash inside a write could leave
    assert [r["index"] for r in Store(out).load(PROMPTS)] == [0]
    assert out.read_text().endswith("}\n")
    with pytest.raises(ValueError, match="must end in .jsonl"):
        Store(tmp_path / "labels.csv")


@pytest.mark.parametrize("extra, says", [
    (["--model", "m", "--temperature", "0"], "answers the same twice"),
    (["--model", "m", "--model", "m"], "give two different models"),
    (["--model", "m"], "stdin is not one"),  # pytest's stdin is no terminal
])
def test_cli_refusals_are_one_line(tmp_path, capsys, extra, says):
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n')
    assert main(["label", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "o.jsonl"), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


# --- the real CLI through a pseudo-terminal ---------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`unitune label` on the slave side of a pty; keys typed and the screen read on the master side."""

    def __init__(self, args: list[str], cwd: Path):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "unitune", "label", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, env=env, start_new_session=True)
        os.close(slave)
        self.master, self.screen = master, ""

    def expect(self, text: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while text not in ANSI.sub("", self.screen):
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                self.proc.kill()
                pytest.fail(f"no {text!r} on screen within {timeout}s; it shows:\n{ANSI.sub('', self.screen)[-3000:]}")
            try:
                self.screen += os.read(self.master, 65536).decode("utf-8", "replace")
            except OSError:  # EIO: the process closed the terminal
                pytest.fail(f"ended before {text!r}:\n{ANSI.sub('', self.screen)[-3000:]}")

    def press(self, key: str, then: str) -> None:
        """Type a key and wait for the screen that follows it (drawn only after the verdict is on disk)."""
        self.screen = ""
        os.write(self.master, key.encode())
        self.expect(then)

    def close(self) -> None:
        os.close(self.master)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_cli_through_a_terminal_killed_and_resumed(tmp_path, tiny_llama, tokenizer):
    rows = [{"prompt": "What is two plus two?"}, {"messages": MESSAGES}, {"prompt": "Hello, how are you?"},
            {"messages": MESSAGES + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]},
            {"prompt": "I am fine. What is two plus two?"}, {"prompt": "user assistant"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["prompts.jsonl", "--model", str(tiny_llama), "-o", "labels.jsonl", "--max-new-tokens", "6",
            "--batch-size", "4", "--device", "cpu", "--temperature", "1.0", "--seed", "1"]
    out, side = tmp_path / "labels.jsonl", tmp_path / "labels.skipped.jsonl"

    term = Terminal(args, tmp_path)
    term.expect("labelled 0 / 6")
    term.press("1", "labelled 1 / 6")
    term.press("t", "labelled 2 / 6")
    term.press("\x1b[D", "labelled 3 / 6")
    term.press("u", "labelled 2 / 6")  # takes back the left arrow on prompt 3
    term.press("2", "labelled 3 / 6")
    term.proc.send_signal(signal.SIGKILL)  # mid-session, waiting for a key
    term.proc.wait(timeout=10)
    term.close()
    assert [r["index"] for r in _lines(out)] == [0, 2] and [r["label"] for r in _lines(side)] == ["tie"]
    undone = _lines(out)[1]
    assert undone["chosen_model"] != undone["left"]  # the second verdict was "right", after the undo

    term = Terminal(args, tmp_path)
    term.expect("labelled 3 / 6")  # resumes at prompt 4
    term.press("1", "labelled 4 / 6")
    term.press("s", "labelled 5 / 6")
    term.press("2", "every prompt is judged")
    term.press("q", "6 of 6 prompts judged")
    assert term.proc.wait(timeout=10) == 0
    term.close()

    labelled = _lines(out) + _lines(side)
    assert sorted(r["index"] for r in labelled) == list(range(6))  # none lost, none doubled
    assert [r["label"] for r in _lines(side)] == ["tie", "skip"]
    assert {r["left"] for r in labelled} <= {f"{tiny_llama}#1", f"{tiny_llama}#2"}
    data = build_data(DataConfig(train=str(out)), tokenizer, 0, pairs.example)
    assert len(data.train) + len(data.val) == 4
    assert [isinstance(r["prompt"], list) for r in _lines(out)] == [False, False, True, False]
