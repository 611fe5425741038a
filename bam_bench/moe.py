"""bam-bench moe: the MoE FFN layer (router + experts), forward and forward+backward.

Providers, all on the same weights and tokens:
  bam              bam_model.nn.MoE on the device's default backend (triton on CUDA, torch on CPU)
  hf-eager         transformers' MixtralSparseMoeBlock, its per-expert loop (the Mixtral reference)
  hf-grouped_mm    the same block with transformers' grouped_mm experts implementation
  hf-bam           the same block with experts_implementation="bam" (bam_kernels.integrations)
  torch-grouped_mm a hand-written layer on torch._grouped_mm (sort, gather, two grouped GEMMs)
  dense-matmul     the same FLOPs as dense matmuls of the device's dtype: the ceiling to compare against

transformers' Mixtral router always renormalises the top-k; for BAM's unnormalised cases the hf
rows time that (equally costly) function.

The whole-model rows (``mixtral-model``) time a small transformers Mixtral, forward and
forward+backward of the loss, with its experts run by "eager", "grouped_mm" and "bam".
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

import bam_kernels as bk
from bam_kernels import reference
from bam_model.layers import MoE

from . import cases
from .common import agreement, check_close, guarded, rate, time_group

HF_IMPLEMENTATIONS = (("hf-eager", "eager"), ("hf-grouped_mm", "grouped_mm"), ("hf-bam", "bam"))


def _register_bam() -> bool:
    """Whether transformers can run experts_implementation="bam" (registering it)."""
    try:
        from bam_kernels import integrations  # noqa: PLC0415 (transformers: optional)
        integrations.register_transformers()
    except ImportError:
        return False
    return True


def _transformers_block(moe: MoE, implementation: str):
    try:
        from transformers import MixtralConfig  # noqa: PLC0415 (transformers: optional)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: PLC0415 (transformers: optional)
    except ImportError:
        return None
    if implementation == "bam" and not _register_bam():
        return None
    cfg = MixtralConfig(hidden_size=moe.dim, intermediate_size=moe.ffn_dim, num_local_experts=moe.num_experts,
                        num_experts_per_tok=moe.top_k, router_jitter_noise=0.0)
    cfg._experts_implementation = implementation
    p = next(moe.parameters())
    try:
        block = MixtralSparseMoeBlock(cfg).to(device=p.device, dtype=p.dtype)
        block.load_state_dict(moe.state_dict())
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as err:
        # Another transformers release (other layout or experts implementations): leave the peer out.
        print(f"  transformers' Mixtral block ({implementation}) left out: {str(err).splitlines()[0][:160]}")
        return None
    if implementation == "grouped_mm" and not _runs_op(block, moe.dim, "aten::_grouped_mm"):
        # A release that ignores the setting would time its eager loop under this peer's name.
        print("  transformers' Mixtral block (grouped_mm) left out: this release does not dispatch to it")
        return None
    return block


def _runs_op(module, dim: int, op: str) -> bool:
    """Whether one small forward of ``module`` calls the aten op ``op``."""
    p = next(module.parameters())
    x = torch.randn(1, 8, dim, device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad(), torch.profiler.profile() as prof:
            module(x)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return any(e.name == op for e in prof.events())


def grouped_mm_experts(x_TD, gate_up_E2FD, down_EDF, w_TK, idx_TK):
    """The experts as written on torch._grouped_mm: sort the (token, slot) pairs by expert, gather,
    two grouped GEMMs, weight and scatter-add. x [T, D] -> [T, D]."""
    k, E = idx_TK.shape[1], gate_up_E2FD.shape[0]
    order = torch.argsort(idx_TK.reshape(-1), stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(idx_TK.reshape(-1), minlength=E), 0).to(torch.int32)
    h = torch._grouped_mm(x_TD[tok], gate_up_E2FD.transpose(1, 2), offs)
    gate, up = h.chunk(2, -1)
    y = torch._grouped_mm(F.silu(gate) * up, down_EDF.transpose(1, 2), offs)
    y = y * w_TK.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x_TD).index_add_(0, tok, y)


class TorchGroupedMM(torch.nn.Module):
    """A MoE layer on torch._grouped_mm, the nearest peer built into PyTorch."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        m = self.moe
        x_TD = x.reshape(-1, m.dim)
        logits = F.linear(x_TD, m.gate.weight)
        probs = torch.softmax(logits, -1, dtype=torch.float32)
        w, idx = probs.topk(m.top_k, -1)
        if m.normalize:
            w = w / w.sum(-1, keepdim=True)
        return grouped_mm_experts(x_TD, m.experts.gate_up_proj, m.experts.down_proj, w, idx).reshape(x.shape)


def layer_providers(moe: MoE, device: str):
    """The layers timed against each other, on ``moe``'s weights: ``{name: module}``."""
    out = {"bam": moe}
    for name, impl in HF_IMPLEMENTATIONS:
        block = _transformers_block(moe, impl)
        if block is not None:
            out[name] = block
    out["torch-grouped_mm"] = TorchGroupedMM(moe)
    return out


def _dense_equivalent(T, D, Fh, k, dtype, device):
    """Dense matmuls with the FLOPs of the experts: [T*k, D] x [D, 2F], then [T*k, F] x [F, D]."""
    a = torch.randn(T * k, D, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(2 * Fh, D, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(D, Fh, device=device, dtype=dtype, requires_grad=True)
    a2 = torch.randn(T * k, Fh, device=device, dtype=dtype, requires_grad=True)

    def fwd():
        return a @ w1.T, a2 @ w2.T

    return fwd, (a, w1, w2, a2)


def flops(T, D, Fh, k):
    """The experts' forward FLOPs at T tokens (the router's are negligible)."""
    return 2 * T * k * D * 3 * Fh  # forward; backward is twice this


def _experts_agreement(moe: MoE, x, dy, gpu: bool) -> str:
    """moe_mlp on the default backend against the reference ops, on one routing (so that ties
    between bf16 router logits cannot send a token to different experts): output and every
    gradient. The autotuned kernels are the experts' GEMMs; routing has fixed blocks."""
    x_TD, dy_TD = x.reshape(-1, moe.dim), dy.reshape(-1, moe.dim)
    with torch.no_grad():
        w, idx = bk.route_topk(moe.gate(x_TD), moe.top_k, normalize=moe.normalize)

    def experts(backend=None):
        leaves = [t.detach().clone().requires_grad_() for t in
                  (x_TD, moe.experts.gate_up_proj, moe.experts.down_proj, w)]
        with bk.use_backend(backend) if backend else contextlib.nullcontext():
            out = bk.moe_mlp(*leaves, idx)
        return [out, *torch.autograd.grad(out, leaves, dy_TD)]

    return agreement(experts, lambda: experts("reference"), "reference ops", 3e-2 if gpu else 1e-4)


def new_moe(case: cases.MoECase, device: str, dtype) -> MoE:
    """The layer of one case, the same weights on every call (a router at std 0.02: balanced routing)."""
    torch.manual_seed(0)
    moe = MoE(case.D, case.F, case.E, top_k=case.k, normalize=case.normalize, device=device, dtype=dtype)
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    return moe


def layer_step(module, x, dy, mode: str):
    """One call of a MoE layer: its forward without autograd, or forward+backward to x and its weights."""
    xin = x.clone().requires_grad_(mode == "fwd+bwd")
    wrt = [xin, *module.parameters()]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                module(xin)
        else:
            # autograd.grad, not backward: no .grad accumulation inside the timing.
            torch.autograd.grad(module(xin), wrt, dy)

    return step


def run(device: str, quick: bool):
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    kind = cases.device_kind(device)
    token_counts = cases.MOE_TOKENS[kind][:2] if (gpu and quick) else cases.MOE_TOKENS[kind]
    for c in cases.MOE[kind]:
        D, Fh, E, k = c.D, c.F, c.E, c.k
        moe = new_moe(c, device, dtype)
        providers = layer_providers(moe, device)
        for T in token_counts:
            x = torch.randn(1, T, D, device=device, dtype=dtype)
            dy = torch.randn(1, T, D, device=device, dtype=dtype)
            for mode in cases.MODES:
                total = flops(T, D, Fh, k) * (3 if mode == "fwd+bwd" else 1)
                steps = {pname: layer_step(module, x, dy, mode) for pname, module in providers.items()}
                # The ceiling: the experts' FLOPs as plain dense matmuls.
                fwd, leaves = _dense_equivalent(T, D, Fh, k, dtype, device)
                g1 = torch.randn(T * k, 2 * Fh, device=device, dtype=dtype)
                g2 = torch.randn(T * k, D, device=device, dtype=dtype)

                def dense_step(fwd=fwd, leaves=leaves, g1=g1, g2=g2, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            fwd()
                    else:
                        o1, o2 = fwd()
                        torch.autograd.grad([o1, o2], leaves, [g1, g2])

                steps["dense-matmul"] = dense_step
                timings = time_group(steps, device, quick)
                agree = {}
                if mode == "fwd+bwd":
                    agree["agreement"] = _experts_agreement(moe, x, dy, gpu)
                for pname, t in timings.items():
                    yield {"case": c.label(T, mode), "provider": pname, **t,
                           **rate(t, "tflops", total / 1e12), **(agree if pname == "bam" else {}),
                           "dtype": str(dtype).replace("torch.", ""), "T": T, "D": D, "F": Fh, "E": E, "k": k}
                del steps, leaves
            del x, dy
        del moe, providers
        if gpu:
            torch.cuda.empty_cache()
    yield from model_rows(device, quick)


def _mixtral_models(c: cases.MoECase, device: str, dtype) -> dict:
    """A small transformers Mixtral with ``c``'s experts (2 layers), one copy per experts
    implementation: ``{provider: model}``; {} without transformers."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM  # noqa: PLC0415 (transformers: optional)
    except ImportError:
        return {}
    cfg = MixtralConfig(vocab_size=cases.MODEL_VOCAB, hidden_size=c.D, intermediate_size=c.F,
                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        num_local_experts=c.E, num_experts_per_tok=c.k, router_jitter_noise=0.0,
                        max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = MixtralForCausalLM(cfg).to(device=device, dtype=dtype)
    models = {}
    for name, impl in HF_IMPLEMENTATIONS:
        if impl == "bam" and not _register_bam():
            continue
        model = copy.deepcopy(base)
        try:
            model.set_experts_implementation(impl)
        except (ValueError, KeyError, ImportError) as err:
            print(f"  transformers' Mixtral model ({impl}) left out: {str(err).splitlines()[0][:160]}")
            continue
        models[name] = model
    return models


def _model_step(model, ids, mode: str):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(input_ids=ids)
        else:
            torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)

    return step


def model_rows(device: str, quick: bool):
    """Whole small Mixtral models, their experts run by each transformers implementation."""
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    c = cases.MOE_MODEL[cases.device_kind(device)]
    B, T = cases.MOE_MODEL_BATCH[cases.device_kind(device)]
    models = _mixtral_models(c, device, dtype)
    if not models:
        return
    ids = torch.randint(0, cases.MODEL_VOCAB, (B, T), device=device)
    for mode in cases.MODES:
        timings = time_group({name: _model_step(m, ids, mode) for name, m in models.items()}, device, quick)
        for pname, t in timings.items():
            yield {"case": cases.model_label(c, B, T, mode),
                   "provider": pname, **t, **rate(t, "tokens_per_s", B * T),
                   "dtype": str(dtype).replace("torch.", ""), "T": B * T, "D": c.D, "F": c.F, "E": c.E,
                   "k": c.k}
    del models


def _check_ops(device: str, dtype, T, D, Fh, E, k, tol, vs: str = "reference"):
    """moe_mlp, route_topk and grouped_mm on ``device`` against the float64 reference on the CPU
    (``vs="reference"``) or, for sizes the reference loop cannot afford, against the torch path
    in float32 on the same device."""
    lines = []
    g = torch.Generator(device="cpu").manual_seed(T + D)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * Fh, D, generator=g) / D ** 0.5
    down = torch.randn(E, D, Fh, generator=g) / Fh ** 0.5
    logits = torch.randn(T, E, generator=g)
    dy = torch.randn(T, D, generator=g)
    dev = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (x, gate_up, down)]
    dlogits = logits.to(device, copy=True).requires_grad_()
    w, idx = bk.route_topk(dlogits, k, normalize=False)
    y = bk.moe_mlp(*dev, w, idx)
    y.backward(dy.to(device=device, dtype=dtype))
    if vs == "reference":
        ref = [t.to(dtype).double().requires_grad_() for t in (x, gate_up, down)]
        rlogits = logits.double().requires_grad_()
        rw, ridx = reference.route_topk(rlogits, k)
        if not torch.equal(ridx, idx.cpu()):
            lines.append(f"FAIL route_topk T={T} E={E} k={k}: picked other experts than the reference")
        ry = reference.moe_mlp(*ref, rw, ridx)
        ry.backward(dy.double())
    else:
        ref = [t.to(device=device, dtype=dtype).float().requires_grad_() for t in (x, gate_up, down)]
        rlogits = logits.to(device, copy=True).requires_grad_()
        with bk.use_backend("torch"):
            rw, ridx = bk.route_topk(rlogits, k)
            ry = bk.moe_mlp(*ref, rw, ridx)
        ry.backward(dy.to(device).float())
    tag = f"moe_mlp {str(dtype).replace('torch.', '')} T={T} D={D} F={Fh} E={E} k={k} (T*k*D={T * k * D:.2e})"
    lines.append(check_close(f"{tag} out", y, ry, tol))
    for name, a, b in zip(("dx", "d_gate_up", "d_down"), dev, ref):
        lines.append(check_close(f"{tag} {name}", a.grad, b.grad, tol))
    lines.append(check_close(f"{tag} d_logits", dlogits.grad, rlogits.grad, tol))
    return lines


def _check_grouped_mm(device, dtype, tol):
    g = torch.Generator(device="cpu").manual_seed(7)
    M, K, N, E = 1000, 136, 264, 7
    counts = torch.randint(0, 300, (E,), generator=g)
    counts[2] = 0
    offs = torch.cumsum(counts, 0).clamp(max=M - 13).to(torch.int32)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g) / K ** 0.5
    dy = torch.randn(M, N, generator=g)
    xd, wd = x.to(device, dtype, copy=True).requires_grad_(), w.to(device, dtype, copy=True).requires_grad_()
    y = bk.grouped_mm(xd, wd, offs.to(device))
    y.backward(dy.to(device, dtype))
    xr, wr = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
    yr = reference.grouped_mm(xr, wr, offs)
    yr.backward(dy.double())
    tag = f"grouped_mm {str(dtype).replace('torch.', '')} M={M} K={K} N={N} E={E}"
    return [check_close(f"{tag} out", y, yr, tol), check_close(f"{tag} dx", xd.grad, xr.grad, tol),
            check_close(f"{tag} dw", wd.grad, wr.grad, tol)]


def check(device: str):
    if device.startswith("cuda"):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)):
            name = str(dtype).replace("torch.", "")
            yield from guarded(f"moe_mlp {name}", device, _check_ops, device, dtype, 1023, 264, 392, 9, 2,
                               tol)
            yield from guarded(f"grouped_mm {name}", device, _check_grouped_mm, device, dtype, tol)
        yield from guarded("moe_mlp bfloat16 E=128 k=8", device, _check_ops, device, torch.bfloat16,
                           4099, 1032, 520, 128, 8, 1e-2)
        # int64 indexing: 140k tokens x k 8 x D 2048 passes 2^31 elements in the gathered rows.
        yield from guarded("moe_mlp bfloat16 int64", device, _check_ops, device, torch.bfloat16,
                           140_000, 2048, 256, 16, 8, 1e-2, vs="torch")
    else:
        yield from guarded("moe_mlp float32", device, _check_ops, device, torch.float32, 257, 72, 136, 8, 2,
                           1e-5)
        yield from guarded("grouped_mm float32", device, _check_grouped_mm, device, torch.float32, 1e-5)
