"""A small, exact trainer for causal LMs: ``bam train``.

Works with any ``nn.Module`` whose ``forward(input_ids, labels=...)`` returns an object with
``.loss`` (optionally ``.nll`` and ``.aux_loss``, which are logged). AdamW (no weight decay on
vectors), linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping, gradient
accumulation, bf16 autocast on CUDA. Under torchrun it trains data-parallel (DDP), fully sharded
(FSDP2) or with the MoE experts spread over the ranks (``distributed.py``): each rank takes its
share of every global batch, so the batch and the data order do not depend on the world size.

A run folder ``out`` holds (written by rank 0; with FSDP each rank writes its own shards)::

    metrics.jsonl                 one JSON object per logged step: step, loss, lr, tokens_per_s, ...
    checkpoints/step-NNNNNNN/     trainer.json (step, config, data position, optimizer groups, and
                                  the size and SHA-256 of every other file), trainer.safetensors
                                  (RNG of every rank; optimizer moments), model.safetensors, or
                                  sharded/ (FSDP: model and optimizer shards, one file per rank)
    model/                        the final model (``save_pretrained`` when the model has it)

Checkpoints are written into a temporary folder and renamed into place, so a kill at any moment
leaves either the old checkpoint or the new one, never half of one. ``resume=True`` continues
from the newest intact checkpoint: one whose files are missing, truncated or corrupt is refused
with a warning naming the problem, moved aside to ``checkpoints/refused-step-NNNNNNN``, and the
one before it is used. A resumed run reproduces the uninterrupted one bitwise on the CPU (on CUDA
as far as its kernels are deterministic). Nothing is pickled.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import distributed, files
from .config import DTYPES, finite_float, read_json
from .data import BatchStream, parse_data_spec
from .files import STAGING_PREFIX, file_record, fsync_dir, fsync_file, sha256, write_text_atomic
from .tokenizer import for_model

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
REFUSED = "refused-"
STEP_DIR = re.compile(r"step-\d{7}")
OURS_IN_CHECKPOINTS = re.compile(r"refused-step-\d{7}|\.step-\d{7}\.tmp|\.stale-.*")
# Flags that do not change what is trained (only what is logged, evaluated or kept): a resumed run
# may change them; any other difference from the checkpoint's run is refused.
RESUMABLE_CHANGES = ("log_every", "eval_every", "eval_windows", "save_every", "keep_checkpoints")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is sequences per optimizer step, split into
    ``grad_accum`` micro-batches; ``warmup=None`` means ``min(100, steps // 10)``;
    ``eval_every``/``save_every`` 0 mean at the end only; ``eval_windows`` caps the held-out
    windows per source in periodic evaluation."""
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_windows: int = 32
    save_every: int = 0
    keep_checkpoints: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_windows",
                     "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'seq_len' else 1}, got {v!r}")
        for name in ("seed", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.warmup is not None and (not isinstance(self.warmup, int) or isinstance(self.warmup, bool)
                                        or not 0 <= self.warmup <= self.steps):
            raise ValueError(f"warmup must be None or an int in [0, steps={self.steps}], got {self.warmup!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        for name, lo, hi in (("lr", 0, math.inf), ("min_lr_ratio", 0, 1), ("weight_decay", 0, math.inf),
                             ("beta1", 0, 1), ("beta2", 0, 1), ("grad_clip", 0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a number in [{lo}, {hi}]{' and > 0' if name == 'lr' else ''}, got {v!r}")

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices and embeddings decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# --- checkpoints -------------------------------------------------------------------------------

def _checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / TRAINER_JSON).is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def _remove(path: Path) -> None:
    """Take ``path`` out of view with one rename, then delete it (a kill mid-way leaves a
    ``.stale-*`` folder that the next run clears, never a half-deleted checkpoint)."""
    stale = Path(tempfile.mkdtemp(dir=path.parent, prefix=".stale-"))
    os.replace(path, stale / path.name)
    shutil.rmtree(stale)


def _ours_in_checkpoints(name: str) -> bool:
    """Whether an entry of ``checkpoints/`` is one we write: a checkpoint, a refused one, or a
    temporary of either (anything else there belongs to the user and is never touched)."""
    return bool(STEP_DIR.fullmatch(name) or OURS_IN_CHECKPOINTS.fullmatch(name))


def _clear_leftovers(out: Path) -> None:
    """Delete what a killed run leaves behind: unfinished checkpoint, metrics and model temporaries
    (only names we make)."""
    root = out / CHECKPOINTS
    leftovers = [p for p in root.iterdir() if p.name.startswith(".") and _ours_in_checkpoints(p.name)] \
        if root.is_dir() else []
    leftovers += list(out.glob(f".{METRICS}.tmp-*")) + list(out.glob(f".{FINAL_MODEL}.tmp-*"))
    leftovers += list(out.glob(f"{FINAL_MODEL}/{STAGING_PREFIX}*"))
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _trainer_digest(state: dict) -> str:
    """SHA-256 of ``trainer.json``'s content without its digest: an edited step, config or file
    list is caught like a corrupt weight file."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    stream: BatchStream, cfg: TrainConfig) -> Path:
    """Write ``out/checkpoints/step-NNNNNNN`` atomically; keep the newest ``keep_checkpoints``.

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
    rng = distributed.rng_tensors()
    if distributed.is_fsdp(model):
        fmt, groups = "sharded", distributed.save_sharded(model, opt, tmp)
        model_tensors, trainer_tensors = None, rng
    else:
        model_tensors, optim_tensors, groups = distributed.model_optimizer_tensors(model, opt)
        fmt, trainer_tensors = "full", {**optim_tensors, **rng}
    if ctx.is_main:
        if model_tensors is not None:
            save_file(model_tensors, str(tmp / MODEL_FILE))
        save_file(trainer_tensors, str(tmp / TRAINER_FILE))
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in written:
            fsync_file(f)
        state = {"step": step, "format": fmt, "world_size": ctx.world_size, "config": dataclasses.asdict(cfg),
                 "data": stream.state_dict(), "optimizer_param_groups": groups,
                 "files": {f.relative_to(tmp).as_posix(): file_record(f) for f in written}}
        state["digest"] = _trainer_digest(state)
        (tmp / TRAINER_JSON).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        fsync_file(tmp / TRAINER_JSON)
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(d)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in _checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
            _remove(old)
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
        if not isinstance(info, dict) or not files.is_within(path / name, path):
            raise ValueError(f"checkpoint {str(path)!r}: {TRAINER_JSON} lists a bad file entry {name!r}")
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"checkpoint {str(path)!r}: {name} is truncated or overwritten "
                             f"({size} bytes, {info['bytes']} were written)")
        if sha256(f) != info["sha256"]:
            raise ValueError(f"checkpoint {str(path)!r}: {name} is corrupt (its SHA-256 differs from the one written)")
    return state


def _load_state(path: Path, state: dict, model: nn.Module, opt: torch.optim.Optimizer, stream: BatchStream) -> int:
    groups = state["optimizer_param_groups"]
    trainer = load_file(str(path / TRAINER_FILE), device="cpu")
    if state["format"] == "sharded" and distributed.is_fsdp(model):
        distributed.load_sharded(model, opt, path, groups)
    else:
        if state["format"] == "sharded":
            model_tensors, optim_tensors = distributed.read_sharded(path)
        else:
            model_tensors = load_file(str(path / MODEL_FILE), device="cpu")
            optim_tensors = {k: v for k, v in trainer.items() if k.startswith("optimizer.")}
        distributed.load_model_optimizer_tensors(model, opt, model_tensors, optim_tensors, groups)
    stream.load_state_dict(state["data"])
    ctx = distributed.current()
    if state["world_size"] == ctx.world_size:
        distributed.set_rng(trainer)
    elif ctx.is_main:
        warnings.warn(f"checkpoint {str(path)!r} was written by {state['world_size']} processes, this run has "
                      f"{ctx.world_size}: random streams (dropout) start afresh, so the run will not repeat "
                      "an uninterrupted one exactly", stacklevel=3)
    return int(state["step"])


def load_checkpoint(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                    stream: BatchStream) -> int:
    """Check ``path`` (``verify_checkpoint``), then restore model, optimizer, data position and
    RNG from it; returns the step. Loads either kind of checkpoint into a single-process, DDP or
    expert-parallel model, and a sharded one into an FSDP model."""
    return _load_state(Path(path), verify_checkpoint(path), model, opt, stream)


def _newest_intact(out: Path) -> int:
    """Step of the newest checkpoint that passes ``verify_checkpoint`` (-1 if there is none).
    Newer, refused ones are moved aside with a warning; raises if checkpoints exist but none is
    intact."""
    refused = []
    for step, path in reversed(_checkpoint_dirs(out)):
        try:
            verify_checkpoint(path)
        except ValueError as e:
            aside = path.parent / f"{REFUSED}{path.name}"
            if aside.exists():
                _remove(aside)
            os.replace(path, aside)
            refused.append(str(e))
            warnings.warn(f"{e}; moved it to {str(aside)!r} and resuming from the checkpoint before it", stacklevel=3)
            continue
        return step
    if refused:
        raise ValueError("no intact checkpoint to resume from: " + "; ".join(refused))
    return -1


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Records with step <= upto_step (a crash may have left later ones or a torn last line)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", math.inf) <= upto_step:
            records.append(rec)
    return records


def data_inputs(sources) -> list[tuple[str, Path]]:
    """The ``--data`` paths a run reads, for ``open_run``'s overlap check."""
    return [("--data", s.path) for s in sources if s.path is not None]


class LossNotFinite(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


# --- the run folder ------------------------------------------------------------------------------

class RunFolder:
    """A run folder opened for writing by ``open_run``: checked, claimed (our manifest) and locked
    on rank 0. ``resume_step`` is the checkpoint to continue from (-1: a fresh run)."""

    def __init__(self, path: Path, resume_step: int, lock: files.FolderLock | None):
        self.path, self.resume_step, self.lock = path, resume_step, lock

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _has_run(out: Path) -> bool:
    return ((out / METRICS).exists() or (out / FINAL_MODEL).exists()
            or bool((out / CHECKPOINTS).is_dir() and any(_ours_in_checkpoints(p.name)
                                                         for p in (out / CHECKPOINTS).iterdir())))


def remove_checkpoints(out: str | os.PathLike) -> None:
    """Remove the checkpoints of a finished run (only those we wrote; ``checkpoints/`` itself goes
    when nothing else is left in it)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if _ours_in_checkpoints(p.name):
                _remove(p)
        with contextlib.suppress(OSError):
            root.rmdir()


def _clear_run(out: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote (metrics, our checkpoint folders, the
    final model's files); anything else in the folder stays."""
    if (out / METRICS).is_file():
        (out / METRICS).unlink()
    remove_checkpoints(out)
    if (out / FINAL_MODEL).is_dir():
        files.clear_owned(out / FINAL_MODEL, keep_claim=True)


def _check_resume(state: dict, path: Path, cfg: TrainConfig, data: str) -> None:
    """Refuse to resume a checkpoint written with other settings, naming each differing flag (a
    resumed run must continue exactly the recorded one)."""
    if cfg.steps < state["step"]:
        raise ValueError(f"--resume: the checkpoint {str(path)!r} is at step {state['step']}, past --steps {cfg.steps}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})  # digest-checked
    before, now = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    before["warmup"], now["warmup"] = saved.warmup_steps, cfg.warmup_steps
    diffs = [f"--{k.replace('_', '-')} {now[k]!r} (the run has {before[k]!r})"
             for k in now if k not in RESUMABLE_CHANGES and before[k] != now[k]]
    saved_data = state["data"].get("data")
    if saved_data != data:
        diffs.insert(0, f"--data {data!r} (the run has {saved_data!r})")
    if diffs:
        raise ValueError(f"--resume: {'; '.join(diffs)}; resume with the run's own settings, or start a new "
                         "run (another --out, or --overwrite)")


def open_run(out: str | os.PathLike, cfg: TrainConfig, data: str, *, resume: bool = False,
             overwrite: bool = False, inputs=()) -> RunFolder:
    """Check, claim and lock the run folder ``out`` before any work (rank 0; every rank gets rank
    0's outcome). A fresh run needs ``out`` absent, empty or a run of ours without content;
    ``resume`` continues the newest intact checkpoint when there is one (after checking its
    settings against ``cfg`` and ``data``); ``overwrite`` removes an earlier run's files first.
    ``inputs`` ((name, path) pairs) may not overlap ``out``."""
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    out = Path(os.path.abspath(out))
    ctx = distributed.current()
    error, run = None, None
    if ctx.is_main:
        try:
            run = _open_run_main(out, cfg, data, resume, overwrite, inputs)
        except (ValueError, OSError) as e:
            error = e
    if distributed.broadcast_int(0 if error is None else 1):
        if error is not None:
            raise error
        raise ValueError(f"rank 0 refused the run folder {str(out)!r} (its message says why)")
    resume_step = distributed.broadcast_int(run.resume_step if run is not None else -1)
    return run if run is not None else RunFolder(out, resume_step, None)


def _open_run_main(out: Path, cfg: TrainConfig, data: str, resume: bool, overwrite: bool, inputs) -> RunFolder:
    state = files.check_output(out, "run", inputs=inputs)
    out.mkdir(parents=True, exist_ok=True)
    lock = files.lock_folder(out, "bam train")
    try:
        if state == "new":
            files.claim_folder(out, "run", [METRICS, CHECKPOINTS, FINAL_MODEL, files.LOCK])
        if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
            raise ValueError(f"{str(out / CHECKPOINTS)!r} is a file; the run keeps its checkpoints in a folder there")
        files.check_output(out / FINAL_MODEL, "model", flag="the run's final model folder")
        _clear_leftovers(out)
        resume_step = -1
        if _has_run(out):
            if overwrite:
                _clear_run(out)
            elif resume:
                resume_step = _newest_intact(out)
                if resume_step >= 0:  # _newest_intact verified it: its trainer.json is read, not hashed again
                    path = out / CHECKPOINTS / f"step-{resume_step:07d}"
                    _check_resume(read_json(str(path / TRAINER_JSON)), path, cfg, data)
            else:
                steps = [step for step, _ in _checkpoint_dirs(out)]
                at = f" (checkpoint at step {steps[-1]})" if steps else ""
                raise ValueError(f"--out {str(out)!r} holds a training run{at}; pass --resume to continue it or "
                                 "--overwrite to start afresh")
        return RunFolder(out, resume_step, lock)
    except BaseException:
        lock.release()
        raise


class Estimate:
    """Says once, after the first few steps, how long the rest of a long run will take (the first
    step is left out of the rate: it pays for warm-up and allocation)."""
    WARM_STEPS, MEASURED_STEPS, LONG_S = 1, 3, 60.0

    def __init__(self, start: int, total: int, tokens_per_step: int, device: torch.device, enabled: bool):
        self.start, self.total, self.tokens_per_step, self.device = start, total, tokens_per_step, device
        self.enabled, self.t0 = enabled, None

    def step(self, step: int) -> None:
        done = step - self.start
        if not self.enabled or done < self.WARM_STEPS:
            return
        if done == self.WARM_STEPS:
            self.t0 = time.perf_counter()
        elif done == self.WARM_STEPS + self.MEASURED_STEPS:
            per_step = (time.perf_counter() - self.t0) / self.MEASURED_STEPS
            left = (self.total - step) * per_step
            if left > self.LONG_S:
                print(f"train: about {_duration(left)} for the remaining {self.total - step} steps at "
                      f"{self.tokens_per_step / per_step:,.0f} tokens/s on {self.device} (evaluation and "
                      "checkpoints not counted)", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


# --- the loop ----------------------------------------------------------------------------------

def _save_final(model: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write the whole model to ``path`` from rank 0 (its weights in ``dtype``, by default their
    own); a collective under FSDP and expert parallelism (shards and expert slices are gathered to
    rank 0; ``model`` itself stays as it is)."""
    from .checkpoint import build_model
    from .model import CausalLM

    inner = distributed.unwrap(model)
    sharded = distributed.is_fsdp(model) or distributed.is_expert_parallel(inner)
    if not sharded and hasattr(inner, "save_pretrained"):
        if distributed.current().is_main:
            inner.save_pretrained(str(path), dtype=dtype)
        return
    tensors = distributed.full_model_tensors(model)
    if not distributed.current().is_main:
        return
    if isinstance(inner, CausalLM):
        whole = build_model(inner.config, tensors)
        whole.tokenizer = inner.tokenizer
        whole.save_pretrained(str(path), dtype=dtype)
        return
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    files.write_model_folder(path, lambda folder: save_file(tensors, str(folder / MODEL_FILE)))


def train(model: nn.Module, data: str, out: str | os.PathLike | RunFolder, cfg: TrainConfig, *,
          resume: bool = False, overwrite: bool = False, tokenizer=None, progress: bool = True,
          strategy: str = "ddp", expert_parallel: bool = False, save_dtype: torch.dtype | None = None) -> list[dict]:
    """Train ``model`` in place on the ``data`` spec; returns every metrics record of the run
    (those before a resumed checkpoint included), as written to ``out/metrics.jsonl``.

    In a torch.distributed process group (torchrun; ``distributed.init_from_env``) every rank
    calls this with the same arguments: ``strategy`` "ddp" or "fsdp", ``expert_parallel`` to
    spread the MoE experts over the ranks (see ``distributed.prepare``). Rank r takes rows
    r, r + W, ... of each global batch of ``cfg.batch_size``; the logged losses are means over
    all ranks. After an FSDP or expert-parallel run ``model`` stays sharded; ``out/model`` holds
    the whole of it.

    ``out/model`` holds the weights in ``save_dtype`` (by default their own; checkpoints keep the
    training precision, which resuming needs).

    ``out`` is checked, claimed and locked first (``open_run``; or pass what ``open_run`` gave): a
    fresh run into a folder holding a run is refused unless ``resume`` (continue it, with the same
    settings) or ``overwrite`` (start afresh)."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    ctx = distributed.current()
    if cfg.batch_size % (cfg.grad_accum * ctx.world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of grad_accum={cfg.grad_accum} "
                         f"x world size={ctx.world_size}")
    tokenizer = for_model(distributed.unwrap(model), tokenizer)
    sources = [s for s, _ in parse_data_spec(data)]
    run = out if isinstance(out, RunFolder) else open_run(out, cfg, data, resume=resume, overwrite=overwrite,
                                                          inputs=data_inputs(sources))
    try:
        stream = BatchStream(data, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                             rank=ctx.rank, world_size=ctx.world_size, tokenizer=tokenizer)
        return _train(model, run, cfg, tokenizer, sources, stream, progress, strategy, expert_parallel, save_dtype)
    finally:
        if run is not out:
            run.close()


def _train(model: nn.Module, run: RunFolder, cfg: TrainConfig, tokenizer, sources, stream: BatchStream,
           progress: bool, strategy: str, expert_parallel: bool, save_dtype: torch.dtype | None) -> list[dict]:
    from tqdm.auto import tqdm

    from .evaluate import evaluate

    ctx = distributed.current()
    device = next(model.parameters()).device
    out, resume_step = run.path, run.resume_step
    wrapped = distributed.prepare(model, strategy, expert_parallel)
    opt = make_optimizer(wrapped, cfg)
    torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)       # rank 0 keeps the single-process stream
    step = 0
    if resume_step >= 0:
        path = out / CHECKPOINTS / f"step-{resume_step:07d}"
        step = _load_state(path, read_json(str(path / TRAINER_JSON)), wrapped, opt, stream)
    records = _read_metrics(out / METRICS, step) if step else []
    if ctx.is_main:
        write_text_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    micro = cfg.batch_size // (cfg.grad_accum * ctx.world_size)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    eval_model = wrapped if distributed.is_fsdp(wrapped) else distributed.unwrap(wrapped)
    params = [p for g in opt.param_groups for p in g["params"]]
    experts = distributed.expert_parameter_ids(wrapped)
    wrapped.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and ctx.is_main), desc="train", unit="step")
    eta = Estimate(step, cfg.steps, tokens_per_step, device, enabled=ctx.is_main)
    t_last, steps_since = time.perf_counter(), 0
    metrics_file = open(out / METRICS, "a", encoding="utf-8") if ctx.is_main else contextlib.nullcontext()
    with metrics_file as metrics:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = next(stream)
            # Per-micro-batch values stay on the device: one synchronisation per step, not per micro-batch.
            sums: dict[str, torch.Tensor] = {}
            for i in range(cfg.grad_accum):
                ids = batch.input_ids[i * micro:(i + 1) * micro].to(device)
                labels = batch.labels[i * micro:(i + 1) * micro].to(device)
                with distributed.grad_sync(wrapped, i == cfg.grad_accum - 1):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        result = wrapped(ids, labels=labels)
                    (result.loss / cfg.grad_accum).backward()
                for name in ("loss", "nll", "aux_loss"):
                    value = getattr(result, name, None)
                    if value is not None:
                        value = torch.as_tensor(value, device=device).detach().float()
                        sums[name] = sums[name] + value if name in sums else value
            names = list(sums)
            values = distributed.all_reduce_mean(torch.stack([sums[n] for n in names]) / cfg.grad_accum)
            means = dict(zip(names, values.tolist()))
            loss = means["loss"]
            if not math.isfinite(loss):
                kept = f"the checkpoint of step {step} is kept" if _checkpoint_dirs(out) else "no checkpoint was written"
                raise LossNotFinite(f"the loss is {loss} at step {step + 1} ({kept}); try a lower --lr (now "
                                    f"{cfg.lr:g}), a longer --warmup or a lower --grad-clip, and check the data")
            grad_norm = distributed.clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf, experts)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            bar.update(1)
            eta.step(step)

            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
            if step % cfg.log_every == 0 or do_eval or step == cfg.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t_last
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": steps_since * tokens_per_step / max(elapsed, 1e-9),
                       "tokens": step * tokens_per_step}
                rec.update({name: means[name] for name in ("nll", "aux_loss") if name in means})
                if do_eval:
                    rec["eval"] = evaluate(eval_model, sources, seq_len=cfg.seq_len, batch_size=micro,
                                           max_windows=cfg.eval_windows, tokenizer=tokenizer)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if metrics:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                records.append(rec)
                t_last, steps_since = time.perf_counter(), 0
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                if metrics:
                    os.fsync(metrics.fileno())
                save_checkpoint(out, step, wrapped, opt, stream, cfg)
                t_last = time.perf_counter()
    bar.close()
    _save_final(wrapped, out / FINAL_MODEL, save_dtype)
    distributed.barrier()
    return records


# --- command line ------------------------------------------------------------------------------

def add_train_args(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(steps=1)
    parser.add_argument("model", help="model folder (from bam branch / mix / a previous bam train)")
    parser.add_argument("--data", required=True,
                        help="domain (code, math, legal, drama, scripture), mixture 'code:0.5,math:0.5', or text path")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, model/")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    parser.add_argument("--lr", type=finite_float, default=d.lr, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=finite_float, default=d.min_lr_ratio, help="final lr / peak lr")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(100, steps/10))")
    parser.add_argument("--weight-decay", type=finite_float, default=d.weight_decay,
                        help="AdamW weight decay of matrices and embeddings")
    parser.add_argument("--grad-clip", type=finite_float, default=d.grad_clip, help="max gradient norm (0: off)")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and dropout")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics records")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="0: at the end only")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per source")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period (0: at the end only)")
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                        help="checkpoints kept (each holds the model and its optimizer state in float32)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest intact checkpoint, with the same settings "
                             "(only --log-every, --eval-every, --eval-windows, --save-every and "
                             "--keep-checkpoints may change); a fresh run when --out holds none")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds an earlier run, removing that run's files")
    parser.add_argument("--device", default=None,
                        help="default: cuda when available, else cpu (under torchrun rank r takes cuda:LOCAL_RANK)")
    parser.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                        help="under torchrun: ddp replicates the model on every rank, fsdp shards parameters, "
                             "gradients and optimizer state over the ranks")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun (ddp): spread each MoE layer's experts over the ranks, tokens "
                             "exchanged with all-to-all; the number of experts must divide by the world size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the final model/ (default: the training dtype, float32); bfloat16 halves "
                             "its size. Checkpoints keep float32 weights and optimizer state, which resuming needs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> list[dict]:
    """``bam train``; under torchrun each rank runs this and joins the process group first."""
    from . import from_pretrained

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, grad_accum=args.grad_accum, seed=args.seed,
                      log_every=args.log_every, eval_every=args.eval_every, eval_windows=args.eval_windows,
                      save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)
    sources = [s for s, _ in parse_data_spec(args.data)]
    owns_group = not torch.distributed.is_initialized()
    ctx, device = distributed.init_from_env(args.device)
    try:
        # Every check of the run folder comes before the model is loaded.
        with open_run(args.out, cfg, args.data, resume=args.resume, overwrite=args.overwrite,
                      inputs=[("MODEL", args.model), *data_inputs(sources)]) as run:
            model = from_pretrained(args.model, device=device)
            records = train(model, args.data, run, cfg, progress=not args.no_progress,
                            strategy=args.strategy, expert_parallel=args.expert_parallel,
                            save_dtype=DTYPES[args.dtype] if args.dtype else None)
    finally:
        if owns_group:
            distributed.shutdown()
    if ctx.is_main:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; model written to {Path(args.out) / FINAL_MODEL}")
        for name, res in last.get("eval", {}).items():
            print(f"  {name:12s} ppl {res['ppl']:9.3f}  bpb {res['bpb']:.4f}")
    return records
