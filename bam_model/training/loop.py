"""The training loop of ``bam train``: a small, exact trainer for causal LMs.

Works with any ``nn.Module`` whose ``forward(input_ids, labels=...)`` returns an object with
``.loss`` (optionally ``.nll`` and ``.aux_loss``, which are logged). AdamW (no weight decay on
vectors), linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping, gradient
accumulation, bf16 autocast on CUDA. Under torchrun it trains data-parallel (DDP), fully sharded
(FSDP2) or with the MoE experts spread over the ranks (``distributed.py``): each rank takes its
share of every global batch, so the batch and the data order do not depend on the world size.

``resume=True`` continues from the newest intact checkpoint (``checkpointing``): one whose files
are missing, truncated or corrupt is refused with a warning naming the problem, moved aside to
``checkpoints/refused-step-NNNNNNN``, and the one before it is used. A resumed run reproduces the
uninterrupted one bitwise on the CPU (on CUDA as far as its kernels are deterministic).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import distributed, files
from ..data import BatchStream, parse_data_spec
from ..files import read_json, write_text_atomic
from ..tokenizer import for_model
from .checkpointing import CHECKPOINTS, MODEL_FILE, TRAINER_JSON, checkpoint_dirs, load_state, save_checkpoint
from .config import TrainConfig, lr_at, make_optimizer
from .run_folder import FINAL_MODEL, METRICS, RunFolder, data_inputs, open_run, read_metrics


class LossNotFinite(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


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


def save_final(model: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write the whole model to ``path`` from rank 0 (its weights in ``dtype``, by default their
    own); a collective under FSDP and expert parallelism (shards and expert slices are gathered to
    rank 0; ``model`` itself stays as it is)."""
    from ..build import build_model
    from ..model import CausalLM

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
          strategy: str = "ddp", expert_parallel: bool = False,
          save_dtype: torch.dtype | None = None) -> list[dict]:
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
        loop = _Loop(model, run, cfg, tokenizer, sources, stream, strategy, expert_parallel)
        return loop.run(progress, save_dtype)
    finally:
        if run is not out:
            run.close()


@dataclass
class _Step:
    """What one optimizer step measured: the mean loss terms over all ranks, and the gradient norm."""
    lr: float
    means: dict[str, float]
    grad_norm: torch.Tensor     # converted when logged: no synchronisation per step


class _Loop:
    """One training run: the model wrapped for its strategy, its optimizer, the data stream and the
    metrics records; ``run`` takes the optimizer steps, logging, evaluating and checkpointing."""

    def __init__(self, model: nn.Module, run: RunFolder, cfg: TrainConfig, tokenizer, sources,
                 stream: BatchStream, strategy: str, expert_parallel: bool):
        self.ctx = distributed.current()
        self.cfg, self.tokenizer, self.sources, self.stream = cfg, tokenizer, sources, stream
        self.out = run.path
        self.device = next(model.parameters()).device
        self.wrapped = distributed.prepare(model, strategy, expert_parallel)
        self.opt = make_optimizer(self.wrapped, cfg)
        torch.manual_seed(cfg.seed + 1_000_003 * self.ctx.rank)       # rank 0 keeps the single-process stream
        self.step = 0
        if run.resume_step >= 0:
            path = self.out / CHECKPOINTS / f"step-{run.resume_step:07d}"
            self.step = load_state(path, read_json(str(path / TRAINER_JSON)), self.wrapped, self.opt, stream)
        self.records = read_metrics(self.out / METRICS, self.step) if self.step else []
        if self.ctx.is_main:
            write_text_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))
        self.micro = cfg.batch_size // (cfg.grad_accum * self.ctx.world_size)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.experts = distributed.expert_parameter_ids(self.wrapped)

    def run(self, progress: bool, save_dtype: torch.dtype | None) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, ctx = self.cfg, self.ctx
        self.wrapped.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and ctx.is_main), desc="train",
                   unit="step")
        eta = Estimate(self.step, cfg.steps, self.tokens_per_step, self.device, enabled=ctx.is_main)
        t_last, steps_since = time.perf_counter(), 0
        metrics_file = (open(self.out / METRICS, "a", encoding="utf-8") if ctx.is_main
                        else contextlib.nullcontext())
        with metrics_file as metrics:
            while self.step < cfg.steps:
                done = self.optimizer_step()
                self.step += 1
                steps_since += 1
                bar.update(1)
                eta.step(self.step)
                do_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps
                if self.step % cfg.log_every == 0 or do_eval or self.step == cfg.steps:
                    rec = self.record(done, steps_since, t_last, do_eval)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    if metrics:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    self.records.append(rec)
                    t_last, steps_since = time.perf_counter(), 0
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                    if metrics:
                        os.fsync(metrics.fileno())
                    save_checkpoint(self.out, self.step, self.wrapped, self.opt, self.stream, cfg)
                    t_last = time.perf_counter()
        bar.close()
        save_final(self.wrapped, self.out / FINAL_MODEL, save_dtype)
        distributed.barrier()
        return self.records

    def optimizer_step(self) -> _Step:
        """One optimizer step over ``grad_accum`` micro-batches of the next global batch."""
        cfg, device = self.cfg, self.device
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = next(self.stream)
        # Per-micro-batch values stay on the device: one synchronisation per step, not per micro-batch.
        sums: dict[str, torch.Tensor] = {}
        for i in range(cfg.grad_accum):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            ids, labels = batch.input_ids[rows].to(device), batch.labels[rows].to(device)
            with distributed.grad_sync(self.wrapped, i == cfg.grad_accum - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    result = self.wrapped(ids, labels=labels)
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
            kept = (f"the checkpoint of step {self.step} is kept" if checkpoint_dirs(self.out)
                    else "no checkpoint was written")
            raise LossNotFinite(f"the loss is {loss} at step {self.step + 1} ({kept}); try a lower --lr (now "
                                f"{cfg.lr:g}), a longer --warmup or a lower --grad-clip, and check the data")
        grad_norm = distributed.clip_grad_norm(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                               self.experts)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return _Step(lr, means, grad_norm)

    def record(self, done: _Step, steps: int, since: float, do_eval: bool) -> dict:
        """The metrics record of the step just taken (``steps`` steps taken since ``since``)."""
        from ..evaluate import evaluate

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - since
        rec = {"step": self.step, "loss": done.means["loss"], "lr": done.lr,
               "grad_norm": float(done.grad_norm),
               "tokens_per_s": steps * self.tokens_per_step / max(elapsed, 1e-9),
               "tokens": self.step * self.tokens_per_step}
        rec.update({name: done.means[name] for name in ("nll", "aux_loss") if name in done.means})
        if do_eval:
            wrapped = self.wrapped
            eval_model = wrapped if distributed.is_fsdp(wrapped) else distributed.unwrap(wrapped)
            rec["eval"] = evaluate(eval_model, self.sources, seq_len=self.cfg.seq_len, batch_size=self.micro,
                                   max_windows=self.cfg.eval_windows, tokenizer=self.tokenizer)
        return rec
