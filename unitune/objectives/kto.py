"""KTO (Ethayarajh et al. 2024): learning from unpaired feedback, a completion marked desirable or
undesirable with no rival for the same prompt (thumbs up / down). Each completion's log-ratio to the
reference is compared with a reference point, the batch's KL estimate, which comes from mismatched
(prompt, completion) rows built by the collator as TRL's KTOTrainer builds them.

Rows: `prompt`, `completion`, `label` (data/preference.py). A step normalises by its examples.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig, Section
from unitune.data import preference as data
from unitune.data.files import Row
from unitune.objectives import preference
from unitune.objectives.logprobs import sequence_logps

NEEDS_REF = True
PACKS = False


class Config(Section):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)  # raise the smaller side's weight when labels are unbalanced
    undesirable_weight: float = Field(1.0, gt=0)
    loss_chunk: int = Field(1024, gt=0)


def example(row: Row, tok: PreTrainedTokenizerBase, cfg: DataConfig, roles: frozenset[str]):
    sample = data.to_unpaired(row, cfg.system_prompt, roles)
    ex = data.tokenize_unpaired(tok, sample, cfg.max_length, cfg.truncation)
    if ex is not None and sample.label:  # a desirable answer is a reference for exact match
        ex.messages = sample.prompt + sample.completion
    return ex


def collate(examples: list, rows: list[list[int]], pad_id: int, packed: bool, max_length: int | None = None) -> dict:
    return data.collate_unpaired([examples[i] for row in rows for i in row], pad_id, max_length)


def count(batch: dict) -> int:
    return len(batch["label"])


def _kl_rows(batch: dict) -> dict:
    return {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
            "targets": batch["kl_targets"]}


def loss(model: nn.Module, batch: dict, cfg: Config, ref) -> tuple[torch.Tensor, dict]:
    label = batch["label"]
    if len(label) < 2:
        raise ValueError("kto estimates its reference point from the other rows of a batch: set train.batch_size "
                         "and eval.batch_size to 2 or more")
    logps, _ = sequence_logps(model, batch, cfg.loss_chunk)
    with torch.no_grad():  # the KL estimate is a detached reference point (TRL computes it without gradients)
        kl_logps, _ = sequence_logps(model, _kl_rows(batch), cfg.loss_chunk)
        with ref() as reference:
            ref_logps, _ = sequence_logps(reference, batch, cfg.loss_chunk)
            ref_kl_logps, _ = sequence_logps(reference, _kl_rows(batch), cfg.loss_chunk)
    out = preference.kto(logps[label], logps[~label], kl_logps, ref_logps[label], ref_logps[~label], ref_kl_logps,
                         beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                         undesirable_weight=cfg.undesirable_weight)
    return out.losses.sum(), {"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
                              "kl": out.kl * len(label), "seen_tokens": batch["real_tokens"]}
