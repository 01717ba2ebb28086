"""The training loop. It knows nothing of tasks: it drives any objective's `loss(model, batch)`.

One optimizer step = `grad_accum` micro-batches; the loss is normalised by what the objective
counts in the whole step (loss tokens, pairs, ...), so accumulation gives the gradient of one
large batch exactly. The objective's other metrics are sums over the same units; their means
are logged beside the loss.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unitune import atomic
from unitune.config import RecipeError, TrainConfig
from unitune.data import Batches
from unitune.engine import checkpoint, distributed
from unitune.engine.anchor import Anchor
from unitune.engine.precision import autocast
from unitune.engine.schedule import make_scheduler


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient: the run stops before the optimizer step can spread it."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class History:
    records: list[dict] = field(default_factory=list)
    path: Path | None = None
    best: dict | None = None  # the best evaluation, when early stopping watches a metric
    events: object | None = None  # TensorBoard's writer: the same records as event files (`tensorboard --logdir runs`)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.path and is_main_process():
            # One write of a whole line, synced: a kill leaves at most a torn last line, which
            # truncate_after drops.
            with self.path.open("ab") as f:
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        if self.events:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.events.add_scalar(f"{record['split']}/{key}", value, record["step"])
            self.events.flush()

    def open_events(self, run_dir: Path, start: int) -> None:
        """TensorBoard event files in the run directory; a resumed run tells TensorBoard to drop what the
        interrupted one logged after `start` (its purge step), as truncate_after does for metrics.jsonl."""
        if not is_main_process():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional at run time
            return
        self.events = SummaryWriter(str(run_dir), purge_step=start + 1 if start else None)

    def close(self) -> None:
        if self.events:
            self.events.close()

    def truncate_after(self, step: int) -> None:
        """On resume, drop what the interrupted run logged past its last checkpoint (and a torn line)."""
        if self.path and self.path.is_file():
            self.records = [r for r in read_log(self.path) if r.get("step", 0) <= step]
            if is_main_process():
                atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


def read_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, less a last line a kill cut short."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.steps:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   lr_scale: Callable[[str, torch.Tensor], float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by learning-rate scale (a method may ask for
    several, as LoRA+ does) and by weight decay (none on biases and norm scales, the 1-D params)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (lr_scale(name, p) if lr_scale else 1.0, cfg.weight_decay if p.ndim >= 2 else 0.0)
            groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError("the method left no parameter to train")
    # fused: one kernel for every parameter's update, on CUDA and on CPUs (torch >= 2.4); on a CPU it is 2.3x
    # faster than the per-tensor loop (22M parameters: 0.012 s a step, not 0.027), as the Trainer's default is
    fused = all(p.device.type in ("cuda", "cpu") for ps in groups.values() for p in ps)
    param_groups = [{"params": ps, "lr": cfg.lr * scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    count: Callable[[dict], int],
    batches: Batches,
    cfg: TrainConfig,
    run_dir: Path,
    evaluate: Callable[[], dict] | None,
    device: torch.device,
    amp: torch.dtype | None,
    resume: bool = False,
    eval_at_start: bool = True,
    lr_scale: Callable[[str, torch.Tensor], float] | None = None,
    anchor: Anchor | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    no_sync: Callable | None = None,
    private=None,
) -> History:
    """`private`: DP-SGD (privacy/dp.py), which computes each step's gradient from its Poisson-sampled examples."""
    steps = total_steps(cfg, len(batches))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * steps)
    optimizer = make_optimizer(model, cfg, lr_scale)
    scheduler = make_scheduler(optimizer, steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    ckpt_dir = run_dir / "checkpoints"
    history = History(path=run_dir / "metrics.jsonl")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = dict(trainable) | checkpoint.running_stats(model)  # what a checkpoint keeps: all that training changes
    state = {"cursor": 0, "best": None, "bad_evals": 0, "stopped": None}
    processes = distributed.processes() if distributed.active() else 1

    start = 0
    if is_main_process():
        atomic.recover(ckpt_dir)  # a kill mid-save or mid-delete left temp or renamed-aside copies
    distributed.barrier()  # the others read the checkpoints once rank 0 has put them right
    saved = checkpoint.list_checkpoints(ckpt_dir)
    if resume and saved:
        state.update(checkpoint.load(ckpt_dir / f"step-{saved[-1]}", model, optimizer, scheduler))
        start = state.pop("step")
        batches.cursor = state["cursor"]
        if private:  # the privacy already spent goes on counting, or the reported epsilon would be too low
            if "privacy" not in state:
                raise RecipeError(f"{ckpt_dir / f'step-{start}'} holds no privacy accountant state (a run trained "
                                  "without privacy): start afresh with output.overwrite=true")
            private.accountant.history = [tuple(h) for h in state.pop("privacy")]
        if hasattr(batches, "restore"):  # a batch source with state of its own (an online objective's buffer)
            batches.restore(state.pop("source", None), state.pop("source_tensors", {}))
        history.truncate_after(start)
        print(f"unitune: resumed from {ckpt_dir / f'step-{start}'}", flush=True)
    elif is_main_process():
        history.path.unlink(missing_ok=True)
        for old in run_dir.glob("events.out.tfevents.*"):  # a fresh start in this directory starts a fresh log
            old.unlink()
    history.open_events(run_dir, start)

    def run_eval(step: int) -> bool:
        """Evaluate, log, keep the best weights, and tell whether early stopping says to stop."""
        metrics = evaluate()
        record = {"step": step, "split": "val", **metrics}
        history.log(record)
        if on_eval:  # a search reports the intermediate value (and may stop a hopeless trial here)
            try:
                on_eval(step, metrics)
            except BaseException:
                history.close()
                raise
        if cfg.early_stopping_patience is None:
            return False
        value = metrics.get(cfg.early_stopping_metric)
        if value is None:
            raise RecipeError(f"train.early_stopping_metric='{cfg.early_stopping_metric}' is not measured by this "
                              f"run's evaluation; it gives: {', '.join(sorted(metrics))}")
        if step == 0:
            return False
        better = state["best"] is None or (value < state["best"] if cfg.early_stopping_mode == "min" else value > state["best"])
        state["best"], state["bad_evals"] = (value, 0) if better else (state["best"], state["bad_evals"] + 1)
        if better:
            weights = {k: distributed.full(v) for k, v in kept.items()}  # every process: FSDP gathers
            if is_main_process():
                checkpoint.save_best(ckpt_dir, step, weights, record)
        return state["bad_evals"] >= cfg.early_stopping_patience

    def save(step: int) -> None:
        weights, optimizer_state = distributed.full_state(kept, optimizer)  # every process: FSDP gathers
        if is_main_process():
            state["cursor"] = batches.cursor
            if private:
                state["privacy"] = private.accountant.history
            tensors = None
            if hasattr(batches, "state"):
                state["source"], tensors = batches.state()
            checkpoint.save(ckpt_dir, step, weights, optimizer_state, scheduler, state, cfg.keep_checkpoints, tensors)

    def stop_non_finite(what: str) -> None:
        last = checkpoint.list_checkpoints(ckpt_dir)
        where = f"the last good checkpoint is {ckpt_dir / f'step-{last[-1]}'}" if last else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{what}; stopping before the optimizer step. {where}. "
                            "Try a lower train.lr, train.max_grad_norm, or train.precision=fp32.")

    if evaluate and eval_at_start and start == 0:
        run_eval(0)  # the "before" number: what the run changed is measured against it
    model.train()
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not is_main_process())
    # throughput counts training time only, not evaluation nor batch fetching (an online objective's generation);
    # elapsed_s is the steps' whole wall time, fetching included (steps per hour)
    # what the objective counts as throughput (`seen_tokens`, `seen_examples`): logged as <unit>_per_s
    seen: dict[str, float] = {}
    train_time, elapsed = 0.0, 0.0

    def on_device(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def example_loss(example: dict):  # DP-SGD: one example's loss, for its own gradient
        with autocast(device, amp):
            return loss_fn(model, on_device(example))

    step = start
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        micro = [batches.next() for _ in range(cfg.grad_accum)]
        fetch = time.perf_counter() - t0  # an online objective generates here: not training time
        # the whole step's count, over every process (data parallelism: each holds a share of each batch)
        n = 1 if private else max(distributed.all_sum([sum(0 if b.get("ghost") else count(b) for b in micro)])[0], 1)
        step_loss, sums, step_seen = 0.0, {}, {}
        if private:  # each example's gradient clipped, noise added (grad_accum is 1)
            step_loss, sums, n, clipped = private.step([p for _, p in trainable], micro.pop(), example_loss, count,
                                                       lambda what: stop_non_finite(f"{what} at step {step}"))
            n = max(n, 1)  # a Poisson draw may be empty: the step is noise alone
            sums["clipped"] = clipped * n  # the fraction of examples clipped, logged over n like the other sums
            step_seen = {k: sums.pop(k) for k in list(sums) if k.startswith("seen_")}
        for j, batch in enumerate(micro):
            weight = 0.0 if batch.pop("ghost", False) else processes  # DDP averages: scale by the processes
            batch = on_device(batch)
            with distributed.no_sync_for(no_sync, last=j == len(micro) - 1):  # one gradient exchange a step
                with autocast(device, amp):
                    loss_sum, info = loss_fn(model, batch)
                loss = loss_sum * weight / n
                if processes == 1 and not torch.isfinite(loss):  # several: the gradient norm below stops them all
                    stop_non_finite(f"loss became {loss.item()} at step {step}")
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item() / processes
            for k, v in info.items():
                into = step_seen if k.startswith("seen_") else sums
                into[k] = into.get(k, 0.0) + float(v) * weight / processes
        if processes > 1:  # what every process saw, for the log
            totals = distributed.sum_dict({"": step_loss, **sums, **step_seen})
            step_loss = totals.pop("")
            sums = {k: v for k, v in totals.items() if not k.startswith("seen_")}
            step_seen = {k: v for k, v in totals.items() if k.startswith("seen_")}
        for key, v in step_seen.items():
            seen[key[5:]] = seen.get(key[5:], 0.0) + v
        if scaler:
            scaler.unscale_(optimizer)
        if anchor:  # L2-SP: the pull towards the starting weights joins the gradient before clipping
            sums["drift"] = anchor.pull() * n  # ||theta - theta_0||, logged with the means over n
        # The norm is needed either way: a finite loss can still give NaN/inf gradients, and one
        # optimizer step with them would turn every weight (and the next checkpoint) into NaN.
        max_norm = math.inf if private or not cfg.max_grad_norm else cfg.max_grad_norm  # DP clips each example
        grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_([p for _, p in trainable], max_norm)).item()
        if not math.isfinite(grad_norm) and not scaler:  # fp16's scaler skips such steps by design
            stop_non_finite(f"the gradient norm became {grad_norm} at step {step}")
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed += time.perf_counter() - t0
        train_time += time.perf_counter() - t0 - fetch
        record = {"step": step, "split": "train", "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, **{f"{unit}_per_s": v / train_time for unit, v in seen.items()},
                  "elapsed_s": elapsed, **{k: v / n for k, v in sums.items()}}
        if private:
            record["epsilon"] = private.epsilon()
        if step % cfg.log_every == 0 or step == steps:
            history.log(record)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}",
                        **({"eps": f"{record['epsilon']:.2f}"} if private else {}),
                        **{f"{unit}_s": f"{v / train_time:.{0 if v >= 10 * train_time else 2}f}"
                           for unit, v in seen.items()})  # a detector's few images/s keep their decimals
        bar.update(1)

        stop = False
        if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            stop = run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or stop:
            save(step)
        if stop:
            state["stopped"] = f"early stopping at step {step}: {cfg.early_stopping_metric} did not improve " \
                               f"for {cfg.early_stopping_patience} evaluations"
            tqdm.write(f"unitune: {state['stopped']}")
            break
    bar.close()
    if evaluate and not state["stopped"]:
        run_eval(step)
    history.close()
    best = ckpt_dir / "best"
    if cfg.early_stopping_patience is not None and (best / "trainer.json").is_file():
        # The run's result is its best evaluation, not its last: load those weights back.
        history.best = json.loads((best / "trainer.json").read_text())["metrics"]
        checkpoint.load_weights(best, model)
        tqdm.write(f"unitune: keeping the best weights, from step {history.best['step']} "
                   f"({cfg.early_stopping_metric}={history.best[cfg.early_stopping_metric]:.4f})")
    return history
