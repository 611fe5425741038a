"""A small, exact trainer for causal LMs: ``bam train``.

Works with any ``nn.Module`` whose ``forward(input_ids, labels=...)`` returns an object with
``.loss`` (optionally ``.nll`` and ``.aux_loss``, which are logged). AdamW (no weight decay on
vectors), linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping, gradient
accumulation, bf16 autocast on CUDA.

A run folder ``out`` holds::

    metrics.jsonl                 one JSON object per logged step: step, loss, lr, tokens_per_s, ...
    checkpoints/step-NNNNNNN/     model.safetensors, trainer.safetensors (optimizer moments, RNG),
                                  trainer.json (step, config, data position, optimizer scalars)
    model/                        the final model (``save_pretrained`` when the model has it)

Checkpoints are written into a temporary folder and renamed into place, so a crash leaves either
the old checkpoint or the new one, never half of one. ``resume=True`` continues from the newest
checkpoint (or starts afresh when there is none) and reproduces the uninterrupted run bitwise on
the CPU (on CUDA as far as its kernels are deterministic). Nothing is pickled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from .data import BatchStream, load_tokenizer, parse_data_spec

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"


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

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / "trainer.json").is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {name!r} of parameter {idx} is not a tensor")
            tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    stream: BatchStream, cfg: TrainConfig) -> Path:
    """Write ``out/checkpoints/step-NNNNNNN`` atomically; keep the newest ``keep_checkpoints``."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    save_model(model, str(tmp / "model.safetensors"))
    tensors, groups = _optimizer_to_flat(opt)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "trainer.safetensors"))
    state = {"step": step, "config": dataclasses.asdict(cfg), "data": stream.state_dict(),
             "optimizer_param_groups": groups}
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        stale = Path(tempfile.mkdtemp(dir=root, prefix=".stale-"))
        os.replace(final, stale / final.name)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in _checkpoint_dirs(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, stream: BatchStream) -> int:
    """Restore model, optimizer, data position and RNG from ``path``; returns the step."""
    state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: missing {missing}, unexpected {unexpected}")
    tensors = load_file(str(path / "trainer.safetensors"), device="cpu")
    # load_state_dict moves each moment to its parameter's device (and keeps "step" where it belongs).
    opt.load_state_dict(_optimizer_from_flat(tensors, state["optimizer_param_groups"]))
    stream.load_state_dict(state["data"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    return int(state["step"])


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


# --- the loop ----------------------------------------------------------------------------------

def _save_final(model: nn.Module, path: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(path))
        return
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".model.safetensors.tmp-")
    os.close(fd)
    save_model(model, tmp)
    os.replace(tmp, path / "model.safetensors")


def train(model: nn.Module, data: str, out: str | os.PathLike, cfg: TrainConfig, *, resume: bool = False,
          tokenizer=None, progress: bool = True) -> list[dict]:
    """Train ``model`` in place on the ``data`` spec; returns every metrics record of the run
    (those before a resumed checkpoint included), as written to ``out/metrics.jsonl``."""
    from tqdm.auto import tqdm

    from .evaluate import evaluate

    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is not None and model_vocab < tokenizer.get_vocab_size():
        raise ValueError(f"model vocab_size={model_vocab} is smaller than the tokenizer's "
                         f"{tokenizer.get_vocab_size()}; build the model with vocab_size >= that")
    device = next(model.parameters()).device
    sources = [s for s, _ in parse_data_spec(data)]
    stream = BatchStream(data, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                         tokenizer=tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opt = make_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)

    step = 0
    checkpoints = _checkpoint_dirs(out)
    if resume and checkpoints:
        step = load_checkpoint(checkpoints[-1][1], model, opt, stream)
    elif checkpoints:
        shutil.rmtree(out / CHECKPOINTS)        # a fresh run must not resume an older one later
    records = _read_metrics(out / METRICS, step) if step else []
    _write_text_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    micro = cfg.batch_size // cfg.grad_accum
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    t_last, steps_since = time.perf_counter(), 0
    with open(out / METRICS, "a", encoding="utf-8") as metrics:
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
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    result = model(ids, labels=labels)
                (result.loss / cfg.grad_accum).backward()
                for name in ("loss", "nll", "aux_loss"):
                    value = getattr(result, name, None)
                    if value is not None:
                        value = torch.as_tensor(value, device=device).detach().float()
                        sums[name] = sums[name] + value if name in sums else value
            means = {name: (v / cfg.grad_accum).item() for name, v in sums.items()}
            loss = means["loss"]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower lr or check the data")
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            bar.update(1)

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
                    rec["eval"] = evaluate(model, sources, seq_len=cfg.seq_len, batch_size=micro,
                                           max_windows=cfg.eval_windows, tokenizer=tokenizer)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                records.append(rec)
                t_last, steps_since = time.perf_counter(), 0
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                metrics.flush()
                os.fsync(metrics.fileno())
                save_checkpoint(out, step, model, opt, stream, cfg)
                t_last = time.perf_counter()
    bar.close()
    _save_final(model, out / FINAL_MODEL)
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
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(100, steps/10))")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="0: at the end only")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per source")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period (0: at the end only)")
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> list[dict]:
    from . import from_pretrained

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, grad_accum=args.grad_accum, seed=args.seed,
                      log_every=args.log_every, eval_every=args.eval_every, eval_windows=args.eval_windows,
                      save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(args.model, device=device)
    records = train(model, args.data, args.out, cfg, resume=args.resume, progress=not args.no_progress)
    last = records[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}; model written to {Path(args.out) / FINAL_MODEL}")
    for name, res in last.get("eval", {}).items():
        print(f"  {name:12s} ppl {res['ppl']:9.3f}  bpb {res['bpb']:.4f}")
    return records
