"""L2-SP: an L2 penalty towards the weights training started from (Li et al. 2018, "Explicit Inductive Bias
for Transfer Learning with Convolutional Networks"), a mitigation of forgetting (`train.l2_sp`).

The penalty alpha/2 * sum ||theta - theta_0||^2 enters as its gradient, alpha * (theta - theta_0), added after
backward and before clipping: the same update as adding it to the loss, without a graph for it. theta_0 is a
copy of the trainable parameters taken before the first step and before a checkpoint is loaded, so a resumed
run pulls towards the same point (full fine-tuning: the pretrained weights; LoRA: A as drawn and B = 0, which
pulls the update B·A towards zero). A new task head has no pretrained value to keep: it is left out, as the
paper leaves new layers to plain weight decay.
"""
from __future__ import annotations

import torch
from torch import nn


class Anchor:
    def __init__(self, model: nn.Module, alpha: float, skip: list[str] = ()):
        def kept(name: str) -> bool:
            return not any(name == s or name.startswith(s + ".") or f".{s}." in f".{name}" for s in skip)

        self.alpha = alpha
        self.params = [p for n, p in model.named_parameters() if p.requires_grad and kept(n)]
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def pull(self) -> float:
        """Add the penalty's gradient to every parameter's; returns ||theta - theta_0|| (logged as `drift`)."""
        diffs = torch._foreach_sub([p.detach() for p in self.params], self.start)
        for p, d in zip(self.params, diffs):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(d.to(p.grad.dtype), alpha=self.alpha)
        return float(sum(d.float().pow(2).sum() for d in diffs) ** 0.5) if diffs else 0.0
