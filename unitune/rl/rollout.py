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
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

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


def warp(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """logits / temperature, cut (-inf) to the top_k tokens and to the smallest set whose probability
    reaches top_p, as HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper do in turn."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)  # ascending, as TopPLogitsWarper: drop the low tail
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(tail.scatter(1, order, tail), -torch.inf)
    return logits


def pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a draw from the warped distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    # inverse-CDF sampling: the same distribution as torch.multinomial, whose exponential draws over the
    # whole vocabulary cost ~19 ms a step for 16 x 49k logits on a CPU, where a cumulative sum costs ~1 ms
    cdf = warp(logits, temperature, top_p, top_k).softmax(-1).cumsum(-1)
    u = (1 - torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]  # in (0, total]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


class _Preallocated(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers sized for the whole decode:
    a new token is written in place, where DynamicLayer copies the layer's whole cache (torch.cat) at
    every step."""
    _layer_type = None  # not registered in transformers' layer-type mapping

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, _ = key_states.shape
            self._k = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
            self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        n = key_states.shape[-2]
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _cache(model: nn.Module, capacity: int) -> DynamicCache:
    """The model's own cache layout (sliding windows and all), with every full-attention layer preallocated."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_Preallocated(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: list[int],
           pad_id: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] for left-padded prompts, pad after each row's stop token.
    A lean loop in place of generate(): the backbone with its KV cache, the LM head on the last position
    only, and rows that have stopped leave the batch (their cache with them), so a long straggler does
    not make the whole batch pay for every step."""
    rows = torch.arange(len(ids), device=ids.device)
    out = torch.full((len(ids), max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    stop_ids = torch.tensor(stop, device=ids.device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    body, cache, inputs, n = heads.backbone(model), _cache(model, ids.shape[1] + max_new_tokens), ids, 0
    for t in range(max_new_tokens):
        h = body(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True)
        token = pick(heads.logits(model, h.last_hidden_state[:, -1]), temperature, top_p, top_k)
        out[rows, t] = token
        n = t + 1
        going = ~torch.isin(token, stop_ids)
        if not going.any():
            break
        if not going.all():  # the stopped rows leave the batch
            keep = going.nonzero().squeeze(1)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        inputs = token[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        positions = positions[:, -1:] + 1
    return out[:, :n]


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
    with lora.for_generation(model):  # decoding at the merged model's speed, the weights untouched
        completion = decode(model, ids.to(device), mask.to(device), max_new_tokens, eot, tok.pad_token_id,
                            temperature, top_p, top_k).cpu()
    model.train(was_training)
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
