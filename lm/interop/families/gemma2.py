"""Gemma 2 (Gemma2ForCausalLM, Google): a norm on both sides of each sublayer
(model.norm_position=peri: input_layernorm, post_attention_layernorm,
pre_feedforward_layernorm, post_feedforward_layernorm), RMSNorms that scale by
(1 + weight) (the tensor table adds and removes the 1), token embeddings times
sqrt(d_model) (model.scale_embeddings), a GeGLU MLP (gelu_pytorch_tanh: model.mlp
.activation=geglu), attention logits scaled by query_pre_attn_scalar^-1/2
(model.attention.scale_dim) and soft-capped (attn_logit_softcapping:
model.attention.softcap), final logits soft-capped (final_logit_softcapping:
model.logit_softcap), and sliding-window layers among global ones (layer_types +
sliding_window: model.attention.window and window_pattern, "lg" by default).

config.json fields Gemma reads from its own class defaults when they are absent (older
or hand-written configs) are taken from DEFAULTS, as transformers does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm.config import ConfigError
from lm.interop.families import Family, register
from lm.interop.hf_config import (DECODER_REFUSES, decoder_config_from_hf, decoder_config_to_hf,
                                  unsupported_except)
from lm.interop.hf_tensors import decoder_tensors

# Gemma2Config's defaults for the fields whose value the shared decoder would otherwise
# guess differently (transformers 5.x).
DEFAULTS = {"tie_word_embeddings": True, "query_pre_attn_scalar": 256,
            "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6}

REFUSES = {**{k: v for k, v in DECODER_REFUSES.items() if k != "hidden_act"},
           "hidden_activation": (("gelu_pytorch_tanh",),
                                 "lmlab's GeGLU gate is gelu_pytorch_tanh"),
           "use_bidirectional_attention": ((None, False), "lmlab's attention is causal")}

# What Gemma expresses beyond the shared decoder, and what it requires.
UNSUPPORTED = unsupported_except(
    "model.scale_embeddings", "model.logit_softcap", "model.attention.softcap",
    "model.attention.scale_dim", "model.mlp.activation", "model.attention.local_rope_theta",
    "model.attention.window_pattern (global layers among windowed ones)") + (
    ("model.scale_embeddings=false", lambda c: not c.scale_embeddings),
    ("model.mlp.activation (Gemma's is geglu)",
     lambda c: "f" in c.channel_pattern and c.mlp.activation != "geglu"),
)

KINDS = {"sliding_attention": "l", "full_attention": "g"}


def window_from_hf(hf: dict, n_layers: int, every: int) -> tuple[int, str]:
    """(model.attention.window, window_pattern) from sliding_window and layer_types (or,
    without layer_types, one global layer in `every`: Gemma 2's 2, Gemma 3's
    sliding_window_pattern). Pops the fields it reads."""
    window, types = hf.pop("sliding_window", None), hf.pop("layer_types", None)
    every = int(hf.pop("sliding_window_pattern", None) or every)
    if types is None:
        types = ["sliding_attention" if (i + 1) % every else "full_attention"
                 for i in range(n_layers)]
    if set(types) - set(KINDS) or len(types) != n_layers:
        raise ConfigError(f"HF config.json: layer_types={types!r} is not one of "
                          f"{'/'.join(KINDS)} per layer (not supported by lmlab)")
    letters = "".join(KINDS[t] for t in types)
    if "l" not in letters or not window:
        return 0, ""
    period = next(p for p in range(1, n_layers + 1)
                  if letters == (letters[:p] * n_layers)[:n_layers])
    pattern = letters[:period]
    return int(window), "" if pattern == "l" else pattern


def window_to_hf(cfg) -> dict:
    a = cfg.attention
    pattern = (a.window_pattern or "l") if a.window else "g"
    types = [next(t for t, c in KINDS.items() if c == pattern[i % len(pattern)])
             for i in range(cfg.n_layers)]
    # (transformers builds the sliding mask even where no layer uses it)
    return {"sliding_window": a.window or cfg.max_seq_len, "layer_types": types}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def gemma_config_from_hf(family, hf: dict, every: int, rope) -> object:
    """The shared decoder on Gemma's fields: `rope(hf)` pops the RoPE fields and returns
    model.attention.local_rope_theta (0: every layer alike)."""
    hf = {**DEFAULTS, **hf}
    hf.pop("hidden_act", None)  # older saves carry it; Gemma reads hidden_activation
    hf.pop("cache_implementation", None)  # how generate caches ("hybrid"): no effect
    scale_dim = hf.pop("query_pre_attn_scalar")
    final_cap = hf.pop("final_logit_softcapping") or 0.0
    attn_cap = hf.pop("attn_logit_softcapping") or 0.0
    n_layers = int(hf.get("num_hidden_layers", 0))
    window, pattern = window_from_hf(hf, n_layers, every)
    local_theta = rope(hf)
    cfg = decoder_config_from_hf(family, hf)
    return dataclasses.replace(
        cfg, scale_embeddings=True, logit_softcap=float(final_cap),
        mlp=dataclasses.replace(cfg.mlp, activation="geglu"),
        attention=dataclasses.replace(
            cfg.attention, softcap=float(attn_cap), scale_dim=float(scale_dim),
            window=window, window_pattern=pattern,
            local_rope_theta=local_theta if window else 0.0))


def gemma_config_to_hf(family, cfg) -> dict:
    out = decoder_config_to_hf(family, cfg)
    del out["hidden_act"]
    a = cfg.attention
    out.update(hidden_activation="gelu_pytorch_tanh",
               query_pre_attn_scalar=_number(a.scale_dim or cfg.dh),
               final_logit_softcapping=cfg.logit_softcap or None,
               attn_logit_softcapping=a.softcap or None, use_bidirectional_attention=False,
               **window_to_hf(cfg))
    return out


def one_plus(entry):
    """A norm scale entry: HF's weight w scales by (1 + w); lmlab's scale is 1 + w."""
    return dataclasses.replace(
        entry, to_lm=lambda t: entry.to_lm(t) + np.float32(1),
        to_hf=lambda x: [t - np.asarray(1, t.dtype) for t in entry.to_hf(x)])


def tensors(family, cfg):
    return [one_plus(e) if e.path[-1] == "scale" else e for e in decoder_tensors(family, cfg)]


def _plain_rope(hf: dict) -> float:
    return 0.0  # one RoPE for every layer: the shared decoder reads it


GEMMA2 = register(Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM", norm_position="peri",
    window="layers", refuses=REFUSES,
    unsupported=UNSUPPORTED + (("model.attention.local_rope_theta (Gemma 2 has one RoPE)",
                                lambda c: bool(c.attention.local_rope_theta)),),
    export_fields={"attention_bias": False},
    config_from_hf=lambda family, hf: gemma_config_from_hf(family, hf, 2, _plain_rope),
    config_to_hf=gemma_config_to_hf, tensors=tensors,
))
