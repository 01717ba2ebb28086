"""End to end on the tiny model: train, the run directory, merge, generate, eval, the CLI."""
import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import unitune
from unitune.cli import main
from unitune.generation import generate, stream
from unitune.models import load_model
from unitune.config import ModelConfig, RecipeError
from safetensors.torch import load_file


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
    """Loss is normalised by the tokens of the whole step, so 2 x 2 rows == 1 x 4 rows exactly, and
    both are the gradient of the mean token loss of the 4 rows."""
    from unitune.api import prepare
    from unitune.config import load_recipe
    from unitune.data.packing import collate
    from unitune.data.tokenize import IGNORE

    data = tmp_path / "four.jsonl"
    src = tiny_recipe["data"]["train"]
    data.write_text("".join(open(src).readlines()[:4]))
    # Clipping would rescale any gradient to the same norm and hide a wrongly scaled loss. eps=1 makes
    # AdamW's first step lr·g/(|g|+1) rather than the scale-free lr·sign(g), so the weights show g itself.
    # fp32: CPUs with native bf16 would otherwise autocast.
    base = {**tiny_recipe, "data": {"train": str(data), "packing": False}, "eval": {"before": False, "generate": 0},
            "method": {"name": "full"},
            "train": {**tiny_recipe["train"], "eps": 1.0, "max_grad_norm": None, "precision": "fp32"}}
    one = unitune.train({**base, "train": {**base["train"], "steps": 1, "batch_size": 4, "grad_accum": 1},
                         "output": {**base["output"], "name": "one"}})
    two = unitune.train({**base, "train": {**base["train"], "steps": 1, "batch_size": 2, "grad_accum": 2},
                         "output": {**base["output"], "name": "two"}})
    m1 = AutoModelForCausalLM.from_pretrained(one.output).state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(two.output).state_dict()
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], atol=2e-6, rtol=1e-5)

    # The reference: plain cross-entropy averaged over the loss tokens of all 4 rows at once.
    loaded, built = prepare(load_recipe(base), torch.device("cpu"))
    assert len(built.train) == 4
    batch = collate(built.train, [[i] for i in range(4)], loaded.tokenizer.pad_token_id, packed=False)
    logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
    mean_loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in loaded.model.parameters()])).item()
    for run in (one, two):
        logged = next(r for r in run.history if r["split"] == "train" and r["step"] == 1)
        assert logged["loss"] == pytest.approx(mean_loss.item(), rel=1e-5)
        assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_early_stopping_keeps_the_best_weights(tiny_recipe):
    # Watching for a *rise* in validation loss while it falls: no evaluation improves on the first.
    recipe = {**tiny_recipe, "eval": {"generate": 0},
              "train": {**tiny_recipe["train"], "steps": 30, "eval_every": 1, "early_stopping_patience": 2,
                        "early_stopping_mode": "max"}}
    run = unitune.train(recipe)
    assert max(r["step"] for r in run.history if r["split"] == "train") == 3
    assert (run.dir / "checkpoints" / "step-3" / "trainer.json").is_file()
    assert run.metrics["step"] == 1  # the result is the best evaluation, not the last one
    best = load_file(run.dir / "checkpoints" / "best" / "weights.safetensors")
    last = load_file(run.dir / "checkpoints" / "step-3" / "weights.safetensors")
    saved = load_file(run.output / "adapter_model.safetensors")
    for name, w in best.items():
        peft_key = "base_model.model." + name.replace(".default.", ".")
        torch.testing.assert_close(saved[peft_key], w)
        assert not torch.equal(w, last[name])
    assert "kept the weights of step 1" in (run.dir / "report.md").read_text()


def test_misspelt_early_stopping_metric_is_an_error(tiny_recipe):
    recipe = {**tiny_recipe, "eval": {"generate": 0},
              "train": {**tiny_recipe["train"], "eval_every": 1, "early_stopping_patience": 2,
                        "early_stopping_metric": "val_los"}}
    with pytest.raises(RecipeError, match=r"early_stopping_metric='val_los'.*val_loss"):
        unitune.train(recipe)


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


def test_cli_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    def one_line(code: int, argv: list[str]) -> str:
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("unitune: ") and err.count("\n") == 1, err
        return err

    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    shown = one_line(2, ["train", str(bad)])
    assert shown.startswith("unitune: error: unknown recipe key 'train.stpes': did you mean 'steps'?")
    bad.write_text("train:\n  lr: -1\n  batch_size: 0\n")  # two problems, still one line
    assert "'train.batch_size'" in one_line(2, ["train", str(bad)])
    bad.write_text(f"model:\n  name: {tmp_path / 'nowhere'}\ndata:\n  train: x.jsonl\n")
    assert "not found" in one_line(2, ["train", str(bad)])
    assert "nothing to resume" in one_line(2, ["train", str(bad), "--resume"])

    def fails(error):
        def train(*args, **kwargs):
            raise error
        return train

    monkeypatch.setattr(unitune.api, "train", fails(KeyError("step")))
    assert one_line(1, ["train", str(bad)]) == \
        "unitune: error: KeyError: 'step' (unexpected; --debug shows the traceback)\n"
    for argv in (["--debug", "train", str(bad)], ["train", str(bad), "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and err.endswith("KeyError: 'step'\n")
    monkeypatch.setattr(unitune.api, "train", fails(KeyboardInterrupt()))
    assert one_line(130, ["train", str(bad)]) == "unitune: interrupted\n"


def test_chat_ends_with_one_line_when_generation_fails(tiny_llama, monkeypatch, capsys):
    """generate runs in a thread; its error must reach the CLI rather than leave the reader waiting."""
    from transformers import LlamaForCausalLM

    def broken_generate(self, streamer=None, **kwargs):
        streamer.on_finalized_text("half an ans")
        raise RuntimeError("out of memory")

    said = iter(["Hello"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(said))
    monkeypatch.setattr(LlamaForCausalLM, "generate", broken_generate)
    codes = []
    cli = threading.Thread(target=lambda: codes.append(main(["chat", str(tiny_llama)])), daemon=True)
    cli.start()
    cli.join(timeout=30)
    assert not cli.is_alive(), "unitune chat hung after generate raised"
    out, err = capsys.readouterr()
    assert codes == [1] and "model> half an ans" in out
    assert "Traceback" not in err  # below a progress bar of the weights loading: the one line
    assert err.endswith("\nunitune: error: RuntimeError: out of memory (unexpected; --debug shows the traceback)\n")


def test_stream_stops_generating_when_the_reader_leaves(tiny_llama, monkeypatch):
    """Ctrl-C during a reply: closing the stream ends generation instead of waiting for max_new_tokens."""
    loaded = load_model(ModelConfig(name=str(tiny_llama)))
    steps = []
    loaded.model.register_forward_hook(lambda *_: steps.append(1))
    monkeypatch.setattr("unitune.generation.end_of_turn_ids", lambda tok: [])  # nothing else stops it early
    pieces = stream(loaded.model, loaded.tokenizer, [{"role": "user", "content": "Hi"}], 2000, temperature=0)
    next(pieces)
    pieces.close()
    after_close = len(steps)
    time.sleep(0.3)
    assert len(steps) == after_close < 100


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
                                    {"name": "lora", "target_modules": ["embed_tokens", "q_proj"]},
                                    {"name": "qlora", "target_modules": ["embed_tokens", "q_proj"]},
                                    {"name": "bitfit"}, {"name": "layernorm"}, {"name": "partial", "last_n_blocks": 1}])
def test_every_method_trains_end_to_end(tiny_recipe, tmp_path, method, request):
    recipe = {**tiny_recipe, "method": method, "eval": {"generate": 0}, "train": {**tiny_recipe["train"], "steps": 3}}
    if method["name"] == "bitfit":  # Llama has no biases; GPT-2 does
        recipe["model"] = {"name": str(request.getfixturevalue("tiny_gpt2"))}
    run = unitune.train(recipe)
    assert run.metrics["val_loss"] != run.before["val_loss"]
    assert 0 < run.params["trainable"] < run.params["total"]
    if method["name"] in ("ia3", "lora", "qlora"):
        peft_type = "LORA" if method["name"] == "qlora" else method["name"].upper()
        assert json.loads((run.output / "adapter_config.json").read_text())["peft_type"] == peft_type
        tuned = unitune.load_run_or_model(run.dir).model.eval()
        merged = unitune.merge(run.dir, tmp_path / "merged")
        x = torch.randint(3, 300, (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(x).logits, tuned(x).logits,
                                       atol=1e-5, rtol=1e-5)
    else:
        assert (run.output / "config.json").is_file()
