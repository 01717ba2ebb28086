"""`unitune audit RUN`: what a tuned model gives away about its training data, measured beside its base model.

**Canary exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019). For each canary inserted
by `unitune canaries`, the model's log-perplexity of the canary row, Px(s) = -log2 Pr(row with secret s),
computed as the training loss is (the same example building and loss mask: the assistant's answer, or the
whole text), for the real secret and for `candidates` secrets drawn uniformly from R. Exposure is
log2|R| - log2 rank(secret), the rank of the secret among all of R (1: the most likely). R is far too large
to enumerate (10^6 secrets of 6 digits), so the rank is estimated, two ways:

- `exposure` (the one reported first): Carlini et al.'s distribution model (section 4.3). A skew-normal is
  fitted to the sampled log-perplexities, and rank/|R| is its CDF at the secret's, so exposure =
  -log2 CDF(Px(secret)). It resolves the tail, where memorisation shows: a secret more likely than every
  one of 1000 sampled candidates may sit at rank 1 (20 bits) or at rank 500 (11 bits), and only the shape of
  the distribution tells which.
- `exposure_sampled`: the rank extrapolated from the sampled fraction, rank = 1 + (|R| - 1) k / n, with k of
  the n candidates more likely than the secret (ties count half). Unbiased where k is not small, model-free,
  but it cannot tell apart secrets more likely than every candidate: k = 0 reads as rank 1, the full
  log2|R|, so above about log2(n) bits (10 for 1000) it says only "at least that much".

Both are capped at log2|R| (the secret's rank is at least 1). A secret the model never saw ranks uniformly
at random: its exposure is -log2 U, U uniform, whose mean is 1/ln 2 = 1.44 bits.

**Membership inference**, loss threshold (Yeom et al., CSF 2018): rows the model trained on (members: the
run's data.train, canary rows left out) against rows it never saw (held out: its validation rows), each
row's mean loss per loss token. AUC: the probability that a member has the lower loss (0.5: no better than
a coin). The reference-calibrated attack scores tuned loss minus base loss, removing how hard a row is
for any model (Watson et al., ICLR 2022; Carlini et al., "Membership inference attacks from first
principles", 2022): it is the stronger test. The base model's own AUC is the reference, near 0.5 when the
two sets come from one distribution.

The tuned model is the run's output, loaded as every verb loads a run (`api.load_run_or_model`); the
base is the same model with its adapters switched off (no second copy), or, after full fine-tuning and
with methods that cannot switch off, the recipe's model loaded on its own.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unitune import atomic
from unitune.api import Run, load_run_or_model, objective_of, precision, seed_everything
from unitune.config import Recipe, RecipeError, load_recipe
from unitune.data import build_data
from unitune.data.files import DataError, Row, read_rows
from unitune.data.formats import template_roles
from unitune.engine.precision import autocast, pick_device
from unitune.methods import METHODS, io, reference
from unitune.models import LoadedModel, load_model
from unitune.objectives.logprobs import sequence_logps
from unitune.privacy import canary

SEED = 0  # the candidate secrets and a --limit sample: the same for every audit, and for base and tuned


def _skewnorm():
    try:
        from scipy.stats import skewnorm
    except ImportError:
        raise ValueError("the canary exposure fit needs SciPy: pip install 'unitune[privacy]'") from None
    return skewnorm


def exposures(secret: float, candidates: np.ndarray, size: int) -> dict[str, float]:
    """Exposure in bits of a secret with log-perplexity `secret` among `candidates` (log-perplexities of secrets
    drawn uniformly from a space of `size`): the skew-normal fit and the sampled rank (module docstring)."""
    skewnorm = _skewnorm()
    candidates = np.asarray(candidates, dtype=np.float64)
    cap = math.log2(size)
    k = float((candidates < secret).sum() + 0.5 * (candidates == secret).sum())
    sampled = cap - math.log2(1 + (size - 1) * k / len(candidates))
    fit = skewnorm.fit(candidates)
    fitted = -float(skewnorm.logcdf(secret, *fit)) / math.log(2)
    return {"exposure": min(max(fitted, 0.0), cap), "exposure_sampled": sampled, "log_perplexity": secret}


def auc(members: np.ndarray, heldout: np.ndarray) -> float:
    """P(a member's score > a held-out row's), ties half: the area under the ROC curve of the attack that calls
    high scores members, exactly (Mann-Whitney U / (n_members * n_heldout), from mid-ranks)."""
    scores = np.concatenate([np.asarray(members, np.float64), np.asarray(heldout, np.float64)])
    _, index, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[index]  # 1-based, ties sharing their mean rank
    m, h = len(members), len(heldout)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * h))


@torch.no_grad()
def log_likelihoods(model: torch.nn.Module, examples: list, recipe: Recipe, pad_id: int, device: torch.device,
                    desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Each example's summed log-probability (nats) of its loss tokens and how many there are, as training's loss
    computes them (the objective's collator, chunked log-probs, the recipe's autocast); one example per row,
    batches of similar lengths."""
    objective, amp = objective_of(recipe), precision(recipe, device)
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    size = recipe.eval.batch_size
    with tqdm(total=len(order), desc=desc, unit="ex", dynamic_ncols=True) as bar:
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            batch = objective.collate(examples, [[i] for i in chunk], pad_id, False, recipe.data.max_length)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast(device, amp):
                logps, n = sequence_logps(model, batch, recipe.objective.loss_chunk)
            sums[chunk], counts[chunk] = logps.float().cpu().numpy(), n.cpu().numpy()
            bar.update(len(chunk))
    return sums, counts


@contextlib.contextmanager
def _base(recipe: Recipe, tuned: LoadedModel, device: torch.device) -> Iterator[torch.nn.Module]:
    """The base model: the tuned one with its adapters off, or the recipe's model loaded alone once the tuned
    one is released (full fine-tuning; a method that cannot switch off), so one copy is ever in memory."""
    if io.is_adapter(recipe.method) and hasattr(METHODS[recipe.method.name], "disabled"):
        with reference(tuned.model, recipe.method)() as base:
            yield base
        return
    tuned.model = None
    seed_everything(recipe.train.seed)  # a random_init base is rebuilt as training built it
    yield load_model(recipe.model, device).model.eval()


def _check(canaries: canary.Canaries, train_rows: list[Row], train: str) -> None:
    """The canaries must be in the run's training file as often as they were inserted."""
    for c in canaries.canaries:
        found = sum(canary.contains(r.data, c.text) for r in train_rows)
        if found != c.repeats:
            raise DataError(f"{canaries.file}: canary '{c.key}' was inserted {c.repeats} times (into {canaries.out}), "
                            f"but {found} rows of {train}, the run's data.train, hold it: these canaries do not "
                            "belong to this run's training data; give the .canaries.json written beside the file "
                            "it trained on")


def _candidate_examples(canaries: canary.Canaries, n: int, tok, recipe: Recipe, roles) -> list:
    """Per canary: its own row, then `n` rows with secrets drawn uniformly from R (never the secret itself), as the
    objective makes training examples of them."""
    rng = random.Random(SEED)
    examples = []
    for c in canaries.canaries:
        secrets = [c.secret]
        while len(secrets) <= n:
            if (s := "".join(rng.choices("0123456789", k=canaries.digits))) != c.secret:
                secrets.append(s)
        for s in secrets:
            ex = objective_of(recipe).example(Row(c.row_with(s), f"{canaries.file}: canary '{c.key}'"), tok,
                                              recipe.data, roles)
            if ex is None:
                raise DataError(f"{canaries.file}: canary '{c.key}' is longer than data.max_length="
                                f"{recipe.data.max_length} of the run's recipe")
            examples.append(ex)
    return examples


def _membership_examples(recipe: Recipe, tok, members: str | None, heldout: str | None, skip: set[str],
                         limit: int | None) -> tuple[list, list, dict]:
    """Member and held-out examples, built as training built them (data.val_ratio splits as it did), canary rows
    left out; at most `limit` of each, a seeded sample."""
    validation = heldout or recipe.data.validation
    if not validation and (members or not recipe.data.val_ratio):
        raise DataError("audit: no held-out rows to test membership against: the run has no data.validation"
                        f"{'' if members else ' nor data.val_ratio'}; give --heldout FILE, rows of the same task "
                        "the run never trained on")
    cfg = recipe.data.model_copy(update={"train": members or recipe.data.train, "validation": validation})
    data = build_data(cfg, tok, recipe.train.seed, objective_of(recipe).example)
    sides = [[e for e in split if e.where not in skip] for split in (data.train, data.val)]
    rng = random.Random(SEED)
    if limit:
        sides = [[s[i] for i in sorted(rng.sample(range(len(s)), min(limit, len(s))))] for s in sides]
    if not all(sides):
        raise DataError(f"audit: no {'member' if not sides[0] else 'held-out'} examples left to score "
                        f"({cfg.train} and {validation or 'its data.val_ratio split'})")
    where = {"members": cfg.train, "heldout": validation or f"{cfg.train} (data.val_ratio={cfg.val_ratio} split)",
             "canary_rows_left_out": len(skip)}
    return sides[0], sides[1], where


def audit(run: str | Path, canaries: str | Path | None = None, members: str | None = None, heldout: str | None = None,
          candidates: int = 1000, limit: int | None = None) -> dict:
    """Canary exposure and membership inference of a run's tuned model and of its base (module docstring);
    written to RUN/audit.json and RUN/audit.md. `canaries` defaults to the run's data.train + .canaries.json
    when that exists; `members` and `heldout` to the run's training and validation rows."""
    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no recipe.yaml): give the directory `unitune train` "
                                "wrote, runs/<name>")
    recipe = load_recipe(run / "recipe.yaml")
    if recipe.objective.name != "sft":
        raise RecipeError(f"{run}: objective.name={recipe.objective.name}; the audit scores the SFT loss of rows of "
                          "text, so it audits runs trained with objective.name=sft")
    if candidates < 2:
        raise ValueError(f"audit: --candidates {candidates}; the rank estimate needs at least 2 (1000 is usual)")
    if canaries is None and Path(f"{recipe.data.train}.canaries.json").is_file():
        canaries = f"{recipe.data.train}.canaries.json"
    found = canary.load(canaries) if canaries else None
    skip: set[str] = set()
    if found:
        _skewnorm()  # missing, said before minutes of scoring
        train_rows = read_rows(recipe.data.train)
        _check(found, train_rows, recipe.data.train)
        member_rows = train_rows if members in (None, recipe.data.train) else read_rows(members)
        skip = {r.where for r in member_rows if any(canary.contains(r.data, c.text) for c in found.canaries)}
        if recipe.data.validation or heldout:  # held-out rows named after the file they come from, like members'
            skip |= {r.where for r in read_rows(heldout or recipe.data.validation)
                     if any(canary.contains(r.data, c.text) for c in found.canaries)}
    device = pick_device(recipe.train.device)
    tuned = load_run_or_model(run, device)
    tuned.model.eval()
    tok = tuned.tokenizer
    canary_examples = _candidate_examples(found, candidates, tok, recipe, template_roles(tok)) if found else []
    member_examples, heldout_examples, where = _membership_examples(recipe, tok, members, heldout, skip, limit)
    examples = canary_examples + member_examples + heldout_examples

    scores = {"tuned": log_likelihoods(tuned.model, examples, recipe, tok.pad_token_id, device, "audit: tuned model")}
    with _base(recipe, tuned, device) as base:
        scores["base"] = log_likelihoods(base, examples, recipe, tok.pad_token_id, device, "audit: base model")

    result: dict = {"run": str(run), "output": str(Run(run, recipe).output), "base": recipe.model.name}
    if found:
        result["canaries"] = _canary_results(found, candidates, {k: v[0][: len(canary_examples)] for k, v in
                                                                  scores.items()})
    m, h = len(canary_examples), len(canary_examples) + len(member_examples)
    loss = {k: -sums / counts for k, (sums, counts) in scores.items()}  # mean loss per loss token, as training's
    result["membership"] = {
        **where, "n_members": len(member_examples), "n_heldout": len(heldout_examples),
        "auc": {"base": auc(-loss["base"][m:h], -loss["base"][h:]), "tuned": auc(-loss["tuned"][m:h], -loss["tuned"][h:]),
                "tuned_calibrated": auc((loss["base"] - loss["tuned"])[m:h], (loss["base"] - loss["tuned"])[h:])},
        "mean_loss": {k: {"members": float(v[m:h].mean()), "heldout": float(v[h:].mean())} for k, v in loss.items()}}
    atomic.write_text(run / "audit.json", json.dumps(result, indent=1) + "\n")
    atomic.write_text(run / "audit.md", report(result))
    return result


def _canary_results(found: canary.Canaries, n: int, logps: dict[str, np.ndarray]) -> dict:
    bits = {k: -v / math.log(2) for k, v in logps.items()}  # log-perplexity, Carlini et al.'s Px, in bits
    per = []
    for i, c in enumerate(found.canaries):
        at = i * (n + 1)  # the secret, then its n candidates
        per.append({"key": c.key, "secret": c.secret, "repeats": c.repeats,
                    **{k: exposures(v[at], v[at + 1 : at + 1 + n], found.size) for k, v in bits.items()}})
    by = {}
    for r in sorted({c.repeats for c in found.canaries}):
        mine = [p for p in per if p["repeats"] == r]
        by[str(r)] = {"canaries": len(mine), **{f"{k}{suffix}": float(np.mean([p[k][f"exposure{suffix}"] for p in mine]))
                                                 for k in ("base", "tuned") for suffix in ("", "_sampled")}}
    return {"file": str(found.file), "candidates": n, "secret_space": found.size,
            "max_exposure": math.log2(found.size), "estimator": "skew-normal fitted to the candidates' "
            "log-perplexities (Carlini et al. 2019, section 4.3); exposure_sampled: rank extrapolated from the "
            "sampled fraction", "per_canary": per, "by_repeats": by}


def table(result: dict) -> str:
    """Exposure per repetition count and membership AUC, base against tuned, in Markdown."""
    rows = ["| measure | base | tuned |", "|---|---:|---:|"]
    if canaries := result.get("canaries"):
        for r, v in canaries["by_repeats"].items():
            times = "1 repetition" if r == "1" else f"{r} repetitions"
            n = f"{v['canaries']} {'canary' if v['canaries'] == 1 else 'canaries'}"
            rows.append(f"| exposure, {times} ({n}), bits | {v['base']:.2f} "
                        f"({v['base_sampled']:.2f}) | {v['tuned']:.2f} ({v['tuned_sampled']:.2f}) |")
    a = result["membership"]["auc"]
    rows.append(f"| membership AUC, loss | {a['base']:.3f} | {a['tuned']:.3f} |")
    rows.append(f"| membership AUC, loss minus base loss | - | {a['tuned_calibrated']:.3f} |")
    return "\n".join(rows)


def report(result: dict) -> str:
    m = result["membership"]
    notes = [f"Members: {m['n_members']} examples of {m['members']}; held out: {m['n_heldout']} of {m['heldout']}"
             + (f"; {m['canary_rows_left_out']} canary rows left out." if m["canary_rows_left_out"] else ".")]
    if canaries := result.get("canaries"):
        notes.insert(0, f"Exposure in bits, at most log2|R| = {canaries['max_exposure']:.2f} (|R| = "
                        f"{canaries['secret_space']:,} secrets): a skew-normal fitted to the log-perplexities of "
                        f"{canaries['candidates']} random secrets, and in brackets the rank among them extrapolated "
                        f"(it resolves up to about {math.log2(canaries['candidates']):.1f} bits). A secret the model "
                        f"never saw scores 1.44 bits on average. Canaries: {canaries['file']}.")
    notes.append("Membership AUC: the chance that a member row has a lower loss than a held-out row (0.5: chance); "
                 "'minus base loss' calibrates each row by its loss under the base model.")
    return f"# Leakage audit: {result['run']}\n\n{table(result)}\n\n" + "\n\n".join(notes) + "\n"
