"""The reference throughput shape: ~5M parameters, d=256, 6 layers, 4 heads, seq 256,
batch 16, byte vocabulary, float32, AdamW."""

from lm.config import DataConfig, TrainConfig
from sizes import sized


def config() -> TrainConfig:
    return TrainConfig(name="bench-5m", model=sized("5m", max_seq_len=256),
                       data=DataConfig(seq_len=256), batch_size=16, steps=1000)
