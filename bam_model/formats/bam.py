"""Our folder format: ``config.json`` (a ``DenseConfig`` or ``BamConfig``), safetensors weights
(``formats.folder``), the tokenizer the model carries (``tokenizer.json`` and
``tokenizer_config.json``) and ``bam-manifest.json``, written atomically.
"""
from __future__ import annotations

import torch

from ..build import build_model, model_tensors
from ..config import config_from_dict
from ..model import CausalLM
from ..tokenizer import hf_tokenizer_files
from .folder import CONFIG, folder_config, folder_tensors, write_folder


def save_pretrained(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                    extra_files: dict[str, str | bytes] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Save ``model`` as our folder format (config.json + safetensors + its tokenizer), atomically;
    the weights in ``dtype`` (bfloat16 halves the size), by default in their own.

    ``extra_files`` (name -> contents) are written into the same folder, e.g. a mix recipe.
    """
    if not isinstance(model, CausalLM):
        raise ValueError(f"model must be a DenseLM or BamLM, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    files = {**_tokenizer_files(model), **(extra_files or {}), CONFIG: model.config.to_json()}
    tensors = model_tensors(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_folder(path, files, tensors, max_shard_bytes)


def _tokenizer_files(model: CausalLM) -> dict[str, str]:
    """The tokenizer the model carries, as files for its folder (none when it carries none)."""
    return hf_tokenizer_files(model.tokenizer.to_str(), model.config) if model.tokenizer is not None else {}


def load_bam_folder(path: str, dtype: torch.dtype | None, device) -> CausalLM:
    """The model (dense or BAM) of our folder ``path``, without its tokenizer: the config and the
    safetensors headers are checked before any tensor data is read. ``dtype=None`` keeps the
    stored dtypes."""
    config = folder_config(path, config_from_dict)
    return build_model(config, folder_tensors(path, config), dtype, device)
