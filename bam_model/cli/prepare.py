"""``bam prepare``: tokenize a corpus once into a folder of prepared data (``bam_model.prepare``)
that ``bam train --data DIR`` and ``bam eval --data DIR`` map without reading it whole."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from .. import prepare
from ..chat import ChatTemplate
from ..config import CONFIG_CLASSES, config_from_dict
from ..files.checks import check_output
from ..files.reading import read_json
from ..files.room import gib
from ..formats.folder import folder_config, folder_model_type
from ..formats.gguf import gguf_chat_template, gguf_reader, gguf_tokenizer, is_gguf
from ..formats.load import chat_template_of_folder, tokenizer_of_source
from ..options import INT, NUMBER, TEXT, add_options, from_args, number_in, option, positive_int, validate
from ..tokenizer import read_tokenizer
from .common import progress_option


@dataclass(kw_only=True)
class PrepareOptions:
    sources: list[str] = option(help="files or folders to read: text files (.txt, .md, any other name; "
                                ".gz too) one document each; .jsonl, .json (.gz too) and .parquet one "
                                "document per record", positional=True, nargs="+")
    tokenizer: str = option(help="the model whose tokenizer is used (a model folder with its "
                            "tokenizer.json, a .gguf), or a tokenizer.json")
    out: str = option(help="output folder (new, empty, or prepared data bam wrote, which is replaced)")
    text_field: str = option("text", help="the field of a record (or column of a Parquet file) that holds "
                             "its text", kind=TEXT)
    heldout: float = option(0.1, help="share of the documents held out for evaluation", kind=NUMBER,
                            check=number_in(0, 0.5, above_low=True))
    workers: int | None = option(None, help="tokenizer threads (default: every core)", kind=INT,
                                 check=positive_int)
    no_progress: bool = progress_option()

    def __post_init__(self):
        validate(self)


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, PrepareOptions)


def read_tokenizer_of(path: str):
    """The tokenizer of ``path``: a tokenizer.json file, a GGUF file's vocabulary, or a model folder's
    tokenizer.json."""

    if not os.path.exists(path):
        raise ValueError(f"--tokenizer {path!r} does not exist")
    if os.path.isdir(path):

        own = os.path.join(path, "tokenizer.json")
        tok = None
        if os.path.isfile(own):
            tok = read_tokenizer(own)
        elif folder_model_type(path) in CONFIG_CLASSES:     # one of ours written without one: the bundled BPE
            tok = tokenizer_of_source(path, folder_config(path, config_from_dict))
        if tok is None:
            raise ValueError(f"--tokenizer {path!r} holds no tokenizer.json; give a model folder that has "
                             "one, a .gguf, or a tokenizer.json")
        return tok
    if is_gguf(path):
        return gguf_tokenizer(path).tokenizer
    return read_tokenizer(path)


def read_chat_of(path: str, tokenizer):
    """The chat template of the model at ``path`` (a folder's chat_template.jinja or
    tokenizer_config.json, a GGUF file's), with its special tokens, or None."""

    def spelled(token) -> str:
        if isinstance(token, dict):
            token = token.get("content")
        return token if isinstance(token, str) else ""

    if os.path.isdir(path):
        template = chat_template_of_folder(path)
        settings = {}
        config = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config):
            settings = read_json(config)
        bos, eos = spelled(settings.get("bos_token")), spelled(settings.get("eos_token"))
    elif is_gguf(path):

        template = gguf_chat_template(path)
        fields = gguf_reader(path).fields

        def token(key: str) -> str:
            field = fields.get(key)
            value = field.contents() if field is not None else None
            return (tokenizer.id_to_token(value) or "") if isinstance(value, int) else ""
        bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    else:
        return None
    return ChatTemplate(template, bos, eos) if template else None


def run_prepare(args: argparse.Namespace) -> str:
    opts = from_args(PrepareOptions, args)
    if opts.workers is not None:     # read when the tokenizer's thread pool starts, at its first batch
        os.environ["RAYON_NUM_THREADS"] = str(opts.workers)
    inputs = prepare.list_inputs(opts.sources)
    check_output(opts.out, "data", inputs=[("SOURCE", i.path) for i in inputs])
    tokenizer = read_tokenizer_of(opts.tokenizer)
    chat = read_chat_of(opts.tokenizer, tokenizer)
    started = time.perf_counter()
    data = prepare.prepare(None, tokenizer, opts.out, text_field=opts.text_field, heldout=opts.heldout,
                           progress=False if opts.no_progress else None, tokenizer_from=opts.tokenizer,
                           inputs=inputs, chat=chat)
    seconds = time.perf_counter() - started
    size = sum(i.path.stat().st_size for i in inputs)
    rate = f" ({size / 1e6 / seconds:.1f} MB/s)" if size >= 10**6 and seconds > 0 else ""
    print(f"prepared {opts.out}: {prepare.describe(data.index)} from {gib(size)} in {seconds:.1f} "
          f"s{rate}")
    mask = data.mask("train")
    if mask is not None:
        share = float(mask.sum()) / max(len(mask), 1)
        print(f"  conversations rendered with the chat template of {opts.tokenizer}: {share:.0%} of the "
              "training tokens are in the loss (the assistant's turns, and the documents that are not "
              "conversations)")
    return opts.out
