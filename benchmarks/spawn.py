"""Run one benchmark worker in a child process (its own memory peak, no state shared between systems)
and read back the JSON line it prints after `RESULT `."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn(script: str, args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-2000:]
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    return json.loads(lines[-1].removeprefix("RESULT "))
