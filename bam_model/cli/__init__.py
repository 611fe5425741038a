"""bam: upcycle dense transformer checkpoints into Branch-Attend-Mix mixtures.

    bam prepare my-corpus/ --tokenizer SEED --out prepared/code
    bam branch SEED --domains code math legal --out branches/
    bam train branches/code --data code:0.9,drama:0.1 --steps 2000 --out runs/code
    bam mix --base-model SEED --experts runs/code/model runs/math/model --out mixed/
    bam train mixed/ --data code,math,legal,drama --steps 2000 --out runs/mixed
    bam eval runs/mixed/model --data code,math
    bam generate runs/mixed/model --prompt "def fib(n):"
    bam export runs/code/model --out code-hf/

Each subcommand has its own --help.
"""
# One module per command (prepare, branch, train, mix, eval, generate, export, demo), each with its options
# dataclass, ``add_<command>_args`` (derived from it, see ``bam_model.options``) and ``run_<command>``.
from __future__ import annotations

import argparse
import errno
import sys

from ..data import forget_sources
from ..entry import keep_freed_memory
from ..options import HelpFormatter
from .branch import add_branch_args, run_branch
from .demo import add_demo_args, run_demo_cli
from .eval import add_eval_args, run_eval
from .export import add_export_args, run_export
from .generate import add_generate_args, run_generate
from .mix import add_mix_args, run_mix
from .prepare import add_prepare_args, run_prepare
from .train import add_train_args, run_train

SUBCOMMANDS = [  # (name, help, add_args, run)
    ("prepare", "tokenize text, JSON Lines, JSON or Parquet files once, for train and eval", add_prepare_args,
     run_prepare),
    ("branch", "copy a dense seed once per domain", add_branch_args, run_branch),
    ("train", "train a model on a domain, a mixture or text files", add_train_args, run_train),
    ("mix", "build a mixture (bam, btx, sparse) from a seed and its trained copies", add_mix_args, run_mix),
    ("eval", "held-out perplexity and bits per byte per domain", add_eval_args, run_eval),
    ("generate", "continue a prompt with any model bam reads", add_generate_args, run_generate),
    ("export", "write a model as the Hugging Face class that computes it (Llama, Qwen2, Qwen3; Mixtral, "
     "Qwen2-MoE, Qwen3-MoE)", add_export_args, run_export),
    ("demo", "the paper's comparison on the bundled corpus: seed, experts, every mixture, table and plots",
     add_demo_args, run_demo_cli),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return parser


# OS errors a user can foresee and mend (rights, a read-only or full disk): one line, not a traceback.
USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                  errno.EISDIR, errno.ENAMETOOLONG)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    forget_sources()      # a command is a run: its sources resolve once, when it starts
    try:
        args.run(args)
    except (ValueError, FloatingPointError) as e:
        print(f"bam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f": {e.filename!r}" if e.filename else ""
        print(f"bam {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0
