"""What every pairwise preference objective shares (DPO, SimPO, ORPO, reward models): rows of
(prompt, chosen, rejected) as examples, one batch of 2B rows per B pairs, the pair as the unit a
step normalises by, and the figures TRL logs."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig
from unitune.data import preference
from unitune.data.files import Row
from unitune.objectives.logprobs import sequence_logps

PACKS = False  # pairs come in padded batches: both sides of a pair in one forward pass


def example(row: Row, tok: PreTrainedTokenizerBase, cfg: DataConfig, roles: frozenset[str]):
    pair = preference.to_pair(row, cfg.system_prompt, roles)
    ex = preference.tokenize_pair(tok, pair, cfg.max_length, cfg.truncation)
    if ex is not None and isinstance(pair.prompt, list):  # the chosen answer is the reference for exact match
        ex.messages = pair.prompt + pair.chosen
    return ex


def collate(examples: list, rows: list[list[int]], pad_id: int, packed: bool, max_length: int | None = None) -> dict:
    return preference.collate_pairs([examples[i] for row in rows for i in row], pad_id)


def count(batch: dict) -> int:
    return batch["pairs"]


def logps(model: nn.Module, batch: dict, chunk: int) -> tuple[torch.Tensor, ...]:
    """Chosen and rejected log-probabilities (sums over each completion), and their token counts."""
    sums, n = sequence_logps(model, batch, chunk)
    b = batch["pairs"]
    return sums[:b], sums[b:], n[:b], n[b:]


def metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
            rejected_logps: torch.Tensor, batch: dict) -> dict:
    """TRL's logged figures, as sums over pairs (the engine logs their means), and the throughput count."""
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": chosen_logps.detach().sum(), "logps/rejected": rejected_logps.detach().sum(),
            "seen_tokens": batch["real_tokens"]}


def chosen_nll(chosen_logps: torch.Tensor, n_chosen: torch.Tensor) -> torch.Tensor:
    """The chosen completions' NLL per token over the micro-batch, times its pairs (the engine divides
    by the pairs): the SFT term RPO, CPO and ORPO add, computed as TRL computes it."""
    return len(chosen_logps) * -chosen_logps.sum() / n_chosen.sum().clamp(min=1)
