"""Validation metrics: token loss and perplexity, and exact / contains match of generated answers."""
from __future__ import annotations

import re
import unicodedata

import torch

from unitune.data import Batches
from unitune.data.tokenize import Example, prompt_and_reference
from unitune.engine import distributed
from unitune.engine.precision import autocast
from unitune.generation import generate


@torch.no_grad()
def loss_metrics(model, batches: Batches, objective, cfg, ref, device, amp) -> dict[str, float]:
    """The objective's loss and metrics over the validation set, as means over what it counts."""
    was_training = model.training
    model.eval()
    sums, n = {"loss": 0.0}, 0
    if distributed.active():  # each process scores its share of the batches; the sums are exchanged below
        batches.shard = (distributed.rank(), distributed.processes())
    for batch in batches.all():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(device, amp):
            total, info = objective.loss(model, batch, cfg, ref)
        info = {k: v for k, v in info.items() if not k.startswith("seen_")}
        for k, v in {"loss": total, **info}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += objective.count(batch)
    model.train(was_training)
    if distributed.active():
        sums = distributed.sum_dict({**sums, "": n})
        n = sums.pop("")
    means = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    summarize = getattr(objective, "summarize", None)
    return {**means, **(summarize(means) if summarize else {})}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?\"'")


def match_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match after normalisation, and whether the reference appears inside the prediction."""
    pairs = [(normalize(p), normalize(r)) for p, r in zip(predictions, references)]
    n = max(len(pairs), 1)
    return {"exact_match": sum(p == r for p, r in pairs) / n, "contains_match": sum(r in p for p, r in pairs) / n}


def generation_metrics(model, tok, examples: list[Example], limit: int, max_new_tokens: int, batch_size: int,
                       temperature: float = 0.0, scorers: list[str] = ()) -> tuple[dict[str, float], list[dict]]:
    chats = [e for e in examples if getattr(e, "messages", None)][:limit]
    if not chats:
        return {}, []
    prompts, refs = zip(*(prompt_and_reference(e.messages) for e in chats))
    if distributed.active():  # each process answers its share; every process gets all the answers, in order
        rank, processes = distributed.rank(), distributed.processes()
        mine = generate(model, tok, list(prompts[rank::processes]), max_new_tokens, temperature, batch_size=batch_size)
        shares = distributed.gather(mine)
        preds = [shares[i % processes][i // processes] for i in range(len(prompts))]
    else:
        preds = generate(model, tok, list(prompts), max_new_tokens, temperature, batch_size=batch_size)
    samples = [{"prompt": p[-1]["content"], "reference": r, "prediction": g} for p, r, g in zip(prompts, refs, preds)]
    scores = match_scores(preds, list(refs))
    for spec in scorers:
        scores |= score(spec, list(prompts), preds, list(refs), [e.where for e in chats])
    return scores, samples


def score(spec: str, prompts: list, answers: list[str], references: list[str], where: list[str]) -> dict[str, float]:
    """A scoring function's mean over the answers it scores (None: not scored), as `score_<function>`."""
    from unitune.rl.rewards import RewardSource, call, load_function

    source = RewardSource(function=spec)
    values = call(source, load_function(spec, "eval.scorers function"), prompts, answers,
                  [{"references": r} for r in references], where, kind="scorer")
    scored = values[~values.isnan()]
    return {f"score_{source.label}": float(scored.mean()) if len(scored) else float("nan")}
