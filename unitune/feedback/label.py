"""`unitune label`: a person judges two answers per prompt, side by side; the verdicts become preference pairs.

Three parts, so that the logic is tested without a terminal:
- `Session`, a pure state machine: (the verdicts so far, the pair on screen, a key) -> an `Effect`
  (write a record, unwrite the last one, quit, or refuse with a note);
- `Store`, the files on disk;
- `run`, the terminal: models loaded, answers generated ahead in a thread, rich rendering, single keys.

Files. OUT holds preference pairs only, rows every pair objective reads as they are: TRL's standard
layout (`prompt`, `chosen`, `rejected` strings) or, when the prompt row had `messages`, the
conversational one (the prompt as messages, each answer one assistant message); beside them fields the
preference reader ignores: `chosen_model`, `rejected_model`, `left` (the one shown on the left), `index`
(the prompt's row in PROMPTS) and `time`. A tie or a skip is no pair to learn from, and a row with a
`label` in OUT would not train: they go to OUT.skipped.jsonl (`label` "tie" or "skip", both answers), so
OUT trains as it is and no verdict is lost.

Crash safety. A verdict is one write of one whole line to a file opened for appending, then fsync,
before the next pair is shown: a kill loses none. Undo rewrites the file without its last line
(`atomic.write_text`: temp, fsync, rename) rather than appending an undo record: an undo record in OUT
would be a row the preference reader refuses, and every reader would have to replay the log. It costs a
copy of the file per undo, which a person does rarely. A restart skips the prompts already judged
(`index`, checked against the prompt) and undo goes on across it: the history is both files' records
in `time` order.

Position bias. Which answer is shown on the left is drawn per prompt from (seed, index): random, the same
after a restart, recorded in `left`; undo shows the pair again in the same order. The screen names no
model, so the person judges blind.
"""
from __future__ import annotations

import json
import os
import random
import sys
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from unitune import api, atomic
from unitune.data.files import DataError
from unitune.engine.precision import pick_device
from unitune.generation import generate
from unitune.models.loader import LoadedModel

Prompt = str | list[dict]  # a string (standard layout) or messages ending with a user turn (conversational)

# Arrow keys arrive as escape sequences (ANSI cursor left / right).
KEYS = {"1": "left", "\x1b[D": "left", "2": "right", "\x1b[C": "right", "t": "tie", "s": "skip", "u": "undo",
        "q": "quit"}
HELP = "1/← left is better   2/→ right is better   t tie   s skip   u undo   q quit"
SKIPPED = ".skipped.jsonl"  # OUT.jsonl -> OUT.skipped.jsonl: ties and skips


@dataclass(frozen=True)
class Pair:
    """One prompt and its two answers in the order shown."""
    index: int  # the prompt's row in PROMPTS
    prompt: Prompt
    left: str  # the model (or sample) whose answer is on the left
    right: str
    left_text: str
    right_text: str


@dataclass(frozen=True)
class Effect:
    kind: str  # "write", "unwrite", "quit" or "refuse"
    record: dict | None = None
    note: str = ""


def arrange(index: int, prompt: Prompt, answers: dict[str, str], seed: int) -> Pair:
    """The two answers ({source: text}) in an order drawn from (seed, index): position bias must not become
    label bias, and a restart must show a pair as before."""
    (a, a_text), (b, b_text) = answers.items()
    if random.Random(f"{seed}:{index}").random() < 0.5:
        (a, a_text), (b, b_text) = (b, b_text), (a, a_text)
    return Pair(index, prompt, a, b, a_text, b_text)


def _answer(prompt: Prompt, text: str) -> str | list[dict]:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _text(answer: str | list[dict]) -> str:
    return answer if isinstance(answer, str) else answer[0]["content"]


def record(pair: Pair, verdict: str, when: str) -> dict:
    """The line a verdict writes: a pair for OUT (left, right) or a labelled row for the side file (tie, skip)."""
    if verdict in ("left", "right"):
        won, lost = (pair.left, pair.right) if verdict == "left" else (pair.right, pair.left)
        text = {pair.left: pair.left_text, pair.right: pair.right_text}
        return {"prompt": pair.prompt, "chosen": _answer(pair.prompt, text[won]),
                "rejected": _answer(pair.prompt, text[lost]), "chosen_model": won, "rejected_model": lost,
                "left": pair.left, "index": pair.index, "time": when}
    return {"prompt": pair.prompt, "label": verdict, "left": pair.left, "right": pair.right,
            "left_text": pair.left_text, "right_text": pair.right_text, "index": pair.index, "time": when}


def shown(rec: dict) -> Pair:
    """The pair a record was judged on, in the order it was shown (what undo puts back on screen)."""
    if "label" in rec:
        return Pair(rec["index"], rec["prompt"], rec["left"], rec["right"], rec["left_text"], rec["right_text"])
    text = {rec["chosen_model"]: _text(rec["chosen"]), rec["rejected_model"]: _text(rec["rejected"])}
    right = rec["rejected_model"] if rec["left"] == rec["chosen_model"] else rec["chosen_model"]
    return Pair(rec["index"], rec["prompt"], rec["left"], right, text[rec["left"]], text[right])


class Session:
    """Which prompt is next and what a key does; no I/O."""

    def __init__(self, total: int, history: list[dict]):
        self.total = total
        self.history = sorted(history, key=lambda r: r["time"])  # ISO times sort as they happened
        self.undone: dict[int, Pair] = {}

    def pending(self) -> list[int]:
        judged = {r["index"] for r in self.history}
        return [i for i in range(self.total) if i not in judged]

    def current(self) -> int | None:
        """The first prompt not judged yet (verdicts go in row order, so an undone one is first); None: all are."""
        return next(iter(self.pending()), None)

    def replay(self, index: int) -> Pair | None:
        """An undone pair comes back as it was shown, not regenerated."""
        return self.undone.get(index)

    def press(self, key: str, pair: Pair | None, when: str) -> Effect:
        verdict = KEYS.get(key)
        if verdict is None:
            return Effect("refuse", note=f"{key!r} is not a key here: {HELP}")
        if verdict == "quit":
            return Effect("quit")
        if verdict == "undo":
            if not self.history:
                return Effect("refuse", note="nothing to undo")
            rec = self.history.pop()
            self.undone[rec["index"]] = shown(rec)
            return Effect("unwrite", rec)
        if pair is None:
            return Effect("refuse", note="every prompt is judged: u undoes the last verdict, q quits")
        same = pair.left_text.strip() == pair.right_text.strip()
        if verdict in ("left", "right") and (same or not pair.left_text.strip() or not pair.right_text.strip()):
            return Effect("refuse", note="the answers are the same, or one is empty: no preference to learn; "
                                         "t (tie) or s (skip)")
        rec = record(pair, verdict, when)
        self.history.append(rec)
        self.undone.pop(pair.index, None)
        return Effect("write", rec)


class Store:
    """OUT (pairs) and OUT.skipped.jsonl (ties, skips): a line appended and fsynced per verdict."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.suffix != ".jsonl":
            raise ValueError(f"{self.out}: the labels file must end in .jsonl (one verdict a line, appended)")
        self.skipped = self.out.with_suffix(SKIPPED)

    def path(self, rec: dict) -> Path:
        return self.skipped if "label" in rec else self.out

    def load(self, prompts: list[Prompt]) -> list[dict]:
        """The verdicts already written, checked against PROMPTS."""
        records, where = [], {}
        for path in (self.out, self.skipped):
            if not path.exists():
                continue
            text = path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # only a crash inside the write itself (power loss) leaves this
                text = text[: text.rfind("\n") + 1]
                atomic.write_text(path, text)
                print(f"{path}: dropped a torn last line (a crash while writing it)", file=sys.stderr)
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    rec = json.loads(line)
                    i = rec["index"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{n}: not a line `unitune label` wrote; remove it, or label into "
                                    "another -o file") from None
                if not isinstance(i, int) or not 0 <= i < len(prompts) or rec["prompt"] != prompts[i]:
                    raise DataError(f"{path}:{n}: judged prompt row {i} is not row {i} of PROMPTS: this file was "
                                    "labelled from other prompts; give those, or label into another -o file")
                if i in where:
                    raise DataError(f"{path}:{n}: prompt row {i} judged a second time (first at {where[i]}); "
                                    "remove one of the two lines")
                where[i] = f"{path}:{n}"
                records.append(rec)
        return records

    def append(self, rec: dict) -> None:
        path, line = self.path(rec), (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write of the whole line: a kill lands before it or after it, never inside.
            if os.write(fd, line) != len(line):
                raise OSError(f"{path}: a verdict was written only in part (disk full?); free space and restart")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            atomic.fsync_path(path.parent)

    def remove(self, rec: dict) -> None:
        path = self.path(rec)
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines or json.loads(lines[-1]) != rec:
            raise DataError(f"{path}: its last line is not the verdict being undone (was the file edited meanwhile?); "
                            "restart `unitune label` to read it again")
        atomic.write_text(path, "".join(lines[:-1]))


def conversation(prompt: Prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


class Ahead:
    """Answers generated in a background thread, a batch of prompts at a time, ahead of the person."""

    def __init__(self, models: dict[str, LoadedModel], prompts: list[Prompt], indexes: list[int], max_new_tokens: int,
                 temperature: float, top_p: float, batch_size: int, seed: int):
        self.models, self.prompts, self.indexes, self.seed = models, prompts, indexes, seed
        self.settings = (max_new_tokens, temperature, top_p)
        self.batch_size = batch_size
        self.ready: dict[int, Pair] = {}
        self.failed: BaseException | None = None
        self.changed = threading.Condition()
        # A daemon: Ctrl-C or q must not wait for the batch being generated.
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        # One model answers each prompt twice: both samples in one batch (different rows draw different tokens).
        copies = 2 // len(self.models)
        names = [f"{m}#{c + 1}" if copies == 2 else m for m in self.models for c in range(copies)]
        try:
            for start in range(0, len(self.indexes), self.batch_size):
                batch = self.indexes[start : start + self.batch_size]
                convs = [conversation(self.prompts[i]) for i in batch]
                texts: list[str] = []
                for loaded in self.models.values():
                    torch.manual_seed(self.seed * 1_000_003 + start)  # a session can be repeated
                    texts += generate(loaded.model, loaded.tokenizer, convs * copies, *self.settings,
                                      batch_size=len(convs) * copies)
                with self.changed:
                    for j, i in enumerate(batch):
                        answers = {names[0]: texts[j], names[1]: texts[len(batch) + j]}
                        self.ready[i] = arrange(i, self.prompts[i], answers, self.seed)
                    self.changed.notify_all()
        except BaseException as err:  # re-raised in the labelling thread by `get`
            with self.changed:
                self.failed = err
                self.changed.notify_all()

    def get(self, index: int) -> Pair:
        with self.changed:
            self.changed.wait_for(lambda: index in self.ready or self.failed is not None)
            if index not in self.ready:
                raise self.failed
            return self.ready[index]


@contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """Keys one at a time, not echoed; Ctrl-C still interrupts. The terminal is restored however it ends."""
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSAFLUSH, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _read_key(fd: int) -> str:
    chunk = os.read(fd, 32).decode("utf-8", "replace")
    if not chunk:  # the terminal closed
        return "q"
    return chunk[:3] if chunk.startswith("\x1b[") else chunk[:1]


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _show(console: Console, session: Session, pair: Pair | None, note: str, store: Store) -> None:
    console.clear()
    console.print(f"labelled {len(session.history)} / {session.total}", style="bold")
    if pair is None:
        console.print(f"every prompt is judged: pairs in {store.out}, ties and skips in {store.skipped}")
        console.print("u undo the last verdict   q quit")
    else:
        console.print(Panel(_prompt_text(pair.prompt), title=f"prompt {pair.index + 1}"))
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(Panel(pair.left_text, title="1  left"), Panel(pair.right_text, title="2  right"))
        console.print(grid)
        console.print(HELP, style="dim")
    if note:
        console.print(note, style="yellow")


def run(prompts: list[Prompt], models: list[str], out: str | Path, *, max_new_tokens: int, temperature: float,
        top_p: float, batch_size: int, seed: int, device: str) -> None:
    """Label PROMPTS until every one is judged or the person quits; see the module docstring."""
    if len(models) > 2 or len(set(models)) < len(models):
        raise ValueError(f"--model given as {models}: give two different models, or one to compare two samples of it")
    if len(models) == 1 and temperature <= 0:
        raise ValueError("one --model with --temperature 0 answers the same twice; give --temperature > 0 "
                         "(two samples) or a second --model")
    if not sys.stdin.isatty():
        raise OSError("unitune label reads single keys from a terminal, and stdin is not one; run it in a terminal")
    store = Store(out)
    session = Session(len(prompts), store.load(prompts))
    console = Console(highlight=False, markup=False)  # prompts, answers and paths may hold [brackets]
    pending = session.pending()
    ahead = None
    if pending:  # nothing left to generate for, only an undo to offer: no model needed
        console.print(f"loading {', '.join(models)} ...")
        loaded = {m: api.load_run_or_model(m, pick_device(device)) for m in models}
        ahead = Ahead(loaded, prompts, pending, max_new_tokens, temperature, top_p, batch_size, seed)
    fd, note = sys.stdin.fileno(), ""
    with _cbreak(fd):
        while True:
            index = session.current()
            pair = None if index is None else session.replay(index)
            if index is not None and pair is None:
                if index not in ahead.ready:
                    console.clear()
                    console.print(f"generating answers for prompt {index + 1} ...")
                pair = ahead.get(index)
            # Keys pressed before this pair was on screen were not meant for it.
            termios.tcflush(fd, termios.TCIFLUSH)
            _show(console, session, pair, note, store)
            effect = session.press(_read_key(fd), pair, datetime.now(timezone.utc).isoformat(timespec="microseconds"))
            if effect.kind == "quit":
                break
            if effect.kind == "write":
                store.append(effect.record)
            elif effect.kind == "unwrite":
                store.remove(effect.record)
            note = effect.note
    console.print(f"{len(session.history)} of {len(prompts)} prompts judged; pairs in {store.out}, "
                  f"ties and skips in {store.skipped}")
