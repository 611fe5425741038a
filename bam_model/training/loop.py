"""The training loop of ``bam train``: a small, exact trainer for causal LMs.

Works with any ``nn.Module`` whose ``forward(input_ids, labels=...)`` returns an object with
``.loss`` (optionally ``.nll`` and ``.aux_loss``, which are logged). AdamW (no weight decay on
vectors), linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping, gradient
accumulation, bf16 autocast on CUDA. Under torchrun it trains data-parallel (DDP), fully sharded
(FSDP2) or with the MoE experts spread over the ranks (``distributed.py``): each rank takes its
share of every global batch, so the batch and the data order do not depend on the world size.

What a run does beyond that is an extension (``extension.py``), called at fixed points of the
loop: ``extensions_for`` makes the run's from its settings. ``cfg.mixup`` trains by attention-guided
weight mixup (``mixup_run.py``).

``RunOptions.resume`` continues from the newest intact checkpoint (``checkpointing``): one whose files
are missing, truncated or corrupt is refused with a warning naming the problem, moved aside to
``checkpoints/refused-step-NNNNNNN``, and the one before it is used. A resumed run reproduces the
uninterrupted one bitwise on the CPU (on CUDA as far as its kernels are deterministic).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed, files
from ..build import DtypeRangeError, build_model, cast
from ..config import check_seq_len
from ..data import BatchStream, parse_data_spec, source_digest
from ..evaluate import evaluate
from ..files.atomic import save_safetensors, write_text_atomic
from ..files.reading import read_json
from ..files.room import gib
from ..model import CausalLM
from ..tokenizer import for_model
from . import mixup_run, run_state
from .checkpointing import CHECKPOINTS, MODEL_FILE, TRAINER_JSON, checkpoint_dirs, load_state, save_checkpoint
from .config import RunOptions, TrainConfig, lr_at, make_optimizer
from .extension import Extension, LossNotFinite
from .mixup import tensors_digest
from .run_folder import FINAL_MODEL, METRICS, RunFolder, check_start, data_inputs, open_run, read_metrics


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

    inner = distributed.unwrap(model)
    sharded = distributed.is_fsdp(model) or distributed.is_expert_parallel(inner)
    if not sharded and hasattr(inner, "save_pretrained"):
        if distributed.current().is_main:
            inner.save_pretrained(str(path), dtype=dtype)
        return
    tensors = run_state.full_model_tensors(model)
    if not distributed.current().is_main:
        return
    if isinstance(inner, CausalLM):
        whole = build_model(inner.config, tensors)
        whole.tokenizer, whole.chat_template = inner.tokenizer, inner.chat_template
        whole.save_pretrained(str(path), dtype=dtype)
        return
    if dtype is not None:
        tensors = {k: cast(k, v, dtype) for k, v in tensors.items()}
    files.write_model_folder(path, lambda folder: save_safetensors(tensors, folder / MODEL_FILE))


def train(model: nn.Module, run: RunOptions | RunFolder, cfg: TrainConfig, *, tokenizer=None,
          progress: bool | str = True) -> list[dict]:
    """Train ``model`` in place as ``run`` (``RunOptions``: the data, the run folder, the strategy,
    the final model's dtype, weight mixup's base) and ``cfg`` (the hyper-parameters) say; returns
    every metrics record of the run (those before a resumed checkpoint included), as written to
    ``out/metrics.jsonl``. ``tokenizer``: by default the model's own (``tokenizer.for_model``).

    Under torchrun (``distributed.torchrun``) every rank calls this with the same arguments. Rank r
    takes rows r, r + W, ... of each global batch of ``cfg.batch_size``; the logged losses are
    means over all ranks. After an FSDP or expert-parallel run ``model`` stays sharded; ``out/model``
    holds the whole of it. With ``cfg.mixup`` ``model`` ends holding the mixed weights (``mixup_run``).

    ``progress``: True shows a progress bar on a terminal and, where stderr is not one (a log
    file), a line per logged step and one for the first step at once; "lines" always the lines;
    False neither.

    The run folder is checked, claimed and locked first (``open_run``; or pass the ``RunFolder`` it
    gave): a fresh run into a folder holding a run is refused unless ``run.resume`` (continue it,
    with the same settings) or ``run.overwrite`` (start afresh)."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    options = run.options if isinstance(run, RunFolder) else run
    ctx = distributed.current()
    extensions = extensions_for(cfg, options, model)
    if cfg.batch_size % (cfg.grad_accum * ctx.world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of grad_accum={cfg.grad_accum} "
                         f"x world size={ctx.world_size}")
    inner = distributed.unwrap(model)
    tokenizer = for_model(inner, tokenizer)
    sources = [s for s, _ in parse_data_spec(options.data)]
    check_seq_len(cfg.seq_len, getattr(getattr(inner, "config", None), "max_seq_len", None))
    _check_memory(inner, cfg, options.strategy, options.expert_parallel, ctx.world_size)
    opened = (contextlib.nullcontext(run) if isinstance(run, RunFolder) else
              open_run(options, cfg, inputs=data_inputs(sources)))
    with opened as folder:
        start = _start_digests(model, tokenizer, sources)
        loop = Loop(model, folder, cfg, tokenizer, sources, extensions, start)
        return loop.run(progress)


def extensions_for(cfg: TrainConfig, options: RunOptions, model: nn.Module) -> list[Extension]:
    """The extensions a run's settings ask for (each refuses settings it cannot train with)."""
    return [e for e in (mixup_run.for_run(cfg, options, model),) if e is not None]


def _check_memory(model: nn.Module, cfg: TrainConfig, strategy: str, expert_parallel: bool,
                  world_size: int) -> None:
    """Refuse, before any work, a run whose every step needs more memory than the device has, by a
    lower bound: each weight this rank holds, and for a trainable one its gradient and two AdamW
    moments (in its own dtype; FSDP shards them all, expert parallelism the experts), a
    micro-batch's float32 logits and their gradient, and the rank's share of the batch's token ids."""
    device = next(model.parameters()).device
    weights = 0
    for name, p in model.named_parameters():
        share = world_size if strategy == "fsdp" or (expert_parallel and ".experts." in name) else 1
        weights += p.numel() * p.element_size() * (4 if p.requires_grad else 1) // share
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    micro = cfg.batch_size // (cfg.grad_accum * world_size)
    batch = 8 * micro * cfg.seq_len * vocab + 16 * (cfg.batch_size // world_size) * cfg.seq_len
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else files.physical_memory())
    if have is None or weights + batch <= have:
        return
    where = f"memory of {device}" if device.type == "cuda" else "this machine's memory"
    advice = ("lower --batch-size or raise --grad-accum" if batch >= weights else
              "under torchrun, shard them with --strategy fsdp (or spread a mixture's experts with "
              "--expert-parallel)")
    raise ValueError(f"a step of this run needs at least {gib(weights + batch)} "
                     f"({gib(weights)} for the weights with their gradients and AdamW state, "
                     f"{gib(batch)} for micro-batches of {micro:,} sequences of {cfg.seq_len} tokens "
                     f"and their logits), more than the {gib(have)} of {where}; {advice}")


def _start_digests(model: nn.Module, tokenizer, sources) -> dict:
    """What the run starts from, as SHA-256 digests that every checkpoint records and a resumed run
    must match: the model (its tensors, config and tokenizer) and each data source (its tokens, both
    splits: the documents and the tokenizer)."""
    inner = distributed.unwrap(model)
    h = hashlib.sha256(tensors_digest(dict(inner.state_dict())).encode())
    config = getattr(inner, "config", None)
    h.update(config.to_json().encode() if hasattr(config, "to_json") else b"")
    h.update(tokenizer.to_str().encode())
    return {"model": h.hexdigest(), "data": {s.name: source_digest(s, tokenizer) for s in sources}}


@dataclass
class _Step:
    """What one optimizer step measured: the mean loss terms over all ranks, and the gradient norm."""
    lr: float
    means: dict[str, float]
    grad_norm: torch.Tensor     # converted when logged: no synchronisation per step


class Loop:
    """One training run: the model wrapped for its strategy, its optimizer, the data stream, the
    extensions and the metrics records; ``run`` takes the optimizer steps, logging, evaluating and
    checkpointing."""

    def __init__(self, model: nn.Module, run: RunFolder, cfg: TrainConfig, tokenizer, sources,
                 extensions: list[Extension], start: dict):
        self.ctx = distributed.current()
        self.cfg, self.tokenizer, self.sources, self.start = cfg, tokenizer, sources, start
        self.options, self.out, self.extensions = run.options, run.path, extensions
        self.device = next(model.parameters()).device

        def open_stream(part: tuple[str, float] | None) -> BatchStream:
            return BatchStream(run.options.data, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                               seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
                               tokenizer=tokenizer, part=part)
        parts = [p for p in (e.data_part() for e in extensions) if p is not None]
        self.stream = open_stream(parts[0] if parts else None)      # the model's own steps' data
        for e in extensions:
            model = e.setup(model, self.stream, open_stream)
        ignored = tuple(name for e in extensions for name in e.ddp_ignored())
        self.wrapped = distributed.prepare(model, run.options.strategy, run.options.expert_parallel,
                                           ignore=ignored)
        own = [group for e in extensions for group in e.param_groups()]
        self.opt = make_optimizer(self.wrapped, cfg, skip={id(p) for g in own for p in g["params"]})
        self.params = [p for g in self.opt.param_groups for p in g["params"]]    # clipped together
        for group in own:
            self.opt.add_param_group(group)
        torch.manual_seed(cfg.seed + 1_000_003 * self.ctx.rank)       # rank 0 keeps the single-process stream
        self.step = 0
        if run.resume_step >= 0:
            path = self.out / CHECKPOINTS / f"step-{run.resume_step:07d}"
            state = read_json(str(path / TRAINER_JSON))
            check_start(state, path, start)
            for e in extensions:
                e.restore(state.get(e.name), path)
            self.step = load_state(path, state, self.wrapped, self.opt, self.stream)
        self.records = read_metrics(self.out / METRICS, self.step) if self.step else []
        if self.ctx.is_main:
            write_text_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))
        self.micro = cfg.batch_size // (cfg.grad_accum * self.ctx.world_size)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.experts = distributed.expert_parameter_ids(self.wrapped)

    def run(self, progress: bool | str) -> list[dict]:
        from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

        cfg, ctx = self.cfg, self.ctx
        self.wrapped.train()
        on_terminal = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not (progress is True and on_terminal and ctx.is_main))
        lines = ctx.is_main and (progress == "lines" or (progress is True and not on_terminal))
        eta = Estimate(self.step, cfg.steps, self.tokens_per_step, self.device, enabled=ctx.is_main)
        t_last, steps_since = time.perf_counter(), 0
        t_start, first = t_last, self.step + 1
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
                    if lines:
                        self.say(rec["loss"], rec["tokens_per_s"], t_start, first)
                    if metrics:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    self.records.append(rec)
                    t_last, steps_since = time.perf_counter(), 0
                elif lines and self.step == first:      # the first step at once, whatever --log-every
                    rate = self.tokens_per_step / (time.perf_counter() - t_last)
                    self.say(done.means["loss"], rate, t_start, first)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                    if metrics:
                        os.fsync(metrics.fileno())
                    save_checkpoint(self.out, self.step, self.wrapped, self.opt, self.stream, cfg,
                                    self.checkpoint_extra())
                    t_last = time.perf_counter()
        bar.close()
        final = self.wrapped
        for e in self.extensions:
            final = e.finish(final, self.out)
        try:
            save_final(final, self.out / FINAL_MODEL, self.options.save_dtype)
        except DtypeRangeError as e:
            raise DtypeRangeError(f"{e}. The run's last checkpoint (step {self.step}) keeps the float32 "
                                  "weights: write model/ from it by running the same command with --resume "
                                  "and another --dtype") from None
        distributed.barrier()
        return self.records

    def say(self, loss: float, tokens_per_s: float, t_start: float, first: int) -> None:
        """One line for a step, where no progress bar shows (a log file, ``--no-progress``)."""
        elapsed = time.perf_counter() - t_start
        left = elapsed / (self.step - first + 1) * (self.cfg.steps - self.step)
        print(f"train: step {self.step}/{self.cfg.steps}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
              f"{_duration(elapsed)} elapsed, about {_duration(left)} left", file=sys.stderr, flush=True)

    def checkpoint_extra(self) -> dict:
        """What ``trainer.json`` holds beyond the loop's own state: what the run started from, and
        each extension's entry."""
        entries = {e.name: e.state() for e in self.extensions}
        return {"start": self.start, **{name: s for name, s in entries.items() if s is not None}}

    def optimizer_step(self) -> _Step:
        """One optimizer step over ``grad_accum`` micro-batches of the next global batch."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for e in self.extensions:
            e.before_step(self)
        means = self.forward_backward(self.stream, sync=True)
        loss = means["loss"]
        if not math.isfinite(loss):
            raise LossNotFinite(f"the loss is {loss} at step {self.step + 1} ({self.kept()}); try a lower "
                                f"--lr (now {cfg.lr:g}), a longer --warmup or a lower --grad-clip, and check "
                                "the data")
        grad_norm = distributed.clip_grad_norm(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                               self.experts)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for e in self.extensions:
            e.after_step(self)
        return _Step(lr, means, grad_norm)

    def kept(self) -> str:
        """What a run that stops now leaves to resume from, in words."""
        found = checkpoint_dirs(self.out)
        return f"the checkpoint of step {found[-1][0]} is kept" if found else "no checkpoint was written"

    def forward_backward(self, stream: BatchStream, sync: bool) -> dict[str, float]:
        """Forward and backward over the ``grad_accum`` micro-batches of ``stream``'s next global
        batch (gradients reduced over the ranks by DDP after the last one when ``sync``); returns
        the mean loss terms over all ranks."""
        cfg, device = self.cfg, self.device
        batch = next(stream)
        # Each micro-batch's NLL counts by its share of the global batch's targets (as transformers'
        # num_items_in_batch does): where labels are masked (conversations) micro-batches hold
        # different numbers of targets, and a plain mean per micro-batch would weigh a token by how
        # its micro-batch was filled. Unmasked, every share is 1 / grad_accum, as before.
        targets = (batch.labels[:, 1:] != -100).sum(1).to(torch.float64)
        total = float(distributed.all_reduce_sum(targets.sum().reshape(1))[0])
        # Per-micro-batch values stay on the device: one synchronisation per step, not per micro-batch.
        sums: dict[str, torch.Tensor] = {}
        for i in range(cfg.grad_accum):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            ids, labels = batch.input_ids[rows].to(device), batch.labels[rows].to(device)
            with distributed.grad_sync(self.wrapped, sync and i == cfg.grad_accum - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    result = self.wrapped(ids, labels=labels)
                nll = getattr(result, "nll", None)
                if nll is None:
                    objective = result.loss / cfg.grad_accum
                else:   # gradients are averaged over the ranks: a rank's share counts world_size times
                    share = float(targets[rows].sum()) * self.ctx.world_size / total if total else 0.0
                    aux = getattr(result, "aux_loss", None)
                    objective = nll * share + (aux / cfg.grad_accum if aux is not None else 0)
                objective.backward()
            for name in ("loss", "nll", "aux_loss"):
                value = getattr(result, name, None)
                if value is not None:
                    value = torch.as_tensor(value, device=device).detach().float()
                    sums[name] = sums[name] + value if name in sums else value
        names = list(sums)
        values = distributed.all_reduce_mean(torch.stack([sums[n] for n in names]) / cfg.grad_accum)
        return dict(zip(names, values.tolist()))

    def record(self, done: _Step, steps: int, since: float, do_eval: bool) -> dict:
        """The metrics record of the step just taken (``steps`` steps taken since ``since``)."""

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - since
        rec = {"step": self.step, "loss": done.means["loss"], "lr": done.lr,
               "grad_norm": float(done.grad_norm),
               "tokens_per_s": steps * self.tokens_per_step / max(elapsed, 1e-9),
               "tokens": self.step * self.tokens_per_step}
        rec.update({name: done.means[name] for name in ("nll", "aux_loss") if name in done.means})
        for e in self.extensions:
            e.log(rec, do_eval)
        if do_eval:
            wrapped = self.wrapped
            eval_model = wrapped if distributed.is_fsdp(wrapped) else distributed.unwrap(wrapped)
            rec["eval"] = evaluate(eval_model, self.sources, seq_len=self.cfg.seq_len, batch_size=self.micro,
                                   max_windows=self.cfg.eval_windows, tokenizer=self.tokenizer)
        return rec
