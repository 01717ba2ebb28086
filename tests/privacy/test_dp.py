"""DP-SGD: each example's gradient clipped and summed as Opacus computes it (PEFT LoRA under Opacus's
per-sample hooks as the reference), noise and accounting, Poisson sampling, exact resume, and the refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch

import unitune
from unitune.config import RecipeError


def _private(tiny_recipe, name="dp", **privacy):
    return {**tiny_recipe, "method": {**tiny_recipe["method"], "dropout": 0.0},
            "train": {**tiny_recipe["train"], "steps": 6, "batch_size": 4, "save_every": 2},
            "eval": {"before": False, "generate": 0},
            "output": {**tiny_recipe["output"], "name": name},
            "privacy": {"noise_multiplier": 1.0, **privacy}}


def _log(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_a_private_run_logs_the_epsilon_it_spends_and_the_report_states_it(tiny_recipe):
    run = unitune.train(_private(tiny_recipe))
    log = _log(run.dir)
    eps = [r["epsilon"] for r in log]
    assert len(eps) == 6 and all(b > a > 0 for a, b in zip(eps, eps[1:]))  # spent step by step
    assert all(0 <= r["clipped"] <= 1 for r in log)
    assert "epsilon" in (run.dir / "report.md").read_text()


def _examples(tokenizer, orders_data, n):
    from unitune.config import DataConfig
    from unitune.data import build_data
    from unitune.objectives import sft

    return build_data(DataConfig(train=str(orders_data / "train.jsonl"), max_length=256), tokenizer, 0,
                      sft.example).train[:n]


def test_clipped_summed_gradients_equal_opacus_per_sample_gradients_of_peft_lora(tiny_llama, tokenizer, orders_data,
                                                                                 tmp_path):
    """The reference: the same LoRA adapter loaded by PEFT, whose lora_A/lora_B are modules Opacus's hooks
    see; Opacus's DPOptimizer clips its per-sample gradients and sums them (noise 0)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from unitune.config import PrivacyConfig
    from unitune.data.packing import IGNORE
    from unitune.methods import io, lora, method_config
    from unitune.objectives import sft
    from unitune.privacy import dp

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)  # noqa: E731
    cfg = method_config({"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0})
    ours = lora.apply(load(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero, which leaves A without gradient: values that show
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    io.save_adapter(ours, tmp_path / "adapter", cfg, str(tiny_llama))
    theirs = PeftModel.from_pretrained(load(), tmp_path / "adapter", is_trainable=True)

    examples = _examples(tokenizer, orders_data, 6)
    source = dp.PoissonBatches(examples, 4, tokenizer.pad_token_id, 256, 0, sft.collate)  # expected batch 4
    batch = {"examples": [sft.collate(examples, [[i]], tokenizer.pad_token_id, False, 256) for i in range(6)]}
    params = [p for p in ours.parameters() if p.requires_grad]

    # the clipping norm: between the examples' gradient norms, so some are clipped and some are not
    norms = []
    for ex in batch["examples"]:
        loss_sum, _ = sft.loss(ours, ex, sft.Config(), None)
        grads = torch.autograd.grad(loss_sum / sft.count(ex), params)
        norms.append(torch.sqrt(sum((x ** 2).sum() for x in grads)).item())
    C = sorted(norms)[3]
    private = dp.DPSGD(PrivacyConfig(noise_multiplier=0.0, max_grad_norm=C), source, steps=1)
    mean, _, units, clipped = private.step(params, batch, lambda ex: sft.loss(ours, ex, sft.Config(), None),
                                           sft.count, pytest.fail)
    assert clipped == pytest.approx(2 / 6) and units == sum(sft.count(ex) for ex in batch["examples"])

    gsm = GradSampleModule(theirs, loss_reduction="mean")  # Opacus's standard set-up: the batch's mean loss
    trainable = {n.removeprefix("_module.base_model.model."): p for n, p in gsm.named_parameters() if p.requires_grad}
    opt = DPOptimizer(torch.optim.SGD(list(trainable.values()), lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=4, loss_reduction="mean")
    padded = sft.collate(examples, [[i] for i in range(6)], tokenizer.pad_token_id, False, 256)
    logits = gsm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    keep = padded["targets"] != IGNORE
    nll = -logp.gather(-1, padded["targets"].clamp(min=0)[..., None])[..., 0] * keep
    per_example = nll.sum(1) / keep.sum(1)
    assert mean == pytest.approx(per_example.mean().item(), rel=1e-5)
    per_example.mean().backward()
    opt.pre_step()

    ours_named = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_named.keys() == trainable.keys()  # exactly the trainable parameters, every LoRA factor
    for name, p in trainable.items():
        torch.testing.assert_close(ours_named[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_poisson_batches_draw_each_example_independently_and_replay_from_the_cursor(tokenizer, orders_data):
    from unitune.objectives import sft
    from unitune.privacy import dp

    examples = _examples(tokenizer, orders_data, 80)
    source = dp.PoissonBatches(examples, 8, tokenizer.pad_token_id, 256, 0, sft.collate)
    assert source.q == pytest.approx(0.1) and len(source) == 10
    sizes = [len(source.next()["examples"]) for _ in range(400)]
    assert len(set(sizes)) > 5  # a random size, not a fixed batch
    assert sum(sizes) / len(sizes) == pytest.approx(8, rel=0.1)  # q * N on average
    source.cursor = 17  # a resumed run draws what the uninterrupted one drew at that step
    again = source.next()["examples"]
    fresh = dp.PoissonBatches(examples, 8, tokenizer.pad_token_id, 256, 0, sft.collate)
    for _ in range(17):
        fresh.next()
    assert [e["input_ids"].tolist() for e in fresh.next()["examples"]] == [e["input_ids"].tolist() for e in again]
    assert all(e["input_ids"].shape[0] == 1 and e["attention_mask"].all() for e in again)  # alone: no padding


def test_noise_has_the_std_sigma_times_clip_over_the_expected_batch(tiny_llama, tokenizer, orders_data):
    from transformers import AutoModelForCausalLM

    from unitune.config import PrivacyConfig
    from unitune.methods import lora, method_config
    from unitune.objectives import sft
    from unitune.privacy import dp

    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_llama),
                       method_config({"name": "lora", "r": 8, "target_modules": "all-linear", "dropout": 0.0}))
    params = [p for p in model.parameters() if p.requires_grad]
    examples = _examples(tokenizer, orders_data, 20)
    source = dp.PoissonBatches(examples, 5, tokenizer.pad_token_id, 256, 0, sft.collate)
    batch = source.next()
    grads = {}
    for sigma in (0.0, 2.0):
        private = dp.DPSGD(PrivacyConfig(noise_multiplier=sigma, max_grad_norm=0.5), source, steps=10)
        private.step(params, batch, lambda ex: sft.loss(model, ex, sft.Config(), None), sft.count, pytest.fail)
        grads[sigma] = torch.cat([p.grad.flatten() for p in params])
    noise = grads[2.0] - grads[0.0]
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.05)  # sigma * C / (q * N)
    assert abs(noise.mean().item()) < 0.05 * noise.std().item()


def test_a_target_epsilon_sets_the_noise_that_spends_it(tiny_recipe):
    run = unitune.train(_private(tiny_recipe, "target", noise_multiplier=None, target_epsilon=3.0, accountant="rdp"))
    spent = _log(run.dir)[-1]["epsilon"]
    assert 2.9 < spent <= 3.0
    assert f"spent: epsilon {spent:.3f}" in (run.dir / "report.md").read_text()


def test_a_killed_private_run_resumes_exactly_with_the_privacy_it_spent(tiny_recipe, train_crashing_at):
    straight = unitune.train(_private(tiny_recipe, "straight"))
    recipe = _private(tiny_recipe, "crashed")
    train_crashing_at(recipe, 4)
    resumed = unitune.train(recipe, resume=True)
    a, b = _log(straight.dir), _log(resumed.dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):  # the same draws, the same noise, the same epsilon
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["epsilon"] == pytest.approx(x["epsilon"])


def test_settings_that_would_break_the_guarantee_are_refused(tiny_recipe):
    from types import SimpleNamespace

    from unitune.config import load_recipe
    from unitune.objectives import sft
    from unitune.privacy import dp

    with pytest.raises(RecipeError, match="data.packing puts several examples in one row"):
        unitune.train({**_private(tiny_recipe), "data": {**tiny_recipe["data"], "packing": True}})
    with pytest.raises(RecipeError, match="train.grad_accum would clip the accumulated gradient"):
        unitune.train({**_private(tiny_recipe), "train": {**tiny_recipe["train"], "grad_accum": 2}})
    recipe = load_recipe(_private(tiny_recipe))
    with pytest.raises(RecipeError, match="batch norms"):
        dp.check(recipe, torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), sft, 1)
    with pytest.raises(RecipeError, match="one process"):
        dp.check(recipe, torch.nn.Linear(2, 2), sft, 2)
    with pytest.raises(RecipeError, match="generates its own batches"):
        dp.check(recipe, torch.nn.Linear(2, 2), SimpleNamespace(source=None), 1)
    # a run trained without privacy cannot be continued as a private one: its spending is unknown
    plain = {**_private(tiny_recipe, "plain"), "privacy": {}}
    unitune.train(plain)
    with pytest.raises(RecipeError, match="holds no privacy accountant state"):
        unitune.train(_private(tiny_recipe, "plain"), resume=True, force=True)
