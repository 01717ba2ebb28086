"""Reward models: a causal LM with a scalar head (`score`, AutoModelForSequenceClassification with one
label), trained on preference pairs so that the chosen completion scores above the rejected one.

The loss is Bradley-Terry with TRL's options (objectives/preference.py `bradley_terry`): a per-pair
`margin` column in the data (Llama 2's) and `center_rewards_coefficient`. As TRL's RewardTrainer:
one forward pass over 2B rows, prompt+chosen then prompt+rejected, each rewarded at its last real
token; the head is new, so it trains in full under every method (api.prepare puts it in a LoRA
adapter's modules_to_save, as PEFT does for SEQ_CLS) and never carries an adapter itself.
Examples carry no chat for the evaluator to answer: a reward model does not generate, and its
held-out figure is `val_accuracy`, the share of pairs ranked right.
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
from unitune.models import heads
from unitune.objectives import preference
from unitune.objectives.pairs import PACKS, collate, count  # noqa: F401  (the objective's data)

KIND = "seq-cls"
NUM_LABELS = 1  # the model is loaded as a sequence classifier with one output: the reward


class Config(Section):
    name: Literal["reward"] = "reward"
    # Eisenstein et al. 2023: Bradley-Terry is blind to a shift of every reward; this pulls their mean to 0
    center_rewards_coefficient: float | None = Field(None, ge=0)


def example(row: Row, tok: PreTrainedTokenizerBase, cfg: DataConfig, roles: frozenset[str]):
    return data.tokenize_pair(tok, data.to_pair(row, cfg.system_prompt, roles), cfg.max_length, cfg.truncation)


def rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One reward per row: the head applied to the hidden state of the row's last attended token.
    Only those B hidden states reach the head, and the position comes from the attention mask, not
    from looking for pad_token_id as transformers does: a tokenizer whose pad token is its end-of-turn
    token (SmolLM2's) would otherwise be read one token early on every row."""
    mask = batch["attention_mask"]
    hidden = heads.backbone(model)(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)  # the last 1, whichever side the padding is on
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    chosen, rejected = rewards(model, batch).chunk(2)
    losses = preference.bradley_terry(chosen, rejected, batch.get("margin"), cfg.center_rewards_coefficient)
    c, r = chosen.detach(), rejected.detach()
    return losses.sum(), {"accuracy": (c > r).float().sum(), "margin": (c - r).sum(), "rewards/chosen": c.sum(),
                          "rewards/rejected": r.sum(), "seen_tokens": batch["real_tokens"]}
