"""Every model carries the tokenizer it was trained with.

A model loaded by bam has ``model.tokenizer`` (a ``tokenizers.Tokenizer``): a folder's own
``tokenizer.json``; a GGUF file's vocabulary (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``);
for one of our folders without a ``tokenizer.json`` (written before folders carried one), the
bundled BPE when the vocabulary sizes agree. ``save_pretrained`` writes it back as
``tokenizer.json`` with a ``tokenizer_config.json`` that ``transformers.AutoTokenizer`` reads, and
``branch``, ``upcycle`` and training pass it on, so ``train``, ``evaluate``, Fisher merging and
``generate`` tokenize every text the way the model was trained. The bundled BPE is used only for
models built with it (``for_model``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import data

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


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

    from .checkpoint import _gguf_path, gguf_reader

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
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return TextTokenizer(tok, field("tokenizer.ggml.eos_token_id"))


def hf_tokenizer_files(tokenizer_json: str, config, chat_template: str | None = None) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` for it: the special tokens are those the
    model's config names (``bos_token_id``, ``eos_token_id``), spelled as the tokenizer spells them."""
    from tokenizers import Tokenizer

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


def of_source(source, config) -> "Tokenizer | None":
    """The tokenizer a model loaded from ``source`` (a folder path, or a GGUF path or reader) was
    trained with: the folder's ``tokenizer.json``, the GGUF file's vocabulary, or, for one of our
    folders without one, the bundled BPE when the vocabulary sizes agree; None when there is none
    (a Hugging Face folder without tokenizer files). Refused when it has more tokens than the model."""
    from .checkpoint import folder_model_type, is_gguf
    from .config import CONFIG_CLASSES

    if is_gguf(source):
        tok = gguf_tokenizer(source).tokenizer
    else:
        path = os.fspath(source)
        own = os.path.join(path, TOKENIZER_JSON)
        if os.path.isfile(own):
            tok = data.read_tokenizer(own)
        elif (folder_model_type(path) in CONFIG_CLASSES
              and config.vocab_size == data.load_tokenizer().get_vocab_size()):
            tok = data.load_tokenizer()
        else:
            return None
    check_fits(tok, config)
    return tok


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
        bundled = data.load_tokenizer()
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
