"""Data parallelism on PyTorch's own distributed engine: torchrun starts the processes, DDP or FSDP2 keeps
them equal (`train.distributed: ddp | fsdp`).

    torchrun --nproc_per_node=2 -m unitune train RECIPE     # or: unitune train RECIPE --nproc 2
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m unitune train RECIPE                             # several machines: torchrun's own rendezvous

N processes equal one process with the same global batch (train.batch_size rows a micro-batch, grad_accum
micro-batches a step): every process plans the same batches and collates its share of each, rows rank,
rank + N, ... (data/build.py); the loss normaliser (loss tokens, pairs, ...) is summed over the processes,
and each process's loss sum is scaled by N / that total, so DDP's gradient average is exactly the gradient of
the whole batch. Micro-batches before the last of a step run under no_sync: one gradient exchange a step.

The objectives call the model's parts (the backbone, the LM head in chunks), not its forward, so DDP wraps
the objective's loss as a module (`LossModule`): its forward is the loss, its parameters the model's, and
DDP's reducer sees every gradient. DDP broadcasts rank 0's weights at the start, so every process begins
equal. Rank 0 writes checkpoints, logs and the output (the checkpoint format is the single-process one, so a
run resumes on any number of processes). Evaluation is split too: each process scores its share of the
validation batches and answers its share of the prompts, and every process gets the totals.

FSDP2 (`fully_shard`) shards every parameter, frozen or trained, and the optimizer state across the
processes: each repeated block (a transformer layer) is a group of its own, gathered just before it runs and
freed after; the rest (embeddings, output layer, a classifier's head) belongs to the root, the loss module.
Outside a training step (evaluation, generation) the model is gathered whole on every process, so the split
evaluation runs each process's forwards without collectives. Checkpoints are consolidated: gathered from the
shards and written by rank 0 in the single-process format, so a run resumes on any number of processes under
either strategy, and after training the model is gathered back into plain tensors for the output and the
report.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str) -> torch.device | None:
    """Join the process group torchrun describes (gloo on CPUs, NCCL on GPUs); the device this process
    trains on, or None when one process runs alone."""
    if processes() <= 1:
        return None
    _die_with_launcher()
    cuda = device != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a launcher killed outright (SIGKILL, OOM
    killer) would leave the workers training and writing into the run directory, under a resumed run. Ask
    Linux to kill this worker when its launcher dies."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher or launcher == 1:  # it died before the request took effect
        os._exit(1)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def same_everywhere(value):
    """Rank 0's value, on every process (a run directory each process would otherwise choose alone)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def gather(value) -> list:
    """Every process's value, in rank order, on every process."""
    if not active():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Each value summed over the processes (one exchange)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_dict(sums: dict[str, float]) -> dict[str, float]:
    """Each key's value summed over the processes; a key some process lacks counts 0 there (a process left
    without rows has fewer keys)."""
    if not active():
        return sums
    keys = sorted(set().union(*gather(sorted(sums))))
    return dict(zip(keys, all_sum([sums.get(k, 0.0) for k in keys])))


class LossModule(nn.Module):
    """The objective's loss as a module, so DDP's forward runs it and its reducer sees every parameter."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def wrap(model: nn.Module, loss_fn: Callable, device: torch.device) -> tuple[Callable, Callable]:
    """The loss through DDP, and the context that skips its gradient exchange (accumulation)."""
    ddp = nn.parallel.DistributedDataParallel(
        LossModule(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)  # an objective may leave a trainable part out of a step (PPO's value head)
    return (lambda _model, batch: ddp(batch)), ddp.no_sync


def shard(model: nn.Module, loss_fn: Callable) -> tuple[Callable, Callable, nn.Module]:
    """FSDP2: the loss through the sharded model, the context that defers the gradient reduce-scatter
    (accumulation), and the root module (for `whole` and `consolidate`)."""
    from torch.distributed.fsdp import fully_shard

    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block)
    root = fully_shard(LossModule(model, loss_fn))
    print(f"unitune: fsdp: {len(blocks)} blocks and the root sharded over {processes()} processes (weights, "
          "gradients, optimizer state)", flush=True)
    # The objectives call the model's parts, so an evaluation may run a block before the root ever ran:
    # initialise the root now, or that block would take itself for one.
    root._get_fsdp_state()._lazy_init()

    @contextlib.contextmanager
    def no_sync():
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    return (lambda _model, batch: root(batch)), no_sync, root


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the members of the largest ModuleList (a transformer's layers); none in a CNN."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    size = lambda ml: sum(p.numel() for p in ml.parameters())  # noqa: E731
    return list(max(lists, key=size)) if lists else []


def _fsdp_modules(root: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole(root: nn.Module):
    """The model gathered on every process, kept so through any number of forwards (no collectives: each
    process may run a different number, as a split evaluation does), then sharded again."""
    modules = _fsdp_modules(root)
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def consolidate(root: nn.Module) -> None:
    """After training: every parameter gathered back into a plain tensor and FSDP's hooks removed, so the
    model saves, generates and reports as a single process's does."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, nn.Parameter] = {}  # a tied parameter (embeddings and output layer) stays one
    for m in root.modules():  # the same order on every process: the gathers pair up
        for name, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in gathered:
                    gathered[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                m._parameters[name] = gathered[id(p)]
    for m in _fsdp_modules(root):
        state = m._get_fsdp_state()
        for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
            handle.remove()
        if group := state._fsdp_param_group:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
        cls = type(m)
        m.__class__ = cls.__mro__[cls._orig_cls_mro_index]  # FSDP<Block> back to Block


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process calls it); any other as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(weights: dict[str, torch.Tensor], optimizer) -> tuple[dict, dict]:
    """The checkpoint's weights and optimizer state gathered whole, in the single-process format."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}
    return {k: full(v) for k, v in weights.items()}, state


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a checkpoint as `param` holds it: this process's shard of it under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(optimizer) -> None:
    """After loading a whole optimizer state: each tensor the size of its parameter cut to the parameter's shard."""
    for p, s in optimizer.state.items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.dim():
                s[k] = like(v, p)


def no_sync_for(no_sync: Callable | None, last: bool):
    return no_sync() if no_sync and not last else contextlib.nullcontext()
