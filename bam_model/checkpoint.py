"""Where checkpoint code used to live; every name it had is re-exported from its new home.

Model construction from tensors is ``bam_model.build``; the file formats are the modules of
``bam_model.formats`` (``folder``, ``bam``, ``hf``, ``gguf``, ``export``, ``load``). Import from
there: this facade goes once nothing in the package imports it.
"""
from .build import (
    _LAYER0,
    build_model,
    check_layer_count,
    check_tensors,
    expected_shapes,
    model_class,
    model_tensors,
)
from .formats.bam import _tokenizer_files, save_pretrained
from .formats.export import _hf_common, export_hf, export_llama, export_mixtral
from .formats.folder import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX,
    WEIGHTS,
    _open_safetensors,
    _read_tensors,
    _safetensors_headers,
    _shards,
    _weight_files,
    brief,
    check_values,
    folder_config,
    folder_model_type,
    folder_tensors,
    read_safetensors_folder,
    write_folder,
)
from .formats.gguf import (
    _GGUF_LAYER_NAMES,
    _GGUF_NAMES,
    _gguf_field,
    _gguf_name,
    _gguf_number,
    gguf_path,
    gguf_reader,
    is_gguf,
    load_gguf,
    unpermute_gguf_qk,
)
from .formats.hf import (
    _HF_KINDS,
    _REQUIRED,
    HF_MODEL_TYPES,
    _first_id,
    _hf_keeps,
    _hf_value,
    _rope_theta,
    dense_config_from_hf,
    load_hf_folder,
    load_mixtral_folder,
    mixtral_config,
)
from .formats.load import _from_pretrained, _load_dense, _with_tokenizer, from_pretrained, load_dense

# The names these had before they became public in their modules.
_brief, _check_values, _check_layer_count = brief, check_values, check_layer_count
_folder_config, _folder_tensors, _gguf_path = folder_config, folder_tensors, gguf_path

__all__ = [
    "CONFIG", "DEFAULT_MAX_SHARD_BYTES", "HF_MODEL_TYPES", "INDEX", "WEIGHTS", "_GGUF_LAYER_NAMES",
    "_GGUF_NAMES", "_HF_KINDS", "_LAYER0", "_REQUIRED", "_brief",
    "_check_layer_count", "_check_values", "_first_id", "_folder_config", "_folder_tensors",
    "_from_pretrained", "_gguf_field", "_gguf_name", "_gguf_number", "_gguf_path", "_hf_common",
    "_hf_keeps", "_hf_value", "_load_dense", "_open_safetensors", "_read_tensors", "_rope_theta",
    "_safetensors_headers", "_shards", "_tokenizer_files", "_weight_files", "_with_tokenizer", "brief",
    "build_model", "check_layer_count", "check_tensors", "check_values", "dense_config_from_hf",
    "expected_shapes", "export_hf", "export_llama", "export_mixtral", "folder_config", "folder_model_type",
    "folder_tensors", "from_pretrained", "gguf_path", "gguf_reader", "is_gguf", "load_dense", "load_gguf",
    "load_hf_folder", "load_mixtral_folder", "mixtral_config", "model_class", "model_tensors",
    "read_safetensors_folder", "save_pretrained", "unpermute_gguf_qk", "write_folder",
]
