"""moe_mlp (with route_topk feeding it) on every backend against the float64 reference; the
custom ops under opcheck and torch.compile; the Triton kernels under the harness's conditions:
bf16 on the interpreter, NaN-fenced inputs, reversed program order, the GPU's tile configs."""
import math

import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference
from bam_kernels._triton import grouped_gemm as gg
from bam_model.layers import MoE
from tests.support import gpu_tiles, sanitizer
from tests.support.fenced import fenced, grad_leaf
from tests.support.inputs import make_moe, run_moe
from tests.support.oracle import (
    BF16,
    BF16_TOL,
    grouped_mm_matches_reference,
    rel,
    routed_moe_matches_reference,
)
from tests.support.program_order import grads, run_twice

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


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
    from bam_kernels._torch import grouped_gemm as torch_gemm
    monkeypatch.setattr(torch_gemm, "_native_gmm", {})  # a layout torch._grouped_mm refuses must not stick
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
@pytest.mark.parametrize("T,k,duplicates", [(1, 1, False), (1, 3, True), (2, 2, False), (4, 2, True),
                                            (3, 3, False),
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
    ref_g = reference.grouped_mm(ref_leaves[0], ref_leaves[2].transpose(1, 2),
                                 torch.tensor([10, 10, 20, 33, 33]))
    torch.autograd.backward([ref, ref_g], [dy.to(dtype).double(), torch.ones_like(ref_g)])
    assert rel(y, ref) < 2e-2 and rel(g, ref_g) < 2e-2
    for name, a, b in zip(["x", "gate_up_proj", "down_proj", "weights"], leaves, ref_leaves):
        assert a.grad.dtype == torch.float32, name
        assert rel(a.grad, b.grad) < 2e-2, name


# ---------------------------------------------------------------------------------------------
# Custom ops: opcheck, torch.compile, the backward on the forward's backend


def _moe_args(T=13, D=16, F=24, E=5, k=2):
    x = torch.randn(T, D, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F, D) / 4).requires_grad_()
    down = (torch.randn(E, D, F) / 5).requires_grad_()
    weights = torch.rand(T, k, requires_grad=True)
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return x, gate_up, down, weights, experts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x, gate_up, down, weights, experts = _moe_args()
    torch.library.opcheck(torch.ops.bam.moe_mlp, (x, gate_up, down, weights, experts, True, backend))
    logits = torch.randn(9, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.bam.route_topk, (logits, 3, True, backend))
    offs = torch.tensor([3, 3, 10, 17], dtype=torch.int32)
    xg = torch.randn(17, 12, requires_grad=True)
    wg = torch.randn(4, 20, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.bam.grouped_mm, (xg, wg, offs, backend))


def test_torch_compile_moe_layer_one_graph():
    torch._dynamo.reset()
    moe = MoE(16, 24, num_experts=4, top_k=2)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = moe(x1)
    y_eager.sum().backward()
    grads_eager = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    y_comp = compiled(x2)
    y_comp.sum().backward()
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(x2.grad, x1.grad)
    for g, p in zip(grads_eager, moe.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_backward_runs_on_the_forward_backend(monkeypatch):
    """A forward run under use_backend('triton') differentiates on triton even outside the block."""
    from bam_kernels._triton import moe as triton_moe
    ran = []
    real = triton_moe.backward
    monkeypatch.setattr(triton_moe, "backward", lambda *a: ran.append(True) or real(*a))
    x, gate_up, down, weights, experts = _moe_args()
    with bk.use_backend("triton"):
        y = bk.moe_mlp(x, gate_up, down, weights, experts)
    node = y.grad_fn
    assert node is not None
    y.sum().backward()
    assert ran, "the backward did not run on the triton backend"
    x_ref = x.detach().double().requires_grad_()
    bk.reference.moe_mlp(x_ref, gate_up.double(), down.double(), weights.double(), experts).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Triton kernels in bf16 (tests/support/interpreter_bf16.py), NaN-fenced (tests/support/fenced.py),
# in reversed program order (tests/support/program_order.py), with the GPU's tiles
# (tests/support/gpu_tiles.py)


@pytest.mark.parametrize("T,E,k", [(37, 5, 2), (70, 3, 1), (9, 4, 4)])
def test_route_topk_and_moe_mlp_bf16(T, E, k):
    D, Fh = 21, 27
    # Distinct logits: bf16 has 8 bits of mantissa, and a tie would let the top-k pick either.
    logits = (torch.randperm(T * E).view(T, E) / 8.0).to(BF16)
    x, dy = torch.randn(T, D).to(BF16), torch.randn(T, D).to(BF16)
    gate_up = (torch.randn(E, 2 * Fh, D) / math.sqrt(D)).to(BF16)
    down = (torch.randn(E, D, Fh) / math.sqrt(Fh)).to(BF16)
    values = (logits, x, gate_up, down)
    leaves = [t.clone().requires_grad_() for t in values]
    routed_moe_matches_reference(leaves, values, k, dy, dy, tol=BF16_TOL)


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (37, 5, 2), (70, 3, 1)])
def test_route_topk_and_moe_mlp_fenced(T, E, k):
    D, Fh = 21, 27
    logits = torch.randn(T, E)
    x = torch.randn(T, D)
    gate_up, down = torch.randn(E, 2 * Fh, D) / math.sqrt(D), torch.randn(E, D, Fh) / math.sqrt(Fh)
    dy = torch.randn(T, D)
    leaves = [grad_leaf(fenced(t)) for t in (logits, x, gate_up, down)]
    routed_moe_matches_reference(leaves, (logits, x, gate_up, down), k, fenced(dy), dy)


def test_route_topk_and_moe_mlp_in_any_program_order(reversed_programs):
    T, D, Fh, E, k = 57, 21, 40, 5, 2
    logits = torch.randn(T, E, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)
    gate_up = (torch.randn(E, 2 * Fh, D) / math.sqrt(D)).requires_grad_()
    down = (torch.randn(E, D, Fh) / math.sqrt(Fh)).requires_grad_()

    def fn():
        with bk.use_backend("triton"):
            w, idx = bk.route_topk(logits, k)
            return grads(bk.moe_mlp(x, gate_up, down, w, idx), [logits, x, gate_up, down])

    run_twice(fn, reversed_programs)


@pytest.mark.parametrize("fma,i", gpu_tiles.GEMM_CASES)
def test_moe_ops_with_gpu_tiles(fma, i, monkeypatch):
    gemm, wgrad = gpu_tiles.GEMM[fma]
    monkeypatch.setattr(gg, "group_gemm", gg.make_autotuners(lambda ep, _: [gemm[ep][i % len(gemm[ep])]]))
    monkeypatch.setattr(gg, "group_wgrad", gpu_tiles.one_config_each(gg._group_wgrad, [wgrad[i % len(wgrad)]],
                                                            ["N", "K", "GATHER_A", "GATHER_B", "SWIGLU_B"]))
    # 300 (token, slot) rows over 4 experts, one of them empty: several 128-row tiles, partial
    # tiles in every dimension (D 72, F 100 against 64- to 256-wide tiles).
    T, D, Fh, E, k = 150, 72, 100, 4, 2
    logits = torch.randn(T, E)
    logits[:, 3] = -30.0
    x, dy = torch.randn(T, D), torch.randn(T, D)
    gate_up, down = torch.randn(E, 2 * Fh, D) / math.sqrt(D), torch.randn(E, D, Fh) / math.sqrt(Fh)
    ours = gpu_tiles.leaves(logits, x, gate_up, down)
    with sanitizer.races():
        routed_moe_matches_reference(ours, (logits, x, gate_up, down), k, dy, dy)
    assert torch.all(ours[2].grad[3] == 0) and torch.all(ours[3].grad[3] == 0)

    M, K, N = 300, 72, 130
    offs = torch.tensor([90, 90, 250, 290], dtype=torch.int32)  # an empty expert, 10 rows past the end
    g = torch.randn(M, N)
    with sanitizer.races():
        x, w = gpu_tiles.leaves(torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K))
        grouped_mm_matches_reference(x, w, offs, g, g)
