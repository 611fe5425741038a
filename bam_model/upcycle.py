"""Branch and mix: copies of a dense seed, and one mixture of experts built from the seed plus its
trained copies (DESIGN.md section 1).

| part | bam | btx | sparse |
|---|---|---|---|
| FFN experts | FFN of each dense model | same; any more: the seed's | E copies of the seed's FFN |
| FFN router | random; top-1, not renormalised | random; top-2, renormalised | like btx |
| attention | soft mixture of every model's attention (expert or shared KV) | mean | the seed's |
| norms, embeddings, LM head | mean | mean | the seed's |

The seed counts as an expert (expert 0). Routers start random from ``router_seed``.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch

from .build import build_model, expected_shapes
from .config import METHODS, BamConfig
from .files.room import gib, physical_memory
from .fisher import fisher_average, model_fishers
from .formats import is_gguf, load_dense
from .layers import MixtureOfAttention
from .model import DenseLM
from .options import INT, NUMBER, TEXT, int_in, option, seed_check, validate
from .tokenizer import same

ATTENTION_OPTIONS = ("expert-kv", "shared-kv")
# More experts than any published mixture has (DeepSeek-V3 256, Kimi K2 384, Qwen3-Next 512): a larger
# number is a typo, refused before a model of that size is built.
MAX_EXPERTS = 1024
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


def _list_of_str(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, str) for d in v)


@dataclass
class MixOptions:
    """How ``upcycle`` builds a mixture: the keys of a ``bam mix`` recipe and its flags, but the
    models' paths and the dtype (``cli.mix.MixRecipe`` adds those). None means the method's default."""
    method: str = option("bam", help="how the mixture is built", kind=TEXT, choices=METHODS,
                         what="bam, btx or sparse")
    attention: str | None = option(None, help="bam only (default expert-kv)", kind=TEXT,
                                   choices=ATTENTION_OPTIONS, what="expert-kv or shared-kv")
    top_k: int | None = option(None, help="FFN router top-k (default 1 for bam, 2 otherwise)", kind=INT)
    ffn_routing: str | None = option(
        None, help="how the FFN router's top-k probabilities weight the experts: straight-through "
        "(bam's default: renormalised, so mixing keeps the models' function, with the paper's router "
        "gradient), renormalized (btx's and sparse's default, Mixtral's), or paper (the kept probabilities "
        "as they are, as the BAM paper states)", kind=TEXT, choices=tuple(FFN_ROUTINGS),
        what=" or ".join(FFN_ROUTINGS))
    merge: str = option("mean", help="how norms, embeddings and head are merged", kind=TEXT, choices=MERGES,
                        what="mean or fisher")
    fisher_data: list[str] | None = option(
        None, help="with --merge fisher: one data spec per model, seed first (default: each model's "
        "domain from bam branch, the general mix for the seed)", nargs="+",
        what="a list of data specs, one per model, seed first", accepts=_list_of_str)
    kv_init: str = option("mean", help="shared K/V start", kind=TEXT, choices=KV_INITS, what="mean or seed")
    router_seed: int = option(0, help="seed of the new routers' initialisation (at most 2**62)", kind=INT,
                              check=seed_check)
    attention_top_k: int | None = option(None, help="bam: attention experts each token uses (default: all, "
                                         "soft routing)", kind=INT)
    num_experts: int | None = option(None, help=f"sparse: copies of the seed's FFN (default: one per model "
                                     f"given); btx: at least one per model, the experts beyond them copies "
                                     f"of the seed's FFN (a parameter-matched BTX); at most {MAX_EXPERTS}",
                                     kind=INT, check=int_in(1, MAX_EXPERTS))
    load_balancing_alpha: float = option(0.01, help="weight of the FFN routers' load-balancing loss",
                                         kind=NUMBER)
    z_loss_beta: float = option(0.001, help="weight of the FFN routers' z-loss", kind=NUMBER)

    def __post_init__(self):
        validate(self)
        if self.merge == "fisher" and self.method == "sparse":
            raise ValueError("merge='fisher' applies to bam and btx; sparse upcycling copies the seed and "
                             "merges nothing")
        if self.merge == "mean" and self.fisher_data is not None:
            raise ValueError("fishers and fisher_data apply to merge='fisher' only")
        if self.method != "bam":
            for name in ("attention", "attention_top_k"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to method='bam' only; {self.method} keeps one "
                                     "attention")
        if self.num_experts is not None and self.method == "bam":
            raise ValueError("num_experts applies to method='sparse' and 'btx'; bam has one expert (FFN and "
                             "attention) per model")

    @property
    def attention_kind(self) -> str:
        """The mixture's ``BamConfig.attention``."""
        if self.method != "bam":
            return "dense"
        return "expert-kv" if self.attention is None else self.attention

    def routing(self) -> tuple[int | None, bool, bool]:
        """The FFN router's top_k, normalize and straight_through (the method's defaults filled in)."""
        defaults = METHOD_DEFAULTS[self.method]
        top_k = defaults["top_k"] if self.top_k is None else self.top_k
        normalize, straight_through = FFN_ROUTINGS[self.ffn_routing or defaults["ffn_routing"]]
        return top_k, normalize, straight_through


def _as_model(model, name: str) -> DenseLM:
    if isinstance(model, DenseLM):
        return model
    if isinstance(model, (str, os.PathLike)) or is_gguf(model):  # a path, or a reader from gguf_reader
        return load_dense(model)
    raise ValueError(f"{name} must be a DenseLM or a path to a dense checkpoint, got {type(model).__name__}")


def branch(seed, domains: list[str]) -> list[DenseLM]:
    """One independent copy of ``seed`` per domain, each with ``config.domain`` set to its name."""
    seed = _as_model(seed, "seed")
    if not isinstance(domains, (list, tuple)) or not domains or not all(
            isinstance(d, str) and d for d in domains):
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


def upcycle(seed, experts, options: MixOptions | None = None, *, dtype: torch.dtype | None = None,
            fishers: list[dict] | None = None, progress: bool = False, **settings):
    """Mix a dense ``seed`` and its trained copies ``experts`` into one ``BamLM``.

    seed, experts: ``DenseLM`` models or paths ``load_dense`` reads. The seed is expert 0, so
    E = 1 + len(experts). The settings are ``options`` (a ``MixOptions``) or its fields as keywords:
    method: "bam" | "btx" | "sparse" (the table above; sparse uses only the seed, copied
    ``num_experts`` times, by default 1 + len(experts); btx with ``num_experts`` above 1 + len(experts)
    adds copies of the seed's FFN as the extra experts, the BAM paper's parameter-matched BTX).
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
    if options is None:
        options = MixOptions(**settings)
    elif settings:
        raise ValueError(f"give options or keyword settings, not both (got {sorted(settings)})")
    if not isinstance(options, MixOptions):
        raise ValueError(f"options must be a MixOptions, got {type(options).__name__}")
    if options.merge == "mean" and fishers is not None:
        raise ValueError("fishers and fisher_data apply to merge='fisher' only")
    if not isinstance(experts, (list, tuple)):
        raise ValueError(f"experts must be a list of dense models or paths, got {type(experts).__name__}")
    seed = _as_model(seed, "seed")
    models = _models_to_mix(seed, experts, options.method, progress)
    config = _mixture_config(seed, models, options, 1 + len(experts))
    _check_memory(config, seed.dtype if dtype is None else dtype)
    states = [m.state_dict() for m in models]
    fisher_states = None
    if options.merge == "fisher":
        fisher_states = model_fishers(models, fishers, options.fisher_data, progress=progress)
    tensors = _Mixer(config, options, states, fisher_states).tensors(progress)
    moe = build_model(config, tensors, dtype=seed.dtype if dtype is None else dtype, device=seed.device)
    moe.tokenizer = _common_tokenizer(models)
    moe.chat_template = seed.chat_template
    return moe


def _check_memory(config: BamConfig, dtype: torch.dtype) -> None:
    """Refuse, before it is built, a mixture whose weights alone outgrow this machine's memory."""
    n = sum(math.prod(shape) for shape in expected_shapes(config).values())
    need, have = n * dtype.itemsize, physical_memory()
    if have is not None and need > have:
        raise ValueError(f"the mixture has {n / 1e9:.2f}B parameters ({config.num_experts} experts), "
                         f"{gib(need)} in {str(dtype).removeprefix('torch.')}, more than this machine's "
                         f"{gib(have)} of memory; mix fewer experts")


def _models_to_mix(seed: DenseLM, experts, method: str, progress: bool) -> list[DenseLM]:
    """The dense models whose weights the mixture takes: the seed alone for sparse upcycling, else
    the seed and every expert (loaded, and checked to share the seed's architecture)."""
    from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

    if method == "sparse":
        return [seed]
    models = [seed] + [_as_model(m, f"experts[{i}]")
                       for i, m in enumerate(tqdm(experts, desc="load experts", disable=not progress))]
    check_compatible(models, ["seed"] + [f"experts[{i}]" for i in range(len(experts))])
    return models


def _mixture_config(seed: DenseLM, models: list[DenseLM], options: MixOptions, given: int) -> BamConfig:
    """The mixture's config: the seed's architecture, ``options``' routing and attention."""
    sparse = options.method == "sparse"
    E = len(models) if options.num_experts is None and not sparse else options.num_experts or given
    if E < len(models):
        raise ValueError(f"num_experts={E} is fewer than the {len(models)} models to mix (the seed and its "
                         f"experts); btx takes one FFN expert from each")
    top_k, normalize, straight_through = options.routing()
    dense_fields = {k: v for k, v in seed.config.__dict__.items() if k != "domain"}
    return BamConfig(**dense_fields, num_experts=E, top_k=top_k, normalize=normalize,
                     straight_through=straight_through, attention=options.attention_kind,
                     attention_top_k=options.attention_top_k,
                     load_balancing_alpha=options.load_balancing_alpha, z_loss_beta=options.z_loss_beta,
                     method=options.method,
                     expert_domains=[] if sparse else
                     [m.config.domain for m in models] + [None] * (E - len(models)))


class _Mixer:
    """Builds the mixture's tensors from the dense models' ``states`` (seed first), layer by layer."""

    def __init__(self, config: BamConfig, options: MixOptions, states: list[dict], fisher_states):
        self.config, self.options, self.states, self.fisher_states = config, options, states, fisher_states
        self.sparse = options.method == "sparse"
        self.generator = torch.Generator().manual_seed(options.router_seed)

    def average(self, key: str) -> torch.Tensor:
        if self.fisher_states is not None:
            return fisher_average([s[key] for s in self.states], [f[key] for f in self.fisher_states])
        return _mean([s[key] for s in self.states])

    def shared(self, key: str) -> torch.Tensor:
        return self.states[0][key] if self.sparse else self.average(key)

    def router(self) -> torch.Tensor:
        return torch.randn(self.config.num_experts, self.config.dim, generator=self.generator,
                           dtype=torch.float64) * 0.02

    def tensors(self, progress: bool) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

        config, tensors = self.config, {}
        for key in self.states[0]:
            if not key.startswith("model.layers."):
                if key == "lm_head.weight" and config.tie_embeddings:
                    continue
                tensors[key] = self.shared(key)
        for i in tqdm(range(config.n_layers), desc="mix layers", disable=not progress):
            p = f"model.layers.{i}."
            for key in self.states[0]:  # the block's norms, whichever the block has
                if key.startswith(p) and key.endswith("layernorm.weight"):
                    tensors[key] = self.shared(key)
            tensors.update(self.attention(p))
            # Sparse upcycling copies the seed's FFN into every expert; a BTX with more experts than
            # models fills the rest with copies of the seed's (the seed is expert 0).
            ffn = self.states + [self.states[0]] * (config.num_experts - len(self.states))
            tensors[p + "mlp.gate.weight"] = self.router()
            tensors[p + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([s[p + "mlp.gate_proj.weight"], s[p + "mlp.up_proj.weight"]], dim=0) for s in ffn])
            tensors[p + "mlp.experts.down_proj"] = torch.stack([s[p + "mlp.down_proj.weight"] for s in ffn])
        return tensors

    def attention(self, p: str) -> dict[str, torch.Tensor]:
        """The attention tensors of the layer whose keys start with ``p``: every tensor of the dense
        attention (projections, and the biases and query/key norms of the families that have them)."""
        config, options = self.config, self.options
        prefix = p + "self_attn."
        names = [k.removeprefix(prefix) for k in self.states[0] if k.startswith(prefix)]
        if options.method != "bam":
            return {prefix + name: self.shared(prefix + name) for name in names}
        shared_kv = config.attention == "shared-kv"
        experts = [{name: s[prefix + name] for name in names} for s in self.states]
        moa = MixtureOfAttention.from_dense_states(
            experts, config.n_heads, config.n_kv_heads, shared_kv=shared_kv, kv_init=options.kv_init,
            rope_theta=config.rope_theta, qk_norm=config.qk_norm, norm_eps=config.norm_eps,
            scale=config.attention_scale)
        out = {prefix + name: t.detach() for name, t in moa.named_parameters()
               if not name.startswith("router.")}
        if shared_kv and options.kv_init == "mean" and self.fisher_states is not None:
            for name in names:
                if name.startswith(("k_", "v_")):
                    out[prefix + name] = self.average(prefix + name)
        out[prefix + "router.weight"] = self.router()
        return out


def _common_tokenizer(models: list[DenseLM]):
    """The tokenizer the mixed models share (the seed's); refused when two of them carry different ones."""

    carried = [(i, m.tokenizer) for i, m in enumerate(models) if m.tokenizer is not None]
    for i, tok in carried[1:]:
        if not same(tok, carried[0][1]):
            first = "seed" if carried[0][0] == 0 else f"experts[{carried[0][0] - 1}]"
            raise ValueError(f"experts[{i - 1}] carries another tokenizer than the {first}; models mixed "
                             "together must share one")
    return carried[0][1] if carried else None

