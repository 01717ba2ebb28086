"""Objectives: a paradigm is `loss(model, batch) -> (loss_sum, metrics)`.

The loss is a sum over the batch's loss tokens and metrics["tokens"] counts them, so the engine
normalises by the tokens of the whole optimizer step: gradient accumulation then gives exactly
the gradient of one large batch.
"""
from unitune.objectives import sft

OBJECTIVES = {"sft": sft}
