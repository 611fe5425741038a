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

import contextlib
import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_CLASSES, BamConfig, DenseConfig, about_file, config_from_dict, read_json
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
                    extra_files: dict[str, str | bytes] | None = None, dtype: torch.dtype | None = None) -> None:
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
    from .tokenizer import hf_tokenizer_files

    return hf_tokenizer_files(model.tokenizer.to_str(), model.config) if model.tokenizer is not None else {}


# --- reading -----------------------------------------------------------------------------------

def _brief(value, limit: int = 60) -> str:
    """``repr(value)``, cut to one short line for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _weight_files(path: str) -> tuple[list[str], dict | None, str]:
    """(shard file names, the index's weight_map or None, the path to name the weights by in
    messages) of the checkpoint folder ``path``. An index naming a shard by an absolute path or
    one that climbs out with '..' is refused before any file is opened. (A symlink inside the
    folder is followed: the Hugging Face cache links every file to a blob outside the folder.)"""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map (an object of tensor name -> shard file)")
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise ValueError(f"{index}: weight_map[{key!r}] must be a shard file name, "
                                 f"got {_brief(fname)}")
            if os.path.isabs(fname) or os.path.normpath(fname).split(os.sep)[0] == os.pardir:
                raise ValueError(f"{index}: weight_map[{key!r}] = {fname!r} lies outside the "
                                 "checkpoint folder")
        return sorted(set(weight_map.values())), weight_map, index
    weights = os.path.join(path, WEIGHTS)
    if os.path.exists(weights):
        return [WEIGHTS], None, weights
    others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {others[0]!r}: pickle files are not read; convert it to safetensors)" if others else ""
    raise ValueError(f"no {WEIGHTS} or {INDEX} in {path!r}{hint}")


@contextlib.contextmanager
def _open_safetensors(fpath: str):
    """``safe_open(fpath)``, with a ValueError naming the file when it is missing, unreadable, or
    not safetensors (cut short, a header that is not valid)."""
    if not os.path.isfile(fpath):
        problem = "is not a file" if os.path.exists(fpath) else "is missing"
        raise ValueError(f"weight file {fpath!r} {problem}")
    try:
        open(fpath, "rb").close()  # safe_open reports any file it cannot open as missing
    except OSError as e:
        raise ValueError(f"cannot read {fpath}: {e.strerror or e}") from None
    try:
        with safe_open(fpath, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{fpath} is truncated or corrupt ({e})") from None


def _safetensors_headers(path: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], str]:
    """(name -> (file, shape) of every tensor of the folder ``path``, read from the safetensors
    headers alone; the path to name the weights by in messages)."""
    files, weight_map, weights = _weight_files(path)
    headers = {}
    for fname in files:
        fpath = os.path.join(path, fname)
        with _open_safetensors(fpath) as f:
            for key in f.keys():
                if key in headers:
                    raise ValueError(f"tensor {key!r} is stored twice, in {headers[key][0]} and {fpath}")
                headers[key] = (fpath, tuple(f.get_slice(key).get_shape()))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(headers))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is listed in {INDEX} but not in its shard")
    return headers, weights


def _read_tensors(headers: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The tensors ``headers`` (from ``_safetensors_headers``) name, each file opened once."""
    by_file = {}
    for name, (fpath, _) in headers.items():
        by_file.setdefault(fpath, []).append(name)
    tensors = {}
    for fpath, names in by_file.items():
        with _open_safetensors(fpath) as f:
            for name in names:
                tensors[name] = f.get_tensor(name)
    return tensors


def read_safetensors_folder(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder holding ``model.safetensors`` or a sharded index of them."""
    return _read_tensors(_safetensors_headers(path)[0])


_LAYER0 = "model.layers.0."


def expected_shapes(config: DenseConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of ``config`` stores (``model_tensors``), without
    building the model: layers differ only in their index, so one is built on the meta device and
    its names repeated (a whole meta model takes 2.4 ms a layer: most of a minute for 20000)."""
    try:
        with torch.device("meta"):
            one = model_class(config)(config.replace(n_layers=1))
    except (RuntimeError, TypeError) as e:  # on the meta device, only sizes that overflow int64 fail
        reason = str(e).splitlines()[0]
        raise ValueError(f"the config's sizes make a tensor too large to exist ({reason})") from None
    shapes = {k: tuple(t.shape) for k, t in model_tensors(one).items()}
    layer = {k.removeprefix(_LAYER0): s for k, s in shapes.items() if k.startswith(_LAYER0)}
    expected = {k: s for k, s in shapes.items() if not k.startswith(_LAYER0)}
    for i in range(config.n_layers):
        expected.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return expected


def _check_layer_count(config: DenseConfig, shapes: dict, config_name: str, weights_name: str) -> None:
    layers = 1 + max((int(p[2]) for p in (k.split(".", 3) for k in shapes)
                      if len(p) == 4 and p[:2] == ["model", "layers"] and p[2].isdecimal()), default=-1)
    if layers != config.n_layers:
        raise ValueError(f"{config_name} says {config.n_layers} layers but {weights_name} holds {layers}")


def check_tensors(config: DenseConfig, shapes: dict[str, tuple[int, ...]], config_name: str = "the config",
                  weights_name: str = "the checkpoint") -> None:
    """Refuse tensors (name -> shape) that do not fit ``config``: another number of layers, a
    missing or unexpected name, a wrong shape. Cheap for any config, so that loading checks the
    safetensors headers with it before the model is built or any tensor data is read."""
    _check_layer_count(config, shapes, config_name, weights_name)
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise ValueError(f"{weights_name} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise ValueError(f"{weights_name} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(shapes[k])} in {weights_name}, expected {shape}")


def _check_values(name: str, t: torch.Tensor, where: str) -> None:
    """Refuse a tensor that is not floating point (a cast to the model's dtype would hide it) or
    holds NaN or Inf (it would only show later, as a NaN loss or garbage text)."""
    if not t.is_floating_point():
        raise ValueError(f"{where}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                         "expected a floating dtype")
    if t.numel() == 0:
        return
    # min and max carry any NaN and show any Inf. One aminmax pass, no bool tensor: 33 ms for
    # SmolLM2-135M's float32 weights on 2 CPU cores, isfinite().all() 0.41 s. float8 has no kernel.
    lo, hi = torch.aminmax(t.half() if t.element_size() == 1 else t)
    if not (lo.isfinite() and hi.isfinite()):
        raise ValueError(f"{where}: tensor {name!r} holds {'NaN' if lo.isnan() else 'Inf'}")


def _folder_tensors(path: str, config: DenseConfig, keep=None,
                    check=check_tensors) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint folder ``path`` for ``config`` (those whose name ``keep``
    accepts): ``check`` runs on the names and shapes of the safetensors headers before any data is
    read, then every tensor's dtype and values are checked."""
    headers, weights = _safetensors_headers(path)
    if keep is not None:
        headers = {k: v for k, v in headers.items() if keep(k)}
    check(config, {k: shape for k, (_, shape) in headers.items()}, os.path.join(path, CONFIG), weights)
    tensors = _read_tensors(headers)
    for name, t in tensors.items():
        _check_values(name, t, headers[name][0])
    return tensors


def build_model(config: DenseConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device="cpu") -> CausalLM:
    """Build the model for ``config`` and fill it with ``tensors``, checking every key and shape.

    The model is made on the meta device and the tensors assigned, so no memory goes to a
    throw-away initialisation. ``dtype=None`` keeps the stored dtypes.
    """
    check_tensors(config, {k: tuple(t.shape) for k, t in tensors.items()})
    with torch.device("meta"):
        model = model_class(config)(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    state = {k: tensors[k].to(device=device, dtype=dtype if dtype is not None else tensors[k].dtype)
             for k in expected}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model


def _folder_config(path: str, parse) -> DenseConfig:
    """``parse`` of the folder's config.json, its ValueErrors naming the file."""
    cfg_path = os.path.join(path, CONFIG)
    cfg = read_json(cfg_path)
    with about_file(cfg_path):
        return parse(cfg)


def folder_model_type(path: str) -> str | None:
    """The ``model_type`` of the config.json in the folder ``path`` (None when it has none)."""
    cfg_path = os.path.join(path, CONFIG)
    model_type = read_json(cfg_path).get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{cfg_path}: model_type must be a string, got {_brief(model_type)}")
    return model_type


def from_pretrained(path: str, dtype: torch.dtype | None = None, device="cpu") -> CausalLM:
    """Load a dense or BAM model saved by ``save_pretrained`` (stored dtypes kept unless ``dtype``);
    a Hugging Face Mixtral folder (``load_mixtral_folder``), Llama-family folder or ``.gguf`` file
    (``load_dense``) is read in float32 unless ``dtype`` says otherwise. The model carries its
    tokenizer as ``model.tokenizer`` (``bam_model.tokenizer``)."""
    model = _from_pretrained(path, dtype, device)
    return _with_tokenizer(model, path)


def _with_tokenizer(model: CausalLM, source) -> CausalLM:
    from .tokenizer import of_source

    if model.tokenizer is None:
        model.tokenizer = of_source(source, model.config)
    return model


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
            config = _folder_config(path, config_from_dict)
            return build_model(config, _folder_tensors(path, config), dtype, device)
        if model_type == "mixtral":
            return load_mixtral_folder(path, torch.float32 if dtype is None else dtype, device)
    return load_dense(path, torch.float32 if dtype is None else dtype, device)


# --- Hugging Face Llama family -----------------------------------------------------------------

HF_MODEL_TYPES = ("llama", "mistral")
_REQUIRED = object()
_HF_KINDS = {  # what a config.json value must be -> its test
    "a positive int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "a finite positive number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and v > 0),
    "a finite number >= 0": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and math.isfinite(v) and v >= 0),
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
}


def _hf_value(hf: dict, key: str, kind: str, default=_REQUIRED):
    """``hf[key]``, or ``default`` when it is absent or null; a ValueError naming the key unless
    the value is ``kind`` (a key of ``_HF_KINDS``)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"key {key!r} is missing; expected {kind}")
        return default
    if not _HF_KINDS[kind](value):
        raise ValueError(f"key {key!r} must be {kind}, got {_brief(value)}")
    return value


def _rope_theta(hf: dict) -> float:
    params = _hf_value(hf, "rope_parameters", "an object", {})
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling is not None or rope_type != "default":
        raise ValueError(f"RoPE scaling ({_brief(scaling or params)}) is not supported; only plain RoPE is")
    if "rope_theta" in params:
        return _hf_value(params, "rope_theta", "a finite positive number")
    return _hf_value(hf, "rope_theta", "a finite positive number", 10000.0)


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def dense_config_from_hf(hf: dict, model_types: tuple = HF_MODEL_TYPES) -> DenseConfig:
    """Our ``DenseConfig`` for a Hugging Face Llama/Mistral ``config.json`` (the dense part of a
    Mixtral one); refuses what we do not model, and values of the wrong type naming their key."""
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; expected one of {model_types}")
    for key in ("attention_bias", "mlp_bias"):
        if _hf_value(hf, key, "true or false", False):
            raise ValueError(f"{key}=true is not supported (Llama-family models without biases only)")
    act = _hf_value(hf, "hidden_act", "a string", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
    max_len = _hf_value(hf, "max_position_embeddings", "a positive int", 2048)
    window = _hf_value(hf, "sliding_window", "a positive int", None)
    if window is not None and _hf_value(hf, "use_sliding_window", "true or false", True):
        max_len = min(max_len, window)  # within the window, sliding attention is full attention
    n_heads = _hf_value(hf, "num_attention_heads", "a positive int")
    vocab = _hf_value(hf, "vocab_size", "a positive int")
    ids = {k: _first_id(hf.get(k)) for k in ("bos_token_id", "eos_token_id")}
    return DenseConfig(
        vocab_size=vocab, dim=_hf_value(hf, "hidden_size", "a positive int"),
        n_layers=_hf_value(hf, "num_hidden_layers", "a positive int"), n_heads=n_heads,
        n_kv_heads=_hf_value(hf, "num_key_value_heads", "a positive int", n_heads),
        ffn_dim=_hf_value(hf, "intermediate_size", "a positive int"),
        head_dim=_hf_value(hf, "head_dim", "a positive int", None), rope_theta=_rope_theta(hf),
        norm_eps=_hf_value(hf, "rms_norm_eps", "a finite positive number", 1e-6), max_seq_len=max_len,
        tie_embeddings=_hf_value(hf, "tie_word_embeddings", "true or false", False),
        **{k: v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab else None
           for k, v in ids.items()})


def mixtral_config(hf: dict) -> BamConfig:
    """Our ``BamConfig`` for a Hugging Face Mixtral ``config.json``: one attention per layer and
    top-k renormalised routing (BTX's kind)."""
    dense = dense_config_from_hf(hf, model_types=("mixtral",))
    return BamConfig(**dense.__dict__, num_experts=_hf_value(hf, "num_local_experts", "a positive int"),
                     top_k=_hf_value(hf, "num_experts_per_tok", "a positive int"), normalize=True,
                     attention="dense", method="btx",
                     load_balancing_alpha=_hf_value(hf, "router_aux_loss_coef", "a finite number >= 0", 0.01))


def _hf_keeps(config: DenseConfig):
    """Which tensors of a Hugging Face folder the model takes: old checkpoints store RoPE's inverse
    frequencies (recomputed from rope_theta), and some a tied LM head."""
    return lambda name: not (name.endswith("rotary_emb.inv_freq")
                             or config.tie_embeddings and name == "lm_head.weight")


def load_hf_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A Hugging Face Llama-family folder (config.json + safetensors, sharded or not)."""
    config = _folder_config(path, dense_config_from_hf)
    return build_model(config, _folder_tensors(path, config, _hf_keeps(config)), dtype, device)


def load_mixtral_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> CausalLM:
    """A Hugging Face Mixtral folder (what ``export_mixtral`` writes, or a published Mixtral) as a
    ``BamLM`` with one attention per layer and top-k renormalised routing (BTX's kind).
    Per-expert ``block_sparse_moe.experts.j.w1/w2/w3`` keys are fused into our layout."""
    config = _folder_config(path, mixtral_config)
    F, D = config.ffn_dim, config.dim
    want = {"w1": (F, D), "w3": (F, D), "w2": (D, F)}
    tensors = {}
    per_expert = {}
    # The per-expert names do not match ours before fusing: the headers are checked for the layer
    # count (so a config.json of too many layers is refused at once), the experts' shapes here
    # and every name and shape again by build_model.
    for name, t in _folder_tensors(path, config, _hf_keeps(config), check=_check_layer_count).items():
        key = name.replace(".block_sparse_moe.", ".mlp.")
        parts = key.split(".mlp.experts.")
        if len(parts) == 2 and parts[1].count(".") == 2:  # "j.w1.weight"
            j, w, _ = parts[1].split(".")
            if w not in want or not j.isdecimal():
                raise ValueError(f"checkpoint has unexpected tensor {name!r}")
            if tuple(t.shape) != want[w]:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want[w]}")
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

def _gguf_path(reader) -> str:
    return str(getattr(reader.data, "filename", "GGUF file"))


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file {_gguf_path(reader)} has no {key!r}")
        return default
    return field.contents()


def _gguf_number(reader, key: str, default=None, kind: type = int):
    """A positive ``kind`` (int, or a finite float) field of the GGUF metadata."""
    value = _gguf_field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"GGUF file {_gguf_path(reader)}: {key!r} must be a positive {kind.__name__}, "
                         f"got {_brief(value)}")
    return value


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
    the model and its tokenizer), or ``source`` itself when it is one already. A file that is not
    GGUF, or is cut short or corrupt, is a ValueError naming it."""
    try:
        import gguf
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


def load_gguf(source, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A llama.cpp GGUF file (path or ``gguf_reader``) of the ``llama`` architecture (Llama, Mistral,
    SmolLM): tensors are dequantised to float32 and q/k rows put back in Hugging Face's order.
    Their names and shapes are checked against the metadata before any is dequantised."""
    reader = gguf_reader(source)
    import gguf
    where = _gguf_path(reader)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {_brief(arch)} is not supported; expected 'llama'")
    n_heads = _gguf_number(reader, "llama.attention.head_count")
    n_kv_heads = _gguf_number(reader, "llama.attention.head_count_kv", n_heads)
    dim = _gguf_number(reader, "llama.embedding_length")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or reader.fields.get("llama.rope.scaling.type") is not None:
        raise ValueError(f"GGUF file {where} uses RoPE scaling, which is not supported; only plain RoPE is")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _gguf_number(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else None)
    fields = dict(
        vocab_size=vocab, dim=dim, n_layers=_gguf_number(reader, "llama.block_count"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=_gguf_number(reader, "llama.feed_forward_length"),
        head_dim=_gguf_number(reader, "llama.attention.key_length", dim // n_heads),
        rope_theta=_gguf_number(reader, "llama.rope.freq_base", 10000.0, float),
        norm_eps=_gguf_number(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, float),
        max_seq_len=_gguf_number(reader, "llama.context_length", 2048),
        tie_embeddings="output.weight" not in names)
    for key in ("bos_token_id", "eos_token_id"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        value = field.contents() if field is not None else None
        in_vocab = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab
        fields[key] = value if in_vocab else None
    with about_file(where):
        config = DenseConfig(**fields)
    shapes = {_gguf_name(t.name): tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    check_tensors(config, shapes, f"{where} (llama.block_count)", "its tensor list")
    tensors = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        try:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        except NotImplementedError:
            raise ValueError(f"{where}: tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf "
                             "package cannot dequantize") from None
        w = w.reshape(shapes[name])  # GGUF lists dims innermost first
        _check_values(t.name, w, where)
        if name.endswith("q_proj.weight"):
            w = unpermute_gguf_qk(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_gguf_qk(w, n_kv_heads)
        tensors[name] = w
    return _with_tokenizer(build_model(config, tensors, dtype, device), reader)


def is_gguf(source) -> bool:
    """Whether ``source`` is a GGUF file: its path, or a reader of it from ``gguf_reader``."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.isfile(source) and os.fspath(source).endswith(".gguf")
    return type(source).__name__ == "GGUFReader"


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
        config = _folder_config(path, config_from_dict)
        return build_model(config, _folder_tensors(path, config), dtype, device)
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
