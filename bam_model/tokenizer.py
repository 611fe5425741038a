"""The tokenizer files a model folder carries, so that ``transformers.AutoTokenizer`` reads them too.

Every folder bam writes holds the ``tokenizer.json`` its model was trained with; a Hugging Face
export adds ``tokenizer_config.json`` (the tokenizer class, the special tokens, the context length
and, for a GGUF source, its chat template).
"""
from __future__ import annotations

import json

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


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
