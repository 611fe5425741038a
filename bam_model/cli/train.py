"""``bam train``: the run's settings are ``TrainRun`` (``RunOptions``, the run's data, folder,
strategy and final dtype, plus the model, the device and the progress) and ``TrainConfig`` (the
hyper-parameters); both from ``bam_model.training.config``, and both give the flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .. import distributed, from_pretrained
from ..config import check_seq_len
from ..data import parse_data_spec
from ..formats.load import context_length
from ..options import add_options, from_args, option
from ..training import FINAL_MODEL, RunOptions, TrainConfig, data_inputs, open_run, train
from ..training.mixup import ALPHA_JSON, ALPHA_PLOT
from .common import device_option, progress_option


@dataclass(kw_only=True)
class TrainRun(RunOptions):
    model: str = option(help="model folder (from bam branch / mix / a previous bam train)", positional=True)
    device: str | None = device_option(torchrun=True)
    no_progress: bool = progress_option("a line for the first step and for every logged step instead (as "
                                        "where stderr is not a terminal)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    # In --help: what to train, on what, into where; the hyper-parameters; how the run goes.
    first = ("model", "data", "out")
    add_options(parser, TrainRun, only=first)
    add_options(parser, TrainConfig)
    add_options(parser, TrainRun, only=("resume", "overwrite", "device"))
    add_options(parser, TrainRun, skip=(*first, "resume", "overwrite", "device"))


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
    # Every check of the run folder comes before the model is loaded (and --mixup-base, by train).
    with distributed.torchrun(opts.device) as (ctx, device), open_run(opts, cfg, inputs=inputs) as run:
        model = from_pretrained(opts.model, device=device)
        records = train(model, run, cfg, progress="lines" if opts.no_progress else True)
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
