import pytest

from unitune.config import RecipeError, load_recipe
from unitune.methods.lora import Config as LoraConfig


def test_defaults_and_method_section():
    r = load_recipe({"data": {"train": "x.jsonl"}})
    assert r.train.lr == 2e-4 and r.data.packing is True
    assert isinstance(r.method, LoraConfig) and r.method.r == 8


@pytest.mark.parametrize("recipe,key,suggestion", [
    ({"train": {"learning_rat": 1e-3}}, "train.learning_rat", "lr"),  # near a transformers name for ours
    ({"method": {"name": "lora", "rank": 4}}, "method.rank", "r"),
    ({"method": {"name": "lora", "lora_alpha": 16}}, "method.lora_alpha", "alpha"),
    ({"train": {"batchsize": 4}}, "train.batchsize", "batch_size"),
    ({"data": {"max_lenght": 64}}, "data.max_lenght", "max_length"),
    ({"train": {"save_steps": 50}}, "train.save_steps", "save_every"),
    ({"trian": {}}, "trian", "train"),
])
def test_unknown_key_names_the_closest_valid_one(recipe, key, suggestion):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert str(err.value).startswith(f"unknown recipe key '{key}': did you mean '{suggestion}'? valid keys: ")


def test_unknown_key_far_from_every_valid_one_gets_no_guess():
    with pytest.raises(RecipeError) as err:
        load_recipe({"train": {"packing": True}})  # a looser match would offer 'precision'
    assert "did you mean" not in str(err.value) and "valid keys: steps, epochs" in str(err.value)


def test_overrides_parse_as_yaml_values():
    r = load_recipe({"train": {"lr": 1e-3}}, ["train.lr=5e-4", "data.packing=false", "method.name=full",
                                               "train.betas=[0.9, 0.95]", "train.max_grad_norm=null"])
    assert r.train.lr == 5e-4 and r.data.packing is False and r.method.name == "full"
    assert r.train.betas == (0.9, 0.95) and r.train.max_grad_norm is None
    assert load_recipe({}, ["train.lr=1e-3"]).train.lr == 1e-3


def test_overrides_are_typed_by_the_field_they_set():
    r = load_recipe({}, ["data.system_prompt=Answer: x", "model.name=1.5", "output.name=2024", "model.dtype=float32",
                         "model.gguf_file=null", "method.target_modules=[q_proj,v_proj]"])
    assert r.data.system_prompt == "Answer: x" and r.model.name == "1.5" and r.output.name == "2024"
    assert r.model.dtype == "float32" and r.model.gguf_file is None
    assert r.method.target_modules == ["q_proj", "v_proj"]
    assert load_recipe({}, ["method.target_modules=all-linear"]).method.target_modules == "all-linear"
    # method.* fields come from the method the recipe names, even when an override names it afterwards.
    r = load_recipe({"data": {"packing": False}}, ["method.init_text=Extract: JSON", "method.init=text",
                                                   "method.name=prompt"])
    assert r.method.name == "prompt" and r.method.init_text == "Extract: JSON"
    r = load_recipe({"method": {"name": "adapter"}}, ["method.mlp_modules=null"])
    assert r.method.mlp_modules is None
    with pytest.raises(RecipeError, match=r"override 'train.betas=\[0.9': the value is not valid YAML"):
        load_recipe({}, ["train.betas=[0.9"])
    with pytest.raises(RecipeError, match="recipe key 'train.steps'"):
        load_recipe({}, ["train.steps=ten"])


def test_naming_another_module_sets_aside_the_files_keys_it_does_not_take(capsys):
    dpo = {"objective": {"name": "dpo", "beta": 0.2, "loss_type": "ipo", "rpo_alpha": 1.0},
           "method": {"name": "lora", "r": 4, "dropout": 0.1}}
    r = load_recipe(dpo, ["objective.name=kto", "method.name=full"])
    assert r.objective.name == "kto" and r.objective.beta == 0.2  # a key both take is kept
    assert r.method.name == "full"
    err = capsys.readouterr().err
    assert "objective.name=kto: the recipe's loss_type, rpo_alpha (dpo's) set aside" in err
    assert "method.name=full: the recipe's r, dropout (lora's) set aside" in err
    with pytest.raises(RecipeError, match="unknown recipe key 'objective.loss_type'"):
        load_recipe(dpo, ["objective.name=kto", "objective.loss_type=ipo"])  # the command line's own keys are checked
    with pytest.raises(RecipeError, match="unknown recipe key 'objective.gamma'"):
        load_recipe({"objective": {"name": "dpo", "gamma": 1}})  # and the file's, when its module is the one used


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
