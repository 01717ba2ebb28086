"""`general`: a retention set of what a chat model can do before it is tuned: one-word general-knowledge
answers (capitals, colours, opposites, animals), so forgetting shows as answers it no longer gives.

    {"instruction": "What is the capital of Italy? Answer in one word.", "output": "Rome"}

Measured with contains match (the answer word anywhere in the reply) and the loss of the answer, before and
after training (eval.retention).
"""
from __future__ import annotations

import json
from pathlib import Path

from unitune import atomic

CAPITALS = {"Italy": "Rome", "France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid",
            "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo",
            "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo",
            "Sweden": "Stockholm", "Poland": "Warsaw", "Thailand": "Bangkok", "South Korea": "Seoul",
            "Argentina": "Buenos Aires", "Kenya": "Nairobi"}
FACTS = {
    "What colour is the sky on a clear day?": "blue",
    "What colour is grass?": "green",
    "What colour is snow?": "white",
    "What colour do you get by mixing red and white?": "pink",
    "What is the opposite of hot?": "cold",
    "What is the opposite of up?": "down",
    "What is the opposite of day?": "night",
    "What is the opposite of big?": "small",
    "Which animal says moo?": "cow",
    "Which animal barks?": "dog",
    "Which planet do we live on?": "Earth",
    "What is frozen water called?": "ice",
    "Which star is at the centre of our solar system?": "Sun",
    "What do bees make?": "honey",
    "Which season comes after winter?": "spring",
    "What is the largest ocean on Earth?": "Pacific",
    "Which language is mainly spoken in Brazil?": "Portuguese",
    "What gas do plants absorb from the air?": "carbon dioxide",
    "Which organ pumps blood through the body?": "heart",
    "What is the first month of the year?": "January",
}


def rows() -> list[dict]:
    questions = {f"What is the capital of {country}?": city for country, city in CAPITALS.items()} | FACTS
    return [{"instruction": f"{q} Answer in one word.", "output": a} for q, a in questions.items()]


def write(out_dir: str | Path) -> Path:
    out = Path(out_dir) / "general.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, "".join(json.dumps(r) + "\n" for r in rows()))
    return out
