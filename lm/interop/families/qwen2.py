"""Qwen2 (Qwen2ForCausalLM): Llama with biases on the q, k and v projections."""

from lm.interop.families import Family, register

QWEN2 = register(Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM", qkv_bias=True,
    export_fields={"use_sliding_window": False, "sliding_window": None},
))
