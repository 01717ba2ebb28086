"""Tiny random models and tokenizers built from configs: the whole suite runs offline in minutes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import unitune.api
from unitune.models.loader import CHATML_TEMPLATE
from unitune.tasks import orders

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True, scope="session")
def _own_data_cache(tmp_path_factory):
    """The suite's tokenized-data cache lives in a temp dir, not the user's ~/.cache (data/cache.py)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UNITUNE_CACHE", str(tmp_path_factory.mktemp("unitune-cache")))
    yield
    mp.undo()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a second on the quickstart task's text."""
    corpus = [json.dumps(orders.make_row(__import__("random").Random(i), i % 2 == 0)) for i in range(400)]
    corpus += ["user assistant system Hello, how are you? I am fine. What is two plus two? Four."] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return _save(LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=512,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(cfg), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def orders_data(tmp_path_factory) -> Path:
    return orders.write(tmp_path_factory.mktemp("orders"), n_train=96, n_val=16)


@pytest.fixture
def tiny_recipe(tiny_llama, orders_data, tmp_path) -> dict:
    """A complete recipe dict for a few-second LoRA run on the tiny model."""
    return {
        "model": {"name": str(tiny_llama)},
        "data": {"train": str(orders_data / "train.jsonl"), "validation": str(orders_data / "val.jsonl"),
                 "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "seed": 3},
        "eval": {"generate": 4, "max_new_tokens": 8, "batch_size": 4},
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
    }


class Crash(Exception):
    """A kill, simulated: raised where a checkpoint of the step named would be written."""


@pytest.fixture
def train_crashing_at(monkeypatch):
    """train_crashing_at(recipe, step): unitune.train that dies instead of saving the checkpoint of `step`
    (the steps since the last checkpoint are logged, their checkpoint never written); save works again after."""
    import unitune
    from unitune.engine import checkpoint

    real_save = checkpoint.save

    def crashing(recipe: dict, step: int) -> None:
        def save(ckpt_dir, at, *args, **kwargs):
            if at == step:
                raise Crash(f"killed before saving step {step}")
            return real_save(ckpt_dir, at, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save", save)
        try:
            with pytest.raises(Crash):
                unitune.train(recipe)
        finally:
            monkeypatch.setattr(checkpoint, "save", real_save)

    return crashing


@pytest.fixture
def kept(monkeypatch) -> dict:
    """The trained model as it is in memory when the run saves it: kept["loaded"]."""
    found: dict = {}
    real = unitune.api.save_output

    def save_output(run, loaded):
        found["loaded"] = loaded
        return real(run, loaded)

    monkeypatch.setattr(unitune.api, "save_output", save_output)
    return found
