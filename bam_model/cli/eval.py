"""``bam eval``: held-out perplexity and bits per byte per domain (``bam_model.evaluate``)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .. import distributed, from_pretrained
from ..config import check_seq_len
from ..data import DOMAINS
from ..evaluate import evaluate
from ..files import check_output_file, write_text_atomic
from ..formats.load import context_length
from ..options import INT, add_options, from_args, int_at_least, option, positive_int, validate
from .common import device_option, progress_option

DEFAULT_SEQ_LEN = 256


@dataclass(kw_only=True)
class EvalOptions:
    model: str = option(help="model folder", positional=True)
    data: str = option(",".join(DOMAINS), help="domains or paths, comma-separated (weights are ignored); "
                       "default: every domain")
    seq_len: int | None = option(None, help=f"tokens per scored window (default {DEFAULT_SEQ_LEN}, or the "
                                 "model's context when it is shorter; at most the model's context)", kind=INT,
                                 check=int_at_least(2))
    batch_size: int = option(8, help="windows per forward pass", kind=INT, check=positive_int)
    max_windows: int | None = option(None, help="cap on held-out windows per domain", kind=INT,
                                     check=positive_int)
    device: str | None = device_option(torchrun=True)
    json: str | None = option(None, help="also write the results to this JSON file (a new file, or one an "
                              "earlier bam eval wrote)")
    no_progress: bool = progress_option()

    def __post_init__(self):
        validate(self)


# The format marker of the JSON file ``--json`` writes: an existing file is replaced only when it
# holds it (a results file of an earlier ``bam eval``).
EVAL_FORMAT = "bam-eval"


def _is_eval_file(value: dict) -> bool:
    """Ours: a results file of this bam eval, or of an earlier one (domain -> results, with "avg")."""
    if value.get("format") == EVAL_FORMAT:
        return True
    return "avg" in value and all(isinstance(r, dict) and {"loss", "ppl", "bpb"} <= set(r)
                                  for r in value.values())


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalOptions)


def run_eval(args: argparse.Namespace) -> dict:
    """``bam eval``; under torchrun every rank loads the model and scores its share of the windows,
    and rank 0 prints and writes the results."""

    opts = from_args(EvalOptions, args)
    context = context_length(opts.model)      # from the config alone: checked before any work
    if opts.seq_len is None:
        opts.seq_len = DEFAULT_SEQ_LEN if context is None else min(DEFAULT_SEQ_LEN, context)
    check_seq_len(opts.seq_len, context, "--seq-len")
    if opts.json is not None:    # before any work: never a file bam did not write, never the model's
        check_output_file(opts.json, _is_eval_file, flag="--json", what="a results file",
                          inputs=[("MODEL", opts.model)])
    with distributed.torchrun(opts.device) as (ctx, device):
        model = from_pretrained(opts.model, device=device)
        results = evaluate(model, opts.data, seq_len=opts.seq_len, batch_size=opts.batch_size,
                           max_windows=opts.max_windows, progress=not opts.no_progress)
    if not ctx.is_main:
        return results
    print(f"{'domain':12s} {'ppl':>10s} {'bpb':>8s} {'tokens':>9s}")
    for name, r in results.items():
        print(f"{name:12s} {r['ppl']:10.3f} {r['bpb']:8.4f} {r.get('tokens', ''):>9}")
    if opts.json:
        path = Path(opts.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": EVAL_FORMAT, "model": opts.model, "data": opts.data, "seq_len": opts.seq_len,
                  "max_windows": opts.max_windows, "results": results}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return results
