"""What online RL needs beyond a loss: rollouts (sampling with token ids, log-probs and masks),
advantages, and the policy-gradient losses, as pure functions tested against TRL's."""
