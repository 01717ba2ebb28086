"""Rollouts: sample completions with a KV cache and return what a policy-gradient step needs, token
ids and masks, not only strings; and the per-token log-probabilities of those completions under a
model (the policy with gradients, the old policy or the reference without).

A completion ends at the chat template's end-of-turn token, which carries loss (the policy learns
to stop); what follows it is padding with mask 0. Log-probabilities are of the sampling
distribution, logits / temperature, as TRL computes them, so the importance ratio of a freshly
sampled completion is exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from unitune.methods import lora
from unitune.models import heads
from unitune.models.loader import end_of_turn_ids


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded, each prompt repeated num_generations times
    prompt_mask: torch.Tensor      # [B, P]
    completion_ids: torch.Tensor   # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the end-of-turn token
    truncated: torch.Tensor        # [B] bool: no end-of-turn within max_new_tokens
    texts: list[str]               # the completions, decoded without special tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def sample(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]], num_generations: int,
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None) -> Rollout:
    """num_generations completions of each prompt (token ids, chat template applied), grouped by prompt:
    rows i*G .. i*G+G-1 answer prompt i. Sampling draws from torch's global generator, which the
    engine's checkpoints save, so a resumed run samples what the uninterrupted one did."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad([p for p in prompts for _ in range(num_generations)], tok.pad_token_id)
    eot = end_of_turn_ids(tok)
    greedy = temperature == 0
    with lora.for_generation(model):  # decoding at the merged model's speed, the weights untouched
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, temperature=None if greedy else temperature,
                             top_p=None if greedy else top_p, top_k=top_k if not greedy else None,
                             eos_token_id=eot, pad_token_id=tok.pad_token_id, use_cache=True)
    model.train(was_training)
    completion = out[:, ids.shape[1]:].cpu()
    is_end = torch.isin(completion, torch.tensor(eot))
    ends = torch.where(is_end.any(1), is_end.int().argmax(1), completion.shape[1] - 1)
    cmask = (torch.arange(completion.shape[1]) <= ends[:, None]).long()
    completion = completion.masked_fill(cmask == 0, tok.pad_token_id)
    texts = tok.batch_decode(completion.masked_fill(is_end, tok.pad_token_id), skip_special_tokens=True)
    return Rollout(ids, mask, completion, cmask, ~is_end.any(1), [t.strip() for t in texts])


def _chunk_logps(model: nn.Module, h: torch.Tensor, y: torch.Tensor, temperature: float, entropy: bool):
    logits = heads.logits(model, h).float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    lp = logits.log_softmax(-1)
    ent = -(lp.exp() * lp).sum(-1).detach() if entropy else None
    return lp.gather(-1, y[..., None]).squeeze(-1), ent


class Scored(NamedTuple):
    logps: torch.Tensor                  # [B, T] log p of each completion token
    entropy: torch.Tensor | None         # [B, T] each position's entropy (detached), when asked for
    values: torch.Tensor | None          # [B, T] the value head's estimate at each position, when given one


def completion_logps(model: nn.Module, batch: dict, temperature: float = 1.0, chunk: int = 1024,
                     entropy: bool = False, value_head: nn.Module | None = None) -> Scored:
    """log p(token) [B, T] of each completion token under `model` at the sampling temperature (0: 1), and
    optionally each position's entropy (detached) and a value head's estimates from the same hidden
    states (PPO's policy and value heads on one trunk). Only completion positions reach the LM head, in
    chunks of about `chunk` tokens whose logits are recomputed in backward instead of stored; positions
    follow the attention mask, as in generation."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    heads.verify(model)
    hidden = heads.backbone(model)(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                                   use_cache=False).last_hidden_state
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    h = hidden[:, p - 1 : p + t - 1]  # the state before each completion token predicts it
    rows = max(1, chunk // max(t, 1))
    recompute = torch.is_grad_enabled() and len(h) > rows
    logps, entropies = [], []
    for i in range(0, len(h), rows):
        args = (model, h[i : i + rows], completion_ids[i : i + rows], temperature, entropy)
        lp, ent = checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute else _chunk_logps(*args)
        logps.append(lp)
        entropies.append(ent)
    values = value_head(h.float()).squeeze(-1) if value_head is not None else None
    return Scored(torch.cat(logps), torch.cat(entropies) if entropy else None, values)
