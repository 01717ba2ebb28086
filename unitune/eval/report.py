"""What a run shows a person: the before/after table, the loss curve, report.md."""
from __future__ import annotations

from pathlib import Path

from unitune import atomic

SHOWN = ("val_loss", "val_ppl", "exact_match", "contains_match")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.temp_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def plot_confusion(confusion: list[list[int]], labels: list[str], out: Path) -> Path:
    """The held-out confusion matrix: counts, rows the true class, columns the predicted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * k, 2 + 0.5 * k))
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
    fig.tight_layout()
    with atomic.temp_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def plot_detections(images: list, predicted: list[list[tuple]], truth: list[list[tuple]], out: Path) -> Path:
    """Held-out images with their predicted boxes ((x1, y1, x2, y2), name, score) in colour and the true ones
    ((x1, y1, x2, y2), name) dashed in white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(3, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
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
    fig.tight_layout()
    with atomic.temp_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def write_report(run_dir: Path, table: str, samples: list[dict], stats: dict, params: dict,
                 notes: list[str] = ()) -> Path:
    lines = [f"# {run_dir.name}", "", "## Before and after", "", table, "", *notes, ""]
    for name, what in (("loss.png", "loss curve"), ("confusion.png", "held-out confusion matrix"),
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
