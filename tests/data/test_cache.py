"""Tokenized examples cached by content (data/cache.py), and large files tokenized in worker processes."""
from __future__ import annotations

import json

import pytest

from unitune.config import DataConfig
from unitune.data import build, cache
from unitune.data.files import DataError
from unitune.objectives import dpo, kto, sft


def _rows(path, n, answer="ok"):
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{answer} {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_a_second_read_comes_from_the_cache_and_equals_the_first(tokenizer, tmp_path, monkeypatch):
    path = _rows(tmp_path / "rows.jsonl", 20)
    cfg = DataConfig(max_length=64)
    first_stats, second_stats = {}, {}
    first = build.load_examples(str(path), cfg, tokenizer, sft.example, first_stats, cache=True)
    monkeypatch.setattr(build, "read_rows", lambda p: pytest.fail("read again"))
    second = build.load_examples(str(path), cfg, tokenizer, sft.example, second_stats, cache=True)
    assert second == first and second_stats == first_stats and first_stats["rows"] == 20
    assert first[0].messages[0]["content"] == "Say 0." and first[0].where.endswith("rows.jsonl:1")


def test_anything_that_shapes_an_example_is_a_new_entry(tokenizer, tmp_path, monkeypatch):
    path = _rows(tmp_path / "rows.jsonl", 6)
    cfg = DataConfig(max_length=64)
    build.load_examples(str(path), cfg, tokenizer, sft.example, {}, cache=True)
    reads = []
    real = build.read_rows
    monkeypatch.setattr(build, "read_rows", lambda p: reads.append(p) or real(p))
    build.load_examples(str(path), DataConfig(max_length=64, loss_on="all"), tokenizer, sft.example, {}, cache=True)
    build.load_examples(str(path), DataConfig(max_length=64, system_prompt="Be brief."), tokenizer, sft.example, {},
                        cache=True)
    _rows(path, 6, answer="changed")  # same name, new content
    changed = build.load_examples(str(path), cfg, tokenizer, sft.example, {}, cache=True)
    assert len(reads) == 3 and changed[0].messages[-1]["content"] == "changed 0"
    build.load_examples(str(path), cfg, tokenizer, sft.example, {}, cache=True)
    assert len(reads) == 3  # and the new content is cached in turn


def test_preference_examples_round_trip(tokenizer, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": "bad", "margin": 0.5})
                             + "\n" for i in range(4)))
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "c", "label": i % 2 == 0}) + "\n"
                                for i in range(4)))
    cfg = DataConfig(max_length=64)
    for path, objective in ((pairs, dpo), (unpaired, kto)):
        made = build.load_examples(str(path), cfg, tokenizer, objective.example, {}, cache=True)
        again = cache.load(cache.key(str(path), build.file_digest(path), cfg, tokenizer, objective.example))[0]
        assert again == made
        # the conversation an objective keeps beside the fields (for generation-based evaluation) comes back too
        kept = lambda examples: [getattr(e, "messages", None) for e in examples]  # noqa: E731
        assert kept(again) == kept(made) and made[0].messages


def test_a_damaged_entry_is_tokenized_again(tokenizer, tmp_path):
    path = _rows(tmp_path / "rows.jsonl", 4)
    cfg = DataConfig(max_length=64)
    made = build.load_examples(str(path), cfg, tokenizer, sft.example, {}, cache=True)
    name = cache.key(str(path), build.file_digest(path), cfg, tokenizer, sft.example)
    (cache.root() / f"{name}.arrow").write_bytes(b"not arrow")
    assert build.load_examples(str(path), cfg, tokenizer, sft.example, {}, cache=True) == made
    assert cache.load(name)[0] == made  # and replaced


def test_large_files_are_tokenized_in_worker_processes_in_order(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "PARALLEL_ROWS", 10)
    path = _rows(tmp_path / "rows.jsonl", 50)
    cfg = DataConfig(max_length=64, num_proc=3)
    pools = []

    class Pool(build.ProcessPoolExecutor):
        def __init__(self, workers, **kw):
            pools.append(workers)
            super().__init__(workers, **kw)

    monkeypatch.setattr(build, "ProcessPoolExecutor", Pool)
    stats: dict = {}
    parallel = build.load_examples(str(path), cfg, tokenizer, sft.example, stats)
    assert pools == [3]
    serial = build.load_examples(str(path), DataConfig(max_length=64, num_proc=1), tokenizer, sft.example, {})
    assert parallel == serial and stats["rows"] == 50

    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + json.dumps({"instruction": "x", "output": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:51: 'output' is empty"):
        build.load_examples(str(bad), cfg, tokenizer, sft.example, {})
