"""The Python API: the CLI's verbs as functions.

    run = unitune.train("recipes/quickstart.yaml", ["train.steps=50"])
    run.metrics["exact_match"], run.dir / "adapter"
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence

from unitune import atomic
from unitune.config import DataConfig, ModelConfig, Recipe, RecipeError, load_recipe, save_recipe
from unitune.data import Batches, DataBundle, build_data, preference, replay
from unitune.data.files import Row
from unitune.data.formats import template_roles
from unitune.data.packing import packs_exactly
from unitune.engine import distributed, resume as resuming
from unitune.engine.anchor import Anchor
from unitune.engine.loop import is_main_process, total_steps, train_loop
from unitune.engine.memory import tune_cpu_allocator
from unitune.engine.precision import pick_device, resolve_precision
from unitune.engine.precompute import precompute_for_run
from unitune.eval import retention
from unitune.eval.metrics import generation_metrics, loss_metrics
from unitune.eval.report import (before_after_table, plot_before_after, plot_confusion, plot_loss, plot_metrics,
                                 write_report)
from unitune.methods import apply_method, io, layer_quantizer, lr_scale, method_footprint, reference
from unitune.models import LoadedModel, image_kind, load_model, saved_kind, vision
from unitune.models.loader import load_tokenizer, model_path
from unitune.objectives import OBJECTIVES
from unitune.objectives.reward import rewards
from unitune.privacy import dp
from unitune.rl.rewards import load_function


@dataclass
class Run:
    dir: Path
    recipe: Recipe
    before: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the final evaluation
    history: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def output(self) -> Path:
        """The trained artefact: `adapter/` (PEFT format) or `model/` (HF format)."""
        return self.dir / ("adapter" if io.is_adapter(self.recipe.method) else "model")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _numbered(base: Path) -> list[Path]:
    """base, base-2, base-3, ... that exist, oldest first."""
    pattern = re.compile(re.escape(base.name) + r"(?:-(\d+))?$")
    found = [(int(m.group(1) or 1), p) for p in base.parent.glob(base.name + "*") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def choose_run_dir(recipe: Recipe, resume: bool) -> Path:
    base = Path(recipe.output.dir) / (recipe.output.name or "run")
    existing = _numbered(base)
    if resume:
        with_ckpt = [p for p in existing if any((p / "checkpoints").glob("step-*"))]
        if not with_ckpt:
            raise FileNotFoundError(f"nothing to resume: no checkpoint under {base}* (set train.save_every to write them)")
        return with_ckpt[-1]
    if recipe.output.overwrite and base.exists():
        atomic.remove_tree(base)
    if not base.exists() or not any(base.iterdir()):
        return base
    # Never overwrite an earlier run: the next free numbered name instead.
    n = max(int(p.name.rsplit("-", 1)[1]) if p != base else 1 for p in existing) + 1
    return base.with_name(f"{base.name}-{n}")


def count_params(model: torch.nn.Module) -> dict:
    # Quantized layers hold their weights as buffers: count the weights they stand for.
    quantized = sum(m.in_features * m.out_features for m in model.modules() if getattr(m, "quantized", False))
    total = sum(p.numel() for p in model.parameters()) + quantized
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def precision(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; `auto` keeps image models in fp32 on a CPU (bf16 autocast slows convolutions)."""
    return resolve_precision(recipe.train.precision, device, cpu_bf16=not image_kind(recipe.model.kind))


def objective_of(recipe: Recipe):
    return OBJECTIVES[recipe.objective.name]


def _num_labels(recipe: Recipe) -> int | None:
    """The outputs of the objective's head when it fixes them (a reward model: 1)."""
    return getattr(objective_of(recipe), "NUM_LABELS", None)


def load_with_data(recipe: Recipe, device, quantize=None) -> tuple[LoadedModel, DataBundle, list[str] | None]:
    """The recipe's data, then its model as the objective trains it (a causal LM, or a classifier whose head
    has one output per class the training data holds), and those classes (None for other objectives)."""
    seed_everything(recipe.train.seed)
    objective = objective_of(recipe)
    image = image_kind(recipe.model.kind)
    # what turns rows into inputs, known before the model is built (its head depends on the data's classes)
    processor = image.processor(recipe.model, recipe.data) if image else \
        load_tokenizer(model_path(recipe.model), recipe.model)
    data = build_data(recipe.data, processor, recipe.train.seed, objective.example)
    labels = objective.labels(data.train, data.val, recipe.objective) if hasattr(objective, "labels") else None
    if labels:
        data.stats["classes"] = len(labels)
    seed_everything(recipe.train.seed)
    multi_label = getattr(recipe.objective, "multi_label", False)
    if image:
        if quantize:
            raise RecipeError(f"method.name={recipe.method.name} quantizes a language model's linear layers; an image "
                              "model trains with lora, adapter, bitfit, partial, probe or full")
        return image.load(recipe.model, processor, labels, device, recipe.train.seed, multi_label), data, labels
    loaded = load_model(recipe.model, device, quantize, _num_labels(recipe), labels, multi_label, processor)
    return loaded, data, labels


def _new_head(loaded: LoadedModel) -> list[str]:
    """The modules a classifier adds to its backbone (a reward model's `score`, an image classifier's `fc`),
    whose weights the pretrained checkpoint does not have."""
    model = loaded.model
    if loaded.head or io.task_type(model) != "SEQ_CLS":
        return loaded.head
    return [n for n, m in model.named_children() if n != model.base_model_prefix and any(True for _ in m.parameters())]


def prepare(recipe: Recipe, device: torch.device) -> tuple[LoadedModel, DataBundle]:
    loaded, data, labels = load_with_data(recipe, device, layer_quantizer(recipe.method))  # QLoRA: quantized as it loads
    seed_everything(recipe.train.seed)
    # A new head trains in full under every method and never gets an adapter: in an adapter, as PEFT's
    # SEQ_CLS task does, it is a module to save (a trained copy beside the frozen original).
    loaded.head = head = _new_head(loaded)
    if head:
        classes = f"{len(labels)} classes ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})" if labels \
            else f"{loaded.model.config.num_labels} output"
        print(f"unitune: new head {', '.join(head)} for {classes}, trained in full", flush=True)
    if recipe.method.name == "probe" and not head:
        raise RecipeError(f"method.name=probe trains a new task head alone, and objective.name={recipe.objective.name} "
                          "adds none: use it with objective.name=classify")
    adapter = io.is_adapter(recipe.method)
    if head and adapter:
        if "modules_to_save" not in type(recipe.method).model_fields:
            raise RecipeError(f"objective.name={recipe.objective.name} trains a new '{head[0]}' head, which "
                              f"method.name={recipe.method.name} cannot save beside its adapter: use lora, or a method "
                              "that saves the whole model (full, bitfit, layernorm, partial)")
        recipe.method.modules_to_save = list(dict.fromkeys([*(recipe.method.modules_to_save or []), *head]))
    loaded.model = apply_method(loaded.model, recipe.method, loaded.tokenizer)
    for name in head if not adapter else []:
        loaded.model.get_submodule(name).requires_grad_(True)
    if image_kind(recipe.model.kind) and (frozen := vision.freeze_batch_norms(loaded.model)):
        print(f"unitune: {frozen} batch norms with frozen parameters normalise with the loaded model's statistics", flush=True)
    return loaded, data


def _batches(recipe: Recipe, examples, pad_id: int, batch_size: int, model: torch.nn.Module) -> Batches:
    objective = objective_of(recipe)
    if recipe.data.packing and not objective.PACKS:
        recipe.data.packing = False  # pairs and the like come in padded batches
    if recipe.data.packing and (why := packs_exactly(model)) is not True:
        print(f"unitune: {model.config.model_type} cannot pack exactly ({why}); training on padded batches", flush=True)
        recipe.data.packing = False  # decided once: one notice, and run.recipe says what ran
    return Batches(examples, batch_size, recipe.data.packing, recipe.data.max_length, pad_id, recipe.train.seed,
                   objective.collate)


def needs_ref(recipe: Recipe) -> bool:
    """Whether the objective, as configured, compares the policy with a reference (DPO, KTO; GRPO with beta > 0)."""
    objective = objective_of(recipe)
    if hasattr(objective, "needs_ref"):
        return objective.needs_ref(recipe.objective)
    return getattr(objective, "NEEDS_REF", False)


def _precomputed():
    raise RuntimeError("objective.precompute_ref: a batch without its precomputed reference log-probs")


def make_evaluator(recipe: Recipe, loaded: LoadedModel, val, device, amp, ref, samples_out: list | None = None,
                   retained: dict | None = None):
    """A closure computing every validation metric the recipe's data allows, and the retention sets'."""
    task = _task_evaluator(recipe, loaded, val, device, amp, ref, samples_out)
    if not retained:
        return task
    return lambda: {**(task() if task else {}),
                    **retention.metrics(loaded.model, loaded.tokenizer, retained, recipe, device, amp)}


def _task_evaluator(recipe: Recipe, loaded: LoadedModel, val, device, amp, ref, samples_out: list | None = None):
    if not val:
        return None
    objective = objective_of(recipe)
    if hasattr(objective, "evaluate"):  # an online objective measures what it generates, not a loss
        return lambda: objective.evaluate(loaded.model, loaded.tokenizer, val, recipe, device, amp)
    batches = _batches(recipe, val, loaded.tokenizer.pad_token_id, recipe.eval.batch_size, loaded.model)
    ev = recipe.eval
    for spec in ev.scorers:  # a scorer that cannot load fails now, not after the first epoch
        load_function(spec, "eval.scorers function")

    def evaluate() -> dict:
        metrics = loss_metrics(loaded.model, batches, objective_of(recipe), recipe.objective, ref, device, amp)
        if ev.generate:
            scores, samples = generation_metrics(loaded.model, loaded.tokenizer, val, ev.generate, ev.max_new_tokens,
                                                 ev.batch_size, ev.temperature, ev.scorers)
            metrics.update(scores)
            if samples:
                s = samples[0]
                print(f"\n  sample | prompt: {s['prompt'][:120]!r}\n         | answer: {s['prediction'][:120]!r}"
                      f"\n         | expected: {s['reference'][:120]!r}", flush=True)
            if samples_out is not None:
                samples_out[:] = samples
        return metrics

    return evaluate


def save_output(run: Run, loaded: LoadedModel) -> None:
    with atomic.directory(run.output) as tmp:  # the previous output stays whole until the new one is
        if io.is_adapter(run.recipe.method):
            io.save_adapter(loaded.model, tmp, run.recipe.method, loaded.source, loaded.info)
        elif loaded.info:  # an image classifier or a detector
            vision.save(loaded, tmp)
        else:
            loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, resume: bool = False,
          force: bool = False, on_eval=None) -> Run:
    """Train from a recipe. `resume` continues the latest run of this recipe from its last checkpoint;
    a change that would alter its trajectory (recipe or data) is refused unless `force`. `on_eval(step,
    metrics)` is called after every evaluation (a hyperparameter search reports and prunes there)."""
    recipe = load_recipe(recipe, overrides)
    if distributed.processes() > 1 and hasattr(objective_of(recipe), "source"):
        raise RecipeError(f"objective.name={recipe.objective.name} generates its batches as it trains, which does not "
                          "run on several processes yet: start it as one process")
    device = distributed.setup(recipe.train.device) or pick_device(recipe.train.device)
    amp = precision(recipe, device)
    if device.type == "cpu" and recipe.train.lean_cpu_memory:
        tune_cpu_allocator()
    run_dir = distributed.same_everywhere(choose_run_dir(recipe, resume) if is_main_process() else None)
    if is_main_process():  # (the others would take its temp files for a dead run's)
        atomic.recover(run_dir)  # a kill while the output or a log was being replaced
    if resume:
        resuming.check_recipe(load_recipe(run_dir / "recipe.yaml"), recipe, force)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_recipe(recipe, run_dir / "recipe.yaml")
    print(f"unitune: run directory {run_dir}", flush=True)

    loaded, data = prepare(recipe, device)
    if resume:
        resuming.check_data(run_dir, recipe, force)
    elif is_main_process():
        resuming.record_data(run_dir, recipe)
    run = Run(run_dir, recipe, params=count_params(loaded.model), stats=data.stats)
    print(f"unitune: {recipe.method.name}: {run.params['trainable']:,} trainable of {run.params['total']:,} parameters "
          f"({100 * run.params['trainable'] / run.params['total']:.3f}%); optimizer state "
          f"{run.params['trainable'] * 8 / 2**20:.1f} MiB", flush=True)
    if footprint := method_footprint(recipe.method, loaded.model):
        print(f"unitune: {footprint}", flush=True)
    print("unitune: data: " + ", ".join(f"{k}={v}" for k, v in data.stats.items()), flush=True)
    if data.stats["truncated"] or data.stats["dropped_too_long"]:
        print(f"unitune: {data.stats['truncated'] + data.stats['dropped_too_long']} training examples were longer than "
              f"data.max_length={recipe.data.max_length}: {data.stats['truncated']} cut, {data.stats['dropped_too_long']} "
              f"dropped (data.truncation={recipe.data.truncation})", flush=True)
    if recipe.train.early_stopping_patience and not data.val:
        raise ValueError("train.early_stopping_patience needs validation data: set data.validation or data.val_ratio")
    if recipe.train.gradient_checkpointing:
        model, kwargs = loaded.model, {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 renamed the switch
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise RecipeError(f"train.gradient_checkpointing is for transformers models; {type(model).__name__} "
                              "(a torchvision or timm model) trains without it: set it to false")

    objective = objective_of(recipe)
    started = time.perf_counter()
    if hasattr(objective, "cache_features") and loaded.head and objective.cache_features(
            loaded.model, loaded.head[0], data.train, data.val, loaded.tokenizer.pad_token_id, recipe, device, amp):
        run.stats["feature_cache_s"] = round(time.perf_counter() - started, 2)
        print(f"unitune: only the head trains: its inputs computed once for {len(data.train) + len(data.val)} examples "
              f"in {run.stats['feature_cache_s']} s (no augmentation, no backbone passes in training)", flush=True)
    if recipe.data.replay:  # rehearse general data beside the task (forgetting)
        base = reference(loaded.model, recipe.method, untrained=True)  # before the first step: the base model
        data.train = data.train + replay.examples(recipe, loaded.tokenizer, base, objective.example, len(data.train),
                                                  run_dir, data.stats)
        print(f"unitune: replay: {data.stats['replay_examples']} examples from {recipe.data.replay_from} "
              f"({data.stats['replay_pool']} distinct) join {len(data.train) - data.stats['replay_examples']} "
              "training examples", flush=True)
    private = None
    if recipe.privacy.enabled:  # DP-SGD: Poisson-sampled examples, each gradient clipped, noise
        dp.check(recipe, loaded.model, objective, distributed.processes())
        batches = dp.PoissonBatches(data.train, recipe.train.batch_size, loaded.tokenizer.pad_token_id,
                                    recipe.data.max_length, recipe.train.seed, objective.collate)
        private = dp.DPSGD(recipe.privacy, batches, total_steps(recipe.train, len(batches)))
        print(f"unitune: {private.describe()}", flush=True)
    else:
        batches = None if hasattr(objective, "source") else \
            _batches(recipe, data.train, loaded.tokenizer.pad_token_id, recipe.train.batch_size, loaded.model)
    ref = None
    if getattr(recipe.objective, "precompute_ref", False):
        # the model has not trained yet (a resumed one loads its checkpoint in the loop), so it is its own reference
        precompute_for_run(objective, recipe, reference(loaded.model, recipe.method, untrained=True), batches, data.val,
                           device, amp)
        ref = _precomputed
    elif needs_ref(recipe):
        ref = reference(loaded.model, recipe.method)
    if hasattr(objective, "source"):  # an online objective generates its batches with the policy as it trains
        batches = objective.source(data.train, loaded.model, loaded.tokenizer, recipe, ref, device, amp)
    samples: list[dict] = []
    retained = retention.load_sets(recipe, loaded.tokenizer)
    evaluate = make_evaluator(recipe, loaded, data.val, device, amp, ref, samples, retained)

    def loss_fn(model, batch):  # looked up at each call, so a test may wrap the objective's loss
        return objective.loss(model, batch, recipe.objective, ref)

    no_sync = root = None
    if distributed.active():  # data parallelism: each process takes its share of every batch, DDP syncs gradients
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loaded.model.modules()):
            if device.type == "cuda":  # batch statistics over the whole batch, as one process computes them
                loaded.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(loaded.model)
            else:
                print("unitune: batch norms normalise with each process's share of the batch (SyncBatchNorm needs "
                      "GPUs): close to, not equal to, one process", flush=True)
        batches.shard = (distributed.rank(), distributed.processes())
        if recipe.train.distributed == "fsdp":  # shard weights, gradients and optimizer state
            loss_fn, no_sync, root = distributed.shard(loaded.model, loss_fn)
            evaluate = _gathered(evaluate, root) if evaluate else None
        else:
            loss_fn, no_sync = distributed.wrap(loaded.model, loss_fn, device)

    anchor = Anchor(loaded.model, recipe.train.l2_sp, loaded.head) if recipe.train.l2_sp else None
    history = train_loop(loaded.model, loss_fn, objective.count, batches, recipe.train, run_dir, evaluate, device,
                         amp, resume=resume, eval_at_start=recipe.eval.before,
                         lr_scale=lr_scale(recipe.method, recipe.train.lr), anchor=anchor, on_eval=on_eval,
                         no_sync=no_sync, private=private)
    run.history = history.records
    if root is not None:
        distributed.consolidate(root)  # the model whole again: the output, report and samples as one process's
    for name in getattr(objective, "TRAINED_BESIDE", ()):  # PPO's value head: kept in the run, not in the output
        head = loaded.model._modules.pop(name)
        if is_main_process():
            with atomic.temp_path(run_dir / f"{name}.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp)
    evals = [r for r in history.records if r.get("split") == "val"]
    run.before = next((r for r in evals if r["step"] == 0), {})
    run.metrics = history.best or (evals[-1] if evals else {})

    if is_main_process():
        save_output(run, loaded)
        plot_loss(run.history, run_dir / "loss.png")
        plot_metrics(run.history, run_dir / "metrics.png")
        plot_before_after(run.before, run.metrics, run_dir / "before_after.png")
        if "val_confusion" in run.metrics:  # a classifier's
            plot_confusion(run.metrics["val_confusion"], labels_of(loaded), run_dir / "confusion.png")
        if hasattr(objective, "figures") and data.val:  # a detector's predictions, drawn
            objective.figures(loaded, data.val, recipe, run_dir, device, amp)
        table = before_after_table(run.before, run.metrics, ("before", "after"))
        notes = [f"early stopping kept the weights of step {history.best['step']}, its best evaluation "
                 f"({recipe.train.early_stopping_metric}={history.best[recipe.train.early_stopping_metric]:.4f})"
                 ] if history.best else []
        notes += retention.summary(run.before, run.metrics)
        if private:
            notes.append(f"{private.describe()}; spent: epsilon {private.epsilon():.3f}")
        write_report(run_dir, table, samples, data.stats, run.params, notes)
        print(f"\n{table}\n\nunitune: saved {run.output} and {run_dir / 'report.md'}", flush=True)
    if distributed.active():
        distributed.barrier()  # every process ends after rank 0's output is written
        distributed.teardown()
    return run


def _gathered(evaluate, root):
    def run():
        with distributed.whole(root):
            return evaluate()
    return run


def labels_of(loaded: LoadedModel) -> list[str]:
    """A classifier's classes, in output order."""
    if loaded.info:
        return loaded.info["labels"]
    config = loaded.model.config
    return [config.id2label[i] for i in range(config.num_labels)]


def load_run_or_model(target: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A run directory (its base model with the trained adapter or weights), or any model `load_model` takes."""
    path = Path(target)
    if (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
        if kind := saved_kind(path / "model"):
            return kind.load_saved(path / "model", device)
        if (path / "model").is_dir():  # a saved classifier's config holds its classes
            saved = recipe.model.model_copy(update={"name": str(path / "model"), "gguf_file": None, "random_init": False})
            return load_model(saved, device, num_labels=_num_labels(recipe))
        if not (path / "adapter").is_dir():
            raise FileNotFoundError(f"{path} holds no adapter/ or model/: did its training finish?")
        adapter = path / "adapter"
        kind = saved_kind(adapter)
        loaded = kind.load_adapter_base(adapter, device) if kind else load_model(recipe.model, device, **_head(adapter))
        loaded.model = io.load_adapter(loaded.model, adapter)
        return loaded
    if (path / "adapter_config.json").is_file():
        base = io.adapter_base(path)  # unitune.json first: PEFT's field names a hub id for built-ins
        kind = saved_kind(path)
        loaded = kind.load_adapter_base(path, device) if kind else load_model(ModelConfig(name=base), device, **_head(path))
        loaded.model = io.load_adapter(loaded.model, path)
        return loaded
    if kind := saved_kind(path):  # a run's model/ folder of an image classifier or detector
        return kind.load_saved(path, device)
    return load_model(ModelConfig(name=str(target)), device)


def _head(adapter: Path) -> dict:
    """How to rebuild the classifier a SEQ_CLS adapter was trained on: its classes, as unitune saves them,
    or else (an adapter from PEFT) the rows of the head it saves; nothing for any other task."""
    if json.loads((adapter / "adapter_config.json").read_text()).get("task_type") != "SEQ_CLS":
        return {}
    own = json.loads((adapter / io.OWN_FILE).read_text()) if (adapter / io.OWN_FILE).is_file() else {}
    if own.get("labels"):
        return {"labels": own["labels"], "multi_label": own.get("problem_type") == "multi_label_classification"}
    heads = ("score.weight", "classifier.weight", "out_proj.weight")
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(heads)]
    if not rows:
        raise ValueError(f"{adapter}: a SEQ_CLS adapter without its head ({', '.join(heads)}), so its classifier "
                         "cannot be rebuilt; save the head with the adapter (modules_to_save)")
    return {"num_labels": rows[0]}


class RewardModel:
    """A trained reward model (a run directory, or the adapter directory of one) as a reward function.
    A pair is rendered as training rendered pairs (data/preference.py): a string prompt is one user turn
    and a string completion one assistant turn, or both are message lists; the run's system prompt, chat
    template, max_length and truncation apply."""

    def __init__(self, target: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        path = Path(target)
        loaded = load_run_or_model(path, device)
        self.model, self.tok, self.device, self.batch_size = loaded.model.eval(), loaded.tokenizer, device, batch_size
        if io.task_type(self.model) != "SEQ_CLS" or self.model.config.num_labels != 1:
            raise ValueError(f"{target} is not a reward model (a sequence classifier with one output): train one "
                             "with objective.name=reward")
        self.data = load_recipe(path / "recipe.yaml").data if (path / "recipe.yaml").is_file() else DataConfig()
        self.roles = template_roles(self.tok)

    @torch.no_grad()
    def __call__(self, prompts: list[str | list[dict]], completions: list[str | list[dict]]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions; give one of each "
                             "per pair")
        data, tok = self.data, self.tok
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = Row({"prompt": prompt, "completion": completion, "label": True}, f"score: pair {i}")
            ex = preference.tokenize_unpaired(tok, preference.to_unpaired(row, data.system_prompt, self.roles),
                                              data.max_length, data.truncation)
            if ex is None:
                raise ValueError(f"{row.where}: longer than data.max_length={data.max_length} with "
                                 f"data.truncation={data.truncation}; shorten it")
            rows.append(torch.tensor(ex.prompt_ids + ex.completion_ids))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar lengths: little padding
        out = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids = pad_sequence([rows[i] for i in chunk], batch_first=True, padding_value=tok.pad_token_id)
            mask = pad_sequence([torch.ones_like(rows[i]) for i in chunk], batch_first=True)
            batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
            for i, r in zip(chunk, rewards(self.model, batch)):
                out[i] = float(r)
        return out


def score(target: str | Path, prompts: list[str | list[dict]], completions: list[str | list[dict]],
          batch_size: int = 16, device: torch.device | str = "cpu") -> list[float]:
    """The rewards a reward model (a run directory, or the adapter directory of one) gives each completion
    of its prompt; see RewardModel."""
    return RewardModel(target, device, batch_size)(prompts, completions)


def merge(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Fold a run's adapter into its base and write a plain transformers model directory."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "merged"
    loaded = load_run_or_model(run_dir)
    model = io.merge_and_unload(loaded.model)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return out


def evaluate(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, run: str | Path | None = None,
             judge: str | None = None, rubric: str | None = None) -> dict:
    """Validation metrics of the base model and, given a run directory, of the tuned model, side by side.
    With a `judge` (as `unitune judge` takes one), the tuned model's answers are judged against the base
    model's, each pair in both orders: results["judge"] holds the win rate and the judge's biases."""
    recipe = load_recipe(recipe, overrides)
    if judge and not (run and recipe.eval.generate):
        raise RecipeError("a judge compares the tuned model's answers with the base model's: give --run and "
                          "keep eval.generate > 0")
    device = pick_device(recipe.train.device)
    amp = precision(recipe, device)
    loaded, data, _ = load_with_data(recipe, device)
    retained = retention.load_sets(recipe, loaded.tokenizer)
    val = data.val or data.train
    # The reference of a preference objective is the base model, for the base and the tuned alike.
    base = copy.deepcopy(loaded.model).eval() if run and needs_ref(recipe) else loaded.model
    ref = (lambda: contextlib.nullcontext(base)) if needs_ref(recipe) else None
    answers: dict[str, list[dict]] = {"base": [], "tuned": []}
    results = {"base": make_evaluator(recipe, loaded, val, device, amp, ref, answers["base"], retained)()}
    if run:
        loaded.model = io.load_adapter(loaded.model, Path(run) / "adapter") if (Path(run) / "adapter").is_dir() \
            else load_run_or_model(run, device).model
        results["tuned"] = make_evaluator(recipe, loaded, val, device, amp, ref, answers["tuned"], retained)()
    if judge:
        del loaded
        results["judge"] = judge_answers(judge, rubric, answers["tuned"], answers["base"], recipe.train.device)
    return results


def judge_answers(spec: str, rubric: str | None, tuned: list[dict], base: list[dict], device: str) -> dict:
    """The tuned model's answers against the base model's, per prompt, judged in both orders: how often each
    wins (a verdict both orders agree on), ties, inconsistent verdicts, and the judge's biases."""
    from unitune.feedback import judge

    items = [judge.Item(i, t["prompt"], t["prediction"], b["prediction"], f"validation row {i + 1}",
                        [{"role": "user", "content": t["prompt"]}]) for i, (t, b) in enumerate(zip(tuned, base))]
    rep = judge.report(judge.judge_pairs(judge.load_judge(spec, rubric, device), items, progress=True))
    n, outcomes = rep["pairs"], rep["outcomes"]
    return {"judge": spec, "pairs": n, "win_rate": outcomes["a"] / n, "loss_rate": outcomes["b"] / n,
            "tie_rate": outcomes["tie"] / n, "inconsistent_rate": outcomes["inconsistent"] / n,
            "agreement": rep["agreement"], "position_bias": rep["position_bias"], "length": rep["length"]}
