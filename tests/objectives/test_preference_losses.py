"""The preference losses equal TRL 1.16's own code on the same numbers: losses, logged rewards and
gradients with respect to the policy's log-probabilities, to 1e-6, on random values from small to
large (where a naive log(sigmoid) would underflow, or log(1 - p) cancel), plus hand-computed cases.

TRL's trainers are built bare (`object.__new__`) with only the attributes their loss code reads;
DPO and KTO compute their losses inside `_compute_loss`, so a stand-in model hands them per-token
log-probabilities whose sum is the sequence log-probability under test.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer, KTOTrainer, RewardTrainer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns on every import from trl.experimental
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

from unitune.objectives import preference as pref

# (seed, scale of the log-probabilities, beta): the last makes beta * log-ratio reach the hundreds.
CASES = [(0, 1.0, 0.1), (1, 40.0, 0.5), (2, 3000.0, 2.0)]
SMOOTHING = {"sigmoid": 0.0, "robust": 0.3, "exo_pair": 1e-3}


def close(ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float64),
                               torch.as_tensor(theirs, dtype=torch.float64), rtol=1e-6, atol=1e-6)


class Accelerator:
    """Single process: gathering is the identity."""
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


class Model:
    """Returns the per-token log-probabilities registered for the input_ids it is given."""
    training = True

    def __init__(self, outputs: dict[int, torch.Tensor]):
        self.outputs = outputs

    def __call__(self, input_ids, **kwargs):
        log_probs = self.outputs[id(input_ids)]
        zeros = torch.zeros(log_probs.shape)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def bare(cls, **attrs):
    trainer = object.__new__(cls)
    common = dict(accelerator=Accelerator(), _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                  _tp_size=1, aux_loss_enabled=False)
    for name, value in {**common, **attrs}.items():
        setattr(trainer, name, value)
    return trainer


def per_token(logps: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) sequence log-probabilities as (N, width) per-token ones: the sum on the first token."""
    return F.pad(logps[:, None], (0, width - 1))


def data(seed: int, scale: float, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda: -scale * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    length = lambda: torch.randint(1, 40, (n,), generator=g)  # noqa: E731
    return dict(chosen=draw(), rejected=draw(), ref_chosen=draw(), ref_rejected=draw(), chosen_len=length(),
                rejected_len=length())


def trl_dpo(loss_type: str, beta: float, eps: float, chosen, rejected, ref_chosen, ref_rejected,
            chosen_len: int, rejected_len: int):
    """TRL's DPO loss and logged rewards for one pair."""
    width = max(chosen_len, rejected_len) + 1
    input_ids = torch.zeros(2, width, dtype=torch.long)
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    completion_mask[0, 1:chosen_len + 1] = 1
    completion_mask[1, 1:rejected_len + 1] = 1
    model = Model({id(input_ids): per_token(torch.stack([chosen, rejected]), width - 1)})
    trainer = bare(DPOTrainer, model=model, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                   label_smoothing=eps, f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
                   precompute_ref_logps=True)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
                  ref_chosen_logps=ref_chosen[None], ref_rejected_logps=ref_rejected[None])
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize("loss_type", list(pref.DPO_LOSSES))
@pytest.mark.parametrize("seed,scale,beta", CASES)
def test_dpo_equals_trl(loss_type, seed, scale, beta):
    d = data(seed, scale, 5)
    eps = SMOOTHING.get(loss_type, 0.0)
    for i in range(5):
        theirs_c, theirs_r = d["chosen"][i].clone().requires_grad_(), d["rejected"][i].clone().requires_grad_()
        loss, chosen_reward, rejected_reward = trl_dpo(loss_type, beta, eps, theirs_c, theirs_r, d["ref_chosen"][i],
                                                       d["ref_rejected"][i], int(d["chosen_len"][i]),
                                                       int(d["rejected_len"][i]))
        loss.backward()
        ours_c, ours_r = d["chosen"][i:i + 1].clone().requires_grad_(), d["rejected"][i:i + 1].clone().requires_grad_()
        out = pref.dpo(ours_c, ours_r, d["ref_chosen"][i:i + 1], d["ref_rejected"][i:i + 1], beta=beta,
                       loss_type=loss_type, label_smoothing=eps, chosen_lengths=d["chosen_len"][i:i + 1],
                       rejected_lengths=d["rejected_len"][i:i + 1])
        out.losses.sum().backward()
        close(out.losses[0], loss)
        close(ours_c.grad[0], theirs_c.grad)
        close(ours_r.grad[0], theirs_r.grad)
        close(out.chosen_rewards[0], chosen_reward)
        close(out.rejected_rewards[0], rejected_reward)
        assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("seed,scale,beta", CASES)
def test_conservative_dpo_is_trl_dpo_averaged_over_flipped_labels(seed, scale, beta):
    """TRL 1.16 ignores label_smoothing for sigmoid; conservative DPO is by definition the loss's
    expectation when each label is flipped with probability eps, so TRL's own code still checks it."""
    eps = 0.2
    d = data(seed, scale, 4)
    for i in range(4):
        c, r = d["chosen"][i].clone().requires_grad_(), d["rejected"][i].clone().requires_grad_()
        lengths = int(d["chosen_len"][i]), int(d["rejected_len"][i])
        kept = trl_dpo("sigmoid", beta, 0.0, c, r, d["ref_chosen"][i], d["ref_rejected"][i], *lengths)[0]
        flipped = trl_dpo("sigmoid", beta, 0.0, r, c, d["ref_rejected"][i], d["ref_chosen"][i], *lengths[::-1])[0]
        ((1 - eps) * kept + eps * flipped).backward()
        ours_c, ours_r = d["chosen"][i:i + 1].clone().requires_grad_(), d["rejected"][i:i + 1].clone().requires_grad_()
        out = pref.dpo(ours_c, ours_r, d["ref_chosen"][i:i + 1], d["ref_rejected"][i:i + 1], beta=beta,
                       label_smoothing=eps)
        out.losses.sum().backward()
        close(out.losses[0], (1 - eps) * kept + eps * flipped)
        close(ours_c.grad[0], c.grad)
        close(ours_r.grad[0], r.grad)


def test_dpo_by_hand():
    zero, beta = torch.zeros(3, requires_grad=True), 0.1
    out = pref.dpo(zero, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=beta)
    out.losses.sum().backward()
    close(out.losses, torch.full((3,), math.log(2)))
    close(zero.grad, torch.full((3,), -beta / 2))  # d/dh -log sigmoid(h) at 0 is -1/2, times beta

    h = 2.0  # beta * margin: chosen log-ratio 12 - 2 = 10, rejected 0, beta 0.2
    args = (torch.tensor([12.0]), torch.tensor([-5.0]), torch.tensor([2.0]), torch.tensor([-5.0]))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(x) = softplus(-x)
    close(pref.dpo(*args, beta=0.2, label_smoothing=0.25).losses, [0.75 * softplus(-h) + 0.25 * softplus(h)])
    close(pref.dpo(*args, beta=0.2, loss_type="robust", label_smoothing=0.25).losses,
          [(0.75 * softplus(-h) - 0.25 * softplus(h)) / 0.5])
    close(pref.dpo(*args, beta=0.2, loss_type="hinge").losses, [0.0])
    # IPO on means: 10 over 4 tokens against 0 over 5, target 1 / (2 beta) = 2.5; SPPO on sums.
    close(pref.dpo(*args, beta=0.2, loss_type="ipo", chosen_lengths=torch.tensor([4]),
                   rejected_lengths=torch.tensor([5])).losses, [0.0])
    close(pref.dpo(*args, beta=0.2, loss_type="sppo_hard").losses, [(10 - 2.5) ** 2 + 2.5 ** 2])


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
    (dict(loss_type="hinge", label_smoothing=0.1), "does not use label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), r"outside \[0, 0.5\)"),
    (dict(loss_type="exo_pair"), r"outside \(0, 1\)"),
    (dict(loss_type="ipo"), "pass chosen_lengths and rejected_lengths"),
    (dict(beta=0.0), "beta=0.0 must be positive"),
])
def test_dpo_refuses_settings_it_would_misuse(kwargs, message):
    one = torch.zeros(1)
    with pytest.raises(ValueError, match=message):
        pref.dpo(one, one, one, one, **{"beta": 0.1, **kwargs})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("seed,scale,beta", CASES)
def test_simpo_equals_trl_cpo(seed, scale, beta, smoothing):
    d = data(seed, scale / 10, 6)  # means over tokens are smaller than sums
    ratio = 0.55
    theirs_c, theirs_r = d["chosen"].clone().requires_grad_(), d["rejected"].clone().requires_grad_()
    trainer = bare(CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=ratio * beta, beta=beta,
                   label_smoothing=smoothing)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, theirs_c, theirs_r)
    losses.sum().backward()
    ours_c, ours_r = d["chosen"].clone().requires_grad_(), d["rejected"].clone().requires_grad_()
    out = pref.simpo(ours_c, ours_r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=smoothing)
    out.losses.sum().backward()
    close(out.losses, losses)
    close(ours_c.grad, theirs_c.grad)
    close(ours_r.grad, theirs_r.grad)
    close(out.chosen_rewards, chosen_rewards)
    close(out.rejected_rewards, rejected_rewards)


def test_simpo_by_hand():
    # The margin equals gamma / beta: the loss is log 2 whatever beta.
    out = pref.simpo(torch.tensor([-1.0]), torch.tensor([-1.8]), beta=2.5, gamma_beta_ratio=0.8)
    close(out.losses, [math.log(2)])
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        pref.simpo(torch.zeros(1), torch.zeros(1), beta=2.5, gamma_beta_ratio=0.8, label_smoothing=0.5)


def orpo_inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-probabilities on both sides of log1mexp's branch at -ln 2, down to -30 and up to -1e-4."""
    g = torch.Generator().manual_seed(seed)
    exponent = lambda: torch.empty(8).uniform_(-4, math.log10(30), generator=g)  # noqa: E731
    return (-(10 ** exponent())).to(dtype), (-(10 ** exponent())).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 1.0), (2, 0.25)])
def test_orpo_odds_ratio_equals_trl(seed, beta, dtype):
    chosen, rejected = orpo_inputs(seed, dtype)
    theirs_c, theirs_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    trainer = bare(ORPOTrainer, beta=beta)
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, theirs_c,
                                                                                            theirs_r)
    (-losses).sum().backward()  # TRL's trainer subtracts this term; ours is added
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    out = pref.orpo_odds_ratio(ours_c, ours_r, beta=beta)
    out.losses.sum().backward()
    close(out.losses, -losses)
    close(ours_c.grad, theirs_c.grad)
    close(ours_r.grad, theirs_r.grad)
    close(out.chosen_rewards, chosen_rewards)
    close(out.rejected_rewards, rejected_rewards)
    close(out.log_odds_ratio.mean(), ratio)
    close(out.log_odds_chosen.mean(), log_odds)
    assert out.losses.dtype == torch.float32


def test_orpo_by_hand():
    # p = 0.8 against p = 0.2: odds 4 and 1/4, odds ratio 16, loss beta * log(1 + 1/16).
    out = pref.orpo_odds_ratio(torch.tensor([math.log(0.8)]), torch.tensor([math.log(0.2)]), beta=0.1)
    close(out.log_odds_chosen, [math.log(16)])
    close(out.losses, [0.1 * math.log(17 / 16)])


def trl_kto(beta, desirable, undesirable, logps, kl_logps, ref_logps, ref_kl_logps, labels):
    width = 4
    input_ids = torch.zeros(len(labels), width, dtype=torch.long)
    kl_input_ids = torch.ones_like(input_ids)  # another tensor, so that the stand-in model tells the calls apart
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 1:] = 1
    model = Model({id(input_ids): per_token(logps, width - 1), id(kl_input_ids): per_token(kl_logps, width - 1)})
    trainer = bare(KTOTrainer, model=model, beta=beta, loss_type="kto", desirable_weight=desirable,
                   undesirable_weight=undesirable, calculate_KL=True, precompute_ref_logps=True)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
                 KL_input_ids=kl_input_ids, KL_attention_mask=torch.ones_like(input_ids),
                 KL_completion_mask=completion_mask, label=labels, ref_logps=ref_logps, ref_KL_logps=ref_kl_logps)
    return trainer._compute_loss(model, batch, return_outputs=False), trainer._metrics["train"]


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1]], ids=["mixed", "all-desirable"])
@pytest.mark.parametrize("kl_shift", [3.0, -3.0], ids=["kl-positive", "kl-clamped"])
@pytest.mark.parametrize("seed,scale,beta", CASES)
def test_kto_equals_trl(seed, scale, beta, kl_shift, labels):
    labels = torch.tensor(labels, dtype=torch.bool)
    d = data(seed, scale, len(labels))
    logps, ref = d["chosen"], d["ref_chosen"]
    ref_kl = d["rejected"]
    kl_logps = ref_kl + kl_shift * scale + d["ref_rejected"] / 10
    desirable, undesirable = 1.0, 1.33

    theirs = logps.clone().requires_grad_()
    loss, metrics = trl_kto(beta, desirable, undesirable, theirs, kl_logps, ref, ref_kl, labels)
    loss.backward()
    ours, ours_kl = logps.clone().requires_grad_(), kl_logps.clone().requires_grad_()
    out = pref.kto(ours[labels], ours[~labels], ours_kl, ref[labels], ref[~labels], ref_kl, beta=beta,
                   desirable_weight=desirable, undesirable_weight=undesirable)
    out.losses.mean().backward()
    close(out.losses.mean(), loss)
    close(ours.grad, theirs.grad)
    close(out.kl, metrics["kl"][-1])
    assert (out.kl == 0) == (kl_shift < 0)
    assert ours_kl.grad is None  # z0 is a constant of the loss (TRL computes it under no_grad)
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"][-1])
    if (~labels).any():
        close(out.rejected_rewards.mean(), metrics["rewards/rejected"][-1])
    assert out.rejected_rewards.numel() == int((~labels).sum())


def test_kto_by_hand():
    # Policy equals reference and the KL estimate is negative, so clamped to 0: every loss is 1 - sigmoid(0).
    zero = torch.zeros(2)
    out = pref.kto(zero, zero[:1], -torch.ones(3), zero, zero[:1], torch.zeros(3), beta=0.1, desirable_weight=2.0)
    close(out.losses, [1.0, 1.0, 0.5])
    close(out.kl, 0.0)


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 20.0), (2, 500.0)])
def test_bradley_terry_equals_trl_reward_trainer(seed, scale, with_margin, center):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = (scale * torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    margin = torch.rand(6, generator=g, dtype=torch.float64) if with_margin else None
    theirs_c, theirs_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    inputs = dict(input_ids=torch.zeros(12, 3, dtype=torch.long), attention_mask=torch.ones(12, 3, dtype=torch.long))
    if with_margin:
        inputs["margin"] = margin
    trainer = bare(RewardTrainer, model=SimpleNamespace(training=True),
                   args=SimpleNamespace(center_rewards_coefficient=center))
    scores = SimpleNamespace(logits=torch.cat([theirs_c, theirs_r])[:, None])
    loss = RewardTrainer.compute_loss(trainer, lambda **kwargs: scores, inputs)
    loss.backward()
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    losses = pref.bradley_terry(ours_c, ours_r, margin, center)
    losses.mean().backward()
    close(losses.mean(), loss)
    close(ours_c.grad, theirs_c.grad)
    close(ours_r.grad, theirs_r.grad)


def test_bradley_terry_by_hand():
    one = torch.ones(1)
    close(pref.bradley_terry(one, one), [math.log(2)])
    close(pref.bradley_terry(one, one, margin=-one, center_rewards_coefficient=0.01),
          [math.log1p(math.exp(-1)) + 0.01 * 4])
