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


def alternate(script: str, systems: list[str], rounds: int, args: list[str]) -> dict[str, list[dict]]:
    """Each system once a round, in its own process, the order reversed every other round (a machine
    that drifts favours no one); stops at the first failure."""
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for rnd in range(rounds):
        for system in (systems if rnd % 2 == 0 else systems[::-1]):
            out = spawn(script, ["--worker", system, *args])
            if "error" in out:
                raise SystemExit(f"{system} failed: {out['error']}")
            results[system].append(out)
            print(f"round {rnd + 1} {system}: {out}", flush=True)
    return results


def span(xs: list[float], spec: str = ".0f") -> str:
    """min-max of repeated measurements."""
    return f"{min(xs):{spec}}-{max(xs):{spec}}" if len(xs) > 1 else f"{xs[0]:{spec}}"


def ratios(ours: list[dict], theirs: list[dict], key: str) -> str:
    """The range of ours/theirs over every pair of runs."""
    return span([a[key] / b[key] for a in ours for b in theirs], ".2f") + "x"


def report(result: dict) -> None:
    """In a worker: add the process's peak RSS and print the line spawn() reads back."""
    import resource

    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def trl_timer():
    """A transformers callback timing a Trainer's loop: `start` at train begin, `end` at the last step's end."""
    import time

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    return Timer()
