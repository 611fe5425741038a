"""What a demo run is: its sizes and schedules (``DemoConfig``, ``FULL``, ``QUICK``), the mixtures of
the main table and the data each phase trains on."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DenseConfig
from ..data import DOMAINS
from ..options import positive_float, positive_int
from ..upcycle import FFN_ROUTINGS

METHODS = ("seed", "btx", "sparse", "bam-expert-kv", "bam-shared-kv", "bam-expert-kv-cm", "bam-shared-kv-cm",
           "btx-top2")
# Trained with the training FLOPs of top-1 BTX: name -> the mixture it is a shorter run of.
COMPUTE_MATCHED = {"bam-expert-kv-cm": "bam-expert-kv", "bam-shared-kv-cm": "bam-shared-kv"}


@dataclass
class DemoConfig:
    """Sizes and schedules of one demo run. Steps are optimizer steps of ``batch_size`` sequences
    of ``seq_len`` tokens; ``eval_windows`` held-out windows per domain are scored (all of them
    when None); ``general_fraction`` of each expert's data is the general mix; every mixture is
    trained ``seeds`` times (router initialisation and data order ``seed``, ``seed + 1``, ...);
    ``ffn_routing`` is the FFN routing of every top-1 mixture (``upcycle``'s)."""
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    seq_len: int = 128
    batch_size: int = 16
    seed_steps: int = 600
    expert_steps: int = 250
    mix_steps: int = 250
    seed_lr: float = 2e-3
    expert_lr: float = 1e-3
    mix_lr: float = 1e-3
    expert_domains: tuple[str, ...] = ("code", "math", "legal")
    general_fraction: float = 0.1
    eval_windows: int | None = 64
    diagnostic_windows: int = 8
    seed: int = 0
    seeds: int = 3
    ffn_routing: str = "straight-through"

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "seq_len", "batch_size",
                     "seed_steps", "expert_steps", "mix_steps", "diagnostic_windows", "seeds"):
            positive_int(name, getattr(self, name))
        if self.eval_windows is not None and (not isinstance(self.eval_windows, int)
                                              or self.eval_windows < 1):
            raise ValueError(f"eval_windows must be None or a positive int, got {self.eval_windows!r}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 (the inference cost decodes most of a window "
                             f"after a prompt of a quarter of it), got {self.seq_len}")
        for name in ("seed_lr", "expert_lr", "mix_lr"):
            positive_float(name, getattr(self, name))
        if not 0 <= self.general_fraction < 1:
            raise ValueError(f"general_fraction must be in [0, 1), got {self.general_fraction!r}")
        self.expert_domains = tuple(self.expert_domains)
        if not self.expert_domains or len(set(self.expert_domains)) != len(self.expert_domains) or not set(
                self.expert_domains) <= set(DOMAINS):
            raise ValueError(f"expert_domains must be distinct bundled domains {DOMAINS}, "
                             f"got {self.expert_domains!r}")
        if self.ffn_routing not in FFN_ROUTINGS:
            raise ValueError(f"ffn_routing must be one of {tuple(FFN_ROUTINGS)}, got {self.ffn_routing!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def seed_config(self, vocab_size: int, eos_token_id: int | None) -> DenseConfig:
        """The dense seed: a parallel-block Llama-family decoder with tied embeddings."""
        return DenseConfig(vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
                           block="parallel", tie_embeddings=True, eos_token_id=eos_token_id)


# The paper trains every mixture with top-1 FFN routing "unless otherwise stated": BTX, sparse
# upcycling and BAM share one top-1 routing (``DemoConfig.ffn_routing``: bam's default, the renormalised
# forward with the paper's router gradient, or the paper's own); BTX at top-2 (the BTX paper's own
# routing, twice the active FFN) is an extra row.


def top1(cfg: DemoConfig) -> dict:
    """upcycle's FFN routing arguments of the demo's top-1 mixtures."""
    return dict(top_k=1, ffn_routing=cfg.ffn_routing)


def mixtures(cfg: DemoConfig) -> dict[str, dict]:
    """The main table's mixtures: name -> upcycle arguments."""
    return {"btx": dict(method="btx", **top1(cfg)),
            "sparse": dict(method="sparse", **top1(cfg)),
            "bam-expert-kv": dict(method="bam", attention="expert-kv", **top1(cfg)),
            "bam-shared-kv": dict(method="bam", attention="shared-kv", **top1(cfg)),
            "btx-top2": dict(method="btx", top_k=2, ffn_routing="renormalized")}


FULL = DemoConfig()
# About a minute on 2 CPU cores: a quarter of the full run's tokens per phase at most, higher learning
# rates, 16 held-out windows a domain; the mixtures land in the full run's order.
QUICK = DemoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, seq_len=64, batch_size=16,
                   seed_steps=150, expert_steps=50, mix_steps=50, seed_lr=6e-3, expert_lr=3e-3,
                   mix_lr=2e-3, eval_windows=16, diagnostic_windows=2, seeds=1)


def mixture_spec(weights: dict[str, float]) -> str:
    """A ``--data`` mixture string from {domain: weight}, domains in the bundled order."""
    return ",".join(f"{d}:{weights[d]:.6g}" for d in DOMAINS if weights.get(d, 0) > 0)


def general_weights() -> dict[str, float]:
    return {d: 1 / len(DOMAINS) for d in DOMAINS}


def expert_data(domain: str, general_fraction: float) -> str:
    """The expert's own domain with ``general_fraction`` of the general mix."""
    w = {d: general_fraction * g for d, g in general_weights().items()}
    w[domain] += 1 - general_fraction
    return mixture_spec(w)


def mixture_data(expert_domains) -> str:
    """Equal parts of each expert domain and of the general mix (the paper's 25% each for three)."""
    part = 1 / (len(expert_domains) + 1)
    w = {d: part * g for d, g in general_weights().items()}
    for d in expert_domains:
        w[d] += part
    return mixture_spec(w)
