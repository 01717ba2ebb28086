"""Reference log-probabilities computed once, before training (`objective.precompute_ref`).

DPO's reference pass is a third of a step's compute, and it gives the same numbers at every epoch:
the reference never changes. Computed once up front, a step is two passes instead of three; under
full fine-tuning the frozen reference copy is never made (the model, before its first step, is its
own reference), which is the memory TRL's precompute_ref_log_probs saves.

Only the examples the run will see are computed: the data plan says which, for the steps the run
has (a 30-step run over a 10k-pair file computes 30 batches' worth, not 10k pairs). An objective
that supports it exports `reference_logps(reference, batch, cfg) -> tensor [examples, k]`; the
values are kept on the examples (`ref_logps`), and its collator hands them to its loss.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unitune.data import Batches
from unitune.engine.loop import total_steps
from unitune.engine.precision import autocast


def used_examples(batches: Batches, steps: int, grad_accum: int) -> set[int]:
    """The example indices the first `steps` optimizer steps draw from `batches`."""
    used: set[int] = set()
    for k in range(steps * grad_accum):
        used.update(i for row in batches.plan(k // len(batches))[k % len(batches)] for i in row)
        if len(used) == len(batches.examples):
            break
    return used


@torch.no_grad()
def precompute(objective, cfg, ref, examples: list, indices, pad_id: int, max_length: int, batch_size: int,
               device: torch.device, amp, desc: str) -> None:
    """Store `ref_logps` on each example in `indices`: batches of similar lengths, in eval mode, under the
    same autocast as the loop, so each value is what the loop's own reference pass would give."""
    order = sorted(indices, key=lambda i: examples[i].length)
    with ref() as reference, tqdm(total=len(order), desc=desc, unit="ex", dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = objective.collate(examples, [chunk], pad_id, False, max_length)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast(device, amp):
                values = objective.reference_logps(reference, batch, cfg).float().cpu()
            for i, v in zip(chunk, values):
                examples[i].ref_logps = tuple(v.tolist())
            bar.update(len(chunk))


def precompute_for_run(objective, recipe, ref, train: Batches, val: list | None, device, amp) -> None:
    """Reference log-probs for the training examples the run's steps use and for every validation example."""
    used = used_examples(train, total_steps(recipe.train, len(train)), recipe.train.grad_accum)
    for examples, indices, desc in [(train.examples, used, "train"), (val or [], range(len(val or [])), "val")]:
        if indices:
            precompute(objective, recipe.objective, ref, examples, indices, train.pad_id, train.max_length,
                       recipe.eval.batch_size, device, amp, f"reference log-probs ({desc})")
