"""``bam branch``: copy a dense seed once per domain."""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass

from ..config import DTYPES, dtype_option
from ..files import check_output, reserve_output
from ..formats import load_dense
from ..options import add_options, from_args, option
from ..upcycle import branch


@dataclass(kw_only=True)
class BranchOptions:
    seed: str = option(help="dense model: our folder, a Hugging Face Llama-family folder or a .gguf file",
                       positional=True)
    domains: list[str] = option(help="one copy per domain name", nargs="+")
    out: str = option(help="folder that receives one checkpoint folder per domain")
    dtype: str = dtype_option("float32", help="the copies' dtype")

    def __post_init__(self):
        for d in self.domains:
            if not d or os.sep in d or d in (".", "..") or d.startswith("."):
                raise ValueError(f"--domains: {d!r} cannot name a folder")
        if len(set(self.domains)) < len(self.domains):
            raise ValueError(f"--domains names a domain twice: {self.domains}")


def add_branch_args(p: argparse.ArgumentParser) -> None:
    add_options(p, BranchOptions)


def run_branch(args: argparse.Namespace) -> list[str]:
    opts = from_args(BranchOptions, args)
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise ValueError(f"--out {opts.out!r} is a file, not a folder; choose a folder path")
    targets = [os.path.join(opts.out, d) for d in opts.domains]
    for path in targets:  # every target is checked before any is created or locked
        check_output(path, "model", flag="--out", inputs=[("SEED", opts.seed)])
    with contextlib.ExitStack() as held:
        for path in targets:
            held.enter_context(reserve_output(path, "model", inputs=[("SEED", opts.seed)], what="bam branch"))
        copies = branch(load_dense(opts.seed, DTYPES[opts.dtype]), list(opts.domains))
        for path, model in zip(targets, copies):  # each copy carries the seed's tokenizer into its folder
            model.save_pretrained(path)
            print(f"wrote {path}")
    return targets
