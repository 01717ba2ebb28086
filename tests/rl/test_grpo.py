"""GRPO through the one loop: rollouts with ids, log-probs and masks; rewards from functions with errors
that name the row; a tiny model that learns what its reward asks; exact resume with a rollout buffer."""
import json

import pytest
import torch
from safetensors.torch import load_file

import unitune
from unitune.config import ModelConfig, RecipeError
from unitune.models import load_model
from unitune.rl import rollout
from unitune.rl.rewards import RewardError, RewardSource, Rewards

HERE = "tests.rl.rewards_for_tests"


def _recipe(tiny_recipe, prompts, **objective):
    return {**tiny_recipe,
            "data": {"train": str(prompts / "train.jsonl"), "validation": str(prompts / "val.jsonl"), "max_length": 128},
            "objective": {"name": "grpo", "rewards": [{"function": f"{HERE}:letter_e"}], "num_generations": 4,
                          "max_new_tokens": 12, **objective},
            "train": {**tiny_recipe["train"], "batch_size": 8, "steps": 4, "lr": 2e-2, "eval_every": None},
            "eval": {"batch_size": 8}}


def test_rollout_masks_end_of_turn_and_logps_equal_the_models(tiny_llama, tokenizer):
    model = load_model(ModelConfig(name=str(tiny_llama))).model
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             return_dict=False) for t in ("Hi", "A longer prompt than the first one")]
    torch.manual_seed(0)
    roll = rollout.sample(model, tokenizer, prompts, 3, 10, temperature=1.0)
    assert roll.completion_ids.shape[0] == 6 and roll.prompt_ids.shape[0] == 6
    assert (roll.prompt_mask[0] == 0).any()  # left-padded: the short prompt's rows
    # force an end-of-turn into row 1 and check the mask logic on it
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    is_end = roll.completion_ids == eot
    for i in range(6):
        ends = is_end[i].nonzero()
        n = int(ends[0]) + 1 if len(ends) else roll.completion_ids.shape[1]
        assert roll.completion_mask[i].tolist() == [1] * n + [0] * (roll.completion_ids.shape[1] - n)
        assert bool(roll.truncated[i]) == (len(ends) == 0)
    batch = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask, "completion_ids": roll.completion_ids,
             "completion_mask": roll.completion_mask}
    with torch.no_grad():
        ours, entropy, _ = rollout.completion_logps(model, batch, temperature=0.7, chunk=8, entropy=True)
        for i in range(6):  # one unpadded row at a time through model(): the same log-probs
            keep = torch.cat([roll.prompt_mask[i], roll.completion_mask[i]]).bool()
            ids = torch.cat([roll.prompt_ids[i], roll.completion_ids[i]])[keep][None]
            logits = model(ids).logits[0] / 0.7
            p = int(roll.prompt_mask[i].sum())
            n = int(roll.completion_mask[i].sum())
            want = logits[p - 1 : p + n - 1].log_softmax(-1).gather(-1, ids[0, p : p + n, None]).squeeze(-1)
            torch.testing.assert_close(ours[i, :n], want, atol=1e-4, rtol=1e-4)
    assert entropy.shape == ours.shape and (entropy[roll.completion_mask.bool()] > 0).all()


def test_reward_errors_name_the_row(prompts):
    rows = [json.loads(line) for line in (prompts / "train.jsonl").read_text().splitlines()]
    where = [f"train.jsonl:{i + 1}" for i in range(len(rows))]
    args = ([r["prompt"] for r in rows], ["x"] * len(rows), rows, where)
    total, each = Rewards([RewardSource(function=f"{HERE}:answer_length", weight=2.0)])(*args)
    assert total.tolist() == [2.0 * len(r["answer"]) for r in rows] and list(each) == ["answer_length"]
    with pytest.raises(RewardError, match=r"raises_on_seven raised ValueError: cannot score a seven on train.jsonl:8"):
        Rewards([RewardSource(function=f"{HERE}:raises_on_seven")])(*args)
    with pytest.raises(RewardError, match=r"returned nan for train.jsonl:8"):
        Rewards([RewardSource(function=f"{HERE}:nan_on_seven")])(*args)
    with pytest.raises(RewardError, match="returned 1 values for 16 completions"):
        Rewards([RewardSource(function=f"{HERE}:too_few")])(*args)
    with pytest.raises(RecipeError, match="cannot be loaded"):
        Rewards([RewardSource(function=f"{HERE}:missing")])
    with pytest.raises(ValueError, match="exactly one of"):
        RewardSource(function=f"{HERE}:letter_e", model="runs/reward")


def test_grpo_trains_a_tiny_model_towards_its_reward(tiny_recipe, prompts):
    # top_k: a random model's softmax is near uniform over 49k tokens; among its top 4 the reward can choose
    recipe = _recipe(tiny_recipe, prompts, top_k=4)
    recipe["train"] = {**recipe["train"], "steps": 12, "eval_every": None}
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]
    assert {"reward", "reward_std", "reward/letter_e", "completion_length", "entropy", "clip_ratio",
            "gen_tokens_per_s"} <= train[0].keys()
    first, last = (sum(r["reward"] for r in rs) / len(rs) for rs in (train[:4], train[-4:]))
    assert last > first + 0.05, (first, last)  # it learns to write e's (0.16 -> 0.24 here)
    assert run.metrics["val_reward"] > run.before["val_reward"] + 0.2  # greedy answers too (0.00 -> 0.44)
    assert all(r["clip_ratio"] == 0 for r in train)  # num_iterations 1: the ratio is exactly 1
    assert (run.output / "adapter_model.safetensors").is_file()


def test_batch_size_must_hold_whole_groups(tiny_recipe, prompts):
    recipe = _recipe(tiny_recipe, prompts)
    recipe["train"]["batch_size"] = 6
    with pytest.raises(RecipeError, match="multiple of objective.num_generations=4"):
        unitune.train(recipe)


def test_resume_with_a_rollout_buffer_matches_an_uninterrupted_run(tiny_recipe, prompts, train_crashing_at):
    """num_iterations 2, beta > 0: a checkpoint in the middle of a generation's reuse holds its buffer
    (old and reference log-probs included) and the RNG; the resumed run samples and ends as the straight one."""
    recipe = _recipe(tiny_recipe, prompts, num_iterations=2, beta=0.05, loss_type="grpo")
    recipe["train"] = {**recipe["train"], "steps": 6, "grad_accum": 2, "save_every": 3, "batch_size": 4}
    recipe["eval"] = {"before": False, "batch_size": 8}
    straight = unitune.train({**recipe, "output": {**recipe["output"], "name": "straight"}})
    train = [r for r in straight.history if r["split"] == "train"]
    assert any(r["clip_ratio"] > 0 for r in train) and all(r["kl"] >= 0 for r in train)

    crashed = {**recipe, "output": {**recipe["output"], "name": "crashed"}}
    train_crashing_at(crashed, 6)
    assert (straight.dir.with_name("crashed") / "checkpoints" / "step-3" / "source.safetensors").is_file()
    resumed = unitune.train(crashed, resume=True)
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    rewards = {r["step"]: r["reward"] for r in train}
    assert all(r["reward"] == pytest.approx(rewards[r["step"]]) for r in resumed.history if r["split"] == "train")


def test_decode_equals_generate_greedy_and_drops_stopped_rows(tiny_llama, tokenizer):
    """The lean decode loop gives generate()'s greedy tokens, row by row, with rows stopping at different
    steps (their cache leaves the batch) and prompts of different lengths (left padding)."""
    model = load_model(ModelConfig(name=str(tiny_llama))).model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: greedy rows that differ, where the tiny init repeats one token
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else None
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             return_dict=False) for t in ("Hi", "A longer prompt", "Third one", "x y z")]
    ids, mask = rollout.left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=[-1])[:, ids.shape[1]:]
        stop = [int(free[0, 2]), int(free[1, 5])]  # tokens greedy writes: rows stop at different steps
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)[:, ids.shape[1]:]
        got = rollout.decode(model, ids, mask, 10, stop, tokenizer.pad_token_id, temperature=0)
    assert got.shape == want.shape and torch.equal(got, want)
    assert (got == tokenizer.pad_token_id).any()  # some rows stopped early


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (5, 1.0), (5, 0.5), (None, 1.0)])
def test_warp_equals_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    want = warpers(None, logits.clone())
    got = rollout.warp(logits, 0.7, top_p, top_k)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


def test_pick_samples_the_warped_distribution():
    """Inverse-CDF sampling draws each token with its warped probability and never one that top-k/top-p cut."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    drawn = rollout.pick(logits, 0.8, 1.0, 4)
    want = rollout.warp(logits[:1], 0.8, 1.0, 4).softmax(-1)[0]
    freq = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert freq[want == 0].sum() == 0  # the two tokens top_k=4 cut
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)  # 40k draws: std of a share < 0.0025
    assert rollout.pick(logits[:3], 0, 1.0, None).tolist() == [0, 0, 0]  # temperature 0: greedy
