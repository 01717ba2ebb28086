"""What a run shows a person: the before/after table and bars, the loss and metric curves, report.md; and
`unitune report RUN...`, several runs side by side."""
from __future__ import annotations

import json
from pathlib import Path

from unitune import atomic

SHOWN = ("val_loss", "val_ppl", "exact_match", "contains_match")
# scores in [0, 1] worth a bar and a curve: task match, accuracy, F1, mAP, win rates, task suites
SCORES = ("match", "accuracy", "f1", "map", "map50", "map75", "mar100", "auc", "win_rate", "score")


def scores(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and k.endswith(SCORES)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic.temp_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    return out


def before_after_table(before: dict, after: dict, labels: tuple[str, str] = ("base", "tuned")) -> str:
    keys = [k for k in SHOWN if k in before or k in after] + sorted(
        k for k in after if k not in SHOWN and isinstance(after[k], float))
    rows = [f"| metric | {labels[0]} | {labels[1]} |", "|---|---|---|"]
    for k in keys:
        cells = [f"{d[k]:.4f}" if isinstance(d.get(k), (int, float)) else "-" for d in (before, after)]
        rows.append(f"| {k} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def plot_loss(records: list[dict], out: Path) -> Path | None:
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val" and "val_loss" in r]
    if not train:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_metrics(records: list[dict], out: Path) -> Path | None:
    """Each score's curve over the evaluations (step 0: the model before training)."""
    evals = [r for r in records if r.get("split") == "val"]
    keys = sorted({k for r in evals for k in scores(r)})
    if not keys or len(evals) < 2:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], "o-", label=k)
    ax.set(xlabel="step", ylabel="score", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_before_after(before: dict, after: dict, out: Path) -> Path | None:
    """Bars of every score measured before and after training (the task's and the retention sets')."""
    keys = [k for k in scores(after) if k in before]
    if not keys:
        return None
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.2 * len(keys) + 2), 4))
    xs = range(len(keys))
    for shift, (label, values) in zip((-0.2, 0.2), (("before", before), ("after", after))):
        bars = ax.bar([x + shift for x in xs], [values[k] for k in keys], 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), keys, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.1), ylabel="score")
    ax.legend()
    return _save(fig, out)


def plot_confusion(confusion: list[list[int]], labels: list[str], out: Path) -> Path:
    """The held-out confusion matrix: counts, rows the true class, columns the predicted one."""
    k = len(labels)
    fig, ax = _pyplot().subplots(figsize=(2.5 + 0.5 * k, 2 + 0.5 * k))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = max(max(r) for r in confusion) or 1
        for i, row in enumerate(confusion):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    return _save(fig, out)


def plot_detections(images: list, predicted: list[list[tuple]], truth: list[list[tuple]], out: Path) -> Path:
    """Held-out images with their predicted boxes ((x1, y1, x2, y2), name, score) in colour and the true ones
    ((x1, y1, x2, y2), name) dashed in white."""
    from matplotlib.patches import Rectangle

    cols = min(3, len(images))
    rows = -(-len(images) // cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, preds, boxes in zip(axes.flat, images, predicted, truth):
        ax.imshow(image.permute(1, 2, 0).numpy())
        for (x1, y1, x2, y2), _ in boxes:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=1))
        for (x1, y1, x2, y2), name, score in preds:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="yellow", lw=1.5))
            ax.text(x1, y1, f"{name} {score:.2f}", color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": "yellow", "pad": 1, "lw": 0})
    return _save(fig, out)


def write_report(run_dir: Path, table: str, samples: list[dict], stats: dict, params: dict,
                 notes: list[str] = ()) -> Path:
    lines = [f"# {run_dir.name}", "", "## Before and after", "", table, "", *notes, ""]
    for name, what in (("loss.png", "loss curve"), ("before_after.png", "scores before and after training"),
                       ("metrics.png", "scores at each evaluation"), ("confusion.png", "held-out confusion matrix"),
                       ("predictions.png", "held-out predictions (yellow) and true boxes (dashed)")):
        if (run_dir / name).is_file():
            lines += [f"![{what}]({name})", ""]
    lines += ["## Model", "", f"trainable parameters: {params['trainable']:,} of {params['total']:,} "
              f"({100 * params['trainable'] / params['total']:.3f}%)", "", "## Data", ""]
    lines += [f"- {k}: {v}" for k, v in stats.items()] + [""]
    if samples:
        lines += ["## Sample answers after training", ""]
        for s in samples[:5]:
            lines += [f"- **prompt**: {s['prompt']!r}", f"  - reference: {s['reference']!r}", f"  - answer: {s['prediction']!r}"]
    path = run_dir / "report.md"
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def _read_run(path: Path) -> tuple[dict, list[dict]]:
    """A run directory's recipe (flattened) and logged records (a torn last line skipped)."""
    import yaml

    from unitune.engine.loop import read_log
    from unitune.engine.resume import flatten

    log = path / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here; name run directories (runs/<name>) that trained")
    records = read_log(log)
    recipe = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
    return flatten(recipe or {}), records


def compare(runs: list[str | Path], out: Path) -> Path:
    """Runs side by side: the recipe fields that differ, the last evaluation's metrics, the training throughput,
    and overlaid curves (train loss, validation loss, scores); writes out/report.md and out/curves.png."""
    paths = [Path(r) for r in runs]
    names = [p.name for p in paths] if len({p.name for p in paths}) == len(paths) else [str(p) for p in paths]
    read = [_read_run(p) for p in paths]
    recipes, logs = [r for r, _ in read], [log for _, log in read]
    finals = [next((r for r in reversed(log) if r.get("split") == "val"), {}) for log in logs]
    trains = [next((r for r in reversed(log) if r.get("split") == "train"), {}) for log in logs]

    differ = sorted(k for k in set().union(*recipes) if not k.startswith("output.")
                    and len({json.dumps(r.get(k)) for r in recipes}) > 1)
    metrics = [k for k in SHOWN if any(k in f for f in finals)] + sorted(
        {k for f in finals for k, v in f.items() if isinstance(v, float) and k not in SHOWN})
    speed = sorted({k for t in trains for k in t if k.endswith("_per_s")} | {"elapsed_s"})

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
        return "-" if value is None else f"`{json.dumps(value)}`" if not isinstance(value, (int, str)) else str(value)

    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {k} | " + " | ".join(cell(r.get(k)) for r in recipes) + " |" for k in differ]
    lines += [f"| steps | " + " | ".join(cell(t.get("step")) for t in trains) + " |"]
    lines += [f"| {k} | " + " | ".join(cell(f.get(k)) for f in finals) + " |" for k in metrics]
    lines += [f"| {k} | " + " | ".join(cell(t.get(k)) for t in trains) + " |" for k in speed]
    table = "\n".join(lines)

    out.mkdir(parents=True, exist_ok=True)
    curves = ["loss", "val_loss", *[k for k in metrics if k.endswith(SCORES)]][:6]
    fig, axes = _pyplot().subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
    for ax, key in zip(axes[0], curves):
        split = "train" if key == "loss" else "val"
        for name, log in zip(names, logs):
            points = [(r["step"], r[key]) for r in log if r.get("split") == split and key in r]
            if points:
                ax.plot(*zip(*points), "-" if split == "train" else "o-", label=name, lw=1)
        ax.set(title=f"train {key}" if split == "train" else key, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, out / "curves.png")
    what = f"differing recipe fields ({len(differ)}), " if differ else "identical recipes, "
    text = (f"# {len(paths)} runs side by side\n\n{what}steps trained, the last evaluation's metrics and training "
            f"throughput:\n\n{table}\n\n![curves](curves.png)\n\nRuns: " + ", ".join(str(p) for p in paths) + "\n")
    atomic.write_text(out / "report.md", text)
    print(table)
    return out / "report.md"
