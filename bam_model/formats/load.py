"""The entry points that read any model bam reads, with the tokenizer it carries: ``load_dense``
(our dense folder, a Hugging Face Llama-family folder, a ``.gguf`` file) and ``from_pretrained``
(those and our mixtures, and Hugging Face Mixtral folders).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..config import CONFIG_CLASSES, BamConfig, DenseConfig, config_from_dict
from ..files.manifest import check_complete
from ..files.reading import read_json
from ..model import CausalLM, DenseLM
from ..tokenizer import (
    CHAT_TEMPLATE_JINJA,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    check_fits,
    load_tokenizer,
    read_tokenizer,
)
from .bam import load_bam_folder
from .folder import CONFIG, folder_config, folder_model_type
from .gguf import gguf_context_length, gguf_tokenizer, is_gguf, load_gguf
from .hf import dense_config_from_hf, load_hf_folder
from .hf_moe import MOE_LAYOUTS, load_moe_folder, moe_config

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def from_pretrained(path: str, dtype: torch.dtype | None = None, device="cpu") -> CausalLM:
    """Load a dense or BAM model saved by ``save_pretrained`` (stored dtypes kept unless ``dtype``);
    a Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE folder (``load_moe_folder``), a folder of a dense family
    bam reads or a ``.gguf`` file
    (``load_dense``) is read in float32 unless ``dtype`` says otherwise. The model carries its
    tokenizer as ``model.tokenizer`` (``bam_model.tokenizer``)."""
    model = _from_pretrained(path, dtype, device)
    return _with_tokenizer(model, path)


def config_of(path) -> DenseConfig | None:
    """The config of the model folder at ``path``, before any tensor is read (for checks before work);
    None for a GGUF file or where it cannot be read (loading the model then says what is wrong)."""
    try:
        if is_gguf(path):
            return None
        model_type = folder_model_type(os.fspath(path))
        parse = config_from_dict if model_type in CONFIG_CLASSES else \
            moe_config if model_type in MOE_LAYOUTS else dense_config_from_hf
        return folder_config(os.fspath(path), parse)
    except (ValueError, OSError, TypeError):
        return None


def context_length(path) -> int | None:
    """The longest input (``max_seq_len``) of the model at ``path``, from its config alone, before any
    tensor is read (for checks before work); None where that cannot be read (loading the model then
    says what is wrong)."""
    try:
        if is_gguf(path):
            return gguf_context_length(path)
    except (ValueError, OSError, TypeError):
        return None
    config = config_of(path)
    return None if config is None else config.max_seq_len


def _with_tokenizer(model: CausalLM, source) -> CausalLM:
    if model.tokenizer is None:
        model.tokenizer = tokenizer_of_source(source, model.config)
    if model.chat_template is None and model.tokenizer is not None and not is_gguf(source):
        model.chat_template = chat_template_of_folder(os.fspath(source))
    return model


def chat_template_of_folder(path: str) -> str | None:
    """The chat template of a model folder: ``chat_template.jinja`` (transformers 5 writes it), else
    the ``chat_template`` string of ``tokenizer_config.json``; None when there is neither."""
    jinja = os.path.join(path, CHAT_TEMPLATE_JINJA)
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read() or None
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    config = os.path.join(path, TOKENIZER_CONFIG)
    if not os.path.isfile(config):
        return None
    template = read_json(config).get("chat_template")
    return template if isinstance(template, str) and template else None


def tokenizer_of_source(source, config) -> Tokenizer | None:
    """The tokenizer a model loaded from ``source`` (a folder path, or a GGUF path or reader) was
    trained with: the folder's ``tokenizer.json``, the GGUF file's vocabulary, or, for one of our
    folders without one, the bundled BPE when the vocabulary sizes agree; None when there is none
    (a Hugging Face folder without tokenizer files). Refused when it has more tokens than the model."""
    if is_gguf(source):
        tok = gguf_tokenizer(source).tokenizer
    else:
        path = os.fspath(source)
        own = os.path.join(path, TOKENIZER_JSON)
        if os.path.isfile(own):
            tok = read_tokenizer(own)
        elif (folder_model_type(path) in CONFIG_CLASSES
              and config.vocab_size == load_tokenizer().get_vocab_size()):
            tok = load_tokenizer()
        else:
            return None
    check_fits(tok, config)
    return tok


def _from_pretrained(path: str, dtype: torch.dtype | None, device) -> CausalLM:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a checkpoint folder or .gguf file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        check_complete(path)
    cfg_path = os.path.join(path, CONFIG)
    if os.path.isdir(path) and os.path.isfile(cfg_path):
        model_type = folder_model_type(path)
        if model_type in CONFIG_CLASSES:
            return load_bam_folder(path, dtype, device)
        if model_type in MOE_LAYOUTS:
            return load_moe_folder(path, torch.float32 if dtype is None else dtype, device)
    return load_dense(path, torch.float32 if dtype is None else dtype, device)


def load_dense(path, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A dense model from our folder, a Hugging Face Llama-family folder, or a ``.gguf`` file (a
    path, or a reader from ``gguf_reader``).

    ``dtype`` (float32 by default; None keeps what the file stores) is applied to every tensor.
    The model carries its tokenizer as ``model.tokenizer``.
    """
    return _with_tokenizer(_load_dense(path, dtype, device), path)


def _load_dense(path, dtype: torch.dtype | None, device) -> DenseLM:
    if is_gguf(path):
        return load_gguf(path, dtype, device)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a folder or .gguf file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"{path!r} is a file but not a .gguf; expected a checkpoint folder or a .gguf file")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} does not exist")
    check_complete(path)
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} holds no {CONFIG}")
    model_type = folder_model_type(path)
    if model_type == DenseConfig.model_type:
        return load_bam_folder(path, dtype, device)
    if model_type == BamConfig.model_type or model_type in MOE_LAYOUTS:
        raise ValueError(f"{path!r} holds a mixture (model_type {model_type!r}), not a dense model; "
                         "use bam_model.from_pretrained")
    return load_hf_folder(path, dtype, device)
