"""``bam train``: the run's settings are ``TrainRun`` (model, data, run folder, devices) and
``TrainConfig`` (the hyper-parameters, ``bam_model.training.config``); both give the flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .. import distributed, from_pretrained
from ..config import DTYPES, check_seq_len
from ..data import parse_data_spec
from ..formats.load import context_length
from ..options import add_options, from_args, option
from ..training import FINAL_MODEL, TrainConfig, data_inputs, open_run, train
from ..training.mixup import ALPHA_JSON, ALPHA_PLOT, trainable_weights
from .common import device_option, dtype_option


@dataclass(kw_only=True)
class TrainRun:
    model: str = option(help="model folder (from bam branch / mix / a previous bam train)", positional=True)
    data: str = option(help="domain (code, math, legal, drama, scripture), mixture 'code:0.5,math:0.5', or "
                       "text path")
    out: str = option(help="run folder: metrics.jsonl, checkpoints/, model/")
    resume: bool = option(False, help="continue the run in --out from its newest intact checkpoint, with the "
                          "same settings (only --log-every, --eval-every, --eval-windows, --save-every and "
                          "--keep-checkpoints may change); a fresh run when --out holds none")
    overwrite: bool = option(False, help="start afresh in an --out that holds an earlier run, removing that "
                             "run's files")
    device: str | None = device_option(torchrun=True)
    strategy: str = option("ddp", help="under torchrun: ddp replicates the model on every rank, fsdp shards "
                           "parameters, gradients and optimizer state over the ranks",
                           choices=distributed.STRATEGIES)
    expert_parallel: bool = option(False, help="under torchrun (ddp): spread each MoE layer's experts over "
                                   "the ranks, tokens exchanged with all-to-all; the number of experts must "
                                   "divide by the world size")
    dtype: str | None = dtype_option(None, help="dtype of the final model/ (default: the training dtype, "
                                     "float32); bfloat16 halves its size. Checkpoints keep float32 weights "
                                     "and optimizer state, which resuming needs")
    mixup_base: str | None = option(None, help="with --mixup: the model folder whose weights are the frozen "
                                    "W_base (default: MODEL's own); same weight names and shapes as MODEL. "
                                    "W_task starts as MODEL: the run starts at a * MODEL + (1 - a) * BASE")
    no_progress: bool = option(False, help="no progress bar: a line for the first step and for every logged "
                               "step instead (as where stderr is not a terminal)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    what = ("model", "data", "out")
    add_options(parser, TrainRun, only=what)
    add_options(parser, TrainConfig)
    add_options(parser, TrainRun, skip=what)


def run_train(args: argparse.Namespace) -> list[dict]:
    """``bam train``; under torchrun each rank runs this and joins the process group first."""

    cfg, opts = from_args(TrainConfig, args), from_args(TrainRun, args)
    if opts.mixup_base is not None and not cfg.mixup:
        raise ValueError("--mixup-base is the frozen base of weight-mixup training: add --mixup")
    sources = [s for s, _ in parse_data_spec(opts.data)]
    check_seq_len(cfg.seq_len, context_length(opts.model), "--seq-len")   # before the run folder is made
    inputs = [("MODEL", opts.model), *data_inputs(sources)]
    if opts.mixup_base is not None:
        inputs.append(("--mixup-base", opts.mixup_base))
    # Every check of the run folder comes before the model is loaded.
    with (distributed.torchrun(opts.device) as (ctx, device),
          open_run(opts.out, cfg, opts.data, resume=opts.resume, overwrite=opts.overwrite,
                   inputs=inputs) as run):
        model = from_pretrained(opts.model, device=device)
        base = None
        if opts.mixup_base is not None:   # its weights alone: the module goes, nothing else is kept
            base = {name: p.detach() for name, p in
                    trainable_weights(from_pretrained(opts.mixup_base, device=device)).items()}
        records = train(model, opts.data, run, cfg, progress="lines" if opts.no_progress else True,
                        strategy=opts.strategy, expert_parallel=opts.expert_parallel,
                        save_dtype=DTYPES[opts.dtype] if opts.dtype else None, mixup_base=base)
    if ctx.is_main:
        last = records[-1]
        final = Path(opts.out) / FINAL_MODEL
        print(f"step {last['step']}: loss {last['loss']:.4f}; model written to {final}")
        for name, res in last.get("eval", {}).items():
            print(f"  {name:12s} ppl {res['ppl']:9.3f}  bpb {res['bpb']:.4f}")
        if cfg.mixup:
            print(f"  weight mixup: mean coefficient {last['alpha']:.3f} (the task weights' share of the "
                  f"model); per weight in {Path(opts.out) / ALPHA_JSON} and {ALPHA_PLOT}")
    return records
