"""`chat`: general prompts without answers, for replay (data.replay): the base model answers them before
training, and those answers are mixed into the training data, so the model keeps rehearsing what it did.

Disjoint from the `general` retention set (unitune/tasks/retention.py): replaying the questions that measure
forgetting would measure memory instead. Same kinds of knowledge (capitals, everyday facts, words) plus short
instructions, so the replayed behaviour is the base model's general chat, not one narrow skill.
"""
from __future__ import annotations

import json
from pathlib import Path

from unitune import atomic
from unitune.tasks.retention import CAPITALS, FACTS

OTHER_CAPITALS = ["Canada", "Mexico", "Brazil", "India", "Australia", "Turkey", "the Netherlands", "Belgium",
                  "Switzerland", "Denmark", "Finland", "Hungary", "Czechia", "Peru", "Chile", "Colombia",
                  "Vietnam", "Indonesia", "Morocco", "Nigeria", "Cuba", "Iceland", "New Zealand", "Pakistan"]
QUESTIONS = [
    "What colour is a ripe banana?", "What colour is a ripe tomato?", "What is the opposite of fast?",
    "What is the opposite of empty?", "What is the opposite of young?", "Which animal is known for its long neck?",
    "Which animal says meow?", "How many legs does a spider have?", "How many days are there in a week?",
    "How many minutes are in an hour?", "What is the boiling point of water in Celsius?",
    "Which planet is known as the Red Planet?", "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?", "What is the chemical symbol for gold?", "What is the tallest mountain on Earth?",
    "Which continent is Egypt in?", "What do caterpillars turn into?", "What is the main ingredient of bread?",
    "Which month has the fewest days?", "What instrument has black and white keys?",
    "What do you call a baby dog?", "What is the freezing point of water in Fahrenheit?",
    "Which gas do humans breathe out?",
]
INSTRUCTIONS = [
    "Write one sentence about the sea.", "Give me a synonym for happy.", "Name three fruits.",
    "Explain in one sentence what a noun is.", "Translate 'thank you' into Spanish.",
    "Suggest a name for a pet goldfish.", "What is 7 plus 5?", "What is 9 times 3?",
    "Write a short greeting for a birthday card.", "List the primary colours.",
    "Describe a cat in one sentence.", "Give one tip for sleeping well.", "Spell the word 'necessary' backwards.",
    "Name a vegetable that is orange.", "What is the plural of mouse?", "Write a haiku about autumn.",
]


def prompts() -> list[str]:
    asked = [f"What is the capital of {c}?" for c in OTHER_CAPITALS] + QUESTIONS + INSTRUCTIONS
    measured = {f"What is the capital of {c}?" for c in CAPITALS} | set(FACTS)
    assert not measured & set(asked), "replay prompts must not repeat the retention set's questions"
    return asked


def write(out_dir: str | Path) -> Path:
    out = Path(out_dir) / "chat.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, "".join(json.dumps({"instruction": p}) + "\n" for p in prompts()))
    return out
