"""The ops are registered custom ops: schema, fake (meta) kernels and autograd pass torch's
opcheck, and torch.compile traces a MoE layer in one graph with the same results as eager."""
import pytest
import torch

import bam_kernels as bk
from bam_model.layers import MoE


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


def test_opcheck_moa_attention():
    B, T, S, E, H, Hkv, Dh = 2, 5, 9, 2, 4, 2, 16
    q = torch.randn(B, T, E, H, Dh, requires_grad=True)
    k = torch.randn(B, S, Hkv, Dh, requires_grad=True)
    v = torch.randn(B, S, Hkv, Dh, requires_grad=True)
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    kv_lens = torch.tensor([9, 6], dtype=torch.int32)
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, kv_lens, True, Dh ** -0.5, True))
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, None, False, 0.3, True))


@pytest.mark.parametrize("shared_kv", [True, False])
def test_torch_compile_mixture_of_attention_one_graph(shared_kv):
    from bam_model.layers import MixtureOfAttention
    torch._dynamo.reset()
    moa = MixtureOfAttention(32, n_heads=4, n_kv_heads=2, num_experts=3, shared_kv=shared_kv)
    compiled = torch.compile(moa, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = moa(x1)
    y_eager.sum().backward()
    y_comp = compiled(x2)
    y_comp.sum().backward()
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_torch_compile_whole_bam_model_one_graph(attention):
    from bam_model.config import BamConfig
    from bam_model.model import BamLM
    torch._dynamo.reset()
    model = BamLM(BamConfig(vocab_size=97, dim=36, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=52,
                            num_experts=3, top_k=2, attention=attention))
    x = torch.randint(0, 97, (2, 9))
    ref = model(x, labels=x)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
