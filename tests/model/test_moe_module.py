import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference
from bam_model.layers import MoE, load_balancing_loss, router_z_loss


def mixtral_block(dim, ffn_dim, num_experts, top_k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=dim, intermediate_size=ffn_dim, num_local_experts=num_experts,
                           num_experts_per_tok=top_k, router_jitter_noise=0.0)
    return MixtralSparseMoeBlock(config)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_matches_transformers_mixtral_both_ways(backend):
    torch.manual_seed(1)
    ours = MoE(24, 40, num_experts=6, top_k=2, normalize=True)
    theirs = mixtral_block(24, 40, 6, 2)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 11, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with bk.use_backend(backend):
        y_ours = ours(x1)
    y_theirs = theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    ps, pt = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ps:
        torch.testing.assert_close(ps[name].grad, pt[name].grad, rtol=1e-5, atol=1e-6, msg=name)

    # And the other way: Mixtral's (random) weights load into ours.
    theirs2 = mixtral_block(24, 40, 6, 2)
    for p in theirs2.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours2 = MoE(24, 40, num_experts=6, top_k=2, normalize=True)
    ours2.load_state_dict(theirs2.state_dict())
    torch.testing.assert_close(ours2(x), theirs2(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (1, 1, 1, 16)])
def test_moe_any_leading_shape_matches_reference(shape):
    moe = MoE(16, 24, num_experts=4, top_k=1)
    x = torch.randn(*shape)
    y = moe(x)
    assert y.shape == x.shape
    x_TD = x.reshape(-1, 16).double()
    logits = x_TD @ moe.gate.weight.double().T
    w, idx = reference.route_topk(logits, 1)
    ref = reference.moe_mlp(x_TD, moe.experts.gate_up_proj.double(), moe.experts.down_proj.double(), w, idx)
    torch.testing.assert_close(y.reshape(-1, 16).double(), ref, rtol=1e-5, atol=1e-6)
    assert moe.router_logits.shape == (x_TD.shape[0], 4)


def test_bam_routing_keeps_unnormalised_probabilities():
    """BAM: top-1 without renormalisation scales an expert's output by its router probability."""
    moe = MoE(8, 12, num_experts=3, top_k=1, normalize=False)
    x = torch.randn(9, 8)
    y = moe(x)
    probs = torch.softmax(moe.gate(x), -1)
    p_top, e_top = probs.max(-1)
    for t in range(9):
        e = int(e_top[t])
        expert = reference.expert_mlp(x[t:t + 1], moe.experts.gate_up_proj[e], moe.experts.down_proj[e])
        torch.testing.assert_close(y[t], (p_top[t] * expert)[0], rtol=1e-5, atol=1e-6)


def test_aux_losses_match_their_definitions():
    moe = MoE(16, 24, num_experts=5, top_k=2)
    x = torch.randn(4, 13, 16)
    moe(x)
    logits = moe.router_logits.detach().double()
    probs = torch.softmax(logits, -1)
    _, idx = probs.topk(2, -1)
    f = torch.stack([(idx == e).sum() for e in range(5)]).double() / idx.numel()
    expected_lb = 5 * (f * probs.mean(0)).sum()
    expected_z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(moe.load_balancing_loss.double(), expected_lb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(moe.z_loss.double(), expected_z, rtol=1e-5, atol=1e-7)
    (moe.load_balancing_loss + moe.z_loss).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_perfectly_balanced():
    E = 4
    logits = torch.zeros(8, E)  # uniform probabilities
    experts = torch.arange(8).remainder(E)[:, None]
    torch.testing.assert_close(load_balancing_loss(logits, experts), torch.tensor(1.0))
    assert router_z_loss(logits).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="top_k must be"):
        MoE(8, 12, num_experts=3, top_k=4)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        MoE(8, 12, num_experts=0)
    with pytest.raises(ValueError, match="last dimension dim=8"):
        MoE(8, 12, num_experts=3)(torch.randn(2, 7))
