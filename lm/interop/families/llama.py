"""Llama (LlamaForCausalLM): the plain decoder: GQA, RoPE (llama3 / linear / yarn
scaling), SwiGLU, RMSNorm, tied or untied embeddings."""

from lm.interop.families import Family, register

LLAMA = register(Family(
    model_type="llama", architecture="LlamaForCausalLM",
    export_fields={"attention_bias": False, "mlp_bias": False},
))
