"""Our folder format: ``config.json`` (a ``DenseConfig`` or ``BamConfig``), safetensors weights
(``formats.folder``), the tokenizer the model carries (``tokenizer.json`` and
``tokenizer_config.json``) and ``bam-manifest.json``, written atomically.

Every folder is also a Hugging Face model folder: ``config.json`` names the model classes
(``architectures``, ``auto_map``) of the two files of ``bam_model/remote`` written beside it, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it where bam is not
installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..build import build_model, cast, model_tensors
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
    files = {**_tokenizer_files(model), **remote_code_files(), **(extra_files or {}),
             CONFIG: hf_config_json(model.config)}
    tensors = model_tensors(model)
    if dtype is not None:
        tensors = {k: cast(k, v, dtype) for k, v in tensors.items()}
    write_folder(path, files, tensors, max_shard_bytes)


CausalLM._writer = save_pretrained     # model.save_pretrained(path)


REMOTE = Path(__file__).resolve().parent.parent / "remote"
REMOTE_FILES = ("configuration_bam.py", "modeling_bam.py")


def remote_code_files() -> dict[str, str]:
    """The Hugging Face code of bam's models, file name -> source, for a model folder."""
    return {name: (REMOTE / name).read_text(encoding="utf-8") for name in REMOTE_FILES}


def hf_config_json(config) -> str:
    """``config.json``: the config (``to_dict``) and the classes transformers builds it with."""
    moe = config.model_type == "bam-moe"
    config_class, model_class = ("BamMoeConfig", "BamMoeForCausalLM") if moe else \
        ("BamDenseConfig", "BamForCausalLM")
    d = {**config.to_dict(), "architectures": [model_class], "hidden_act": "silu",
         "auto_map": {"AutoConfig": f"configuration_bam.{config_class}",
                      "AutoModelForCausalLM": f"modeling_bam.{model_class}"}}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _tokenizer_files(model: CausalLM) -> dict[str, str]:
    """The tokenizer the model carries, as files for its folder (none when it carries none)."""
    if model.tokenizer is None:
        return {}
    return hf_tokenizer_files(model.tokenizer.to_str(), model.config, model.chat_template)


def load_bam_folder(path: str, dtype: torch.dtype | None, device) -> CausalLM:
    """The model (dense or BAM) of our folder ``path``, without its tokenizer: the config and the
    safetensors headers are checked before any tensor data is read. ``dtype=None`` keeps the
    stored dtypes."""
    config = folder_config(path, config_from_dict)
    return build_model(config, folder_tensors(path, config), dtype, device)
