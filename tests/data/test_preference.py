"""Preference data: every layout, the real chat templates, TRL 1.16's own tokenisation and collators as the
reference, and errors that name the line."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_templates import FAMILIES, family_tokenizers  # noqa: F401 (a fixture)

from unitune.data.files import DataError, Row, read_rows
from unitune.data.formats import NothingToLearn
from unitune.data.preference import (PairExample, UnpairedExample, collate_pairs, collate_unpaired, detect, to_pair,
                                     to_unpaired, tokenize_pair, tokenize_unpaired, unpair)
from unitune.data.templates import render
from unitune.data.tokenize import IGNORE

FIXTURES = Path(__file__).parent / "preference"
SYSTEM, USER, EARLIER = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "<think>\nadd\n</think>\n\nFour."})
FOLLOW_UP = {"role": "user", "content": "Times 3?"}
PROMPTS = {"single": [USER], "system": [SYSTEM, USER], "multi": [SYSTEM, USER, EARLIER, FOLLOW_UP]}


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair(tok, data: dict, max_length: int = 1024, truncation: str = "prompt") -> PairExample:
    return tokenize_pair(tok, to_pair(Row(data, "x.jsonl:1")), max_length, truncation)


def trl_rows(tok, rows: list[dict], kto: bool = False) -> list[dict]:
    """TRL's own preprocessing (prompt extraction, EOS for plain text, tokenisation), as its trainers run it."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = SimpleNamespace(_tokenizer=tok, calculate_KL=False)
    prepare = KTOTrainer._prepare_dataset if kto else DPOTrainer._prepare_dataset
    return list(prepare(trainer, Dataset.from_list(rows), tok, args, "eval"))


def test_detect():
    assert detect(Row({"prompt": "q", "chosen": "a", "rejected": "b"}, "x:1")) == "pairs"
    assert detect(Row({"chosen": [], "rejected": []}, "x:1")) == "pairs"
    assert detect(Row({"prompt": "q", "chosen": "a"}, "x:1")) == "pairs"  # a pair missing a side: to_pair says which
    assert detect(Row({"prompt": "q", "completion": "a", "label": True}, "x:1")) == "unpaired"
    assert detect(Row({"prompt": "q", "completion": "a"}, "x:1")) is None
    assert detect(Row({"messages": []}, "x:1")) is None


def test_every_layout_gives_the_same_example(tokenizer):
    """Standard strings, TRL conversational, implicit prompt (with and without a copied string prompt), and
    ShareGPT turns with content parts: one pair, one example."""
    rows = read_rows(FIXTURES / "pairs.jsonl")
    examples = [tokenize_pair(tokenizer, to_pair(r), 1024) for r in rows]
    assert len(examples) == 5
    first = examples[0]
    assert tokenizer.decode(first.prompt_ids) == render(tokenizer, [USER], add_generation_prompt=True)
    assert tokenizer.decode(first.chosen_ids) == "Four.<|im_end|>"
    assert tokenizer.decode(first.rejected_ids) == "Five.<|im_end|>"
    for ex in examples[1:]:
        assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (first.prompt_ids, first.chosen_ids, first.rejected_ids)
    assert [ex.where for ex in examples] == [f"{FIXTURES / 'pairs.jsonl'}:{n}" for n in range(1, 6)]
    assert first.length == len(first.prompt_ids) + 5 and first.n_loss == 10 and not first.truncated


def test_system_prompt_and_multi_turn_layouts_agree(tokenizer):
    conversational = to_pair(Row({"prompt": [SYSTEM, USER, EARLIER, FOLLOW_UP], "chosen": said("Twelve."),
                                  "rejected": said("Eleven.")}, "x:1"))
    implicit = to_pair(Row({"chosen": [USER, EARLIER, FOLLOW_UP, *said("Twelve.")],
                            "rejected": [USER, EARLIER, FOLLOW_UP, *said("Eleven.")]}, "x:2"), system="Be brief.")
    assert implicit.prompt == conversational.prompt and implicit.prompt[0] == SYSTEM
    standard = to_pair(Row({"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five.", "system": "Be brief."}, "x:3"))
    assert standard.prompt == [SYSTEM, USER]
    a, b = tokenize_pair(tokenizer, conversational, 1024), tokenize_pair(tokenizer, implicit, 1024)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_real_templates_prompt_once_completion_to_end_of_turn(family_tokenizers, name, prompt):
    tok, end = family_tokenizers[name], FAMILIES[name][1]
    messages = PROMPTS[prompt]
    ex = pair(tok, {"prompt": messages, "chosen": said("Twelve."), "rejected": said("Eleven, I think.")})
    prompt_text = render(tok, messages, add_generation_prompt=True)
    assert tok.decode(ex.prompt_ids) == prompt_text  # what the model reads at inference, system prompt included
    think = "<think>\n\n</think>\n\n" if name == "qwen3" else ""  # Qwen3 writes an empty think block in the last turn
    for ids, text in ((ex.chosen_ids, "Twelve."), (ex.rejected_ids, "Eleven, I think.")):
        assert tok.decode(ids) == think + text + end and ids[-1] == tok.convert_tokens_to_ids(end)
        full = render(tok, messages + said(text))
        if name == "mistral-nemo-instruct-2407" and prompt != "single":
            # Nemo drops the system prompt from a conversation ending with an answer: the answer follows
            # the prompt as rendered for generation instead.
            assert not full.startswith(prompt_text)
            continue
        # The shared prompt is each side's own prefix: prompt + completion is the template's text and tokens.
        upto = full[: full.index(text + end, len(prompt_text)) + len(text + end)]
        assert tok.decode(ex.prompt_ids + ids) == upto
        assert tok(upto, add_special_tokens=False)["input_ids"] == ex.prompt_ids + ids


@pytest.mark.parametrize("name", [None, *FAMILIES])
def test_ids_are_trls_up_to_the_end_of_turn(tokenizer, family_tokenizers, name):
    """TRL's DPO preprocessing on the conversational form of the same rows: identical prompt ids; TRL's
    completion is ours followed by the template's text after the end-of-turn token ("\\n" for ChatML)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    tok = tokenizer if name is None else family_tokenizers[name]
    rows = [{"prompt": [USER], "chosen": said("Four."), "rejected": said("Five, clearly.")},
            {"prompt": [USER, EARLIER, FOLLOW_UP], "chosen": said("Twelve."), "rejected": said("Eleven.")}]
    if name != "mistral-nemo-instruct-2407":  # TRL cuts its prompt where the system prompt moved (module docstring)
        rows.append({"prompt": [SYSTEM, USER], "chosen": said("Four."), "rejected": said("Five.")})
    standard = {"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five, clearly."}
    ours = [pair(tok, r) for r in [standard, *rows]]
    assert (ours[0].prompt_ids, ours[0].chosen_ids) == (ours[1].prompt_ids, ours[1].chosen_ids)
    for row, ex, ref in zip([rows[0], *rows], ours, trl_rows(tok, [rows[0], *rows])):
        assert ex.prompt_ids == ref["prompt_ids"]
        text = maybe_apply_chat_template(maybe_extract_prompt(row), tok)
        for mine, theirs, key in ((ex.chosen_ids, ref["chosen_ids"], "chosen"), (ex.rejected_ids, ref["rejected_ids"], "rejected")):
            assert theirs[: len(mine)] == mine
            tail = tok.decode(theirs[len(mine):])
            assert text[key] == tok.decode(mine) + tail and tok.decode(mine).endswith(FAMILIES.get(name, (0, "<|im_end|>"))[1])


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The test tokenizer adding a BOS to any text it encodes, as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("bos", [False, True])
def test_plain_text_pairs_are_trls_exactly(tokenizer, bos_tokenizer, bos):
    """No prompt and plain strings: TRL's extract_prompt (the space goes to the answers) and EOS, no template;
    the tokenizer's own BOS, as TRL tokenises plain text."""
    tokenizer = bos_tokenizer if bos else tokenizer
    rows = [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is four.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is seven."},
            {"chosen": "Q: 2+2? A: Four", "rejected": "Q: 2+2? A: Five"}]
    sample = to_pair(Row(rows[0], "x:1"))
    assert sample.prompt == "\n\nHuman: What is 2+2?\n\nAssistant: It is" and sample.chosen == " four."
    for row, ref in zip(rows, trl_rows(tokenizer, rows)):
        ex = pair(tokenizer, row)
        assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (ref["prompt_ids"], ref["chosen_ids"], ref["rejected_ids"])
        assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == tokenizer.eos_token_id
        assert "<|im_start|>" not in tokenizer.decode(ex.prompt_ids)
        assert (ex.prompt_ids[0] == tokenizer.bos_token_id) == bos


def test_unpaired_labels_from_csv_and_ids_as_trl(tokenizer):
    samples = [to_unpaired(r) for r in read_rows(FIXTURES / "unpaired.csv")]
    assert [s.label for s in samples] == [True, False, True, False]
    examples = [tokenize_unpaired(tokenizer, s, 1024) for s in samples]
    rows = [{"prompt": [{"role": "user", "content": r.data["prompt"]}], "completion": said(r.data["completion"]),
             "label": s.label} for r, s in zip(read_rows(FIXTURES / "unpaired.csv"), samples)]
    for ex, ref in zip(examples, trl_rows(tokenizer, rows, kto=True)):
        assert ex.prompt_ids == ref["prompt_ids"]
        assert ref["completion_ids"] == ex.completion_ids + tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert ex.n_loss == len(ex.completion_ids) and ex.length == len(ex.prompt_ids) + ex.n_loss
    with pytest.raises(DataError, match=r"x\.csv:7: 'label' is 'maybe'"):
        to_unpaired(Row({"prompt": "q", "completion": "a", "label": "maybe"}, "x.csv:7"))
    with pytest.raises(DataError, match=r"x\.jsonl:2: 'label' is 2"):
        to_unpaired(Row({"prompt": "q", "completion": "a", "label": 2}, "x.jsonl:2"))


def test_a_pair_file_serves_kto_as_trl_unpairs_it(tokenizer):
    for row in ({"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."}, {"chosen": "Q: four", "rejected": "Q: six"}):
        ex = pair(tokenizer, row)
        good, bad = (tokenize_unpaired(tokenizer, s, 1024) for s in unpair(to_pair(Row(row, "x.jsonl:1"))))
        assert (good.label, bad.label) == (True, False)
        assert good.prompt_ids == bad.prompt_ids == ex.prompt_ids
        assert (good.completion_ids, bad.completion_ids) == (ex.chosen_ids, ex.rejected_ids)


def test_margin_from_json_and_csv(tokenizer):
    rows = read_rows(FIXTURES / "margins.csv")
    a, b = (tokenize_pair(tokenizer, to_pair(r), 1024) for r in rows)
    assert (a.margin, b.margin) == (2.5, None)
    assert "margin" not in collate_pairs([a, b], 0)  # one pair without: no margin for the batch
    c = pair(tokenizer, {"prompt": "q", "chosen": "Four.", "rejected": "Five.", "margin": 1})
    assert collate_pairs([a, c], 0)["margin"].tolist() == [2.5, 1.0]


# Each malformed row with what its one-line error must say (after "file:line: ").
MALFORMED = [
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "'rejected' is empty (null)"),
    ({"prompt": "q", "chosen": "Four.", "rejected": "Four."}, "the same answer"),
    ({"prompt": [USER], "chosen": said("Four."), "rejected": said("Four.")}, "the same answer"),
    ({"chosen": [USER, *said("Four.")], "rejected": [USER, *said("Four.")]}, "the same conversation"),
    ({"chosen": "Four.", "rejected": "Four."}, "the same text"),
    ({"prompt": "q", "chosen": "a", "rejected": said("b")}, "'chosen' is a str but 'rejected' a list"),
    ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "'chosen' is a dict"),
    ({"prompt": [USER], "chosen": "a", "rejected": "b"}, "'prompt' is a list of messages but the answers are strings"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' is an empty answer"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": [USER], "chosen": [{"role": "user", "content": "a"}], "rejected": said("b")},
     "'chosen' must be one assistant message after the prompt, got roles ['user']"),
    ({"prompt": [USER], "chosen": said("a") + said("b"), "rejected": said("b")}, "'chosen' must be one assistant message"),
    ({"chosen": [USER, *said("a")], "rejected": [USER]}, "'rejected' has no answer after the messages"),
    ({"chosen": [USER, *said("a")], "rejected": [FOLLOW_UP, *said("b")]}, "share no prompt"),
    ({"chosen": [USER, *said("a"), FOLLOW_UP, *said("b")], "rejected": [USER, *said("c"), FOLLOW_UP, *said("b")]},
     "'chosen' must be one assistant message after the messages 'chosen' and 'rejected' share, got roles"),
    ({"chosen": "Four", "rejected": "Six"}, "share no prompt text"),
    ({"chosen": "Q: four", "rejected": "Q: four, I think"}, "one text followed by more"),
    ({"prompt": [USER, *said("a")], "chosen": said("b"), "rejected": said("c")}, "the prompt's last turn is 'assistant'"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": said("a"), "rejected": said("b")},
     "'prompt': message 0 has role 'robot'"),
    ({"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": said("b")}, "'chosen': message 0 has no content"),
    ({"prompt": [USER], "chosen": ["a"], "rejected": said("b")}, "'chosen': message 0 is a str, not an object"),
    ({"prompt": "q", "chosen": json.dumps(said("a")), "rejected": "b"}, "'chosen' is a string holding a JSON list of messages"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "lots"}, "'margin' is 'lots'"),
    ({"chosen": "Q: four", "rejected": "Q: five", "system": "Be brief."}, "this pair is plain text"),
]


def test_every_malformed_pair_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in MALFORMED))
    for n, (row, (_, expected)) in enumerate(zip(read_rows(path), MALFORMED), 1):
        with pytest.raises(DataError) as err:
            to_pair(row)
        assert str(err.value).startswith(f"{path}:{n}: ") and expected in str(err.value), (n, str(err.value))
    with pytest.raises(NothingToLearn):  # an empty answer can be skipped with data.nothing_to_learn=skip
        to_pair(Row({"prompt": "q", "chosen": "", "rejected": "b"}, "x:1"))


def test_missing_column_is_named_at_the_header(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nq,a\n")
    with pytest.raises(DataError, match=r"pairs\.csv: header has columns \['prompt', 'chosen'\]; a preference pair "
                                        r"needs 'chosen', 'rejected'"):
        to_pair(read_rows(path)[0])


def test_answers_the_template_renders_alike_are_refused(family_tokenizers):
    tok = family_tokenizers["llama-3.2-instruct"]  # it trims message content
    with pytest.raises(DataError, match=r"x\.jsonl:1: 'chosen' and 'rejected' give the same tokens"):
        pair(tok, {"prompt": "q", "chosen": "Four.", "rejected": "Four.  "})


def test_prompt_truncation_keeps_bos_and_both_answers(family_tokenizers):
    tok = family_tokenizers["llama-3.2-instruct"]
    row = {"prompt": [SYSTEM, USER, EARLIER, FOLLOW_UP], "chosen": said("Twelve, as 4 x 3 = 12."), "rejected": said("Eleven.")}
    full = pair(tok, row)
    longest = len(full.chosen_ids)
    ex = pair(tok, row, max_length=longest + 6)
    assert ex.truncated and not full.truncated and ex.length == longest + 6
    assert ex.prompt_ids == [tok.bos_token_id] + full.prompt_ids[-5:]  # the oldest prompt tokens went, BOS stayed
    assert (ex.chosen_ids, ex.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    assert pair(tok, row, max_length=longest + 1) is None  # no prompt token would be left to answer
    assert pair(tok, row, max_length=full.length, truncation="drop") == full
    assert pair(tok, row, max_length=full.length - 1, truncation="drop") is None


def test_right_truncation_keeps_the_prompt_and_cuts_the_answers(tokenizer):
    row = {"prompt": "What is 2+2?", "chosen": "Four, since two and two make four.", "rejected": "Five."}
    full = pair(tokenizer, row)
    ex = pair(tokenizer, row, max_length=len(full.prompt_ids) + 3, truncation="right")
    assert ex.prompt_ids == full.prompt_ids and ex.chosen_ids == full.chosen_ids[:3] and ex.truncated
    assert ex.rejected_ids == full.rejected_ids[:3]
    assert pair(tokenizer, row, max_length=len(full.prompt_ids), truncation="right") is None  # nothing left to learn


def test_collate_pairs_layout():
    examples = [PairExample([1, 2, 3], [4, 5], [6], "x:1"), PairExample([7, 8], [9], [10, 11], "x:2")]
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    x = IGNORE  # position t predicts token t+1: exactly the completion tokens, one to the left
    assert batch["targets"].tolist() == [[x, x, 4, 5, x], [x, 9, x, x, x], [x, x, 6, x, x], [x, 10, 11, x, x]]
    assert (batch["real_tokens"], batch["pairs"]) == (16, 2) and "margin" not in batch


def test_collators_match_trls(tokenizer):
    """Our batches hold TRL's input ids and attention masks, and our targets are TRL's completion mask shifted."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [{"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five, since I cannot add."},
            {"prompt": "What is 3+3, please?", "chosen": "Six.", "rejected": "Seven."}]
    pairs = [pair(tokenizer, r) for r in rows]
    ours = collate_pairs(pairs, tokenizer.pad_token_id)
    theirs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in pairs])
    assert_same_layout(ours, theirs)

    unpaired = [UnpairedExample(e.prompt_ids, c, label, e.where) for e, c, label in
                ((pairs[0], pairs[0].chosen_ids, True), (pairs[1], pairs[1].rejected_ids, False), (pairs[0], pairs[0].rejected_ids, False))]
    completions = [e.completion_ids for e in unpaired]
    features = [{"prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids, "label": e.label,
                 "KL_completion_ids": kl} for e, kl in zip(unpaired, completions[-1:] + completions[:-1])]  # TRL's rotation
    for max_length in (None, max(len(e.prompt_ids) for e in unpaired) + 2):
        ours = collate_unpaired(unpaired, tokenizer.pad_token_id, max_length)
        theirs = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(features)
        assert_same_layout(ours, theirs)
        assert ours["label"].dtype == torch.bool and ours["label"].tolist() == [True, False, False]
        kl = {k[3:]: v for k, v in ours.items() if k.startswith("kl_")}
        if max_length is None:
            assert_same_layout(kl, {k[3:]: v for k, v in theirs.items() if k.startswith("KL_")})
        else:
            cut = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(features)
            assert_same_layout(kl, {k[3:]: v for k, v in cut.items() if k.startswith("KL_")})
            assert kl["input_ids"].shape[1] == max_length


def assert_same_layout(ours: dict, theirs: dict) -> None:
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    learned = theirs["completion_mask"][:, 1:].bool()
    assert torch.equal(ours["targets"][:, :-1] != IGNORE, learned) and (ours["targets"][:, -1] == IGNORE).all()
    assert torch.equal(ours["targets"][:, :-1][learned], theirs["input_ids"][:, 1:][learned])
