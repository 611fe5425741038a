"""Checkpoints in and out, safetensors and GGUF only (never pickle).

- Our folder: ``config.json`` + ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors``
  with ``model.safetensors.index.json``) and ``bam-manifest.json``, written by
  ``files.write_model_folder``: a crash never leaves half a checkpoint, and a folder we did not
  write is never replaced.
- Import of Hugging Face Llama-family folders (Llama, Mistral, SmolLM) and llama.cpp GGUF files,
  read without transformers.
- Export of FFN-only mixtures (BTX, sparse upcycling) to Hugging Face's Mixtral layout.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import BamConfig, DenseConfig, config_from_dict
from .files import check_complete, write_model_folder
from .model import BamLM, CausalLM, DenseLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


def model_class(config: DenseConfig) -> type[CausalLM]:
    return BamLM if isinstance(config, BamConfig) else DenseLM


# --- writing -----------------------------------------------------------------------------------

def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def write_folder(path: str, files: dict[str, str | bytes], tensors: dict[str, torch.Tensor],
                 max_shard_bytes: int | None = None, metadata: dict | None = None) -> None:
    """Write ``files`` (name -> text or bytes) and ``tensors`` as safetensors into the folder ``path``
    (``files.write_model_folder``: atomic for a new folder; an existing folder is written into only
    when it is empty or one we wrote, and only the files we wrote are replaced)."""
    max_shard_bytes = DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(folder):
        for name, content in files.items():
            with open(os.path.join(folder, name), "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        shards = _shards(tensors, max_shard_bytes)
        meta = {"format": "pt", **(metadata or {})}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(folder, WEIGHTS), metadata=meta)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    write_model_folder(path, write)


def model_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The state dict to store: the LM head is left out when it is tied to the embeddings."""
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    return tensors


def save_pretrained(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                    extra_files: dict[str, str | bytes] | None = None) -> None:
    """Save ``model`` as our folder format (config.json + safetensors), atomically.

    ``extra_files`` (name -> contents) are written into the same folder, e.g. a mix recipe.
    """
    if not isinstance(model, CausalLM):
        raise ValueError(f"model must be a DenseLM or BamLM, got {type(model).__name__}")
    files = {**(extra_files or {}), CONFIG: model.config.to_json()}
    write_folder(path, files, model_tensors(model), max_shard_bytes)


# --- reading -----------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_safetensors_folder(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder holding ``model.safetensors`` or a sharded index of them."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        weight_map, files = None, [WEIGHTS]
    else:
        others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" (found {others[0]!r}: pickle files are not read; convert it to safetensors)" if others else ""
        raise ValueError(f"no {WEIGHTS} or {INDEX} in {path!r}{hint}")
    tensors = {}
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise ValueError(f"missing weight file {fpath!r}")
        with safe_open(fpath, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is listed in {INDEX} but not in its shard")
    return tensors


def build_model(config: DenseConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device="cpu") -> CausalLM:
    """Build the model for ``config`` and fill it with ``tensors``, checking every key and shape.

    The model is made on the meta device and the tensors assigned, so no memory goes to a
    throw-away initialisation. ``dtype=None`` keeps the stored dtypes.
    """
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(t.shape)}")
    state = {k: tensors[k].to(device=device, dtype=dtype if dtype is not None else tensors[k].dtype)
             for k in expected}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model


def from_pretrained(path: str, dtype: torch.dtype | None = None, device="cpu") -> CausalLM:
    """Load a dense or BAM model saved by ``save_pretrained`` (stored dtypes kept unless ``dtype``);
    a Hugging Face Mixtral folder (``load_mixtral_folder``), Llama-family folder or ``.gguf`` file
    (``load_dense``) is read in float32 unless ``dtype`` says otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a checkpoint folder or .gguf file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        check_complete(path)
    cfg_path = os.path.join(path, CONFIG)
    if os.path.isdir(path) and os.path.isfile(cfg_path):
        cfg = _read_json(cfg_path)
        if cfg.get("model_type") in (DenseConfig.model_type, BamConfig.model_type):
            return build_model(config_from_dict(cfg), read_safetensors_folder(path), dtype, device)
        if cfg.get("model_type") == "mixtral":
            return load_mixtral_folder(path, torch.float32 if dtype is None else dtype, device)
    return load_dense(path, torch.float32 if dtype is None else dtype, device)


# --- Hugging Face Llama family -----------------------------------------------------------------

HF_MODEL_TYPES = ("llama", "mistral")


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling is not None or rope_type != "default":
        raise ValueError(f"RoPE scaling ({scaling or params}) is not supported; only plain RoPE is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def dense_config_from_hf(hf: dict, model_types: tuple = HF_MODEL_TYPES) -> DenseConfig:
    """Our ``DenseConfig`` for a Hugging Face Llama/Mistral ``config.json`` (the dense part of a
    Mixtral one); refuses what we do not model."""
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; expected one of {model_types}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true is not supported (Llama-family models without biases only)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        max_len = min(max_len, int(window))  # within the window, sliding attention is full attention
    n_heads = hf["num_attention_heads"]
    vocab = hf["vocab_size"]
    ids = {k: _first_id(hf.get(k)) for k in ("bos_token_id", "eos_token_id")}
    return DenseConfig(
        vocab_size=vocab, dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        head_dim=hf.get("head_dim"), rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **{k: v if isinstance(v, int) and 0 <= v < vocab else None for k, v in ids.items()})


def _hf_tensors(path: str, config: DenseConfig) -> dict[str, torch.Tensor]:
    tensors = read_safetensors_folder(path)
    # Old checkpoints store RoPE's inverse frequencies; they are recomputed from rope_theta.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def load_hf_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A Hugging Face Llama-family folder (config.json + safetensors, sharded or not)."""
    config = dense_config_from_hf(_read_json(os.path.join(path, CONFIG)))
    return build_model(config, _hf_tensors(path, config), dtype, device)


def load_mixtral_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> CausalLM:
    """A Hugging Face Mixtral folder (what ``export_mixtral`` writes, or a published Mixtral) as a
    ``BamLM`` with one attention per layer and top-k renormalised routing (BTX's kind).
    Per-expert ``block_sparse_moe.experts.j.w1/w2/w3`` keys are fused into our layout."""
    hf = _read_json(os.path.join(path, CONFIG))
    dense = dense_config_from_hf(hf, model_types=("mixtral",))
    if not hf.get("num_local_experts") or not hf.get("num_experts_per_tok"):
        raise ValueError(f"{path!r}: a Mixtral config needs num_local_experts and num_experts_per_tok")
    config = BamConfig(**dense.__dict__, num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                       normalize=True, attention="dense", method="btx",
                       load_balancing_alpha=float(hf.get("router_aux_loss_coef", 0.01)))
    tensors = {}
    per_expert = {}
    for key, t in _hf_tensors(path, config).items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        parts = key.split(".mlp.experts.")
        if len(parts) == 2 and parts[1].count(".") == 2:  # "j.w1.weight"
            j, w, _ = parts[1].split(".")
            per_expert[(parts[0], w, int(j))] = t
        else:
            tensors[key] = t
    E = config.num_experts
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        if (p, "w1", 0) not in per_expert:
            continue
        try:
            tensors[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([per_expert.pop((p, "w1", j)), per_expert.pop((p, "w3", j))]) for j in range(E)])
            tensors[f"{p}.mlp.experts.down_proj"] = torch.stack([per_expert.pop((p, "w2", j)) for j in range(E)])
        except KeyError as e:
            layer, w, j = e.args[0]
            raise ValueError(f"checkpoint is missing tensor "
                             f"'{layer}.block_sparse_moe.experts.{j}.{w}.weight'") from None
    if per_expert:
        layer, w, j = next(iter(per_expert))
        raise ValueError(f"checkpoint has unexpected tensor '{layer}.block_sparse_moe.experts.{j}.{w}.weight'")
    return build_model(config, tensors, dtype, device)


# --- GGUF --------------------------------------------------------------------------------------

def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file has no {key!r}")
        return default
    return field.contents()


def unpermute_gguf_qk(w_OI: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head its rows are stored as interleaved
    pairs; Hugging Face (rotate_half) keeps the two halves apart."""
    out_dim = w_OI.shape[0]
    return w_OI.reshape(n_heads, out_dim // n_heads // 2, 2, -1).transpose(1, 2).reshape(out_dim, -1)


_GGUF_LAYER_NAMES = {
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
    raise ValueError(f"GGUF tensor {name!r} has no place in a Llama-family model")


def gguf_reader(source):
    """A ``gguf.GGUFReader`` for a path (reading the metadata takes seconds: share one reader for
    the model and its tokenizer), or ``source`` itself when it is one already."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'bam-moe[hf]'") from None
    return source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)


def load_gguf(source, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A llama.cpp GGUF file (path or ``gguf_reader``) of the ``llama`` architecture (Llama, Mistral,
    SmolLM): tensors are dequantised to float32 and q/k rows put back in Hugging Face's order."""
    reader = gguf_reader(source)
    import gguf
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; expected 'llama'")
    n_heads = int(_gguf_field(reader, "llama.attention.head_count"))
    n_kv_heads = int(_gguf_field(reader, "llama.attention.head_count_kv", n_heads))
    dim = int(_gguf_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or reader.fields.get("llama.rope.scaling.type") is not None:
        raise ValueError("GGUF file uses RoPE scaling, which is not supported; only plain RoPE is")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_gguf_field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else 0))
    ids = {k: reader.fields.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    config = DenseConfig(
        vocab_size=vocab, dim=dim, n_layers=int(_gguf_field(reader, "llama.block_count")), n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=int(_gguf_field(reader, "llama.feed_forward_length")),
        head_dim=int(_gguf_field(reader, "llama.attention.key_length", dim // n_heads)),
        rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_gguf_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        **{k: int(f.contents()) if f is not None and int(f.contents()) < vocab else None for k, f in ids.items()})
    tensors = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("q_proj.weight"):
            w = unpermute_gguf_qk(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_gguf_qk(w, n_kv_heads)
        tensors[name] = w
    return build_model(config, tensors, dtype, device)


def is_gguf(source) -> bool:
    """Whether ``source`` is a GGUF file: its path, or a reader of it from ``gguf_reader``."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.isfile(source) and os.fspath(source).endswith(".gguf")
    return type(source).__name__ == "GGUFReader"


def open_source(path):
    """``path``, or for a GGUF file one ``gguf_reader`` that the model and its tokenizer can share
    (``load_dense`` and ``generate.tokenizer_json`` take either)."""
    return gguf_reader(path) if is_gguf(path) else path


def load_dense(path, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A dense model from our folder, a Hugging Face Llama-family folder, or a ``.gguf`` file (a
    path, or a reader from ``open_source``).

    ``dtype`` (float32 by default; None keeps what the file stores) is applied to every tensor.
    """
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
    cfg = _read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type == DenseConfig.model_type:
        return build_model(config_from_dict(cfg), read_safetensors_folder(path), dtype, device)
    if model_type in (BamConfig.model_type, "mixtral"):
        raise ValueError(f"{path!r} holds a mixture (model_type {model_type!r}), not a dense model; "
                         "use bam_model.from_pretrained")
    return load_hf_folder(path, dtype, device)


# --- Hugging Face export ---------------------------------------------------------------------------

def _hf_common(config: DenseConfig, dtype: torch.dtype) -> dict:
    """The ``config.json`` keys Llama and Mixtral share."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.dh, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        # transformers 5 reads dtype; 4.x and other readers torch_dtype.
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }


def export_llama(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                 extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write a dense model as a Hugging Face Llama folder: our tensors already have Llama's names
    and layout, so ``LlamaForCausalLM.from_pretrained(path)`` gives the same logits. A parallel-block
    model has no Llama form and is refused. Atomic, like ``save_pretrained``."""
    config = model.config
    if isinstance(config, BamConfig):
        raise ValueError("export_llama needs a dense model; a BTX or sparse mixture exports as Mixtral")
    if config.block != "sequential":
        raise ValueError("Llama blocks are sequential; this model has block='parallel' (GPT-J style), which no "
                         "Hugging Face Llama-family class computes. Keep it in bam's format")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_hf_common(config, model.dtype),
          "attention_bias": False, "mlp_bias": False}
    write_folder(path, {**(extra_files or {}), CONFIG: json.dumps(hf, indent=2) + "\n"}, model_tensors(model),
                 max_shard_bytes)


def export_hf(model: CausalLM, path: str, max_shard_bytes: int | None = None,
              extra_files: dict[str, str | bytes] | None = None) -> str:
    """Write ``model`` in the Hugging Face class that computes it: a dense model as Llama, a BTX or
    sparse mixture as Mixtral; returns the class name. A BAM mixture with attention experts has no
    Hugging Face class and is refused."""
    if isinstance(model.config, BamConfig):
        export_mixtral(model, path, max_shard_bytes, extra_files)
        return "MixtralForCausalLM"
    export_llama(model, path, max_shard_bytes, extra_files)
    return "LlamaForCausalLM"


def export_mixtral(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                   extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write an FFN-only mixture (BTX, sparse upcycling) as a Hugging Face Mixtral folder, with the
    per-expert keys of published Mixtral checkpoints (``block_sparse_moe.experts.j.w1/w2/w3``), so
    ``MixtralForCausalLM.from_pretrained(path)`` gives the same logits. Atomic, like ``save_pretrained``;
    ``extra_files`` (name -> contents, e.g. a tokenizer.json) go into the same folder.
    """
    config = model.config
    if not isinstance(config, BamConfig):
        raise ValueError("export_mixtral needs a mixture (BamConfig); a dense model exports as Llama (export_llama)")
    if config.attention != "dense":
        raise ValueError(f"this mixture has attention experts (attention={config.attention!r}); Mixtral has "
                         "one attention per layer, so no Hugging Face class can hold it. Use save_pretrained")
    if config.block != "sequential":
        raise ValueError("Mixtral blocks are sequential; this mixture has block='parallel'")
    if not config.normalize and config.top_k != config.num_experts:
        raise ValueError(f"Mixtral renormalises its top-{config.top_k} router weights; this mixture does not "
                         "(ffn_routing 'paper'), so Mixtral would compute a different function")
    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_hf_common(config, model.dtype),
          "num_local_experts": config.num_experts, "num_experts_per_tok": config.top_k,
          "router_aux_loss_coef": config.load_balancing_alpha, "output_router_logits": False,
          "sliding_window": None}
    tensors = {}
    for key, t in model_tensors(model).items():
        if ".mlp." not in key:
            tensors[key] = t
            continue
        prefix, leaf = key.split(".mlp.")
        moe = f"{prefix}.block_sparse_moe"
        if leaf == "gate.weight":
            tensors[f"{moe}.gate.weight"] = t
        elif leaf == "experts.gate_up_proj":
            gate_EFD, up_EFD = t.chunk(2, dim=1)
            for j in range(config.num_experts):
                tensors[f"{moe}.experts.{j}.w1.weight"] = gate_EFD[j]
                tensors[f"{moe}.experts.{j}.w3.weight"] = up_EFD[j]
        elif leaf == "experts.down_proj":
            for j in range(config.num_experts):
                tensors[f"{moe}.experts.{j}.w2.weight"] = t[j]
        else:
            raise ValueError(f"tensor {key!r} has no place in a Mixtral checkpoint")
    write_folder(path, {**(extra_files or {}), CONFIG: json.dumps(hf, indent=2) + "\n"}, tensors, max_shard_bytes)
