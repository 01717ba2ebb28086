"""The recipe schema: typed sections with defaults, YAML + dotted overrides, errors that name the key.

A recipe has seven sections (model, data, method, objective, train, eval, output). Every field
has a default where one makes sense; an unknown key is an error naming the closest valid one.
The `method` section is validated against the config class of the method it names, so each
method owns its own fields (see unitune/methods/__init__.py).
"""
from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unitune import atomic


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says which key and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # built-in name, HF model directory, .gguf file, an image classifier's architecture (resnet18,
    # mobilenet_v2, efficientnet_b0, ... from torchvision; timm/<name> with timm installed), or a detector's
    # (fasterrcnn_mobilenet_v2_fpn, fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, fcos_resnet50_fpn, ...)
    name: str = "smollm2-135m-instruct"
    gguf_file: str | None = None  # file name inside `name` when `name` is a directory of GGUFs
    random_init: bool = False  # build from the config only, with random weights (tests)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights in memory
    trust_remote_code: bool = False
    chat_template: str | None = None  # a Jinja template or a file path; default: the tokenizer's
    # what the model is: a causal LM, a sequence classifier (a new head over the same backbone), an image
    # classifier or a detector; auto: the kind the objective trains (reward: seq-cls; classify: image-cls for
    # an image model; detect: detection)
    kind: Literal["auto", "causal-lm", "seq-cls", "image-cls", "detection"] = "auto"
    # an image model's pretrained weights: a .pth / .safetensors file (torchvision's or timm's names), or
    # `imagenet` where a package ships them (mobilenet_v2); `none`: random initialisation (from scratch)
    weights: str = "imagenet"


class DataConfig(Section):
    train: str | None = None  # JSONL / JSON / CSV / Parquet file or a `datasets` save_to_disk dir
    validation: str | None = None
    val_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    max_length: int = Field(1024, gt=1)
    # rows over max_length: prompt cuts the oldest context and keeps the final answer with its end-of-turn
    # token (right-cut answers teach a model not to stop); drop drops them; right keeps their beginning
    truncation: Literal["prompt", "drop", "right"] = "prompt"
    nothing_to_learn: Literal["error", "skip"] = "error"  # rows without an answer: stop at the first, or count and skip
    packing: bool = True  # several examples per row, no attention across their boundary
    loss_on: Literal["assistant", "all"] = "assistant"
    system_prompt: str | None = None
    max_examples: int | None = None
    generator: str | None = None  # `module:function` that writes the data files (built-in tasks)
    cache: bool = True  # tokenized examples kept in ~/.cache/unitune/data, keyed by content (data/cache.py)
    num_proc: int | None = Field(None, gt=0)  # processes tokenizing a large file; default: one per core
    # images: relative paths in a CSV / JSONL resolve against `images` (default: the file's folder)
    images: str | None = None
    image_size: int | None = Field(None, gt=0)  # square side the model sees; default: the model's (224)
    # training augmentation: crop (random resized crop, area in crop_scale), flip (horizontal); [] for none
    augment: list[Literal["crop", "flip"]] = ["crop", "flip"]
    crop_scale: tuple[float, float] = (0.35, 1.0)
    # forgetting: this fraction of the training examples comes from `replay_from` (a data file, or `chat`:
    # general prompts disjoint from eval.retention's `general`); rows without an answer are answered by the
    # base model before training (self-generated replay, kept in the run as replay.jsonl)
    replay: float = Field(0.0, ge=0.0, lt=1.0)
    replay_from: str = "chat"
    # personal data replaced by placeholders in every row before tokenizing (privacy/scrub.py): true for every
    # kind (person names where a spaCy pipeline is installed), or a list of kinds; the counts join the data stats
    scrub: bool | list[Literal["email", "phone", "card", "iban", "ip", "person"]] = False
    scrub_names_model: str | None = None  # the spaCy pipeline for names; default: en_core_web_sm if installed

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale {list(v)} must be [low, high] with 0 < low <= high <= 1 (fractions of the area)")
        return v


class TrainConfig(Section):
    steps: int | None = Field(None, gt=0)  # optimizer steps; None: `epochs` passes over the data
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)  # rows per micro-batch (a packed row holds several examples)
    grad_accum: int = Field(1, gt=0)
    lr: float | None = Field(None, gt=0)  # None: the objective's default for the method (2e-4 for most)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    l2_sp: float = Field(0.0, ge=0)  # forgetting: L2 penalty towards the starting weights (engine/anchor.py)
    lean_cpu_memory: bool = False  # CPU: freed activations go straight back to the OS (~30% lower peak, ~20% slower)
    device: str = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicate the model (DDP) or shard it (FSDP2)
    seed: int = 0
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)  # evaluations without improvement
    early_stopping_metric: str = "val_loss"
    early_stopping_mode: Literal["min", "max"] = "min"


class EvalConfig(Section):
    before: bool = True  # evaluate at step 0 so every run shows what it changed
    generate: int = Field(32, ge=0)  # validation rows to answer for exact/contains match
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    # retention sets (what the model could do before): data files of answered rows, `general`, or task suites
    # scored by code (`reasoning-gym:<dataset>`, `human-eval`); each is measured at every evaluation (loss and
    # contains / exact match of its answers; a suite's score) to show forgetting
    retention: list[str] = []
    suite_size: int = Field(50, gt=0)  # questions drawn from each task suite in retention (reasoning-gym, human-eval)
    # scoring functions (`module:function`) of the generated answers, called as RL reward functions are:
    # fn(prompts=[...], completions=[...], references=[...]) -> one float (or None) per answer; logged as
    # score_<function> (the mean over the answers it scored)
    scorers: list[str] = []


class OutputConfig(Section):
    dir: str = "runs"
    name: str | None = None  # default: the recipe file's stem
    overwrite: bool = False  # start afresh even if the run directory holds checkpoints


class PrivacyConfig(Section):
    """DP-SGD (privacy/dp.py): on when `noise_multiplier` or `target_epsilon` is set."""
    noise_multiplier: float | None = Field(None, ge=0)  # sigma: the noise's std over the clipping norm
    target_epsilon: float | None = Field(None, gt=0)  # or: the sigma that spends this epsilon over the run
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)  # C: each example's gradient clipped to this norm
    accountant: Literal["prv", "rdp"] = "prv"  # Opacus's accountants: PRV is tighter, RDP the classic bound

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: Any = None  # the named method's own config class (load_recipe validates it)
    objective: Any = None  # the named objective's own config class, likewise
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


# Names users bring from transformers' TrainingArguments and PEFT's LoraConfig: spelling alone
# cannot lead to ours (difflib answers `learning_rate` with `early_stopping_patience`).
KNOWN_AS = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "num_train_epochs": "epochs", "max_steps": "steps", "max_seq_length": "max_length",
            "lr_scheduler_type": "schedule", "logging_steps": "log_every", "eval_steps": "eval_every",
            "save_steps": "save_every", "save_total_limit": "keep_checkpoints"}


def _check_keys(data: dict, schema: type[BaseModel], where: str) -> None:
    """Name the closest valid key for every unknown one, before pydantic's generic message."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    fields = schema.model_fields
    names = {**{alias: ours for alias, ours in KNOWN_AS.items() if ours in fields}, **{f: f for f in fields}}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean '{names[close[0]]}'? " if close else ""
            raise RecipeError(f"unknown recipe key '{path}': {hint}valid keys: {', '.join(fields)}")
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, Section) and isinstance(value, dict):
            _check_keys(value, sub, path)


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"recipe key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_section(schema: type[BaseModel], data: dict, where: str) -> BaseModel:
    _check_keys(data, schema, where)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format(err, where)) from None


def plugin_config(section: str, registry: dict, data: Any, default: str) -> BaseModel:
    """A plug-in section (method, objective) validated by the Config of the module it names."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe key '{section}': expected a mapping with a 'name', got {data!r}")
    name = data.get("name", default)
    if not isinstance(name, str) or name not in registry:
        raise RecipeError(f"unknown {section} '{name}': valid {section}s: {', '.join(registry)}")
    return validate_section(registry[name].Config, {**data, "name": name}, section)


def _plugins() -> dict[str, tuple[str, dict]]:
    """Sections whose fields belong to the module they name: section -> (default name, registry)."""
    from unitune.methods import METHODS
    from unitune.objectives import OBJECTIVES

    return {"method": ("lora", METHODS), "objective": ("sft", OBJECTIVES)}


def _field_type(keys: list[str], chosen: dict[str, str]) -> Any:
    """The annotation of the field `section.key` sets (the chosen module's own Config for a plug-in section)."""
    if len(keys) != 2:
        return None
    section, key = keys
    plugins = _plugins()
    if section in plugins:
        schema = getattr(plugins[section][1].get(chosen[section]), "Config", None)
    else:
        schema = Recipe.model_fields[section].annotation if section in Recipe.model_fields else None
    fields = getattr(schema, "model_fields", {})
    return fields[key].annotation if key in fields else None


def _typed(raw: str, annotation: Any, item: str) -> Any:
    """A text field keeps the text as typed (YAML would make `Answer: x` a dict and `2024` an int),
    unless it also takes a list and gets one; numbers, booleans, lists and unknown keys parse as YAML."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    text = any(o is str or (get_origin(o) is Literal and all(isinstance(a, str) for a in get_args(o))) for o in options)
    if text and type(None) in options and raw.strip() in ("", "null", "~"):
        return None
    containers = any(get_origin(o) in (list, tuple, dict) for o in options)
    if text and not (containers and raw.lstrip().startswith(("[", "{"))):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override '{item}': the value is not valid YAML: {err}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` pairs, each value typed by the field it sets (see _typed)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        pairs.append((item, dotted.strip().split("."), raw))
    # method.* and objective.* fields belong to the chosen module, which an override may name after them.
    chosen = {}
    for section, (default, registry) in _plugins().items():
        in_file = data[section].get("name", default) if isinstance(data.get(section), dict) else default
        chosen[section] = next((raw.strip() for _, keys, raw in reversed(pairs) if keys == [section, "name"]),
                               str(in_file))
        # Naming another module from the command line (`objective.name=kto` on a DPO recipe) sets aside the
        # file's keys that module does not take (DPO's loss_type); the override's own keys are still checked.
        schema = getattr(registry.get(chosen[section]), "Config", None)
        if chosen[section] != str(in_file) and schema and isinstance(data.get(section), dict):
            dropped = [k for k in data[section] if k not in schema.model_fields]
            if dropped:
                print(f"unitune: {section}.name={chosen[section]}: the recipe's {', '.join(dropped)} "
                      f"({in_file}'s) set aside", file=sys.stderr, flush=True)
            data[section] = {k: v for k, v in data[section].items() if k in schema.model_fields}
    for item, keys, raw in pairs:
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = _typed(raw, _field_type(keys, chosen), item)
    return data


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    if isinstance(source, Recipe):
        if not overrides:
            return source
        source = source.to_dict()
    name = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        name = path.stem
    else:
        data = copy.deepcopy(dict(source))  # overrides must not edit the caller's nested dicts
    data = apply_overrides(data, list(overrides or []))
    method, objective = data.pop("method", None), data.pop("objective", None)
    recipe = validate_section(Recipe, data, "")
    from unitune.methods import method_config, packs
    from unitune.objectives import objective_config

    recipe.method = method_config(method or {"name": "lora"})
    recipe.objective = objective_config(objective or {"name": "sft"})
    if recipe.data.packing and not packs(recipe.method):
        raise RecipeError(f"method '{recipe.method.name}' puts virtual tokens before each sequence, which packed rows "
                          "cannot hold (only a row's first sequence would see them): set data.packing=false")
    if recipe.data.replay:
        if recipe.objective.name != "sft":
            raise RecipeError(f"data.replay mixes answered rows into supervised fine-tuning; objective.name="
                              f"{recipe.objective.name} learns from other data: set data.replay=0")
        same = [r for r in recipe.eval.retention if r == recipe.data.replay_from
                or Path(r).expanduser().resolve() == Path(recipe.data.replay_from).expanduser().resolve()]
        if same:
            raise RecipeError(f"data.replay_from={recipe.data.replay_from} is also in eval.retention: training on the "
                              "set that measures forgetting would measure memory instead; replay other data")
    if recipe.train.lr is None:  # resolved here, so the saved recipe says which rate ran
        recipe.train.lr = default_lr(recipe)
    recipe.model.kind = model_kind(recipe)
    if recipe.output.name is None and name:
        recipe.output.name = name
    return recipe


def default_lr(recipe: Recipe) -> float:
    """2e-4, unless the objective knows better for the method: a new classification head under LoRA
    needs ~10x more, and full fine-tuning of an encoder ~4x less (objectives/classify.py)."""
    from unitune.objectives import OBJECTIVES

    rule = getattr(OBJECTIVES[recipe.objective.name], "default_lr", None)
    return rule(recipe) if rule else 2e-4


def model_kind(recipe: Recipe) -> str:
    """The kind the objective trains; a recipe that names another is an error."""
    from unitune.objectives import OBJECTIVES

    objective = OBJECTIVES[recipe.objective.name]
    kind = objective.kind(recipe) if hasattr(objective, "kind") else getattr(objective, "KIND", "causal-lm")
    if recipe.model.kind not in ("auto", kind):
        raise RecipeError(f"model.kind={recipe.model.kind}, but objective.name={recipe.objective.name} trains a {kind} "
                          f"model: set model.kind={kind} (or auto), or choose another objective")
    return kind


def save_recipe(recipe: Recipe, path: Path) -> None:
    atomic.write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
