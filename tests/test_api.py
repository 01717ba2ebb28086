"""End to end on the tiny model: train, the run directory, merge, generate, eval, the CLI."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import unitune
from unitune.cli import main
from unitune.generation import generate, stream
from unitune.models import load_model
from unitune.config import ModelConfig


def test_train_writes_a_complete_run(tiny_recipe):
    run = unitune.train(tiny_recipe)
    for name in ("recipe.yaml", "metrics.jsonl", "loss.png", "report.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"):
        assert (run.dir / name).is_file(), name
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in train)
    assert run.before["step"] == 0 and run.metrics["step"] == 6
    assert run.metrics["val_loss"] < run.before["val_loss"]  # it learned something
    assert {"exact_match", "contains_match", "val_ppl"} <= run.metrics.keys()
    assert "| val_loss |" in (run.dir / "report.md").read_text()
    again = unitune.train(tiny_recipe)  # never overwrites an earlier run
    assert again.dir.name == "tiny-2"


def test_full_finetune_and_lr_schedule(tiny_recipe):
    run = unitune.train({**tiny_recipe, "method": {"name": "full"}, "eval": {"generate": 0},
                         "train": {**tiny_recipe["train"], "schedule": "linear", "lr": 1e-3}})
    assert (run.dir / "model" / "config.json").is_file()
    assert run.params["trainable"] == run.params["total"]
    lrs = [r["lr"] for r in run.history if r["split"] == "train"]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) <= 1e-3


def test_grad_accumulation_equals_one_large_batch(tiny_recipe, tmp_path):
    """Loss is normalised by the tokens of the whole step, so 2 x 2 rows == 1 x 4 rows exactly."""
    data = tmp_path / "four.jsonl"
    src = tiny_recipe["data"]["train"]
    data.write_text("".join(open(src).readlines()[:4]))
    # eps=1 makes AdamW's first step linear in the gradient (lr·g/(|g|+1)), so the weights compare
    # the gradients themselves rather than the sign of near-zero ones.
    base = {**tiny_recipe, "data": {"train": str(data), "packing": False}, "eval": {"before": False, "generate": 0},
            "method": {"name": "full"}, "train": {**tiny_recipe["train"], "eps": 1.0}}
    one = unitune.train({**base, "train": {**base["train"], "steps": 1, "batch_size": 4, "grad_accum": 1},
                         "output": {**base["output"], "name": "one"}})
    two = unitune.train({**base, "train": {**base["train"], "steps": 1, "batch_size": 2, "grad_accum": 2},
                         "output": {**base["output"], "name": "two"}})
    m1 = AutoModelForCausalLM.from_pretrained(one.output).state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(two.output).state_dict()
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], atol=2e-6, rtol=1e-5)


def test_early_stopping(tiny_recipe):
    # Watching for a *rise* in validation loss while it falls: no evaluation improves on the first.
    recipe = {**tiny_recipe, "eval": {"generate": 0},
              "train": {**tiny_recipe["train"], "steps": 30, "eval_every": 1, "early_stopping_patience": 2,
                        "early_stopping_mode": "max"}}
    run = unitune.train(recipe)
    assert run.metrics["step"] == 3
    assert (run.dir / "checkpoints" / "step-3" / "trainer.json").is_file()
    assert max(r["step"] for r in run.history if r["split"] == "train") == 3


def test_merge_generate_and_eval_cli(tiny_recipe, tmp_path, capsys):
    run = unitune.train(tiny_recipe)
    tuned = unitune.load_run_or_model(run.dir)
    assert main(["merge", str(run.dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, tuned.model.eval()(x).logits, atol=1e-5, rtol=1e-5)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert main(["generate", str(run.dir), str(prompts), "-o", str(tmp_path / "out.jsonl"), "--max-new-tokens", "5"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2 and out[0]["prompt"] == "Hello" and isinstance(out[1]["generation"], str)

    recipe_file = run.dir / "recipe.yaml"
    assert main(["eval", str(recipe_file), "--run", str(run.dir)]) == 0
    shown = capsys.readouterr().out
    assert '"tuned"' in shown and "| val_loss |" in shown


def test_generation_batched_equals_one_by_one_and_streams(tiny_llama):
    loaded = load_model(ModelConfig(name=str(tiny_llama)))
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is two plus two? Tell me."}]]
    batched = generate(loaded.model, loaded.tokenizer, convs, max_new_tokens=6)
    single = [generate(loaded.model, loaded.tokenizer, [c], max_new_tokens=6)[0] for c in convs]
    assert batched == single
    assert "".join(stream(loaded.model, loaded.tokenizer, convs[1], 6, temperature=0)).strip() == batched[1]


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    assert main(["train", str(bad)]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    bad.write_text(f"model:\n  name: {tmp_path / 'nowhere'}\ndata:\n  train: x.jsonl\n")
    assert main(["train", str(bad)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", str(bad), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_gradient_checkpointing_changes_memory_not_results(tiny_recipe):
    base = {**tiny_recipe, "eval": {"before": False, "generate": 0}, "train": {**tiny_recipe["train"], "steps": 2}}
    plain = unitune.train(base)
    ckpt = unitune.train({**base, "train": {**base["train"], "gradient_checkpointing": True}})
    from safetensors.torch import load_file

    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (plain, ckpt))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_chat_streams_replies(tiny_llama, monkeypatch, capsys):
    said = iter(["Hello there", "/reset", "Again"])

    def fake_input(prompt=""):
        try:
            return next(said)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(tiny_llama), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


@pytest.mark.parametrize("method", [{"name": "ia3"}, {"name": "lora", "dora": True, "loraplus_lr_ratio": 4},
                                    {"name": "bitfit"}, {"name": "layernorm"}, {"name": "partial", "last_n_blocks": 1}])
def test_every_method_trains_end_to_end(tiny_recipe, tmp_path, method, request):
    recipe = {**tiny_recipe, "method": method, "eval": {"generate": 0}, "train": {**tiny_recipe["train"], "steps": 3}}
    if method["name"] == "bitfit":  # Llama has no biases; GPT-2 does
        recipe["model"] = {"name": str(request.getfixturevalue("tiny_gpt2"))}
    run = unitune.train(recipe)
    assert run.metrics["val_loss"] != run.before["val_loss"]
    assert 0 < run.params["trainable"] < run.params["total"]
    if method["name"] in ("ia3", "lora"):
        assert json.loads((run.output / "adapter_config.json").read_text())["peft_type"] == method["name"].upper()
        tuned = unitune.load_run_or_model(run.dir).model.eval()
        merged = unitune.merge(run.dir, tmp_path / "merged")
        x = torch.randint(3, 300, (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(x).logits, tuned(x).logits,
                                       atol=1e-5, rtol=1e-5)
    else:
        assert (run.output / "config.json").is_file()
