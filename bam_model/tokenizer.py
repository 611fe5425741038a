"""Every model carries the tokenizer it was trained with.

A model loaded by bam has ``model.tokenizer`` (a ``tokenizers.Tokenizer``): a folder's own
``tokenizer.json``; a GGUF file's vocabulary (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``);
for one of our folders without a ``tokenizer.json`` (written before folders carried one), the
bundled BPE when the vocabulary sizes agree. ``save_pretrained`` writes it back as
``tokenizer.json`` with a ``tokenizer_config.json`` that ``transformers.AutoTokenizer`` reads, and
``branch``, ``upcycle`` and training pass it on, so ``train``, ``evaluate``, Fisher merging and
``generate`` tokenize every text the way the model was trained. The bundled BPE is used only for
models built with it (``for_model``).

This module holds the tokenizer objects and checks, reads a ``tokenizer.json`` (``read_tokenizer``,
the bundled BPE: ``load_tokenizer``), finds the token that ends a document (``eos_token_id``) and
writes the files a model folder carries (``hf_tokenizer_files``). A GGUF file's vocabulary is the
GGUF format's to read (``formats.gguf.gguf_tokenizer``), and which tokenizer a model's source
carries is the loaders' (``formats.load.tokenizer_of_source``).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

# The byte-level BPE of the bundled corpus (``bam_model/corpus``).
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "corpus" / "tokenizer.json"

EOS_TOKEN = "<|endoftext|>"
# What ends a document, in the vocabularies of common tokenizers (GPT-2 and SmolLM, Llama 3,
# SentencePiece models such as Llama 2 and Mistral, Gemma): the first one a tokenizer has is used.
DOCUMENT_END_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"


def read_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a tokenizer.json file; a ValueError naming the file when it is
    missing or not one."""
    from tokenizers import Tokenizer  # noqa: PLC0415 (the model extra: bam_model imports without it)

    path = os.fspath(path)
    if not os.path.isfile(path):
        problem = "is not a file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"tokenizer file {path!r} {problem}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        if type(e) is not Exception:  # tokenizers raises a bare Exception for a file it cannot parse
            raise
        reason = str(e).splitlines()[0] if str(e) else "unreadable"
        raise ValueError(f"tokenizer file {path} is not a tokenizers tokenizer.json ({reason})") from None


@functools.cache
def _load_tokenizer_file(path: str):
    return read_tokenizer(path)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The bundled byte-level BPE (``tokenizers.Tokenizer``), or the one at ``path``."""
    path = Path(path) if path is not None else BUNDLED_TOKENIZER
    if not path.is_file():
        raise ValueError(f"tokenizer path {str(path)!r} is not a file")
    return _load_tokenizer_file(str(path.resolve()))


def eos_token_id(tokenizer) -> int:
    """The id of the token that ends a document (joins documents in the token stream)."""
    for token in DOCUMENT_END_TOKENS:
        eos = tokenizer.token_to_id(token)
        if eos is not None:
            return eos
    raise ValueError(f"the tokenizer has none of the end-of-document tokens {DOCUMENT_END_TOKENS}")


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids generation needs."""
    tokenizer: object
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # its own post-processor adds BOS where the model wants it

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def hf_tokenizer_files(tokenizer_json: str, config, chat_template: str | None = None) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` for it: the special tokens are those the
    model's config names (``bos_token_id``, ``eos_token_id``), spelled as the tokenizer spells them."""
    from tokenizers import Tokenizer  # noqa: PLC0415 (the model extra: bam_model imports without it)

    tok = Tokenizer.from_str(tokenizer_json)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len,
                "clean_up_tokenization_spaces": False}
    for name in ("bos", "eos"):
        token_id = getattr(config, f"{name}_token_id")
        if token_id is not None and tok.id_to_token(token_id) is not None:
            settings[f"{name}_token"] = tok.id_to_token(token_id)
    if chat_template:
        settings["chat_template"] = chat_template
    return {TOKENIZER_JSON: tokenizer_json, TOKENIZER_CONFIG: json.dumps(settings, indent=2) + "\n"}


def check_fits(tokenizer, config) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary (they were not trained together)."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary "
                         f"only {config.vocab_size}; they do not belong together")


def for_model(model, tokenizer=None):
    """The tokenizer to read text for ``model`` with: ``tokenizer`` if given, else the model's own
    (``model.tokenizer``), else the bundled BPE for a model built with it (its vocabulary has the
    bundled size, or the model has no config); anything else is refused, never silently tokenized
    with a vocabulary the model was not trained on."""
    config = getattr(model, "config", None)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        bundled = load_tokenizer()
        size = bundled.get_vocab_size()
        if config is not None and getattr(config, "vocab_size", None) not in (None, size):
            raise ValueError("the model carries no tokenizer and its vocabulary "
                             f"({config.vocab_size} tokens) is not the bundled BPE's ({size}); load it "
                             "from a folder with its tokenizer.json, or pass the tokenizer it was "
                             "trained with")
        tokenizer = bundled
    if config is not None and getattr(config, "vocab_size", None) is not None:
        check_fits(tokenizer, config)
    return tokenizer


def same(a, b) -> bool:
    """Whether two tokenizers are one (the same tokenizer.json)."""
    return a is b or (a is not None and b is not None and a.to_str() == b.to_str())
