"""Model construction from tensors, with no file I/O: which class a config builds, the tensors a
checkpoint of it stores and their shapes, the check of a tensor set against a config, and the
model filled with checked tensors. Every format (``bam_model.formats``) ends here.
"""
from __future__ import annotations

import torch

from .config import BamConfig, DenseConfig
from .model import BamLM, CausalLM, DenseLM


def model_class(config: DenseConfig) -> type[CausalLM]:
    return BamLM if isinstance(config, BamConfig) else DenseLM


def model_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The state dict to store: the LM head is left out when it is tied to the embeddings."""
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    return tensors
_LAYER0 = "model.layers.0."


def expected_shapes(config: DenseConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of ``config`` stores (``model_tensors``), without
    building the model: layers differ only in their index, so one is built on the meta device and
    its names repeated (a whole meta model takes 2.4 ms a layer: most of a minute for 20000)."""
    try:
        with torch.device("meta"):
            one = model_class(config)(config.replace(n_layers=1, nope_layers=[], window_layers=[],
                                                     attention_window=None))  # shapes only
    except (RuntimeError, TypeError) as e:  # on the meta device, only sizes that overflow int64 fail
        reason = str(e).splitlines()[0]
        raise ValueError(f"the config's sizes make a tensor too large to exist ({reason})") from None
    shapes = {k: tuple(t.shape) for k, t in model_tensors(one).items()}
    layer = {k.removeprefix(_LAYER0): s for k, s in shapes.items() if k.startswith(_LAYER0)}
    expected = {k: s for k, s in shapes.items() if not k.startswith(_LAYER0)}
    for i in range(config.n_layers):
        expected.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return expected


def check_layer_count(config: DenseConfig, shapes: dict, config_name: str, weights_name: str) -> None:
    layers = 1 + max((int(p[2]) for p in (k.split(".", 3) for k in shapes)
                      if len(p) == 4 and p[:2] == ["model", "layers"] and p[2].isdecimal()), default=-1)
    if layers != config.n_layers:
        raise ValueError(f"{config_name} says {config.n_layers} layers but {weights_name} holds {layers}")


def check_tensors(config: DenseConfig, shapes: dict[str, tuple[int, ...]], config_name: str = "the config",
                  weights_name: str = "the checkpoint") -> None:
    """Refuse tensors (name -> shape) that do not fit ``config``: another number of layers, a
    missing or unexpected name, a wrong shape. Cheap for any config, so that loading checks the
    safetensors headers with it before the model is built or any tensor data is read."""
    check_layer_count(config, shapes, config_name, weights_name)
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


class DtypeRangeError(ValueError):
    """A cast that would turn finite weights into Inf (float32 to float16 beyond 65504)."""


# The dtypes a model computes in: a weight stored in another (float8) is cast to one of them on load.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cast(name: str, t: torch.Tensor, dtype: torch.dtype | None, device=None) -> torch.Tensor:
    """The tensor ``name`` in ``dtype`` (None: its own) on ``device`` (None: its own). Refused with a
    ValueError naming the tensor: a dtype the model cannot compute in (float8 kept as stored), and a
    cast to a narrower range that would turn finite values into Inf (float32 weights beyond float16's
    largest value, 65504)."""
    target = t.dtype if dtype is None else dtype
    if target not in COMPUTE_DTYPES:
        raise ValueError(f"tensor {name!r} is {str(target).removeprefix('torch.')}, which bam's models do "
                         "not compute in; load it in float32, bfloat16 or float16 (--dtype)")
    out = t.to(device=device if device is not None else t.device, dtype=target)
    if target != t.dtype and torch.finfo(target).max < torch.finfo(t.dtype).max and out.numel():
        lo, hi = torch.aminmax(out)    # one pass; the source was checked finite when it was read
        if not (lo.isfinite() and hi.isfinite()):
            largest = t.detach().abs().max().item()
            raise DtypeRangeError(f"tensor {name!r} holds {largest:g}, beyond the largest "
                             f"{str(target).removeprefix('torch.')} ({torch.finfo(target).max:g}): it would "
                             "become Inf; use bfloat16 (float32's range at half the size) or float32")
    return out


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
    state = {k: cast(k, tensors[k], dtype, device) for k in expected}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model
