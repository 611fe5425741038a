"""Folders of safetensors (ours and Hugging Face's): ``config.json`` and ``model.safetensors``, or
shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. Writing goes
through ``files.write_model_folder`` (atomic; a folder we did not write is never replaced);
reading checks the headers' names and shapes before any tensor data is read, then every tensor's
dtype and values. Never pickle.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from ..build import check_tensors
from ..config import DenseConfig, config_from_dict
from ..files.atomic import save_safetensors
from ..files.folders import write_model_folder
from ..files.manifest import MANIFEST
from ..files.reading import about_file, read_json
from ..files.room import check_free_space
from ..options import short_repr

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


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
    for name in files:      # before any work: a name of its own, not a path, not the manifest
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or name == MANIFEST:
            raise ValueError(f"a file of a model folder needs a plain name other than {MANIFEST}, "
                             f"got {name!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_free_space(path, sum(t.numel() * t.element_size() for t in tensors.values()), "the model's weights")

    def write(folder):
        for name, content in files.items():
            with open(os.path.join(folder, name), "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        shards = _shards(tensors, max_shard_bytes)
        meta = {"format": "pt", **(metadata or {})}
        if len(shards) == 1:
            save_safetensors(shards[0], os.path.join(folder, WEIGHTS), metadata=meta)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, os.path.join(folder, fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    write_model_folder(path, write)


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
                                 f"got {short_repr(fname)}")
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


def check_values(name: str, t: torch.Tensor, where: str) -> None:
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


def folder_tensors(path: str, config: DenseConfig, keep=None,
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
        check_values(name, t, headers[name][0])
    return tensors


def folder_config(path: str, parse) -> DenseConfig:
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
        raise ValueError(f"{cfg_path}: model_type must be a string, got {short_repr(model_type)}")
    return model_type


def load_config(path: str) -> DenseConfig:
    """Read our ``config.json`` (a file, or a folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config file at {path!r}")
    d = read_json(path)
    with about_file(path):
        return config_from_dict(d)
