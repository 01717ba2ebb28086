"""An adversarial corpus of data files, read the way training reads them (build_data: read_rows ->
to_sample with the template's roles -> tokenize): each file loads with the right number of rows, or
fails with one line naming the file, the line (record, row or header) and what to do.

The text files are in corpus/; files that are not text (other encodings, Parquet, `datasets`
directories) are written here. Cases marked with an issue come from users' reports.
"""
import json
from pathlib import Path

import pytest

from unitune.config import DataConfig
from unitune.data import DataError, build_data
from unitune.data.files import read_rows
from unitune.data.formats import DEFAULT_ROLES, template_roles, to_sample
from unitune.objectives import sft

CORPUS = Path(__file__).parent / "corpus"

# name -> rows it loads, or (where, what to do): two strings its one-line error must contain.
VERDICTS = {
    # Encodings and line endings
    "bom.jsonl": 2, "bom.json": 2, "bom.csv": 2, "bom.tsv": 2,  # Windows tools write a UTF-8 byte-order mark
    "crlf.jsonl": 2, "crlf.csv": 2, "no_final_newline.jsonl": 2, "blank_lines.jsonl": 3, "blank_lines.csv": 2,
    "line_separator.jsonl": 2,  # a raw U+2028 inside a string (microsoft/graphrag#2424 is its splitlines cousin)
    "utf16_bom.jsonl": ("utf16_bom.jsonl:1", "re-save it as UTF-8"),  # Excel's "Unicode text"
    "utf16_no_bom.jsonl": ("utf16_no_bom.jsonl:1", "re-save the file as UTF-8"),
    "latin1.jsonl": ("latin1.jsonl:2", "re-save the file as UTF-8"),  # drorlab/atom3d#52: a bare UnicodeDecodeError
    "cp1252.csv": ("cp1252.csv:3", "re-save the file as UTF-8"),
    "bom_then_latin1.jsonl": ("bom_then_latin1.jsonl:2", "re-save the file as UTF-8"),  # counted past the mark
    # JSON that Python's json module accepts silently, and JSON it refuses
    "duplicate_key.jsonl": ("duplicate_key.jsonl:2", "'output' appears twice in one object; keep one"),
    "duplicate_key.json": ("duplicate_key.json:6", "'output' appears twice in one object; keep one"),
    "nan.jsonl": ("nan.jsonl:2", "NaN is not valid JSON; write null or a number"),
    "nan.json": ("nan.json:6", "NaN is not valid JSON; write null or a number"),
    "infinity.jsonl": ("infinity.jsonl:1", "-Infinity is not valid JSON; write null"),
    "trailing_comma.jsonl": ("trailing_comma.jsonl:3", "remove the trailing comma"),
    "trailing_comma.json": ("trailing_comma.json:10", "remove the trailing comma"),
    "python_repr.jsonl": ("python_repr.jsonl:1", "double quotes"),
    "two_objects_one_line.jsonl": ("two_objects_one_line.jsonl:1", "one object per line"),  # huggingface/datasets#4107
    "scalar_line.jsonl": ("scalar_line.jsonl:2", "holds one {\"key\": value, ...} row"),
    "array.jsonl": 2,  # a JSON array saved as .jsonl
    "jsonl_named.json": 3,  # JSON Lines saved as .json
    "records_wrapper.json": 2,  # {"version": ..., "data": [...]}
    "scalar.json": ("scalar.json:1", "write [{...}, {...}]"),
    "single_conversation.json": ("single_conversation.json: one JSON object", "wrap it in [ ]"),
    "two_lists.json": ("two_lists.json: the keys ['train', 'test']", "put the training rows alone in a file"),
    "nested_list.json": ("nested_list.json:record 0", "each row is {\"key\": value, ...}"),
    "empty.jsonl": ("empty.jsonl: no rows", "add examples"),
    "whitespace_only.jsonl": ("whitespace_only.jsonl: no rows", "add examples"),
    "empty_list.json": ("empty_list.json: no rows", "add examples"),
    # Field values
    "mixed_formats.jsonl": 3,  # an instruction row, a chat row and a text row
    "numeric_output.jsonl": 2,
    "null_output.jsonl": ("null_output.jsonl:1", "fill it in or drop the row"),
    "empty_output.jsonl": ("empty_output.jsonl:2", "nothing to learn; write the answer or drop the row"),
    "nested_list_output.jsonl": ("nested_list_output.jsonl:1", "'output' must be a string, got list; write it as text"),
    "bool_instruction.jsonl": ("bool_instruction.jsonl:1", "must be a string, got bool; write it as text"),
    "lone_surrogate.jsonl": ("lone_surrogate.jsonl:2", "lone surrogate '\\ud83d' (an emoji cut in half?); remove it"),
    "wrong_key.jsonl": ("wrong_key.jsonl:1", "cannot tell the format from the keys ['conversation', 'id']; expected 'messages'"),
    # The chat message schema
    "messages_as_string.jsonl": ("messages_as_string.jsonl:1", "JSON-encoded twice"),
    "content_parts.jsonl": 2,  # OpenAI's list of typed parts
    "image_part.jsonl": ("image_part.jsonl:1", "type 'image_url'; multimodal models are not supported yet"),
    "part_without_type.jsonl": ("part_without_type.jsonl:1", "has no 'type'; write text as"),
    "content_object.jsonl": ("content_object.jsonl:1", "write a string or a list"),
    "null_content_tool_call.jsonl": ("null_content_tool_call.jsonl:1", "message 1 has no content (null); tool calls"),
    "unknown_role.jsonl": ("unknown_role.jsonl:2", "role 'narrator', which the model's chat template does not render "
                           "(it renders assistant, system, tool, user); map it"),
    "role_typo.jsonl": ("role_typo.jsonl:1", "role 'User'"),
    "missing_role.jsonl": ("missing_role.jsonl:1", "no string 'role' (or ShareGPT's 'from'); add one"),
    "message_not_object.jsonl": ("message_not_object.jsonl:1", "write each turn as"),
    "empty_messages.jsonl": ("empty_messages.jsonl:1", "add the turns or drop the row"),
    "sharegpt.jsonl": 2,
    "sharegpt_observation.jsonl": 1,  # LLaMA-Factory's tool answers (hiyouga/LlamaFactory#3330)
    "sharegpt_unknown_from.jsonl": ("sharegpt_unknown_from.jsonl:1", "'from': 'bot', not a ShareGPT role"),
    "sharegpt_function_call.json": ("sharegpt_function_call.json:record 0", "'from': 'function_call', not a ShareGPT role"),
    "tool_messages.jsonl": 1,
    # Turn order: a row must leave an assistant answer to learn
    "no_assistant.jsonl": ("no_assistant.jsonl:2", "no assistant message to learn from; add the answer or drop the row"),
    "empty_assistant.jsonl": ("empty_assistant.jsonl:1", "message 1 is an empty assistant turn"),
    "empty_assistant_midway.jsonl": ("empty_assistant_midway.jsonl:1", "write the answer or drop the turn"),
    "ends_with_user.jsonl": 1,  # the answer before the last user turn is still learned
    "system_in_middle.jsonl": 1, "consecutive_assistant.jsonl": 1, "assistant_first.jsonl": 1,
    # CSV and TSV
    "quoted_newlines.csv": 2, "quotes_inside.tsv": 2, "text_column.csv": 2,
    "header_only.csv": ("header_only.csv: no rows", "add examples"),
    "missing_column.csv": ("missing_column.csv: header has columns ['instruction', 'answer']",
                           "the instruction format needs 'instruction' and 'output'"),
    "header_spaces.csv": ("header_spaces.csv: header has columns ['instruction', ' output']", "needs 'instruction' and 'output'"),
    "unknown_header.csv": ("unknown_header.csv: header has columns ['prompt', 'completion']", "cannot tell the format"),
    "duplicate_header.csv": ("duplicate_header.csv: header has columns", "name each column once"),
    "short_row.csv": ("short_row.csv:3", "fewer fields than the header names (2 for 3); quote fields"),
    "long_row.csv": ("long_row.csv:3", "more fields than the header names (3 for 2); quote fields"),
    "unterminated_quote.csv": ("unterminated_quote.csv:3", "not valid CSV"),
    "empty_output_cell.csv": ("empty_output_cell.csv:3", "nothing to learn"),
    # Parquet, `datasets` directories and other files
    "chat.parquet": 2, "int_column.parquet": 2, "dataset_dir": 2,
    "list_column.parquet": ("list_column.parquet:row 0", "column 'output' must hold strings, got list"),
    "missing_column.parquet": ("missing_column.parquet: has columns ['instruction', 'response']",
                               "the instruction format needs 'instruction' and 'output'"),
    "null_cell.parquet": ("null_cell.parquet:row 1", "fill it in or drop the row"),
    "not_parquet.parquet": ("not_parquet.parquet: not a readable Parquet file", "write it again"),
    "dataset_dict_no_train": ("dataset_dict_no_train: a DatasetDict without a 'train' split", "save the split as 'train'"),
    "jsonl_folder": ("jsonl_folder: a directory", "name one of its files (train.jsonl)"),
    "notes.txt": ("notes.txt: unknown data file type '.txt'", "use one of"),
}

ROWS = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _parquet(rows: list[dict]):
    import pandas as pd

    return lambda p: pd.DataFrame(rows).to_parquet(p)


def _dataset(splits: dict[str, list[dict]]):
    from datasets import Dataset, DatasetDict

    return lambda p: DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(p))


def _folder(p: Path) -> None:
    p.mkdir()
    (p / "train.jsonl").write_text(_jsonl(ROWS))


CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
WRITERS = {  # what cannot be kept as a text file
    "utf16_bom.jsonl": lambda p: p.write_bytes(_jsonl(ROWS).encode("utf-16")),
    "utf16_no_bom.jsonl": lambda p: p.write_bytes(_jsonl(ROWS).encode("utf-16-le")),
    "latin1.jsonl": lambda p: p.write_bytes(_jsonl([*ROWS[:1], {"instruction": "Say café", "output": "café"}]).encode("latin-1")),
    "bom_then_latin1.jsonl": lambda p: p.write_bytes(b"\xef\xbb\xbf" + (_jsonl(ROWS[:1]) + "\u00e9t\u00e9\n").encode("latin-1")),
    "cp1252.csv": lambda p: p.write_bytes("instruction,output\nSay hi,hi\n\u201cQuote\u201d me,ok\n".encode("cp1252")),
    "chat.parquet": lambda p: _parquet([{"messages": CHAT}, {"messages": CHAT}])(p),
    "int_column.parquet": lambda p: _parquet([{"instruction": "6*7?", "output": 42}, {"instruction": "1+1?", "output": 2}])(p),
    "list_column.parquet": lambda p: _parquet([{"instruction": "List", "output": ["a", "b"]}])(p),
    "missing_column.parquet": lambda p: _parquet([{"instruction": "Say hi", "response": "hi"}])(p),
    "null_cell.parquet": lambda p: _parquet([ROWS[0], {"instruction": "Say bye", "output": None}])(p),
    "dataset_dir": lambda p: _dataset({"train": ROWS})(p),
    "dataset_dict_no_train": lambda p: _dataset({"test": ROWS})(p),
    "jsonl_folder": _folder,
}


def test_the_corpus_is_complete():
    on_disk = {p.name for p in CORPUS.iterdir()}
    assert on_disk == set(VERDICTS) - set(WRITERS), "every corpus file needs a verdict, and every verdict a file"
    assert len(VERDICTS) >= 30 and sum(isinstance(v, int) for v in VERDICTS.values()) >= 10


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_corpus_file(name, tokenizer, tmp_path):
    path = CORPUS / name
    if name in WRITERS:
        path = tmp_path / name
        WRITERS[name](path)
    cfg = DataConfig(train=str(path), max_length=512)
    verdict = VERDICTS[name]
    if isinstance(verdict, int):
        bundle = build_data(cfg, tokenizer, 0, sft.example)
        assert bundle.stats["rows"] == verdict and len(bundle.train) == verdict
        assert all(e.n_loss > 0 for e in bundle.train)
        return
    where, todo = verdict
    with pytest.raises(DataError) as err:
        build_data(cfg, tokenizer, 0, sft.example)
    message = str(err.value)
    assert str(path.parent / where) in message and todo in message, message
    assert "\n" not in message


def test_what_the_readers_keep(tokenizer):
    # A byte-order mark, CR line ends and U+2028 leave no trace in the values; numbers become their text.
    assert [list(r.data) for r in read_rows(CORPUS / "bom.csv")] == [["instruction", "input", "output"]] * 2
    assert read_rows(CORPUS / "bom.jsonl")[0].data == {"instruction": "Say hi", "output": "hi"}
    assert [r.data["output"] for r in read_rows(CORPUS / "crlf.csv")] == ["hi", "bye"]
    assert read_rows(CORPUS / "line_separator.jsonl")[0].data["instruction"] == "Split\u2028here"
    assert [to_sample(r, "auto").messages[-1]["content"] for r in read_rows(CORPUS / "numeric_output.jsonl")] == ["42", "1.5"]
    # A row is named by the line it starts on, past blank lines and quoted line breaks.
    assert [r.where.rsplit(":", 1)[1] for r in read_rows(CORPUS / "blank_lines.jsonl")] == ["2", "5", "7"]
    rows = read_rows(CORPUS / "quoted_newlines.csv")
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "5"]
    assert rows[0].data == {"instruction": "Write two lines,\nplease", "output": "one\ntwo"}
    assert rows[1].data["instruction"] == 'Quote "this"'
    # Text parts are joined back to back, as multimodal chat templates render them.
    sample = to_sample(read_rows(CORPUS / "content_parts.jsonl")[0], "auto")
    assert sample.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
    conversation = [to_sample(r, "auto").messages for r in read_rows(CORPUS / "sharegpt_observation.jsonl")][0]
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]


# Shapes of real templates: Phi-3.5 drops roles it does not know; Mistral raises on them and on
# turns out of order, and renders its system prompt only into the last user turn.
PHI = ("{% for m in messages %}{% if m['role'] == 'system' and m['content'] %}{{'<|system|>\n' + m['content'] + '<|im_end|>\n'}}"
       "{% elif m['role'] == 'user' %}{{'<|user|>\n' + m['content'] + '<|im_end|>\n'}}{% elif m['role'] == 'assistant' %}"
       "{{'<|assistant|>\n' + m['content'] + '<|im_end|>\n'}}{% endif %}{% endfor %}"
       "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
           "{% else %}{% set loop_messages = messages %}{% endif %}"
           "{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
           "{% if m['role'] == 'user' %}{{ '[INST]' + (system + '\n\n' if system is defined and loop.last else '') + m['content'] + '[/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + '<|im_end|>' }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template, roles", [(None, DEFAULT_ROLES), (PHI, {"system", "user", "assistant"}),
                                             (MISTRAL, {"user", "assistant"})])
def test_roles_come_from_the_template(tokenizer, tmp_path, template, roles):
    saved = tokenizer.chat_template
    if template:
        tokenizer.chat_template = template
    try:
        assert template_roles(tokenizer) == roles
        tool = tmp_path / "tool.jsonl"
        tool.write_text(_jsonl([{"messages": CHAT}, {"messages": [*CHAT, {"role": "tool", "content": "x"}, CHAT[1]]}]))
        if "tool" in roles:
            assert len(build_data(DataConfig(train=str(tool)), tokenizer, 0, sft.example).train) == 2
        else:
            with pytest.raises(DataError, match=rf"tool.jsonl:2: message 2 has role 'tool'.*it renders {', '.join(sorted(roles))}\)"):
                build_data(DataConfig(train=str(tool)), tokenizer, 0, sft.example)
        # A system prompt the template would drop is refused, not trained without.
        plain = tmp_path / "plain.jsonl"
        plain.write_text(_jsonl(ROWS))
        cfg = DataConfig(train=str(plain), system_prompt="Be brief.")
        if "system" in roles:
            assert "Be brief." in tokenizer.decode(build_data(cfg, tokenizer, 0, sft.example).train[0].input_ids)
        else:
            with pytest.raises(DataError, match=r"plain.jsonl:1: a system prompt .* remove the system prompt"):
                build_data(cfg, tokenizer, 0, sft.example)
    finally:
        tokenizer.chat_template = saved
