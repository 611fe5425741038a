"""``bam demo``: the paper's comparison on the bundled corpus (``bam_model.demo``)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from ..demo import FULL, QUICK, run_demo
from ..options import INT, TEXT, add_options, from_args, option, positive_int
from ..upcycle import FFN_ROUTINGS
from .common import device_option, progress_option


@dataclass(kw_only=True)
class DemoOptions:
    quick: bool = option(False, help="a smaller model, fewer steps, one seed (about a minute on 2 CPU cores)")
    out: str = option("runs/demo", help="folder for every model, results.json, table.md and the plots")
    seeds: int | None = option(None, help="train every mixture this many times, each with its own router "
                               "initialisation and data order, from the same seed model and experts "
                               "(default: 3; 1 with --quick)", kind=INT, check=positive_int)
    ablations: bool = option(False, help="also the paper's ablations, on the same seed and experts: "
                             "parameter-matched BTX, attention routing top-1 and top-2 against soft, the "
                             "seed trained on the mixtures' data, and the inference cost (FLOPs, KV cache, "
                             "ms per generated token); after a finished run only the new models are trained")
    ffn_routing: str = option("straight-through", help="FFN routing of every top-1 mixture (bam mix's "
                              "--ffn-routing): paper gives the paper's own, the kept probability as it is",
                              kind=TEXT, choices=tuple(FFN_ROUTINGS), what=" or ".join(FFN_ROUTINGS))
    device: str | None = device_option()
    no_progress: bool = progress_option("a line per phase only (as where stderr is not a terminal)")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    add_options(p, DemoOptions)


def run_demo_cli(args: argparse.Namespace) -> dict:

    opts = from_args(DemoOptions, args)
    cfg = QUICK if opts.quick else FULL
    if opts.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=opts.seeds)
    cfg = dataclasses.replace(cfg, ffn_routing=opts.ffn_routing)
    return run_demo(cfg, opts.out, device=opts.device, progress=sys.stderr.isatty() and not opts.no_progress,
                    ablations=opts.ablations)
