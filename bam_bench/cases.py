"""The benchmark cases, defined once: bam-bench's suites (moe.py, moa.py) and the pytest-benchmark
suite (test_*_bench.py) both read these lists, so a case added here is timed by both.

Each list is keyed by the kind of device (``device_kind``): CUDA cases fill an H100/H200 and pass
its L2; CPU cases finish in seconds on 2 cores. ``label`` is the case as bam-bench's tables name
it, ``id`` as the pytest ids do (no spaces, so ``-k`` can select it).
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "fwd+bwd")


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


@dataclass(frozen=True)
class MoECase:
    """A MoE FFN layer: model dim D, expert hidden F, E experts, top-k, renormalised or not."""
    name: str
    D: int
    F: int
    E: int
    k: int
    normalize: bool

    def label(self, T: int, mode: str | None = None) -> str:
        shape = f"{self.name} T={T} D={self.D} F={self.F} E={self.E} k={self.k}"
        return f"{shape} {mode}" if mode else shape

    def id(self, T: int) -> str:
        return f"{self.name.replace(' ', '-')}-T{T}"


@dataclass(frozen=True)
class MoACase:
    """Soft mixture of attention: q [B,T,E,H,Dh] over a KV cache [B,S,(E,)Hkv,Dh]; T == 1 decodes."""
    name: str
    B: int
    T: int
    S: int
    E: int
    H: int
    Hkv: int
    Dh: int
    expert_kv: bool

    @property
    def decode(self) -> bool:
        return self.T == 1

    def label(self, mode: str | None = None) -> str:
        """Decoding cases have one mode, forward, and their label names none."""
        if self.decode:
            return f"{self.name} B={self.B} cache={self.S} E={self.E} H={self.H} Hkv={self.Hkv} Dh={self.Dh}"
        shape = f"{self.name} B={self.B} T={self.T} E={self.E} H={self.H} Hkv={self.Hkv} Dh={self.Dh}"
        return f"{shape} {mode}" if mode else shape

    @property
    def id(self) -> str:
        return self.name.replace(" ", "-")


MOE = {
    "cuda": [MoECase("bam-small", 1024, 4096, 4, 1, False), MoECase("mixtral", 4096, 14336, 8, 2, True),
             MoECase("fine-grained", 2048, 768, 128, 8, True)],
    "cpu": [MoECase("cpu-target", 512, 1024, 8, 2, True), MoECase("cpu-bam-small", 256, 1024, 4, 1, False),
            MoECase("cpu-fine-grained", 256, 128, 32, 4, True)],
}
# Token counts each MoE case is timed at; bam-bench --quick on CUDA takes the first two.
MOE_TOKENS = {"cuda": [4096, 16384, 32768], "cpu": [512, 2048]}
# The whole-model rows: a 2-layer transformers Mixtral with these experts, [batch, tokens] per step.
MOE_MODEL = {"cuda": MOE["cuda"][0], "cpu": MOE["cpu"][0]}
MOE_MODEL_BATCH = {"cuda": (8, 2048), "cpu": (2, 1024)}
MODEL_VOCAB = 1024


def model_label(c: MoECase, B: int, T: int, mode: str) -> str:
    """How bam-bench moe's tables name a whole-model row (bam-bench only: the pytest-benchmark suite
    times layers and ops)."""
    return f"mixtral-model layers=2 B={B} T={T} D={c.D} F={c.F} E={c.E} k={c.k} {mode}"

MOA_TRAIN = {
    "cuda": [MoACase("bam-small shared-kv", 4, 2048, 2048, 4, 8, 8, 128, False),
             MoACase("bam-small expert-kv", 4, 2048, 2048, 4, 8, 8, 128, True),
             MoACase("2b-like shared-kv", 4, 2048, 2048, 4, 18, 6, 128, False)],
    "cpu": [MoACase("cpu bam-small shared-kv", 1, 256, 256, 4, 8, 8, 64, False),
            MoACase("cpu bam-small expert-kv", 1, 256, 256, 4, 8, 8, 64, True),
            MoACase("cpu 2b-like shared-kv", 1, 256, 256, 4, 6, 2, 64, False)],
}
MOA_DECODE = {
    "cuda": [MoACase("decode bam-small shared-kv", 16, 1, 4096, 4, 8, 8, 128, False),
             MoACase("decode bam-small expert-kv", 16, 1, 4096, 4, 8, 8, 128, True),
             MoACase("decode 2b-like shared-kv", 16, 1, 4096, 4, 18, 6, 128, False)],
    "cpu": [MoACase("cpu decode shared-kv", 4, 1, 1024, 4, 8, 8, 64, False),
            MoACase("cpu decode expert-kv", 4, 1, 1024, 4, 8, 8, 64, True)],
}
