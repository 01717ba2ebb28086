"""TRL's PPO computations, transcribed line for line from trl 1.12.0 (Apache-2.0),
trl/experimental/ppo/ppo_trainer.py `PPOTrainer.train` (lines 718-798: response processing, rewards,
GAE, whitening; 820-846: one micro-batch's losses) and its helpers. TRL removed PPOTrainer in 1.14 and
the tests run trl 1.16, so the reference is this copy; only the model calls are replaced by tensors.
"""
import torch

INVALID_LOGPROB = 1.0


def first_true_indices(bools, dtype=torch.long):  # trl/experimental/utils.py
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def truncate_response(stop_token_id, pad_token_id, responses):
    trunc_idxs = first_true_indices(responses == stop_token_id).unsqueeze(-1)
    new_size = [1] * (len(responses.size()) - 1) + [responses.shape[1]]
    idxs = torch.arange(responses.shape[1], device=responses.device).view(*new_size)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def rollout(responses, logprobs, ref_logprobs, values, scores, stop_token_id, pad_token_id, eos_token_id, args):
    """From the sampled responses and the models' per-token outputs to advantages and returns."""
    postprocessed_responses = truncate_response(stop_token_id, pad_token_id, responses)
    sequence_lengths = first_true_indices(postprocessed_responses == pad_token_id) - 1
    contain_eos_token = torch.any(postprocessed_responses == eos_token_id, dim=-1)
    scores = scores.clone()
    if args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= args.missing_eos_penalty
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return dict(advantages=advantages, returns=returns, values=values, logprobs=logprobs, kl=kl, scores=scores,
                padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def micro_batch_loss(new_logprobs, vpred, r, args):
    """One micro-batch (here: the whole rollout) of PPOTrainer's inner loop; returns the loss and stats."""
    padding_mask, padding_mask_p1 = r["padding_mask"], r["padding_mask_p1"]
    mb_advantage, mb_logprobs, mb_return, mb_values = r["advantages"], r["logprobs"], r["returns"], r["values"]
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + args.vf_coef * vf_loss
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_clipfrac=pg_clipfrac,
                approxkl=approxkl)
