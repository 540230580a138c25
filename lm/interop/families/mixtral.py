"""Mixtral (MixtralForCausalLM): Mistral with a mixture of SwiGLU experts in every layer
(softmax router, top-k, gates renormalised over the chosen experts)."""

from lm.interop.families import Experts, Family, register

MIXTRAL = register(Family(
    model_type="mixtral", architecture="MixtralForCausalLM", window="always",
    experts=Experts(count_key="num_local_experts", width_key="intermediate_size",
                    prefix="block_sparse_moe.", weights=("w1", "w3", "w2")),
    export_fields={"router_jitter_noise": 0.0},
))
