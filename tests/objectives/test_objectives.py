"""The objective seam: every preference objective trains through the same loop, with the reference
the method gives, normalised by what the objective counts."""
import math

import pytest
import torch
from safetensors.torch import load_file

import unitune
from unitune.config import DataConfig
from unitune.data import build_data
from unitune.methods import apply_method, method_config, reference
from unitune.models import load_model
from unitune.config import ModelConfig
from unitune.objectives import OBJECTIVES, dpo, logprobs, pairs
from unitune.tasks import orders


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return orders.write_preferences(tmp_path_factory.mktemp("pairs"), n_train=16, n_val=8)


@pytest.fixture(scope="module")
def feedback_data(tmp_path_factory):
    return orders.write_feedback(tmp_path_factory.mktemp("feedback"), n_train=16, n_val=8)


def _recipe(tiny_recipe, data, objective, **train):
    return {**tiny_recipe, "objective": objective,
            "data": {"train": str(data / "train.jsonl"), "validation": str(data / "val.jsonl"), "max_length": 256},
            "train": {**tiny_recipe["train"], "steps": 4, "batch_size": 4, "eval_every": 2, **train},
            "eval": {"generate": 2, "max_new_tokens": 4, "batch_size": 4}}


@pytest.mark.parametrize("objective", [{"name": "dpo"}, {"name": "dpo", "loss_type": "ipo", "rpo_alpha": 1.0},
                                       {"name": "simpo"}, {"name": "orpo"}])
def test_pair_objectives_train_through_the_one_loop(tiny_recipe, pair_data, objective):
    run = unitune.train(_recipe(tiny_recipe, pair_data, objective))
    train = [r for r in run.history if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= train[0].keys()
    assert run.metrics["val_rewards/margins"] != run.before["val_rewards/margins"]
    assert "exact_match" in run.metrics  # the chosen answer is the reference for generation
    if objective["name"] == "dpo":  # at step 0 the policy is the reference: rewards 0, sigmoid loss log 2
        assert run.before["val_rewards/chosen"] == 0 and run.before["val_rewards/margins"] == 0
        if objective.get("loss_type", "sigmoid") == "sigmoid":
            assert run.before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (run.output / "adapter_model.safetensors").is_file()


def test_kto_trains_on_unpaired_feedback(tiny_recipe, feedback_data):
    run = unitune.train(_recipe(tiny_recipe, feedback_data, {"name": "kto"}))
    assert run.before["val_rewards/chosen"] == 0  # policy == reference before training
    assert run.before["val_loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every example
    assert run.metrics["val_loss"] != run.before["val_loss"]
    with pytest.raises(ValueError, match="batch_size"):
        unitune.train(_recipe(tiny_recipe, feedback_data, {"name": "kto"}, batch_size=1))


def test_sequence_logps_equal_the_full_softmax(tiny_llama, pair_data, tokenizer):
    model = load_model(ModelConfig(name=str(tiny_llama)), "cpu").model.eval()
    data = build_data(DataConfig(train=str(pair_data / "train.jsonl"), max_length=256), tokenizer, 0, pairs.example)
    batch = pairs.collate(data.train, [[0, 1, 2]], tokenizer.pad_token_id, False)
    with torch.no_grad():
        sums, n = logprobs.sequence_logps(model, batch, chunk=7)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    keep = batch["targets"] != -100
    picked = full.gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0] * keep
    torch.testing.assert_close(sums, picked.sum(1), atol=1e-5, rtol=1e-5)
    assert n.tolist() == keep.sum(1).tolist()
    assert batch["pairs"] == 3 and len(sums) == 6
    # The SFT term of RPO/CPO/ORPO: TRL's cross-entropy mean over the chosen rows' completion tokens, per pair.
    chosen, _, n_chosen, _ = pairs.logps(model, batch, chunk=7)
    ce = torch.nn.functional.cross_entropy(full[:3].reshape(-1, full.shape[-1]), batch["targets"][:3].reshape(-1))
    torch.testing.assert_close(pairs.chosen_nll(chosen, n_chosen) / 3, ce, atol=1e-5, rtol=1e-5)


def test_kto_mismatched_rows_are_cut_to_max_length_in_the_runs_batches():
    """A KL row joins one row's prompt with another's completion, so it can outgrow data.max_length; the
    engine's batches hand max_length to the collator, which cuts it as TRL does (keeping its start)."""
    from unitune.data import Batches
    from unitune.data.preference import UnpairedExample
    from unitune.objectives import kto

    examples = [UnpairedExample(list(range(10, 20)), [5, 6], True, "a"), UnpairedExample([7, 8], list(range(30, 40)),
                                                                                         False, "b")]
    batch = Batches(examples, 2, False, 12, 0, 0, kto.collate).next()
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch["kl_input_ids"], batch["kl_attention_mask"])}
    assert rows == {(*range(10, 20), 30, 31), (7, 8, 5, 6)}  # row a: its prompt + b's completion, cut to 12


def test_reference_is_the_base_without_a_second_copy_or_a_frozen_copy(tiny_llama, pair_data, tokenizer):
    x = torch.randint(3, 300, (1, 9))
    for name, shares in (("lora", True), ("full", False)):
        model = load_model(ModelConfig(name=str(tiny_llama)), "cpu").model
        with torch.no_grad():
            base = model.eval()(x).logits
        model = apply_method(model, method_config({"name": name, **({"r": 4} if name == "lora" else {})}))
        ref = reference(model, method_config({"name": name}))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)  # training moved the policy
            with ref() as r:
                assert (r is model) == shares
                torch.testing.assert_close(r(x).logits, base)
            assert not torch.allclose(model(x).logits, base)


def test_accumulated_pairs_equal_one_large_batch(tiny_recipe, pair_data):
    """count() = pairs: 2 micro-batches of 2 pairs give the gradient of one batch of 4."""
    base = {**_recipe(tiny_recipe, pair_data, {"name": "dpo", "beta": 1.0}), "method": {"name": "lora", "r": 4},
            "eval": {"before": False, "generate": 0}}
    base["data"].pop("validation")
    base["data"]["max_examples"] = 4  # one batch of 4, or the same 4 in two: the same pairs either way
    runs = []
    for name, bs, acc in (("one", 4, 1), ("two", 2, 2)):
        runs.append(unitune.train({**base, "train": {**base["train"], "steps": 1, "batch_size": bs, "grad_accum": acc,
                                                     "eps": 1.0, "max_grad_norm": None, "precision": "fp32",
                                                     "eval_every": None},
                                   "output": {**base["output"], "name": name}}))
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    for run in runs:  # the mean over pairs: at the first step the policy is the reference, each pair log 2
        assert run.history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}])
def test_precomputed_reference_gives_the_same_run_with_two_passes_a_step(tiny_recipe, pair_data, method, monkeypatch):
    """objective.precompute_ref: the same losses, rewards and weights as the reference computed at each
    step; the reference never runs inside the loop; only the pairs the steps use are computed; under
    full fine-tuning no frozen copy is made."""
    from unitune import api
    from unitune.engine import precompute

    runs, computed, copies = {}, {}, []
    real_precompute, real_reference = precompute.precompute, api.reference
    monkeypatch.setattr(api, "reference", lambda model, cfg, untrained=False: copies.append(untrained) or
                        real_reference(model, cfg, untrained))

    def counting(objective, cfg, ref, examples, indices, *args):
        computed[args[-1]] = len(indices)
        return real_precompute(objective, cfg, ref, examples, indices, *args)

    monkeypatch.setattr(precompute, "precompute", counting)
    for pre in (False, True):
        recipe = _recipe(tiny_recipe, pair_data, {"name": "dpo", "precompute_ref": pre}, steps=3, batch_size=2,
                         precision="fp32", eval_every=None)
        recipe.update(method=method, eval={"generate": 0, "batch_size": 3}, output={**recipe["output"], "name": str(pre)})
        runs[pre] = unitune.train(recipe)
    assert computed == {"reference log-probs (train)": 6, "reference log-probs (val)": 8}  # 3 steps of 2 of 16
    assert copies == [False, True]  # the run without: its reference; with: only the untrained model
    a, b = ([r for r in runs[k].history if r["split"] == "train"] for k in (False, True))
    for x, y in zip(a, b):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), k
    assert runs[True].metrics["val_rewards/margins"] == pytest.approx(runs[False].metrics["val_rewards/margins"], abs=1e-5)
    assert runs[True].before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_every_objective_is_a_module_with_the_contract():
    for name, module in OBJECTIVES.items():
        assert module.Config().name == name
        for attr in ("example", "collate", "count", "loss", "PACKS"):
            assert hasattr(module, attr), f"{name} lacks {attr}"
    assert dpo.NEEDS_REF and not hasattr(OBJECTIVES["simpo"], "NEEDS_REF")
