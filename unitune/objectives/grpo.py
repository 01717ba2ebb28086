"""GRPO (Shao et al. 2024, DeepSeekMath): online RL without a critic. Each step samples
`num_generations` completions of each prompt from the policy, scores them with the recipe's rewards
(code that checks answers, a trained reward model), and raises the log-probability of completions
that beat their group's mean reward, with PPO's clipped ratio and, optionally, a KL penalty to the
reference. `loss_type` picks how the per-token losses are averaged, as TRL names them: `grpo` (each
completion's mean, then the mean over completions), `dr_grpo` (Liu et al. 2025: over B x
max_new_tokens, no length bias) and `dapo` (Yu et al. 2025: over all tokens; TRL's default).

The step seam: this objective supplies its own batch source (`source`), which generates with the
current policy inside `next()`, so the engine's one loop, checkpoints and resume drive it unchanged.
A generated batch is reused for `num_iterations` steps (the importance ratio then moves off 1 and
clipping acts); the source's buffer and cursor go into the checkpoint, and sampling uses torch's
global generator, which the checkpoint restores: a resumed run samples what the uninterrupted one did.
The math is in rl/losses.py, tested against TRL's GRPOTrainer on the same tensors.

Rows: `prompt` (a string or messages ending with a user turn) and any columns the reward functions
read (`answer`, say). `train.batch_size` counts completions, as TRL's per-device batch does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig, RecipeError, Section
from unitune.data import Batches
from unitune.data import preference as data
from unitune.data.files import Row
from unitune.engine.precision import autocast
from unitune.rl import losses
from unitune.rl.rewards import Rewards, RewardSource
from unitune.rl.rollout import completion_logps, sample

PACKS = False


def needs_ref(cfg) -> bool:
    return cfg.beta > 0  # with beta 0 (TRL's default) no reference pass, and no frozen copy under full FT


class Config(Section):
    name: Literal["grpo"] = "grpo"
    rewards: list[RewardSource] = Field(default_factory=list)
    num_generations: int = Field(8, ge=2)        # completions per prompt: the group the advantage compares within
    max_new_tokens: int = Field(128, gt=0)       # TRL's max_completion_length
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    beta: float = Field(0.0, ge=0)               # KL to the reference; 0: no reference pass at all
    epsilon: float = Field(0.2, gt=0)            # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = Field(None, gt=0)  # DAPO's clip-higher (0.28); default: epsilon
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1)         # optimizer steps on each generated batch
    mask_truncated_completions: bool = False     # DAPO: no loss on completions cut at max_new_tokens
    loss_chunk: int = Field(1024, gt=0)


@dataclass
class PromptExample:
    prompt_ids: list[int]
    messages: list[dict]        # the prompt as a conversation (what evaluation answers)
    row: dict                   # every column, for the reward functions
    where: str
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_loss(self) -> int:
        return 1  # a prompt always has something to learn from: the completions sampled for it


def example(row: Row, tok: PreTrainedTokenizerBase, cfg: DataConfig, roles: frozenset[str]) -> PromptExample | None:
    messages = data.to_prompt(row, cfg.system_prompt, roles)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if len(ids) >= cfg.max_length:
        return None  # dropped as too long: nothing could be generated within data.max_length
    return PromptExample(list(ids), messages, dict(row.data), row.where)


def collate(examples: list, rows: list[list[int]], pad_id: int, packed: bool, max_length: int | None = None) -> list:
    """Prompts, not tensors: the source generates from them."""
    return [examples[i] for row in rows for i in row]


def count(batch: dict) -> float:
    return batch["count"]


@dataclass
class Source:
    """The batch source the engine draws micro-batches from: each `next()` generates (or replays, within
    num_iterations) one micro-batch of completions with their rewards and advantages."""
    prompts: Batches
    model: nn.Module
    tok: PreTrainedTokenizerBase
    cfg: Config
    rewards: Rewards
    ref: object
    grad_accum: int
    device: torch.device
    amp: object
    calls: int = 0
    buffer: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts) * self.cfg.num_iterations

    @property
    def cursor(self) -> int:
        return self.calls

    @cursor.setter
    def cursor(self, calls: int) -> None:
        """Resume: where the prompt stream stands after `calls` micro-batches."""
        self.calls = calls
        steps, k = divmod(calls, self.grad_accum)
        cycles = steps // self.cfg.num_iterations + (1 if steps % self.cfg.num_iterations else 0)
        self.prompts.cursor = cycles * self.grad_accum + (k if steps % self.cfg.num_iterations == 0 else 0)

    def state(self) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """The buffer a resumed run replays (num_iterations > 1): its plain values, and its tensors flat."""
        if self.cfg.num_iterations == 1:
            return [], {}  # every step generates afresh: nothing to replay
        plain = [{k: v for k, v in b.items() if not torch.is_tensor(v)} for b in self.buffer]
        return plain, {f"{i}.{k}": v for i, b in enumerate(self.buffer) for k, v in b.items() if torch.is_tensor(v)}

    def restore(self, plain: list[dict] | None, tensors: dict[str, torch.Tensor]) -> None:
        self.buffer = [dict(p) for p in plain or []]
        for key, v in tensors.items():
            i, k = key.split(".", 1)
            self.buffer[int(i)][k] = v

    def next(self) -> dict:
        step, micro = divmod(self.calls, self.grad_accum)
        self.calls += 1
        if step % self.cfg.num_iterations == 0 or micro >= len(self.buffer):
            batch = self._generate(self.prompts.next())
            self.buffer[micro:] = [batch]
        batch = dict(self.buffer[micro])
        return batch

    @torch.no_grad()
    def _generate(self, prompts: list[PromptExample]) -> dict:
        cfg, g = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        roll = sample(self.model, self.tok, [p.prompt_ids for p in prompts], g, cfg.max_new_tokens, cfg.temperature,
                      cfg.top_p, cfg.top_k)
        gen_s = time.perf_counter() - t0
        rows = [p.row for p in prompts for _ in range(g)]
        raw = [r["prompt"] for r in rows]
        total, each = self.rewards(raw, roll.texts, rows, [p.where for p in prompts for _ in range(g)])
        advantages, no_signal = losses.group_advantages(total, g, cfg.scale_rewards)
        mask = roll.completion_mask
        if cfg.mask_truncated_completions:
            mask = mask * (~roll.truncated)[:, None]
        batch = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask, "completion_ids": roll.completion_ids,
                 "completion_mask": mask, "advantages": advantages}
        on_device = {k: v.to(self.device) for k, v in batch.items()}
        if cfg.num_iterations > 1:  # the sampling policy's log-probs: the ratio's denominator on later steps
            batch["old_logps"] = self._logps(self.model, on_device)
        if cfg.beta:
            with self.ref() as reference:
                batch["ref_logps"] = self._logps(reference, on_device)
        log = {"reward": total.mean(), "reward_std": total.view(-1, g).std(1).mean(), "frac_reward_zero_std":
               no_signal.float().mean(), "completion_length": roll.lengths.float().mean(),
               "truncated": roll.truncated.float().mean(), "gen_tokens_per_s": roll.lengths.sum() / max(gen_s, 1e-9),
               **{f"reward/{k}": v.nanmean() for k, v in each.items()}}
        batch["log"] = torch.stack([torch.as_tensor(v, dtype=torch.float) for v in log.values()])
        batch["log_keys"] = list(log)
        batch["count"] = losses.normaliser(cfg.loss_type, mask, cfg.max_new_tokens)
        batch["seen_tokens"] = int(roll.prompt_mask.sum() + mask.sum())
        return batch

    def _logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            with autocast(self.device, self.amp):
                return completion_logps(model, batch, self.cfg.temperature, self.cfg.loss_chunk).logps.float().cpu()
        finally:
            model.train(was)


def source(examples: list, model: nn.Module, tok: PreTrainedTokenizerBase, recipe, ref, device, amp) -> Source:
    cfg, train = recipe.objective, recipe.train
    if train.batch_size % cfg.num_generations:
        raise RecipeError(f"train.batch_size={train.batch_size} counts completions and must be a multiple of "
                          f"objective.num_generations={cfg.num_generations} (a group of completions per prompt)")
    prompts = Batches(examples, train.batch_size // cfg.num_generations, False, recipe.data.max_length,
                      tok.pad_token_id, train.seed, collate)
    return Source(prompts, model, tok, cfg, rewards_for(cfg, device), ref, train.grad_accum, device, amp)


_REWARDS: dict[str, Rewards] = {}


def rewards_for(cfg: Config, device) -> Rewards:
    """One Rewards per set of sources and device: a reward model loads once for training and evaluation."""
    key = f"{[s.model_dump_json() for s in cfg.rewards]}@{device}"
    if key not in _REWARDS:
        _REWARDS.clear()  # one run's at a time
        _REWARDS[key] = Rewards(cfg.rewards, device)
    return _REWARDS[key]


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    logps, entropy, _ = completion_logps(model, batch, cfg.temperature, cfg.loss_chunk, entropy=True)
    mask = batch["completion_mask"]
    out = losses.clipped_policy_loss(logps, batch.get("old_logps"), batch["advantages"], mask, cfg.loss_type,
                                     cfg.epsilon, cfg.epsilon_high or cfg.epsilon, cfg.beta, batch.get("ref_logps"))
    # figures as sums over what count() counts, so the engine's means are per completion or per token
    per = {"grpo": lambda x: ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum(),
           "dr_grpo": lambda x: (x * mask).sum() * batch["count"] / mask.sum().clamp(min=1),
           "dapo": lambda x: (x * mask).sum()}[cfg.loss_type]
    info = {"entropy": per(entropy), "clip_ratio": per(out.clipped.float()), "seen_tokens": batch["seen_tokens"]}
    if cfg.beta:
        info["kl"] = per(out.kl)
    if "log" in batch:  # the generation's figures, once per micro-batch, weighted as the loss is
        for k, v in zip(batch["log_keys"], batch["log"]):
            info[k] = v * batch["count"]
    return out.loss, info


@torch.no_grad()
def evaluate(model: nn.Module, tok: PreTrainedTokenizerBase, examples: list, recipe, device, amp) -> dict:
    """Greedy answers to every held-out prompt, scored by the run's rewards: val_reward (the weighted sum)
    and each source's mean (for a 0/1 checker: the held-out accuracy)."""
    cfg, batch_size, rewards = recipe.objective, recipe.eval.batch_size, rewards_for(recipe.objective, device)
    totals, each_all, lengths = [], {}, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        roll = sample(model, tok, [p.prompt_ids for p in chunk], 1, cfg.max_new_tokens, temperature=0)
        total, each = rewards([p.row["prompt"] for p in chunk], roll.texts, [p.row for p in chunk],
                              [p.where for p in chunk])
        totals.append(total)
        lengths.append(roll.lengths.float())
        for k, v in each.items():
            each_all.setdefault(k, []).append(v)
    out = {"val_reward": float(torch.cat(totals).mean()), "val_completion_length": float(torch.cat(lengths).mean())}
    out.update({f"val_reward/{k}": float(torch.cat(v).nanmean()) for k, v in each_all.items()})
    return out
