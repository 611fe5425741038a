"""Text generation: load any model ``bam`` reads together with its tokenizer, and continue a prompt.

Tokenizer of a model: a Hugging Face folder's ``tokenizer.json``; a GGUF file's own vocabulary
(byte-level BPE, ``tokenizer.ggml.model == "gpt2"``); for our folders the bundled BPE of
``bam_model.data``, unless the folder holds a ``tokenizer.json`` of its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import data
from .checkpoint import _gguf_path, folder_model_type, from_pretrained, gguf_reader, is_gguf, load_gguf
from .config import CONFIG_CLASSES
from .model import CausalLM


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids generation needs."""
    tokenizer: object
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # its own post-processor adds BOS where the model wants it

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def gguf_tokenizer(source) -> TextTokenizer:
    """The byte-level BPE stored in a GGUF file's ``tokenizer.ggml.*`` fields (path or ``gguf_reader``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = gguf_reader(source)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only); "
                         "pass --tokenizer with a tokenizer.json")
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges", [])
    where = f"GGUF file {_gguf_path(reader)}"
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        raise ValueError(f"{where}: tokenizer.ggml.tokens must be a list of strings")
    if not (isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
        raise ValueError(f"{where}: tokenizer.ggml.merges must be a list of 'left right' strings")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    try:
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                         merges=[tuple(m.split(" ", 1)) for m in merges])
    except Exception as e:
        if type(e) is not Exception:  # tokenizers raises a bare Exception for a vocabulary it cannot use
            raise
        raise ValueError(f"{where}: its tokenizer is corrupt ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are matched whole in text, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    bos = field("tokenizer.ggml.bos_token_id")
    if bos is not None and not (isinstance(bos, int) and 0 <= bos < len(tokens)):
        raise ValueError(f"{where}: tokenizer.ggml.bos_token_id {bos!r} is not a token id")
    if bos is not None and field("tokenizer.ggml.add_bos_token", False):
        # As a post-processor, BOS travels with the tokenizer.json a mixture of this model carries.
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return TextTokenizer(tok, field("tokenizer.ggml.eos_token_id"))


def file_tokenizer(path: str, eos_token_id=None) -> TextTokenizer:
    """A ``tokenizer.json`` (special tokens such as BOS come from its own post-processor)."""
    return TextTokenizer(data.read_tokenizer(path), eos_token_id)


def load_model_and_tokenizer(path: str, tokenizer: str | None = None, dtype: torch.dtype | None = None,
                             device="cpu") -> tuple[CausalLM, TextTokenizer]:
    """Any model ``bam`` reads (our folder, dense or mixture; a Hugging Face folder; a GGUF file)
    and its tokenizer (``tokenizer``, a tokenizer.json path, overrides the one found)."""
    given = data.read_tokenizer(tokenizer) if tokenizer is not None else None  # refused before the slow part
    reader = gguf_reader(path) if is_gguf(path) else None
    model = load_gguf(reader, dtype or torch.float32, device) if reader else from_pretrained(path, dtype, device)
    ours = os.path.isdir(path) and folder_model_type(path) in CONFIG_CLASSES
    c = model.config
    if given is not None:
        tok = TextTokenizer(given, c.eos_token_id)
    elif reader is not None:
        tok = gguf_tokenizer(reader)
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = file_tokenizer(os.path.join(path, "tokenizer.json"), c.eos_token_id)
    else:
        bundled = data.load_tokenizer()
        if not ours or bundled.get_vocab_size() != c.vocab_size:
            raise ValueError(f"no tokenizer.json in {path!r} and the bundled tokenizer's "
                             f"{bundled.get_vocab_size()} tokens do not fit the model's {c.vocab_size}; "
                             "pass one with --tokenizer")
        tok = TextTokenizer(bundled, c.eos_token_id if c.eos_token_id is not None else data.eos_token_id(bundled))
    if tok.tokenizer.get_vocab_size() > c.vocab_size:
        raise ValueError(f"the tokenizer has {tok.tokenizer.get_vocab_size()} tokens but the model only "
                         f"{c.vocab_size}; they do not belong together")
    return model, tok


def generate_text(model: CausalLM, tok: TextTokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
    """The prompt and its continuation, decoded together (so that spacing is the tokenizer's), up to
    the end-of-text token."""
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    input_ids = torch.tensor([ids], device=model.device)
    new = model.generate(input_ids, max_new_tokens, temperature=temperature, top_p=top_p,
                         eos_token_id=tok.eos_token_id, generator=generator)[0, len(ids):].tolist()
    if tok.eos_token_id is not None and tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(ids + new)


def tokenizer_json(source) -> str | None:
    """The tokenizer of a model source (a path, or a reader from ``checkpoint.open_source``) as
    ``tokenizer.json`` text, for a checkpoint made from it to carry along: a folder's own
    ``tokenizer.json``, or a GGUF file's vocabulary; None otherwise."""
    if is_gguf(source):
        return gguf_tokenizer(source).tokenizer.to_str()
    path = os.fspath(source)
    own = os.path.join(path, "tokenizer.json")
    if os.path.isfile(own):
        data.read_tokenizer(own)  # a corrupt one is refused, not carried along
        with open(own, encoding="utf-8") as f:
            return f.read()
    return None
