import math

import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference
from tests.support.oracle import rel

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}



# ---------------------------------------------------------------------------------------------
# grouped_mm


def random_offsets(M, E, empty=(), tail=0):
    """Cumulative row ends for E experts over M - tail rows, experts in ``empty`` getting none."""
    live = [e for e in range(E) if e not in empty]
    counts = torch.zeros(E, dtype=torch.int64)
    if live:
        picks = torch.randint(0, len(live), (M - tail,))
        counts[live] = torch.bincount(picks, minlength=len(live))
    return torch.cumsum(counts, 0).to(torch.int32)


GMM_CASES = [  # M, K, N, E, empty experts, tail rows past offs[-1]
    (1, 19, 37, 1, (), 0),
    (7, 19, 37, 3, (1,), 0),
    (33, 24, 13, 4, (0, 3), 5),
    (257, 37, 29, 16, (2, 5, 11), 0),
    (127, 16, 48, 5, (), 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,E,empty,tail", GMM_CASES)
def test_grouped_mm_matches_reference(poison, backend, dtype, M, K, N, E, empty, tail):
    offs = random_offsets(M, E, empty, tail)
    x = torch.randn(M, K).to(dtype).requires_grad_()
    w = (torch.randn(E, N, K) / math.sqrt(K)).to(dtype).requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.grouped_mm(x64, w64, offs)
    with bk.use_backend(backend):
        y = bk.grouped_mm(x, w, offs)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel(y, ref) < TOL[dtype]
    if tail:
        assert torch.all(y[-tail:] == 0)
    dy = torch.randn(M, N, dtype=torch.float64)
    ref.backward(dy)
    y.backward(dy.to(dtype))
    assert rel(x.grad, x64.grad) < TOL[dtype]
    assert rel(w.grad, w64.grad) < TOL[dtype]
    for e in empty:
        assert torch.all(w.grad[e] == 0), f"expert {e} has no rows: its weight gradient must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_transposed_weight_view(backend):
    """A non-contiguous weight (a transposed view, as torch._grouped_mm's callers pass) works."""
    offs = random_offsets(40, 3)
    x = torch.randn(40, 20)
    w = torch.randn(3, 20, 12).transpose(1, 2)  # [E, N=12, K=20], strided
    with bk.use_backend(backend):
        y = bk.grouped_mm(x, w, offs)
    assert rel(y, reference.grouped_mm(x.double(), w.double(), offs)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_backward_is_deterministic(backend):
    offs = random_offsets(97, 6, empty=(2,))
    x = torch.randn(97, 24, requires_grad=True)
    w = torch.randn(6, 40, 24, requires_grad=True)
    dy = torch.randn(97, 40)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        with bk.use_backend(backend):
            bk.grouped_mm(x, w, offs).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_grouped_mm_bad_input():
    x, w = torch.randn(10, 8), torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        bk.grouped_mm(x, w, torch.tensor([4, 2, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        bk.grouped_mm(x, w, torch.tensor([4, 6, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offs must have shape \[E\]"):
        bk.grouped_mm(x, w, torch.tensor([4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[M, K\]"):
        bk.grouped_mm(torch.randn(10, 7), w, torch.tensor([4, 6, 10]))
    with pytest.raises(ValueError, match="w has dtype"):
        bk.grouped_mm(x, w.half(), torch.tensor([4, 6, 10]))
    with pytest.raises(ValueError, match="offs must be an integer tensor"):
        bk.grouped_mm(x, w, torch.tensor([4.0, 6.0, 10.0]))
    with pytest.raises(ValueError, match="w must have 3 dimensions"):
        bk.grouped_mm(x, w[0], torch.tensor([4, 6, 10]))


# ---------------------------------------------------------------------------------------------
# moe_mlp


def make_moe(T, D, F, E, k, dtype=torch.float32, duplicates=False, empty=()):
    live = torch.tensor([e for e in range(E) if e not in empty])
    if duplicates:
        experts = live[torch.randint(0, len(live), (T, k))]
    else:
        experts = torch.stack([live[torch.randperm(len(live))[:k]] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.int64)
    x = torch.randn(T, D)
    gate_up = torch.randn(E, 2 * F, D) / math.sqrt(D)
    down = torch.randn(E, D, F) / math.sqrt(F)
    weights = torch.rand(T, k) + 0.1
    return [t.to(dtype) for t in (x, gate_up, down)] + [weights, experts]


MOE_CASES = [  # T, D, F, E, k, duplicate ids, experts without tokens
    (1, 19, 23, 1, 1, False, ()),
    (7, 19, 23, 4, 1, False, (2,)),
    (7, 19, 23, 4, 4, False, ()),
    (33, 37, 45, 16, 2, False, (0, 5, 9, 15)),
    (33, 24, 40, 5, 3, True, ()),
    (257, 37, 29, 8, 2, False, (3,)),
    (257, 19, 23, 16, 1, True, (1, 7)),
]


# The torch path runs grouped with few rows per expert and expert by expert with many: test both.
MOE_BACKENDS = ["torch", "torch-per-expert", "triton"]


@pytest.fixture
def moe_backend(request, monkeypatch):
    """The backend name for bk.use_backend; "torch-per-expert" forces the per-expert torch path."""
    name = request.param
    if name == "torch-per-expert":
        monkeypatch.setattr("bam_kernels._torch.moe._PER_EXPERT_MIN_ROWS", 0)
        return "torch"
    return name


def run_moe(backend, inputs):
    with bk.use_backend(backend):
        return bk.moe_mlp(*inputs)


@pytest.mark.parametrize("moe_backend", MOE_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,duplicates,empty", MOE_CASES)
def test_moe_mlp_matches_reference(poison, moe_backend, dtype, T, D, F, E, k, duplicates, empty):
    inputs = make_moe(T, D, F, E, k, dtype, duplicates, empty)
    leaves = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs[:4]] + [inputs[4]]
    ref = reference.moe_mlp(*leaves64)
    y = run_moe(moe_backend, leaves)
    assert y.shape == (T, D) and y.dtype == dtype
    assert rel(y, ref) < TOL[dtype]
    dy = torch.randn(T, D, dtype=torch.float64)
    ref.backward(dy)
    y.backward(dy.to(dtype))
    for name, a, b in zip(["x", "gate_up_proj", "down_proj", "weights"], leaves, leaves64):
        assert a.grad.dtype == a.dtype, name
        assert rel(a.grad, b.grad) < TOL[dtype], name
    for e in empty:
        assert torch.all(leaves[1].grad[e] == 0) and torch.all(leaves[2].grad[e] == 0)


@pytest.mark.parametrize("moe_backend", MOE_BACKENDS, indirect=True)
def test_moe_mlp_backward_is_deterministic(moe_backend):
    inputs = make_moe(65, 24, 40, 6, 2, duplicates=True, empty=(4,))
    leaves = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]
    dy = torch.randn(65, 24)
    runs = []
    for _ in range(2):
        for t in leaves[:4]:
            t.grad = None
        run_moe(moe_backend, leaves).backward(dy)
        runs.append([t.grad.clone() for t in leaves[:4]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("moe_backend", MOE_BACKENDS, indirect=True)
def test_moe_mlp_only_some_inputs_need_grad(moe_backend):
    x, gate_up, down, weights, experts = make_moe(20, 16, 24, 4, 2)
    down.requires_grad_()
    run_moe(moe_backend, [x, gate_up, down, weights, experts]).sum().backward()
    ref_down = down.detach().double().requires_grad_()
    reference.moe_mlp(x.double(), gate_up.double(), ref_down, weights.double(), experts).sum().backward()
    assert rel(down.grad, ref_down.grad) < 1e-5


@pytest.mark.parametrize("moe_backend", MOE_BACKENDS, indirect=True)
def test_moe_mlp_inference_no_grad(moe_backend):
    inputs = make_moe(33, 16, 24, 4, 2)
    with torch.no_grad():
        y = run_moe(moe_backend, inputs)
    assert rel(y, reference.moe_mlp(*[t.double() for t in inputs[:4]], inputs[4])) < 1e-5


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous view: "transposed" (the last two dimensions swapped
    in memory) or "step" (every other element of a buffer twice as wide)."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


@pytest.mark.parametrize("layout", ["transposed", "step"])
@pytest.mark.parametrize("moe_backend", MOE_BACKENDS + ["reference"], indirect=True)
def test_moe_mlp_strided_inputs(moe_backend, layout, monkeypatch):
    """x, gate_up_proj, down_proj, weights and experts all as non-contiguous views: the output and
    every gradient are the reference's, with autograd (few slots take another torch path without)."""
    from bam_kernels._torch import grouped_gemm as experts
    monkeypatch.setattr(experts, "_native_gmm", {})  # a layout torch._grouped_mm refuses must not stick
    T, D, F = 21, 16, 24  # 16-byte rows: torch._grouped_mm is tried
    inputs = make_moe(T, D, F, 4, 2, duplicates=True)
    views = [relaid(t, layout) for t in inputs]
    assert not any(t.is_contiguous() for t in views)
    leaves = [t.requires_grad_() for t in views[:4]] + [views[4]]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs[:4]] + [inputs[4]]
    ref = reference.moe_mlp(*leaves64)
    y = run_moe(moe_backend, leaves)
    dy = torch.randn(T, D, dtype=torch.float64)
    ref.backward(dy)
    y.backward(relaid(dy.float(), layout))
    assert rel(y, ref) < 1e-5
    for name, a, b in zip(["x", "gate_up_proj", "down_proj", "weights"], leaves, leaves64):
        assert rel(a.grad, b.grad) < 1e-5, name
    with torch.no_grad():
        assert rel(run_moe(moe_backend, views), ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k,duplicates", [(1, 1, False), (1, 3, True), (2, 2, False), (4, 2, True), (3, 3, False),
                                            (16, 4, True), (65, 1, False)])
def test_moe_mlp_decoding_sizes_without_grad(poison, backend, dtype, T, k, duplicates):
    """A few (token, slot) pairs (decoding), eager and without autograd: the torch path groups them
    by expert on the host (up to 64 pairs; 65 takes the general path), both paths skip the custom
    op; the result is the reference's, as through the op."""
    inputs = make_moe(T, 19, 23, 5, k, dtype, duplicates)
    ref = reference.moe_mlp(*[t.double() for t in inputs[:4]], inputs[4])
    with torch.no_grad():
        y = run_moe(backend, inputs)
    assert y.shape == (T, 19) and y.dtype == dtype
    assert rel(y, ref) < TOL[dtype]
    with bk.use_backend(backend):
        through_op = torch.ops.bam.moe_mlp(*inputs, False, backend)[0]
    assert rel(y, through_op.double()) < TOL[dtype]


def test_moe_mlp_under_a_dispatch_mode_goes_through_the_op():
    """Fake tensors (torch.compile, export, memory estimators) must reach the op's fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x, gate_up, down, weights, experts = [mode.from_tensor(t) for t in make_moe(3, 16, 24, 4, 2)]
        with torch.no_grad():
            y = bk.moe_mlp(x, gate_up, down, weights, experts)
            w, idx = bk.route_topk(torch.randn(3, 4), 2)
    assert y.shape == (3, 16) and w.shape == (3, 2) and idx.shape == (3, 2)


@pytest.mark.parametrize("grad", [False, True])
def test_modules_run_on_the_meta_device(grad):
    """Shape-only runs (a model built on the meta device) reach the ops' fake kernels, with and
    without autograd."""
    from bam_model.layers import MixtureOfAttention, MoE
    moe = MoE(16, 24, 4, top_k=2, device="meta")
    moa = MixtureOfAttention(16, 4, 2, 3, shared_kv=False).to("meta")
    with torch.set_grad_enabled(grad):
        assert moe(torch.randn(2, 5, 16, device="meta")).shape == (2, 5, 16)
        assert moa(torch.randn(2, 5, 16, device="meta")).shape == (2, 5, 16)


def test_moe_mlp_empty_batch():
    x, gate_up, down, weights, experts = make_moe(0, 16, 24, 4, 2)
    for backend in BACKENDS:
        assert run_moe(backend, [x, gate_up, down, weights, experts]).shape == (0, 16)


def test_moe_mlp_bad_input():
    x, gate_up, down, weights, experts = make_moe(5, 8, 6, 3, 2)
    with pytest.raises(ValueError, match="experts holds expert ids"):
        bk.moe_mlp(x, gate_up, down, weights, experts + 3)
    with pytest.raises(ValueError, match=r"gate_up_proj must have shape \[E, 2F, D\]"):
        bk.moe_mlp(x, gate_up[:, :-1], down, weights, experts)
    with pytest.raises(ValueError, match=r"gate_up_proj must have shape \[E, 2F, D\]"):
        bk.moe_mlp(x, gate_up[..., :-1], down, weights, experts)
    with pytest.raises(ValueError, match="down_proj must have shape"):
        bk.moe_mlp(x, gate_up, down[:2], weights, experts)
    with pytest.raises(ValueError, match=r"weights must have shape \[T, k\]"):
        bk.moe_mlp(x, gate_up, down, weights[:, :1], experts)
    with pytest.raises(ValueError, match=r"experts must have shape \[T, k\]"):
        bk.moe_mlp(x, gate_up, down, weights[:4], experts[:4])
    with pytest.raises(ValueError, match="experts must be an integer tensor"):
        bk.moe_mlp(x, gate_up, down, weights, experts.float())
    with pytest.raises(ValueError, match="down_proj has dtype"):
        bk.moe_mlp(x, gate_up, down.double(), weights, experts)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        bk.moe_mlp(x[None], gate_up, down, weights, experts)


def test_autotuning_trials_leave_no_stale_partial_sums(monkeypatch):
    """Autotuning reruns the kernels with several tile shapes. The d(weights) partial sums have one
    column per column tile, so a trial with narrower tiles writes columns the chosen config does
    not; the autotuner must clear them (and must not clear anything else)."""
    import triton
    from bam_kernels._triton import grouped_gemm as gg

    def configs(ep, fma):  # narrow tiles first, then the wide ones the fake timer picks
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": 32, "GROUP_M": 2}) for n in (32, 64)]

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        fake_bench.calls += 1
        return [float(-fake_bench.calls)] * 3  # later trials look faster: the last config wins
    fake_bench.calls = 0

    monkeypatch.setattr(gg, "group_gemm", gg.make_autotuners(configs, do_bench=fake_bench))
    inputs = make_moe(21, 19, 45, 4, 2)  # F = 45: two 32-wide column tiles, one 64-wide
    leaves = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs[:4]] + [inputs[4]]
    dy = torch.randn(21, 19, dtype=torch.float64)
    run_moe("triton", leaves).backward(dy.float())
    reference.moe_mlp(*leaves64).backward(dy)
    assert fake_bench.calls >= 6  # every epilogue was autotuned over both configs
    for name, a, b in zip(["x", "gate_up_proj", "down_proj", "weights"], leaves, leaves64):
        assert rel(a.grad, b.grad) < 1e-5, name


@pytest.mark.parametrize("op", ["grouped_mm", "moe_mlp"])
def test_torch_path_without_native_grouped_mm(monkeypatch, op):
    """The CPU path's per-expert loop, used where torch._grouped_mm is missing or refuses a dtype."""
    from bam_kernels._torch import grouped_gemm as experts
    refused = {("cpu", torch.float32, aligned): False for aligned in (True, False)}
    monkeypatch.setattr(experts, "_native_gmm", dict(refused))
    if op == "grouped_mm":
        offs = random_offsets(57, 5, empty=(1,), tail=4)
        x = torch.randn(57, 19, requires_grad=True)
        w = torch.randn(5, 23, 19, requires_grad=True)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        with bk.use_backend("torch"):
            y = bk.grouped_mm(x, w, offs)
        ref = reference.grouped_mm(x64, w64, offs)
        dy = torch.randn(57, 23, dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        pairs = [(y, ref), (x.grad, x64.grad), (w.grad, w64.grad)]
        assert torch.all(w.grad[1] == 0) and torch.all(y[-4:] == 0)
    else:
        inputs = make_moe(33, 19, 23, 6, 2, empty=(3,))
        leaves = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]
        leaves64 = [t.detach().double().requires_grad_() for t in inputs[:4]] + [inputs[4]]
        y = run_moe("torch", leaves)
        ref = reference.moe_mlp(*leaves64)
        dy = torch.randn(33, 19, dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        pairs = [(y, ref)] + [(a.grad, b.grad) for a, b in zip(leaves[:4], leaves64[:4])]
    for a, b in pairs:
        assert rel(a, b) < 1e-5
    assert experts._native_gmm == refused


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_a_refused_misaligned_call_does_not_turn_off_native_grouped_mm(monkeypatch):
    """torch._grouped_mm needs 16-byte strides: an odd-sized call falls back to the loop, and the
    aligned calls after it still use the native op."""
    from bam_kernels._torch import grouped_gemm as experts
    monkeypatch.setattr(experts, "_native_gmm", {})
    offs = torch.tensor([3, 9, 12], dtype=torch.int32)
    with bk.use_backend("torch"):
        odd = bk.grouped_mm(torch.randn(12, 19), torch.randn(3, 5, 19), offs)
        even = bk.grouped_mm(torch.randn(12, 16), torch.randn(3, 8, 16), offs)
    assert odd.shape == (12, 5) and even.shape == (12, 8)
    assert experts._native_gmm.get(("cpu", torch.float32, False)) is False    # refused, remembered apart
    assert experts._native_gmm.get(("cpu", torch.float32, True)) is True


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16),
                                           ("triton", torch.bfloat16)])
def test_moe_mlp_and_grouped_mm_under_autocast(backend, dtype):
    """fp32 inputs and parameters inside autocast: the experts run in its dtype (as F.linear), the
    output has that dtype, and the fp32 leaves get fp32 gradients equal to the reference's on the
    same cast values."""
    x, gate_up, down, weights, experts = make_moe(33, 24, 40, 5, 2)
    leaves = [t.requires_grad_() for t in (x, gate_up, down, weights)]
    with torch.autocast("cpu", dtype=dtype), bk.use_backend(backend):
        y = bk.moe_mlp(*leaves, experts)
        g = bk.grouped_mm(leaves[0], leaves[2].transpose(1, 2), torch.tensor([10, 10, 20, 33, 33]))
    assert y.dtype == dtype and g.dtype == dtype
    dy = torch.randn(33, 24)
    torch.autograd.backward([y, g], [dy.to(dtype), torch.ones_like(g)])
    ref_leaves = [t.detach().to(dtype).double().requires_grad_() for t in leaves[:3]]
    ref_leaves.append(weights.detach().double().requires_grad_())
    ref = reference.moe_mlp(*ref_leaves, experts)
    ref_g = reference.grouped_mm(ref_leaves[0], ref_leaves[2].transpose(1, 2), torch.tensor([10, 10, 20, 33, 33]))
    torch.autograd.backward([ref, ref_g], [dy.to(dtype).double(), torch.ones_like(ref_g)])
    assert rel(y, ref) < 2e-2 and rel(g, ref_g) < 2e-2
    for name, a, b in zip(["x", "gate_up_proj", "down_proj", "weights"], leaves, ref_leaves):
        assert a.grad.dtype == torch.float32, name
        assert rel(a.grad, b.grad) < 2e-2, name
