"""PPO through the one loop: a tiny model learns what its reward asks with a value head on its trunk;
the head is checkpointed but not in the output; a resume in the middle of a rollout ends as the
uninterrupted run."""
import pytest
import torch
from safetensors.torch import load_file

import unitune

HERE = "tests.rl.rewards_for_tests"


def _recipe(tiny_recipe, prompts, **objective):
    return {**tiny_recipe,
            "data": {"train": str(prompts / "train.jsonl"), "validation": str(prompts / "val.jsonl"), "max_length": 128},
            "objective": {"name": "ppo", "rewards": [{"function": f"{HERE}:letter_e"}], "max_new_tokens": 12,
                          "temperature": 1.0, "top_k": 4, **objective},
            "train": {**tiny_recipe["train"], "batch_size": 8, "steps": 16, "lr": 2e-2, "eval_every": None},
            "eval": {"batch_size": 8}}


def test_ppo_trains_a_tiny_model_towards_its_reward(tiny_recipe, prompts):
    # 4 rollouts of 16 completions, each trained on for 2 epochs x 2 minibatches
    run = unitune.train(_recipe(tiny_recipe, prompts, num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.01))
    train = [r for r in run.history if r["split"] == "train"]
    assert {"reward", "reward_std", "kl", "kl_coef", "entropy", "clip_ratio", "value_loss", "value_clip_ratio",
            "policy_loss", "approx_kl", "completion_length", "gen_tokens_per_s"} <= train[0].keys()
    rollouts = [train[i]["reward"] for i in range(0, len(train), 4)]
    assert all(r["reward"] == pytest.approx(train[i - i % 4]["reward"]) for i, r in enumerate(train))  # a rollout: 4 steps
    assert rollouts[-1] > rollouts[0] + 0.1, rollouts  # it learns to write e's
    assert run.metrics["val_reward"] > run.before["val_reward"] + 0.1
    assert train[0]["clip_ratio"] == 0 and any(r["clip_ratio"] > 0 for r in train)  # later epochs move off policy
    assert any(r["kl"] > 0 for r in train)
    head = load_file(run.dir / "value_head.safetensors")
    assert head["weight"].abs().sum() > 0  # it trained away from its zero start
    adapter = load_file(run.output / "adapter_model.safetensors")
    assert not any("value_head" in k for k in adapter)  # the output is the policy alone


def test_adaptive_kl_moves_its_coefficient(tiny_recipe, prompts):
    recipe = _recipe(tiny_recipe, prompts, num_ppo_epochs=1, kl_coef=0.1, kl_estimator="k3", kl_target=1e-6,
                     kl_horizon=16)
    recipe["train"]["steps"] = 3
    run = unitune.train(recipe)
    coefs = [r["kl_coef"] for r in run.history if r["split"] == "train"]
    # the first rollout is the reference's own (KL 0, under target): -20% x 8 samples / horizon 16; the policy
    # has moved by the second (KL above the tiny target): +20% x 8 / 16
    assert coefs == pytest.approx([0.1, 0.1 * 0.9, 0.1 * 0.9 * 1.1])


def test_resume_in_the_middle_of_a_rollout_matches_an_uninterrupted_run(tiny_recipe, prompts, train_crashing_at):
    recipe = _recipe(tiny_recipe, prompts, num_ppo_epochs=2, num_mini_batches=2, kl_target=0.5)
    recipe["train"] = {**recipe["train"], "steps": 6, "grad_accum": 2, "save_every": 3, "batch_size": 4}
    recipe["eval"] = {"before": False, "batch_size": 8}
    straight = unitune.train({**recipe, "output": {**recipe["output"], "name": "straight"}})
    crashed = {**recipe, "output": {**recipe["output"], "name": "crashed"}}
    train_crashing_at(crashed, 6)  # a rollout lasts 4 steps: step 3 is inside the first
    assert (straight.dir.with_name("crashed") / "checkpoints" / "step-3" / "source.safetensors").is_file()
    resumed = unitune.train(crashed, resume=True)
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    heads = [load_file(r.dir / "value_head.safetensors") for r in (straight, resumed)]
    torch.testing.assert_close(heads[0]["weight"], heads[1]["weight"], atol=1e-6, rtol=0)
    logged = {r["step"]: r for r in straight.history if r["split"] == "train"}
    for r in resumed.history:
        if r["split"] == "train":
            assert r["reward"] == pytest.approx(logged[r["step"]]["reward"])
            assert r["kl_coef"] == pytest.approx(logged[r["step"]]["kl_coef"])
