"""`unitune judge`: an AI judge picks the better of two answers per prompt; the verdicts become preference pairs
(RLAIF), and the judge's biases are measured rather than assumed away.

Judges (`load_judge`), each a function from the pairs as shown to one `Verdict` each:
- an LLM with a rubric (any model `api.load_run_or_model` loads): shown the question, "Answer A", "Answer B" and
  the rubric in one user turn, its verdict is read from ONE forward pass: the next-token log-probabilities of
  "A" and "B" (each summed over its spellings that are one token, "A" and " A": SentencePiece vocabularies
  start a word with a space). No sampling, so a rerun gives the same file; the confidence is
  |P(A) - P(B)| with the two renormalised to sum to one;
- `reward:PATH`, a reward model (`api.RewardModel`): the higher score wins, equal scores tie; confidence is
  the score gap. Its scores do not depend on the order shown, so it is consistent by construction;
- `module:function`, called as `function(prompt, first, second)` and returning "first", "second" or "tie".

Both orders. Every pair is judged with `a` shown first and with `b` shown first. The same answer winning both
times (or a tie both times) is a verdict; anything else is inconsistent: the same SLOT winning both times is
position bias (LLM judges favour one slot, Zheng et al. 2023, "Judging LLM-as-a-judge"), a tie in one
order only is mere indecision. Inconsistent pairs are dropped, or written to OUT.inconsistent.jsonl
(`--inconsistent mark`).

Files, as `unitune label` writes them (feedback/label.py): OUT holds preference pairs only, TRL's standard
layout or, for a prompt given as messages, the conversational one, with fields the preference reader ignores:
`winner` ("a" or "b": which of INPUT's answers won), `index` (the row in INPUT), `judge`, `orders` (per order:
the answer shown `first`, the `verdict` slot, and its `confidence` where the judge has one) and `time`. Ties
go to OUT.skipped.jsonl (`label` "tie"), as do pairs whose two answers are the same (`label` "skip"; not
judged). Those side files keep the
pair as `prompt`, `a`, `b`, so they are INPUT files again (e.g. for a second judge). Judging is deterministic,
so the files are written once, at the end, each atomically: a crash leaves the previous files whole, and a
rerun gives the same.

The report (`report`, OUT.report.json), over the pairs judged:
- agreement: the share of pairs whose two orders agree (a consistent verdict, ties included);
- position bias: the share where the same slot won in both orders, and which slot (`first`, `second`);
- length: over consistent decided pairs, `longer_wins` is the share won by the longer answer (characters;
  pairs of equal length left out) and `correlation` Pearson's r between sign(len(a) - len(b)) and the verdict
  (1: a won, 0: b won), a point-biserial correlation: 1 when the longer answer always wins, -1 the shorter,
  about 0 when length does not decide;
- human (with --human): pairs matched by prompt and the unordered pair of answers; `agreement` and Cohen's
  kappa over matched pairs the judge decided (`matched`, `decided` say how many): kappa discounts the
  agreement two raters would reach by chance, given how often each picks "a" and "b".
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from unitune import api, atomic
from unitune.data import preference
from unitune.data.files import DataError, Row, read_rows
from unitune.data.templates import render
from unitune.engine.precision import pick_device
from unitune.feedback.label import SKIPPED, Prompt, _answer, _prompt_text, _text
from unitune.methods import io
from unitune.models.loader import LoadedModel
from unitune.rl.rewards import load_function

RUBRIC = ("Which answer responds better to the question: more helpful, more correct, more honest? Judge what the "
          "answers say, not their length or their order.")
SLOTS = ("first", "second", "tie")
INCONSISTENT = ".inconsistent.jsonl"
REPORT = ".report.json"


@dataclass(frozen=True)
class Item:
    """One pair to judge: row `index` of INPUT."""
    index: int
    prompt: Prompt  # as INPUT gives it, written back to OUT as it was
    a: str
    b: str
    where: str
    conversation: list[dict]  # the prompt as the preference reader normalises it: what --human pairs match on


class Shown(NamedTuple):
    """One order of one pair, as the judge sees it."""
    prompt: Prompt
    first: str
    second: str
    where: str


@dataclass(frozen=True)
class Verdict:
    winner: str  # a slot: "first", "second" or "tie"
    confidence: float | None = None


Judge = Callable[[list[Shown]], list[Verdict]]


@dataclass(frozen=True)
class Judged:
    item: Item
    a_first: Verdict  # a shown first
    b_first: Verdict  # b shown first

    def picks(self) -> tuple[str, str]:
        """The answer ("a", "b" or "tie") each order picked."""
        return ({"first": "a", "second": "b", "tie": "tie"}[self.a_first.winner],
                {"first": "b", "second": "a", "tie": "tie"}[self.b_first.winner])

    @property
    def outcome(self) -> str:
        """The answer both orders picked ("a", "b" or "tie"), or "inconsistent" when they differ."""
        one, two = self.picks()
        return one if one == two else "inconsistent"

    @property
    def slot_won(self) -> str | None:
        """The slot that won in both orders, whatever stood in it: position bias. None otherwise."""
        w = self.a_first.winner
        return w if w != "tie" and w == self.b_first.winner else None


# --- reading -------------------------------------------------------------------------------------------------

def _answer_text(row: Row, key: str) -> str:
    value = row.data[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return _text(value)  # the conversational pair layout
    if not isinstance(value, str):
        raise DataError(f"{row.where}: '{key}' is a {type(value).__name__}; write the answer as a string (or, in the "
                        "conversational layout, a list of one assistant message)")
    return value


def read_pairs(path: str | Path) -> list[Item]:
    """Rows with `prompt` and answers `a`, `b`; or `prompt`, `chosen`, `rejected`, judged afresh as two answers."""
    items = []
    for index, row in enumerate(read_rows(path)):
        keys = ("a", "b") if "a" in row.data or "b" in row.data else ("chosen", "rejected")
        for key in ("prompt", *keys):
            if key not in row.data:
                raise DataError(f"{row.where}: missing '{key}'; a pair to judge has 'prompt' and two answers, 'a' "
                                "and 'b' (or 'chosen' and 'rejected')")
        conversation = preference.to_prompt(row)  # refuses an empty prompt, or messages not ending with a user turn
        items.append(Item(index, row.data["prompt"], _answer_text(row, keys[0]), _answer_text(row, keys[1]),
                          row.where, conversation))
    return items


def _match_key(conversation: list[dict], x: str, y: str) -> tuple[str, frozenset[str]]:
    return json.dumps(conversation, ensure_ascii=False), frozenset((x.strip(), y.strip()))


def read_human(path: str | Path) -> dict[tuple, tuple[str, str]]:
    """A human preference file (any layout `to_pair` reads): {match key: (the chosen answer, file:line)}."""
    labels: dict[tuple, tuple[str, str]] = {}
    for row in read_rows(path):
        pair = preference.to_pair(row)
        prompt = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
        chosen, rejected = _text(pair.chosen), _text(pair.rejected)
        key = _match_key(prompt, chosen, rejected)
        if key in labels and labels[key][0].strip() != chosen.strip():
            raise DataError(f"{row.where}: the same pair as {labels[key][1]} with the other answer chosen; keep one")
        labels[key] = (chosen, row.where)
    return labels


# --- judges ---------------------------------------------------------------------------------------------------

def question(prompt: Prompt, first: str, second: str, rubric: str) -> list[dict]:
    """What the LLM judge is asked: one user turn (every chat template has one; not all take a system turn)."""
    text = (f"{rubric}\n\n[Question]\n{_prompt_text(prompt)}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
            "Which answer is better? Reply with one letter: A or B.")
    return [{"role": "user", "content": text}]


def letter_ids(tok, letter: str) -> list[int]:
    """The tokens that spell `letter` alone, with or without a leading space."""
    spellings = [tok(text, add_special_tokens=False)["input_ids"] for text in (letter, " " + letter)]
    ids = {enc[0] for enc in spellings if len(enc) == 1}
    if not ids:
        raise ValueError(f"the judge's tokenizer has no single token for {letter!r}, so its verdict cannot be read "
                         "from one next-token distribution; use another judge model")
    return sorted(ids)


class LLMJudge:
    def __init__(self, loaded: LoadedModel, rubric: str):
        if io.task_type(loaded.model) != "CAUSAL_LM":
            raise ValueError(f"{loaded.source} is not a language model (a {type(loaded.model).__name__}); a reward "
                             "model judges as --judge reward:PATH")
        self.model, self.tok, self.rubric = loaded.model.eval(), loaded.tokenizer, rubric
        self.letters = (letter_ids(self.tok, "A"), letter_ids(self.tok, "B"))

    @torch.no_grad()
    def __call__(self, shown: list[Shown]) -> list[Verdict]:
        rows = [torch.tensor(self.tok(render(self.tok, question(s.prompt, s.first, s.second, self.rubric), True),
                                      add_special_tokens=False)["input_ids"]) for s in shown]  # the template adds BOS
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        # Left padding puts every row's last token in the last column, so only those logits are computed
        # (logits_to_keep=1: a [rows, length, vocab] tensor would not fit); positions count real tokens only, as
        # in generation, so absolute position embeddings (GPT-2) see what an unpadded row sees.
        ids = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=pad).flip(1)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).flip(1)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device), logits_to_keep=1).logits
        logps = logits[:, -1].float().log_softmax(-1)
        verdicts = []
        for row in logps:
            a, b = (row[list(ids_)].logsumexp(0) for ids_ in self.letters)
            winner = "first" if a > b else "second" if b > a else "tie"
            verdicts.append(Verdict(winner, abs(2 * torch.sigmoid(a - b).item() - 1)))  # |P(A) - P(B)|, renormalised
        return verdicts


def reward_judge(path: str, device: torch.device) -> Judge:
    model = api.RewardModel(path, device)

    def judge(shown: list[Shown]) -> list[Verdict]:
        # Each answer scored once: a pair's two orders come in one call and hold the same two answers.
        answers = {(json.dumps(s.prompt), t): (s.prompt, t) for s in shown for t in (s.first, s.second)}
        scores = dict(zip(answers, model([p for p, _ in answers.values()],
                                         [_answer(p, t) for p, t in answers.values()])))
        verdicts = []
        for s in shown:
            one, two = scores[json.dumps(s.prompt), s.first], scores[json.dumps(s.prompt), s.second]
            verdicts.append(Verdict("first" if one > two else "second" if two > one else "tie", abs(one - two)))
        return verdicts

    return judge


def function_judge(spec: str) -> Judge:
    fn = load_function(spec, "judge function")

    def judge(shown: list[Shown]) -> list[Verdict]:
        verdicts = []
        for s in shown:
            said = fn(s.prompt, s.first, s.second)
            if said not in SLOTS:
                raise ValueError(f"{s.where}: --judge {spec} returned {said!r}; a judge function returns 'first', "
                                 "'second' or 'tie'")
            verdicts.append(Verdict(said))
        return verdicts

    return judge


def load_judge(spec: str, rubric: str | None = None, device: str = "auto") -> Judge:
    """`reward:PATH`, `module:function`, or an LLM (a run, model directory or built-in name)."""
    llm = not spec.startswith("reward:") and not (re.fullmatch(r"[\w.]+:\w+", spec) and not Path(spec).exists())
    if rubric is not None and not llm:
        raise ValueError(f"--rubric is what an LLM judge is asked; --judge {spec} takes none")
    if spec.startswith("reward:"):
        return reward_judge(spec.removeprefix("reward:"), pick_device(device))
    if not llm:
        return function_judge(spec)
    if rubric is not None and Path(rubric).is_file():
        rubric = Path(rubric).read_text(encoding="utf-8").strip()
    return LLMJudge(api.load_run_or_model(spec, pick_device(device)), rubric or RUBRIC)


def judge_pairs(judge: Judge, items: list[Item], batch_size: int = 8, progress: bool = False) -> list[Judged]:
    """Every pair in both orders, `batch_size` pairs (2 x batch_size orders) per call of the judge."""
    from tqdm.auto import tqdm

    judged = []
    with tqdm(total=len(items), desc="judge", unit="pair", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            shown = [Shown(i.prompt, i.a, i.b, f"{i.where} (a first)") for i in batch] + \
                    [Shown(i.prompt, i.b, i.a, f"{i.where} (b first)") for i in batch]
            verdicts = judge(shown)
            judged += [Judged(i, one, two) for i, one, two in zip(batch, verdicts, verdicts[len(batch):])]
            bar.update(len(batch))
    return judged


# --- records and report ---------------------------------------------------------------------------------------

def record(j: Judged, judge: str, when: str) -> dict:
    """A pair for OUT, or (a tie, an inconsistent verdict) a labelled row keeping both answers as `a`, `b`."""
    orders = [{"first": first, "verdict": v.winner, **({} if v.confidence is None else {"confidence": v.confidence})}
              for first, v in (("a", j.a_first), ("b", j.b_first))]
    about = {"index": j.item.index, "judge": judge, "orders": orders, "time": when}
    p, outcome = j.item.prompt, j.outcome
    if outcome in ("a", "b"):
        won, lost = (j.item.a, j.item.b) if outcome == "a" else (j.item.b, j.item.a)
        return {"prompt": p, "chosen": _answer(p, won), "rejected": _answer(p, lost), "winner": outcome, **about}
    return {"prompt": p, "a": j.item.a, "b": j.item.b, "label": outcome, **about}


def cohen_kappa(x: list[str], y: list[str]) -> float | None:
    """(p_o - p_e) / (1 - p_e): observed agreement beyond the chance agreement p_e of two raters labelling
    independently at their own rates. None without labels, or when p_e = 1 (both always give one same label)."""
    n = len(x)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in cx) / n**2
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def pearson(x: list[float], y: list[float]) -> float | None:
    """None when either side does not vary (r is undefined)."""
    n = len(x)
    if n == 0:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _share(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _longer(j: Judged) -> int:
    """1 when `a` is the longer answer (in characters: no tokenizer needed), -1 when `b` is, 0 for equal lengths."""
    return (len(j.item.a) > len(j.item.b)) - (len(j.item.a) < len(j.item.b))


def report(judged: list[Judged], human: dict[tuple, tuple[str, str]] | None = None) -> dict:
    """Position bias, agreement across orders, length bias and (given human labels) agreement with people;
    see the module docstring for what each figure is."""
    n = len(judged)
    slots = Counter(j.slot_won for j in judged)
    decided = [j for j in judged if j.outcome in ("a", "b")]
    unequal = [j for j in decided if _longer(j)]
    out = {
        "pairs": n,
        "outcomes": {k: sum(j.outcome == k for j in judged) for k in ("a", "b", "tie", "inconsistent")},
        "agreement": _share(sum(j.outcome != "inconsistent" for j in judged), n),
        "position_bias": {
            "rate": _share(slots["first"] + slots["second"], n),
            "first": _share(slots["first"], n), "second": _share(slots["second"], n),
            "direction": "none" if slots["first"] == slots["second"] else
                         "first" if slots["first"] > slots["second"] else "second"},
        "length": {
            "longer_wins": _share(sum((_longer(j) > 0) == (j.outcome == "a") for j in unequal), len(unequal)),
            "correlation": pearson([float(_longer(j)) for j in decided], [float(j.outcome == "a") for j in decided])},
    }
    if human is not None:
        matched = [(j, human[k][0]) for j in judged
                   if (k := _match_key(j.item.conversation, j.item.a, j.item.b)) in human]
        people = [("a" if chosen.strip() == j.item.a.strip() else "b", j.outcome) for j, chosen in matched
                  if j.outcome in ("a", "b")]
        out["human"] = {"matched": len(matched), "decided": len(people),
                        "agreement": _share(sum(h == m for h, m in people), len(people)),
                        "kappa": cohen_kappa([h for h, _ in people], [m for _, m in people])}
    return out


def table(rep: dict) -> str:
    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    bias, length = rep["position_bias"], rep["length"]
    lines = [("pairs judged (both orders)", str(rep["pairs"])),
             ("agreement across orders", f(rep["agreement"])),
             ("position bias", f"{f(bias['rate'])} ({bias['direction']})"),
             ("longer answer wins", f(length["longer_wins"])),
             ("length correlation", f(length["correlation"]))]
    if "human" in rep:
        h = rep["human"]
        lines += [("human pairs matched / decided", f"{h['matched']} / {h['decided']}"),
                  ("human agreement", f(h["agreement"])), ("Cohen's kappa", f(h["kappa"]))]
    return "\n".join(f"{name:32s} {value}" for name, value in lines)


# --- the command ------------------------------------------------------------------------------------------------

def run(path: str | Path, judge: str, out: str | Path | None = None, *, rubric: str | None = None,
        human: str | Path | None = None, inconsistent: str = "drop", with_report: bool = False, batch_size: int = 8,
        device: str = "auto", progress: bool = True) -> dict:
    """Judge INPUT's pairs and write OUT and its side files (module docstring); returns the report."""
    out = Path(out) if out else Path(path).with_suffix(".judged.jsonl")
    if out.suffix != ".jsonl":
        raise ValueError(f"{out}: the pairs file must end in .jsonl")
    if inconsistent not in ("drop", "mark"):
        raise ValueError(f"--inconsistent {inconsistent}: write drop or mark")
    items = read_pairs(path)
    labels = read_human(human) if human else None  # before the judge runs: a bad file fails in a second
    same = [i for i in items if i.a.strip() == i.b.strip()]  # no preference to learn: not judged
    todo = [i for i in items if i.a.strip() != i.b.strip()]
    judged = judge_pairs(load_judge(judge, rubric, device), todo, batch_size, progress)

    when = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    files: dict[str, list[dict]] = {"pairs": [], "tie": [], "inconsistent": []}
    for j in judged:
        files["pairs" if j.outcome in ("a", "b") else j.outcome].append(record(j, judge, when))
    skipped = sorted(files["tie"] + [{"prompt": i.prompt, "a": i.a, "b": i.b, "label": "skip", "index": i.index,
                                      "time": when} for i in same], key=lambda r: r["index"])
    paths = {"skipped": out.with_suffix(SKIPPED), "inconsistent": out.with_suffix(INCONSISTENT),
             "report": out.with_suffix(REPORT)}

    def write(path: Path, recs: list[dict]) -> None:
        atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))

    write(paths["skipped"], skipped)
    if inconsistent == "mark":
        write(paths["inconsistent"], files["inconsistent"])
    write(out, files["pairs"])  # last: OUT is whole and its side files are of the same run
    rep = report(judged, labels)
    where = f"in {paths['inconsistent']}" if inconsistent == "mark" else "dropped"
    print(f"{len(judged)} pairs judged in both orders: {len(files['pairs'])} preference pairs in {out}, "
          f"{len(files['tie'])} ties and {len(same)} identical pairs in {paths['skipped']}, "
          f"{len(files['inconsistent'])} inconsistent ({where})", file=sys.stderr)
    if with_report or labels is not None:
        atomic.write_text(paths["report"], json.dumps(rep, indent=2) + "\n")
        print(table(rep))
        print(f"report written to {paths['report']}", file=sys.stderr)
    return rep
