import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from unitune import api
from unitune.config import DataConfig, load_recipe
from unitune.data import Batches, build_data
from unitune.data.packing import collate, packs_exactly
from unitune.data.tokenize import IGNORE
from unitune.objectives import sft


def test_packed_rows_match_separate_sequences(tiny_llama, orders_data, tokenizer):
    """No attention across example boundaries: a packed row gives each example its own logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    data = build_data(DataConfig(train=str(orders_data / "train.jsonl")), tokenizer, 0, sft.example)
    exs = data.train[:3]
    packed = collate(exs, [[0, 1, 2]], tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers ignores the packing in position_ids.
        joint = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(joint[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    # Targets never reach from one example into the next.
    ends = torch.tensor([len(e.input_ids) for e in exs]).cumsum(0) - 1
    assert (packed["targets"][0, ends] == IGNORE).all()


def test_batches_pack_rows_and_resume_at_cursor(orders_data, tokenizer):
    data = build_data(DataConfig(train=str(orders_data / "train.jsonl")), tokenizer, 0, sft.example)
    a = Batches(data.train, 2, True, 256, tokenizer.pad_token_id, seed=7, collate=sft.collate)
    first = [a.next() for _ in range(len(a) + 3)]  # crosses an epoch boundary
    assert all(b["input_ids"].shape[1] <= 256 for b in first)
    rows = sum(len(r) for batch in a.plan(0) for r in batch)
    assert rows == len(data.train)  # every example exactly once per epoch
    assert len(a) < len(data.train) / 2  # several examples share a row
    b = Batches(data.train, 2, True, 256, tokenizer.pad_token_id, seed=7, collate=sft.collate)
    b.cursor = 5
    assert torch.equal(b.next()["input_ids"], first[5]["input_ids"])


def test_padded_batches_group_lengths(orders_data, tokenizer):
    data = build_data(DataConfig(train=str(orders_data / "train.jsonl"), packing=False), tokenizer, 0, sft.example)
    batches = Batches(data.train, 4, False, 256, tokenizer.pad_token_id, seed=0, collate=sft.collate)
    batch = batches.next()
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    pad = batch["attention_mask"] == 0
    assert (batch["targets"][pad] == IGNORE).all()
    waste = pad.sum().item() / pad.numel()
    assert waste < 0.3  # length grouping keeps padding small


def tiny_mamba(tokenizer) -> MambaForCausalLM:
    """A state-space model: its recurrence carries every token into the next, whatever the mask."""
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4,
                                        pad_token_id=tokenizer.pad_token_id))


def test_packs_exactly_tells_which_models_pack(tiny_llama, tokenizer):
    assert packs_exactly(AutoModelForCausalLM.from_pretrained(tiny_llama)) is True
    mamba = tiny_mamba(tokenizer).train()
    assert "change with the example packed before it" in packs_exactly(mamba)
    assert mamba.training  # the probe ran in eval mode and gave the mode back


def test_a_model_that_cannot_pack_trains_on_padded_batches(tiny_llama, orders_data, tokenizer, capsys):
    data = build_data(DataConfig(train=str(orders_data / "train.jsonl")), tokenizer, 0, sft.example)
    recipe = load_recipe({})
    batches = api._batches(recipe, data.train, tokenizer.pad_token_id, 2, AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert batches.packing and capsys.readouterr().out == ""

    batches = api._batches(recipe, data.train, tokenizer.pad_token_id, 2, tiny_mamba(tokenizer))
    notice = capsys.readouterr().out.strip()
    assert notice.startswith("unitune: mamba cannot pack exactly (") and notice.endswith("training on padded batches")
    assert len(notice.splitlines()) == 1
    assert not batches.packing and "attention_mask" in batches.next()
    assert recipe.data.packing is False  # the run's recipe records what ran
    api._batches(recipe, data.val or data.train, tokenizer.pad_token_id, 2, tiny_mamba(tokenizer))
    assert capsys.readouterr().out == ""  # decided once per run: one notice
