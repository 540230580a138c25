"""Pod-scale configs for `lm compile` (and real TPU runs): `--config configs/pod.py:SIZE`
with SIZE one of 125m, 350m, 1b, 7b (lm/configs/sizes.py). bf16 compute, f32 parameters,
seq 2048, scanned layers (compiles in seconds per layer body instead of per layer).
Set the global batch and mesh per topology: e.g.
    lm compile --topology v5p-64 --config configs/pod.py:7b --set batch_size=64 \\
        --set mesh.fsdp=32
"""

from lm.config import DataConfig, OptimConfig, TrainConfig
from sizes import sized


def config(size: str = "1b") -> TrainConfig:
    vocab = {"125m": 32_768, "350m": 32_768}.get(size)  # the GPT-2 shapes get a real vocabulary
    extra = {"vocab_size": vocab} if vocab else {}
    return TrainConfig(
        name=f"pod-{size}",
        model=sized(size, max_seq_len=8192, compute_dtype="bfloat16", scan_layers=True,
                    **extra),
        data=DataConfig(seq_len=2048),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, weight_decay=0.1),
        batch_size=64, steps=100_000,
    )
