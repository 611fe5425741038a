"""Import of llama.cpp GGUF files of the ``llama`` (Llama, Mistral, SmolLM), ``qwen2`` (Qwen2, Qwen2.5)
and ``qwen3`` architectures, read with the ``gguf`` package: the metadata as a ``DenseConfig``, tensors
dequantised to float32 under our names (a ``llama`` file's q/k rows put back in Hugging Face's order;
llama.cpp keeps the others' as they are), and the file's byte-level BPE tokenizer.
"""
from __future__ import annotations

import math
import os

import torch

from ..build import build_model, check_tensors
from ..config import DenseConfig
from ..files.reading import about_file
from ..model import DenseLM
from ..options import short_repr
from ..tokenizer import TextTokenizer, check_fits
from .folder import check_values


def gguf_path(reader) -> str:
    return str(getattr(reader.data, "filename", "GGUF file"))


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file {gguf_path(reader)} has no {key!r}")
        return default
    return field.contents()


def _gguf_number(reader, key: str, default=None, kind: type = int):
    """A positive ``kind`` (int, or a finite float) field of the GGUF metadata."""
    value = _gguf_field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"GGUF file {gguf_path(reader)}: {key!r} must be a positive {kind.__name__}, "
                         f"got {short_repr(value)}")
    return value


def unpermute_gguf_qk(w_OI: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head its rows are stored as interleaved
    pairs; Hugging Face (rotate_half) keeps the two halves apart."""
    out_dim = w_OI.shape[0]
    return w_OI.reshape(n_heads, out_dim // n_heads // 2, 2, -1).transpose(1, 2).reshape(out_dim, -1)


# Each architecture bam reads: what it adds to Llama's decoder (``DenseConfig`` settings).
ARCHITECTURES = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": "head"}}
_GGUF_LAYER_NAMES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {name!r} has no place in a model bam reads")


def gguf_reader(source):
    """A ``gguf.GGUFReader`` for a path (reading the metadata takes seconds: share one reader for
    the model and its tokenizer), or ``source`` itself when it is one already. A file that is not
    GGUF, or is cut short or corrupt, is a ValueError naming it."""
    try:
        import gguf  # noqa: PLC0415 (gguf: optional, the hf extra)
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'bam-moe[hf]'") from None
    if isinstance(source, gguf.GGUFReader):
        return source
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # what its parser raises on bytes cut short or wrong
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({reason})") from None


def gguf_architecture(reader) -> str:
    """The file's ``general.architecture``, one bam reads (``ARCHITECTURES``), or a ValueError."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {short_repr(arch)} is not supported; expected one of "
                         f"{tuple(ARCHITECTURES)}")
    return arch


def gguf_context_length(source) -> int:
    """The context length a GGUF file (path or reader) records (2048 when it records none)."""
    reader = gguf_reader(source)
    return _gguf_number(reader, f"{gguf_architecture(reader)}.context_length", 2048)


def load_gguf(source, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A llama.cpp GGUF file (path or ``gguf_reader``) of an architecture bam reads (``ARCHITECTURES``):
    tensors are dequantised to float32 (a ``llama`` file's q/k rows put back in Hugging Face's order).
    Their names and shapes are checked against the metadata before any is dequantised."""
    reader = gguf_reader(source)
    import gguf  # noqa: PLC0415 (gguf: optional, the hf extra)
    where = gguf_path(reader)
    arch = gguf_architecture(reader)
    n_heads = _gguf_number(reader, f"{arch}.attention.head_count")
    n_kv_heads = _gguf_number(reader, f"{arch}.attention.head_count_kv", n_heads)
    dim = _gguf_number(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or reader.fields.get(f"{arch}.rope.scaling.type") is not None:
        raise ValueError(f"GGUF file {where} uses RoPE scaling, which is not supported; only plain RoPE is")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _gguf_number(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None)
    fields = dict(
        vocab_size=vocab, dim=dim, n_layers=_gguf_number(reader, f"{arch}.block_count"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=_gguf_number(reader, f"{arch}.feed_forward_length"),
        head_dim=_gguf_number(reader, f"{arch}.attention.key_length", dim // n_heads),
        rope_theta=_gguf_number(reader, f"{arch}.rope.freq_base", 10000.0, float),
        norm_eps=_gguf_number(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, float),
        max_seq_len=_gguf_number(reader, f"{arch}.context_length", 2048),
        tie_embeddings="output.weight" not in names, family=arch, **ARCHITECTURES[arch])
    for key in ("bos_token_id", "eos_token_id"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        value = field.contents() if field is not None else None
        in_vocab = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab
        fields[key] = value if in_vocab else None
    with about_file(where):
        config = DenseConfig(**fields)
    shapes = {_gguf_name(t.name): tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    check_tensors(config, shapes, f"{where} ({arch}.block_count)", "its tensor list")
    tensors = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        try:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        except NotImplementedError:
            raise ValueError(f"{where}: tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf "
                             "package cannot dequantize") from None
        w = w.reshape(shapes[name])  # GGUF lists dims innermost first
        check_values(t.name, w, where)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_gguf_qk(w, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_gguf_qk(w, n_kv_heads)
        tensors[name] = w
    model = build_model(config, tensors, dtype, device)
    model.tokenizer = gguf_tokenizer(reader).tokenizer
    check_fits(model.tokenizer, config)
    model.chat_template = gguf_chat_template(reader)
    return model


def gguf_chat_template(source) -> str | None:
    """The chat template a GGUF file (path or reader) records, or None."""
    field = gguf_reader(source).fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    return template if isinstance(template, str) and template else None


def is_gguf(source) -> bool:
    """Whether ``source`` is a GGUF file: its path, or a reader of it from ``gguf_reader``."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.isfile(source) and os.fspath(source).endswith(".gguf")
    return type(source).__name__ == "GGUFReader"


# How text is split before byte-level BPE, by the file's ``tokenizer.ggml.pre``, where it is not GPT-2's
# split: Qwen2's (also Qwen3's) keeps single digits apart and letters with one leading non-letter.
PRE_TOKENIZER_PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def gguf_tokenizer(source) -> TextTokenizer:
    """The byte-level BPE stored in a GGUF file's ``tokenizer.ggml.*`` fields (path or ``gguf_reader``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415 (the model extra: bam_model imports without it)

    reader = gguf_reader(source)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only); "
                         "pass --tokenizer with a tokenizer.json")
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges", [])
    where = f"GGUF file {gguf_path(reader)}"
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
    pattern = PRE_TOKENIZER_PATTERNS.get(field("tokenizer.ggml.pre"))
    if pattern is None:  # GPT-2's split, inside the byte-level step
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
