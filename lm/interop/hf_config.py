"""Hugging Face `config.json` <-> lmlab model knobs: the shared decoder mapping of the
Llama-lineage families (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU MLP or softmax
top-k SwiGLU experts), which each family's record (lm/interop/families/) parameterises
with what its decoder has (q/k/v biases, qk-norm, a sliding window, the experts' layout)
and what it refuses.

Every field of an HF config is either mapped to a knob, listed in NO_EFFECT (it does not
change the forward pass: bookkeeping, generation defaults, training-only settings at
their inactive value), or refused with one line naming it. Nothing is silently dropped.
RoPE scaling (`rope_parameters` / `rope_scaling`: linear, yarn, llama3) maps to
`model.rope_scaling`. `model_config_from_hf`, `family_for` and `hf_config_from_model`
(what lm/interop/hf_import.py and hf_export.py call) go through the records.
"""

from __future__ import annotations

import dataclasses
import math

from lm.config import ConfigError, ModelConfig

# Fields that do not change the model's function (ids, dtypes of the file, caching,
# initialisation, how the loss or generation would be run, tensor-parallel hints). They
# are accepted and kept as they are: a directory as transformers (or a converter)
# saves it imports untouched. Token ids are checked against the tokenizer's files by
# lm/interop/hf_import.py, not here.
NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "output_router_logits", "pretraining_tp", "base_model_tp_plan", "base_model_pp_plan",
    "tie_encoder_decoder", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "max_window_layers", "_attn_implementation_autoset",
    "router_aux_loss_coef",  # mapped to model.moe.aux_loss below (training only)
    # bookkeeping older / converted saves carry
    "tokenizer_class", "torchscript", "use_bfloat16", "is_decoder", "add_cross_attention",
    "tf_legacy_loss", "finetuning_task", "prefix", "task_specific_params",
    "keys_to_ignore_at_inference", "cross_attention_hidden_size",
    # generation defaults (older configs keep them here, newer in generation_config.json)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}
# Families of metadata fields, by name: private keys a tool wrote for itself
# (`_name_or_path`, `_model_name_or_path` from a GGUF conversion, `_commit_hash`, ...)
# and special token ids (`unk_token_id`, `sep_token_id`, `decoder_start_token_id`, ...).
NO_EFFECT_PREFIXES = ("_",)
NO_EFFECT_SUFFIXES = ("_token_id",)


def no_effect(key: str) -> bool:
    """Whether config.json's field `key` is metadata (kept, never mapped or refused)."""
    return (key in NO_EFFECT or key.startswith(NO_EFFECT_PREFIXES)
            or key.endswith(NO_EFFECT_SUFFIXES))

# What every family built on the shared decoder refuses on import: config.json fields
# whose value must be the inactive one (lmlab has no such feature): name -> (the values
# accepted, why another value is refused). A family's record may add to it (`refuses`).
DECODER_REFUSES = {
    "attention_dropout": ((0, 0.0), "this feature is not built"),
    "router_jitter_noise": ((0, 0.0), "this feature is not built"),
    "mlp_bias": ((False,), "this feature is not built"),
    "attention_bias": ((False,), "this feature is not built"),
    "use_sliding_window": ((False,), "this feature is not built"),
    "partial_rotary_factor": ((None, 1, 1.0), "this feature is not built"),
    "hidden_dropout": ((0, 0.0), "this feature is not built"),
    "embd_pdrop": ((0, 0.0), "this feature is not built"),
    "hidden_act": (("silu",), "lmlab's gated MLP is SwiGLU: silu"),
}


def _need(hf: dict, key: str):
    if key not in hf:
        raise ConfigError(f"HF config.json: missing field {key!r}")
    return hf[key]


def _ratio(width: int, d_model: int) -> float:
    """A ratio r with int(r * d_model) == width exactly (lmlab's d_ff = int(ratio * d))."""
    r = width / d_model
    while int(r * d_model) < width:
        r = math.nextafter(r, math.inf)
    return r


# HF rope types lmlab computes identically (lm/model/rope_scaling.py) and, per type, the
# HF keys it reads -> RopeScaling fields. HF's "dynamic" rescales with the running length,
# which lmlab's fixed-factor "ntk" is not: refused.
ROPE_TYPES = {
    "linear": {"factor": "factor"},
    "yarn": {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow",
             "attention_factor": "attention_factor"},
    "llama3": {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len",
               "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"},
}


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, RopeScaling fields) from `rope_parameters` (transformers >= 5) or the
    older `rope_scaling` + `rope_theta`; a type or key lmlab cannot compute is refused."""
    params, where = hf.get("rope_parameters"), "rope_parameters"
    legacy = hf.get("rope_scaling")
    if legacy is not None:  # the older name; where both are given, the scaled one counts
        kind_of = lambda p: (p or {}).get("rope_type", (p or {}).get("type", "default"))  # noqa: E731
        if kind_of(params) != "default" and dict(legacy) != dict(params):
            raise ConfigError("HF config.json: rope_scaling and rope_parameters disagree")
        if kind_of(params) == "default":
            params, where = {"rope_theta": (params or {}).get("rope_theta", hf.get(
                "rope_theta", 10_000.0)), **dict(legacy)}, "rope_scaling"
    theta = float(hf.get("rope_theta", 10_000.0))
    if params is None:
        return theta, {}
    theta = float(params.get("rope_theta", theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        unknown = set(params) - {"rope_type", "type", "rope_theta"}
        if unknown:
            raise ConfigError(f"HF config.json: {where}.{sorted(unknown)[0]} is not "
                              "supported by lmlab")
        return theta, {}
    if kind not in ROPE_TYPES:
        raise ConfigError(f"HF config.json: {where}.rope_type={kind!r} (RoPE scaling) is not "
                          f"supported by lmlab (it computes {', '.join(ROPE_TYPES)})")
    keys = ROPE_TYPES[kind]
    unknown = set(params) - {"rope_type", "type", "rope_theta", *keys}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"HF config.json: {where}.{key}={params[key]!r} ({kind} RoPE "
                          "scaling) is not supported by lmlab")
    out = {"type": kind, **{field: params[k] for k, field in keys.items()
                            if params.get(k) is not None}}
    if kind == "yarn" and out.get("original_max_seq_len"):
        # transformers takes YaRN's factor as max_position_embeddings / original when the
        # checkpoint names the original length (and ignores the stored factor).
        out["factor"] = int(_need(hf, "max_position_embeddings")) / out["original_max_seq_len"]
    for field in out:
        if field != "type":
            out[field] = (int if field == "original_max_seq_len" else float)(out[field])
    return theta, out


def rope_parameters(cfg: ModelConfig) -> dict:
    """lmlab's RoPE knobs as transformers' rope_parameters."""
    s = cfg.rope_scaling
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s.type == "none":
        return out
    if s.type not in ROPE_TYPES:
        raise ConfigError(f"lm export hf: model.rope_scaling.type={s.type} has no "
                          "transformers equivalent (HF's 'dynamic' rescales with the length)")
    out["rope_type"] = s.type
    for k, field in ROPE_TYPES[s.type].items():
        value = getattr(s, field)
        if field == "original_max_seq_len":
            value = value or cfg.max_seq_len
        if field == "attention_factor" and not value:
            continue  # 0 = HF's default 0.1 ln(factor) + 1, which it computes too
        out[k] = value
    return out


def decoder_config_from_hf(family, hf: dict) -> ModelConfig:
    """The shared Llama-lineage decoder: an HF config.json (as a dict) of `family` (a
    lm.interop.families.Family) -> lmlab's ModelConfig, or ConfigError naming the first
    field lmlab cannot express."""
    used = set(NO_EFFECT) | set(family.refuses)
    for key, (ok, why) in family.refuses.items():
        if key in hf and hf[key] not in ok:
            raise ConfigError(f"HF config.json: {key}={hf[key]!r} is not supported by lmlab "
                              f"({why})")
    d = int(_need(hf, "hidden_size"))
    n_layers = int(_need(hf, "num_hidden_layers"))
    n_heads = int(_need(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") or d // n_heads
    rope_theta, rope_scaling = _rope(hf)
    kw = dict(
        vocab_size=int(_need(hf, "vocab_size")), d_model=d, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim), norm="rms", norm_position=family.norm_position,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=family.qk_norm,
        qk_norm_scope=family.qk_norm_scope,
        rope_theta=rope_theta, max_seq_len=int(_need(hf, "max_position_embeddings")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), mixer_pattern="a")
    used |= {"hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
             "vocab_size", "num_key_value_heads", "rms_norm_eps", "rope_theta",
             "rope_parameters", "rope_scaling", "max_position_embeddings",
             "tie_word_embeddings", "intermediate_size"}

    window = hf.get("sliding_window")
    used |= {"sliding_window", "layer_types"}
    layer_types = hf.get("layer_types")
    if layer_types is not None and set(layer_types) - {"full_attention"}:
        if set(layer_types) != {"sliding_attention"}:
            raise ConfigError(f"HF config.json: layer_types={layer_types!r} mixes attention "
                              "kinds per layer (not supported by lmlab)")
    if window is not None and (family.window == "always" or hf.get("use_sliding_window") or (
            layer_types and set(layer_types) == {"sliding_attention"})):
        window = int(window)
    else:
        window = 0  # Qwen2/3 carry a sliding_window value that is off without the switch

    attention = dict(qkv_bias=family.qkv_bias, window=window)
    mlp = dict(activation="swiglu", ratio=_ratio(int(_need(hf, "intermediate_size")), d))
    kw["channel_pattern"] = "f"
    moe = None
    ex = family.experts
    if ex is not None:
        n_experts = hf.get("num_local_experts", hf.get("num_experts"))
        if n_experts is None:
            raise ConfigError(f"HF config.json: missing field {ex.count_key!r}")
        used |= {"num_local_experts", "num_experts", "num_experts_per_tok", ex.width_key}
        renormalize = (True if ex.renormalize_key is None
                       else bool(hf.get(ex.renormalize_key, False)))
        used |= {ex.renormalize_key} - {None}
        moe = dict(n_experts=int(n_experts), top_k=int(_need(hf, "num_experts_per_tok")),
                   activation="swiglu", router="softmax", n_shared_experts=0,
                   aux_loss=float(hf.get("router_aux_loss_coef", 0.0)), router_z_loss=0.0,
                   bias_rate=0.0, capacity_factor=0.0, renormalize=renormalize,
                   ratio=_ratio(int(_need(hf, ex.width_key)), d))
        kw["channel_pattern"] = "e"
        if ex.dense_layers:
            used |= {"decoder_sparse_step", "mlp_only_layers"}
            step = int(hf.get("decoder_sparse_step", 1))
            dense = set(hf.get("mlp_only_layers") or [])
            pattern = "".join("e" if i not in dense and step > 0 and (i + 1) % step == 0
                              else "f" for i in range(n_layers))
            kw["channel_pattern"] = pattern if len(set(pattern)) > 1 else pattern[0]

    unknown = sorted(k for k in hf if k not in used and not no_effect(k))
    if unknown:
        raise ConfigError(f"HF config.json: field {unknown[0]}={hf[unknown[0]]!r} is not "
                          "understood by lmlab's importer (refused rather than dropped)")
    base = ModelConfig()
    cfg = dataclasses.replace(
        base, **kw, attention=dataclasses.replace(base.attention, **attention),
        mlp=dataclasses.replace(base.mlp, **mlp),
        rope_scaling=dataclasses.replace(base.rope_scaling, **rope_scaling))
    if moe is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(base.moe, **moe))
    return cfg


def _moe(cfg: ModelConfig) -> bool:
    return "e" in cfg.channel_pattern


# lmlab knobs the shared decoder has no equivalent for (export): (knob, cfg -> True where
# it is set). A family's record may replace the list (`unsupported`).
DECODER_UNSUPPORTED = (
    ("model.norm", lambda c: c.norm != "rms"),
    ("model.layernorm_scaling", lambda c: c.layernorm_scaling),
    ("model.scale_embeddings", lambda c: c.scale_embeddings),
    ("model.embed_norm", lambda c: c.embed_norm),
    ("model.parallel_block", lambda c: c.parallel_block),
    ("model.logit_softcap", lambda c: bool(c.logit_softcap)),
    ("model.init=mup", lambda c: c.init == "mup"),
    ("model.mixer_pattern", lambda c: set(c.mixer_pattern) != {"a"}),
    ("model.channel_pattern (a channel mixer other than mlp / moe)",
     lambda c: bool(set(c.channel_pattern) - {"f", "e"})),
    ("model.attention.softcap", lambda c: bool(c.attention.softcap)),
    ("model.attention.sinks", lambda c: bool(c.attention.sinks)),
    ("model.attention.scale_dim", lambda c: c.attention.scale_dim not in (0, c.dh)),
    ("model.attention.window_pattern (global layers among windowed ones)",
     lambda c: bool(c.attention.window) and "g" in c.attention.window_pattern),
    ("model.attention.local_rope_theta", lambda c: bool(c.attention.local_rope_theta)),
    ("model.mlp.activation", lambda c: "f" in c.channel_pattern and c.mlp.activation != "swiglu"),
    ("model.moe.activation", lambda c: _moe(c) and c.moe.activation != "swiglu"),
    ("model.moe.router", lambda c: _moe(c) and c.moe.router != "softmax"),
    ("model.moe.n_shared_experts", lambda c: _moe(c) and c.moe.n_shared_experts > 0),
    ("model.moe.bias_rate", lambda c: _moe(c) and c.moe.bias_rate > 0),
    ("model.moe.capacity_factor", lambda c: _moe(c) and c.moe.capacity_factor > 0),
)


def unsupported_except(*knobs: str) -> tuple:
    """DECODER_UNSUPPORTED without the entries of these knobs (a family that has them)."""
    missing = set(knobs) - {knob for knob, _ in DECODER_UNSUPPORTED}
    assert not missing, missing
    return tuple((k, bad) for k, bad in DECODER_UNSUPPORTED if k not in knobs)


def _width(ratio: float, d: int) -> int:
    return int(ratio * d)


def decoder_config_to_hf(family, cfg: ModelConfig) -> dict:
    """The shared Llama-lineage decoder: lmlab ModelConfig -> an HF config.json dict of
    `family` (a lm.interop.families.Family that expresses cfg), token ids left out."""
    a = cfg.attention
    out = {
        "architectures": [family.architecture], "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dh, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
        "attention_dropout": 0.0, "dtype": cfg.param_dtype, "use_cache": True,
        "intermediate_size": _width(cfg.mlp.ratio, cfg.d_model),
    }
    if family.window == "always":
        out["sliding_window"] = a.window or None
    out.update(family.export_fields)
    ex = family.experts
    if ex is not None:
        m = cfg.moe
        out[ex.count_key] = m.n_experts
        out.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss,
                   output_router_logits=False)
        out[ex.width_key] = _width(m.ratio, cfg.d_model)
        if ex.renormalize_key:
            out[ex.renormalize_key] = m.renormalize
        if ex.dense_layers:
            pattern = (cfg.channel_pattern * cfg.n_layers)[:cfg.n_layers]
            out.update(decoder_sparse_step=1,
                       mlp_only_layers=[i for i, c in enumerate(pattern) if c == "f"])
    return out
