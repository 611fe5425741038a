import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference

BACKENDS = ["torch", "triton"]


def _route(backend, logits, k, normalize):
    with bk.use_backend(backend):
        return bk.route_topk(logits, k, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("E,k", [(1, 1), (4, 1), (5, 2), (16, 1), (16, 8), (16, 16)])
@pytest.mark.parametrize("T", [1, 7, 33, 257])
def test_route_topk_matches_reference(backend, normalize, E, k, T):
    logits64 = torch.randn(T, E, dtype=torch.float64) * 2
    ref_w, ref_idx = reference.route_topk(logits64.clone().requires_grad_(), k, normalize)
    logits = logits64.float().requires_grad_()
    w, idx = _route(backend, logits, k, normalize)
    assert w.dtype == torch.float32 and w.shape == (T, k)
    assert idx.dtype == torch.int64 and idx.shape == (T, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w.detach(), rtol=1e-6, atol=1e-7)

    dw = torch.randn(T, k, dtype=torch.float64)
    leaf = logits64.clone().requires_grad_()
    ref_w, _ = reference.route_topk(leaf, k, normalize)
    ref_w.backward(dw)
    w.backward(dw.float())
    torch.testing.assert_close(logits.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_topk_fp16_logits(backend):
    logits = torch.randn(33, 8).half()
    w, idx = _route(backend, logits, 2, False)
    ref_w, ref_idx = reference.route_topk(logits.double(), 2)
    assert w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_triton_ties_pick_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, idx = _route("triton", logits, 3, False)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]


NAN, INF = float("nan"), float("inf")


def non_finite_rows(E):
    """Logits [9, E] with normal rows 0, 4 and 8 between a NaN, a +inf, a row of -inf, a row of
    NaN, and a row holding two +inf beside NaN and -inf."""
    logits = torch.randn(9, E, dtype=torch.float64) * 2
    logits[1, 0] = NAN
    logits[2, E // 2] = INF
    logits[3] = -INF
    logits[5] = NAN
    logits[6, :4] = torch.tensor([INF, 0.5, NAN, -INF])[:E]
    logits[6, -1] = INF
    logits[7, 1:] = -INF  # one live expert: -inf masks the others out, a valid row
    return logits


def routed_as_documented(logits, k, normalize):
    """route_topk's documented reading of non-finite logits: NaN as -inf, then clamped to the
    finite float32 range; softmax in float64, ties to the lowest id."""
    big = torch.finfo(torch.float32).max
    probs = torch.softmax(logits.double().nan_to_num(nan=-big).clamp(-big, big), dim=-1)
    p_sorted, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    w = p_sorted[:, :k]
    return (w / w.sum(-1, keepdim=True) if normalize else w), ids[:, :k], probs


# The interpreter's numpy warns where -FP32_MAX - FP32_MAX rounds to -inf, as the kernel means it to.
OVERFLOW_IS_MEANT = pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")


@OVERFLOW_IS_MEANT
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("E,k", [(5, 1), (5, 5), (8, 3)])
def test_triton_routes_non_finite_rows_in_range(monkeypatch, E, k, normalize):
    """The kernel runs unchecked (a check would sync a GPU): a row with NaN, +inf or only -inf
    still gets ids in [0, E) and finite weights, as route_topk documents, and finite gradients."""
    monkeypatch.delenv("BAM_CHECK", raising=False)
    logits = non_finite_rows(E).float().requires_grad_()
    w, idx = _route("triton", logits, k, normalize)
    want_w, want_idx, _ = routed_as_documented(logits.detach(), k, normalize)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w.double(), want_w, rtol=1e-6, atol=1e-7)
    assert ((idx >= 0) & (idx < E)).all() and torch.isfinite(w).all()
    w.backward(torch.randn(w.shape))
    assert torch.isfinite(logits.grad).all()


@OVERFLOW_IS_MEANT
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_unchecked_logits_read_as_the_kernel_reads_them(backend):
    """On CUDA without BAM_CHECK the torch and reference backends route what the kernel reads:
    the same weights, each id's probability its weight (torch.topk may order ties otherwise)."""
    from bam_kernels.routing import _as_the_kernel_reads
    logits = non_finite_rows(8).float()
    want_w, _, probs = routed_as_documented(logits, 3, False)
    w, idx = _route(backend, _as_the_kernel_reads(logits), 3, False)
    torch.testing.assert_close(w.double(), want_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.gather(1, idx), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton with BAM_CHECK=1"])
def test_route_topk_rejects_non_finite_logits_on_the_cpu(monkeypatch, backend, bad, grad):
    if backend.startswith("triton"):
        monkeypatch.setenv("BAM_CHECK", "1")
        backend = "triton"
    logits = torch.randn(7, 5)
    logits[3, 2:] = -INF  # masked experts: fine
    if bad == "all -inf":
        logits[5] = -INF
    else:
        logits[5, 1] = NAN if bad == "nan" else INF
    with pytest.raises(ValueError, match=r"logits are not finite in row 5 \(1 of 7 rows\)"):
        _route(backend, logits.requires_grad_(grad), 2, True)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_normalized_weights_sum_to_one(backend):
    w, _ = _route(backend, torch.randn(17, 6), 3, True)
    torch.testing.assert_close(w.sum(-1).double(), torch.ones(17, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_backward_is_deterministic(backend):
    logits = torch.randn(65, 16, requires_grad=True)
    dw = torch.randn(65, 4)
    grads = []
    for _ in range(2):
        logits.grad = None
        w, _ = _route(backend, logits, 4, True)
        w.backward(dw)
        grads.append(logits.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad_k", [0, 5, -1, 2.0, True])
def test_route_topk_rejects_bad_k(bad_k):
    with pytest.raises(ValueError, match="k must be"):
        bk.route_topk(torch.randn(3, 4), bad_k)


def test_route_topk_rejects_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        bk.route_topk(torch.randn(3, 4, 2), 1)
    with pytest.raises(ValueError, match="logits"):
        bk.route_topk(torch.randint(0, 3, (3, 4)), 1)


def test_routing_plan_sorts_stably_by_expert():
    experts = torch.randint(0, 6, (41, 3))
    experts[:, 1] = experts[:, 0]  # duplicate ids within a token
    plan = bk.routing_plan(experts, 8)  # experts 6 and 7 get no rows
    flat = experts.reshape(-1)
    assert torch.equal(plan.sorted_experts, flat[plan.sorted_slots])
    assert torch.all(plan.sorted_experts[1:] >= plan.sorted_experts[:-1])
    for e in range(8):
        slots = plan.sorted_slots[plan.sorted_experts == e]
        assert torch.all(slots[1:] > slots[:-1])  # stable: token order kept within an expert
    assert torch.equal(plan.counts, torch.bincount(flat, minlength=8).to(torch.int32))
    assert plan.offsets.dtype == torch.int32 and int(plan.offsets[-1]) == flat.numel()
    assert torch.equal(plan.sorted_tokens, plan.sorted_slots // 3)


def test_routing_plan_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"experts holds expert ids in \[0, 4\].*\[0, 3\]"):
        bk.routing_plan(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="experts"):
        bk.routing_plan(torch.tensor([[-1, 1]]), 4)


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with bk.use_backend("cuda"):
            pass


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("BAM_BACKEND", raising=False)
    assert bk.backend_for(torch.randn(2)) == "torch"
    monkeypatch.setenv("BAM_BACKEND", "reference")
    assert bk.backend_for(torch.randn(2)) == "reference"
    with bk.use_backend("triton"):
        assert bk.backend_for(torch.randn(2)) == "triton"
