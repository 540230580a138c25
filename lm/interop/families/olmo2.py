"""OLMo 2 (Olmo2ForCausalLM, Ai2): Llama with its block's norms moved from the sublayers'
inputs to their outputs (x + N(attn(x)), then + N(mlp(.)): model.norm_position=out;
post_attention_layernorm and post_feedforward_layernorm) and an RMSNorm over all heads'
projected queries and keys at once, before they are split into heads
(model.qk_norm_scope=all; q_norm [heads * head_dim], k_norm [kv_heads * head_dim])."""

from lm.interop.families import Family, register

OLMO2 = register(Family(
    model_type="olmo2", architecture="Olmo2ForCausalLM", qk_norm=True, qk_norm_scope="all",
    norm_position="out", export_fields={"attention_bias": False},
))
