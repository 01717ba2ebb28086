"""PII scrubbing (privacy/scrub.py): each kind replaced, near misses kept, rows and files round-tripped, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest

pytest.importorskip("presidio_analyzer")

from unitune import cli  # noqa: E402
from unitune.config import DataConfig  # noqa: E402
from unitune.data import build, cache  # noqa: E402
from unitune.data.files import Row  # noqa: E402
from unitune.objectives import sft  # noqa: E402
from unitune.privacy import scrub  # noqa: E402

STRUCTURED = ["email", "phone", "card", "iban", "ip"]
PLANTED = Path(__file__).with_name("planted.jsonl")
names = pytest.mark.skipif(not any(scrub._version(m) for m in scrub.NAMES_MODELS),
                           reason="no spaCy pipeline for names (pip install 'unitune[privacy-names]')")


@pytest.fixture(scope="module")
def scrubber() -> scrub.Scrubber:
    return scrub.Scrubber(scrub.resolve(STRUCTURED))


@pytest.mark.parametrize("kind, text, secret", [
    ("email", "Send the invoice to billing@acme-corp.co.uk by Friday.", "billing@acme-corp.co.uk"),
    ("phone", "Our London office answers on +44 20 7946 0958 all day.", "+44 20 7946 0958"),
    ("phone", "Call me at (415) 555-2671 after lunch.", "(415) 555-2671"),
    ("card", "Please charge my Visa 4111 1111 1111 1111, thanks.", "4111 1111 1111 1111"),
    ("iban", "Wire the deposit to GB82 WEST 1234 5698 7654 32 by Monday.", "GB82 WEST 1234 5698 7654 32"),
    ("ip", "The server at 192.168.1.20 refused the connection.", "192.168.1.20"),
    ("ip", "The IPv6 host 2001:db8::8a2e:370:7334 answers ping.", "2001:db8::8a2e:370:7334"),
])
def test_each_kind_is_replaced_by_its_placeholder(scrubber, kind, text, secret):
    assert scrubber.text(text) == text.replace(secret, scrub.PLACEHOLDERS[kind])


@pytest.mark.parametrize("text", [
    "Order 1234 5678 9012 3456 shipped.",  # 16 digits, card-shaped, failing the Luhn checksum
    "Upgrade to version 1.2.3.4.5 now.",  # an IPv4 address inside a longer dotted number
    "It shipped on 2024-03-15, or 12/03/2024 in the old form.",
    "Wire to GB82 WEST 1234 5698 7654 33.",  # one digit off: the mod-97 checksum fails
    "In C++ the scope operator a :: b is rare; std::vector<int> is not.",
    "Mail root@localhost for access.",
    "The MAC is 00:1A:2B:3C:4D:5E and the time 10:30:45.",
])
def test_near_misses_are_left_alone(scrubber, text):
    assert scrubber.text(text) == text


def test_overlapping_findings_leave_the_longest_then_the_likeliest():
    F = scrub.Finding
    found = [F("phone", 0, 12, 0.4), F("card", 0, 19, 1.0), F("ip", 25, 32, 0.6), F("email", 25, 32, 0.9),
             F("person", 40, 45, 0.85)]
    assert scrub.overlap_free(found) == [F("card", 0, 19, 1.0), F("email", 25, 32, 0.9), F("person", 40, 45, 0.85)]


def _chat(i: int) -> Row:
    return Row({"id": i, "score": 0.5, "ok": True, "missing": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": f"I am on +44 20 7946 0958, row {i}."}]},
        {"role": "assistant", "content": "Noted; I will write to ana@example.com.", "meta": {"ip": "10.0.0.1"}},
    ]}, f"chats.jsonl:{i}")


def test_nested_chat_rows_are_scrubbed_in_every_string_and_nothing_else(scrubber):
    row = scrubber.row(_chat(3))
    assert row.where == "chats.jsonl:3"
    assert row.data == {"id": 3, "score": 0.5, "ok": True, "missing": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "I am on <PHONE>, row 3."}]},
        {"role": "assistant", "content": "Noted; I will write to <EMAIL>.", "meta": {"ip": "<IP>"}},
    ]}


def test_counts_and_the_sample_name_file_line_field_and_original():
    rows, report = scrub.scrub_rows([_chat(1), Row({"text": "nothing here"}, "chats.jsonl:2"), _chat(3)],
                                    scrub.resolve(STRUCTURED), sample=4)
    assert report["counts"] == {"email": 2, "phone": 2, "card": 0, "iban": 0, "ip": 2}
    assert (report["rows"], report["rows_changed"]) == (3, 2)
    assert report["sample"] == [
        {"where": "chats.jsonl:1", "field": "messages[0].content[0].text", "kind": "phone",
         "original": "+44 20 7946 0958", "replacement": "<PHONE>"},
        {"where": "chats.jsonl:1", "field": "messages[1].content", "kind": "email", "original": "ana@example.com",
         "replacement": "<EMAIL>"},
        {"where": "chats.jsonl:1", "field": "messages[1].meta.ip", "kind": "ip", "original": "10.0.0.1",
         "replacement": "<IP>"},
        {"where": "chats.jsonl:3", "field": "messages[0].content[0].text", "kind": "phone",
         "original": "+44 20 7946 0958", "replacement": "<PHONE>"},
    ]
    assert rows[1].data == {"text": "nothing here"}


def test_nothing_is_fetched_or_cached(tmp_path):
    """tldextract's default fetches the public-suffix list on first use, and caches what it got (the list, or its
    own copy after a failed fetch), so only an empty cache shows a fetch: a fresh process, with no network."""
    code = textwrap.dedent("""
        import socket
        tried = []
        def refuse(*args, **kwargs):
            tried.append(args)
            raise OSError("no network in this test")
        socket.getaddrinfo = socket.socket.connect = refuse
        from unitune.privacy import scrub
        print(scrub.Scrubber(scrub.resolve(["email"])).text("Write to jane.doe@example.com now."), tried)
    """)
    env = {**os.environ, "TLDEXTRACT_CACHE": str(tmp_path / "tldextract")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "Write to <EMAIL> now. []", run.stderr
    assert not (tmp_path / "tldextract").exists()


def test_unknown_kinds_and_names_without_a_pipeline_are_refused(monkeypatch):
    with pytest.raises(scrub.ScrubError, match="unknown kinds \\['mail'\\]"):
        scrub.resolve(["mail"])
    monkeypatch.setattr(scrub, "NAMES_MODELS", ("no_such_pipeline",))
    with pytest.raises(scrub.ScrubError, match="'person' needs a spaCy pipeline"):
        scrub.resolve(["email", "person"])
    every = scrub.resolve()  # all kinds: names are left out, and the report says so
    assert every["kinds"] == STRUCTURED and "person names" in every["left_out"]
    with pytest.raises(scrub.ScrubError, match="neither an installed spaCy pipeline"):
        scrub.resolve(["person"], names_model="no_such_pipeline")


@names
def test_person_names_are_replaced_by_an_installed_pipeline():
    scrubber = scrub.Scrubber(scrub.resolve(["person", "email"]))
    text = "Hi, I'm Maria Gonzalez; my manager is Dr. Robert Chen (robert.chen@example.com)."
    assert scrubber.text(text) == "Hi, I'm <PERSON>; my manager is Dr. <PERSON> (<EMAIL>)."
    assert scrubber.setting["names_model"] in scrub.NAMES_MODELS and scrubber.setting["names_model_version"]


@names
def test_names_model_takes_a_pipeline_folder(tmp_path):
    import spacy

    spacy.load(next(m for m in scrub.NAMES_MODELS if scrub._version(m))).to_disk(tmp_path / "pipeline")
    setting = scrub.resolve(["person"], names_model=str(tmp_path / "pipeline"))
    assert setting["names_model_version"].startswith("en_core_web_sm")
    assert scrub.Scrubber(setting).text("Angela Merkel met John Smith.") == "<PERSON> met <PERSON>."


def _score(scrubber: scrub.Scrubber, kinds: list[str]) -> dict[str, tuple[float, float]]:
    """Recall and precision per kind on the planted rows: a finding counts when kind and text match exactly."""
    hit, planted, found = Counter(), Counter(), Counter()
    for line in PLANTED.read_text().splitlines():
        row = json.loads(line)
        want = {(k, v) for k, v in row["pii"] if k in kinds}
        got = {(f.kind, row["text"][f.start : f.end]) for f in scrubber.find(row["text"])}
        hit.update(k for k, _ in want & got)
        planted.update(k for k, _ in want)
        found.update(k for k, _ in got)
    return {k: (hit[k] / planted[k], hit[k] / found[k] if found[k] else 1.0) for k in kinds}


def test_recall_and_precision_on_planted_rows(scrubber):
    """The README's table; its two misses are limits of the recognisers: a US number without its area code, an
    IBAN in lower case."""
    scores = _score(scrubber, STRUCTURED)
    assert scores == {"email": (1.0, 1.0), "phone": (7 / 8, 1.0), "card": (1.0, 1.0), "iban": (4 / 5, 1.0),
                      "ip": (1.0, 1.0)}


@names
def test_recall_and_precision_of_names_on_planted_rows():
    recall, precision = _score(scrub.Scrubber(scrub.resolve(["person"])), ["person"])["person"]
    assert recall >= 6 / 7 and precision >= 6 / 8  # en_core_web_sm 3.8.0: misses "Priya", calls "Bangalore" a person


def test_cli_round_trip_on_jsonl(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(_chat(i).data) + "\n" for i in range(3)))
    out = tmp_path / "clean.jsonl"
    assert cli.main(["scrub", str(data), "-o", str(out), "--kinds", "email,phone", "--sample", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["id"] == 2 and rows[2]["score"] == 0.5
    assert rows[2]["messages"][0]["content"][0]["text"] == "I am on <PHONE>, row 2."
    assert rows[2]["messages"][1]["meta"]["ip"] == "10.0.0.1"  # ip was not asked for
    report = json.loads((tmp_path / "clean.jsonl.scrub.json").read_text())
    assert report["counts"] == {"email": 3, "phone": 3} and len(report["sample"]) == 1
    printed = capsys.readouterr().out
    assert "email 3, phone 3" in printed and f"{data}:1 messages[0].content[0].text: phone '+44 20 7946 0958'" in printed
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left behind


def test_cli_keeps_csv_and_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"prompt": ["Mail me at ana@example.com", "Hi"], "chosen": ["ok", "Call +44 20 7946 0958"],
                          "n": [1, 2]})
    for suffix, write, read in ((".csv", lambda p: frame.to_csv(p, index=False), pd.read_csv),
                                (".parquet", frame.to_parquet, pd.read_parquet)):
        data, out = tmp_path / f"pairs{suffix}", tmp_path / f"clean{suffix}"
        write(data)
        assert cli.main(["scrub", str(data), "-o", str(out), "--kinds", "email,phone"]) == 0
        back = read(out)
        assert list(back["prompt"]) == ["Mail me at <EMAIL>", "Hi"]
        assert list(back["chosen"]) == ["ok", "Call <PHONE>"] and list(back["n"]) == [1, 2]
        if suffix == ".parquet":
            assert str(back["n"].dtype) == "int64"  # the source's schema, not strings


def test_cli_names_file_and_line_of_a_malformed_row(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert cli.main(["scrub", str(data), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_another_format_and_unknown_kinds(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hi"}\n')
    assert cli.main(["scrub", str(data), "-o", str(tmp_path / "rows.csv")]) == 2
    assert "keep DATA's format" in capsys.readouterr().err
    assert cli.main(["scrub", str(data), "-o", str(tmp_path / "out.jsonl"), "--kinds", "email,ssn"]) == 2
    assert "unknown kinds ['ssn']" in capsys.readouterr().err


def test_the_recipe_switch_scrubs_before_tokenizing_and_keys_the_cache(tokenizer, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Write to ana{i}@example.com", "output": "Done."}) + "\n"
                            for i in range(4)))
    plain = build.load_examples(str(data), DataConfig(max_length=64), tokenizer, sft.example, {}, cache=True)
    cfg, stats = DataConfig(max_length=64, scrub=["email", "phone"]), {}
    scrubbed = build.load_examples(str(data), cfg, tokenizer, sft.example, stats, cache=True)
    assert "ana0@example.com" in tokenizer.decode(plain[0].input_ids)
    text = tokenizer.decode(scrubbed[0].input_ids)  # the same file, not read from the cache entry without scrubbing
    assert "Write to <EMAIL>" in text and "example.com" not in text
    assert stats["scrubbed_email"] == 4 and stats["scrubbed_phone"] == 0
    assert f"unitune: scrub: {data}: email 4, phone 0" in capsys.readouterr().out
    key = lambda c: cache.key(str(data), build.file_digest(data), c, tokenizer, sft.example)  # noqa: E731
    assert len({key(DataConfig(max_length=64)), key(cfg), key(DataConfig(max_length=64, scrub=True))}) == 3


def test_the_recipe_kinds_are_the_scrubbers():
    annotation = DataConfig.model_fields["scrub"].annotation
    literal = next(a for a in get_args(annotation) if get_args(a))
    assert get_args(get_args(literal)[0]) == tuple(scrub.PLACEHOLDERS)
