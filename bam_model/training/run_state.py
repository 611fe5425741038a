"""The model and optimizer state of a training run on one or several processes (``distributed``),
as checkpoints: ``model_optimizer_tensors`` / ``load_model_optimizer_tensors`` (full tensors, written
by rank 0 as safetensors), ``save_sharded`` / ``load_sharded`` (FSDP: every rank writes its own
shards), ``full_model_tensors`` (the whole model on rank 0) and the random number generators' state.

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

import os
import warnings

import torch
import torch.nn as nn

from .. import expert_parallel as ep
from ..distributed import all_gather, current, is_fsdp, unwrap

SHARDED_DIR = "sharded"

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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415 (start-up: FSDP checkpoints only)

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
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415 (start-up: FSDP checkpoints only)

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
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 (start-up: FSDP checkpoints only)
    from torch.distributed.checkpoint import HuggingFaceStorageWriter  # noqa: PLC0415 (start-up: FSDP checkpoints only)

    _, osd, flat = _sharded_state(model, opt)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(os.path.join(path, SHARDED_DIR)),
                                                           save_distributed=True))
    return [_json_group(g, list(g["params"])) for g in osd["param_groups"]]


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, path, groups: list[dict]) -> None:
    """Load a sharded checkpoint into an FSDP model and its optimizer, each rank reading the
    slices it holds (any world size). A collective."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 (start-up: FSDP checkpoints only)
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: PLC0415 (start-up: FSDP checkpoints only)
    from torch.distributed.checkpoint.state_dict import set_state_dict  # noqa: PLC0415 (start-up: FSDP checkpoints only)

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
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: PLC0415 (start-up: FSDP checkpoints only)

    folder = os.path.join(path, SHARDED_DIR)
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint {str(path)!r} has no {SHARDED_DIR}/ folder")
    return HuggingFaceStorageReader(folder).read_metadata().state_dict_metadata


def read_sharded_keys(path) -> set[str]:
    return set(_sharded_metadata(path))


def read_sharded(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, optimizer tensors) of a sharded checkpoint as full CPU tensors, in this
    process alone (no process group needed): what a single-process model loads."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 (start-up: FSDP checkpoints only)
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: PLC0415 (start-up: FSDP checkpoints only)

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

