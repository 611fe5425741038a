"""Checkpoints of a training run: ``out/checkpoints/step-NNNNNNN/``, written atomically, verified
(size and SHA-256 of every file) and restored.

A checkpoint folder holds ``trainer.json`` (step, config, data position, optimizer groups, what the
run started from (``start``: the SHA-256 of the model and of each data source, which a resume must
match), and the size and SHA-256 of every other file), ``trainer.safetensors`` (RNG of every rank; optimizer
moments), ``model.safetensors``, or ``sharded/`` (FSDP: model and optimizer shards, one file per
rank). A weight-mixup run's model tensors are ``model.<name>`` (the task weights) and ``logits.<i>``
(the mixing coefficients'), its optimizer holds both, and ``trainer.json`` its ``mixup`` entry (the
second data stream's position, the base's digest, the loss of the coefficients' latest step). It is
written into a temporary folder and renamed into place, so a kill at any moment leaves either the
old checkpoint or the new one, never half of one. Nothing is pickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .. import distributed
from ..data import BatchStream
from ..files.atomic import file_record, fsync_dir, fsync_file, save_safetensors, sha256, write_json_atomic
from ..files.checks import is_within
from ..files.reading import read_json
from . import run_state
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
REFUSED = "refused-"
STEP_DIR = re.compile(r"step-\d{7}")
OURS_IN_CHECKPOINTS = re.compile(r"refused-step-\d{7}|\.step-\d{7}\.tmp|\.stale-.*")

def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / TRAINER_JSON).is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def remove_folder(path: Path) -> None:
    """Take ``path`` out of view with one rename, then delete it (a kill mid-way leaves a
    ``.stale-*`` folder that the next run clears, never a half-deleted checkpoint)."""
    stale = Path(tempfile.mkdtemp(dir=path.parent, prefix=".stale-"))
    os.replace(path, stale / path.name)
    shutil.rmtree(stale)


def ours_in_checkpoints(name: str) -> bool:
    """Whether an entry of ``checkpoints/`` is one we write: a checkpoint, a refused one, or a
    temporary of either (anything else there belongs to the user and is never touched)."""
    return bool(STEP_DIR.fullmatch(name) or OURS_IN_CHECKPOINTS.fullmatch(name))


def _trainer_digest(state: dict) -> str:
    """SHA-256 of ``trainer.json``'s content without its digest: an edited step, config or file
    list is caught like a corrupt weight file."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    stream: BatchStream, cfg: TrainConfig, extra: dict | None = None) -> Path:
    """Write ``out/checkpoints/step-NNNNNNN`` atomically; keep the newest ``keep_checkpoints``.
    ``extra`` (JSON-able) goes into ``trainer.json`` under its own keys (weight mixup: its
    ``mixup`` entry).

    Every rank calls this. Rank 0 writes the files (FSDP: every rank its own shards, through
    ``torch.distributed.checkpoint``), then ``trainer.json`` with the size and SHA-256 of each,
    fsyncs them and renames the folder into place."""
    ctx = distributed.current()
    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    distributed.barrier()
    rng = run_state.rng_tensors()
    if distributed.is_fsdp(model):
        fmt, groups = "sharded", run_state.save_sharded(model, opt, tmp)
        model_tensors, trainer_tensors = None, rng
    else:
        model_tensors, optim_tensors, groups = run_state.model_optimizer_tensors(model, opt)
        fmt, trainer_tensors = "full", {**optim_tensors, **rng}
    if ctx.is_main:
        if model_tensors is not None:
            save_safetensors(model_tensors, tmp / MODEL_FILE)
        save_safetensors(trainer_tensors, tmp / TRAINER_FILE)
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in written:
            fsync_file(f)
        state = {"step": step, "format": fmt, "world_size": ctx.world_size, "config": dataclasses.asdict(cfg),
                 "data": stream.state_dict(), "optimizer_param_groups": groups,
                 "files": {f.relative_to(tmp).as_posix(): file_record(f) for f in written}, **(extra or {})}
        state["digest"] = _trainer_digest(state)
        write_json_atomic(tmp / TRAINER_JSON, state)
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(d)
        if final.exists():
            remove_folder(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
            remove_folder(old)
    distributed.barrier()
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The ``trainer.json`` of an intact checkpoint; a ValueError saying what is wrong when a
    file is missing, truncated or corrupt (its size or SHA-256 differs from the recorded one)."""
    path = Path(path)
    if not (path / TRAINER_JSON).is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no {TRAINER_JSON}")
    try:
        state = read_json(str(path / TRAINER_JSON))
    except ValueError as e:
        raise ValueError(f"checkpoint {str(path)!r}: {TRAINER_JSON} is corrupt ({e})") from None
    listed = state.get("files")
    if (not isinstance(listed, dict) or not listed or not isinstance(state.get("step"), int)
            or state.get("format") not in ("full", "sharded")):
        raise ValueError(f"checkpoint {str(path)!r}: {TRAINER_JSON} lacks step, format or the file list")
    if state.get("digest") != _trainer_digest(state):
        raise ValueError(f"checkpoint {str(path)!r}: {TRAINER_JSON} was changed after it was written "
                         "(its digest differs)")
    for name, info in listed.items():
        if not isinstance(info, dict) or not is_within(path / name, path):
            raise ValueError(f"checkpoint {str(path)!r}: {TRAINER_JSON} lists a bad file entry {name!r}")
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"checkpoint {str(path)!r}: {name} is truncated or overwritten "
                             f"({size} bytes, {info['bytes']} were written)")
        if sha256(f) != info["sha256"]:
            raise ValueError(f"checkpoint {str(path)!r}: {name} is corrupt (its SHA-256 differs from the one "
                             "written)")
    return state


def load_state(path: Path, state: dict, model: nn.Module, opt: torch.optim.Optimizer,
               stream: BatchStream) -> int:
    """Restore model, optimizer, data position and RNG from the checkpoint ``path`` whose verified
    ``trainer.json`` is ``state``; returns its step."""
    groups = state["optimizer_param_groups"]
    trainer = load_file(str(path / TRAINER_FILE), device="cpu")
    if state["format"] == "sharded" and distributed.is_fsdp(model):
        run_state.load_sharded(model, opt, path, groups)
    else:
        if state["format"] == "sharded":
            model_tensors, optim_tensors = run_state.read_sharded(path)
        else:
            model_tensors = load_file(str(path / MODEL_FILE), device="cpu")
            optim_tensors = {k: v for k, v in trainer.items() if k.startswith("optimizer.")}
        run_state.load_model_optimizer_tensors(model, opt, model_tensors, optim_tensors, groups)
    stream.load_state_dict(state["data"])
    ctx = distributed.current()
    if state["world_size"] == ctx.world_size:
        run_state.set_rng(trainer)
    elif ctx.is_main:
        warnings.warn(f"checkpoint {str(path)!r} was written by {state['world_size']} processes, this run "
                      f"has {ctx.world_size}: random streams (dropout) start afresh, so the run will not "
                      "repeat an uninterrupted one exactly", stacklevel=3)
    return int(state["step"])


def load_checkpoint(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                    stream: BatchStream) -> int:
    """Check ``path`` (``verify_checkpoint``), then restore model, optimizer, data position and
    RNG from it; returns the step. Loads either kind of checkpoint into a single-process, DDP or
    expert-parallel model, and a sharded one into an FSDP model."""
    return load_state(Path(path), verify_checkpoint(path), model, opt, stream)


def newest_intact(out: Path) -> int:
    """Step of the newest checkpoint that passes ``verify_checkpoint`` (-1 if there is none).
    Newer, refused ones are moved aside with a warning; raises if checkpoints exist but none is
    intact."""
    refused = []
    for step, path in reversed(checkpoint_dirs(out)):
        try:
            verify_checkpoint(path)
        except ValueError as e:
            aside = path.parent / f"{REFUSED}{path.name}"
            if aside.exists():
                remove_folder(aside)
            os.replace(path, aside)
            refused.append(str(e))
            warnings.warn(f"{e}; moved it to {str(aside)!r} and resuming from the checkpoint before it",
                          stacklevel=3)
            continue
        return step
    if refused:
        raise ValueError("no intact checkpoint to resume from: " + "; ".join(refused))
    return -1


def refused_checkpoints(out: Path) -> list[str]:
    """The names of the checkpoints ``newest_intact`` moved aside."""
    root = out / CHECKPOINTS
    return sorted(p.name for p in root.iterdir() if p.name.startswith(REFUSED)) if root.is_dir() else []


def remove_checkpoints(out: str | os.PathLike) -> None:
    """Remove the checkpoints of a finished run (only those we wrote; ``checkpoints/`` itself goes
    when nothing else is left in it)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if ours_in_checkpoints(p.name):
                remove_folder(p)
        with contextlib.suppress(OSError):
            root.rmdir()

