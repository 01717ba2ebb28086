"""Load a pretrained causal LM and its tokenizer: HF directory (safetensors), GGUF file, built-in name.

GGUF weights are dequantized by transformers' GGUF loader. That takes ~15 s for SmolLM2 and
the result can't be `save_pretrained` (transformers marks it as quantized), so the first load
writes a plain safetensors copy to a cache directory and every later load reads that (< 2 s).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

from unitune import atomic
from unitune.config import ModelConfig
from unitune.data.images import ImageProcessor
from unitune.engine.memory import release_freed_memory
from unitune.models.builtin import BUILTINS, resolve

# Used when a tokenizer has no chat template of its own (base models, tiny test tokenizers).
# Turns end with the tokenizer's EOS so a tuned base model stops after its answer, whether or
# not its vocabulary knows ChatML's <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel | nn.Module
    tokenizer: PreTrainedTokenizerBase | ImageProcessor  # the processor: an image model's is an ImageProcessor
    source: str  # what to write as base_model_name_or_path
    head: list[str] = field(default_factory=list)  # a new task head (trains in full), where the kind knows it
    info: dict = field(default_factory=dict)  # an image classifier's unitune.json (what rebuilds it)


def cache_root() -> Path:
    return Path(os.environ.get("UNITUNE_CACHE", Path.home() / ".cache" / "unitune"))


def _locate(cfg: ModelConfig) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for the recipe's model.name."""
    builtin = resolve(cfg.name)
    path = builtin if builtin is not None else Path(cfg.name).expanduser()
    if not path.exists():
        known = ", ".join(BUILTINS)
        raise FileNotFoundError(
            f"model '{cfg.name}' not found: give a Hugging Face model directory, a .gguf file, or a built-in name ({known})"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; for safetensors give the model directory")
        return path.parent, path.name
    if cfg.gguf_file:
        return path, cfg.gguf_file
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF files: set model.gguf_file to one of {ggufs}." if ggufs else ""
        raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory.{hint}")
    return path, None


@functools.lru_cache(maxsize=8)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """The file's content key, hashed once per process (the tokenizer and the model both locate it); the
    size and mtime in the key make a replaced file hash again."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _gguf_cache(folder: Path, gguf: str) -> Path:
    """Dequantize a GGUF model once into a plain safetensors directory and return it.

    Keyed by the file's content, so a replaced file never reads a stale copy; a lock file makes a
    second process that starts while the first converts wait for it and reuse its result.
    """
    src = folder / gguf
    stat = src.stat()
    out = cache_root() / "gguf" / f"{src.stem}-{_digest(src, stat.st_size, stat.st_mtime_ns)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (out / "config.json").is_file():  # another process converted it while we waited
            return out
        print(f"unitune: converting {src.name} from GGUF to safetensors once (cached in {out})", flush=True)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quant.state_dict())
        plain.generation_config = quant.generation_config
        with atomic.directory(out) as tmp:  # a kill mid-conversion never leaves a half-written cache
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the token the chat template closes an assistant turn with (e.g. <|im_end|>).

    Base EOS and end-of-turn differ for most chat models; a model that only stops at EOS
    never stops after a turn (FIELD-NOTES trap 3).
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        marker = "UNITUNE_MARKER"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
        specials = set(tokenizer.all_special_ids)
        ids += [t for t in after[:3] if t in specials][:1]
    return list(dict.fromkeys(ids))


def load_tokenizer(path: Path, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        tok.chat_template = template.read_text() if template.is_file() else cfg.chat_template
    elif not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


# A method's quantizer (qlora.layer_quantizer): given the empty model, the function that takes a
# layer's name and the layer with its full-precision weights and returns what goes in its place.
LayerQuantizer = Callable[[nn.Module], Callable[[str, nn.Module], nn.Module]]


def model_path(cfg: ModelConfig) -> Path:
    """The Hugging Face directory the recipe's model loads from (a GGUF file's converted copy)."""
    folder, gguf = _locate(cfg)
    return _gguf_cache(folder, gguf) if gguf else folder


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", quantize: LayerQuantizer | None = None,
               num_labels: int | None = None, labels: list[str] | None = None, multi_label: bool = False,
               tokenizer: PreTrainedTokenizerBase | None = None) -> LoadedModel:
    """The recipe's model and tokenizer (or the `tokenizer` given, already loaded). With `quantize`, the
    weights stream from the safetensors files into the empty model one layer at a time and each layer is
    quantized as soon as it is read, so memory peaks near the quantized model's size, never at the
    full-precision model's.

    A sequence classifier (model.kind seq-cls, or `num_labels` / `labels` given) is the same backbone with a
    head (AutoModelForSequenceClassification): `num_labels` outputs (1: a reward model), or one per name in
    `labels`, which the config keeps as id2label. The head is new (random) unless the checkpoint holds one
    of that size; without either, a saved classifier's own labels."""
    labels = list(labels) if labels else None
    seq_cls = cfg.kind == "seq-cls" or num_labels is not None or labels is not None
    if quantize and seq_cls:
        raise ValueError("a quantized base with a new classification head is not supported: its head would be "
                         "quantized with the base. Use method.name=lora, or full fine-tuning")
    folder, gguf = _locate(cfg)
    path = _gguf_cache(folder, gguf) if gguf else folder
    dtype = DTYPES.get(cfg.dtype, torch.float32)  # "auto": fp32 master weights; autocast does the rest
    auto, head = AutoModelForCausalLM, {}
    if seq_cls:
        auto = AutoModelForSequenceClassification
        if labels:
            head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)},
                    "problem_type": "multi_label_classification" if multi_label else "single_label_classification"}
        elif num_labels is not None:
            head = {"num_labels": num_labels}
    if cfg.random_init:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **head)
        model = auto.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        model = _load_quantized(path, cfg, dtype, torch.device(device), quantize) if quantize else None
        if model is None:
            # a checkpoint that is already a classifier, of other classes, gets a new head of the right size;
            # transformers' report that the head is new (MISSING) is said once below, in unitune's words
            with _quiet() if seq_cls else contextlib.nullcontext():
                model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                             ignore_mismatched_sizes=bool(head), **head)
    tok = tokenizer or load_tokenizer(path, cfg)
    if not seq_cls:
        model.generation_config.eos_token_id = end_of_turn_ids(tok)
        model.generation_config.pad_token_id = tok.pad_token_id
    else:  # transformers pools a classifier's logits at the last token that is not pad_token_id
        model.config.get_text_config().pad_token_id = tok.pad_token_id
    return LoadedModel(model.to(device), tok, str(folder / gguf) if gguf else str(folder))


@contextlib.contextmanager
def _quiet():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_quantized(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                    quantize: LayerQuantizer) -> PreTrainedModel | None:
    """The model built empty (parameters on the meta device) and filled from its safetensors files a layer
    at a time: each layer's own tensors are read, cast and put on `device`, the layer goes through the
    quantizer, and its full-precision copy is freed before the next is read. None, after a notice, where
    this cannot give what from_pretrained gives: no safetensors files, a pre-quantized checkpoint, or
    tensor names transformers would have to rename."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    files = _safetensors_files(path)
    if not files or getattr(config, "quantization_config", None):
        return _not_streamed(path, "a pre-quantized checkpoint" if files else "no model.safetensors (or index)")
    tensors = _Safetensors(files)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # the meta parameters come untied
    # id -> each meta parameter (held, so no other object takes its id) and its names (a tied one has several)
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, []))[1].append(name)
    if missing := [ns[0] for _, ns in names.values() if not any(n in tensors for n in ns)]:
        return _not_streamed(path, f"tensor names that are not the model's ({missing[0]} is missing)")
    layer, done = quantize(model), set()
    for name in [n for n, m in model.named_modules() if _own_tensors(m)]:
        if name in done:
            continue
        # with the modules sharing a weight with it (a tied head), so the shared table is read and quantized once
        shared = model.get_submodule(name)._parameters.values()
        group = list(dict.fromkeys([name, *(n.rpartition(".")[0] for p in shared if p is not None
                                            for n in names[id(p)][1])]))
        done.update(group)
        _load_group(model, group, tensors, names, dtype, device, layer)
        release_freed_memory()  # else the freed full-precision layers add up in RSS (glibc keeps their pages)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_config's defaults, as from_pretrained keeps them
        pass
    return model.eval()


def _not_streamed(path: Path, why: str) -> None:
    print(f"unitune: {path} has {why}: loading the whole model at full precision, then quantizing it", flush=True)


def _load_group(model: nn.Module, group: list[str], tensors: _Safetensors, names: dict, dtype: torch.dtype,
                device: torch.device, layer: Callable[[str, nn.Module], nn.Module]) -> None:
    """Read the modules' tensors onto `device` (floats at `dtype`) and put each module through `layer`. A
    module it replaces gets its meta parameters back: whoever still holds it (the quantizer) holds no weights."""
    fresh: dict[int, nn.Parameter] = {}
    empty = {member: dict(model.get_submodule(member)._parameters) for member in group}
    for member in group:
        module = model.get_submodule(member)
        for key, p in empty[member].items():
            if p is not None:
                if id(p) not in fresh:
                    t = tensors.read(next(n for n in names[id(p)][1] if n in tensors))
                    fresh[id(p)] = nn.Parameter(t.to(device, dtype if t.is_floating_point() else t.dtype),
                                                requires_grad=p.requires_grad)
                module._parameters[key] = fresh[id(p)]
        for key in _own_tensors(module) - module._parameters.keys():  # persistent buffers, where the files hold them
            if f"{member}.{key}" in tensors:
                module._buffers[key] = tensors.read(f"{member}.{key}").to(device)
    for member in group:
        module = model.get_submodule(member)
        if (stored := layer(member, module)) is not module:
            model.set_submodule(member, stored)
            module._parameters.update(empty[member])


def _own_tensors(module: nn.Module) -> set[str]:
    """The names of a module's own parameters and persistent buffers (what a checkpoint holds of it)."""
    return ({k for k, p in module._parameters.items() if p is not None}
            | {k for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set})


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


class _Safetensors:
    """The tensors of safetensors files, each read on demand with plain file reads. safe_open maps the
    file instead, and every page read stays in this process's RSS until the file is closed: a whole
    5 GB shard of a 7B model, the memory that loading layer by layer is there to save."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")  # the format: u64 header length, JSON header, data
                header = json.loads(f.read(size))
            # a dtype not listed (fp8, ...) counts as missing: from_pretrained loads that checkpoint instead
            self.where.update({k: (file, 8 + size, v) for k, v in header.items()
                               if k != "__metadata__" and v["dtype"] in self.DTYPES})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str) -> torch.Tensor:
        file, start, entry = self.where[key]
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        with file.open("rb") as f:
            f.seek(start + begin)
            f.readinto(memoryview(data.numpy()))
        return data.view(self.DTYPES[entry["dtype"]]).reshape(entry["shape"])
