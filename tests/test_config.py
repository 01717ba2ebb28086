import pytest

from unitune.config import RecipeError, load_recipe
from unitune.methods.lora import Config as LoraConfig


def test_defaults_and_method_section():
    r = load_recipe({"data": {"train": "x.jsonl"}})
    assert r.train.lr == 2e-4 and r.data.packing is True
    assert isinstance(r.method, LoraConfig) and r.method.r == 8


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.learning_rat'.*did you mean 'lr'|'train.learning_rat'"):
        load_recipe({"train": {"learning_rat": 1e-3}})
    with pytest.raises(RecipeError, match=r"'method.rank'.*valid keys: .*\br\b"):
        load_recipe({"method": {"name": "lora", "rank": 4}})
    with pytest.raises(RecipeError, match="did you mean 'train'"):
        load_recipe({"trian": {}})


def test_overrides_parse_as_yaml_values():
    r = load_recipe({"train": {"lr": 1e-3}}, ["train.lr=5e-4", "data.packing=false", "method.name=full",
                                               "train.betas=[0.9, 0.95]"])
    assert r.train.lr == 5e-4 and r.data.packing is False and r.method.name == "full"
    assert r.train.betas == (0.9, 0.95)


def test_bad_values_and_unknown_method():
    with pytest.raises(RecipeError, match="train.lr"):
        load_recipe({"train": {"lr": -1}})
    with pytest.raises(RecipeError, match="unknown method 'lorra'.*lora"):
        load_recipe({"method": {"name": "lorra"}})
    with pytest.raises(RecipeError, match="not of the form"):
        load_recipe({}, ["train.lr"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    good = tmp_path / "mine.yaml"
    good.write_text("train:\n  steps: 3\n")
    assert load_recipe(good).output.name == "mine"
