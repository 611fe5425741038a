"""Grouped expert GEMMs and the fused MoE SwiGLU FFN, with autograd, on every backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, reference
from ._dispatch import autocast_to, backend_for, call_directly, needs_grad
from .routing import check_expert_ids, routing_plan

# ---------------------------------------------------------------------------------------------
# grouped_mm


def _check_grouped_mm(x, w, offs):
    _checks.tensor("x", x, ndim=2, floating=True)
    _checks.tensor("w", w, ndim=3, floating=True)
    _checks.tensor("offs", offs, ndim=1, floating=False)
    E, N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"x must have shape [M, K] with K = w.shape[2] = {K}, got {tuple(x.shape)}")
    if offs.shape[0] != E:
        raise ValueError(f"offs must have shape [E] with E = w.shape[0] = {E}, got {tuple(offs.shape)}")
    _checks.same_dtype({"x": x, "w": w})
    _checks.same_device({"x": x, "w": w, "offs": offs})
    if not offs.is_cuda and E > 0:
        bad = (offs < 0) | (offs > x.shape[0])
        if E > 1:
            bad[1:] |= offs[1:] < offs[:-1]
        if bool(bad.any()):
            raise ValueError(f"offs must be non-decreasing row ends in [0, M={x.shape[0]}], got {offs.tolist()}")


def _segments(offs_E: torch.Tensor, empty: bool = False):
    """(expert, first row, end row) of every expert with rows (``empty``: of every expert) from
    cumulative row ends."""
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start or empty:
            yield e, start, end
        start = end


_native_gmm: dict = {}


def _gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert matmuls over row groups, in one call.

    b [E, K, N]: rows ``offs[e-1]:offs[e]`` of a [M, K] times b[e] -> [M, N].
    b [M, N] (2-D): a [K, M] with its columns grouped -> [E, K, N], ``a[:, rows] @ b[rows]``.
    Rows past ``offs[-1]`` give zeros; an expert without rows gives zeros. torch._grouped_mm where
    this torch has it for the device and dtype (one parallel region instead of one per expert,
    which matters on a busy CPU), else a loop over the experts.
    """
    # What torch._grouped_mm refuses is remembered per device, dtype and alignment: it needs 16-byte
    # aligned strides, so one odd-sized call must not turn it off for the aligned calls after it.
    key = (a.device.type, a.dtype, _aligned16(a) and _aligned16(b))
    if _native_gmm.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            out = torch._grouped_mm(a, b, offs_E)
            _native_gmm[key] = True
            return _zero_tail(out, offs_E) if b.dim() == 3 else out
        except (RuntimeError, NotImplementedError):
            _native_gmm[key] = False
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[2])
        for e, lo, hi in _segments(offs_E):
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
        return out
    out = a.new_zeros(offs_E.numel(), a.shape[0], b.shape[1])
    for e, lo, hi in _segments(offs_E):
        torch.mm(a[:, lo:hi], b[lo:hi], out=out[e])
    return out


def _aligned16(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on 16 bytes and every stride of a dimension longer than 1 (but a unit
    one) is a multiple of 16 bytes."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st == 1 or n == 1 or (st * size) % 16 == 0
                                          for st, n in zip(t.stride(), t.shape))


def _zero_tail(t_M, offs_E):
    """Zero the rows past the last offset (none when every id was valid)."""
    end = int(offs_E[-1]) if offs_E.numel() else 0
    if end < t_M.shape[0]:
        t_M[end:].zero_()
    return t_M


def _unsort_sum(rows_MD, slots_M, T: int, k: int):
    """Rows in expert order back to (token, slot) order, then the k slots of each token summed:
    a permutation and a reduction, where index_add_ would serialise on repeated tokens. Rows past
    the last offset (unchecked bad ids) are gathered like any other."""
    row_of_slot = torch.empty_like(slots_M)
    row_of_slot[slots_M] = torch.arange(slots_M.numel(), device=slots_M.device)
    by_slot = rows_MD.index_select(0, row_of_slot)  # a gather: contiguous writes, parallel
    return by_slot.view(T, k, rows_MD.shape[1]).sum(1)


def _grouped_mm_torch(x_MK, w_ENK, offs_E):
    return _gmm(x_MK, w_ENK.transpose(1, 2), offs_E.to(torch.int32))


def _grouped_mm_triton(x_MK, w_ENK, offs_E):
    from ._triton.grouped_gemm import launch_gemm
    E, N, K = w_ENK.shape
    y_MN = torch.empty(x_MK.shape[0], N, device=x_MK.device, dtype=x_MK.dtype)
    return launch_gemm(x_MK, w_ENK, w_ENK.stride(), N, K, offs_E.to(torch.int32).contiguous(), y_MN)


def _grouped_mm_impl(x, w, offs, backend: str):
    return (_grouped_mm_triton if backend == "triton" else _grouped_mm_torch)(x, w, offs)


@torch.library.custom_op("bam::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    return _grouped_mm_impl(x, w, offs, backend)


@_grouped_mm_op.register_fake
def _(x, w, offs, backend):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("bam::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                            need_dx: bool, need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); a gradient not asked for comes back as an empty tensor."""
    E, N, K = w.shape
    dx = x.new_empty(0)
    dw = w.new_empty(0)
    if backend == "triton":
        from ._triton.grouped_gemm import launch_gemm, launch_wgrad
        offs = offs.to(torch.int32).contiguous()
        if need_dx:
            dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            sw = w.stride()
            launch_gemm(dy, w, (sw[0], sw[2], sw[1]), K, N, offs, dx)
        if need_dw:
            dw = torch.empty(w.shape, device=w.device, dtype=w.dtype)
            launch_wgrad(dy, x, dw, dw.stride(), N, K, offs)
        return dx, dw
    offs = offs.to(torch.int32)
    if need_dx:
        dx = _gmm(dy, w, offs)
    if need_dw:
        dw = _gmm(dy.T, x, offs)
    return dx, dw


@_grouped_mm_backward_op.register_fake
def _(dy, x, w, offs, need_dx, need_dw, backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            w.new_empty(w.shape) if need_dw else w.new_empty(0))


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offs, ctx.backend = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_grad(ctx, dy):
    x, w, offs = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.bam.grouped_mm_backward(dy.contiguous(), x, w, offs, need_dx, need_dw, ctx.backend)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


torch.library.register_autograd("bam::grouped_mm", _grouped_mm_grad, setup_context=_grouped_mm_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by expert, times each expert's weight.

    x [M, K] with the rows of expert e at ``offs[e-1]:offs[e]``; w [E, N, K]; offs [E] integer
    cumulative row ends. Returns [M, N] with ``y[rows of e] = x[rows of e] @ w[e].T``; rows past
    ``offs[-1]`` are zero. Differentiable in x and w; an expert without rows gets a zero gradient.
    Inside an autocast region x and w run in its dtype, as F.linear would.
    Registered as ``torch.ops.bam.grouped_mm``, so ``torch.compile`` sees one op; the backward
    runs on the backend the forward ran on.
    """
    x, w = autocast_to(x, w)
    _check_grouped_mm(x, w, offs)
    backend = backend_for(x, w)
    if backend == "reference":
        return reference.grouped_mm(x, w, offs)
    if call_directly(x, w, offs):
        return _grouped_mm_impl(x, w, offs, backend)
    return _grouped_mm_op(x, w, offs, backend)


# ---------------------------------------------------------------------------------------------
# moe_mlp


def _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts):
    _checks.tensor("x", x, ndim=2, floating=True)
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3, floating=True)
    _checks.tensor("down_proj", down_proj, ndim=3, floating=True)
    _checks.tensor("weights", weights, ndim=2, floating=True)
    _checks.tensor("experts", experts, ndim=2, floating=False)
    T, D = x.shape
    E, F2, D2 = gate_up_proj.shape
    if F2 % 2:
        raise ValueError(f"gate_up_proj must have shape [E, 2F, D] (gate rows, then up rows), got {tuple(gate_up_proj.shape)}")
    Fh = F2 // 2
    _checks.shape("gate_up_proj", gate_up_proj, (E, 2 * Fh, D), "[E, 2F, D] with D = x.shape[1]")
    _checks.shape("down_proj", down_proj, (E, D, Fh), "[E, D, F] with E, F from gate_up_proj")
    if experts.shape[0] != T or experts.shape[1] < 1:
        raise ValueError(f"experts must have shape [T, k] with T = x.shape[0] = {T} and k >= 1, got {tuple(experts.shape)}")
    _checks.shape("weights", weights, tuple(experts.shape), "[T, k] like experts")
    _checks.same_dtype({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj})
    _checks.same_device({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj,
                         "weights": weights, "experts": experts})


# The torch path works expert by expert when an expert gets this many rows on average: every
# step then runs on one expert's block, and the temporaries stay per-expert sized (whole [T*k, 2F]
# buffers are large enough for the C allocator to map fresh pages and fault every one of them in
# on every call). With fewer rows per expert (fine-grained experts, short batches) the per-expert
# launches cost more than that, and one gather and two grouped matmuls over all rows win.
# Measured on 2 x86 cores, interleaved, fwd+bwd vs a torch._grouped_mm layer: E 32 with 64 rows
# each, grouped 12.6 ms, per expert 18.3, peer 12.7; E 8 with 512 rows each, per expert 165.6,
# grouped 190.2, peer 176.8; at 128 rows the two are equal.
_PER_EXPERT_MIN_ROWS = 128


def _per_expert(rows: int, num_experts: int) -> bool:
    return rows >= _PER_EXPERT_MIN_ROWS * num_experts


def _moe_fwd_torch(x_TD, gate_up_E2FD, down_EDF, weights_TK, experts_TK, save_pre):
    """CPU path: gather, GEMM, SwiGLU, GEMM, weight, then the k slots of each token summed; either
    expert by expert with per-expert temporaries written straight to (token, slot) order, or over
    all rows at once with grouped matmuls (``_PER_EXPERT_MIN_ROWS``). Only what the backward needs
    (pre-activations, unweighted expert outputs, in expert order) is kept whole."""
    T, D = x_TD.shape
    k = experts_TK.shape[1]
    F2 = gate_up_E2FD.shape[1]
    plan = routing_plan(experts_TK, gate_up_E2FD.shape[0])
    tok, slots, offs = plan.sorted_tokens, plan.sorted_slots, plan.offsets
    w_M = weights_TK.reshape(-1)[slots].to(x_TD.dtype)
    if not _per_expert(T * k, gate_up_E2FD.shape[0]):
        pre_M2F = _gmm(x_TD.index_select(0, tok), gate_up_E2FD.transpose(1, 2), offs)
        gate, up = pre_M2F.chunk(2, dim=1)
        y_MD = _gmm(F.silu(gate).mul_(up), down_EDF.transpose(1, 2), offs)
        out_TD = _unsort_sum(y_MD * w_M[:, None] if save_pre else y_MD.mul_(w_M[:, None]), slots, T, k)
    else:
        pre_M2F = _zero_tail(x_TD.new_empty(T * k, F2), offs) if save_pre else None
        y_MD = _zero_tail(x_TD.new_empty(T * k, D), offs) if save_pre else None
        out_SD = x_TD.new_empty(T * k, D)  # slot order
        end = 0
        for e, lo, hi in _segments(offs):
            pre = torch.mm(x_TD.index_select(0, tok[lo:hi]), gate_up_E2FD[e].T,
                           out=None if pre_M2F is None else pre_M2F[lo:hi])
            gate, up = pre.chunk(2, dim=1)
            y = torch.mm(F.silu(gate).mul_(up), down_EDF[e].T, out=None if y_MD is None else y_MD[lo:hi])
            out_SD.index_copy_(0, slots[lo:hi], y * w_M[lo:hi, None] if save_pre else y.mul_(w_M[lo:hi, None]))
            end = hi
        if end < T * k:  # unchecked out-of-range ids (forced torch path on CUDA): those slots give 0
            out_SD.index_fill_(0, slots[end:], 0)
        out_TD = out_SD.view(T, k, D).sum(1) if k > 1 else out_SD
    if not save_pre:
        return out_TD, x_TD.new_empty(0, F2), x_TD.new_empty(0, D), slots, offs
    return out_TD, pre_M2F, y_MD, slots, offs


# Up to this many (token, slot) pairs (decoding), the torch path groups them by expert on the
# host instead of sorting on the device: the plan's sort, searches and gathers cost more than the
# work there, and each expert's weights are still read once.
_FEW_SLOTS = 64


def _moe_fwd_few(x_TD, gate_up_E2FD, down_EDF, weights_TK, experts_TK):
    """Forward only, for a few (token, slot) pairs: grouped by expert in Python, one GEMM pair per
    expert used. Unchecked out-of-range ids (a forced torch path on CUDA) contribute nothing."""
    E = gate_up_E2FD.shape[0]
    check_expert_ids(experts_TK, E)
    groups: dict = {}
    for t, (ids, ws) in enumerate(zip(experts_TK.tolist(), weights_TK.tolist())):
        for e, w in zip(ids, ws):
            if 0 <= e < E:
                tokens, weights = groups.setdefault(e, ([], []))
                tokens.append(t)
                weights.append(w)
    out_TD = torch.zeros_like(x_TD)
    for e, (tokens, weights) in groups.items():
        if len(tokens) == 1:
            t = tokens[0]
            gate, up = torch.mm(x_TD[t:t + 1], gate_up_E2FD[e].T).chunk(2, dim=1)
            out_TD[t:t + 1].addmm_(F.silu(gate).mul_(up), down_EDF[e].T, alpha=weights[0])
            continue
        rows = torch.tensor(tokens, device=x_TD.device)
        gate, up = torch.mm(x_TD.index_select(0, rows), gate_up_E2FD[e].T).chunk(2, dim=1)
        y = torch.mm(F.silu(gate).mul_(up), down_EDF[e].T)
        out_TD.index_add_(0, rows, y.mul_(torch.tensor(weights, dtype=y.dtype, device=y.device)[:, None]))
    return out_TD


def _moe_bwd_torch(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F, y_MD, slots_M, offs_E):
    """Hand-written backward (autograd through ``w[e]`` would materialise a full-size zero
    gradient per expert), expert by expert or grouped as the forward chose. SwiGLU's activations
    are recomputed from the saved pre-activations; the saved unweighted expert outputs give
    d(weights) over D columns instead of F."""
    if _per_expert(pre_M2F.shape[0], gate_up_E2FD.shape[0]):
        return _moe_bwd_torch_per_expert(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F, y_MD,
                                         slots_M, offs_E)
    k = weights_TK.shape[1]
    tok = slots_M // k
    w_M = weights_TK.reshape(-1)[slots_M].to(x_TD.dtype)
    dy_MD = dout_TD.index_select(0, tok)
    Fh = pre_M2F.shape[1] // 2
    gate, up = pre_M2F.chunk(2, dim=1)
    silu = F.silu(gate)
    dw_M = torch.linalg.vecdot(dy_MD, y_MD)
    dy_MD.mul_(w_M[:, None])
    d_act = _gmm(dy_MD, down_EDF, offs_E)
    d_down = _gmm(dy_MD.T, silu * up, offs_E)
    d_pre = torch.empty_like(pre_M2F)
    torch.mul(d_act, silu, out=d_pre[:, Fh:])
    torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_pre[:, :Fh])
    d_gate_up = _gmm(d_pre.T, x_TD.index_select(0, tok), offs_E)
    dx_TD = _unsort_sum(_gmm(d_pre, gate_up_E2FD, offs_E), slots_M, x_TD.shape[0], k)
    # Flat and contiguous whatever the layout of weights (a transposed view has no flat view).
    d_weights = torch.empty(weights_TK.numel(), device=weights_TK.device, dtype=weights_TK.dtype)
    d_weights[slots_M] = dw_M.to(weights_TK.dtype)
    return dx_TD, d_gate_up, d_down, d_weights.view(weights_TK.shape)


def _moe_bwd_torch_per_expert(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F, y_MD, slots_M, offs_E):
    """The backward expert by expert: the temporaries stay per-expert sized."""
    T, D = x_TD.shape
    k = weights_TK.shape[1]
    Fh = pre_M2F.shape[1] // 2
    tok = slots_M // k
    w_M = weights_TK.reshape(-1)[slots_M].to(x_TD.dtype)
    d_gate_up, d_down = torch.empty_like(gate_up_E2FD), torch.empty_like(down_EDF)
    dx_SD = x_TD.new_empty(T * k, D)  # slot order
    dw_M = x_TD.new_zeros(T * k)
    end = 0
    for e, lo, hi in _segments(offs_E, empty=True):
        if lo == hi:  # an expert without rows: exactly zero gradient
            d_gate_up[e].zero_()
            d_down[e].zero_()
            continue
        dy = dout_TD.index_select(0, tok[lo:hi])
        torch.linalg.vecdot(dy, y_MD[lo:hi], out=dw_M[lo:hi])
        dy.mul_(w_M[lo:hi, None])
        gate, up = pre_M2F[lo:hi].chunk(2, dim=1)
        silu = F.silu(gate)
        torch.mm(dy.T, silu * up, out=d_down[e])
        d_act = torch.mm(dy, down_EDF[e])
        d_pre = torch.empty_like(pre_M2F[lo:hi])
        torch.mul(d_act, silu, out=d_pre[:, Fh:])
        torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_pre[:, :Fh])
        torch.mm(d_pre.T, x_TD.index_select(0, tok[lo:hi]), out=d_gate_up[e])
        dx_SD.index_copy_(0, slots_M[lo:hi], torch.mm(d_pre, gate_up_E2FD[e]))
        end = hi
    if end < T * k:  # unchecked out-of-range ids (forced torch path on CUDA): no gradient through them
        dx_SD.index_fill_(0, slots_M[end:], 0)
    dx_TD = dx_SD.view(T, k, D).sum(1) if k > 1 else dx_SD
    # Flat and contiguous whatever the layout of weights (a transposed view has no flat view).
    d_weights = torch.empty(weights_TK.numel(), device=weights_TK.device, dtype=weights_TK.dtype)
    d_weights[slots_M] = dw_M.to(weights_TK.dtype)
    return dx_TD, d_gate_up, d_down, d_weights.view(weights_TK.shape)


def _moe_fwd_triton(x_TD, gate_up_E2FD, down_EDF, weights_TK, experts_TK, save_pre):
    from ._triton.grouped_gemm import SWIGLU_FWD, launch_gemm
    T, D = x_TD.shape
    E, F2, _ = gate_up_E2FD.shape
    Fh = F2 // 2
    k = experts_TK.shape[1]
    plan = routing_plan(experts_TK, E)
    slots = plan.sorted_slots
    M = slots.numel()
    w_flat = weights_TK.reshape(-1).to(torch.float32).contiguous()
    act_MF = torch.empty(M, Fh, device=x_TD.device, dtype=x_TD.dtype)
    pre_M2F = torch.empty(M if save_pre else 0, F2, device=x_TD.device, dtype=x_TD.dtype)
    launch_gemm(x_TD, gate_up_E2FD, gate_up_E2FD.stride(), Fh, D, plan.offsets, act_MF,
                row_map=slots, a_div=k, gather_a=True, epilogue=SWIGLU_FWD, pre=pre_M2F if save_pre else None)
    y_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
    launch_gemm(act_MF, down_EDF, down_EDF.stride(), D, Fh, plan.offsets, y_MD,
                row_map=slots, scatter_c=True, scale=w_flat)
    # The k slots of a token are summed here, not with atomics in the kernel: deterministic.
    out_TD = y_MD.view(T, k, D).sum(1) if k > 1 else y_MD.view(T, D)
    return out_TD, pre_M2F, x_TD.new_empty(0, 0), slots, plan.offsets


def _moe_bwd_triton(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F, _y_MD, slots, offs):
    from ._triton.grouped_gemm import MIN_BLOCK_N, SWIGLU_BWD, launch_gemm, launch_wgrad
    T, D = x_TD.shape
    E, F2, _ = gate_up_E2FD.shape
    Fh = F2 // 2
    k = weights_TK.shape[1]
    M = slots.numel()
    w_flat = weights_TK.reshape(-1).to(torch.float32).contiguous()
    d_pre = torch.empty(M, F2, device=x_TD.device, dtype=x_TD.dtype)
    part = torch.zeros(M, -(-Fh // MIN_BLOCK_N), device=x_TD.device, dtype=torch.float32)
    sd = down_EDF.stride()
    launch_gemm(dout_TD, down_EDF, (sd[0], sd[2], sd[1]), Fh, D, offs, d_pre, row_map=slots, a_div=k,
                gather_a=True, scale=w_flat, epilogue=SWIGLU_BWD, pre=pre_M2F, part=part)
    d_flat = torch.empty(M, device=x_TD.device, dtype=torch.float32)
    d_flat[slots] = part.sum(1)
    d_weights = d_flat.view(T, k).to(weights_TK.dtype)
    dx_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
    sg = gate_up_E2FD.stride()
    launch_gemm(d_pre, gate_up_E2FD, (sg[0], sg[2], sg[1]), D, F2, offs, dx_MD, row_map=slots, scatter_c=True)
    dx = dx_MD.view(T, k, D).sum(1) if k > 1 else dx_MD.view(T, D)
    d_down = torch.empty(down_EDF.shape, device=down_EDF.device, dtype=down_EDF.dtype)
    launch_wgrad(dout_TD, pre_M2F, d_down, d_down.stride(), D, Fh, offs, row_map=slots, a_div=k,
                 gather_a=True, scale_a=w_flat, swiglu_b=True)
    d_gate_up = torch.empty(gate_up_E2FD.shape, device=gate_up_E2FD.device, dtype=gate_up_E2FD.dtype)
    launch_wgrad(d_pre, x_TD, d_gate_up, d_gate_up.stride(), F2, D, offs, row_map=slots, b_div=k, gather_b=True)
    return dx, d_gate_up, d_down, d_weights


def _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, save_pre: bool, backend: str):
    if backend != "triton" and not save_pre and experts.numel() <= _FEW_SLOTS:
        return _moe_fwd_few(x, gate_up_proj, down_proj, weights, experts), x.new_empty(0, gate_up_proj.shape[1]), \
            x.new_empty(0, x.shape[1]), experts.new_empty(0, dtype=torch.int64), experts.new_empty(0, dtype=torch.int32)
    fwd = _moe_fwd_triton if backend == "triton" else _moe_fwd_torch
    y, pre, y_rows, slots, offs = fwd(x, gate_up_proj, down_proj, weights, experts, save_pre)
    if not save_pre:  # only the backward reads these
        slots, offs = slots.new_empty(0), offs.new_empty(0)
    return y, pre, y_rows, slots, offs


@torch.library.custom_op("bam::moe_mlp", mutates_args=())
def _moe_mlp_op(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor, save_pre: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, then for the backward: the [gate | up] pre-activations and, on the torch path, the
    unweighted expert outputs, each empty unless ``save_pre``; sorted slots; expert offsets)."""
    y, pre, y_rows, slots, offs = _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, save_pre, backend)
    # Custom ops may not return views of one another's storage or of inputs.
    own = lambda t: t.clone() if t._base is not None else t
    return own(y), own(pre), own(y_rows), slots, offs


@_moe_mlp_op.register_fake
def _(x, gate_up_proj, down_proj, weights, experts, save_pre, backend):
    M = experts.numel() if save_pre else 0
    y_rows = x.new_empty(M, x.shape[1]) if backend != "triton" else x.new_empty(0, 0)
    return (x.new_empty(x.shape), x.new_empty(M, gate_up_proj.shape[1]), y_rows,
            experts.new_empty(M, dtype=torch.int64),
            experts.new_empty(gate_up_proj.shape[0] if save_pre else 0, dtype=torch.int32))


@torch.library.custom_op("bam::moe_mlp_backward", mutates_args=())
def _moe_mlp_backward_op(dout: torch.Tensor, x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                         weights: torch.Tensor, pre: torch.Tensor, y_rows: torch.Tensor, slots: torch.Tensor,
                         offs: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_gate_up_proj, d_down_proj, d_weights)."""
    bwd = _moe_bwd_triton if backend == "triton" else _moe_bwd_torch
    dx, dgu, dd, dw = bwd(dout.contiguous(), x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs)
    return dx.contiguous() if dx._base is not None else dx, dgu, dd, dw


@_moe_mlp_backward_op.register_fake
def _(dout, x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs, backend):
    return x.new_empty(x.shape), gate_up_proj.new_empty(gate_up_proj.shape), \
        down_proj.new_empty(down_proj.shape), weights.new_empty(weights.shape)


def _moe_mlp_setup(ctx, inputs, output):
    x, gate_up_proj, down_proj, weights, _experts, _save_pre, ctx.backend = inputs
    _y, pre, y_rows, slots, offs = output
    # The saved-for-backward outputs get no gradient: no zero tensors materialised for them.
    ctx.mark_non_differentiable(pre, y_rows, slots, offs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs)


def _moe_mlp_grad(ctx, dy, _dpre, _dy_rows, _dslots, _doffs):
    if dy is None:
        return (None,) * 7
    grads = torch.ops.bam.moe_mlp_backward(dy, *ctx.saved_tensors, ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None, None, None)


torch.library.register_autograd("bam::moe_mlp", _moe_mlp_grad, setup_context=_moe_mlp_setup)


def moe_mlp(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
            weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Mixture of SwiGLU experts for routed tokens.

    x [T, D]; gate_up_proj [E, 2F, D] (gate rows first); down_proj [E, D, F]; weights [T, k]
    (any float dtype) and experts [T, k] (integer ids) from the router. Returns [T, D]:
    ``y[t] = sum_s weights[t, s] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t])``, e = experts[t, s].
    Differentiable in x, both weight tensors and weights. Duplicate ids in one token each count.
    Inside an autocast region x and both weight tensors run in its dtype, as F.linear would.
    Registered as ``torch.ops.bam.moe_mlp``, so ``torch.compile`` sees one op; the backward runs
    on the backend the forward ran on.
    """
    x, gate_up_proj, down_proj = autocast_to(x, gate_up_proj, down_proj)
    _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    backend = backend_for(x, gate_up_proj, down_proj)
    if backend == "reference":
        _checks.expert_ids("experts", experts, gate_up_proj.shape[0])
        return reference.moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    if call_directly(x, gate_up_proj, down_proj, weights, experts):
        return _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, False, backend)[0]
    save_pre = needs_grad(x, gate_up_proj, down_proj, weights)
    return _moe_mlp_op(x, gate_up_proj, down_proj, weights, experts, save_pre, backend)[0]
