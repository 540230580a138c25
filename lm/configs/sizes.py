"""Named model sizes. `1m` ... `350m`: GPT-2-style shapes (d_model, layers, heads) for the
byte vocabulary (259 tokens), tied embeddings, GELU MLP. `1b` and `7b`: LLaMA-family
shapes (GQA, SwiGLU, RoPE theta and vocabulary of Llama-3.2-1B and Mistral-7B-v0.3), the
sizes `lm compile` tables cover. `moe-1b-7b`: OLMoE-1B-7B's shape (64 fine-grained
SwiGLU experts of width 1024, top-8, in every layer): 6.9B parameters, 1.3B active. `lm train --set model.d_model=...` overrides any knob."""

import dataclasses

from lm.model.config import ModelConfig
from lm.model.mixers.mlp import MLPConfig
from lm.model.mixers.moe import MoEConfig

SIZES = {
    #        d_model, n_layers, n_heads
    "1m": (128, 4, 4),
    "5m": (256, 6, 4),
    "20m": (384, 10, 6),
    "50m": (512, 14, 8),
    "125m": (768, 12, 12),
    "350m": (1024, 24, 16),
    "1b": (2048, 16, 32),
    "7b": (4096, 32, 32),
    "moe-1b-7b": (2048, 16, 16),
}

# Knobs beyond the shape: real vocabularies (so the logits' size is what it is at scale).
LLAMA = {
    "1b": dict(n_kv_heads=8, vocab_size=128_256, rope_theta=500_000.0, tie_embeddings=True,
               mlp=MLPConfig(activation="swiglu", ratio=4.0)),  # Llama-3.2-1B: 1.24B
    "7b": dict(n_kv_heads=8, vocab_size=32_768, rope_theta=1_000_000.0, tie_embeddings=False,
               mlp=MLPConfig(activation="swiglu", ratio=3.5)),  # Mistral-7B-v0.3: 7.25B
    "moe-1b-7b": dict(vocab_size=50_304, tie_embeddings=False, channel_pattern="e",
                      moe=MoEConfig(n_experts=64, top_k=8, ratio=0.5, activation="swiglu")),
}


def sized(name: str, **overrides) -> ModelConfig:
    d, layers, heads = SIZES[name]
    base = ModelConfig(d_model=d, n_layers=layers, n_heads=heads)
    return dataclasses.replace(base, **{**LLAMA.get(name, {}), **overrides})
