"""Load a pretrained causal LM and its tokenizer: HF directory (safetensors), GGUF file, built-in name.

GGUF weights are dequantized by transformers' GGUF loader. That takes ~15 s for SmolLM2 and
the result can't be `save_pretrained` (transformers marks it as quantized), so the first load
writes a plain safetensors copy to a cache directory and every later load reads that (< 2 s).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from unitune.config import ModelConfig
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
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what to write as base_model_name_or_path


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


def _gguf_cache(folder: Path, gguf: str) -> Path:
    """Dequantize a GGUF model once into a plain safetensors directory and return it."""
    src = folder / gguf
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
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
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a crash never leaves a half-written cache
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


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LoadedModel:
    folder, gguf = _locate(cfg)
    path = _gguf_cache(folder, gguf) if gguf else folder
    dtype = DTYPES.get(cfg.dtype, torch.float32)  # "auto": fp32 master weights; autocast does the rest
    if cfg.random_init:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    tok = load_tokenizer(path, cfg)
    model.generation_config.eos_token_id = end_of_turn_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model.to(device), tok, str(folder / gguf) if gguf else str(folder))
