"""bam-bench model: the whole BAM causal LM.

Training step (forward + backward of the loss), tokens/s, on the same weights and tokens:
  bam        the default backend (triton on CUDA, torch on CPU)
  reference  the same model with every op on bam_kernels' reference definitions
  dense      the dense seed the mixture was built from (the cost of one expert)
Generation with a KV cache (greedy), tokens/s: shared-KV and expert-KV mixtures and the dense seed.
"""
from __future__ import annotations

import copy

import torch

import bam_kernels as bk
from bam_model import DenseConfig, DenseLM
from bam_model.upcycle import upcycle

from .common import check_close, guarded, rate, time_group

# vocab, dim, layers, heads, kv heads, ffn, experts
GPU_MODEL = (32000, 1024, 8, 16, 4, 2816, 4)
CPU_MODEL = (8192, 256, 4, 8, 2, 512, 4)
GPU_TRAIN = [(8, 1024)]  # (batch, tokens)
CPU_TRAIN = [(4, 128)]
GPU_GEN = [(1, 128, 128), (16, 128, 128)]  # (batch, prompt, new tokens)
CPU_GEN = [(1, 32, 32), (8, 32, 32)]


def _models(device: str, dtype, size, attentions=("expert-kv", "shared-kv")):
    V, D, L, H, Hkv, Fh, E = size
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, ffn_dim=Fh,
                      max_seq_len=4096)
    dense = [DenseLM(cfg) for _ in range(E)]
    mixes = {a: upcycle(dense[0], dense[1:], attention=a, dtype=dtype).to(device) for a in attentions}
    return dense[0].to(device=device, dtype=dtype), mixes


def _check_backend(model, device: str, tol: float, label: str) -> list[str]:
    """Loss, logits and every gradient on the default backend against the reference ops."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 37), generator=g).to(device)
    results = []
    for backend in (None, "reference"):
        model.zero_grad(set_to_none=True)
        if backend is None:
            out = model(x, labels=x)
        else:
            with bk.use_backend(backend):
                out = model(x, labels=x)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
    lines = [check_close(f"{label} logits", logits, ref_logits, tol),
             check_close(f"{label} loss", loss, ref_loss, tol)]
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    lines.append(check_close(f"{label} grads (worst: {worst})", grads[worst], ref_grads[worst], tol))
    return lines


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_cache(model, device: str, tol: float, label: str) -> str:
    x = torch.randint(0, model.config.vocab_size, (3, 21), device=device)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :13], cache=cache).logits] + [model(x[:, t:t + 1], cache=cache).logits
                                                           for t in range(13, 21)]
    return check_close(f"{label} cached decoding vs full forward", torch.cat(steps, 1), full, tol)


def _check_bf16(model, device: str, vocab: int, label: str) -> list[str]:
    x = torch.randint(0, vocab, (2, 37), device=device)
    with torch.no_grad():
        loss32 = model(x, labels=x).loss
        loss16 = copy.deepcopy(model).to(torch.bfloat16)(x, labels=x).loss
    return [check_close(f"{label} bfloat16 loss vs float32", loss16, loss32, 2e-2)]


def _check_identical(dense, device: str, vocab: int) -> list[str]:
    same = upcycle(dense, [dense, dense], attention="shared-kv", top_k=3).to(device)
    x = torch.randint(0, vocab, (2, 19), device=device)
    with torch.no_grad():
        return [check_close("identical experts == dense float32", same(x).logits, dense(x).logits, 1e-4)]


def check(device: str):
    """float32: the default backend against the reference ops (logits, loss, every gradient) and
    cached decoding against the full forward; bf16 (GPU): the loss against float32's; a mixture of
    identical models against the dense model."""
    size = (1000, 128, 2, 4, 2, 160, 4)
    dense, mixes = _models(device, torch.float32, size)
    for attention, model in mixes.items():
        label = f"bam {attention} float32"
        yield from guarded(f"{label} vs reference", device, _check_backend, model, device, 1e-4, label)
        yield from guarded(f"{label} cache", device,
                           lambda m=model, lb=label: [_check_cache(m, device, 1e-4, lb)])
        if device.startswith("cuda"):
            yield from guarded(f"bam {attention} bfloat16", device, _check_bf16, model, device, size[0],
                               f"bam {attention}")
    yield from guarded("identical experts", device, _check_identical, dense, device, size[0])


def _train_rows(device, dtype, size, batches, quick):
    dense, mixes = _models(device, dtype, size)
    V, D, L, H, Hkv, Fh, E = size
    for B, T in batches:
        x = torch.randint(0, V, (B, T), device=device)
        providers = [("dense", dense, None)]
        for attention, model in mixes.items():
            providers += [(f"bam {attention}", model, None), (f"reference {attention}", model, "reference")]
        case = f"train fwd+bwd B={B} T={T} D={D} L={L} E={E}"
        steps = {}
        for pname, model, backend in providers:
            def step(model=model, backend=backend, x=x):
                model.zero_grad(set_to_none=True)
                if backend is None:
                    model(x, labels=x).loss.backward()
                else:
                    with bk.use_backend(backend):
                        model(x, labels=x).loss.backward()

            steps[pname] = step
        timings = time_group(steps, device, quick)
        for pname, model, _backend in providers:
            t = timings[pname]
            yield {"case": case, "provider": pname, **t, **rate(t, "tokens_per_s", B * T),
                   "dtype": str(dtype).replace("torch.", ""), "B": B, "T": T, "D": D, "layers": L,
                   "experts": E, "params": sum(p.numel() for p in model.parameters())}
            model.zero_grad(set_to_none=True)


def _generate_rows(device, dtype, size, cases, quick):
    dense, mixes = _models(device, dtype, size)
    V, D, L, H, Hkv, Fh, E = size
    for B, P, N in cases:
        prompt = torch.randint(0, V, (B, P), device=device)
        case = f"generate B={B} prompt={P} new={N} D={D} L={L} E={E}"
        models = [("dense", dense)] + [(f"bam {a}", m) for a, m in mixes.items()]
        timings = time_group({pname: lambda model=model, prompt=prompt, N=N: model.generate(prompt, N)
                              for pname, model in models}, device, quick)
        for pname, model in models:
            cache = model.new_cache()
            with torch.no_grad():
                model(prompt, cache=cache)
            cache_bytes = sum(2 * cache.layer(i)[0].numel() * cache.layer(i)[0].element_size()
                              for i in range(L))
            t = timings[pname]
            yield {"case": case, "provider": pname, **t, **rate(t, "tokens_per_s", B * N),
                   "kv_cache_bytes_per_token": cache_bytes // (B * P),
                   "dtype": str(dtype).replace("torch.", ""), "B": B, "prompt": P, "new_tokens": N}


def run(device: str, quick: bool):
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    size = GPU_MODEL if gpu else CPU_MODEL
    train = GPU_TRAIN if gpu else CPU_TRAIN
    gen = GPU_GEN if gpu else CPU_GEN
    yield from _train_rows(device, dtype, size, train, quick)
    yield from _generate_rows(device, dtype, size, gen[:1] if quick else gen, quick)
