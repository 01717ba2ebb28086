"""PPO for language models (Ziegler et al. 2019, Ouyang et al. 2022), as TRL's PPOTrainer computes it:
the policy samples one completion per prompt, a reward source scores it (a reward model trained with
objective.name=reward, code, or both), and every token earns -kl_coef x KL(policy || reference) with
the score credited after the last. GAE over a value head's estimates gives per-token advantages, and
`num_ppo_epochs` passes over the rollout in `num_mini_batches` shuffled minibatches minimise the clipped
policy loss plus vf_coef x the clipped value loss.

The value head is a linear layer on the policy's last hidden states: one trunk, two heads, as TRL's
AutoModelForCausalLMWithValueHead had it. TRL's PPOTrainer trains a second full model as the critic;
one trunk costs no second model's memory or forward pass, and under LoRA the value loss trains the same
adapter. The head trains beside the policy, is in every checkpoint, and is saved apart from the output
(`value_head.safetensors` in the run directory): the output is the policy alone.

One rollout is `num_mini_batches` x grad_accum x train.batch_size prompts, and lasts num_ppo_epochs x
num_mini_batches optimizer steps. It is kept, with its shuffles and the KL coefficient, in the
checkpoint: a resumed run continues it exactly. The math is in rl/losses.py, tested against TRL's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from unitune.config import Section
from unitune.data import Batches
from unitune.engine.precision import autocast
from unitune.objectives.grpo import PACKS, collate, evaluate, example, rewards_for  # noqa: F401 (re-exported)
from unitune.rl import losses
from unitune.rl.rewards import Rewards, RewardSource
from unitune.rl.rollout import completion_logps, sample

VALUE_HEAD = "value_head"
TRAINED_BESIDE = (VALUE_HEAD,)  # modules the run trains and checkpoints but does not output


def needs_ref(cfg) -> bool:
    return cfg.kl_coef > 0 or cfg.kl_target is not None


class Config(Section):
    name: Literal["ppo"] = "ppo"
    rewards: list[RewardSource] = Field(default_factory=list)
    max_new_tokens: int = Field(53, gt=0)          # TRL's response_length
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = Field(None, gt=0)    # adaptive KL (Ziegler et al. 2019): the KL per completion to hold
    kl_horizon: int = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(None, ge=0)  # subtracted from the score of a completion cut short
    num_ppo_epochs: int = Field(4, ge=1)
    num_mini_batches: int = Field(1, ge=1)
    loss_chunk: int = Field(1024, gt=0)


def count(batch: dict) -> float:
    return float(batch["completion_mask"].sum())


def add_value_head(model: nn.Module) -> nn.Module:
    """A zero-initialised linear value head on the trunk's hidden states: values start at 0 and the
    first value gradients train the head, not the trunk."""
    if not hasattr(model, VALUE_HEAD):
        device = next(model.parameters()).device
        head = nn.Linear(model.config.get_text_config().hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        model.add_module(VALUE_HEAD, head)
    return getattr(model, VALUE_HEAD)


@dataclass
class Source:
    """Draws micro-batches from the current rollout, sampling a new one when the last is used up."""
    prompts: Batches
    model: nn.Module
    tok: PreTrainedTokenizerBase
    cfg: Config
    rewards: Rewards
    ref: object
    grad_accum: int
    batch_size: int
    device: torch.device
    amp: object
    kl: losses.AdaptiveKL
    calls: int = 0
    rollout: dict = field(default_factory=dict)

    @property
    def per_rollout(self) -> int:  # micro-batches drawn from one rollout
        return self.cfg.num_ppo_epochs * self.cfg.num_mini_batches * self.grad_accum

    def __len__(self) -> int:
        return len(self.prompts) * self.cfg.num_ppo_epochs

    @property
    def cursor(self) -> int:
        return self.calls

    @cursor.setter
    def cursor(self, calls: int) -> None:
        self.calls = calls
        started = -(-calls // self.per_rollout)  # rollouts sampled so far
        self.prompts.cursor = started * self.cfg.num_mini_batches * self.grad_accum

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        plain = {"kl_coef": self.kl.value, "log_keys": self.rollout.get("log_keys", [])}
        return plain, {k: v for k, v in self.rollout.items() if torch.is_tensor(v)}

    def restore(self, plain: dict | None, tensors: dict[str, torch.Tensor]) -> None:
        if plain:
            self.kl.value = plain["kl_coef"]
            self.rollout = {**tensors, "log_keys": plain["log_keys"]} if tensors else {}

    def next(self) -> dict:
        k = self.calls % self.per_rollout
        self.calls += 1
        if k == 0 or not self.rollout:
            self.rollout = self._rollout()
        epoch, j = divmod(k, self.cfg.num_mini_batches * self.grad_accum)
        rows = self.rollout["order"][epoch, j * self.batch_size : (j + 1) * self.batch_size]
        batch = {key: v[rows] for key, v in self.rollout.items() if torch.is_tensor(v) and key not in ("order", "log")}
        width = int(batch["completion_mask"].sum(1).max()) + 1  # drop columns past the longest completion's score
        for key in ("completion_ids", "completion_mask", "old_logps", "values", "returns", "advantages"):
            batch[key] = batch[key][:, :width]
        batch["log"], batch["log_keys"] = self.rollout["log"], self.rollout["log_keys"]
        batch["seen_tokens"] = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        return batch

    @torch.no_grad()
    def _rollout(self) -> dict:
        cfg = self.cfg
        prompts = [p for _ in range(cfg.num_mini_batches * self.grad_accum) for p in self.prompts.next()]
        t0 = time.perf_counter()
        roll = sample(self.model, self.tok, [p.prompt_ids for p in prompts], 1, cfg.max_new_tokens, cfg.temperature,
                      cfg.top_p, cfg.top_k)
        gen_s = time.perf_counter() - t0
        rows = [p.row for p in prompts]
        scores, each = self.rewards([r["prompt"] for r in rows], roll.texts, rows, [p.where for p in prompts])
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * roll.truncated.float()
        batch = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask, "completion_ids": roll.completion_ids,
                 "completion_mask": roll.completion_mask}
        logps, values = self._score(batch)
        ref_logps = logps
        if needs_ref(cfg):
            with self.ref() as reference:
                ref_logps, _ = self._score(batch, reference)
        out = losses.ppo_advantages(scores, logps, ref_logps, values, roll.completion_mask.float(), self.kl.value,
                                    cfg.kl_estimator, cfg.gamma, cfg.lam, cfg.whiten_rewards)
        kl = out.kl.sum(1).mean()
        log = {"reward": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else torch.tensor(0.0),
               "kl": kl, "non_score_reward": (out.rewards.sum(1) - scores).mean(), "kl_coef": self.kl.value,
               "completion_length": roll.lengths.float().mean(), "truncated": roll.truncated.float().mean(),
               "gen_tokens_per_s": roll.lengths.sum() / max(gen_s, 1e-9),
               **{f"reward/{k}": v.nanmean() for k, v in each.items()}}
        if cfg.kl_target is not None:
            self.kl.update(float(kl), len(scores))  # the next rollout's coefficient
        n = len(prompts)
        order = torch.stack([torch.randperm(n) for _ in range(cfg.num_ppo_epochs)])
        return {**batch, "old_logps": logps, "values": out.values, "returns": out.returns,
                "advantages": out.advantages, "order": order,
                "log": torch.stack([torch.as_tensor(v, dtype=torch.float) for v in log.values()]), "log_keys": list(log)}

    def _score(self, batch: dict, reference: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and, for the policy, values) of a rollout, a train.batch_size at a time, in eval mode."""
        model = reference if reference is not None else self.model
        head = None if reference is not None else getattr(self.model, VALUE_HEAD)
        was = model.training
        model.eval()
        logps, values = [], []
        try:
            for i in range(0, len(batch["prompt_ids"]), self.batch_size):
                chunk = {k: v[i : i + self.batch_size].to(self.device) for k, v in batch.items()}
                with autocast(self.device, self.amp):
                    out = completion_logps(model, chunk, self.cfg.temperature, self.cfg.loss_chunk, value_head=head)
                logps.append(out.logps.float().cpu())
                values.append(out.values.float().cpu() if head is not None else None)
        finally:
            model.train(was)
        return torch.cat(logps), (torch.cat(values) if head is not None else None)


def source(examples: list, model: nn.Module, tok: PreTrainedTokenizerBase, recipe, ref, device, amp) -> Source:
    cfg, train = recipe.objective, recipe.train
    add_value_head(model)
    prompts = Batches(examples, train.batch_size, False, recipe.data.max_length, tok.pad_token_id, train.seed, collate)
    return Source(prompts, model, tok, cfg, rewards_for(cfg, device), ref, train.grad_accum, train.batch_size, device,
                  amp, losses.AdaptiveKL(cfg.kl_coef, cfg.kl_target or 1.0, cfg.kl_horizon))


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    logps, entropy, values = completion_logps(model, batch, cfg.temperature, cfg.loss_chunk, entropy=True,
                                              value_head=getattr(model, VALUE_HEAD))
    mask = batch["completion_mask"].float()
    out = losses.ppo_loss(logps, batch["old_logps"], batch["advantages"], mask, values, batch["values"],
                          batch["returns"], cfg.cliprange, cfg.cliprange_value, cfg.vf_coef)
    n = mask.sum()
    # sums over the completion tokens, which count() counts: the engine logs their means
    info = {"policy_loss": out.policy * n, "value_loss": out.value * n, "entropy": (entropy * mask).sum(),
            "clip_ratio": out.clipped.sum(), "value_clip_ratio": out.value_clipped.sum() * n / losses.value_mask(mask).sum(),
            "approx_kl": out.approx_kl * n, "seen_tokens": batch["seen_tokens"]}
    for k, v in zip(batch["log_keys"], batch["log"]):  # the rollout's figures
        info[k] = v * n
    return out.loss, info
