"""``bam generate`` (continue a prompt) and its options."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..config import DTYPES, dtype_option
from ..distributed import resolve_device
from ..generate import generate_text, load_model_and_tokenizer
from ..options import INT, NUMBER, add_options, from_args, option, seed_check, validate
from .common import device_option


@dataclass(kw_only=True)
class GenerateOptions:
    model: str = option(help="our folder (dense or mixture), a Hugging Face Llama-family folder or a .gguf",
                        positional=True)
    prompt: str = option(help="the text to continue (with --chat: the user's message to answer)")
    chat: bool = option(False, help="render the prompt as a user's message with the model's chat template "
                        "and print the model's answer")
    max_new_tokens: int = option(64, help="tokens to generate at most", kind=INT)
    temperature: float = option(0.0, help="0: greedy", kind=NUMBER)
    top_p: float = option(1.0, help="nucleus sampling mass", kind=NUMBER)
    seed: int | None = option(None, help="sampling seed (at most 2**62)", kind=INT, check=seed_check)
    tokenizer: str | None = option(None, help="a tokenizer.json (default: the model's own)")
    dtype: str | None = dtype_option(None, help="default: as stored (float32 for HF/GGUF)")
    device: str | None = device_option()
    verbose: bool = option(False, help="print the generation speed even when stderr is not a terminal (it "
                           "is printed on a terminal)")


    def __post_init__(self):
        validate(self)
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as e:   # bytes that were not UTF-8 reach argv as lone surrogates
            raise ValueError(f"--prompt is not UTF-8 text (an undecodable byte at character {e.start}); give "
                             "the prompt in UTF-8") from None


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_options(p, GenerateOptions)


def run_generate(args: argparse.Namespace) -> str:
    opts = from_args(GenerateOptions, args)
    device = resolve_device(opts.device)
    model, tok = load_model_and_tokenizer(opts.model, opts.tokenizer,
                                          DTYPES[opts.dtype] if opts.dtype else None, device)
    stats = {}
    text = generate_text(model.eval(), tok, opts.prompt, opts.max_new_tokens, opts.temperature, opts.top_p,
                         opts.seed, stats=stats, chat=opts.chat)
    print(text)
    if sys.stderr.isatty() or opts.verbose:
        print(f"generate: {stats['new_tokens']} tokens in {stats['seconds']:.2f} s "
              f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s on {device})",
              file=sys.stderr)
    return text
