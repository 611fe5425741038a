"""experts_implementation="bam": transformers' MoE models run bam_kernels.moe_mlp for their experts,
with the logits and gradients of transformers' own eager experts loop."""
import copy

import pytest
import torch
import transformers
from transformers.integrations.moe import use_experts_implementation

import bam_kernels as bk
from bam_kernels import integrations
from tests.support.oracle import rel

integrations.register_transformers()

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **TINY, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        norm_topk_prob=False),
    "olmoe": lambda: transformers.OlmoeConfig(**TINY, num_experts=4, norm_topk_prob=True),
}


@pytest.fixture
def calls(monkeypatch):
    """How many times the integration called bam_kernels.moe_mlp."""
    seen = []

    def counted(*args):
        seen.append(args[0].shape)
        return bk.moe_mlp(*args)

    monkeypatch.setattr(integrations, "moe_mlp", counted)
    return seen


def _pair(family: str):
    cfg = CONFIGS[family]()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    eager.set_experts_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("bam")
    return eager, ours


def _run(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _expert_grads(grads):
    return {n: g for n, g in grads.items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_forward_and_backward_equal_eager(family, backend, calls):
    eager, ours = _pair(family)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    logits_e, grads_e = _run(eager, ids)
    assert not calls
    with bk.use_backend(backend):
        logits_b, grads_b = _run(ours, ids)
    assert len(calls) == TINY["num_hidden_layers"]  # one fused op per MoE layer
    assert rel(logits_b, logits_e) < 1e-5
    experts = _expert_grads(grads_e)
    assert len(experts) == 2 * TINY["num_hidden_layers"]
    for name, g in experts.items():
        assert rel(grads_b[name], g) < 1e-4, name
    assert grads_b.keys() == grads_e.keys()
    for name, g in grads_e.items():  # router, attention, embeddings: through the experts' backward
        assert rel(grads_b[name], g) < 1e-4, name


def test_from_pretrained_with_one_argument(tmp_path, calls):
    eager, _ = _pair("mixtral")
    eager.save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="bam")
    assert ours.config._experts_implementation == "bam"
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert rel(ours(input_ids=ids).logits, eager(input_ids=ids).logits) < 1e-5
    assert len(calls) == TINY["num_hidden_layers"]


def test_bf16_autocast_follows_the_float32_result():
    eager, ours = _pair("mixtral")
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = eager(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(input_ids=ids).logits
            low_eager = eager(input_ids=ids).logits
    # bf16 has 8 bits of mantissa: bam's error is of the size of eager's own under autocast
    assert rel(low.float(), ref) < max(2 * rel(low_eager.float(), ref), 1e-2)


class _TransposedExperts(torch.nn.Module):
    """An experts module stored transposed ([E, D, 2F], [E, F, D]) with its own eager loop."""

    def __init__(self, config):
        super().__init__()
        E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, D, 2 * F) / D ** 0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, F, D) / F ** 0.5)
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for s in range(top_k_index.shape[1]):
                e = top_k_index[t, s]
                gate, up = (hidden_states[t] @ self.gate_up_proj[e]).chunk(2)
                out[t] += top_k_weights[t, s] * ((self.act_fn(gate) * up) @ self.down_proj[e])
        return out


def _experts(cls, implementation: str, **decorator):
    config = transformers.PretrainedConfig(num_experts=5, hidden_size=24, intermediate_size=40)
    config._experts_implementation = implementation
    torch.manual_seed(1)
    return use_experts_implementation(type(cls.__name__, (cls,), {}), **decorator)(config)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_transposed_weights_are_served(backend):
    eager = _experts(_TransposedExperts, "eager", is_transposed=True)
    ours = _experts(_TransposedExperts, "bam", is_transposed=True)
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(13, 24)
    idx = torch.randint(0, 5, (13, 2))
    w = torch.rand(13, 2)
    ref = eager(x, idx, w)
    ref.square().sum().backward()
    with bk.use_backend(backend):
        out = ours(x, idx, w)
        out.square().sum().backward()
    assert rel(out, ref) < 1e-5
    for name in ("gate_up_proj", "down_proj"):
        assert rel(getattr(ours, name).grad, getattr(eager, name).grad) < 1e-4


@pytest.mark.parametrize("decorator, attrs, message", [
    (dict(has_bias=True), {}, "has expert biases"),
    (dict(has_gate=False), {}, "no gate projection"),
    (dict(is_concatenated=False), {}, "interleaved"),
    (dict(has_post_expert_norm=True), {}, "normalises each expert's output"),
    ({}, dict(act_fn=torch.nn.GELU()), "uses the activation GELU"),
    ({}, dict(_apply_gate=lambda self, x: x), "has its own gate function"),
])
def test_layouts_it_does_not_serve_are_refused(decorator, attrs, message):
    cls = type("Custom", (_TransposedExperts,), {k: v for k, v in attrs.items() if k == "_apply_gate"})
    ours = _experts(cls, "bam", is_transposed=True, **decorator)
    for k, v in attrs.items():
        if k != "_apply_gate":
            setattr(ours, k, v)
    with pytest.raises(ValueError, match=message) as e:
        ours(torch.randn(3, 24), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert 'experts_implementation="grouped_mm" or "eager"' in str(e.value)


def test_gpt_oss_is_refused_not_miscomputed():
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    model.set_experts_implementation("bam")
    with pytest.raises(ValueError, match="GptOssExperts has expert biases"):
        model(input_ids=torch.randint(0, 64, (1, 5)))


def test_register_checks_its_name_and_importing_bam_kernels_registers_nothing():
    import subprocess
    import sys
    code = ("import bam_kernels, transformers.integrations.moe as m; "
            "assert 'bam' not in m.ALL_EXPERTS_FUNCTIONS, 'import bam_kernels registered bam'; "
            "import bam_kernels.integrations as i; assert 'bam' not in m.ALL_EXPERTS_FUNCTIONS; "
            "i.register_transformers(); i.register_transformers(); assert 'bam' in m.ALL_EXPERTS_FUNCTIONS")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        integrations.register_transformers("")
