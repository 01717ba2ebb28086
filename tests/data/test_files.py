import json

import pytest

from unitune.config import DataConfig
from unitune.data import DataError, build_data
from unitune.data.files import read_rows
from unitune.data.formats import to_sample
from unitune.objectives import sft

ROW = {"instruction": "Say hi", "output": "hi"}


def test_readers_agree_across_file_types(tmp_path):
    import pandas as pd
    from datasets import Dataset

    rows = [{**ROW, "input": ""}, {"instruction": "Say bye", "input": "politely", "output": "bye"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "ds"):
        samples = [to_sample(r, "auto") for r in read_rows(tmp_path / name)]
        assert [s.messages[-1]["content"] for s in samples] == ["hi", "bye"], name
        assert samples[1].messages[0]["content"] == "Say bye\n\npolitely", name


def test_malformed_row_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROW) + "\n\n" + '{"instruction": "x", "output": }\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        read_rows(p)
    p.write_text(json.dumps(ROW) + "\n" + json.dumps({"instruction": "x", "output": ["a list"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'output' must be a string"):
        [to_sample(r, "auto") for r in read_rows(p)]
    p.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: cannot tell the format"):
        [to_sample(r, "auto") for r in read_rows(p)]
    c = tmp_path / "bad.csv"
    c.write_text("instruction,output\nok,fine\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"bad.csv:3: more fields"):
        read_rows(c)


def test_sharegpt_and_chat_rows(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    rows = read_rows(p)
    assert to_sample(rows[0], "auto").messages == [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=r"chat.jsonl:2: .*no assistant message"):
        to_sample(rows[1], "auto")


def test_empty_after_filtering_is_an_error(tmp_path, tokenizer):
    p = tmp_path / "long.jsonl"
    # Cut from the right, the answer starts beyond max_length: nothing is left to learn from.
    p.write_text(json.dumps({"instruction": "word " * 200, "output": "answer"}) + "\n")
    with pytest.raises(DataError, match="no usable examples"):
        build_data(DataConfig(train=str(p), max_length=32, truncation="right"), tokenizer, 0, sft.example)
    with pytest.raises(DataError, match="data file not found"):
        build_data(DataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer, 0, sft.example)


def test_validation_split_from_ratio(orders_data, tokenizer):
    cfg = DataConfig(train=str(orders_data / "train.jsonl"), val_ratio=0.25)
    a, b = build_data(cfg, tokenizer, 0, sft.example), build_data(cfg, tokenizer, 0, sft.example)
    assert len(a.val) == 24 and len(a.train) == 72
    assert [e.input_ids for e in a.val] == [e.input_ids for e in b.val]  # deterministic
    assert a.stats["truncated"] == 0
    cut = max(len(e.input_ids) for e in a.train) - 5
    short = build_data(cfg.model_copy(update={"max_length": cut}), tokenizer, 0, sft.example)
    assert short.stats["truncated"] > 0 and all(len(e.input_ids) <= cut for e in short.train)


def test_rows_with_nothing_to_learn_stop_the_run_or_are_skipped(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Hi"}]},  # no answer
            {"instruction": "Say hi", "output": ""},
            {"instruction": "Say hi", "output": "hi"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path}:2: .*no assistant message.*data.nothing_to_learn=skip"):
        build_data(DataConfig(train=str(path)), tokenizer, 0, sft.example)
    data = build_data(DataConfig(train=str(path), nothing_to_learn="skip"), tokenizer, 0, sft.example)
    assert len(data.train) == 2 and data.stats["skipped_nothing_to_learn"] == 2
