"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2 (lm/interop/families/
gemma2.py) with a per-head RMSNorm on q and k (scaling by 1 + weight, like every Gemma
norm), five local layers to a global one by default (sliding_window_pattern 6, or
layer_types), and the local layers' own RoPE base (rope_local_base_freq, or
rope_parameters.sliding_attention: model.attention.local_rope_theta) without the
global layers' scaling (rope_parameters.full_attention / rope_scaling: model.rope_theta
and model.rope_scaling). Soft-caps are off by default. The multimodal Gemma 3
(Gemma3ForConditionalGeneration) is not read.
"""

from __future__ import annotations

from lm.config import ConfigError
from lm.interop.families import Family, register
from lm.interop.families.gemma2 import (REFUSES, UNSUPPORTED, gemma_config_from_hf,
                                        gemma_config_to_hf, tensors)
from lm.interop.hf_config import rope_parameters

DEFAULTS = {"final_logit_softcapping": None, "attn_logit_softcapping": None,
            "use_bidirectional_attention": False}
TYPES = ("full_attention", "sliding_attention")


def rope(hf: dict) -> float:
    """The local layers' RoPE base (0: the global one, scaling included); leaves the
    global RoPE in hf as the shared decoder reads it (rope_parameters or rope_theta +
    rope_scaling)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(TYPES):
        if set(params) - set(TYPES):
            raise ConfigError(f"HF config.json: rope_parameters keys {sorted(params)} are not "
                              f"{' / '.join(TYPES)} (not supported by lmlab)")
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        full.setdefault("rope_theta", hf.pop("rope_theta", 1_000_000.0))
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
        local.setdefault("rope_theta", hf.pop("rope_local_base_freq", 10_000.0))
        hf["rope_parameters"] = full
        if local == full:
            return 0.0
        if set(local) - {"rope_type", "rope_theta"} or local["rope_type"] != "default":
            raise ConfigError(f"HF config.json: rope_parameters.sliding_attention={local!r} "
                              "(scaled RoPE on the local layers) is not supported by lmlab")
        return float(local["rope_theta"])
    hf.setdefault("rope_theta", 1_000_000.0)
    return float(hf.pop("rope_local_base_freq", 10_000.0))


def config_to_hf(family, cfg) -> dict:
    out = gemma_config_to_hf(family, cfg)
    full = rope_parameters(cfg)
    local = cfg.attention.local_rope_theta
    out["rope_parameters"] = {"full_attention": full, "sliding_attention": (
        {"rope_type": "default", "rope_theta": local} if local else dict(full))}
    del out["rope_theta"]
    return out


GEMMA3_TEXT = register(Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM", qk_norm=True,
    norm_position="peri", window="layers", refuses=REFUSES, unsupported=UNSUPPORTED,
    export_fields={"attention_bias": False},
    config_from_hf=lambda family, hf: gemma_config_from_hf(family, {**DEFAULTS, **hf}, 6, rope),
    config_to_hf=config_to_hf, tensors=tensors,
))
