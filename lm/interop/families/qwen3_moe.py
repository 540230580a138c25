"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 (qk-norm) with a mixture of SwiGLU experts,
gates renormalised or not (norm_topk_prob), dense layers where mlp_only_layers /
decoder_sparse_step say."""

from lm.interop.families import Experts, Family, register

QWEN3_MOE = register(Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", qk_norm=True,
    # (transformers >= 5 reads num_experts as num_local_experts for Qwen3-MoE)
    experts=Experts(count_key="num_experts", width_key="moe_intermediate_size",
                    prefix="mlp.", weights=("gate_proj", "up_proj", "down_proj"),
                    renormalize_key="norm_topk_prob", dense_layers=True),
    export_fields={"attention_bias": False, "use_sliding_window": False,
                   "sliding_window": None},
))
