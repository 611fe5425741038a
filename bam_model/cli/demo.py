"""``bam demo``: the paper's comparison on the bundled corpus (``bam_model.demo``)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..options import add_options, from_args, option


@dataclass(kw_only=True)
class DemoOptions:
    quick: bool = option(False, help="a smaller model and fewer steps (about 2 minutes on 2 CPU cores)")
    out: str = option("runs/demo", help="folder for every model, results.json, table.md and the plots")
    device: str | None = option(None, help="default: cuda when available, else cpu")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    add_options(p, DemoOptions)


def run_demo_cli(args: argparse.Namespace) -> dict:
    from ..demo import FULL, QUICK, run_demo

    opts = from_args(DemoOptions, args)
    return run_demo(QUICK if opts.quick else FULL, opts.out, device=opts.device, progress=sys.stderr.isatty())
