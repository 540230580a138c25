"""Qwen3 (Qwen3ForCausalLM): Llama with a per-head RMSNorm on q and k (q_norm, k_norm)."""

from lm.interop.families import Family, register

QWEN3 = register(Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True,
    export_fields={"attention_bias": False, "use_sliding_window": False,
                   "sliding_window": None},
))
