"""bam-bench moa: soft mixture-of-attention, training (forward, forward+backward) and decoding.

Providers, all on the same q, k, v and mix:
  bam          bk.moa_attention on the device's default backend (triton on CUDA, torch on CPU: SDPA
               too, but decoding packs the query heads of a KV head into one attention's rows)
  reference    the plain definition: softmax materialised as a [B, E, H, T, S] tensor, same dtype
  sdpa+mix     PyTorch's scaled_dot_product_attention on the stacked E*H query heads (enable_gqa),
               then a separate pass multiplying by the mix
  flash+mix    flash-attention's kernel on the stacked heads plus the mix pass (when flash_attn imports)
  copy         (GPU, decode) a device copy of as many bytes as the KV cache: the bandwidth ceiling

Rates: TFLOP/s for training (causal forward counts half of the 4*B*T*S*E*H*Dh; forward+backward
3.5x the forward), GB/s of KV cache read for decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import bam_kernels as bk
from bam_kernels import reference
from bam_kernels._torch.attention import stacked_heads as _stacked_heads
from bam_kernels._torch.attention import unstack_heads as _unstack_heads

from . import cases
from .common import agreement, attempt, check_close, guarded, rate, sync, time_group


def _inputs(B, T, S, E, H, Hkv, Dh, expert_kv, dtype, device, grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q = torch.randn(B, T, E, H, Dh, generator=g)
    k, v = torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    mix = torch.softmax(torch.randn(B, T, E, generator=g), -1)
    out = [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [mix.to(device)]
    return [t.requires_grad_(grad) for t in out]


def _sdpa(q, k, v, mix, causal):
    """The peer as it is usually written: stacked heads through SDPA's GQA, then the mix. (The
    benchmarks call it with S == T when causal, where SDPA's top-left causal mask is the right one.)"""
    q_BNTD, k_BGSD, v_BGSD = _stacked_heads(q, k, v)
    o = F.scaled_dot_product_attention(q_BNTD, k_BGSD, v_BGSD, is_causal=causal, enable_gqa=True)
    return _unstack_heads(o, q.shape, k.shape[-2], k.dim() == 5) * mix.to(q.dtype)[..., None, None]


def _flash(q, k, v, mix, causal):
    from flash_attn import flash_attn_func  # noqa: PLC0415 (flash-attn: optional)
    q_BNTD, k_BGSD, v_BGSD = _stacked_heads(q, k, v)
    o = flash_attn_func(q_BNTD.transpose(1, 2), k_BGSD.transpose(1, 2), v_BGSD.transpose(1, 2), causal=causal)
    o = _unstack_heads(o.transpose(1, 2), q.shape, k.shape[-2], k.dim() == 5)
    return o * mix.to(q.dtype)[..., None, None]


def providers(device: str):
    """The attentions timed against each other: ``{name: fn(q, k, v, mix, causal)}``."""
    out = {"bam": lambda q, k, v, mix, causal: bk.moa_attention(q, k, v, mix, causal=causal),
           "reference": lambda q, k, v, mix, causal: reference.moa_attention(q, k, v, mix, causal),
           "sdpa+mix": _sdpa}
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401, PLC0415 (probes whether flash-attn is installed)
            out["flash+mix"] = _flash
        except ImportError:
            pass
    return out


def _meta(B, T, S, E, H, Hkv, Dh, expert_kv, dtype):
    return {"dtype": str(dtype).replace("torch.", ""), "B": B, "T": T, "S": S, "E": E, "H": H, "Hkv": Hkv,
            "Dh": Dh, "kv": "expert" if expert_kv else "shared"}


def _copy_row(nbytes: int, device: str, quick: bool, case: str):
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = attempt(lambda: dst.copy_(src), device, quick)
    # A copy reads and writes: its bytes moved are twice the cache it stands in for.
    return {"case": case, "provider": "copy", **t, **rate(t, "gbps", 2 * nbytes / 1e9)}


def case_inputs(c: cases.MoACase, dtype, device, grad=False):
    """q, k, v, mix of one case (the same on every call)."""
    return _inputs(c.B, c.T, c.S, c.E, c.H, c.Hkv, c.Dh, c.expert_kv, dtype, device, grad=grad)


def train_flops(c: cases.MoACase, mode: str) -> float:
    """Causal forward counts half of the 4*B*T*S*E*H*Dh; forward+backward 3.5x the forward."""
    return 4 * c.B * c.T * c.S * c.E * c.H * c.Dh / 2 * (3.5 if mode == "fwd+bwd" else 1.0)


def kv_bytes(k: torch.Tensor) -> int:
    """Bytes of the KV cache a decoding step reads: k and v."""
    return 2 * k.numel() * k.element_size()


def attention_step(fn, q, k, v, mix, do, mode: str):
    """One causal training call of ``fn``: forward without autograd, or forward+backward to q, k, v, mix."""
    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, mix, True)
        else:
            torch.autograd.grad(fn(q, k, v, mix, True), (q, k, v, mix), do)

    return step


def decode_step(fn, q, k, v, mix):
    # One query sees the whole cache: causal=False is the same function, and lets SDPA and
    # flash-attention run without a mask.
    def step():
        with torch.no_grad():
            fn(q, k, v, mix, q.shape[1] > 1)

    return step


def run(device: str, quick: bool):
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    kind = cases.device_kind(device)
    fns = providers(device)
    for c in cases.MOA_TRAIN[kind]:
        meta = _meta(c.B, c.T, c.S, c.E, c.H, c.Hkv, c.Dh, c.expert_kv, dtype)
        for mode in cases.MODES:
            q, k, v, mix = case_inputs(c, dtype, device, grad=mode == "fwd+bwd")
            do = torch.randn(q.shape, device=device, dtype=dtype)
            steps = {pname: attention_step(fn, q, k, v, mix, do, mode) for pname, fn in fns.items()}
            timings = time_group(steps, device, quick)
            agree = {}
            if mode == "fwd+bwd":
                def grads(fn, q=q, k=k, v=v, mix=mix, do=do):
                    out = fn(q, k, v, mix, True)
                    return [out, *torch.autograd.grad(out, (q, k, v, mix), do)]

                agree["agreement"] = agreement(lambda: grads(fns["bam"]), lambda: grads(fns["sdpa+mix"]),
                                               "sdpa+mix", 3e-2 if gpu else 1e-4)
            for pname, t in timings.items():
                yield {"case": c.label(mode), "provider": pname, **t,
                       **rate(t, "tflops", train_flops(c, mode) / 1e12), **(agree if pname == "bam" else {}),
                       **meta}
            del q, k, v, mix, do, steps
            if gpu:
                torch.cuda.empty_cache()
    for c in cases.MOA_DECODE[kind]:
        meta = _meta(c.B, c.T, c.S, c.E, c.H, c.Hkv, c.Dh, c.expert_kv, dtype)
        q, k, v, mix = case_inputs(c, dtype, device)
        steps = {pname: decode_step(fn, q, k, v, mix) for pname, fn in fns.items()}
        for pname, t in time_group(steps, device, quick).items():
            yield {"case": c.label(), "provider": pname, **t, **rate(t, "gbps", kv_bytes(k) / 1e9), **meta}
        if gpu:
            yield {**_copy_row(kv_bytes(k), device, quick, c.label()), **meta}
        del q, k, v, mix


def _check_case(device, dtype, B, T, S, E, H, Hkv, Dh, expert_kv, causal, kv_lens, tol, seed=1):
    """bam on ``device`` against the float64 reference on the CPU: output and the four gradients."""
    q, k, v, mix = _inputs(B, T, S, E, H, Hkv, Dh, expert_kv, torch.float32, "cpu", seed=seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    kvl = None if kv_lens is None else torch.tensor(kv_lens)
    dev = [t.to(device=device, dtype=dtype if t is not mix else torch.float32).requires_grad_()
           for t in (q, k, v, mix)]
    o = bk.moa_attention(*dev, causal=causal, kv_lens=None if kvl is None else kvl.to(device))
    grads = torch.autograd.grad(o, dev, do.to(device=device, dtype=dtype))
    ref = [t.to(dtype).double().requires_grad_() if t is not mix else t.double().requires_grad_()
           for t in (q, k, v, mix)]
    ro = reference.moa_attention(*ref, causal, None, kvl)
    rgrads = torch.autograd.grad(ro, ref, do.to(dtype).double())
    kind = f"{'expert' if expert_kv else 'shared'}-kv"
    kind += f"{' causal' if causal else ''}{' ragged' if kv_lens else ''}"
    tag = (f"moa_attention {str(dtype).replace('torch.', '')} B={B} T={T} S={S} E={E} H={H} Hkv={Hkv} "
           f"Dh={Dh} {kind}")
    lines = [check_close(f"{tag} out", o, ro, tol)]
    for name, a, b in zip(("dq", "dk", "dv", "dmix"), grads, rgrads):
        lines.append(check_close(f"{tag} {name}", a, b, tol))
    return lines


def _check_int64(device, B: int = 64, S: int = 65536):
    """A KV cache of 2^32 elements (bf16, 8.6 GB each for k and v): batch offsets pass 2^31. The last
    batch row is checked, forward and dk/dv, against the float64 reference of that row alone."""
    E, H, Hkv, Dh = 4, 8, 8, 128
    g = torch.Generator(device=device).manual_seed(3)
    k = torch.randn(B, S, Hkv, Dh, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(B, S, Hkv, Dh, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    q = torch.randn(B, 1, E, H, Dh, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    mix = torch.softmax(torch.randn(B, 1, E, device=device, generator=g), -1).requires_grad_()
    do = torch.randn(q.shape, device=device, dtype=torch.bfloat16, generator=g)
    o = bk.moa_attention(q, k, v, mix)
    dk, dv = torch.autograd.grad(o, (k, v), do)
    sync(device)
    last = [t[-1:].detach().double().cpu().requires_grad_() for t in (q, k, v, mix)]
    ro = reference.moa_attention(*last, True)
    rdk, rdv = torch.autograd.grad(ro, last[1:3], do[-1:].double().cpu())
    tag = f"moa_attention bf16 int64 offsets B={B} cache={S} (k: {k.numel():.2e} elements), last row"
    lines = [check_close(f"{tag} out", o[-1:], ro, 1e-2), check_close(f"{tag} dk", dk[-1:], rdk, 1e-2),
             check_close(f"{tag} dv", dv[-1:], rdv, 1e-2)]
    del k, v, q, dk, dv
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return lines


def check(device: str):
    case = lambda label, *args: guarded(f"moa_attention {label}", device, _check_case, device, *args)
    if device.startswith("cuda"):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)):
            name = str(dtype).replace("torch.", "")
            yield from case(f"{name} shared-kv", dtype, 2, 300, 300, 4, 4, 2, 128, False, True, None, tol)
            yield from case(f"{name} expert-kv ragged", dtype, 3, 77, 333, 4, 6, 2, 64, True, True,
                            [333, 100, 77], tol)
            yield from case(f"{name} expert-kv not causal", dtype, 2, 129, 129, 2, 4, 4, 128, True, False,
                            None, tol)
        # Decoding: one query against a long cache takes the split-KV path.
        yield from case("bfloat16 decode", torch.bfloat16, 4, 1, 4096, 4, 8, 8, 128, False, True,
                        [4096, 1000, 1, 2500], 1e-2)
        yield from case("bfloat16 decode 3 queries", torch.bfloat16, 2, 3, 3000, 4, 8, 2, 128, True, True,
                        [3000, 17], 1e-2)
        yield from guarded("moa_attention bfloat16 int64", device, _check_int64, device)
    else:
        yield from case("float32 shared-kv ragged", torch.float32, 2, 100, 120, 4, 4, 2, 64, False, True,
                        [120, 57], 1e-5)
        yield from case("float32 decode expert-kv", torch.float32, 2, 1, 512, 4, 4, 2, 64, True, True,
                        None, 1e-5)
