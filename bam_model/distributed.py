"""Training on several processes: data-parallel (DDP), fully sharded (FSDP2) and expert-parallel
(``expert_parallel.py``), on PyTorch's own ``torch.distributed``; and the model and optimizer
state of such a run as checkpoints.

    torchrun --nproc_per_node 8 $(which bam) train MODEL --data ... --out run/ [--strategy fsdp]

``init_from_env`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and starts NCCL on GPUs, gloo on the CPU. The trainer then calls ``prepare`` (wrap the model),
``grad_sync`` (skip the gradient reduction of all but the last micro-batch), ``clip_grad_norm``
(one global norm over every rank's shards) and, for checkpoints, ``model_optimizer_tensors`` /
``load_model_optimizer_tensors`` (full tensors, written by rank 0 as safetensors) or
``save_sharded`` / ``load_sharded`` (FSDP: every rank writes its own shards).

Sharded checkpoints go through ``torch.distributed.checkpoint`` with its safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)``): one ``shard-*.safetensors`` file per rank,
the offset of each shard in the file's JSON header. DCP's default ``FileSystemWriter`` is not
used: it writes its ``.metadata`` with ``pickle.dump`` and reads it back with ``pickle.load``
(running whatever code a tampered file holds), and stores tensors with ``torch.save``. The
safetensors storage reads everything it needs from the safetensors headers, so nothing is
pickled, and ``read_sharded`` assembles full tensors from it in a single process (any number of
ranks may read a checkpoint written by any other number).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from . import expert_parallel as ep

STRATEGIES = ("ddp", "fsdp")
SHARDED_DIR = "sharded"


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
    from torch.distributed.fsdp import FSDPModule
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
        from torch.distributed.fsdp import fully_shard
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


# --- model and optimizer state: full tensors ---------------------------------------------------

def _named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """FQN -> parameter or persistent buffer, each tensor once (a tied weight under its first name)."""
    aliases = _aliases(model)
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in aliases}


def _optimizer_fqns(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(t): name for name, t in _named_state(model).items()}
    try:
        return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def _json_group(group: dict, fqns: list[str]) -> dict:
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"},
            "params": fqns}


def _gather_to_main(t: torch.Tensor, sharded: bool) -> torch.Tensor | None:
    """A full CPU copy of ``t`` on rank 0 (expert slices gathered there), None elsewhere."""
    if sharded:
        t = ep.gather_dim0(t.detach(), dst=0)
    elif not current().is_main:
        return None
    return t.detach().cpu().contiguous() if t is not None else None


def model_optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, list[dict]]:
    """(model tensors, optimizer tensors, optimizer param groups) of a single-process, DDP or
    expert-parallel run, as full CPU tensors on rank 0 (empty dicts elsewhere): model tensors by
    FQN (a tied weight once), optimizer moments as ``optimizer.<fqn>.<name>``, groups as
    JSON-able dicts listing their FQNs. Under expert parallelism the expert slices are gathered
    to rank 0, so every rank must call this."""
    model = unwrap(model)
    experts = ep.expert_parameters(model)
    full = full_model_tensors(model)
    fqns = _optimizer_fqns(model, opt)
    sd = opt.state_dict()
    optim, index = {}, 0
    for names in fqns:
        for name in names:
            for key, value in sd["state"].get(index, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state {key!r} of {name!r} is not a tensor")
                optim[f"optimizer.{name}.{key}"] = _gather_to_main(value, name in experts and value.dim() > 0)
            index += 1
    groups = [_json_group(g, names) for g, names in zip(sd["param_groups"], fqns)]
    if not current().is_main:
        return {}, {}, groups
    return full, optim, groups


def _check_groups(groups: list[dict], fqns: list[list[str]]) -> None:
    saved = [g.get("params") for g in groups]
    if saved != fqns:
        raise ValueError(f"checkpoint optimizer groups hold parameters {saved}, this optimizer {fqns}")


def load_model_optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer, model_tensors: dict,
                                 optim_tensors: dict, groups: list[dict]) -> None:
    """Load full tensors (as ``model_optimizer_tensors`` makes them) into a single-process, DDP or
    expert-parallel model (each rank keeps its slice of the experts)."""
    if is_fsdp(model):
        raise ValueError("this checkpoint holds full tensors (a ddp or single-process run); resume it "
                         "with strategy='ddp', or start the FSDP run from its model folder")
    inner = unwrap(model)
    fqns = _optimizer_fqns(inner, opt)
    _check_groups(groups, fqns)
    expected = _named_state(inner)
    missing = sorted(set(expected) - set(model_tensors))
    unexpected = sorted(set(model_tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    experts = ep.expert_parameters(inner)
    with torch.no_grad():
        for name, t in expected.items():
            src = model_tensors[name]
            if name in experts:
                src = ep.shard_dim0(src)
            if src.shape != t.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, the model "
                                 f"{tuple(t.shape)}")
            t.copy_(src)
    state, index = {}, 0
    for names in fqns:
        for name in names:
            prefix = f"optimizer.{name}."
            entry = {k[len(prefix):]: v for k, v in optim_tensors.items() if k.startswith(prefix)}
            if name in experts:
                entry = {k: ep.shard_dim0(v) if v.dim() > 0 else v for k, v in entry.items()}
            if entry:
                state[index] = entry
            index += 1
    param_groups, index = [], 0
    for g in groups:
        hp = {k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"}
        param_groups.append({**hp, "params": list(range(index, index + len(g["params"])))})
        index += len(g["params"])
    # load_state_dict moves each moment to its parameter's device (and keeps "step" where it belongs).
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def _aliases(model: nn.Module) -> dict[str, str]:
    """Second name -> first name of every tied tensor."""
    first = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            out[name] = first[id(t)]
        else:
            first[id(t)] = name
    return out


def full_model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors by FQN (a tied weight once) as CPU tensors on rank 0, ``{}``
    elsewhere, from any wrapping; a collective under FSDP and expert parallelism."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for alias in _aliases(model):
            msd.pop(alias, None)
        return msd if current().is_main else {}
    inner = unwrap(model)
    experts = ep.expert_parameters(inner)
    out = {n: _gather_to_main(t, n in experts) for n, t in _named_state(inner).items()}
    return out if current().is_main else {}


# --- model and optimizer state: FSDP shards ----------------------------------------------------

def _sharded_state(model: nn.Module, opt: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    aliases = _aliases(model)
    flat = {f"model.{k}": v for k, v in msd.items() if k not in aliases}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            flat[f"optimizer.{name}.{key}"] = value
    return msd, osd, flat


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, path) -> list[dict]:
    """Every rank writes its shards of the FSDP model and optimizer into ``path/sharded``;
    returns the optimizer param groups (JSON-able) for rank 0 to record. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    _, osd, flat = _sharded_state(model, opt)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(os.path.join(path, SHARDED_DIR)),
                                                           save_distributed=True))
    return [_json_group(g, list(g["params"])) for g in osd["param_groups"]]


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, path, groups: list[dict]) -> None:
    """Load a sharded checkpoint into an FSDP model and its optimizer, each rank reading the
    slices it holds (any world size). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    msd, osd, flat = _sharded_state(model, opt)
    _check_groups(groups, [list(g["params"]) for g in osd["param_groups"]])
    saved = read_sharded_keys(path)
    if set(flat) != saved:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: missing "
                         f"{sorted(set(flat) - saved)}, unexpected {sorted(saved - set(flat))}")
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(os.path.join(path, SHARDED_DIR))))
    aliases = _aliases(model)
    for key, value in flat.items():
        if key.startswith("model."):
            msd[key[len("model."):]] = value
    for alias, name in aliases.items():
        msd[alias] = msd[name]
    for key, value in flat.items():
        if key.startswith("optimizer."):
            name, _, field = key[len("optimizer."):].rpartition(".")
            osd["state"][name][field] = value
    for g, saved_g in zip(osd["param_groups"], groups):
        g.update({k: tuple(v) if k == "betas" else v for k, v in saved_g.items() if k != "params"})
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def _sharded_metadata(path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = os.path.join(path, SHARDED_DIR)
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint {str(path)!r} has no {SHARDED_DIR}/ folder")
    return HuggingFaceStorageReader(folder).read_metadata().state_dict_metadata


def read_sharded_keys(path) -> set[str]:
    return set(_sharded_metadata(path))


def read_sharded(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, optimizer tensors) of a sharded checkpoint as full CPU tensors, in this
    process alone (no process group needed): what a single-process model loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = _sharded_metadata(path)
    flat = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    with warnings.catch_warnings():         # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        reader = HuggingFaceStorageReader(str(os.path.join(path, SHARDED_DIR)))
        dcp.load(flat, storage_reader=reader, no_dist=True)
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {k: v for k, v in flat.items() if k.startswith("optimizer.")}
    return model, optim


def rng_tensors() -> dict[str, torch.Tensor]:
    """Every rank's RNG state (CPU, and this rank's CUDA device) as ``rng.<rank>.cpu|cuda``; a
    collective."""
    out = {f"rng.{r}.cpu": s for r, s in enumerate(all_gather(torch.get_rng_state()))}
    if torch.cuda.is_available():
        states = all_gather(torch.cuda.get_rng_state())
        out.update({f"rng.{r}.cuda": s for r, s in enumerate(states)})
    return out


def set_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore this rank's RNG from ``rng_tensors``' output."""
    rank = current().rank
    torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if torch.cuda.is_available() and f"rng.{rank}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])

