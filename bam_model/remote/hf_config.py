"""Hugging Face configurations of bam's models, as written in every model folder bam saves.

This file travels inside the folder (``auto_map`` in ``config.json`` names it), so it imports nothing
but transformers: ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works where bam is
not installed. The settings, their defaults and their checks are bam's own (``DenseConfig`` and
``BamConfig``, copied into this file): transformers accepts exactly the configurations bam reads, and
``bam_config()`` gives bam's config back. Key names are Hugging Face's where the setting is theirs
(``hidden_size``, ``num_hidden_layers``, ``num_experts_per_tok``, ``router_aux_loss_coef``, ...;
``HF_KEYS``), bam's own otherwise (``block``, ``attention``, ``attention_top_k``,
``straight_through``, ``method``, ...).
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..config import FIELD_OF_HF_KEY, HF_KEYS, BamConfig, DenseConfig, config_from_dict

# The architecture of a config made without arguments (transformers makes such configs, to compare or
# to fill in); the settings that have defaults take bam's.
HF_DEFAULTS = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
               "num_attention_heads": 8}


class BamDenseConfig(PretrainedConfig):
    """A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), ``DenseConfig``'s
    settings under Hugging Face's names; ``block`` is ``"sequential"`` (Llama), ``"parallel"``
    (GPT-J: attention and FFN read one norm) or ``"post-norm"`` (OLMo 2: norms on the sublayers'
    outputs)."""

    model_type = DenseConfig.model_type
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    bam_class = DenseConfig

    def __init__(self, **kwargs):
        for alias, key in self.attribute_map.items():
            if alias in kwargs:
                kwargs[key] = kwargs.pop(alias)
        # bam's own spelling of a setting transformers names otherwise (top_k aside: a generation setting)
        spelled = sorted(key for key in kwargs if key in HF_KEYS and key != "top_k")
        if spelled:
            raise ValueError(f"unknown {self.model_type} config keys: {spelled}; transformers' names are "
                             f"{[HF_KEYS[key] for key in spelled]}")
        if kwargs.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling ({kwargs['rope_scaling']!r}) is not supported; only plain RoPE "
                             "is")
        fields = {f.name for f in dataclasses.fields(self.bam_class)}
        # bam's settings (under Hugging Face's name where it has one), and the output and generation
        # switches transformers keeps; everything else goes to PretrainedConfig.
        ours = [key for key in kwargs if key not in HF_KEYS and FIELD_OF_HF_KEY.get(key, key) in fields]
        settings = {**HF_DEFAULTS, **{key: kwargs.pop(key) for key in ours}}
        settings.setdefault("num_key_value_heads", settings["num_attention_heads"])
        use_cache = kwargs.pop("use_cache", True)
        output_router_logits = kwargs.pop("output_router_logits", False)
        hidden_act = kwargs.pop("hidden_act", "silu")
        config = config_from_dict({"model_type": self.model_type, "hidden_act": hidden_act, **settings})
        super().__init__(**kwargs)
        for name, value in dataclasses.asdict(config).items():
            setattr(self, HF_KEYS.get(name, name), value)
        self.hidden_act, self.use_cache = "silu", use_cache
        if self.model_type == BamConfig.model_type:
            self.output_router_logits = output_router_logits

    def bam_config(self) -> DenseConfig:
        """bam's configuration of this model, from the settings as they are now."""
        return self.bam_class(**{f.name: getattr(self, HF_KEYS.get(f.name, f.name))
                                 for f in dataclasses.fields(self.bam_class)})


class BamMoeConfig(BamDenseConfig):
    """A mixture upcycled from dense models (``BamConfig``): ``num_local_experts`` SwiGLU experts in
    every layer, routed top-``num_experts_per_tok`` (``norm_topk_prob``: weights renormalised over the
    kept ones; ``straight_through``: renormalised forward, the plain probabilities' gradient), and
    attention experts when ``attention`` is ``"expert-kv"`` or ``"shared-kv"`` (soft routing over every
    expert, or the top ``attention_top_k``). The loss adds ``router_aux_loss_coef`` times the
    load-balancing loss and ``router_z_loss_coef`` times the router z-loss of every layer."""

    model_type = BamConfig.model_type
    attribute_map = {"num_experts": "num_local_experts"}
    bam_class = BamConfig

    def __init__(self, **kwargs):
        # Its own, though it adds nothing: transformers gives a config class that defines no __init__
        # a generated one, which would skip BamDenseConfig's.
        super().__init__(**kwargs)
