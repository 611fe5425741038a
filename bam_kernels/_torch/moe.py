"""The CPU (torch) path of ``moe_mlp``: forward and hand-written backward, over all rows at once
with grouped matmuls or expert by expert (``_PER_EXPERT_MIN_ROWS``), and a host-grouped forward
for a few (token, slot) pairs (``FEW_SLOTS``, decoding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import check_expert_ids, routing_plan
from .grouped_gemm import gmm, segments, zero_tail


def _unsort_sum(rows_MD, slots_M, T: int, k: int):
    """Rows in expert order back to (token, slot) order, then the k slots of each token summed:
    a permutation and a reduction, where index_add_ would serialise on repeated tokens. Rows past
    the last offset (unchecked bad ids) are gathered like any other."""
    row_of_slot = torch.empty_like(slots_M)
    row_of_slot[slots_M] = torch.arange(slots_M.numel(), device=slots_M.device)
    by_slot = rows_MD.index_select(0, row_of_slot)  # a gather: contiguous writes, parallel
    return by_slot.view(T, k, rows_MD.shape[1]).sum(1)


# The torch path works expert by expert when an expert gets this many rows on average: every
# step then runs on one expert's block, and the temporaries stay per-expert sized (whole [T*k, 2F]
# buffers are large enough for the C allocator to map fresh pages and fault every one of them in
# on every call). With fewer rows per expert (fine-grained experts, short batches) the per-expert
# launches cost more than that, and one gather and two grouped matmuls over all rows win.
# The measurements that set the threshold: docs/cpu-path.md.
_PER_EXPERT_MIN_ROWS = 128


def _per_expert(rows: int, num_experts: int) -> bool:
    return rows >= _PER_EXPERT_MIN_ROWS * num_experts


def forward(x_TD, gate_up_E2FD, down_EDF, weights_Tk, experts_Tk, save_pre):
    """CPU path: gather, GEMM, SwiGLU, GEMM, weight, then the k slots of each token summed; either
    expert by expert with per-expert temporaries written straight to (token, slot) order, or over
    all rows at once with grouped matmuls (``_PER_EXPERT_MIN_ROWS``). Only what the backward needs
    (pre-activations, unweighted expert outputs, in expert order) is kept whole."""
    T, D = x_TD.shape
    k = experts_Tk.shape[1]
    F2 = gate_up_E2FD.shape[1]
    plan = routing_plan(experts_Tk, gate_up_E2FD.shape[0])
    tok, slots, offs = plan.sorted_tokens, plan.sorted_slots, plan.offsets
    w_M = weights_Tk.reshape(-1)[slots].to(x_TD.dtype)
    if not _per_expert(T * k, gate_up_E2FD.shape[0]):
        pre_M2F = gmm(x_TD.index_select(0, tok), gate_up_E2FD.transpose(1, 2), offs)
        gate, up = pre_M2F.chunk(2, dim=1)
        y_MD = gmm(F.silu(gate).mul_(up), down_EDF.transpose(1, 2), offs)
        out_TD = _unsort_sum(y_MD * w_M[:, None] if save_pre else y_MD.mul_(w_M[:, None]), slots, T, k)
    else:
        pre_M2F = zero_tail(x_TD.new_empty(T * k, F2), offs) if save_pre else None
        y_MD = zero_tail(x_TD.new_empty(T * k, D), offs) if save_pre else None
        out_TkD = x_TD.new_empty(T * k, D)  # slot order
        end = 0
        for e, lo, hi in segments(offs):
            pre = torch.mm(x_TD.index_select(0, tok[lo:hi]), gate_up_E2FD[e].T,
                           out=None if pre_M2F is None else pre_M2F[lo:hi])
            gate, up = pre.chunk(2, dim=1)
            y = torch.mm(F.silu(gate).mul_(up), down_EDF[e].T, out=None if y_MD is None else y_MD[lo:hi])
            weighted = y * w_M[lo:hi, None] if save_pre else y.mul_(w_M[lo:hi, None])
            out_TkD.index_copy_(0, slots[lo:hi], weighted)
            end = hi
        if end < T * k:  # unchecked out-of-range ids (forced torch path on CUDA): those slots give 0
            out_TkD.index_fill_(0, slots[end:], 0)
        out_TD = out_TkD.view(T, k, D).sum(1) if k > 1 else out_TkD
    if not save_pre:
        return out_TD, x_TD.new_empty(0, F2), x_TD.new_empty(0, D), slots, offs
    return out_TD, pre_M2F, y_MD, slots, offs


# Up to this many (token, slot) pairs (decoding), the torch path groups them by expert on the
# host instead of sorting on the device: the plan's sort, searches and gathers cost more than the
# work there, and each expert's weights are still read once. (bam-bench moe's cases, 512 tokens
# and more, never take it: it serves decoding, one token per step.) The per-expert loop inside
# ``gmm`` is no speed strategy: it is where torch._grouped_mm is missing or refuses a layout.
FEW_SLOTS = 64


def forward_few(x_TD, gate_up_E2FD, down_EDF, weights_Tk, experts_Tk):
    """Forward only, for a few (token, slot) pairs: grouped by expert in Python, one GEMM pair per
    expert used. Unchecked out-of-range ids (a forced torch path on CUDA) contribute nothing."""
    E = gate_up_E2FD.shape[0]
    check_expert_ids(experts_Tk, E)
    groups: dict = {}
    for t, (ids, ws) in enumerate(zip(experts_Tk.tolist(), weights_Tk.tolist())):
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


def backward(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_Tk, pre_M2F, y_MD, slots_M, offs_E):
    """Hand-written backward (autograd through ``w[e]`` would materialise a full-size zero
    gradient per expert), expert by expert or grouped as the forward chose. SwiGLU's activations
    are recomputed from the saved pre-activations; the saved unweighted expert outputs give
    d(weights) over D columns instead of F."""
    if _per_expert(pre_M2F.shape[0], gate_up_E2FD.shape[0]):
        return _backward_per_expert(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_Tk, pre_M2F, y_MD,
                                         slots_M, offs_E)
    k = weights_Tk.shape[1]
    tok = slots_M // k
    w_M = weights_Tk.reshape(-1)[slots_M].to(x_TD.dtype)
    dy_MD = dout_TD.index_select(0, tok)
    Fh = pre_M2F.shape[1] // 2
    gate, up = pre_M2F.chunk(2, dim=1)
    silu = F.silu(gate)
    dw_M = torch.linalg.vecdot(dy_MD, y_MD)
    dy_MD.mul_(w_M[:, None])
    d_act = gmm(dy_MD, down_EDF, offs_E)
    d_down = gmm(dy_MD.T, silu * up, offs_E)
    d_pre = torch.empty_like(pre_M2F)
    torch.mul(d_act, silu, out=d_pre[:, Fh:])
    torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_pre[:, :Fh])
    d_gate_up = gmm(d_pre.T, x_TD.index_select(0, tok), offs_E)
    dx_TD = _unsort_sum(gmm(d_pre, gate_up_E2FD, offs_E), slots_M, x_TD.shape[0], k)
    # Flat and contiguous whatever the layout of weights (a transposed view has no flat view).
    d_weights = torch.empty(weights_Tk.numel(), device=weights_Tk.device, dtype=weights_Tk.dtype)
    d_weights[slots_M] = dw_M.to(weights_Tk.dtype)
    return dx_TD, d_gate_up, d_down, d_weights.view(weights_Tk.shape)


def _backward_per_expert(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_Tk, pre_M2F, y_MD, slots_M, offs_E):
    """The backward expert by expert: the temporaries stay per-expert sized."""
    T, D = x_TD.shape
    k = weights_Tk.shape[1]
    Fh = pre_M2F.shape[1] // 2
    tok = slots_M // k
    w_M = weights_Tk.reshape(-1)[slots_M].to(x_TD.dtype)
    d_gate_up, d_down = torch.empty_like(gate_up_E2FD), torch.empty_like(down_EDF)
    dx_TkD = x_TD.new_empty(T * k, D)  # slot order
    dw_M = x_TD.new_zeros(T * k)
    end = 0
    for e, lo, hi in segments(offs_E, empty=True):
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
        dx_TkD.index_copy_(0, slots_M[lo:hi], torch.mm(d_pre, gate_up_E2FD[e]))
        end = hi
    if end < T * k:  # unchecked out-of-range ids (forced torch path on CUDA): no gradient through them
        dx_TkD.index_fill_(0, slots_M[end:], 0)
    dx_TD = dx_TkD.view(T, k, D).sum(1) if k > 1 else dx_TkD
    # Flat and contiguous whatever the layout of weights (a transposed view has no flat view).
    d_weights = torch.empty(weights_Tk.numel(), device=weights_Tk.device, dtype=weights_Tk.dtype)
    d_weights[slots_M] = dw_M.to(weights_Tk.dtype)
    return dx_TD, d_gate_up, d_down, d_weights.view(weights_Tk.shape)


