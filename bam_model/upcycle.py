"""Branch and mix: copies of a dense seed, and one mixture of experts built from the seed plus its
trained copies (DESIGN.md section 1).

| part | bam | btx | sparse |
|---|---|---|---|
| FFN experts | FFN of each dense model | same | E copies of the seed's FFN |
| FFN router | random; top-1, not renormalised | random; top-2, renormalised | like btx |
| attention | soft mixture of every model's attention (expert or shared KV) | mean | the seed's |
| norms, embeddings, LM head | mean | mean | the seed's |

The seed counts as an expert (expert 0). Routers start random from ``router_seed``.
"""
from __future__ import annotations

import copy
import os

import torch

from .checkpoint import build_model, is_gguf, load_dense
from .config import METHODS, BamConfig
from .model import DenseLM
from .layers import MixtureOfAttention

ATTENTION_OPTIONS = ("expert-kv", "shared-kv")
KV_INITS = ("mean", "seed")
MERGES = ("mean", "fisher")
# How the FFN router's top-k probabilities become weights: name -> (normalize, straight_through).
FFN_ROUTINGS = {
    "paper": (False, False),            # BAM's paper: the kept softmax probabilities as they are
    "renormalized": (True, False),      # Mixtral, BTX: rescaled to sum to 1 over the k
    "straight-through": (True, True),   # renormalised forward, the plain probabilities' gradient
}
METHOD_DEFAULTS = {"bam": dict(top_k=1, ffn_routing="straight-through"),
                   "btx": dict(top_k=2, ffn_routing="renormalized"),
                   "sparse": dict(top_k=2, ffn_routing="renormalized")}


def _as_model(model, name: str) -> DenseLM:
    if isinstance(model, DenseLM):
        return model
    if isinstance(model, (str, os.PathLike)) or is_gguf(model):  # a path, or a reader from gguf_reader
        return load_dense(model)
    raise ValueError(f"{name} must be a DenseLM or a path to a dense checkpoint, got {type(model).__name__}")


def branch(seed, domains: list[str]) -> list[DenseLM]:
    """One independent copy of ``seed`` per domain, each with ``config.domain`` set to its name."""
    seed = _as_model(seed, "seed")
    if not isinstance(domains, (list, tuple)) or not domains or not all(isinstance(d, str) and d for d in domains):
        raise ValueError(f"domains must be a non-empty list of names, got {domains!r}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct, got {list(domains)}")
    copies = []
    for domain in domains:
        model = copy.deepcopy(seed, memo={id(seed.tokenizer): seed.tokenizer})  # the tokenizer is shared
        model.config = seed.config.replace(domain=domain)
        copies.append(model)
    return copies


def check_compatible(models: list[DenseLM], names: list[str]) -> None:
    """Refuse models that cannot be mixed, naming the first setting or tensor that differs."""
    ref, ref_name = models[0], names[0]
    ref_arch = ref.config.architecture()
    ref_tensors = ref.state_dict()
    for model, name in zip(models[1:], names[1:]):
        for key, value in model.config.architecture().items():
            if value != ref_arch[key]:
                raise ValueError(f"{name} has {key}={value!r} but {ref_name} has {key}={ref_arch[key]!r}; "
                                 "models to mix must share their architecture")
        tensors = model.state_dict()
        for key, t in ref_tensors.items():
            if key not in tensors:
                raise ValueError(f"{name} has no tensor {key!r}, which {ref_name} has")
            if tensors[key].shape != t.shape:
                raise ValueError(f"tensor {key!r} has shape {tuple(tensors[key].shape)} in {name} but "
                                 f"{tuple(t.shape)} in {ref_name}")
        extra = [k for k in tensors if k not in ref_tensors]
        if extra:
            raise ValueError(f"{name} has tensor {extra[0]!r}, which {ref_name} has not")


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Accumulate in float64 so that averaging identical models gives back the very same weights.
    return torch.stack([t.double() for t in tensors]).mean(dim=0)


def upcycle(seed, experts, method: str = "bam", attention: str | None = None, top_k: int | None = None,
            merge: str = "mean", *, ffn_routing: str | None = None, kv_init: str = "mean",
            attention_top_k: int | None = None, num_experts: int | None = None, router_seed: int = 0,
            load_balancing_alpha: float = 0.01, z_loss_beta: float = 0.001,
            dtype: torch.dtype | None = None, fishers: list[dict] | None = None,
            fisher_data: list[str] | None = None, progress: bool = False):
    """Mix a dense ``seed`` and its trained copies ``experts`` into one ``BamLM``.

    seed, experts: ``DenseLM`` models or paths ``load_dense`` reads. The seed is expert 0, so
    E = 1 + len(experts). method: "bam" | "btx" | "sparse" (the table above; sparse uses only the
    seed, copied ``num_experts`` times, by default 1 + len(experts)).
    attention (bam only): "expert-kv" (default) or "shared-kv", whose K/V start from the mean of the
    models' (``kv_init="mean"``) or the seed's (``"seed"``). top_k / ffn_routing: the FFN router,
    by default top-1 "straight-through" for bam (renormalised weights, so that mixing keeps the
    models' function, with the paper's router gradient; "paper" is the paper's routing, the kept
    probabilities as they are) and top-2 "renormalized" otherwise. attention_top_k (bam):
    None for soft routing over every attention expert. merge: "mean" or "fisher" (bam, btx) for the
    shared parameters (and shared K/V started from the mean); fisher weights each model by its
    diagonal Fisher (``bam_model.fisher``): ``fishers`` (one dict per model, seed first) or computed on
    ``fisher_data`` (one data spec per model, by default each model's ``config.domain``, the general
    mix for the seed).
    The block kind (sequential or parallel) is the seed's. dtype: that of the result (the seed's
    by default); merging is done in float64. progress: bars for loading, Fisher and mixing.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if merge == "mean" and (fishers is not None or fisher_data is not None):
        raise ValueError("fishers and fisher_data apply to merge='fisher' only")
    if merge == "fisher" and method == "sparse":
        raise ValueError("merge='fisher' applies to bam and btx; sparse upcycling copies the seed and merges nothing")
    if method == "bam":
        attention = "expert-kv" if attention is None else attention
        if attention not in ATTENTION_OPTIONS:
            raise ValueError(f"attention must be one of {ATTENTION_OPTIONS}, got {attention!r}")
        if kv_init not in KV_INITS:
            raise ValueError(f"kv_init must be one of {KV_INITS}, got {kv_init!r}")
    else:
        for name, value in (("attention", attention), ("attention_top_k", attention_top_k)):
            if value is not None:
                raise ValueError(f"{name} applies to method='bam' only; {method} keeps one attention")
        attention = "dense"
    if not isinstance(experts, (list, tuple)):
        raise ValueError(f"experts must be a list of dense models or paths, got {type(experts).__name__}")
    if num_experts is not None and method != "sparse":
        raise ValueError(f"num_experts applies to method='sparse' only; {method} has one expert per model")
    seed = _as_model(seed, "seed")
    if method == "sparse":
        models = [seed]
        E = 1 + len(experts) if num_experts is None else num_experts
    else:
        models = [seed] + [_as_model(m, f"experts[{i}]")
                           for i, m in enumerate(tqdm(experts, desc="load experts", disable=not progress))]
        E = len(models)
        check_compatible(models, ["seed"] + [f"experts[{i}]" for i in range(len(experts))])
    if not isinstance(E, int) or isinstance(E, bool) or E < 1:
        raise ValueError(f"num_experts must be a positive int, got {E!r}")
    defaults = METHOD_DEFAULTS[method]
    top_k = defaults["top_k"] if top_k is None else top_k
    ffn_routing = defaults["ffn_routing"] if ffn_routing is None else ffn_routing
    if ffn_routing not in FFN_ROUTINGS:
        raise ValueError(f"ffn_routing must be one of {tuple(FFN_ROUTINGS)}, got {ffn_routing!r}")
    normalize, straight_through = FFN_ROUTINGS[ffn_routing]
    dense_fields = {k: v for k, v in seed.config.__dict__.items() if k != "domain"}
    config = BamConfig(**dense_fields, num_experts=E, top_k=top_k, normalize=normalize,
                       straight_through=straight_through, attention=attention,
                       attention_top_k=attention_top_k, load_balancing_alpha=load_balancing_alpha,
                       z_loss_beta=z_loss_beta, method=method,
                       expert_domains=[m.config.domain for m in models] if method != "sparse" else [])
    dtype = seed.dtype if dtype is None else dtype
    states = [m.state_dict() for m in models]
    if merge == "fisher":
        from .fisher import fisher_average, model_fishers
        fisher_states = model_fishers(models, fishers, fisher_data, progress=progress)

    def average(key: str) -> torch.Tensor:
        if merge == "fisher":
            return fisher_average([s[key] for s in states], [f[key] for f in fisher_states])
        return _mean([s[key] for s in states])

    generator = torch.Generator().manual_seed(router_seed)

    def shared(key: str) -> torch.Tensor:
        return states[0][key] if method == "sparse" else average(key)

    def router() -> torch.Tensor:
        return torch.randn(E, config.dim, generator=generator, dtype=torch.float64) * 0.02

    tensors = {}
    for key in states[0]:
        if not key.startswith("model.layers."):
            if key == "lm_head.weight" and config.tie_embeddings:
                continue
            tensors[key] = shared(key)
    for i in tqdm(range(config.n_layers), desc="mix layers", disable=not progress):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = shared(p + "input_layernorm.weight")
        if config.block == "sequential":
            tensors[p + "post_attention_layernorm.weight"] = shared(p + "post_attention_layernorm.weight")
        attn = {proj: [s[f"{p}self_attn.{proj}.weight"] for s in states]
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if method == "bam":
            moa = MixtureOfAttention.from_dense(
                attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"], config.n_heads, config.n_kv_heads,
                shared_kv=attention == "shared-kv", kv_init="first" if kv_init == "seed" else "mean",
                rope_theta=config.rope_theta)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"{p}self_attn.{proj}.weight"] = getattr(moa, proj).weight.detach()
            if attention == "shared-kv" and kv_init == "mean" and merge == "fisher":
                for proj in ("k_proj", "v_proj"):
                    tensors[f"{p}self_attn.{proj}.weight"] = average(f"{p}self_attn.{proj}.weight")
            tensors[p + "self_attn.router.weight"] = router()
        else:
            for proj, weights in attn.items():
                tensors[f"{p}self_attn.{proj}.weight"] = weights[0] if method == "sparse" else average(
                    f"{p}self_attn.{proj}.weight")
        ffn = [states[0]] * E if method == "sparse" else states
        tensors[p + "mlp.gate.weight"] = router()
        tensors[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([s[p + "mlp.gate_proj.weight"], s[p + "mlp.up_proj.weight"]], dim=0) for s in ffn])
        tensors[p + "mlp.experts.down_proj"] = torch.stack([s[p + "mlp.down_proj.weight"] for s in ffn])
    moe = build_model(config, tensors, dtype=dtype, device=seed.device)
    moe.tokenizer = _common_tokenizer(models)
    return moe


def _common_tokenizer(models: list[DenseLM]):
    """The tokenizer the mixed models share (the seed's); refused when two of them carry different ones."""
    from .tokenizer import same

    carried = [(i, m.tokenizer) for i, m in enumerate(models) if m.tokenizer is not None]
    for i, tok in carried[1:]:
        if not same(tok, carried[0][1]):
            first = "seed" if carried[0][0] == 0 else f"experts[{carried[0][0] - 1}]"
            raise ValueError(f"experts[{i - 1}] carries another tokenizer than the {first}; models mixed together "
                             "must share one")
    return carried[0][1] if carried else None

