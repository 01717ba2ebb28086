"""Reward models: a scalar head on a causal LM, read at each row's last real token, trained with
Bradley-Terry as TRL's RewardTrainer trains it, saved as a PEFT SEQ_CLS adapter, and used as a
reward function (`unitune.score`)."""
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from trl import RewardTrainer

import unitune
from unitune.api import prepare
from unitune.config import DataConfig, ModelConfig, RecipeError, load_recipe
from unitune.data import build_data
from unitune.methods import lora
from unitune.models import load_model
from unitune.objectives import reward
from unitune.tasks import orders


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return orders.write_preferences(tmp_path_factory.mktemp("pairs"), n_train=64, n_val=16)


def _batch(tokenizer, path, n=4):
    data = build_data(DataConfig(train=str(path), max_length=256), tokenizer, 0, reward.example)
    return reward.collate(data.train, [list(range(n))], tokenizer.pad_token_id, False)


def _recipe(tiny_recipe, data, method=None, **train):
    return {**tiny_recipe, "objective": {"name": "reward"}, "method": method or tiny_recipe["method"],
            "data": {"train": str(data / "train.jsonl"), "validation": str(data / "val.jsonl"), "max_length": 256},
            # fp32: the evaluator's figures then equal what score() computes, which never autocasts
            "train": {**tiny_recipe["train"], "batch_size": 8, "warmup_steps": 1, "precision": "fp32", **train}}


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_rewards_are_the_classifiers_logits_at_the_last_real_token(family, request, tokenizer, pair_data):
    model = load_model(ModelConfig(name=str(request.getfixturevalue(family))), num_labels=1).model.eval()
    assert type(model).__name__.endswith("ForSequenceClassification") and model.score.out_features == 1
    batch = _batch(tokenizer, pair_data / "train.jsonl")
    assert (batch["attention_mask"] == 0).any()  # right-padded rows of different lengths
    with torch.no_grad():
        ours = reward.rewards(model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # A pad token that is also the end-of-turn token (SmolLM2's): transformers then reads each row one
        # token early; the attention mask still finds the real last token.
        model.config.pad_token_id = tokenizer.eos_token_id
        early = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(reward.rewards(model, batch), ours)
    assert not torch.allclose(early, ours, atol=1e-4)


def _bare_trl(model, center):
    trainer = object.__new__(RewardTrainer)
    accelerator = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    for name, value in dict(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                            accelerator=accelerator, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                            _tp_size=1).items():
        setattr(trainer, name, value)
    return trainer


@pytest.mark.parametrize("center", [None, 0.05])
def test_loss_and_metrics_equal_trl_reward_trainer(tiny_llama, tokenizer, pair_data, tmp_path, center):
    rows = [json.loads(line) for line in (pair_data / "train.jsonl").read_text().splitlines()[:6]]
    rows = [{**r, "margin": 0.5 * i} for i, r in enumerate(rows)]
    (tmp_path / "margins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = _batch(tokenizer, tmp_path / "margins.jsonl", n=6)
    assert batch["margin"].tolist() == [0.5 * i for i in range(6)]
    model = load_model(ModelConfig(name=str(tiny_llama)), num_labels=1).model.train()
    with torch.no_grad():  # a head that separates the pairs somewhat, so accuracy and margin are not trivial
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))

    loss_sum, metrics = reward.loss(model, batch, reward.Config(center_rewards_coefficient=center))
    ours = loss_sum / reward.count(batch)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    trainer = _bare_trl(model, center)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "margin")}
    theirs = RewardTrainer.compute_loss(trainer, model, inputs)
    theirs.backward()
    logged = trainer._metrics["train"]

    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert metrics["accuracy"] / 6 == pytest.approx(logged["accuracy"][0], abs=1e-7)
    assert 0 < logged["accuracy"][0] < 1
    assert float(metrics["margin"]) / 6 == pytest.approx(logged["margin"][0], abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(our_grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_lora_reward_model_trains_saves_for_peft_and_scores(tiny_recipe, tiny_llama, tokenizer, pair_data):
    run = unitune.train(_recipe(tiny_recipe, pair_data, steps=24))
    train = [r for r in run.history if r["split"] == "train"]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= train[0].keys()
    assert "exact_match" not in run.metrics  # a reward model does not generate
    assert run.metrics["val_accuracy"] >= 0.75 and run.metrics["val_accuracy"] > run.before["val_accuracy"]
    assert run.metrics["val_loss"] < run.before["val_loss"]

    config = json.loads((run.output / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    saved = load_file(run.output / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved and not any("score.lora" in k for k in saved)

    # PEFT loads it as a sequence classifier and gives the same scores as unitune's reload
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1,
                                                              pad_token_id=tokenizer.pad_token_id)
    theirs = PeftModel.from_pretrained(base, run.output).eval()
    ours = unitune.load_run_or_model(run.dir).model.eval()
    assert isinstance(ours.score, lora.ModuleToSave)
    batch = _batch(tokenizer, pair_data / "val.jsonl", n=8)
    with torch.no_grad():
        want = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(reward.rewards(ours, batch), want, atol=1e-5, rtol=1e-5)

    # score() renders pairs as training did: its rewards give the evaluator's held-out figures exactly
    val = [json.loads(line) for line in (pair_data / "val.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in val]
    chosen = unitune.score(run.dir, prompts, [r["chosen"] for r in val], batch_size=5)
    rejected = unitune.score(run.output, prompts, [r["rejected"] for r in val])  # the adapter directory alone
    wins = [c > r for c, r in zip(chosen, rejected)]
    assert sum(wins) / len(val) == pytest.approx(run.metrics["val_accuracy"])
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(val) == pytest.approx(run.metrics["val_margin"], abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        unitune.score(run.dir, prompts[:2], chosen[:1])
    # evaluate() loads the same classifier: the base's random head as the run's step 0 saw it, then the tuned one
    both = unitune.evaluate(run.recipe, run=run.dir)
    assert both["base"]["val_accuracy"] == run.before["val_accuracy"]
    assert both["tuned"]["val_margin"] == pytest.approx(run.metrics["val_margin"], abs=1e-5)


def test_the_new_head_trains_in_full_under_every_method(tiny_recipe, pair_data):
    recipe = load_recipe(_recipe(tiny_recipe, pair_data, {"name": "lora", "r": 4, "target_modules": "all-linear"}))
    model = prepare(recipe, torch.device("cpu"))[0].model
    assert recipe.method.modules_to_save == ["score"]  # saved with the adapter, as PEFT's SEQ_CLS task
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable and "score.original_module.weight" not in trainable
    assert not any(n.startswith("score.") and "lora_" in n for n in trainable)  # never an adapter on the head

    model = prepare(load_recipe(_recipe(tiny_recipe, pair_data, {"name": "layernorm"})), torch.device("cpu"))[0].model
    assert model.score.weight.requires_grad

    with pytest.raises(RecipeError, match="method.name=ia3 cannot save"):
        prepare(load_recipe(_recipe(tiny_recipe, pair_data, {"name": "ia3"})), torch.device("cpu"))
    with pytest.raises(ValueError, match="quantized base with a new classification head"):
        prepare(load_recipe(_recipe(tiny_recipe, pair_data, {"name": "qlora"})), torch.device("cpu"))


def test_full_finetuned_reward_model_reloads_and_scores(tiny_recipe, pair_data):
    run = unitune.train(_recipe(tiny_recipe, pair_data, {"name": "full"}, steps=2, lr=1e-3))
    assert (run.output / "config.json").is_file()
    model = unitune.load_run_or_model(run.dir).model
    assert type(model).__name__ == "LlamaForSequenceClassification"
    val = [json.loads(line) for line in (pair_data / "val.jsonl").read_text().splitlines()]
    chosen = unitune.score(run.dir, [r["prompt"] for r in val], [r["chosen"] for r in val])
    rejected = unitune.score(run.dir, [r["prompt"] for r in val], [r["rejected"] for r in val])
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(val) == pytest.approx(run.metrics["val_margin"], abs=1e-4)
