"""Differentially private training: DP-SGD (Abadi et al. 2016) on the engine's one loop.

Each step draws its examples by Poisson sampling (each example in with probability q = batch_size / N, so a
step's batch has a random size: the sampling the privacy analysis assumes), clips every example's gradient
to `max_grad_norm` C, sums them, adds Gaussian noise of std sigma * C to the sum and divides by the expected
batch size q * N. One example is one privacy unit. Opacus's accountant (PRV or RDP) turns sigma, q and the
number of steps into the epsilon spent at the recipe's delta, or finds the sigma that spends a target epsilon.

Per-example gradients come from one backward pass per example over exactly the trainable parameters
(`torch.autograd.grad`), not from Opacus's module hooks: LoRA's fast path computes the A and B gradients
without calling those modules, so hooks would never see them, and a backward per example is exact for every
method, objective and architecture (it is the reference Opacus's own per-sample gradients are tested
against). It costs a pass per example: a step of B examples runs B batch-of-one passes.

What would silently break the guarantee is refused (`check`): packed rows (several examples in one row),
batch norms (statistics across examples), gradient accumulation, several processes, objectives that
generate their own batches, and a resume without the accountant's state. The noise comes from torch's
generator, seeded and checkpointed for exact resume; that is not a cryptographically secure source
(Opacus's secure_mode), which a deployment with a real adversary would want.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unitune.config import PrivacyConfig, Recipe, RecipeError


def check(recipe: Recipe, model: torch.nn.Module, objective, processes: int) -> None:
    """Refuse what would break the guarantee without a word."""
    why = []
    if "packing" in recipe.data.model_fields_set and recipe.data.packing and getattr(objective, "PACKS", False):
        why.append("data.packing puts several examples in one row (their gradients could not be clipped apart): "
                   "set data.packing=false")
    recipe.data.packing = False  # each example is collated alone; the default (packing) does not apply
    if recipe.train.grad_accum != 1:
        why.append("train.grad_accum would clip the accumulated gradient, not each example's: set "
                   "train.grad_accum=1; train.batch_size is the expected number of examples a step")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        why.append("the model has batch norms, which mix the examples of a batch: use a model with "
                   "group or layer norms")
    if hasattr(objective, "source"):
        why.append(f"objective.name={recipe.objective.name} generates its own batches, which are not "
                   "Poisson-sampled examples")
    if getattr(recipe.objective, "precompute_ref", False):
        why.append("objective.precompute_ref walks fixed batches: set it to false (the reference is computed "
                   "with each example)")
    if processes > 1:
        why.append("DP-SGD runs on one process")
    if why:
        raise RecipeError("privacy: " + "; ".join(why))


class PoissonBatches:
    """Each step's examples, every one in with probability q, drawn from a generator seeded by (seed, step):
    the cursor alone says where a resumed run is. Each example collated alone (no padding, no packing)."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, max_length: int, seed: int,
                 collate: Callable[..., dict]):
        if not examples:
            raise RecipeError("privacy: no training examples")
        self.examples, self.batch_size, self.pad_id, self.max_length, self.seed = \
            examples, batch_size, pad_id, max_length, seed
        self.collate = collate
        self.q = min(1.0, batch_size / len(examples))
        self.cursor = 0
        self.shard = (0, 1)

    def __len__(self) -> int:  # steps an epoch: an epoch sees each example once on average
        return math.ceil(len(self.examples) / self.batch_size)

    def next(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.cursor)
        self.cursor += 1
        chosen = torch.nonzero(torch.rand(len(self.examples), generator=g) < self.q).flatten().tolist()
        return {"examples": [self.collate(self.examples, [[i]], self.pad_id, False, self.max_length) for i in chosen]}


class DPSGD:
    """Clipping, noise and the accountant for one run; `step` leaves the private gradient in `.grad`."""

    def __init__(self, cfg: PrivacyConfig, batches: PoissonBatches, steps: int):
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        self.cfg, self.q, self.expected = cfg, batches.q, batches.q * len(batches.examples)
        self.sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, sample_rate=self.q, steps=steps,
            accountant=cfg.accountant)
        self.accountant = create_accountant(mechanism=cfg.accountant)
        self.steps = steps

    def describe(self) -> str:
        spent = self.epsilon_after(self.steps)
        return (f"privacy: DP-SGD, each example's gradient clipped to {self.cfg.max_grad_norm}, noise multiplier "
                f"{self.sigma:.4f}, sample rate {self.q:.5f} (expected {self.expected:.1f} examples a step): "
                f"epsilon {spent:.3f} at delta {self.cfg.delta:g} after {self.steps} steps ({self.cfg.accountant})")

    def epsilon_after(self, steps: int) -> float:
        if self.sigma == 0:
            return math.inf
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=self.cfg.accountant)
        acc.history = [(self.sigma, self.q, steps)]
        return acc.get_epsilon(delta=self.cfg.delta)

    def epsilon(self) -> float:
        """Spent so far."""
        if self.sigma == 0:
            return math.inf
        return self.accountant.get_epsilon(delta=self.cfg.delta) if self.accountant.history else 0.0

    def step(self, params: list[torch.Tensor], batch: dict, loss_of: Callable[[dict], tuple], count,
             stop: Callable[[str], None]) -> tuple:
        """One backward per example: each gradient clipped to C and summed; noise added; divided by the
        expected batch size. (mean example loss, summed metrics, loss units, clipped fraction); `stop(what)`
        is called on a non-finite loss."""
        C = self.cfg.max_grad_norm
        summed = [torch.zeros_like(p) for p in params]
        losses, sums, n, clipped = [], {}, 0.0, 0
        for ex in batch["examples"]:
            loss_sum, info = loss_of(ex)
            units = float(count(ex))
            loss = loss_sum / max(units, 1.0)
            if not torch.isfinite(loss):
                stop(f"an example's loss became {loss.item()}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
            scale = min(1.0, C / (norm + 1e-6))
            clipped += norm > C
            for s, g in zip(summed, grads):
                if g is not None:
                    s.add_(g, alpha=scale)
            losses.append(loss.item())
            n += units
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        for p, s in zip(params, summed):
            noise = torch.normal(0.0, self.sigma * C, size=s.shape, device=s.device) if self.sigma else 0.0
            p.grad = ((s + noise) / self.expected).to(p.dtype)
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.q)
        mean = sum(losses) / len(losses) if losses else float("nan")
        return mean, sums, n, clipped / max(len(losses), 1)
