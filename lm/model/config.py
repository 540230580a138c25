"""The model's config section (`model`): the shared knobs of the decoder stack and one
declared section per built-in mixer (model.attention, model.mamba2, ...: each mixer's
file owns its section's class); a plug-in mixer's section is added by its registration
(lm/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm.model.mixers.attention import AttentionConfig
from lm.model.mixers.mamba2 import Mamba2Config
from lm.model.mixers.mlp import MLPConfig
from lm.model.mixers.moe import MoEConfig
from lm.model.mixers.retention import RetentionConfig
from lm.model.mixers.skip import SkipChannelConfig, SkipConfig
from lm.model.recursive import Recursion, migrate_model_section
from lm.model.rope_scaling import RopeScaling
from lm.schema import Composed, knob, section


@dataclass(frozen=True)
class ModelConfig(Composed):
    """The model's shared knobs, then one section per mixer (model.attention,
    model.mamba2, model.retention, model.mlp, model.moe, and plug-ins: see
    lm/model/mixers)."""
    section_group = "model"
    migrate = staticmethod(migrate_model_section)  # config.json of earlier releases

    vocab_size: int = knob(0, doc="0 = take the tokenizer's vocabulary size.")
    d_model: int = knob(256, doc="Width of the residual stream.")
    n_layers: int = knob(4, doc="Blocks (layers) in the stack.")
    n_heads: int = knob(4, doc="Query heads (attention); heads of Mamba-2 and retention.")
    n_kv_heads: int = knob(0, doc="0 = n_heads (multi-head); 1 = MQA; in between = GQA.")
    head_dim: int = knob(0, doc="0 = d_model // n_heads.")
    norm: Literal["rms", "layer"] = knob("rms", doc="RMSNorm or LayerNorm.")
    norm_position: Literal["pre", "post", "peri", "out"] = knob(
        "pre", doc="Where a block's norms sit: before each mixer (pre), after the residual "
                   "add (post), both around the mixer (peri: Gemma 2/3), or only on each "
                   "mixer's output, before the residual add (out: OLMo 2).")
    norm_eps: float = knob(1e-6, doc="Added to the mean square in every norm (HF: "
                                     "rms_norm_eps).")
    layernorm_scaling: bool = knob(False, doc="Scale each block's norm outputs by "
                                              "1/sqrt(l), l = 1 for the first layer "
                                              "(Sun et al. 2025, 'The Curse of Depth').")
    embed_norm: bool = knob(False, doc="A norm on the token embeddings before the first "
                                       "block (Peri-LN's y0 = Norm(x_emb), Kim et al. 2025): "
                                       "without it a peri-LN stack's unit-RMS sublayer "
                                       "outputs swamp the small-init embedding.")
    qk_norm: bool = knob(False, doc="A norm (of model.norm's kind) on each head's queries "
                                    "and keys.")
    qk_norm_scope: Literal["head", "all"] = knob(
        "head", doc="With qk_norm: normalise each head's query and key (head: Qwen3, "
                    "Gemma 3), or all heads' projected queries and keys at once, before "
                    "they are split into heads (all: OLMo 2).")
    scale_embeddings: bool = knob(False, doc="Multiply the token embeddings by "
                                             "sqrt(d_model) before the first block (Gemma); "
                                             "a tied readout uses the table unscaled.")
    rope_theta: float = knob(10_000.0, roles={"free_init"}, doc="RoPE base frequency.")
    rope_scaling: RopeScaling = section(RopeScaling)
    max_seq_len: int = knob(2048, roles={"free_init", "eval_time"},
                            doc="The longest sequence the model is built for (RoPE tables).")
    recursion: Recursion = section(Recursion)
    tie_embeddings: bool = knob(True, doc="The readout is the embedding table's transpose.")
    parallel_block: bool = knob(False, doc="x + mixer(norm(x)) + channel(norm(x)).")
    logit_softcap: float = knob(0.0, doc="0 = off; else cap * tanh(logits / cap).")
    init: Literal["standard", "mup"] = knob(
        "standard", doc="Parametrisation: standard, or muP (LR multipliers from the "
                        "optimizer's rule, widths relative to mup_base_width).")
    init_std: float = knob(0.02, roles={"traced"}, doc="Init std of the hidden matrices "
                                                       "(muP: at mup_base_width).")
    mup_base_width: int = knob(256, doc="muP: the d_model the hyperparameters were tuned at.")
    param_dtype: Literal["float32", "bfloat16"] = knob("float32", doc="Parameter storage.")
    compute_dtype: Literal["float32", "bfloat16"] = knob(
        "float32", roles={"free_init"}, doc="Matmul inputs and activations.")
    scan_layers: bool = knob(False, doc="One block's program scanned over stacked layers "
                                        "(faster compiles; one mixer type per kind).")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = knob(
        "none", roles={"free_init"},
        doc="Rematerialisation of each block in the backward pass: none | full (save only "
            "the block inputs) | dots (save matmul outputs) | dots_no_batch (save matmuls "
            "without batch dimensions: weights-side products, not attention scores).")
    mixer_pattern: str = knob(
        "a", doc="Sequence mixer per layer by code letter, cycled over the layers: a = "
                 "attention, m = Mamba-2 (SSD), r = RetNet retention, - = none (a pruned "
                 "layer's removed attention). \"a\" = a transformer; \"mmma\" = attention "
                 "every 4th layer.")
    channel_pattern: str = knob(
        "f", doc="Channel mixer per layer, cycled likewise: f = the MLP, e = mixture of "
                 "experts, - = none (removed by pruning) (\"fe\" = MoE every 2nd layer).")

    attention: AttentionConfig = section(AttentionConfig)
    mamba2: Mamba2Config = section(Mamba2Config)
    retention: RetentionConfig = section(RetentionConfig)
    mlp: MLPConfig = section(MLPConfig)
    moe: MoEConfig = section(MoEConfig)
    skip: SkipConfig = section(SkipConfig)
    skip_channel: SkipChannelConfig = section(SkipChannelConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads
