"""Training on several processes: data-parallel (DDP), fully sharded (FSDP2) and expert-parallel
(``expert_parallel.py``), on PyTorch's own ``torch.distributed``: the process group, collectives and
the wrapping of the model. Its model and optimizer state as checkpoints: ``training/run_state.py``.

    torchrun --nproc_per_node 8 $(which bam) train MODEL --data ... --out run/ [--strategy fsdp]

``init_from_env`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and starts NCCL on GPUs, gloo on the CPU; a command runs inside ``torchrun`` (which also leaves the
group at its end). The trainer then calls ``prepare`` (wrap the model),
``grad_sync`` (skip the gradient reduction of all but the last micro-batch) and ``clip_grad_norm``
(one global norm over every rank's shards).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from . import expert_parallel as ep

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, and the rank within its node."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Dist:
    """The running process group's view (rank 0 of 1 when none is initialised)."""
    if not dist.is_initialized():
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def resolve_device(device: str | None) -> torch.device:
    """The device a ``--device`` value names (None: CUDA when available, else the CPU); a
    ValueError for a name torch does not know or a GPU that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: PyTorch sees no CUDA GPU on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r} is not supported; expected cpu, cuda or cuda:N")
    return dev


def init_from_env(device: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (when WORLD_SIZE is set and
    no group is initialised yet: NCCL for CUDA, gloo for the CPU) and pick this rank's device.
    ``device`` None means CUDA when available; a bare ``"cuda"`` means ``cuda:LOCAL_RANK``."""
    dev = resolve_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ctx = current()
    if dev.type == "cuda" and ctx.world_size > 1:
        if dev.index is not None:
            raise ValueError(f"device={device!r}: with several processes give 'cuda' "
                             "(rank r takes cuda:LOCAL_RANK)")
        dev = torch.device("cuda", ctx.local_rank)
    return ctx, dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def torchrun(device: str | None = None):
    """A command's time in torchrun's process group: joins it (``init_from_env``), yields this
    process's ``Dist`` and device, and leaves the group at the end, unless a caller had joined it
    before (who then leaves it)."""
    owns_group = not dist.is_initialized()
    ctx, dev = init_from_env(device)
    try:
        yield ctx, dev
    finally:
        if owns_group:
            shutdown()


def _comm_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, 0)
    return int(t.item())


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (``t`` itself with one process)."""
    if not dist.is_initialized():
        return t
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return (out / dist.get_world_size()).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (``t`` itself with one process)."""
    if not dist.is_initialized():
        return t
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), on the CPU, in rank order."""
    if not dist.is_initialized():
        return [t.cpu()]
    local = t.to(_comm_device())
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


# --- wrapping the model --------------------------------------------------------------------------

def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 (start-up: FSDP runs only)
    return isinstance(model, FSDPModule)


def is_expert_parallel(model: nn.Module) -> bool:
    return bool(ep.expert_parameters(unwrap(model)))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (an FSDP2 model is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare(model: nn.Module, strategy: str = "ddp", expert_parallel: bool = False,
            ignore: tuple[str, ...] = ()) -> nn.Module:
    """Make ``model`` ready to train on the current process group; returns the module to call.

    - ``"ddp"``: DistributedDataParallel; each rank holds the whole model, gradients are averaged.
    - ``"fsdp"``: FSDP2 ``fully_shard`` of each decoder layer (``model.model.layers``) and of the
      root, in place: parameters, gradients and optimizer moments are sharded over the ranks.
    - ``expert_parallel``: first spread the MoE experts over the ranks (``expert_parallel.py``);
      DDP then leaves their gradients alone, and a hook divides them by the world size so that
      every gradient is the average over the ranks' losses. DDP only.
    - ``ignore``: names of parameters DDP leaves alone (the trainer reduces their gradients itself).

    With one process and no process group, ``"ddp"`` returns ``model`` unchanged.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not dist.is_initialized():
        if strategy == "fsdp" or expert_parallel:
            raise ValueError(f"{'expert_parallel' if expert_parallel else 'strategy=fsdp'} needs a "
                             "torch.distributed process group: launch with torchrun")
        return model
    if strategy == "fsdp":
        if expert_parallel:
            raise ValueError("expert_parallel works with strategy='ddp' (each rank keeps its experts whole)")
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 (start-up: FSDP runs only)
        for layer in getattr(getattr(model, "model", None), "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    world = dist.get_world_size()
    ignored = list(ignore)
    if expert_parallel:
        ep.parallelize_experts(model)
        for name, p in ep.expert_parameters(model).items():
            p.register_hook(lambda g: g / world)
            ignored.append(name)
    if ignored:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def grad_sync(model: nn.Module, enabled: bool):
    """A context in which backward reduces gradients over the ranks only if ``enabled`` (off for
    all but the last micro-batch of a step; the result is the same, with one reduction)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the expert-parallel parameters (each rank holds its own experts'), for clip_grad_norm."""
    return {id(p) for p in ep.expert_parameters(unwrap(model)).values()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, experts: set[int]) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm`` (``math.inf``: only
    measure it); returns the norm before clipping, on the device (no host sync). Sharded FSDP
    gradients reduce their norm over the ranks themselves; the gradients of the expert-parallel
    parameters ``experts`` (from ``expert_parameter_ids``) are summed in here."""
    if not experts:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    grads = [p.grad for p in params if p.grad is not None and id(p) not in experts]
    expert_grads = [p.grad for p in params if p.grad is not None and id(p) in experts]
    local = torch.nn.utils.get_total_norm(grads).float()
    expert_sq = torch.nn.utils.get_total_norm(expert_grads).float().square().to(_comm_device())
    dist.all_reduce(expert_sq)
    total = (local.square() + expert_sq.to(local.device)).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
