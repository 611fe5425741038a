"""Drop-in torch.nn modules built on bam_kernels: the MoE FFN (and, beside it, the attention
experts). Modules know nothing of Triton: every op goes through ``bam_model.ops`` (bam_kernels'
dispatcher; plain PyTorch in a model folder's remote code where bam_kernels is not installed).

Shape suffixes: the legend of ``bam_kernels/__init__.py`` (``x_BTD`` is [batch, tokens, model dim];
``k`` the top-k slots, ``Hq`` query heads of all experts, ``G`` key/value heads as stacked), and in
``bam_model`` also: P rotary pairs (Dh / 2); V vocabulary; O and I a weight's out and in features;
for expert parallelism W ranks, L local experts of a rank, M routed rows (T * k, in expert order)
and R rows a rank receives.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .norms import ExpertRMSNorm, RMSNorm, heads
from .ops import moa_attention, moe_mlp, route_topk
from .rope import apply_rope, rope_for


def load_balancing_loss(router_logits_TE: torch.Tensor, experts_Tk: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i * P_i``.

    f_i: fraction of the routed (token, slot) pairs sent to expert i (not differentiable);
    P_i: mean router probability of expert i over the tokens.
    """
    E = router_logits_TE.shape[-1]
    probs_TE = torch.softmax(router_logits_TE, dim=-1, dtype=torch.float32)
    counts_E = torch.zeros(E, device=experts_Tk.device, dtype=torch.int64)
    counts_E.scatter_add_(0, experts_Tk.reshape(-1), torch.ones_like(experts_Tk.reshape(-1)))
    f_E = counts_E.to(torch.float32) / max(experts_Tk.numel(), 1)
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def route_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``router(x)``; inside an autocast region computed in float32 instead (selective precision,
    as Switch and ST-MoE do: bf16 logits round enough to flip top-k choices and to destabilise the
    softmax and the z-loss)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return nn.functional.linear(x.float(), router.weight.float())
    return router(x)


def route(logits_TE: torch.Tensor, top_k: int, normalize: bool, straight_through: bool = False):
    """Top-k routing weights [T, K] and expert ids [T, K] from router logits [T, E].

    ``normalize=False``: the kept softmax probabilities (BAM's paper); ``normalize=True``: rescaled
    to sum to 1 over the k (Mixtral, BTX). ``straight_through`` (with ``normalize``): the forward
    weights are the renormalised ones, exactly, but the gradient is that of the plain probabilities,
    so the router learns from the language-model loss as in the paper even at top-1 (where the
    renormalised weight is the constant 1) while the mixture of identical experts keeps the dense
    model's function."""
    if not straight_through:
        return route_topk(logits_TE, top_k, normalize)
    probs_Tk, experts_Tk = route_topk(logits_TE, top_k, False)
    kept_Tk = probs_Tk.detach()
    return kept_Tk / kept_Tk.sum(dim=-1, keepdim=True) + (probs_Tk - kept_Tk), experts_Tk


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_j logits_tj)^2``."""
    return torch.logsumexp(router_logits_TE.float(), dim=-1).square().mean()


class MoEExperts(nn.Module):
    """E SwiGLU experts in Hugging Face's fused layout: gate_up_proj [E, 2F, D] (gate rows first),
    down_proj [E, D, F]."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim, device=device,
                                                     dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert initialised as nn.Linear would be (uniform, bound 1/sqrt(fan_in)).
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.ffn_dim), 1 / math.sqrt(self.ffn_dim))

    def forward(self, x_TD, weights_Tk, experts_Tk):
        return moe_mlp(x_TD, self.gate_up_proj, self.down_proj, weights_Tk, experts_Tk)


class RouterLosses:
    """``load_balancing_loss`` and ``z_loss`` of the last forward, computed when first read
    (decoding never pays): a forward calls ``_set_routed(router logits, expert ids)``, which keeps
    both as ``routed`` and the logits as ``router_logits``."""
    router_logits: torch.Tensor | None = None
    routed: tuple[torch.Tensor, torch.Tensor] | None = None

    def _set_routed(self, logits_TE: torch.Tensor, experts_Tk: torch.Tensor) -> None:
        self.router_logits = logits_TE
        self.routed, self._losses = (logits_TE, experts_Tk), {}

    def _loss(self, name: str, fn) -> torch.Tensor | None:
        if self.routed is None:
            return None
        if name not in self._losses:
            self._losses[name] = fn()
        return self._losses[name]

    @property
    def load_balancing_loss(self) -> torch.Tensor | None:
        """``E * sum_i f_i P_i`` of the last forward."""
        return self._loss("lb", lambda: load_balancing_loss(*self.routed))

    @property
    def z_loss(self) -> torch.Tensor | None:
        """``mean_t logsumexp(logits_t)^2`` of the last forward."""
        return self._loss("z", lambda: router_z_loss(self.routed[0]))


class MoE(RouterLosses, nn.Module):
    """Sparse mixture of SwiGLU experts with a top-k softmax router.

    ``normalize=False`` keeps the top-k probabilities as they are (BAM's paper); ``normalize=True``
    rescales them to sum to 1 (Mixtral, BTX); ``straight_through=True`` (with ``normalize``) keeps
    the renormalised forward but gives the router the plain probabilities' gradient (``route``).
    State-dict keys and shapes are those of
    transformers' ``MixtralSparseMoeBlock``: ``gate.weight [E, D]``,
    ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``.

    After each forward: ``router_logits`` [tokens, E], ``load_balancing_loss`` and ``z_loss``
    (scalars, differentiable) for the model to collect.
    """

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int = 1, normalize: bool = False,
                 device=None, dtype=None, *, straight_through: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if straight_through and not normalize:
            raise ValueError("straight_through=True needs normalize=True (it keeps the renormalised forward)")
        self.dim, self.ffn_dim, self.num_experts = dim, ffn_dim, num_experts
        self.top_k, self.normalize, self.straight_through = top_k, normalize, straight_through
        self.gate = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = MoEExperts(num_experts, dim, ffn_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        logits_TE = route_logits(self.gate, x_TD)
        weights_Tk, experts_Tk = route(logits_TE, self.top_k, self.normalize, self.straight_through)
        y_TD = self.experts(x_TD, weights_Tk, experts_Tk)
        self._set_routed(logits_TE, experts_Tk)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, normalize={self.normalize}, straight_through={self.straight_through}")


class MixtureOfAttention(nn.Module):
    """BAM's soft mixture of attention experts: ``y = sum_e g_e(x) * Attn_e(x)``, ``g = softmax(router(x))``.

    Every expert has its own query and output projections, stacked so that each is one GEMM:
    ``q_proj.weight [E*H*Dh, D]`` (expert-major rows), ``o_proj.weight [D, E*H*Dh]``. With
    ``shared_kv`` one ``k_proj``/``v_proj`` [Hkv*Dh, D] serves every expert (the KV cache is a dense
    layer's); otherwise each expert has its own, stacked expert-major into [E*Hkv*Dh, D].
    ``router.weight [E, D]``. ``qkv_bias``: the query, key and value projections have biases, stacked
    like their weights; ``qk_norm``: queries and keys get an RMSNorm before RoPE (``"head"``: over each
    head, ``"projection"``: over an expert's whole projection), each expert its own (``q_norm.weight``
    [E, Dh] or [E, H*Dh]; ``k_norm`` likewise, or one [Dh] / [Hkv*Dh] with shared K/V). Queries and
    keys get RoPE (Hugging Face Llama's layout), attention is causal. ``top_k`` (optional) keeps the k
    largest router weights renormalised to sum to 1 (every expert is still computed; the others get
    weight 0).

    forward(x [B, T, D], cache=None, position_ids=None, mask=None, kv_start=None) -> [B, T, D]. With a
    ``KVCache`` the new keys and values are appended to layer ``layer_idx`` and positions continue
    from its length; ``mask`` and ``kv_start`` as ``bam_model.ops.moa_attention`` takes them.
    After each forward ``router_logits`` [B*T, E] is kept for the model to collect.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, num_experts: int, shared_kv: bool = True,
                 head_dim: int | None = None, rope_theta: float = 10000.0, top_k: int | None = None,
                 layer_idx: int = 0, device=None, dtype=None, *, qkv_bias: bool = False,
                 qk_norm: str | None = None, norm_eps: float = 1e-5, rope: bool = True,
                 scale: float | None = None, norm_in_float32: bool = False):
        super().__init__()
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        for name, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads),
                            ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"n_heads={n_heads} must divide dim={dim} when head_dim is not given")
            head_dim = dim // n_heads
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {head_dim!r}")
        if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= num_experts):
            raise ValueError(f"top_k must be None or an int in [1, num_experts={num_experts}], got {top_k!r}")
        self.dim, self.n_heads, self.n_kv_heads, self.num_experts = dim, n_heads, n_kv_heads, num_experts
        self.shared_kv, self.head_dim, self.rope_theta = shared_kv, head_dim, rope_theta
        self.top_k, self.layer_idx, self.qk_norm = top_k, layer_idx, qk_norm
        self.rope, self.scale = rope, scale
        E, H, Hkv, Dh = num_experts, n_heads, n_kv_heads, head_dim
        kv_out = Hkv * Dh if shared_kv else E * Hkv * Dh
        self.q_proj = nn.Linear(dim, E * H * Dh, bias=qkv_bias, device=device, dtype=dtype)
        self.k_proj = nn.Linear(dim, kv_out, bias=qkv_bias, device=device, dtype=dtype)
        self.v_proj = nn.Linear(dim, kv_out, bias=qkv_bias, device=device, dtype=dtype)
        self.o_proj = nn.Linear(E * H * Dh, dim, bias=False, device=device, dtype=dtype)
        self.router = nn.Linear(dim, E, bias=False, device=device, dtype=dtype)
        if qk_norm is not None:
            q_n, k_n = (Dh, Dh) if qk_norm == "head" else (H * Dh, Hkv * Dh)
            self.q_norm = ExpertRMSNorm(E, q_n, norm_eps, norm_in_float32)
            self.k_norm = RMSNorm(k_n, norm_eps, norm_in_float32) if shared_kv else \
                ExpertRMSNorm(E, k_n, norm_eps, norm_in_float32)
            self.to(device=device, dtype=dtype)
        self.router_logits = None

    @classmethod
    def from_dense(cls, q_weights, k_weights, v_weights, o_weights, n_heads: int, n_kv_heads: int,
                   shared_kv: bool = True, kv_init: str = "mean", rope_theta: float = 10000.0,
                   top_k: int | None = None, layer_idx: int = 0) -> MixtureOfAttention:
        """One expert per dense attention: lists of E weights in nn.Linear layout, q [H*Dh, D],
        k and v [Hkv*Dh, D], o [D, H*Dh]. Shared K/V start from the experts' mean (``kv_init="mean"``)
        or the seed's (``"seed"``: the first expert, where upcycling lists the seed), the words of
        ``upcycle`` and ``bam mix``. The router is new."""
        E = len(q_weights)
        if E < 1 or not (len(k_weights) == len(v_weights) == len(o_weights) == E):
            raise ValueError("q_weights, k_weights, v_weights and o_weights must be lists of one length "
                             f">= 1, got {len(q_weights)}, {len(k_weights)}, {len(v_weights)}, "
                             f"{len(o_weights)}")
        if kv_init not in ("mean", "seed"):
            raise ValueError(f"kv_init must be 'mean' or 'seed', got {kv_init!r}")
        HDh, D = q_weights[0].shape
        if n_heads < 1 or HDh % n_heads:
            raise ValueError(f"q_weights[0] has {HDh} rows, not a multiple of n_heads={n_heads}")
        Dh = HDh // n_heads
        expected = {"q_weights": (HDh, D), "k_weights": (n_kv_heads * Dh, D),
                    "v_weights": (n_kv_heads * Dh, D), "o_weights": (D, HDh)}
        for name, weights in (("q_weights", q_weights), ("k_weights", k_weights), ("v_weights", v_weights),
                              ("o_weights", o_weights)):
            for i, w in enumerate(weights):
                if tuple(w.shape) != expected[name]:
                    raise ValueError(f"{name}[{i}] must have shape {expected[name]}, got {tuple(w.shape)}")
        states = [{"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": o}
                  for q, k, v, o in zip(q_weights, k_weights, v_weights, o_weights)]
        return cls.from_dense_states(states, n_heads, n_kv_heads, shared_kv=shared_kv, kv_init=kv_init,
                                     rope_theta=rope_theta, top_k=top_k, layer_idx=layer_idx)

    @classmethod
    def from_dense_states(cls, states: list[dict], n_heads: int, n_kv_heads: int, shared_kv: bool = True,
                          kv_init: str = "mean", rope_theta: float = 10000.0, top_k: int | None = None,
                          layer_idx: int = 0, qk_norm: str | None = None, norm_eps: float = 1e-5,
                          rope: bool = True, scale: float | None = None) -> MixtureOfAttention:
        """One expert per dense attention, given as its state dict (``q_proj.weight``, ..., and where the
        family has them ``q_proj.bias``, ``k_proj.bias``, ``v_proj.bias``, ``q_norm.weight``,
        ``k_norm.weight``): queries, outputs, biases and norms stacked per expert; shared K/V (their
        biases and key norm too) from the experts' mean or the seed's (``kv_init``, as ``from_dense``)."""
        if not states or any(set(st) != set(states[0]) for st in states):
            raise ValueError("states must be a non-empty list of state dicts holding the same tensor names, "
                             f"got {[sorted(st) for st in states]}")
        if kv_init not in ("mean", "seed"):
            raise ValueError(f"kv_init must be 'mean' or 'seed', got {kv_init!r}")
        HDh, D = states[0]["q_proj.weight"].shape
        w0 = states[0]["q_proj.weight"]
        module = cls(D, n_heads, n_kv_heads, len(states), shared_kv=shared_kv, head_dim=HDh // n_heads,
                     rope_theta=rope_theta, top_k=top_k, layer_idx=layer_idx, device=w0.device,
                     dtype=w0.dtype, qkv_bias="q_proj.bias" in states[0], qk_norm=qk_norm, norm_eps=norm_eps,
                     rope=rope, scale=scale)

        def stacked(name: str) -> torch.Tensor:
            kv = name.startswith(("k_", "v_"))
            if kv and shared_kv:  # one set for every expert
                if kv_init == "seed":
                    return states[0][name]
                return torch.stack([st[name].double() for st in states]).mean(0)
            if name.endswith("norm.weight"):
                return torch.stack([st[name] for st in states])
            return torch.cat([st[name] for st in states], dim=1 if name == "o_proj.weight" else 0)

        params = dict(module.named_parameters())
        for name in states[0]:
            if name not in params or name.startswith("router."):
                raise ValueError(f"states hold {name!r}, which a dense attention of these settings has no "
                                 f"place for (qk_norm={qk_norm!r})")
        with torch.no_grad():
            for name, param in params.items():
                if name.startswith("router."):
                    continue  # the router is new
                if name not in states[0]:
                    raise ValueError(f"states lack {name!r}, which qk_norm={qk_norm!r} needs")
                value = stacked(name)
                if value.shape != param.shape:
                    raise ValueError(f"the experts' {name} stack to shape {tuple(value.shape)}, expected "
                                     f"{tuple(param.shape)}")
                param.copy_(value)
        return module

    def mix(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Router weights [..., E] (float32 or wider) from router logits."""
        wide = torch.promote_types(router_logits.dtype, torch.float32)
        probs = torch.softmax(router_logits.to(wide), dim=-1)
        if self.top_k is None or self.top_k == self.num_experts:
            return probs
        w, idx = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, idx, w / w.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor, cache=None, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_start: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, T, dim={self.dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        E, H, Hkv, Dh = self.num_experts, self.n_heads, self.n_kv_heads, self.head_dim
        kv_heads = (Hkv,) if self.shared_kv else (E, Hkv)
        logits_BTE = route_logits(self.router, x)
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        q_BTHqDh = heads(self.q_proj(x), E, H, Dh, q_norm, self.qk_norm).view(B, T, E * H, Dh)
        k_BTGDh = heads(self.k_proj(x), 1 if self.shared_kv else E, Hkv, Dh, k_norm, self.qk_norm)
        k_BTGDh = k_BTGDh.view(B, T, -1, Dh)
        v_BTGDh = self.v_proj(x).view(B, T, *kv_heads, Dh)
        if self.rope:
            start = cache.length(self.layer_idx) if cache is not None else 0
            cos, sin = rope_for(position_ids, start, T, Dh, self.rope_theta, q_BTHqDh.dtype, x.device)
            q_BTHqDh, k_BTGDh = apply_rope(q_BTHqDh, cos, sin), apply_rope(k_BTGDh, cos, sin)
        q_BTEHDh = q_BTHqDh.view(B, T, E, H, Dh)
        k_BTGDh = k_BTGDh.view(B, T, *kv_heads, Dh)
        if cache is not None:
            k_BTGDh, v_BTGDh = cache.update(self.layer_idx, k_BTGDh, v_BTGDh)
        o_BTEHDh = moa_attention(q_BTEHDh, k_BTGDh, v_BTGDh, self.mix(logits_BTE), mask, kv_start, self.scale)
        self.router_logits = logits_BTE.reshape(B * T, E)
        return self.o_proj(o_BTEHDh.reshape(B, T, E * H * Dh))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"num_experts={self.num_experts}, shared_kv={self.shared_kv}, head_dim={self.head_dim}, "
                f"top_k={self.top_k}")
