"""Model files in and out: safetensors and GGUF only, never pickle. One module per format:

- ``folder``: folders of safetensors (sharded or not), read with header checks, written atomically;
- ``bam``: our folder format (``save_pretrained``; read by ``from_pretrained``);
- ``hf``: Hugging Face Llama-family and Mixtral folders, read without transformers;
- ``gguf``: llama.cpp GGUF files (metadata, tensors, tokenizer);
- ``export``: a dense model as a Hugging Face Llama folder, an FFN-only mixture as Mixtral;
- ``load``: ``load_dense`` and ``from_pretrained``, which pick the format and attach the tokenizer.

Model construction from tensors, shared by all of them, is ``bam_model.build``.
"""
from .bam import save_pretrained
from .export import export_hf, export_llama, export_mixtral
from .gguf import gguf_reader, is_gguf, load_gguf
from .hf import load_hf_folder
from .hf_moe import load_mixtral_folder, load_moe_folder
from .load import from_pretrained, load_dense

__all__ = ["export_hf", "export_llama", "export_mixtral", "from_pretrained", "gguf_reader", "is_gguf",
           "load_dense", "load_gguf", "load_hf_folder", "load_mixtral_folder", "load_moe_folder",
           "save_pretrained"]
