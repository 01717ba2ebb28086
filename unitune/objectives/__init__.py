"""Objectives: what a run learns from. Each module owns its whole slice of the pipeline, as a method
owns its own (shared/ARCHITECTURE.md, "Objectives"); the engine drives any of them without knowing which.

An objective module exports:
- `Config`: its recipe section (a `name` literal plus its own fields), validated like a method's;
- `example(row, tok, data, roles) -> example | None`: one data row as a training example (None: dropped
  as too long by data.truncation; raises DataError / NothingToLearn naming the row). An example has
  `length` (tokens it takes in a batch), `n_loss` and `truncated`;
- `PACKS`: whether several examples may share a row (`collate` then gets packed rows);
- `collate(examples, rows, pad_id, packed, max_length) -> batch`: tensors for rows of example indices;
- `count(batch) -> int`: what one optimizer step normalises by (loss tokens, pairs, ...), summed over
  its micro-batches, so gradient accumulation gives exactly the gradient of one large batch;
- `loss(model, batch, cfg, ref) -> (loss_sum, metrics)`: the loss summed over the batch's counted
  units; `metrics` holds sums over the same units (the engine logs their means) and `seen_<unit>`
  (throughput: `seen_tokens`, `seen_examples`, logged as `<unit>_per_s`). `ref` is a context manager
  yielding the reference model: the policy with its adapters disabled where the method can, else a
  frozen copy; only used by objectives with NEEDS_REF;
- optionally `summarize(means) -> dict`: evaluation figures derived from the means (perplexity).
- optionally `reference_logps(reference, batch, cfg) -> [examples, k]`, with a `precompute_ref` field in
  Config: the reference's values computed once before training (engine/precompute.py), kept on the
  examples as `ref_logps` and handed by the collator to the loss, which then skips its reference pass.
- optionally `needs_ref(cfg) -> bool`, where NEEDS_REF depends on the config (GRPO: beta > 0);
- optionally, for online objectives that generate as they train (GRPO): `source(examples, model, tok,
  recipe, ref, device, amp)`, the batch source the loop draws from instead of the fixed data plan (the
  step seam: `next()` samples with the current policy and scores; `cursor`; `state()`/`restore()` put
  its buffer in the checkpoint), and `evaluate(model, tok, val, recipe, device, amp) -> metrics`.
- optionally `TRAINED_BESIDE`: names of modules the source adds to the model, trained and checkpointed
  with it but not part of the output (PPO's value head): saved as `<name>.safetensors` in the run.
- optionally `KIND`, or `kind(recipe)`: the model kind it trains (default causal-lm; classify: seq-cls or image-cls). A sequence classifier
  gets a new head, which trains in full under every method; its outputs are `NUM_LABELS` (a reward
  model: 1), or the classes `labels(train, val, cfg)` finds in the training data (classify), called after the
  data is read and before the model is loaded;
- optionally `figures(loaded, val, recipe, run_dir, device, amp)`: the figures it adds to the report
  (a detector's predictions drawn on held-out images);
- optionally `default_lr(recipe) -> float`: train.lr when the recipe sets none (else 2e-4).

Adding an objective is one module and one line in OBJECTIVES.
"""
from __future__ import annotations

from types import ModuleType

from unitune.objectives import classify, detect, dpo, grpo, kto, orpo, ppo, reward, simpo, sft

OBJECTIVES: dict[str, ModuleType] = {"sft": sft, "dpo": dpo, "simpo": simpo, "orpo": orpo, "kto": kto,
                                     "reward": reward, "grpo": grpo, "ppo": ppo, "classify": classify,
                                     "detect": detect}


def objective_config(data: dict):
    from unitune.config import plugin_config

    return plugin_config("objective", OBJECTIVES, data, "sft")
