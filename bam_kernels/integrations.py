"""bam's MoE kernels behind Hugging Face transformers' experts layers.

transformers (5.x) runs the expert MLPs of its MoE models through ``ExpertsInterface``: each
``*Experts`` module decorated with ``@use_experts_implementation`` looks its forward up by the name
given as ``from_pretrained(..., experts_implementation=NAME)``. After

    import bam_kernels.integrations
    bam_kernels.integrations.register_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="bam")

those modules run ``bam_kernels.moe_mlp``: the routing-weighted SwiGLU of every expert in one fused
op (grouped GEMMs on the GPU, the tuned CPU path elsewhere), forward and backward. The weights stay
where transformers keeps them; nothing is copied or converted.

Served: experts with a SiLU-gated up projection stored as one ``gate_up_proj [E, 2F, D]`` (gate
rows, then up rows) and ``down_proj [E, D, F]``, or both transposed (``[E, D, 2F]``, ``[E, F, D]``),
without biases, with transformers' default gate (``act(gate) * up``) and no post-expert norm: the
layout of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and most MoE families. Anything else
(biases, interleaved gate/up columns, no gate, a custom gate such as gpt-oss's clamped SwiGLU,
another activation, expert parallelism) raises a ValueError naming what is not served, at the
first forward, instead of computing something else.

Importing ``bam_kernels`` never registers anything; this module imports transformers only inside
``register_transformers``.
"""
from __future__ import annotations

import torch

from . import moe_mlp

NAME = "bam"


def register_transformers(name: str = NAME) -> None:
    """Register bam's experts forward in transformers' ``ExpertsInterface`` under ``name``, so that
    ``from_pretrained(..., experts_implementation=name)`` (or ``model.set_experts_implementation(name)``)
    runs it. Safe to call more than once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: PLC0415 (transformers: optional)
    except ImportError as e:  # transformers missing, or older than the experts interface (5.0)
        raise ImportError("register_transformers needs transformers >= 5.0 with "
                          "transformers.integrations.moe.ExpertsInterface; "
                          "pip install 'transformers>=5'") from e
    ExpertsInterface.register(name, experts_forward)


def unsupported(experts: torch.nn.Module) -> str | None:
    """Why ``experts`` (a transformers experts module) cannot run on bam's kernels, or None when it can."""
    kind = type(experts).__name__
    if getattr(experts, "has_bias", False):
        return f"{kind} has expert biases"
    if not getattr(experts, "has_gate", True):
        return f"{kind} has no gate projection (up_proj only)"
    if not getattr(experts, "is_concatenated", True):
        return f"{kind} stores gate and up columns interleaved"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{kind} normalises each expert's output"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{kind} is sharded for expert parallelism"
    from transformers.activations import SiLUActivation  # noqa: PLC0415 (transformers: optional)
    from transformers.integrations import moe as hf_moe  # noqa: PLC0415 (transformers: optional)

    # The decorator gives a class without a gate of its own transformers' default (act(gate) * up);
    # a release that renamed it makes every gate look custom: refused, never miscomputed.
    default_gate = getattr(hf_moe, "_default_apply_gate", None)
    gate = getattr(type(experts), "_apply_gate", default_gate)
    if gate is not default_gate:
        return f"{kind} has its own gate function ({getattr(gate, '__qualname__', gate)})"
    act = getattr(experts, "act_fn", None)
    if not isinstance(act, (torch.nn.SiLU, SiLUActivation)):  # what hidden_act "silu" / "swish" build
        return f"{kind} uses the activation {type(act).__name__}, bam's experts are SiLU-gated"
    for weight in ("gate_up_proj", "down_proj"):
        t = getattr(experts, weight, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            return f"{kind} has no 3-D {weight}"
    return None


def _weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj [E, 2F, D] and down_proj [E, D, F], as views of the module's parameters."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # stored [E, D, 2F] and [E, F, D]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward transformers calls for ``experts_implementation="bam"``: hidden_states [T, D],
    top_k_index [T, k] and top_k_weights [T, k] from the model's router -> [T, D] in the dtype of
    hidden_states."""
    why = unsupported(self)
    if why is not None:
        name = getattr(getattr(self, "config", None), "_experts_implementation", NAME)
        raise ValueError(f'experts_implementation="{name}": {why}, which bam\'s kernels do not serve; '
                         'load the model with experts_implementation="grouped_mm" or "eager"')
    gate_up, down = _weights(self)
    out = moe_mlp(hidden_states, gate_up, down, top_k_weights, top_k_index)
    return out.to(hidden_states.dtype)
