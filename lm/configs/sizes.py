"""Named model sizes. Parameter counts are for the byte vocabulary (259 tokens), tied
embeddings; `lm train --set model.d_model=...` overrides any of them."""

import dataclasses

from lm.config import ModelConfig

SIZES = {
    #        d_model, n_layers, n_heads
    "1m": (128, 4, 4),
    "5m": (256, 6, 4),
    "20m": (384, 10, 6),
    "50m": (512, 14, 8),
    "125m": (768, 12, 12),
    "350m": (1024, 24, 16),
}


def sized(name: str, **overrides) -> ModelConfig:
    d, layers, heads = SIZES[name]
    return dataclasses.replace(ModelConfig(d_model=d, n_layers=layers, n_heads=heads),
                               **overrides)
