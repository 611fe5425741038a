"""bam's KV cache: the keys and values of every attention layer, for decoding token by token.

Shape suffixes: the legend of ``bam_model.layers``.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer, for decoding token by token.

    Layer i holds k, v [B, S, *kv_heads, Dh] as its attention made them: [B, S, Hkv, Dh] for a dense
    or shared-KV layer (so a shared-KV mixture caches exactly what the dense model does) and
    [B, S, E, Hkv, Dh] for expert KV. Storage grows by doubling along S, or is allocated once when
    ``max_length`` is given, so appending a token costs O(1) amortised.
    """

    def __init__(self, num_layers: int, max_length: int | None = None):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.num_layers, self.max_length = num_layers, max_length
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    def length(self, layer_idx: int = 0) -> int:
        """Tokens cached so far in that layer: the position of the next token."""
        return self._lengths[layer_idx]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (k, v) of a layer, each [B, length, *kv_heads, Dh]."""
        n = self._lengths[layer_idx]
        if self._k[layer_idx] is None:
            raise ValueError(f"layer_idx {layer_idx} has nothing cached yet")
        return self._k[layer_idx][:, :n], self._v[layer_idx][:, :n]

    def update(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append k_new, v_new [B, T, *kv_heads, Dh]; return the whole (k, v) of the layer."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"k_new and v_new must have one shape, got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
        n, T = self._lengths[layer_idx], k_new.shape[1]
        k_buf = self._k[layer_idx]
        if k_buf is not None and (k_buf.shape[0] != k_new.shape[0] or k_buf.shape[2:] != k_new.shape[2:]):
            raise ValueError(f"k_new must have shape [B, T, *kv_heads, Dh] = [{k_buf.shape[0]}, T, "
                             f"{', '.join(map(str, k_buf.shape[2:]))}] like the cache, "
                             f"got {tuple(k_new.shape)}")
        if k_buf is None or n + T > k_buf.shape[1]:
            if self.max_length is not None and n + T > self.max_length:
                raise ValueError(f"the cache holds max_length={self.max_length} tokens; {n} + {T} do not fit")
            capacity = self.max_length or max(2 * (n + T), 16)
            shape = (k_new.shape[0], capacity, *k_new.shape[2:])
            new_k = k_new.new_empty(shape)
            new_v = v_new.new_empty(shape)
            if n:
                new_k[:, :n] = k_buf[:, :n]
                new_v[:, :n] = self._v[layer_idx][:, :n]
            self._k[layer_idx], self._v[layer_idx] = new_k, new_v
        self._k[layer_idx][:, n:n + T] = k_new
        self._v[layer_idx][:, n:n + T] = v_new
        self._lengths[layer_idx] = n + T
        return self.layer(layer_idx)

    def reset(self) -> None:
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers
        self._lengths = [0] * self.num_layers
