"""``bam export``: a model as the Hugging Face class that computes it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..config import DTYPES, dtype_option
from ..files import reserve_output
from ..formats import export_hf
from ..generate import load_model_and_tokenizer
from ..options import add_options, from_args, option
from ..tokenizer import hf_tokenizer_files


@dataclass(kw_only=True)
class ExportOptions:
    model: str = option(help="our folder (dense or BTX/sparse mixture), a Hugging Face folder or a .gguf",
                        positional=True)
    format: str = option("hf", help="hf: the Hugging Face class that computes the model (a dense model as "
                         "Llama, a BTX or sparse mixture as Mixtral), with the tokenizer files AutoTokenizer "
                         "reads", choices=("hf",))
    out: str = option(help="output folder (new, empty, or one bam wrote)")
    dtype: str | None = dtype_option(None, help="weights' dtype (default: as stored; float32 for a .gguf)")
    tokenizer: str | None = option(None, help="a tokenizer.json (default: the model's own)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    add_options(p, ExportOptions)


def run_export(args: argparse.Namespace) -> str:
    opts = from_args(ExportOptions, args)
    with reserve_output(opts.out, "model", inputs=[("MODEL", opts.model)], what="bam export"):
        dtype = DTYPES[opts.dtype] if opts.dtype else None
        model, tok = load_model_and_tokenizer(opts.model, opts.tokenizer, dtype)
        tokenizer_files = hf_tokenizer_files(tok.tokenizer.to_str(), model.config, model.chat_template)
        cls = export_hf(model, opts.out, extra_files=tokenizer_files)
    print(f"wrote {opts.out}: {cls}, {model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          "parameters, with its tokenizer")
    return opts.out
