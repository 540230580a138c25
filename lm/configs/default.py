"""The default run: a small byte-level model on the embedded Shakespeare corpus, sized to
train in under 10 minutes on a 2-core CPU."""

from lm.config import DataConfig, OptimConfig, TrainConfig
from lm.configs.sizes import sized


def config() -> TrainConfig:
    return TrainConfig(
        name="shakespeare-char",
        model=sized("1m", max_seq_len=128),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=128),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1),
        steps=800, batch_size=32, log_every=50, eval_every=200, eval_batches=16,
        checkpoint_every=200,
    )
