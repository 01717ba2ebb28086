"""The quickstart task: turn a free-text order message into one line of JSON.

    "Three lamps for Alice Brown in Lyon, ordered on Tuesday."
    -> {"name": "Alice Brown", "city": "Lyon", "item": "lamp", "qty": 3}

The base model answers in prose or with its own keys and spacing, so it scores near zero on
exact match; the skill (copying spans, singular item names, number words to digits, one fixed
format) is learnable from a few hundred examples and generalises to unseen names and cities.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from unitune import atomic

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Giulia", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Victor", "Wen", "Yara", "Zoe"]
LAST = ["Brown", "Okafor", "Rossi", "Tanaka", "Silva", "Novak", "Haddad", "Larsen", "Moreau", "Kaur", "Weber",
        "Costa", "Ivanova", "Nguyen", "Park", "Mensah", "Fischer", "Lopez", "Berg", "Khan"]
CITIES = ["Lyon", "Porto", "Osaka", "Nairobi", "Denver", "Krakow", "Bergen", "Quito", "Hanoi", "Leeds", "Turin",
          "Accra", "Tampere", "Austin", "Seville", "Perth", "Graz", "Dakar", "Busan", "Halifax"]
ITEMS = ["lamp", "chair", "kettle", "notebook", "backpack", "mug", "blanket", "candle", "umbrella", "scarf",
         "helmet", "basket", "pillow", "jacket", "teapot", "shovel", "mirror", "bottle", "wallet", "clock"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

TEMPLATES = [
    "{name} from {city} ordered {q} {items} on {day}.",
    "On {day}, {name} ({city}) asked for {q} {items}.",
    "{Q} {items} for {name} in {city}, ordered on {day}.",
    "Please ship {q} {items} to {name}, {city}. Placed {day}.",
    "New order: {q} x {item}, customer {name}, city {city}, day {day}.",
    "{name} wants {q} {items} delivered to {city} (ordered {day}).",
]
INSTRUCTION = "Extract the order as JSON with keys name, city, item, qty."


def plural(item: str, n: int) -> str:
    return item if n == 1 else item + ("es" if item.endswith(("sh", "ch", "s", "x")) else "s")


SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "ni", "bra", "zu", "hal", "ek", "ri", "mon", "tas"]


def invented(rng: random.Random) -> str:
    """A made-up proper noun ("Velrito"): training on these teaches copying, not memorising."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_row(rng: random.Random, held_out: bool) -> dict:
    # Validation uses names and cities never seen in training, so the score measures the skill.
    half = lambda xs: xs[len(xs) // 2:] if held_out else xs[: len(xs) // 2]  # noqa: E731
    made_up = not held_out and rng.random() < 0.5
    name = f"{rng.choice(FIRST)} {invented(rng) if made_up else rng.choice(half(LAST))}"
    city = invented(rng) if made_up else rng.choice(half(CITIES))
    item, day = rng.choice(ITEMS), rng.choice(DAYS)
    qty = rng.randint(1, 12)
    q = WORDS[qty] if rng.random() < 0.5 else str(qty)
    text = rng.choice(TEMPLATES).format(name=name, city=city, q=q, Q=q.capitalize(), item=item,
                                        items=plural(item, qty), day=day)
    answer = json.dumps({"name": name, "city": city, "item": item, "qty": qty})
    return {"instruction": INSTRUCTION, "input": text, "output": answer}


def _write_splits(out_dir: str | Path, n_train: int, n_val: int, seed: int,
                  make: Callable[[random.Random, bool], dict]) -> Path:
    """train.jsonl and val.jsonl of `make(rng, held_out)` rows, from one seeded stream."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = [make(rng, split == "val") for _ in range(n)]
        atomic.write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out


def write(out_dir: str | Path, n_train: int = 800, n_val: int = 64, seed: int = 1234) -> Path:
    return _write_splits(out_dir, n_train, n_val, seed, make_row)


def write_with_canaries(out_dir: str | Path, n_train: int = 400, n_val: int = 200, seed: int = 1234) -> Path:
    """The task with canaries planted (privacy/canary.py): 2 secrets each repeated 1, 4 and 16 times among
    `n_train` orders (train.jsonl, described in train.jsonl.canaries.json); `n_val` held-out orders are the
    membership audit's non-members."""
    from unitune.privacy import canary

    out = _write_splits(out_dir, n_train, n_val, seed, make_row)
    (out / "train.jsonl").replace(out / "orders.jsonl")
    canary.insert(out / "orders.jsonl", out / "train.jsonl", repeats=[1, 4, 16], per_repeat=2, seed=seed)
    return out


def corrupt(rng: random.Random, answer: str) -> str:
    """A wrong answer of the kinds the base model and half-trained models give."""
    order = json.loads(answer)
    mistake = rng.randrange(6)
    if mistake == 0:
        order["qty"] += rng.choice([-1, 1, 2, 3]) if order["qty"] > 1 else rng.choice([1, 2, 3])
    elif mistake == 1:
        order["item"] = plural(order["item"], 2)
    elif mistake == 2:
        order["name"], order["city"] = order["city"], order["name"]
    elif mistake == 3:
        return json.dumps(order, indent=2)
    elif mistake == 4:
        del order[rng.choice(["city", "qty"])]
    else:
        order["name"] = order["name"].split()[0]
    return json.dumps(order)


def _pair_row(rng: random.Random, held_out: bool) -> dict:
    row = make_row(rng, held_out)
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"],
            "rejected": corrupt(rng, row["output"])}


def write_preferences(out_dir: str | Path, n_train: int = 400, n_val: int = 64, seed: int = 4321) -> Path:
    """Preference pairs for the same task (TRL's standard layout): the right JSON is chosen, a wrong one
    (a miscount, a plural, swapped fields, another format, a missing key, a cut name) rejected."""
    return _write_splits(out_dir, n_train, n_val, seed, _pair_row)


def _feedback_row(rng: random.Random, held_out: bool) -> dict:
    row, good = make_row(rng, held_out), rng.random() < 0.5
    return {"prompt": f"{row['instruction']}\n\n{row['input']}",
            "completion": row["output"] if good else corrupt(rng, row["output"]), "label": good}


def write_feedback(out_dir: str | Path, n_train: int = 400, n_val: int = 64, seed: int = 4321) -> Path:
    """Unpaired feedback for KTO (prompt, completion, label): each order once, answered right or wrong."""
    return _write_splits(out_dir, n_train, n_val, seed, _feedback_row)


def _prompt_row(rng: random.Random, held_out: bool) -> dict:
    row = make_row(rng, held_out)
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "answer": row["output"]}


def write_prompts(out_dir: str | Path, n_train: int = 400, n_val: int = 48, seed: int = 5678) -> Path:
    """Prompts for online RL (GRPO, PPO) with the right answer beside each, for the rewards below."""
    return _write_splits(out_dir, n_train, n_val, seed, _prompt_row)


def _parse(completion: str) -> dict | None:
    """The first JSON object in a completion (a model may wrap it in prose or a code fence)."""
    start = completion.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(completion[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def field_reward(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """Partial credit, checked by code: the share of the four fields given right (0 for no JSON object), minus
    0.25 for text around the JSON, so the whole answer is one line of JSON."""
    out = []
    for completion, truth in zip(completions, answer):
        got, want = _parse(completion), json.loads(truth)
        if got is None:
            out.append(0.0)
            continue
        right = sum(got.get(k) == v for k, v in want.items()) / len(want)
        extra = completion.strip() != json.dumps(got)
        out.append(right - 0.25 * extra)
    return out


def exact_reward(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1 when the answer is exactly the right line of JSON (the quickstart's exact match), else 0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
