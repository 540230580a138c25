"""Phi-3 (Phi3ForCausalLM, Microsoft): Mistral (a sliding window, or none) with the q, k
and v projections fused into one qkv_proj ([q; k; v] rows) and the MLP's gate and up
projections into gate_up_proj ([gate; up] rows). The fusion lives in the tensor table:
each lmlab matrix reads its rows on import, and export joins them (hf_tensors.Entry
.fused). Phi-3 expresses nothing Llama / Mistral do not, so `lm export hf` writes a
Phi-3 import as Llama (Mistral with a window), the same function; `--family phi3`
writes it fused. Refused: longrope (Phi-3's 128k RoPE) and partial rotary embeddings
(Phi-4-mini's partial_rotary_factor < 1), which lmlab does not compute.
"""

from lm.config import ConfigError
from lm.interop.families import Family, register
from lm.interop.hf_config import (DECODER_REFUSES, DECODER_UNSUPPORTED, decoder_config_from_hf,
                                  decoder_config_to_hf)
from lm.interop.hf_tensors import decoder_tensors, rows


def config_from_hf(family, hf: dict):
    hf = dict(hf)
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        # transformers >= 5 keeps Phi-3's factor (1.0 unless partial) in rope_parameters
        factor = params["partial_rotary_factor"]
        if factor not in (None, 1, 1.0):
            raise ConfigError(f"HF config.json: rope_parameters.partial_rotary_factor={factor!r} "
                              "is not supported by lmlab (partial rotary embeddings are not "
                              "built)")
        hf["rope_parameters"] = {k: v for k, v in params.items() if k != "partial_rotary_factor"}
    # read only by longrope, which _rope refuses
    hf.pop("original_max_position_embeddings", None)
    return decoder_config_from_hf(family, hf)


def config_to_hf(family, cfg):
    out = decoder_config_to_hf(family, cfg)
    out["original_max_position_embeddings"] = cfg.max_seq_len
    return out


def tensors(family, cfg):
    h, kv, dh, ff = cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.mlp.d_ff(cfg.d_model)
    qkv = {"wq": (0, h * dh), "wk": (h * dh, (h + kv) * dh),
           "wv": ((h + kv) * dh, (h + 2 * kv) * dh)}
    gate_up = {"w_gate": (0, ff), "w_in": (ff, 2 * ff)}
    out = []
    for e in decoder_tensors(family, cfg):
        prefix = ".".join(e.hf_names[0].split(".")[:4])  # model.layers.{i}.self_attn / mlp
        if e.path[-1] in qkv and e.path[-2] == "mixer":
            e = rows(e, f"{prefix}.qkv_proj.weight", *qkv[e.path[-1]])
        elif e.path[-1] in gate_up:
            e = rows(e, f"{prefix}.gate_up_proj.weight", *gate_up[e.path[-1]])
        out.append(e)
    return out


PHI3 = register(Family(
    model_type="phi3", architecture="Phi3ForCausalLM", window="always",
    refuses={**DECODER_REFUSES, "resid_pdrop": ((0, 0.0), "this feature is not built")},
    unsupported=DECODER_UNSUPPORTED + (
        ("model.rope_scaling (Phi-3's RoPE is plain or longrope)",
         lambda c: c.rope_scaling.type != "none"),),
    export_fields={"resid_pdrop": 0.0, "embd_pdrop": 0.0},
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors,
))
