"""Mitigations of forgetting: L2-SP (train.l2_sp), KL to the base (objective.kl_to_base), replay (data.replay)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import unitune
from unitune.config import RecipeError, load_recipe
from unitune.data import replay
from unitune.data.tokenize import IGNORE
from unitune.engine.anchor import Anchor
from unitune.methods import reference
from unitune.objectives import sft


def _with(recipe: dict, **sections) -> dict:
    """The recipe with these sections' keys changed (a method named anew replaces the section)."""
    return {**recipe, **{k: v if k == "method" else {**recipe.get(k, {}), **v} for k, v in sections.items()}}


# ---------------------------------------------------------------------------------------------- L2-SP


def test_the_pull_is_the_gradient_of_the_penalty_and_skips_the_head():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    anchor = Anchor(model, alpha=0.3, skip=["1"])  # "1": the head, new, with no pretrained value to keep
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 4)
    model(x).square().sum().backward()
    drift = anchor.pull()
    pulled = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    body = [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
    penalty = 0.3 / 2 * sum((p - start[n]).square().sum() for n, p in body)
    (model(x).square().sum() + penalty).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(pulled[n], p.grad)
    assert drift == pytest.approx(sum((p - start[n]).square().sum() for n, p in body).sqrt().item(), rel=1e-5)


def test_l2_sp_keeps_the_weights_nearer_their_start_and_resumes_exactly(tiny_recipe, train_crashing_at):
    recipe = _with(tiny_recipe, method={"name": "full"}, train={"steps": 6, "save_every": 2, "lr": 3e-3},
                   eval={"before": False, "generate": 0})
    free = unitune.train(_with(recipe, train={"l2_sp": 1e-9}, output={"name": "free"}))
    held = unitune.train(_with(recipe, train={"l2_sp": 30.0}, output={"name": "held"}))
    drift = lambda run: [r["drift"] for r in run.history if r["split"] == "train"]  # noqa: E731
    assert drift(held)[-1] < 0.8 * drift(free)[-1]
    assert drift(free)[0] == 0 and drift(free)[1] > 0  # measured before each step's update

    crashed = _with(recipe, train={"l2_sp": 30.0}, output={"name": "crashed"})
    train_crashing_at(crashed, 4)
    resumed = unitune.train(crashed, resume=True)  # the anchor is the loaded model's, not the checkpoint's
    a, b = load_file(held.output / "model.safetensors"), load_file(resumed.output / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ KL to base


def test_kl_to_base_is_the_vocabulary_kl_at_the_loss_tokens(tiny_recipe, kept):
    """After training, the objective's KL equals KL(base || tuned) from the two models' full logits."""
    run = unitune.train(_with(tiny_recipe, train={"steps": 3, "precision": "fp32"}, eval={"generate": 0},
                              objective={"name": "sft", "kl_to_base": 0.5}))
    model = kept["loaded"].model.eval()
    ids = torch.randint(3, 100, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, :5] = IGNORE  # a prompt: no loss there
    batch = {"input_ids": ids, "targets": targets, "attention_mask": torch.ones_like(ids), "real_tokens": 24}
    ref = reference(model, run.recipe.method)
    with torch.no_grad():
        _, info = sft.loss(model, batch, sft.Config(kl_to_base=0.5), ref)
        tuned = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        with ref() as base:
            before = F.log_softmax(base(input_ids=ids).logits.float(), -1)
    keep = targets != IGNORE
    expected = F.kl_div(tuned[keep], before[keep], log_target=True, reduction="sum")
    assert expected > 1e-4  # the adapters changed something
    torch.testing.assert_close(info["kl_to_base"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kl_to_base_holds_the_model_to_its_base(tiny_recipe, method):
    recipe = _with(tiny_recipe, method={"name": method}, train={"steps": 6, "lr": 1e-2 if method == "lora" else 2e-3},
                   eval={"generate": 0})
    free = unitune.train(_with(recipe, objective={"name": "sft", "kl_to_base": 1e-9}, output={"name": "free"}))
    held = unitune.train(_with(recipe, objective={"name": "sft", "kl_to_base": 50.0}, output={"name": "held"}))
    assert free.before["val_kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # the untrained model is the base
    assert held.metrics["val_kl_to_base"] < 0.7 * free.metrics["val_kl_to_base"]
    # evaluation reports the task's cross-entropy as val_loss, the KL beside it
    assert held.metrics["val_loss"] == pytest.approx(held.metrics["val_ce"], rel=1e-6)
    train = [r for r in held.history if r["split"] == "train"][-1]
    assert train["loss"] == pytest.approx(train["ce"] + 50.0 * train["kl_to_base"], rel=1e-4)


# --------------------------------------------------------------------------------------------- replay


def test_replay_mixes_in_the_base_models_own_answers(tiny_recipe, tokenizer, tmp_path, monkeypatch):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a colour."},  # answered by the base model
        {"instruction": "Say hi.", "output": "Hi!"},  # answered already: kept as written
        {"messages": [{"role": "user", "content": "Count to three."}]},  # a conversation left to answer
        {"instruction": "Ramble."},  # its answer runs to the limit: left out, not cut
    ]) + "\n")
    asked = []

    def base_answers(model, tok, conversations, max_new_tokens, **kw):
        # the base model answers: its adapters are off while it does
        asked.append((conversations, [m.active is None for m in model.modules() if hasattr(m, "merged")]))
        return ["Blue.", "1, 2, 3.", "word " * max_new_tokens]

    monkeypatch.setattr(replay, "generate", base_answers)
    recipe = _with(tiny_recipe, data={"replay": 0.2, "replay_from": str(pool), "system_prompt": "Be brief."},
                   train={"steps": 2}, eval={"generate": 0})
    run = unitune.train(recipe)
    [(conversations, disabled)] = asked
    assert conversations == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
                             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}],
                             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ramble."}]]
    assert disabled and all(disabled)
    rows = [json.loads(line) for line in (run.dir / "replay.jsonl").read_text().splitlines()]
    assert rows == [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "Say hi.", "output": "Hi!"},
                    {"messages": [{"role": "user", "content": "Count to three."},
                                  {"role": "assistant", "content": "1, 2, 3."}]}]
    n_train = run.stats["train_examples"]
    assert run.stats["replay_examples"] == round(0.2 / 0.8 * n_train) and run.stats["replay_pool"] == 3

    # a resumed run reads the answers its start kept; the base is not asked again
    monkeypatch.setattr(replay, "generate", lambda *a, **k: pytest.fail("replay answered twice"))
    again = replay.examples(run.recipe, tokenizer, None, sft.example, n_train, run.dir, {})
    assert len(again) == run.stats["replay_examples"]


def test_replay_draws_every_pool_example_before_repeating_one(tiny_recipe, tokenizer, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    recipe = load_recipe(_with(tiny_recipe, data={"replay": 0.5, "replay_from": str(pool)}))
    stats: dict = {}
    drawn = replay.examples(recipe, tokenizer, None, sft.example, 12, tmp_path, stats)
    assert len(drawn) == 12 and stats == {"replay_examples": 12, "replay_pool": 5}
    ids = [tuple(e.input_ids) for e in drawn]
    assert len(set(ids[:5])) == 5 and len(set(ids[5:10])) == 5


def test_the_built_in_pool_is_disjoint_from_the_retention_set():
    from unitune.tasks import chat, retention

    measured = {r["instruction"].removesuffix(" Answer in one word.") for r in retention.rows()}
    assert len(chat.prompts()) >= 60 and not measured & set(chat.prompts())


def test_replay_refusals(tiny_recipe):
    with pytest.raises(RecipeError, match="measure memory"):
        load_recipe(_with(tiny_recipe, data={"replay": 0.1, "replay_from": "general"}, eval={"retention": ["general"]}))
    with pytest.raises(RecipeError, match="data.replay"):
        load_recipe(_with(tiny_recipe, data={"replay": 0.1}, objective={"name": "dpo"}))
    with pytest.raises(RecipeError, match="data.replay"):
        load_recipe(_with(tiny_recipe, data={"replay": 1.0}))
