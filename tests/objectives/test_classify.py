"""Classification: label sets, metrics, bad rows, and tiny encoders and decoders that learn a class rule."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel,
                          BertTokenizerFast)

import unitune
from unitune.config import RecipeError, load_recipe
from unitune.data.files import DataError, Row
from unitune.methods.targets import attention_projections
from unitune.objectives import classify

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "food", "service", "very", "so",
         "today", "and", "meh", "ok", "plot"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = BertTokenizerFast(tokenizer_object=wordpiece)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)  # an encoder without a head, as sentence encoders ship
    tok.save_pretrained(path)
    return path


def sentence(rng: random.Random, label: str) -> str:
    """Filler words and one word that decides the class (`mixed`: one of each kind)."""
    words = [rng.choice(WORDS[6:]) for _ in range(rng.randint(0, 3))]
    deciders = {"positive": [rng.choice(POSITIVE)], "negative": [rng.choice(NEGATIVE)],
                "mixed": [rng.choice(POSITIVE), rng.choice(NEGATIVE)]}[label]
    for w in deciders:
        words.insert(rng.randrange(len(words) + 1), w)
    return " ".join(words)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, n in (("train", 192), ("val", 48)):
        labels = [rng.choice(["positive", "negative", "mixed"]) for _ in range(n)]
        write_csv(out / f"{split}.csv", [{"text": sentence(rng, y), "label": y} for y in labels])
    return out


def recipe(model: Path, data: Path, tmp_path: Path, **method) -> dict:
    return {"model": {"name": str(model)},
            "data": {"train": str(data / "train.csv"), "validation": str(data / "val.csv"), "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8, **method}, "objective": {"name": "classify"},
            "train": {"steps": 120, "batch_size": 16, "warmup_steps": 2, "seed": 1},
            "eval": {"batch_size": 32}, "output": {"dir": str(tmp_path / "runs"), "name": "cls"}}


def test_lora_on_a_tiny_encoder_learns_the_classes_and_saves_a_classifier_peft_loads(tiny_bert, sentiment, tmp_path):
    run = unitune.train(recipe(tiny_bert, sentiment, tmp_path))
    assert run.recipe.model.kind == "seq-cls" and run.recipe.train.lr == 2e-3  # the classifier's LoRA default
    assert run.metrics["val_accuracy"] > run.before["val_accuracy"] + 0.3, (run.before, run.metrics)
    assert run.metrics["val_macro_f1"] > run.before["val_macro_f1"] + 0.3
    confusion = torch.tensor(run.metrics["val_confusion"])
    assert confusion.sum() == 48 and confusion.diag().sum() / 48 == pytest.approx(run.metrics["val_accuracy"])
    assert (run.dir / "confusion.png").is_file() and "confusion.png" in (run.dir / "report.md").read_text()
    assert "examples_per_s" in run.history[1]
    # LoRA went on the attention projections only; the new head trains in full and is saved with the adapter
    assert json.loads((run.output / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert json.loads((run.output / "unitune.json").read_text())["labels"] == ["mixed", "negative", "positive"]
    ours = unitune.api.load_run_or_model(run.dir).model.eval()
    wrapped = {n.split(".", 4)[-1] for n, m in ours.named_modules() if hasattr(m, "base_layer")}
    assert wrapped == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}

    rows = list(csv.DictReader((sentiment / "val.csv").open()))
    assert ours.config.id2label == {0: "mixed", 1: "negative", 2: "positive"}
    peft = pytest.importorskip("peft")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    theirs = peft.PeftModel.from_pretrained(base, run.output).eval()
    tok = BertTokenizerFast.from_pretrained(tiny_bert)
    batch = tok([r["text"] for r in rows[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-5)


def test_full_fine_tuning_saves_the_classes_in_the_model_config(tiny_bert, sentiment, tmp_path):
    r = recipe(tiny_bert, sentiment, tmp_path)
    r["method"] = {"name": "full"}
    r["train"].update(steps=100, lr=1e-3)
    run = unitune.train(r)
    assert run.metrics["val_accuracy"] > run.before["val_accuracy"] + 0.2
    saved = AutoModelForSequenceClassification.from_pretrained(run.output)
    assert saved.config.id2label == {0: "mixed", 1: "negative", 2: "positive"}
    assert load_recipe({"objective": {"name": "classify"}, "method": {"name": "full"}}).train.lr == 5e-5


def test_multi_label_rows_train_a_multi_label_classifier(tiny_bert, sentiment, tmp_path):
    # "mixed" becomes both labels: a row may hold several classes, joined by label_separator
    out = tmp_path / "multi"
    out.mkdir()
    for split in ("train", "val"):
        rows = list(csv.DictReader((sentiment / f"{split}.csv").open()))
        write_csv(out / f"{split}.csv", [{"text": r["text"], "label": "positive|negative" if r["label"] == "mixed"
                                          else r["label"]} for r in rows])
    r = recipe(tiny_bert, out, tmp_path)
    r["method"] = {"name": "full"}
    r["objective"]["multi_label"] = True
    r["train"].update(steps=150, lr=3e-3)
    run = unitune.train(r)
    # a random head says yes to nearly every class at first: micro-F1 starts high, exact sets do not
    assert run.metrics["val_accuracy"] > run.before["val_accuracy"] + 0.3, (run.before, run.metrics)
    assert run.metrics["val_micro_f1"] > run.before["val_micro_f1"] and run.metrics["val_loss"] < run.before["val_loss"]
    saved = AutoModelForSequenceClassification.from_pretrained(run.output)
    assert saved.config.problem_type == "multi_label_classification" and saved.config.num_labels == 2


def test_a_decoder_learns_as_a_classifier_too(tiny_llama, sentiment, tmp_path, tokenizer):
    # the tiny tokenizer has none of the words: a decoder then sees byte pieces, and still learns the rule
    r = recipe(tiny_llama, sentiment, tmp_path, target_modules="all-linear")
    r["train"].update(steps=40, lr=5e-3)
    r["data"]["max_length"] = 96
    run = unitune.train(r)
    assert run.recipe.method.modules_to_save == ["score"]
    assert run.metrics["val_accuracy"] > run.before["val_accuracy"] + 0.2, (run.before, run.metrics)


def examples(labels: list, where: str = "f.csv") -> list[classify.Labelled]:
    return [classify.Labelled([1, 2], None, y, f"{where}:{i + 2}", False) for i, y in enumerate(labels)]


def test_label_sets():
    cfg = classify.Config()
    train = examples(["b", "a", "c", "a"])
    assert classify.labels(train, [], cfg) == ["a", "b", "c"] and [e.target for e in train] == [1, 0, 2, 0]
    ints = examples([10, 2, 2.0, "1"])  # integers in numeric order; 2.0 (a CSV read as floats) is class 2
    assert classify.labels(ints, [], cfg) == ["1", "2", "10"] and [e.target for e in ints] == [2, 1, 1, 0]
    ordered = classify.Config(labels=["pos", "neg"])
    assert classify.labels(examples(["neg", "pos"]), [], ordered) == ["pos", "neg"]
    with pytest.raises(DataError, match=r"val.csv:3: label 'neutral' is not one of the training data's labels"):
        classify.labels(examples(["pos", "neg"]), examples(["pos", "neutral"], "val.csv"), cfg)
    with pytest.raises(DataError, match="f.csv:2: label True"):
        classify.labels(examples([True, "a"]), [], cfg)
    with pytest.raises(DataError, match="multi_label=true"):
        classify.labels(examples([["a", "b"], "a"]), [], cfg)
    with pytest.raises(DataError, match="one class"):
        classify.labels(examples(["a", "a"]), [], cfg)
    multi = classify.Config(multi_label=True)
    rows = examples([["x", "y"], "y|z", []])
    assert classify.labels(rows, [], multi) == ["x", "y", "z"]
    assert [e.target for e in rows] == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_balanced_class_weights_are_scikit_learns():
    cfg = classify.Config(class_weights="balanced")
    classify.labels(examples(["a"] * 6 + ["b"] * 2), [], cfg)
    assert cfg._weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    with pytest.raises(DataError, match="3 weights for 2 classes"):
        classify.labels(examples(["a", "b"]), [], classify.Config(class_weights=[1.0, 2.0, 3.0]))
    # a weighted loss is the per-example cross-entropy times its class's weight
    out, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    plain = classify.losses(out, target, classify.Config())
    assert classify.losses(out, target, cfg) == pytest.approx((plain * torch.tensor([8 / 12, 2.0])).tolist())


def test_scores_by_hand():
    confusion = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 neither occurs nor is predicted
    s = classify.scores(confusion)
    assert s["accuracy"] == pytest.approx(7 / 10)
    f1_0, f1_1 = 2 * 5 / (6 + 7), 2 * 2 / (4 + 3)
    assert s["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = classify.multi_label_scores(pred, target)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["macro_f1"] == pytest.approx((2 * 2 / (4 + 0 + 0) + 0.0) / 2)


def test_bad_rows_name_their_file_and_line(tiny_bert, tmp_path):
    tok = BertTokenizerFast.from_pretrained(tiny_bert)
    data = unitune.config.DataConfig()
    with pytest.raises(DataError, match=r"t.csv:4: no 'label'"):
        classify.example(Row({"text": "good"}, "t.csv:4"), tok, data, frozenset())
    with pytest.raises(DataError, match=r"t.csv:5: 'text' is empty"):
        classify.example(Row({"text": None, "label": "a"}, "t.csv:5"), tok, data, frozenset())
    pair = classify.example(Row({"text": "good film", "text_pair": "bad plot", "label": "a"}, "t.csv:6"), tok, data,
                            frozenset())
    assert pair.token_type_ids.count(1) == 3  # the second segment: bad plot [SEP]
    short = data.model_copy(update={"max_length": 4, "truncation": "drop"})
    assert classify.example(Row({"text": "the film was very good", "label": "a"}, "t.csv:7"), tok, short,
                            frozenset()) is None


def test_recipe_errors():
    with pytest.raises(RecipeError, match="model.kind=causal-lm, but objective.name=classify trains a seq-cls model"):
        load_recipe({"model": {"kind": "causal-lm"}, "objective": {"name": "classify"}})
    assert load_recipe({}).model.kind == "causal-lm" and load_recipe({}).train.lr == 2e-4


def test_default_targets_are_the_familys_attention_projections(tiny_bert, tiny_llama):
    bert = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert attention_projections(bert) == ["query", "key", "value", "attention.output.dense"]
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    assert attention_projections(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="set method.target_modules"):
        attention_projections(torch.nn.Sequential(torch.nn.Linear(2, 2)))
